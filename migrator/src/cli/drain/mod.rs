//! `migrator drain`: moves every live partition off one daemon onto others, at most
//! `--parallel` at once, each to the destination with the most guest memory free, under an
//! optional total bandwidth shared among the migrations running (`kubectl drain` for KubeVirt
//! VMs, OpenStack's `nova host-evacuate-live`).
//!
//! Each migration goes through the same calls as `migrate --detach` and `wait` (the source
//! runs it as a job; `place` decides where; `report` says how each partition fared).
//! A partition that cannot move stays where it is and is named in the report; Ctrl-C
//! cancels the migrations in flight through the job API and starts no more.

mod place;
mod progress;
mod report;

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use migrator::{
    api::{MigrateRequest, PartitionInfo, client::Connection, client::context_with},
    migration::{MigrationReport, job::LiveLimits, source::MigrationOptions},
    tls::Security,
    vmm::PartitionState,
};
use tarpc::context;
use tokio::task::JoinSet;

use self::{
    place::{Ledger, share},
    progress::Progress,
    report::{Drain, Entry},
};
use super::{
    args::{MigrateArgs, parse_bandwidth},
    calls::start_detached,
    jobs, render,
};

/// The most migrations a drain runs at once.
const MAX_PARALLEL: usize = 64;

#[derive(Args)]
pub(crate) struct DrainArgs {
    /// The daemon to empty.
    #[arg(long)]
    from: SocketAddr,
    /// The daemons to move its partitions to: HOST[,HOST...].
    #[arg(long, required = true, value_delimiter = ',')]
    to: Vec<SocketAddr>,
    /// The most migrations at once (the source's `serve --max-migrations` caps it too).
    #[arg(long, default_value_t = 2)]
    parallel: usize,
    /// The total bandwidth of the drain's migrations, e.g. 1gbit: split evenly among those
    /// running, and shared out again as each starts and ends.
    #[arg(long, value_parser = parse_bandwidth)]
    bandwidth: Option<u64>,
    #[command(flatten)]
    options: MigrateArgs,
    /// Print one JSON object when done (a report per partition) instead of a progress bar
    /// and summary.
    #[arg(long)]
    json: bool,
}

/// The drain's arguments, checked before any daemon is asked anything.
fn checked(args: &DrainArgs) -> Result<MigrationOptions> {
    if !(1..=MAX_PARALLEL).contains(&args.parallel) {
        bail!("--parallel must be 1 to {MAX_PARALLEL}");
    }
    if args.to.contains(&args.from) {
        bail!("--to names {}, the daemon being drained", args.from);
    }
    let mut seen = Vec::new();
    for to in &args.to {
        if seen.contains(to) {
            bail!("--to names {to} twice");
        }
        seen.push(*to);
    }
    let options = MigrationOptions::from(args.options.clone());
    if options.bandwidth_limit.is_some() {
        bail!("drain takes --bandwidth, the total for all its migrations, not --bandwidth-limit");
    }
    options.validate()?;
    Ok(options)
}

/// A migration the drain started and waits for.
struct Flight {
    migration: String,
    destination: usize,
    entry: usize,
}

/// One drain under way.
struct Run {
    from: SocketAddr,
    source: Connection,
    security: Security,
    options: MigrationOptions,
    bandwidth: Option<u64>,
    ledger: Ledger,
    entries: Vec<Entry>,
    flights: BTreeMap<String, Flight>,
    waits: JoinSet<(String, Result<MigrationReport>)>,
    progress: Progress,
    start: Instant,
}

