//! The command line: what each command takes, as clap reads it.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use heatprobe::units::parse_size;
use migrator::{
    host::admission::Limits,
    host::heat_sampling::HeatSampling,
    host::heat_sampling::SamplingError,
    host::heat_sampling::parse_budget,
    host::heat_sampling::parse_fraction,
    host::heat_sampling::parse_recheck_fraction,
    migration::{
        Mode, Strategy,
        compress::Compress,
        convergence::{Converge, TimeoutStrategy},
        source::MigrationOptions,
    },
};

pub(crate) const DEFAULT_ADDR: &str = "127.0.0.1:7700";

#[derive(Parser)]
#[command(
    version,
    about = "KVM partitions and their heat-ordered live migration"
)]
pub(crate) struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
    /// Mutual TLS: a directory with ca.pem, cert.pem and key.pem (see `migrator certs`).
    /// Required for a daemon off loopback, and for talking to one.
    #[arg(long, global = true, env = "MIGRATOR_TLS", value_name = "DIR")]
    pub(crate) tls: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Args)]
pub(crate) struct Host {
    /// The daemon's address.
    #[arg(long, default_value = DEFAULT_ADDR)]
    pub(crate) host: SocketAddr,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct Target {
    #[command(flatten)]
    pub(crate) host: Host,
    /// The partition's id.
    pub(crate) id: String,
}

/// What a daemon's partitions do when it is asked to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum OnExit {
    Keep,
    Stop,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the daemon, hosting partitions and serving the API.
    Serve {
        #[arg(long, default_value = DEFAULT_ADDR)]
        listen: SocketAddr,
        /// Most partitions hosted at once (incoming migrations count).
        #[arg(long, default_value_t = Limits::default().max_partitions)]
        max_partitions: usize,
        /// Most guest memory hosted at once, e.g. 16G (default: no limit beyond the host's).
        #[arg(long, value_parser = parse_size)]
        max_memory: Option<u64>,
        /// Most outgoing migrations at once.
        #[arg(long, default_value_t = Limits::default().max_migrations)]
        max_migrations: usize,
        /// Give up on a migration peer silent this long (dead daemon, cut link): the data
        /// connection fails, calls to the peer time out, and the migration rolls back.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        peer_timeout: Duration,
        #[command(flatten)]
        heat: HeatSamplingArgs,
        /// Where the partition processes' sockets, records and logs are kept (default:
        /// /run/migrator/IP-PORT as root, else $XDG_RUNTIME_DIR/migrator/IP-PORT). A daemon
        /// started on a directory adopts the partitions its predecessor left running there.
        #[arg(long, value_name = "DIR")]
        runtime_dir: Option<PathBuf>,
        /// What SIGTERM or ^C does to the partitions: `keep` leaves them running for the next
        /// daemon to adopt; `stop` stops them all first.
        #[arg(long, value_enum, default_value_t = OnExit::Keep)]
        on_exit: OnExit,
        /// Serve Prometheus metrics at http://ADDR/metrics (off by default). Off loopback
        /// it needs --tls, as the API does: https, and only scrapers with a client
        /// certificate from the CA get in.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
    },
    /// One partition's process, started by `migrator serve` (not for use by hand).
    #[command(hide = true)]
    Vmm {
        #[arg(long)]
        runtime_dir: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        session: Option<u64>,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, value_parser = humantime::parse_duration)]
        peer_timeout: Duration,
        #[command(flatten)]
        heat: HeatSamplingArgs,
    },
    /// Create and start a partition.
    Launch {
        #[command(flatten)]
        host: Host,
        /// A built-in workload: kv-zipf, scan, rw-mix, uniform-write, fill, hotspot, graded, idle.
        #[arg(long, conflicts_with = "image", required_unless_present = "image")]
        workload: Option<String>,
        /// A guest ELF image written to guest ABI v1.
        #[arg(long, value_name = "FILE")]
        image: Option<PathBuf>,
        /// Arguments for the guest, e.g. "keys=65536 theta=0.99 rate=500000".
        #[arg(long, default_value = "", allow_hyphen_values = true)]
        args: String,
        /// Guest memory, e.g. 256M or 1G.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        mem: u64,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long)]
        name: Option<String>,
    },
    /// List the daemon's partitions.
    List {
        #[command(flatten)]
        host: Host,
    },
    /// Show one partition.
    Status(Target),
    /// Stop a partition's vCPUs, keeping it in memory.
    Pause(Target),
    /// Let a paused partition run again.
    Resume(Target),
    /// Settle a partition awaiting the handover of a migration whose outcome its daemon could
    /// not learn: asks the destination, and ends with one copy running, there or here.
    Reconcile {
        #[command(flatten)]
        target: Target,
        /// Resume it here without asking: you vouch that nothing of it runs on the
        /// destination (a host gone for good).
        #[arg(long)]
        resume_here: bool,
    },
    /// Stop a partition for good and free its memory.
    Stop(Target),
    /// Per-page heat of a partition over a window, from the daemon's shared profiler (active
    /// sampling); --json prints it as `heatprobe record --json` does.
    Heat {
        #[command(flatten)]
        target: Target,
        /// How long to profile: one epoch of the daemon's (200ms unless `serve --heat-epoch`
        /// says otherwise) to 60s, rounded to whole epochs.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// The warm heat instead of a new window: what a migration would plan from now
        /// (`serve --heat-profile warm`), with what its window's sampling cost.
        #[arg(long, conflicts_with = "duration")]
        warm: bool,
    },
    /// The order round 0 of a migration would send the partition's pages in now (a dry run:
    /// nothing is sent): the segments, their sizes and their first pages.
    Plan {
        #[command(flatten)]
        target: Target,
        #[arg(long, value_enum, default_value = "heat")]
        strategy: Strategy,
        /// How long to profile for the heat strategy (one epoch to 60s), as a migration's
        /// --profile-window.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Plan from the warm heat instead of a new window, as a migration would now
        /// (`serve --heat-profile warm`): heat's order, or address order and why.
        #[arg(long, conflicts_with_all = ["duration", "strategy"])]
        warm: bool,
    },
    /// The live dashboard of a partition: heat, migration, guest.
    Dash {
        /// The daemon the partition is on.
        #[arg(long, default_value = DEFAULT_ADDR)]
        host: SocketAddr,
        /// The partition (default: the first running one).
        id: Option<String>,
        /// The daemon `m` migrates to (and back from).
        #[arg(long)]
        peer: Option<SocketAddr>,
        /// Print one snapshot and exit.
        #[arg(long)]
        once: bool,
        /// With --once: the snapshot as JSON instead of a text rendering.
        #[arg(long, requires = "once")]
        json: bool,
    },
    /// Make a CA and credentials directories for mutual TLS: OUT/HOST for each --host (a
    /// daemon's address or name) and OUT/client for the command line.
    Certs {
        /// Where to write; must not already hold a CA.
        #[arg(long)]
        out: PathBuf,
        /// A host the daemons are dialled at (IP address or DNS name); repeat for each.
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
    },
    /// Live-migrate a partition from one daemon to another.
    Migrate {
        /// The source daemon.
        #[arg(long, default_value = DEFAULT_ADDR)]
        from: SocketAddr,
        /// The destination daemon.
        #[arg(long, required_unless_present = "resume")]
        to: Option<SocketAddr>,
        /// Resume the post-copy of a `postcopy-paused` partition (whose recover window ran
        /// out) instead of starting a migration: its missing pages go to the destination it
        /// records, over new connections.
        #[arg(long, conflicts_with = "to")]
        resume: bool,
        /// The partition's id on the source.
        id: String,
        #[command(flatten)]
        options: MigrateArgs,
        /// Print one JSON object when done instead of a progress bar and summary.
        #[arg(long)]
        json: bool,
        /// Return at once with the migration's id (`migrator wait ID` prints its report;
        /// `migrator migrations` lists it; `migrator cancel ID` cancels it).
        #[arg(long, conflicts_with = "resume")]
        detach: bool,
        /// Order by the heat in FILE instead of profiling: what `migrator heat --json`
        /// prints (`pages`: `page`, the guest frame, with its `heat`; pages not listed are
        /// cold). Implies `--strategy heat`.
        #[arg(long, value_name = "FILE", conflicts_with = "resume")]
        heat_file: Option<PathBuf>,
    },
    /// List the migrations each daemon runs or recently ran (both sides).
    Migrations {
        /// A daemon's address; give it again for more daemons.
        #[arg(long = "host", default_value = DEFAULT_ADDR)]
        hosts: Vec<SocketAddr>,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a migration before its handover: the guest runs on at the source, and the
    /// destination frees everything. Refused after the handover, saying why.
    Cancel(MigrationTarget),
    /// Wait for a migration to end and print its report (as `migrate` does).
    Wait(MigrationTarget),
    /// Change a running migration's downtime limit or bandwidth.
    Limits {
        #[command(flatten)]
        target: MigrationTarget,
        #[arg(long, value_parser = humantime::parse_duration)]
        downtime_limit: Option<Duration>,
        /// Bytes per second, as `migrate --bandwidth-limit`; `unlimited` lifts it.
        #[arg(long, value_parser = parse_bandwidth_or_unlimited)]
        bandwidth_limit: Option<u64>,
    },
    /// Switch a hybrid migration to post-copy at its next check.
    Postcopy(MigrationTarget),
    /// Move every live partition off a daemon onto others, a few at a time; those that
    /// cannot move stay where they are and are named.
    Drain(super::drain::DrainArgs),
}

