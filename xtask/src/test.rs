//! `cargo xtask test`: formatting, lints, then every test in release mode (the same profile
//! `cargo xtask build` used, so nothing is compiled twice).

use anyhow::Result;

use crate::process::{cargo, run};

pub fn test(long: bool) -> Result<()> {
    run(
        cargo().args(["fmt", "--all", "--", "--check"]),
        "cargo fmt --check",
    )?;
    run(
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--release",
            "--",
            "-D",
            "warnings",
        ]),
        "cargo clippy",
    )?;
    let mut test = cargo();
    test.args(["test", "--workspace", "--release"]);
    if long {
        test.env("HEATPROBE_LONG_TESTS", "1");
    }
    run(&mut test, "cargo test")
}
