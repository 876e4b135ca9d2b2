//! Embeds the eBPF object built by `cargo xtask build`, when it exists.
//!
//! Without it the crate still compiles (so `cargo check`, clippy and the pure unit tests work
//! on a machine without the eBPF toolchain), and loading the probes reports how to build it.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(heatprobe_embedded)");
    println!("cargo::rerun-if-env-changed=HEATPROBE_EBPF_OBJECT");
    let object = match env::var_os("HEATPROBE_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            // CARGO_MANIFEST_DIR is always set by cargo for build scripts.
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest.join("../target/bpf/bpfel-unknown-none/release/heatprobe-ebpf")
        }
    };
    println!("cargo::rerun-if-changed={}", object.display());
    if object.is_file() {
        println!("cargo::rustc-cfg=heatprobe_embedded");
        println!(
            "cargo::rustc-env=HEATPROBE_EBPF_OBJECT={}",
            object.display()
        );
    }
}