#[derive(Args)]
pub(crate) struct MigrationTarget {
    #[command(flatten)]
    pub(crate) host: Host,
    /// The migration's id (`PARTITION.mN`, from `migrate --detach` or `migrations`), or a
    /// partition's id for its latest migration.
    pub(crate) migration: String,
}

/// As [`parse_bandwidth`], or 0 for `unlimited`.
pub(crate) fn parse_bandwidth_or_unlimited(text: &str) -> Result<u64> {
    match text.trim() {
        "unlimited" => Ok(0),
        _ => parse_bandwidth(text),
    }
}

/// Bytes per second from `1gbit`, `100mbit`, `64kbit` (bits) or `50M`, `1G` (bytes).
pub(crate) fn parse_bandwidth(text: &str) -> Result<u64> {
    let lower = text.trim().to_ascii_lowercase();
    for (suffix, bits) in [
        ("gbit", 1_000_000_000u64),
        ("mbit", 1_000_000),
        ("kbit", 1_000),
        ("bit", 1),
    ] {
        if let Some(number) = lower.strip_suffix(suffix) {
            let number: f64 = number
                .trim()
                .parse()
                .with_context(|| format!("`{text}` is not a bandwidth such as 1gbit"))?;
            if !(number > 0.0 && number.is_finite()) {
                bail!("`{text}` is not a positive bandwidth");
            }
            return Ok((number * bits as f64 / 8.0) as u64);
        }
    }
    match parse_size(text)? {
        0 => bail!("the bandwidth limit must be positive"),
        bytes => Ok(bytes),
    }
}

