//! `heatprobe`: record the page heat of a process or a KVM guest, or print its migration plan.

use std::{fs, io::Write as _, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

mod top;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use heatprobe::{
    HeatConfig, MigrationPlan, PAGE_SIZE, Probes, Profiler, Target,
    probes::error_chain,
    profiler::ProfilerConfig,
    report::{PlanReport, RecordReport, TargetSummary, render_plan, render_record},
};

#[derive(Parser)]
#[command(
    version,
    about = "Ranks the memory pages of a process or KVM guest by heat, from page faults counted in the kernel"
)]
struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Profile a target and print the heat of every page it touched.
    Record(RecordArgs),
    /// Profile a target and print its migration plan.
    Plan(PlanArgs),
    /// A live view of the hottest pages, refreshed every epoch.
    Top {
        #[command(flatten)]
        target: TargetArgs,
        /// Length of one epoch.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// Load the probes and say which tracepoints this kernel lets them attach to.
    Probes {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct TargetArgs {
    /// Profile this process's own page faults (pages are virtual page numbers).
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    /// Profile the KVM guest of this VMM process (pages are guest frame numbers). All its
    /// threads are tracked, so the process must run a single VM.
    #[arg(long, value_name = "PID")]
    vm: Option<u32>,
}

impl TargetArgs {
    fn target(&self) -> Target {
        match (self.pid, self.vm) {
            (Some(pid), _) => Target::Process { pid },
            // clap's group makes exactly one of them present.
            (None, vm) => Target::Vm {
                pid: vm.unwrap_or_default(),
                vcpu_threads: None,
            },
        }
    }
}

#[derive(Args)]
struct ProfileArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// How long to profile.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Length of one epoch.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Fraction of heat kept from one epoch to the next.
    #[arg(long, default_value_t = HeatConfig::default().decay)]
    decay: f64,
    /// Heat quantile at or above which a page is hot.
    #[arg(long, default_value_t = HeatConfig::default().hot_quantile)]
    hot_quantile: f64,
    /// Heat quantile at or above which a page is warm.
    #[arg(long, default_value_t = HeatConfig::default().warm_quantile)]
    warm_quantile: f64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the output to this file instead of standard output.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct RecordArgs {
    #[command(flatten)]
    profile: ProfileArgs,
    /// Rows in the table of hottest pages.
    #[arg(long, default_value_t = 20)]
    top: usize,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    profile: ProfileArgs,
    /// Guest memory size (with --vm), so untouched frames are planned too, e.g. 256M.
    #[arg(long, value_name = "SIZE", value_parser = heatprobe::units::parse_size)]
    mem: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    heatprobe::console::end_quietly_on_closed_pipe();
    heatprobe::console::init_logging(cli.verbose);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("heatprobe: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Record(args) => record(args),
        Command::Plan(args) => plan(args),
        Command::Probes { json } => probes(json),
        Command::Top { target, interval } => top(&target, interval),
    }
}

fn load_probes() -> Result<Arc<Probes>> {
    Probes::load()
        .map(Arc::new)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))
}

/// Profiles the target for the requested time. Returns the profiler, ready to report.
fn profile(args: &ProfileArgs) -> Result<Profiler> {
    let probes = load_probes()?;
    let target = args.target.target();
    let config = ProfilerConfig {
        interval: args.interval,
        heat: HeatConfig {
            decay: args.decay,
            hot_quantile: args.hot_quantile,
            warm_quantile: args.warm_quantile,
            write_window: None,
        },
        ..ProfilerConfig::default()
    };
    let mut profiler = Profiler::start(probes, target.clone(), config)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let what = match target {
        Target::Process { pid } => format!("process {pid}"),
        Target::Vm { pid, .. } => format!("the KVM guest of process {pid}"),
    };
    // Scripts wait for this line before they start the workload they want profiled.
    eprintln!(
        "heatprobe: profiling {what} for {}",
        humantime::format_duration(args.duration)
    );
    let exited = profiler
        .run_for(args.duration)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    if exited {
        eprintln!("heatprobe: the target exited; reporting what was seen");
    }
    Ok(profiler)
}

fn emit(args: &ProfileArgs, text: String) -> Result<()> {
    match &args.out {
        Some(path) => fs::write(path, text).with_context(|| format!("writing {}", path.display())),
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(text.as_bytes())?;
            Ok(())
        }
    }
}

fn record(args: RecordArgs) -> Result<()> {
    let profiler = profile(&args.profile)?;
    let pages = profiler.heat().pages();
    let report = RecordReport {
        target: TargetSummary::from(profiler.target()),
        page_size: PAGE_SIZE,
        interval_ms: args.profile.interval.as_millis() as u64,
        epochs: profiler.heat().epochs(),
        dropped: profiler.dropped()?,
        blind_spot: blind_spot(profiler.target(), pages.len() as u64),
        pages,
    };
    let text = if args.profile.json {
        serde_json::to_string(&report)? + "\n"
    } else {
        render_record(&report, args.top)
    };
    emit(&args.profile, text)
}

/// For a process target: why its profile saw so little of its memory, if it did
/// (`report::thin_process_note`), from its resident pages now and what this kernel has.
fn blind_spot(target: &Target, touched: u64) -> Option<String> {
    let Target::Process { pid } = target else {
        return None;
    };
    // statm's second field: resident pages.
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident = statm.split_whitespace().nth(1)?.parse().ok()?;
    heatprobe::report::thin_process_note(
        touched,
        resident,
        std::path::Path::new("/sys/kernel/mm/page_idle/bitmap").exists(),
        std::path::Path::new("/sys/kernel/mm/damon/admin").exists(),
    )
}

fn plan(args: PlanArgs) -> Result<()> {
    if args.mem.is_some() && args.profile.target.vm.is_none() {
        bail!("--mem only applies to --vm targets");
    }
    if let Some(mem) = args.mem
        && (mem == 0 || !mem.is_multiple_of(PAGE_SIZE))
    {
        bail!("--mem must be a non-zero multiple of {PAGE_SIZE} bytes");
    }
    let profiler = profile(&args.profile)?;
    let pages = profiler.heat().pages();
    let plan = MigrationPlan::build(&pages, args.mem.map(|m| 0..m / PAGE_SIZE))?;
    let report = PlanReport {
        target: TargetSummary::from(profiler.target()),
        page_size: PAGE_SIZE,
        interval_ms: args.profile.interval.as_millis() as u64,
        epochs: profiler.heat().epochs(),
        dropped: profiler.dropped()?,
        pages_total: plan.len(),
        plan,
    };
    let text = if args.profile.json {
        serde_json::to_string(&report)? + "\n"
    } else {
        render_plan(&report)
    };
    emit(&args.profile, text)
}

fn top(target: &TargetArgs, interval: Duration) -> Result<()> {
    let probes = load_probes()?;
    let target = target.target();
    let title = match &target {
        Target::Process { pid } => format!("process {pid}"),
        Target::Vm { pid, .. } => format!("KVM guest of {pid}"),
    };
    let profiler = Profiler::start(
        probes,
        target,
        ProfilerConfig {
            interval,
            ..ProfilerConfig::default()
        },
    )
    .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    top::run(profiler, title)
}

fn probes(json: bool) -> Result<()> {
    let probes = load_probes()?;
    if json {
        println!("{}", serde_json::to_string(probes.status())?);
        return Ok(());
    }
    for status in probes.status() {
        match &status.skipped_because {
            None => println!("attached  {}", status.event),
            Some(why) => println!("skipped   {}: {why}", status.event),
        }
    }
    Ok(())
}
