//! The one nightly toolchain the eBPF object, the guest image and the fuzz targets are built
//! with. Everything else builds with the default (stable) toolchain.
//!
//! A machine's undated `nightly` drifts: a newer one can move LLVM a major version and change
//! the layout of its `lib/` folder, which bpf-linker must be built against. So the nightly is
//! pinned here, and only here. To bump it: change [`NIGHTLY`], run `cargo xtask setup` (which
//! installs it and rebuilds bpf-linker against its LLVM when that changed), then
//! `cargo xtask test`; see "Toolchain" in docs/architecture.md.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::process::output;

/// The pinned nightly (rustc 1.101.0-nightly, LLVM 23).
pub const NIGHTLY: &str = "nightly-2026-10-29";

/// `+nightly-…`, the rustup proxy argument that selects [`NIGHTLY`].
pub fn plus() -> String {
    format!("+{NIGHTLY}")
}

/// The pinned toolchain's sysroot and LLVM major version.
pub fn llvm() -> Result<(PathBuf, String)> {
    let sysroot = output(
        Command::new("rustc").args([&plus(), "--print", "sysroot"]),
        "rustc --print sysroot (pinned nightly)",
    )?;
    let version = output(
        Command::new("rustc").args([&plus(), "-vV"]),
        "rustc -vV (pinned nightly)",
    )?;
    let major = llvm_major(&version)
        .with_context(|| format!("rustc {} -vV reports no LLVM version", plus()))?;
    Ok((PathBuf::from(sysroot.trim()), major))
}

/// The LLVM major version in `rustc -vV` output.
fn llvm_major(version: &str) -> Option<String> {
    version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .filter(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_llvm_major() {
        let out = "rustc 1.101.0-nightly (92ffebece 2026-10-28)\nbinary: rustc\n\
                   release: 1.101.0-nightly\nLLVM version: 23.1.4\n";
        assert_eq!(llvm_major(out).as_deref(), Some("23"));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
        assert_eq!(llvm_major("LLVM version: x.1\n"), None);
    }

    #[test]
    fn the_pin_is_dated() {
        let date = NIGHTLY.strip_prefix("nightly-").expect("a nightly");
        let parts: Vec<&str> = date.split('-').collect();
        assert_eq!(parts.len(), 3, "{NIGHTLY} is not nightly-YYYY-MM-DD");
        assert!(parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())));
    }
}
