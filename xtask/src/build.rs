//! `cargo xtask build`: the eBPF object and the guest image (each for its own target, with
//! nightly), then every binary, in release mode.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::process::{cargo, cargo_nightly, output, run, workspace_root};

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
    let target_spec = write_guest_target_spec()?;
    run(
        cargo_nightly()
            .args([
                "build",
                "--package",
                "migrator-guest",
                "--bin",
                "migrator-guest",
            ])
            .arg("--target")
            .arg(&target_spec)
            .args([
                "-Z",
                "build-std=core",
                "-Z",
                "build-std-features=compiler-builtins-mem",
                "-Z",
                "json-target-spec",
                "--release",
            ])
            .env("CARGO_TARGET_DIR", workspace_root().join(GUEST_TARGET_DIR)),
        "building the guest image",
    )?;
    run(
        cargo().args(["build", "--release", "--bins"]),
        "building the binaries",
    )
}

/// Name of the guest's target (the file stem of its spec).
pub const GUEST_TARGET: &str = "x86_64-heat-guest";

/// Writes the guest's target spec: `x86_64-unknown-none` as this nightly describes it, with
/// SSE on (x86_64-unknown-none is soft-float, and the workloads compute Zipf keys with floats:
/// soft-float would make a guest much slower than the same code on the host), and a static,
/// non-PIE executable at a fixed address as guest ABI v1 wants. Derived from rustc's own
/// spec so it follows the nightly's schema.
fn write_guest_target_spec() -> Result<PathBuf> {
    let json = output(
        std::process::Command::new("rustc").args([
            &crate::toolchain::plus(),
            "--print",
            "target-spec-json",
            "-Z",
            "unstable-options",
            "--target",
            "x86_64-unknown-none",
        ]),
        "rustc --print target-spec-json (pinned nightly)",
    )?;
    let mut spec: serde_json::Value =
        serde_json::from_str(&json).context("parsing rustc's target spec")?;
    let object = spec
        .as_object_mut()
        .context("rustc's target spec is not a JSON object")?;
    object.insert("features".into(), "+sse,+sse2".into());
    object.remove("rustc-abi");
    object.remove("metadata");
    object.insert("code-model".into(), "small".into());
    object.insert("relocation-model".into(), "static".into());
    object.insert("position-independent-executables".into(), false.into());
    object.insert(
        "static-position-independent-executables".into(),
        false.into(),
    );
    let dir = workspace_root().join(GUEST_TARGET_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{GUEST_TARGET}.json"));
    let text = serde_json::to_string_pretty(&spec)?;
    // Rewriting an unchanged spec would make cargo rebuild core every time.
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(path)
}

/// A release binary of the workspace.
pub fn release_bin(name: &str) -> PathBuf {
    workspace_root().join("target/release").join(name)
}
