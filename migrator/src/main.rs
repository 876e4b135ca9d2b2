//! `migrator`: the daemon and its command-line client.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use heatprobe::units::parse_size;
use migrator::{
    certs,
    daemon::{
        LaunchRequest, PartitionInfo,
        api::MigrateRequest,
        client::{Connection, context_with},
        heat_report,
        heat_sampling::{HeatSampling, SamplingError, parse_fraction, parse_recheck_fraction},
        server::{Limits, serve},
    },
    migration::{
        Mode, Strategy,
        compress::Compress,
        convergence::{Converge, TimeoutStrategy},
        source::MigrationOptions,
    },
    supervisor::{
        Supervisor,
        partition_process::{self, PartitionProcess},
        process::ProcessConfig,
    },
    tls::Security,
    vmm::GuestImage,
};
use tarpc::context;

mod cli;

const DEFAULT_ADDR: &str = "127.0.0.1:7700";

#[derive(Parser)]
#[command(
    version,
    about = "KVM partitions and their heat-ordered live migration"
)]
struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Mutual TLS: a directory with ca.pem, cert.pem and key.pem (see `migrator certs`).
    /// Required for a daemon off loopback, and for talking to one.
    #[arg(long, global = true, env = "MIGRATOR_TLS", value_name = "DIR")]
    tls: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Host {
    /// The daemon's address.
    #[arg(long, default_value = DEFAULT_ADDR)]
    host: SocketAddr,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct Target {
    #[command(flatten)]
    host: Host,
    /// The partition's id.
    id: String,
}

/// What a daemon's partitions do when it is asked to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnExit {
    Keep,
    Stop,
}

#[derive(Subcommand)]
enum Command {
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
        /// The heat profilers' epoch (10ms to 1s): how often the counts are read and a slice of
        /// frames re-armed, while someone watches; also the least `heat`/`plan` window.
        #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
        heat_epoch: Duration,
        /// The fraction of guest frames re-armed each heat epoch, as 0.125 or 1/8: every frame
        /// is re-armed once per epoch / fraction.
        #[arg(long, default_value = "1/8", value_parser = parse_fraction)]
        heat_sample_fraction: f64,
        /// At most this fraction of the guest frames, among those found touched in a heat
        /// epoch, re-armed again for the next, hottest first (0 to 1, as 1/32): a frame in
        /// constant use is then told from one touched once by chance, at the cost of a fault
        /// and a re-arm each. Off by default: see docs/BENCHMARKS.md for what it costs.
        #[arg(long, default_value = "0", value_parser = parse_recheck_fraction)]
        heat_recheck_fraction: f64,
        /// Pool each `migrator heat` and `plan` window's heat over neighbouring frames where a
        /// permutation test finds neighbours alike (as DAMON's regions pool a region's frames):
        /// a contiguous hot set is then found in seconds, but a scattered one next to regions
        /// that differ as wholes is lost. Windows that continue from heat a migration carried
        /// are left as they are. Off by default: see docs/BENCHMARKS.md.
        #[arg(long)]
        heat_pool: bool,
        /// Where the partition processes' sockets, records and logs are kept (default:
        /// /run/migrator/IP-PORT as root, else $XDG_RUNTIME_DIR/migrator/IP-PORT). A daemon
        /// started on a directory adopts the partitions its predecessor left running there.
        #[arg(long, value_name = "DIR")]
        runtime_dir: Option<PathBuf>,
        /// What SIGTERM or ^C does to the partitions: `keep` leaves them running for the next
        /// daemon to adopt; `stop` stops them all first.
        #[arg(long, value_enum, default_value_t = OnExit::Keep)]
        on_exit: OnExit,
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
        #[arg(long, value_parser = humantime::parse_duration)]
        heat_epoch: Duration,
        #[arg(long, value_parser = parse_fraction)]
        heat_sample_fraction: f64,
        #[arg(long, value_parser = parse_recheck_fraction)]
        heat_recheck_fraction: f64,
        #[arg(long)]
        heat_pool: bool,
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
        #[arg(long, value_enum, default_value = "heat")]
        strategy: Strategy,
        #[arg(long, value_enum, default_value = "precopy")]
        mode: Mode,
        /// Stop iterating once the predicted downtime fits this.
        #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
        downtime_limit: Duration,
        #[arg(long, default_value_t = 30)]
        max_rounds: u32,
        /// Pace the sender, e.g. 1gbit, 100mbit, 50M (bytes per second).
        #[arg(long, value_parser = parse_bandwidth)]
        bandwidth_limit: Option<u64>,
        /// How long to profile page heat before round 0 (heat strategy).
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        profile_window: Duration,
        /// Send hot written pages in every round instead of holding them back until the last.
        #[arg(long)]
        no_defer: bool,
        /// What to do when rounds stop shrinking [default: throttle for precopy, postcopy for
        /// hybrid].
        #[arg(long, value_enum)]
        converge: Option<Converge>,
        /// Bound the time before cutover, e.g. 60s; what happens then is --timeout-strategy.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// On timeout (or, when throttling, at the round limit): cancel and keep the partition
        /// running here, or force the cutover whatever the downtime.
        #[arg(long, value_enum, default_value = "cancel")]
        timeout_strategy: TimeoutStrategy,
        /// How long after the resume to count the guest's faults on the destination (0s: do
        /// not count); the command returns once it is over.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        fault_window: Duration,
        /// Data connections to stripe the pages across (1 to 16), each with a sender and a
        /// receiver thread of its own.
        #[arg(long, default_value_t = 1)]
        connections: u32,
        /// Compress the pages, frame by frame, where that saves an eighth of a frame:
        /// none, lz4, zstd or zstd:LEVEL (-7 to 22; zstd alone is level 1), or auto (lz4
        /// where compressing is measured to be faster than sending as it is).
        #[arg(long, default_value = "none")]
        compress: Compress,
        /// Hybrid: how long to try, with backoff, to recover a post-copy whose connection
        /// broke before keeping the partition `postcopy-paused` (0s: fail at once).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        recover_window: Duration,
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
}