pub(crate) async fn run(args: DrainArgs, security: &Security) -> Result<()> {
    use std::io::IsTerminal;
    let options = checked(&args)?;
    let source = Connection::open(args.from, security).await?;
    let mut free = Vec::new();
    for &to in &args.to {
        let destination = Connection::open(to, security)
            .await
            .with_context(|| format!("the destination {to}"))?;
        free.push((to, destination.info.memory_free.unwrap_or(0)));
    }
    let listed = source.rpc(
        source
            .client
            .list(context_with(Duration::from_secs(30)))
            .await,
    )?;
    let (movable, entries) = partition_partitions(listed);
    let shown = !args.json && std::io::stderr().is_terminal();
    let mut run = Run {
        from: args.from,
        source,
        security: security.clone(),
        options,
        bandwidth: args.bandwidth,
        ledger: Ledger::new(free),
        progress: Progress::new(movable.len() + entries.len(), shown),
        entries,
        flights: BTreeMap::new(),
        waits: JoinSet::new(),
        start: Instant::now(),
    };
    for _ in 0..run.entries.len() {
        run.progress.settled("");
    }
    let cancelled = run.drive(movable, args.parallel).await;
    let elapsed_ms = run.elapsed_ms();
    run.progress.finish();
    let mut drain = Drain {
        from: args.from.to_string(),
        to: args.to.iter().map(ToString::to_string).collect(),
        parallel: args.parallel,
        bandwidth: args.bandwidth,
        cancelled,
        elapsed_ms,
        moved: 0,
        not_moved: 0,
        partitions: run.entries,
    };
    drain.tally();
    if args.json {
        println!("{}", serde_json::to_string(&drain)?);
    } else {
        print!("{}", drain.text());
    }
    let left = drain.left_behind();
    if !left.is_empty() {
        bail!(
            "{} of {} partitions were not moved: {}",
            left.len(),
            drain.partitions.len(),
            left.join(", ")
        );
    }
    Ok(())
}

/// The live partitions a drain moves, largest first, and entries for those it cannot: busy
/// with a migration, or held for one. Stopped and crashed ones have nothing to move.
fn partition_partitions(listed: Vec<PartitionInfo>) -> (VecDeque<PartitionInfo>, Vec<Entry>) {
    let mut movable = Vec::new();
    let mut entries = Vec::new();
    for p in listed {
        match p.state {
            PartitionState::Running | PartitionState::Paused => movable.push(p),
            PartitionState::Stopped | PartitionState::Crashed => {}
            other => entries.push(Entry::not_moved(
                p.id,
                p.name,
                p.mem_bytes,
                format!("it is {}", other.name()),
            )),
        }
    }
    movable.sort_by(|a, b| b.mem_bytes.cmp(&a.mem_bytes).then(a.id.cmp(&b.id)));
    (movable.into(), entries)
}