/// How the heat profilers sample (`serve`'s options, passed on to each partition's `vmm`).
#[derive(Args, Clone, Debug)]
pub(crate) struct HeatSamplingArgs {
    /// The heat profilers' epoch (10ms to 1s): how often the counts are read and a slice of
    /// frames re-armed, while someone watches; also the least `heat`/`plan` window.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub heat_epoch: Duration,
    /// The fraction of guest frames re-armed each heat epoch, as 0.125 or 1/8: every frame
    /// is re-armed once per epoch / fraction.
    #[arg(long, default_value = "1/8", value_parser = parse_fraction)]
    pub heat_sample_fraction: f64,
    /// At most this fraction of the guest frames, among those found touched in a heat
    /// epoch, re-armed again for the next, hottest first (0 to 1, as 1/32): a frame in
    /// constant use is then told from one touched once by chance, at the cost of a fault
    /// and a re-arm each. Off by default: see docs/BENCHMARKS.md for what it costs.
    #[arg(long, default_value = "0", value_parser = parse_recheck_fraction)]
    pub heat_recheck_fraction: f64,
    /// Pool each `migrator heat` and `plan` window's heat over neighbouring frames where a
    /// permutation test finds neighbours alike (as DAMON's regions pool a region's frames):
    /// a contiguous hot set is then found in seconds, but a scattered one next to regions
    /// that differ as wholes is lost. Windows that continue from heat a migration carried
    /// are left as they are. Off by default: see docs/BENCHMARKS.md.
    #[arg(long)]
    pub heat_pool: bool,
    /// The most the heat profilers' re-arming may cost a guest, as a share of its time: 1%,
    /// 0.01 or 1/100; `off` for no cap beyond the sample fraction. Faults are counted as
    /// they come and priced at what one costs a guest here; each epoch re-arms what the
    /// budget still pays for.
    #[arg(long, default_value = "1%", value_parser = budget_arg)]
    pub heat_budget: BudgetArg,
    /// `warm`: keep each running partition's heat in the background, within --heat-budget,
    /// so a migration plans from it without profiling first. `on-demand`: profile only
    /// while someone watches (`heat`, `plan`, the dashboard); a migration with the heat
    /// strategy then profiles for its --profile-window first.
    #[arg(long, value_enum, default_value_t = HeatProfile::OnDemand)]
    pub heat_profile: HeatProfile,
}