#[derive(Args)]
struct MigrationTarget {
    #[command(flatten)]
    host: Host,
    /// The migration's id (`PARTITION.mN`, from `migrate --detach` or `migrations`), or a
    /// partition's id for its latest migration.
    migration: String,
}

/// As [`parse_bandwidth`], or 0 for `unlimited`.
fn parse_bandwidth_or_unlimited(text: &str) -> Result<u64> {
    match text.trim() {
        "unlimited" => Ok(0),
        _ => parse_bandwidth(text),
    }
}

/// Bytes per second from `1gbit`, `100mbit`, `64kbit` (bits) or `50M`, `1G` (bytes).
fn parse_bandwidth(text: &str) -> Result<u64> {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. } | Command::Vmm { .. }) {
        heatprobe::console::end_quietly_on_closed_pipe();
    }
    heatprobe::console::init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("migrator: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, cli.tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrator: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The heat sampling the `--heat-*` options give: `serve` takes them, and passes them on to
/// each partition's `vmm`.
fn heat_sampling(
    epoch: Duration,
    fraction: f64,
    recheck_fraction: f64,
    pool: bool,
) -> Result<HeatSampling, SamplingError> {
    Ok(HeatSampling::new(epoch, fraction)?
        .with_recheck(recheck_fraction)?
        .with_pool(pool))
}

async fn run(command: Command, tls: Option<PathBuf>) -> Result<()> {
    if let Command::Certs { out, hosts } = &command {
        for dir in certs::generate(out, hosts)? {
            println!("{}", dir.display());
        }
        return Ok(());
    }
    let security = Security::from_dir(tls.as_deref()).context("cannot load the TLS credentials")?;
    match command {
        Command::Certs { .. } => Ok(()),
        Command::Serve {
            listen,
            max_partitions,
            max_memory,
            max_migrations,
            peer_timeout,
            heat_epoch,
            heat_sample_fraction,
            heat_recheck_fraction,
            heat_pool,
            runtime_dir,
            on_exit,
        } => {
            let limits = Limits {
                max_partitions,
                max_memory: max_memory.unwrap_or(u64::MAX),
                max_migrations,
            };
            let process = ProcessConfig {
                listen,
                peer_timeout,
                sampling: heat_sampling(
                    heat_epoch,
                    heat_sample_fraction,
                    heat_recheck_fraction,
                    heat_pool,
                )?,
                tls,
            };
            run_daemon(process, limits, security, runtime_dir, on_exit).await
        }
        Command::Vmm {
            runtime_dir,
            id,
            session,
            listen,
            peer_timeout,
            heat_epoch,
            heat_sample_fraction,
            heat_recheck_fraction,
            heat_pool,
        } => Ok(partition_process::run(PartitionProcess {
            runtime_dir,
            id,
            session,
            listen,
            peer_timeout,
            sampling: heat_sampling(
                heat_epoch,
                heat_sample_fraction,
                heat_recheck_fraction,
                heat_pool,
            )?,
            security,
        })
        .await?),
        Command::Launch {
            host,
            workload,
            image,
            args,
            mem,
            vcpus,
            name,
        } => {
            let image = match (workload, image) {
                (Some(workload), _) => GuestImage::Builtin(workload),
                (None, Some(path)) => GuestImage::Elf(
                    std::fs::read(&path)
                        .with_context(|| format!("cannot read the image {}", path.display()))?,
                ),
                (None, None) => bail!("give --workload NAME or --image FILE"),
            };
            let connection = Connection::open(host.host, &security).await?;
            let request = LaunchRequest {
                name,
                image,
                args,
                mem_size: mem,
                vcpus,
            };
            let id = connection.rpc(
                connection
                    .client
                    .launch(context_with(Duration::from_secs(120)), request)
                    .await,
            )??;
            if host.json {
                println!("{}", serde_json::json!({ "id": id }));
            } else {
                println!("{id}");
            }
            Ok(())
        }
        Command::List { host } => {
            let connection = Connection::open(host.host, &security).await?;
            let list = connection.rpc(connection.client.list(context::current()).await)?;
            if host.json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                print_table(&list);
            }
            Ok(())
        }
        Command::Status(target) => {
            one(target, &security, |c, ctx, id| async move {
                c.status(ctx, id).await
            })
            .await
        }
        Command::Pause(target) => {
            one(target, &security, |c, ctx, id| async move {
                c.pause(ctx, id).await
            })
            .await
        }
        Command::Resume(target) => {
            one(target, &security, |c, ctx, id| async move {
                c.resume(ctx, id).await
            })
            .await
        }
        Command::Reconcile {
            target,
            resume_here,
        } => reconcile(target, resume_here, &security).await,
        Command::Stop(target) => {
            one(target, &security, |c, ctx, id| async move {
                c.stop(ctx, id).await
            })
            .await
        }
        Command::Heat { target, duration } => heat(target, duration, &security).await,
        Command::Plan {
            target,
            strategy,
            duration,
        } => plan(target, strategy, duration, &security).await,
        Command::Dash {
            host,
            id,
            peer,
            once,
            json,
        } => dash(host, id, peer, once, json, security).await,
        Command::Migrate {
            from,
            to,
            id,
            strategy,
            mode,
            downtime_limit,
            max_rounds,
            bandwidth_limit,
            profile_window,
            no_defer,
            converge,
            timeout,
            timeout_strategy,
            fault_window,
            connections,
            compress,
            recover_window,
            resume,
            json,
            detach,
            heat_file,
        } => {
            let options = MigrationOptions {
                strategy,
                mode,
                downtime_limit,
                max_rounds,
                bandwidth_limit,
                profile_window,
                defer_hot_writes: !no_defer,
                converge,
                timeout,
                timeout_strategy,
                fault_window,
                connections,
                compress,
                recover_window,
            };
            // Refused here with the flags' names, before anything is asked of a daemon.
            if !resume {
                options.validate()?;
            }
            let heat = match heat_file {
                Some(path) if strategy == Strategy::Heat => Some(read_heat_file(&path)?),
                Some(_) => bail!("--heat-file orders by heat: it needs --strategy heat"),
                None => None,
            };
            let request = to.map(|to| MigrateRequest {
                id: id.clone(),
                to,
                options: options.clone(),
                heat,
            });
            if detach {
                return detached(from, request, json, &security).await;
            }
            migrate(from, id, request, options, json, &security).await
        }
        Command::Migrations { hosts, json } => cli::jobs::list(&hosts, json, &security).await,
        Command::Cancel(target) => {
            cli::jobs::cancel(
                target.host.host,
                target.migration,
                target.host.json,
                &security,
            )
            .await
        }
        Command::Wait(target) => {
            let report = cli::jobs::wait(target.host.host, target.migration, &security).await?;
            print_report(&report, target.host.json)?;
            cli::jobs::outcome(&report)
        }
        Command::Limits {
            target,
            downtime_limit,
            bandwidth_limit,
        } => {
            let limits = migrator::migration::job::LiveLimits {
                downtime_limit,
                bandwidth_limit,
            };
            cli::jobs::limits(
                target.host.host,
                target.migration,
                limits,
                target.host.json,
                &security,
            )
            .await
        }
        Command::Postcopy(target) => {
            cli::jobs::postcopy(
                target.host.host,
                target.migration,
                target.host.json,
                &security,
            )
            .await
        }
    }
}

