//! `cargo xtask setup`: everything the build needs, installed only when missing.
//!
//! - a nightly toolchain with `rust-src`, to build the eBPF object with `-Z build-std=core`;
//! - `bpf-linker`, built against the nightly toolchain's own libLLVM (Debian has no LLVM of
//!   the version bpf-linker's default feature wants);
//! - libclang, for crates that run bindgen; tmux, for the dashboard's end-to-end test;
//! - `cargo-fuzz`, for the fuzz targets (`cargo xtask fuzz`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::process::{output, run, succeeds};

/// Debian packages the build and the tests need.
const APT_PACKAGES: &[&str] = &["libclang-dev", "tmux"];

pub fn setup() -> Result<()> {
    ensure_apt_packages()?;
    ensure_nightly()?;
    ensure_bpf_linker()?;
    ensure_cargo_fuzz()?;
    Ok(())
}

/// cargo-fuzz, which builds and runs the fuzz targets in fuzz/ with libFuzzer.
fn ensure_cargo_fuzz() -> Result<()> {
    if succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (for the fuzz targets)");
    run(
        Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
        "cargo install cargo-fuzz",
    )
}

fn ensure_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !succeeds(Command::new("dpkg").args(["-s", p])))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update (needs root; or install the packages yourself)",
    )?;
    run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("apt-get install {}", missing.join(" ")),
    )
}

fn ensure_nightly() -> Result<()> {
    let has_rust_src = output(
        Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]),
        "rustup component list",
    )
    .map(|installed| installed.lines().any(|l| l.starts_with("rust-src")))
    .unwrap_or(false);
    if has_rust_src {
        return Ok(());
    }
    eprintln!("xtask: installing the nightly toolchain with rust-src (for the eBPF build)");
    run(
        Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]),
        "rustup toolchain install nightly (is rustup installed?)",
    )
}

/// The nightly toolchain's sysroot and LLVM major version.
fn nightly_llvm() -> Result<(PathBuf, String)> {
    let sysroot = output(
        Command::new("rustc").args(["+nightly", "--print", "sysroot"]),
        "rustc +nightly --print sysroot",
    )?;
    let version = output(
        Command::new("rustc").args(["+nightly", "-vV"]),
        "rustc +nightly -vV",
    )?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV reports no LLVM version")?
        .to_string();
    Ok((PathBuf::from(sysroot.trim()), major))
}

/// The toolchain's libLLVM shared library, found by glob so no version is hard-coded.
fn find_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let entries = fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM") && n.contains(".so"))
        })
        .with_context(|| format!("no libLLVM*.so* in {}", lib.display()))
}

fn ensure_bpf_linker() -> Result<()> {
    let (sysroot, major) = nightly_llvm()?;
    // bpf-linker loads libLLVM at run time; rustc +nightly runs it with the toolchain's lib
    // directory on the library path, so check it the same way.
    let works = succeeds(
        Command::new("bpf-linker")
            .arg("--version")
            .env("LD_LIBRARY_PATH", sysroot.join("lib")),
    );
    if works {
        return Ok(());
    }
    let libllvm = find_libllvm(&sysroot)?;
    let prefix = crate::process::workspace_root().join("target/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {} to {}", link.display(), libllvm.display()))?;
    eprintln!("xtask: building bpf-linker against the nightly toolchain's LLVM {major}");
    run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
        "cargo install bpf-linker",
    )?;
    if !succeeds(
        Command::new("bpf-linker")
            .arg("--version")
            .env("LD_LIBRARY_PATH", sysroot.join("lib")),
    ) {
        bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}