/// The next Ctrl-C, or never without a handler.
async fn interrupted(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

impl Run {
    fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Starts migrations while there are slots and partitions, and settles each as it ends,
    /// until none is left or Ctrl-C; says whether it was cancelled.
    async fn drive(&mut self, mut pending: VecDeque<PartitionInfo>, parallel: usize) -> bool {
        let mut cancelled = false;
        // Installed before the first migration starts: a Ctrl-C from then on cancels.
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            while !cancelled && self.flights.len() < parallel {
                let Some(partition) = pending.pop_front() else {
                    break;
                };
                self.start(partition).await;
            }
            if self.flights.is_empty() && (cancelled || pending.is_empty()) {
                break;
            }
            tokio::select! {
                Some(joined) = self.waits.join_next() => {
                    if let Ok((partition, outcome)) = joined {
                        self.settle(&partition, outcome).await;
                    }
                }
                Some(()) = interrupted(&mut interrupt), if !cancelled => {
                    cancelled = true;
                    self.cancel().await;
                }
                _ = tick.tick() => self.watch().await,
            }
        }
        for p in pending {
            let why = "the drain was cancelled before its migration started".to_string();
            self.entries
                .push(Entry::not_moved(p.id, p.name, p.mem_bytes, why));
        }
        cancelled
    }

    /// Starts migrating `partition` to the destination with the most memory free, or says
    /// why it cannot.
    async fn start(&mut self, partition: PartitionInfo) {
        let memory = partition.mem_bytes;
        let Some(destination) = self.ledger.choose(memory) else {
            let why = format!(
                "no destination has room for its {} MiB (the most free is {} MiB)",
                memory >> 20,
                self.ledger.most_free() >> 20
            );
            self.progress.settled(&partition.id);
            self.entries
                .push(Entry::not_moved(partition.id, partition.name, memory, why));
            return;
        };
        let to = self.ledger.addr(destination);
        let mut options = self.options.clone();
        if let Some(total) = self.bandwidth {
            let running = self.flights.len() + 1;
            // The others first, so that the sum never exceeds the total.
            self.share_bandwidth(total, running).await;
            options.bandwidth_limit = Some(share(total, running));
        }
        let mut entry =
            Entry::not_moved(partition.id.clone(), partition.name, memory, String::new());
        entry.why = None;
        entry.to = Some(to.to_string());
        entry.bandwidth_limit = options.bandwidth_limit;
        entry.started_ms = Some(self.elapsed_ms());
        let request = MigrateRequest {
            id: partition.id.clone(),
            to,
            options,
            heat: None,
        };
        let index = self.entries.len();
        self.entries.push(entry);
        match start_detached(&self.source, request).await {
            Ok(migration) => {
                self.ledger.take(destination, memory);
                self.progress.started(&partition.id, &to.to_string());
                let (from, security) = (self.from, self.security.clone());
                let waited = migration.clone();
                let id = partition.id.clone();
                self.waits
                    .spawn(async move { (id, jobs::wait(from, waited, &security).await) });
                self.flights.insert(
                    partition.id,
                    Flight {
                        migration,
                        destination,
                        entry: index,
                    },
                );
            }
            Err(e) => {
                let ended = self.elapsed_ms();
                self.entries[index].settle(Err(e), ended);
                self.progress.settled(&partition.id);
            }
        }
    }

    /// Partition `partition`'s migration ended as `outcome`.
    async fn settle(&mut self, partition: &str, outcome: Result<MigrationReport>) {
        let Some(flight) = self.flights.remove(partition) else {
            return;
        };
        let moved = outcome
            .as_ref()
            .is_ok_and(|r| r.status == migrator::migration::MigrationStatus::Completed);
        if !moved {
            self.ledger
                .give_back(flight.destination, self.entries[flight.entry].mem_bytes);
        }
        let ended = self.elapsed_ms();
        self.entries[flight.entry].settle(outcome, ended);
        self.progress.settled(partition);
        if let Some(total) = self.bandwidth
            && !self.flights.is_empty()
        {
            self.share_bandwidth(total, self.flights.len()).await;
        }
    }

    /// Gives each migration in flight its share of `total` among `running`; one past its
    /// copy refuses, which is as good (it sends no more pages).
    async fn share_bandwidth(&self, total: u64, running: usize) {
        let limits = LiveLimits {
            downtime_limit: None,
            bandwidth_limit: Some(share(total, running)),
        };
        for flight in self.flights.values() {
            let _ = self
                .source
                .client
                .migration_set_limits(
                    context_with(Duration::from_secs(30)),
                    flight.migration.clone(),
                    limits,
                )
                .await;
        }
    }

    /// Ctrl-C: cancels every migration in flight; they are settled as their reports come.
    async fn cancel(&self) {
        self.progress
            .say("cancelling: the partitions not yet moved stay where they are");
        for flight in self.flights.values() {
            jobs::ask_cancel(&self.source.client, flight.migration.clone()).await;
        }
    }

    /// Shows how each migration in flight is doing.
    async fn watch(&self) {
        for partition in self.flights.keys() {
            if let Ok(Some(p)) = self
                .source
                .client
                .migration_progress(context::current(), partition.clone())
                .await
            {
                self.progress.update(partition, render::progress_line(&p));
            }
        }
    }
}