/// The pages of heat file `path`, checked as far as they can be without the partition (the
/// daemon checks their frames against it before anything starts).
fn read_heat_file(path: &std::path::Path) -> Result<Vec<heatprobe::PageHeat>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    migrator::migration::heat_file::parse(&bytes)
        .with_context(|| format!("refusing {}", path.display()))
}

/// `migrate --detach`: starts the migration and prints its id.
async fn detached(
    from: SocketAddr,
    request: Option<MigrateRequest>,
    json: bool,
    security: &Security,
) -> Result<()> {
    let Some(request) = request else {
        bail!("--detach needs --to");
    };
    let connection = Connection::open(from, security).await?;
    let migration = connection.rpc(
        connection
            .client
            .migrate_detached(context_with(Duration::from_secs(60)), request)
            .await,
    )??;
    if json {
        println!("{}", serde_json::json!({ "migration": migration }));
    } else {
        println!("{migration}");
    }
    Ok(())
}

type RpcResult = Result<Result<PartitionInfo, migrator::daemon::ApiError>, tarpc::client::RpcError>;

/// Runs one per-partition call and prints the partition it returns.
async fn one<F, Fut>(target: Target, security: &Security, call: F) -> Result<()>
where
    F: FnOnce(migrator::daemon::MigratorApiClient, context::Context, String) -> Fut,
    Fut: Future<Output = RpcResult>,
{
    let connection = Connection::open(target.host.host, security).await?;
    let ctx = context_with(Duration::from_secs(30));
    let info = connection.rpc(call(connection.client.clone(), ctx, target.id).await)??;
    if target.host.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        print_info(&info);
    }
    Ok(())
}

