//! Embeds the built-in guest image built by `cargo xtask build`, when it exists. Without it the
//! crate still compiles, and launching a built-in workload reports how to build it.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(guest_embedded)");
    println!("cargo::rerun-if-env-changed=MIGRATOR_GUEST_IMAGE");
    let image = match env::var_os("MIGRATOR_GUEST_IMAGE") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default())
            .join("../target/guest/x86_64-heat-guest/release/migrator-guest"),
    };
    println!("cargo::rerun-if-changed={}", image.display());
    if image.is_file() {
        println!("cargo::rustc-cfg=guest_embedded");
        println!("cargo::rustc-env=MIGRATOR_GUEST_IMAGE={}", image.display());
    }
}