/// When the shared profilers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum HeatProfile {
    Warm,
    OnDemand,
}

impl HeatSamplingArgs {
    /// The sampling these options give, checked.
    pub(crate) fn sampling(&self) -> Result<HeatSampling, SamplingError> {
        HeatSampling::new(self.heat_epoch, self.heat_sample_fraction)?
            .with_recheck(self.heat_recheck_fraction)?
            .with_pool(self.heat_pool)
            .with_warm(self.heat_profile == HeatProfile::Warm)
            .with_budget(self.heat_budget.0)
    }
}

/// What a migration is asked to do: `migrate`'s options, as the engine takes them.
#[derive(Args, Clone, Debug)]
pub(crate) struct MigrateArgs {
    #[arg(long, value_enum, default_value = "heat")]
    pub strategy: Strategy,
    #[arg(long, value_enum, default_value = "precopy")]
    pub mode: Mode,
    /// Stop iterating once the predicted downtime fits this.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub downtime_limit: Duration,
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Pace the sender, e.g. 1gbit, 100mbit, 50M (bytes per second).
    #[arg(long, value_parser = parse_bandwidth)]
    pub bandwidth_limit: Option<u64>,
    /// How long to profile page heat before round 0 (heat strategy).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub profile_window: Duration,
    /// Send hot written pages in every round instead of holding them back until the last.
    #[arg(long)]
    pub no_defer: bool,
    /// What to do when rounds stop shrinking [default: throttle for precopy, postcopy for
    /// hybrid].
    #[arg(long, value_enum)]
    pub converge: Option<Converge>,
    /// Bound the time before cutover, e.g. 60s; what happens then is --timeout-strategy.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// On timeout (or, when throttling, at the round limit): cancel and keep the partition
    /// running here, or force the cutover whatever the downtime.
    #[arg(long, value_enum, default_value = "cancel")]
    pub timeout_strategy: TimeoutStrategy,
    /// How long after the resume to count the guest's faults on the destination (0s: do
    /// not count); the command returns once it is over.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub fault_window: Duration,
    /// Data connections to stripe the pages across (1 to 16), each with a sender and a
    /// receiver thread of its own.
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
    /// Compress the pages, frame by frame, where that saves an eighth of a frame:
    /// none, lz4, zstd or zstd:LEVEL (-7 to 22; zstd alone is level 1), or auto (lz4
    /// where compressing is measured to be faster than sending as it is).
    #[arg(long, default_value = "none")]
    pub compress: Compress,
    /// Hybrid: how long to try, with backoff, to recover a post-copy whose connection
    /// broke before keeping the partition `postcopy-paused` (0s: fail at once).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub recover_window: Duration,
    /// Heat strategy: the most the profile may cost the guest, as a share of its time over
    /// the profile: 1%, 0.01 or 1/100; `off` for no cap. Faults are counted as the profile
    /// runs and priced at what one costs a guest here; the profile re-arms what the rest of
    /// the budget pays for, and its heat is used only if it ranks enough pages, skewed
    /// enough (the report's `order_fallback` says why not).
    #[arg(long, default_value = "1%", value_parser = budget_arg)]
    pub heat_budget: BudgetArg,
}

impl From<MigrateArgs> for MigrationOptions {
    fn from(args: MigrateArgs) -> Self {
        Self {
            strategy: args.strategy,
            mode: args.mode,
            downtime_limit: args.downtime_limit,
            max_rounds: args.max_rounds,
            bandwidth_limit: args.bandwidth_limit,
            profile_window: args.profile_window,
            defer_hot_writes: !args.no_defer,
            converge: args.converge,
            timeout: args.timeout,
            timeout_strategy: args.timeout_strategy,
            fault_window: args.fault_window,
            connections: args.connections,
            compress: args.compress,
            recover_window: args.recover_window,
            heat_budget: args.heat_budget.0,
        }
    }
}

/// A `--heat-budget`: a share of the guest's time, or `off` (`None`). A type of its own, since
/// clap reads an `Option` field as a flag that may be absent.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BudgetArg(pub Option<f64>);

fn budget_arg(text: &str) -> Result<BudgetArg, SamplingError> {
    parse_budget(text).map(BudgetArg)
}