async fn reconcile(target: Target, resume_here: bool, security: &Security) -> Result<()> {
    let connection = Connection::open(target.host.host, security).await?;
    // Asking the destination is bounded by the daemon's peer timeout, plus its answer; a
    // paused post-copy's pages go too, as long as `migrate` may take.
    let ctx = context_with(Duration::from_secs(3600));
    let id = target.id.clone();
    let settled = connection.rpc(
        connection
            .client
            .reconcile(ctx, target.id, resume_here)
            .await,
    )??;
    if target.host.json {
        println!("{}", serde_json::to_string(&settled)?);
    } else {
        match settled {
            migrator::daemon::api::Reconciled::MovedTo { id_on_destination } => println!(
                "partition {id} runs on the destination as {}; the copy here is stopped",
                id_on_destination.as_deref().unwrap_or("?")
            ),
            migrator::daemon::api::Reconciled::ResumedHere => {
                println!("partition {id} runs here again; nothing of it runs on the destination")
            }
        }
    }
    Ok(())
}

/// How long past a window a call may take (connecting, the epoch that ends it, the answer).
const WINDOW_SLACK: Duration = Duration::from_secs(30);

async fn heat(target: Target, duration: Duration, security: &Security) -> Result<()> {
    let connection = Connection::open(target.host.host, security).await?;
    let ctx = context_with(duration.saturating_add(WINDOW_SLACK));
    let heat = connection.rpc(connection.client.page_heat(ctx, target.id, duration).await)??;
    if target.host.json {
        /// `heatprobe record --json`'s object, with the partition and its size added.
        #[derive(serde::Serialize)]
        struct Json<'a> {
            partition: &'a str,
            frames: u64,
            duration_ms: u64,
            #[serde(flatten)]
            record: &'a heatprobe::report::RecordReport,
        }
        let json = Json {
            partition: &heat.id,
            frames: heat.frames,
            duration_ms: heat.duration_ms,
            record: &heat.record,
        };
        println!("{}", serde_json::to_string(&json)?);
    } else {
        print!("{}", heat_report::render_heat(&heat));
    }
    Ok(())
}

