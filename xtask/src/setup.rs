//! `cargo xtask setup`: everything the build needs, installed only when missing.
//!
//! - the pinned nightly ([`toolchain::NIGHTLY`]) with `rust-src`, to build the eBPF object
//!   and the guest image with `-Z build-std=core`;
//! - `bpf-linker`, built against that nightly's own libLLVM (Debian has no LLVM of the
//!   version it needs), and rebuilt when it was built against another;
//! - libclang, for crates that run bindgen; tmux, for the dashboard's end-to-end test;
//! - `cargo-fuzz`, for the fuzz targets (`cargo xtask fuzz`);
//! - `cargo-deny`, for the offline supply-chain audit (`cargo xtask test`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    libllvm,
    process::{output, run, succeeds},
    toolchain,
};

/// Debian packages the build and the tests need: libclang for bindgen, tmux for the
/// dashboard's tests, iproute2 (`ip`, `tc`) for the namespace hosts, prometheus
/// (`prometheus`, `promtool`) for the metrics tests, which run their own server.
const APT_PACKAGES: &[&str] = &["libclang-dev", "tmux", "iproute2", "prometheus"];

pub fn setup() -> Result<()> {
    ensure_apt_packages()?;
    ensure_nightly()?;
    ensure_bpf_linker()?;
    ensure_cargo_fuzz()?;
    ensure_cargo_deny()?;
    Ok(())
}

/// The cargo-deny release the audit runs; `deny.toml` is written to its schema.
const CARGO_DENY_VERSION: &str = "0.20.2";

/// cargo-deny, which audits the locked dependencies (`cargo xtask test`, see `audit.rs`).
fn ensure_cargo_deny() -> Result<()> {
    let installed = output(
        Command::new("cargo").args(["deny", "--version"]),
        "cargo deny --version",
    )
    .unwrap_or_default();
    if installed.split_whitespace().nth(1) == Some(CARGO_DENY_VERSION) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deny {CARGO_DENY_VERSION} (for the supply-chain audit)");
    run(
        Command::new("cargo")
            .args([
                "install",
                "cargo-deny",
                "--version",
                CARGO_DENY_VERSION,
                "--locked",
                "--force",
            ])
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
        "cargo install cargo-deny",
    )
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
        Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain::NIGHTLY,
        ]),
        "rustup component list",
    )
    .map(|installed| installed.lines().any(|l| l.starts_with("rust-src")))
    .unwrap_or(false);
    if has_rust_src {
        return Ok(());
    }
    eprintln!(
        "xtask: installing {} with rust-src (for the eBPF, guest and fuzz builds)",
        toolchain::NIGHTLY
    );
    run(
        Command::new("rustup").args([
            "toolchain",
            "install",
            toolchain::NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]),
        &format!(
            "rustup toolchain install {} (is rustup installed?)",
            toolchain::NIGHTLY
        ),
    )
}

/// The bpf-linker release setup builds; bump it together with [`toolchain::NIGHTLY`] when a
/// new LLVM needs a newer one.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn ensure_bpf_linker() -> Result<()> {
    let (sysroot, major) = toolchain::llvm()?;
    let lib = sysroot.join("lib");
    let libllvm = libllvm::find_libllvm(&lib)?;
    let wanted = libllvm::soname(&libllvm)?;
    match installed_bpf_linker_llvm(&lib, &wanted) {
        Ok(()) => return Ok(()),
        Err(why) => eprintln!("xtask: {why:#}; building bpf-linker {BPF_LINKER_VERSION}"),
    }
    // bpf-linker's build looks for `lib/libLLVM.so` under LLVM_PREFIX: a prefix of links to
    // the real object (by that name, its own and its soname, which the binary's rpath then
    // finds too).
    let prefix = crate::process::workspace_root().join("target/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    let _ = fs::remove_dir_all(&prefix);
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let file_name = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .context("libLLVM has no file name")?
        .to_string();
    let mut names = vec!["libLLVM.so".to_string(), file_name, wanted.clone()];
    names.dedup();
    for name in names {
        let link = prefix_lib.join(&name);
        if link.exists() {
            continue;
        }
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {} to {}", link.display(), libllvm.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker against {}'s LLVM {major} ({})",
        toolchain::NIGHTLY,
        libllvm.display()
    );
    run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
        "cargo install bpf-linker",
    )?;
    installed_bpf_linker_llvm(&lib, &wanted)
        .context("bpf-linker was just built but is not usable (is ~/.cargo/bin on PATH?)")
}

/// Whether the bpf-linker on PATH loads `wanted` (the pinned toolchain's libLLVM, by soname)
/// and runs. One built against another toolchain's LLVM may still run, but links eBPF
/// bitcode of another LLVM version; it is stale.
fn installed_bpf_linker_llvm(lib: &Path, wanted: &str) -> Result<()> {
    let binary = find_on_path("bpf-linker").context("no bpf-linker on PATH")?;
    let needed = libllvm::needed_libraries(&binary)?;
    let Some(linked) = needed.iter().find(|n| n.starts_with("libLLVM")) else {
        bail!(
            "{} loads no libLLVM (statically linked?), so its LLVM cannot be checked",
            binary.display()
        );
    };
    if linked != wanted {
        bail!(
            "{} was built against {linked}, not {wanted} of {}",
            binary.display(),
            toolchain::NIGHTLY
        );
    }
    // rustc runs the linker with the toolchain's lib directory on the library path.
    if !succeeds(
        Command::new(&binary)
            .arg("--version")
            .env("LD_LIBRARY_PATH", lib),
    ) {
        bail!("{} does not run", binary.display());
    }
    Ok(())
}

/// The first executable file named `name` on PATH.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
