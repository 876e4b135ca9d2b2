//! `cargo xtask`: setup, build, run, test, fuzz and bench for the workspace.
//!
//! Every command that needs the toolchain runs `setup` first, so a fresh machine needs only
//! `cargo xtask run` or `cargo xtask test`.

mod audit;
mod bench;
mod build;
mod fuzz;
mod libllvm;
mod process;
mod run;
mod setup;
mod test;
mod toolchain;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Setup, build, run, test and bench the heatprobe workspace")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build needs (idempotent): the pinned nightly with rust-src,
    /// bpf-linker, cargo-fuzz, cargo-deny, libclang, tmux.
    Setup,
    /// Build the eBPF object and every binary, in release mode, into target/release/.
    Build,
    /// The demo: two daemons, a partition and the dashboard. Arguments after `--` go to
    /// `migrator dash` instead.
    Run {
        /// Skip setup and build (for tests that already built everything).
        #[arg(long, hide = true)]
        skip_build: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Audit the locked dependencies offline (advisories, duplicate versions, licenses)
    /// against deny.toml and a local copy of the RustSec database.
    Audit,
    /// Run every test (lints and the audit included).
    Test {
        /// Also run the long variants.
        #[arg(long)]
        long: bool,
    },
    /// Build the fuzz targets and run each for a bounded time; a crashing input is kept in
    /// fuzz/regressions/TARGET/.
    Fuzz {
        /// How long to run each target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// One target (frames, state, elf, boot_args, api_codec, destination_session); every
        /// target if absent.
        target: Option<String>,
    },
    /// Run a benchmark and print its figures as Markdown.
    Bench {
        #[arg(value_enum)]
        suite: bench::Suite,
        /// Passed to the benchmark, flags included (`migration` takes
        /// `[RUNS] [--only SUBSTRING]... [--mode precopy|hybrid] [--list]`, `loopback [RUNS]`, `link [RUNS]`,
        /// `tls [RUNS]` or `charts`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::setup(),
        Command::Build => setup::setup().and_then(|()| build::build()),
        Command::Run {
            skip_build: true,
            args,
        } => run::run(&args),
        Command::Run { args, .. } => setup::setup()
            .and_then(|()| build::build())
            .and_then(|()| run::run(&args)),
        Command::Audit => setup::setup().and_then(|()| audit::audit()),
        Command::Test { long } => setup::setup()
            .and_then(|()| build::build())
            .and_then(|()| test::test(long)),
        Command::Fuzz { seconds, target } => {
            setup::setup().and_then(|()| fuzz::fuzz(seconds, target.as_deref()))
        }
        Command::Bench { suite, args } => setup::setup()
            .and_then(|()| build::build())
            .and_then(|()| bench::bench(suite, &args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