async fn plan(
    target: Target,
    strategy: Strategy,
    duration: Duration,
    security: &Security,
) -> Result<()> {
    let connection = Connection::open(target.host.host, security).await?;
    let ctx = context_with(duration.saturating_add(WINDOW_SLACK));
    let preview = connection.rpc(
        connection
            .client
            .plan(ctx, target.id, strategy, duration)
            .await,
    )??;
    if target.host.json {
        println!("{}", serde_json::to_string(&preview)?);
    } else {
        print!("{}", heat_report::render_plan(&preview));
    }
    Ok(())
}

async fn dash(
    host: SocketAddr,
    id: Option<String>,
    peer: Option<SocketAddr>,
    once: bool,
    json: bool,
    security: Security,
) -> Result<()> {
    use migrator::dash::{App, terminal};
    if once {
        let snapshot = terminal::once(host, id, &security).await?;
        if json {
            println!("{}", serde_json::to_string(&snapshot)?);
        } else {
            let mut app = App::new(peer.map(|p| p.to_string()));
            app.apply(snapshot);
            let (width, height) = ratatui::crossterm::terminal::size().unwrap_or((100, 30));
            print!(
                "{}",
                terminal::render_text(&app, width.max(80), height.max(24))
            );
        }
        return Ok(());
    }
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || terminal::run(handle, host, id, peer, security))
        .await
        .context("the dashboard panicked")??;
    Ok(())
}

/// Migrates partition `id` of `from` as `request` says, or with no request resumes its
/// paused post-copy.
async fn migrate(
    from: SocketAddr,
    id: String,
    request: Option<MigrateRequest>,
    options: MigrationOptions,
    json: bool,
    security: &Security,
) -> Result<()> {
    use std::io::IsTerminal;
    let connection = Connection::open(from, security).await?;
    let ctx = context_with(Duration::from_secs(3600));
    let call = async {
        match request {
            Some(request) => connection.client.migrate(ctx, request).await,
            None => {
                connection
                    .client
                    .migrate_resume(ctx, id.clone(), options)
                    .await
            }
        }
    };
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar
    });
    let watch = async {
        let Some(bar) = &bar else {
            return std::future::pending::<()>().await;
        };
        loop {
            if let Ok(Some(p)) = connection
                .client
                .migration_progress(context::current(), id.clone())
                .await
            {
                let throttle = if p.throttle_pct > 0 {
                    format!("  throttle {}%", p.throttle_pct)
                } else {
                    String::new()
                };
                bar.set_message(format!(
                    "{:?} round {}  remaining {} MiB  {:.0} MiB/s  expected downtime {} ms{throttle}",
                    p.phase,
                    p.round,
                    p.remaining_bytes >> 20,
                    p.rate_bytes_per_sec / (1 << 20) as f64,
                    p.expected_downtime_ms
                ));
            }
            bar.tick();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    // Ctrl-C cancels the migration, as `virsh migrate` does, and waits for its report: the
    // guest runs on here if it was before the handover. Past it, the migration goes on and
    // this waits for it to end.
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            return std::future::pending::<()>().await;
        }
        let cancel = connection
            .client
            .migration_cancel(context_with(Duration::from_secs(30)), id.clone())
            .await;
        match cancel {
            Ok(Ok(_)) => eprintln!("migrator: cancelling the migration"),
            Ok(Err(refused)) => eprintln!("migrator: not cancelled: {refused}; waiting for it"),
            Err(e) => eprintln!("migrator: could not ask for a cancel: {e}"),
        }
        std::future::pending::<()>().await
    };
    let result = tokio::select! {
        result = call => result,
        () = watch => unreachable!("the watcher never ends"),
        () = interrupt => unreachable!("the interrupt never ends"),
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = connection.rpc(result)??;
    print_report(&report, json)?;
    cli::jobs::outcome(&report)
}

