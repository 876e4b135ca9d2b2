//! `cargo xtask build`: the eBPF object and the guest image (each for its own target, with
//! nightly), then every binary, in release mode.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::process::{cargo, cargo_nightly, run, workspace_root};

/// Where the eBPF build puts its output; heatprobe's build script embeds the object from here.
pub const EBPF_TARGET_DIR: &str = "target/bpf";

/// Where the guest image build puts its output; migrator's build script embeds it from here.
pub const GUEST_TARGET_DIR: &str = "target/guest";

pub fn ebpf_object() -> PathBuf {
    workspace_root()
        .join(EBPF_TARGET_DIR)
        .join("bpfel-unknown-none/release/heatprobe-ebpf")
}

pub fn build() -> Result<()> {
    run(
        cargo_nightly()
            .args([
                "build",
                "--package",
                "heatprobe-ebpf",
                "--bin",
                "heatprobe-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
            ])
            .env("CARGO_TARGET_DIR", workspace_root().join(EBPF_TARGET_DIR))
            // BTF lets the kernel and aya-log make sense of the object.
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                [
                    "--cfg=bpf_target_arch=\"x86_64\"",
                    "-Cdebuginfo=2",
                    "-Clink-arg=--btf",
                ]
                .join("\x1f"),
            ),
        "building the eBPF object",
    )?;
    if !ebpf_object().is_file() {
        bail!(
            "the eBPF build succeeded but {} is missing",
            ebpf_object().display()
        );
    }
    run(
        cargo_nightly()
            .args([
                "build",
                "--package",
                "migrator-guest",
                "--bin",
                "migrator-guest",
                "--target",
                "x86_64-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
            ])
            .env("CARGO_TARGET_DIR", workspace_root().join(GUEST_TARGET_DIR))
            // A static (non-PIE) executable; the guest's build script adds its linker script.
            .env("CARGO_ENCODED_RUSTFLAGS", "-Crelocation-model=static"),
        "building the guest image",
    )?;
    run(
        cargo().args(["build", "--release", "--bins"]),
        "building the binaries",
    )
}

/// A release binary of the workspace.
pub fn release_bin(name: &str) -> PathBuf {
    workspace_root().join("target/release").join(name)
}
