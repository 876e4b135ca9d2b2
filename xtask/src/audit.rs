//! The supply-chain audit `cargo xtask test` runs: cargo-deny's advisories, bans and licenses
//! checks against `deny.toml`, offline.
//!
//! The advisory database is a local copy of RustSec's (by default `../shared/advisory-db`
//! beside the workspace, or the folder `HEATPROBE_ADVISORY_DB` names). cargo-deny reads a
//! database only from a git checkout in its own folder layout, so the copy is committed into
//! a fresh repository under `target/advisory-dbs/` first; nothing is fetched.
//!
//! An advisory against a locked crate fails the audit unless `deny.toml` ignores it with a
//! reason; duplicate crate versions are warnings.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::process::{cargo, run, workspace_root};

/// Where cargo-deny looks for databases (`db-path` in deny.toml, relative to the workspace).
const DB_ROOT: &str = "target/advisory-dbs";

/// The folder cargo-deny derives for `db-urls` (RustSec's URL): its last path segment and an
/// xxh64 of the URL, as cargo-deny's `url_to_db_path` names it.
const DB_DIR: &str = "advisory-db-3157b0e258782691";

/// The environment variable naming another advisory database copy.
const DB_VAR: &str = "HEATPROBE_ADVISORY_DB";

pub fn audit() -> Result<()> {
    let source = database_copy()?;
    let snapshot = fs::read_to_string(source.join("SNAPSHOT")).unwrap_or_default();
    eprintln!(
        "xtask: auditing dependencies against {}{}",
        source.display(),
        snapshot
            .lines()
            .next()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default()
    );
    let checkout = workspace_root().join(DB_ROOT).join(DB_DIR);
    checkout_database(&source, &checkout)?;
    for manifest in ["Cargo.toml", "fuzz/Cargo.toml"] {
        // cargo-deny reads `cargo metadata`, which needs every locked crate's manifest; with
        // them in cargo's cache it runs offline, which also keeps it from fetching the
        // database.
        run(
            cargo().args(["fetch", "--quiet", "--locked", "--manifest-path", manifest]),
            &format!("cargo fetch ({manifest})"),
        )?;
        run(
            cargo()
                .args(["deny", "--manifest-path", manifest, "--offline", "--locked"])
                .arg("--config")
                .arg(workspace_root().join("deny.toml"))
                .args(["check", "advisories", "bans", "licenses"]),
            &format!("cargo deny check ({manifest})"),
        )?;
    }
    Ok(())
}

/// The advisory database copy to audit against.
fn database_copy() -> Result<PathBuf> {
    let path = match std::env::var_os(DB_VAR) {
        Some(path) => PathBuf::from(path),
        None => workspace_root().join("../shared/advisory-db"),
    };
    if !path.join("crates").is_dir() {
        bail!(
            "no RustSec advisory database at {} (a folder with crates/ inside); put a copy \
             there or name one with {DB_VAR}",
            path.display()
        );
    }
    Ok(path)
}

/// A git repository at `checkout` holding exactly the files of `source`, made anew.
fn checkout_database(source: &Path, checkout: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(checkout);
    fs::create_dir_all(checkout).with_context(|| format!("creating {}", checkout.display()))?;
    copy_tree(source, checkout)?;
    let git = |args: &[&str]| {
        let mut command = Command::new("git");
        command
            .arg("-C")
            .arg(checkout)
            .args(["-c", "user.name=xtask", "-c", "user.email=xtask@localhost"])
            .args([
                "-c",
                "commit.gpgsign=false",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .stdout(std::process::Stdio::null());
        command
    };
    run(&mut git(&["init", "-q"]), "git init (advisory database)")?;
    run(&mut git(&["add", "-A"]), "git add (advisory database)")?;
    run(
        &mut git(&["commit", "-q", "-m", "advisory database snapshot"]),
        "git commit (advisory database)",
    )
}

/// Copies the files and folders below `from` into `to` (symbolic links are skipped: a
/// database is plain files).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry.with_context(|| format!("reading {}", from.display()))?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            if entry.file_name() == ".git" {
                continue;
            }
            fs::create_dir_all(&target)?;
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            fs::copy(entry.path(), &target).with_context(|| {
                format!("copying {} to {}", entry.path().display(), target.display())
            })?;
        }
    }
    Ok(())
}