/// Prints a migration's report: one JSON object, or a summary.
fn print_report(report: &migrator::migration::MigrationReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    println!(
        "{}: {} in {} ms ({} rounds, {} pages sent, {} re-sent, {} zero), downtime {} ms, {:.0} Mbit/s",
        report.status,
        report.id_on_destination.as_deref().unwrap_or("-"),
        report.total_time_ms,
        report.rounds,
        report.pages_sent,
        report.pages_resent,
        report.zero_pages,
        report.downtime_ms,
        report.mbps
    );
    // A failed migration's limit was not kept or broken: it has no downtime to judge.
    if report.status == migrator::migration::MigrationStatus::Completed {
        println!("{}", downtime_line(report));
    }
    if let Some(note) = &report.downtime_note {
        println!("  {note}");
    }
    if report.bytes_uncompressed != report.bytes_sent {
        println!("{}", compression_line(report));
    }
    if let Some(ratio) = report.guest_ops_ratio {
        println!(
            "guest ran at {:.0}% of its operations per second before the migration",
            ratio * 100.0
        );
    }
    match (&report.guest_work_lost, &report.guest_work_lost_note) {
        (Some(lost), _) => println!("{}", work_lost_line(lost)),
        (None, Some(why)) => println!("guest work lost {why}"),
        (None, None) => {}
    }
    if report.status == migrator::migration::MigrationStatus::Completed {
        println!("{}", after_move_line(report));
    }
    if let Some(error) = &report.error {
        println!("error: {error}");
    }
    Ok(())
}

/// The summary's line on the guest's whole bill, by part.
fn work_lost_line(lost: &migrator::migration::report::GuestWorkLost) -> String {
    let after = match lost.after_ms {
        Some(ms) => format!("{ms:.0}"),
        None => "not counted".into(),
    };
    format!(
        "guest work lost {:.0} ms at its pace before ({:.0} ops/s) over {:.0} ms: profile {:.0}, \
         rounds {:.0}, throttle {:.0}, downtime {:.0}, after the resume {after}",
        lost.total_ms,
        lost.rate_before,
        lost.counted_ms,
        lost.profile_ms,
        lost.rounds_ms,
        lost.throttle_ms,
        lost.downtime_ms
    )
}

/// The summary's compression line: the bytes before and after, and the rates.
fn compression_line(report: &migrator::migration::MigrationReport) -> String {
    format!(
        "compressed {} MiB of pages to {} MiB on the wire ({:.2}x); round 0 moved {:.0} Mbit/s of pages over {:.0} Mbit/s of wire",
        report.bytes_uncompressed >> 20,
        report.bytes_sent >> 20,
        report.compression_ratio,
        report.round0_mbps,
        report.round0_wire_mbps
    )
}

/// The summary's downtime line: the total against the limit, then where it went.
fn downtime_line(report: &migrator::migration::MigrationReport) -> String {
    let verdict = if report.downtime_limit_met {
        "within"
    } else {
        "not within"
    };
    format!(
        "downtime {} ms, {verdict} the {} ms limit: {}",
        report.downtime_ms,
        report.downtime_limit_ms,
        report.downtime_breakdown.summary()
    )
}

/// The summary's line on what the guest felt after the move: its stall, its faults over the
/// window, and (hybrid) how long demanded pages took.
fn after_move_line(report: &migrator::migration::MigrationReport) -> String {
    let faults = match (
        &report.post_cutover_faults,
        &report.post_cutover_faults_note,
    ) {
        (Some(f), _) => format!(
            "{} local and {} remote faults in the {} ms after the resume",
            f.local, f.remote, f.window_ms
        ),
        (None, Some(why)) => format!("faults not counted: {why}"),
        (None, None) => "faults not counted (--fault-window 0)".into(),
    };
    let demand = match report.mode {
        migrator::migration::Mode::Hybrid => {
            let l = report.postcopy_fault_latency_us;
            format!(
                "; {} stale copies dropped before the pause, {} pages sent within the downtime, \
                 {} demanded (p50 {} µs, p99 {} µs, max {} µs)",
                report.discarded_pages,
                report.budgeted_pages,
                report.postcopy_requests,
                l.p50,
                l.p99,
                l.max
            )
        }
        migrator::migration::Mode::Precopy => String::new(),
    };
    format!(
        "guest stalled {:.0} ms (downtime and {:.1} ms blocked on missing pages); {faults}{demand}",
        report.guest_stall_ms, report.postcopy_blocktime_ms
    )
}

fn print_table(list: &[PartitionInfo]) {
    println!(
        "{:<12} {:<14} {:<22} {:<9} {:>8} {:>5} {:>14} {:>7} {:>8}",
        "ID", "NAME", "IMAGE", "STATE", "MEM", "VCPUS", "OPS", "ERRORS", "CHECKS"
    );
    for info in list {
        println!(
            "{:<12} {:<14} {:<22} {:<9} {:>7}M {:>5} {:>14} {:>7} {:>8}",
            info.id,
            info.name.as_deref().unwrap_or("-"),
            info.image,
            state_shown(info),
            info.mem_bytes >> 20,
            info.vcpus,
            info.ops,
            info.errors,
            info.checks
        );
    }
}

/// The state a table shows: `unanswered` for a partition whose process did not answer (its
/// other columns are what it last said).
fn state_shown(info: &PartitionInfo) -> String {
    match info.unanswered_ms {
        Some(_) => "unanswered".into(),
        None => info.state.name(),
    }
}

fn print_info(info: &PartitionInfo) {
    println!("id:      {}", info.id);
    println!("name:    {}", info.name.as_deref().unwrap_or("-"));
    println!("image:   {}", info.image);
    println!("state:   {}", info.state.name());
    if let Some(ms) = info.unanswered_ms {
        println!(
            "process: has not answered for {:.1} s; what follows is what it last said",
            ms as f64 / 1e3
        );
    }
    if let Some(handover) = &info.awaiting_handover {
        println!(
            "awaits:  the handover of session {} on {} (`migrator reconcile {}` settles it)",
            handover.session, handover.peer, info.id
        );
    }
    if let Some(paused) = &info.postcopy_paused {
        println!(
            "holds:   the missing pages of session {} on {} (`migrator migrate --resume {}` \
             pushes them)",
            paused.session, paused.peer, info.id
        );
    }
    if let Some(reason) = &info.crash_reason {
        println!("crashed: {reason}");
    }
    println!(
        "memory:  {} MiB, {} vCPUs",
        info.mem_bytes >> 20,
        info.vcpus
    );
    println!(
        "guest:   {} ops, {} errors, {} checks",
        info.ops, info.errors, info.checks
    );
    if let Some(pid) = info.pid {
        match info.process_rss_anon_bytes {
            Some(own) => println!(
                "process: {pid}, {:.1} MiB of its own memory (guest memory apart)",
                own as f64 / (1u64 << 20) as f64
            ),
            None => println!("process: {pid}"),
        }
    }
    if !info.console.is_empty() {
        println!("console (recent):");
        let lines: Vec<&str> = info.console.lines().collect();
        for line in &lines[lines.len().saturating_sub(10)..] {
            println!("  {line}");
        }
    }
}

async fn run_daemon(
    mut process: ProcessConfig,
    limits: Limits,
    security: Security,
    runtime_dir: Option<PathBuf>,
    on_exit: OnExit,
) -> Result<()> {
    migrator::daemon::memory::keep_large_buffers_mapped();
    // Bind first: with port 0 the runtime directory and the partitions' data listeners
    // follow the port actually bound.
    let listener = migrator::daemon::listener::bind(process.listen, &security).await?;
    process.listen = listener.local_addr()?;
    let runtime_dir =
        runtime_dir.unwrap_or_else(|| Supervisor::default_runtime_dir(process.listen));
    let supervisor = Supervisor::start(&runtime_dir, process.clone(), limits)
        .await
        .with_context(|| format!("supervising partitions in {}", runtime_dir.display()))?;
    let serving = serve(supervisor.clone(), security, listener);
    // Scripts wait for this line.
    eprintln!("migrator: serving on {}", process.listen);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        () = serving => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    match on_exit {
        OnExit::Keep => {
            eprintln!("migrator: shutting down; the partitions run on for the next daemon");
        }
        OnExit::Stop => {
            eprintln!("migrator: shutting down; stopping every partition");
            supervisor.stop_all().await;
        }
    }
    // Only if empty: no partition runs on for a successor to adopt.
    let _ = std::fs::remove_dir(&runtime_dir);
    Ok(())
}
