//! The daemon's tarpc API: what the CLI, scripts and peer daemons call.
//!
//! ```text
//!  client                         daemon
//!    │── hello(min, max) ──────────▶│  refuses if no version in [min, max] is spoken
//!    │◀───────────── DaemonInfo ────│
//!    │── launch / list / status ───▶│
//!    │── pause / resume / stop ────▶│
//!    │◀──── PartitionInfo | ApiError│
//! ```

pub mod client;
pub mod codec;
pub mod heat_report;
pub mod heat_view;
pub mod listener;

use std::time::Duration;

use migrator_guest::abi::ABI_VERSION;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    api::{
        heat_report::{PartitionHeat, PlanPreview},
        heat_view::HeatView,
    },
    migration::{
        MigrationProgress, MigrationReport, MigrationStatus, Mode, Strategy,
        control::{
            CarriedHeat, CommitReply, CommitRequest, FinishReply, HandoverReply, PrepareReply,
            PrepareRequest, Recovery,
        },
        job::LiveLimits,
        report::PostCutoverFaults,
        source::MigrationOptions,
    },
    vmm::{AwaitingHandover, GuestImage, PartitionState, PostcopyPaused},
};

/// The API version this build speaks. Bumped whenever a request or reply changes shape:
/// 2 carries the vCPU state of `migration_commit` as a saved state (`vmm::state`); 3 speaks
/// postcard (`api::codec`) instead of bincode; 4 adds the destination's timings to the
/// commit's reply and the downtime's breakdown to the migration report; 5 adds the fault
/// window (`migration_faults`, the prepare's window, blocktime in the finish's reply and the
/// report's post-cutover figures), `page_heat` and `plan`; 6 adds the report's discarded
/// pages (data protocol 3: `Discard` before the pause), the parked commit with
/// `migration_handover`, `reconcile` and `migration_heat`; 7 adds the options' `compress`
/// and `connections`, the prepare's `connections`, and the report's `bytes_uncompressed`,
/// `compression_ratio` and `round0_wire_mbps` (data protocol 4: `CompressedPages`, pages
/// striped across connections); 8 adds post-copy recovery (`migration_recover`,
/// `migrate_resume`, the options' `recover_window`, the report's `postcopy_recoveries` and
/// `postcopy_paused_ms`, and the partition state `postcopy-paused`); 9 adds what one process
/// per partition needs (`hello`'s `holds`, the partition's `pid` and
/// `process_rss_anon_bytes`); 10 adds migrations as jobs (`migrations`, `migrate_detached`,
/// `migration_wait`, `migration_cancel`, `migration_set_limits`, `migration_postcopy`, the
/// report's `migration`, `downtime_limit_ms`, status `cancelled` and `guest_work_lost`, the
/// fault window's `ops`, the partition's `unanswered_ms`, and `MigrateRequest::heat`) and the refusals `NothingRunsHere`,
/// `HeldByMigration`, `UnknownMigration` and `Steer`; 11 adds the options' `heat_budget`, the
/// report's `order_fallback` and `profile_spent`, and the heat record's `blind_spot`; 12 adds
/// warm heat (`plan_heat` `warm`, `guest_work_lost.warm_heat_ms`, `warm_heat`) and the
/// handshake's `memory_used` and `memory_free` (`drain` places partitions by them). New calls
/// go at the end of the service.
pub const API_VERSION: u32 = 12;
/// Largest frame either side accepts (a guest image travels in one).
pub const MAX_FRAME: usize = 80 << 20;
/// Largest guest image `launch` accepts.
pub use crate::vmm::partition::MAX_IMAGE;

/// What a daemon says about itself in the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub api_version: u32,
    pub guest_abi_version: u32,
    pub partitions: usize,
    /// Live partitions and incoming migration sessions: a partition process that holds none
    /// is done, and its supervisor ends it.
    pub holds: usize,
    /// Guest memory hosted and reserved for partitions still starting, in bytes.
    pub memory_used: u64,
    /// Guest memory one more partition may still take here: the room under `serve
    /// --max-memory`, and no more than the host's MemAvailable. `None` from a daemon that
    /// admits nothing itself (a partition's process).
    pub memory_free: Option<u64>,
}

impl DaemonInfo {
    pub fn new(partitions: usize) -> Self {
        Self {
            api_version: API_VERSION,
            guest_abi_version: ABI_VERSION,
            partitions,
            holds: partitions,
            memory_used: 0,
            memory_free: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchRequest {
    pub name: Option<String>,
    pub image: GuestImage,
    pub args: String,
    pub mem_size: u64,
    pub vcpus: u32,
}

/// A partition as the API reports it. Field names match `migrator status --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub id: String,
    pub name: Option<String>,
    /// `workload NAME` or `image`.
    pub image: String,
    pub state: PartitionState,
    pub ops: u64,
    pub errors: u64,
    pub checks: u64,
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub console: String,
    pub crash_reason: Option<String>,
    /// Self-check failures the guest reported through the hypercall.
    pub check_failures: u64,
    /// In state `awaiting-handover`: the destination and session whose handover it awaits.
    pub awaiting_handover: Option<AwaitingHandover>,
    /// In state `postcopy-paused`: the destination and session whose missing pages it holds.
    #[serde(default)]
    pub postcopy_paused: Option<PostcopyPaused>,
    /// The partition's process (`migrator vmm`), while it has one.
    #[serde(default)]
    pub pid: Option<u32>,
    /// That process's own memory (RssAnon: heap, stacks, buffers; guest memory is a shared
    /// memfd and not counted).
    #[serde(default)]
    pub process_rss_anon_bytes: Option<u64>,
    /// Set when the partition's process did not answer: how long since it last did, in
    /// milliseconds; the rest is what it said then.
    #[serde(default)]
    pub unanswered_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum ApiError {
    #[error("no partition with id `{0}`")]
    UnknownPartition(String),
    #[error("this daemon speaks API version {ours}, the client wants {min}..={max}")]
    Version { ours: u32, min: u32, max: u32 },
    #[error("the guest image is {0} bytes; the limit is {MAX_IMAGE}")]
    ImageTooLarge(usize),
    /// A partition operation failed; the message carries the cause chain.
    #[error("{0}")]
    Partition(String),
    /// A resource limit of this daemon would be exceeded.
    #[error("{0}")]
    Limit(String),
    #[error("no migration session {0}")]
    UnknownSession(u64),
    #[error("this daemon speaks migration protocol {ours}, the source wants {min}..={max}")]
    Protocol { ours: u16, min: u16, max: u16 },
    /// A migration step failed on this daemon; the message carries the cause chain.
    #[error("{0}")]
    Migration(String),
    /// The daemon failed in a way no request should cause (a task panicked).
    #[error("internal error: {0}")]
    Internal(String),
    /// The destination's definite answer that nothing of a session runs there, nor ever
    /// will: it dropped the session and stopped whatever the session restored. The only
    /// refusal after which a source may resume its copy.
    #[error("nothing of the session runs here: {0}")]
    NothingRunsHere(String),
    /// A migration holds the partition, and the call would change it.
    #[error(
        "partition `{partition}` is held by migration `{migration}` ({side}, phase {phase}); \
         `migrator cancel {migration}` cancels it before its handover, or wait for it"
    )]
    HeldByMigration {
        partition: String,
        migration: String,
        /// `source` or `destination`.
        side: String,
        phase: String,
    },
    /// No migration with this id on this daemon.
    #[error("no migration `{0}` here")]
    UnknownMigration(String),
    /// An operator's request to steer a migration that cannot take it.
    #[error("migration `{migration}`: {why}")]
    Steer { migration: String, why: String },
}

impl From<crate::host::admission::AdmissionError> for ApiError {
    fn from(error: crate::host::admission::AdmissionError) -> Self {
        Self::Limit(error.to_string())
    }
}

/// Asks a source daemon to migrate one of its partitions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateRequest {
    pub id: String,
    /// The destination daemon's API address.
    pub to: std::net::SocketAddr,
    pub options: MigrationOptions,
    /// Heat to order the migration by instead of profiling (`migrate --heat-file`), as
    /// `migration::heat_file` checks it; the strategy must be `heat`.
    #[serde(default)]
    pub heat: Option<Vec<heatprobe::PageHeat>>,
}

#[tarpc::service]
pub trait MigratorApi {
    /// Handshake: the daemon's info if it speaks a version in `min..=max`.
    async fn hello(min: u32, max: u32) -> Result<DaemonInfo, ApiError>;
    /// Creates and starts a partition; returns its id.
    async fn launch(request: LaunchRequest) -> Result<String, ApiError>;
    async fn list() -> Vec<PartitionInfo>;
    async fn status(id: String) -> Result<PartitionInfo, ApiError>;
    async fn pause(id: String) -> Result<PartitionInfo, ApiError>;
    async fn resume(id: String) -> Result<PartitionInfo, ApiError>;
    /// Stops a partition for good and frees its memory; it stays listed as stopped.
    async fn stop(id: String) -> Result<PartitionInfo, ApiError>;

    /// Source side: migrates partition `request.id` to `request.to`. The report says whether
    /// it completed; a failed migration leaves the partition running here.
    async fn migrate(request: MigrateRequest) -> Result<MigrationReport, ApiError>;
    /// Source side: how a running migration of partition `id` is doing.
    async fn migration_progress(id: String) -> Option<MigrationProgress>;

    /// Destination side: get ready to receive a partition of this shape.
    async fn migration_prepare(request: PrepareRequest) -> Result<PrepareReply, ApiError>;
    /// Destination side: restore the partition, parked until `migration_handover`.
    async fn migration_commit(
        session: u64,
        request: CommitRequest,
    ) -> Result<CommitReply, ApiError>;
    /// Destination side (hybrid): wait until every page has arrived.
    async fn migration_finish(session: u64) -> Result<FinishReply, ApiError>;
    /// Destination side: give up on a session.
    async fn migration_abort(session: u64);

    /// The partition's page heat condensed into `cells` cells (starts watching it on first
    /// call; the heat advances at most every half second).
    async fn heat(id: String, cells: u32) -> Result<HeatView, ApiError>;

    /// Destination side: the guest's faults over the fault window from its resume, once the
    /// window is over.
    async fn migration_faults(session: u64) -> Result<PostCutoverFaults, ApiError>;
    /// Per-page heat of partition `id` over a window of `duration` (200 ms to 60 s, whole
    /// epochs of 200 ms) from its shared profiler, as `heatprobe record` reports it.
    async fn page_heat(id: String, duration: Duration) -> Result<PartitionHeat, ApiError>;
    /// A dry run of the order round 0 of a migration of partition `id` would send now: with
    /// the heat strategy, from a window of `duration` of its heat.
    async fn plan(
        id: String,
        strategy: Strategy,
        duration: Duration,
    ) -> Result<PlanPreview, ApiError>;
    /// Destination side: the source stopped its copy for good; run the partition the commit
    /// restored parked. Asking again is safe. Refused, nothing of the session runs here and
    /// it is dropped.
    async fn migration_handover(session: u64) -> Result<HandoverReply, ApiError>;
    /// Source side: settle partition `id`, paused awaiting the handover of a migration whose
    /// outcome it could not learn. Asks the destination again: the move finishes if it runs
    /// the partition, and the partition resumes here if it refuses. Says which. With
    /// `resume_here`, the operator vouches that nothing of it runs on the destination (a host
    /// that is gone for good): it resumes here without asking.
    async fn reconcile(id: String, resume_here: bool) -> Result<Reconciled, ApiError>;
    /// Destination side: the heat the source's plan was made from, for the partition session
    /// `session` became; its heat windows (`page_heat`, `plan`) start from it, and a
    /// migration of it plans from it without profiling, for [`CARRIED_HEAT_FRESH`].
    async fn migration_heat(session: u64, heat: CarriedHeat) -> Result<(), ApiError>;
    /// Destination side (hybrid, after the handover): post-copy broke; drop the session's old
    /// connections, listen for new ones, and say which pages are still missing (QEMU's
    /// `migrate-recover`). The guest runs on meanwhile; refused in any other phase.
    async fn migration_recover(session: u64) -> Result<Recovery, ApiError>;
    /// Source side: resume the post-copy of partition `id`, paused here in state
    /// `postcopy-paused` after its recover window ran out (QEMU's `migrate resume=true`):
    /// the destination's missing pages are pushed over new connections.
    async fn migrate_resume(
        id: String,
        options: MigrationOptions,
    ) -> Result<MigrationReport, ApiError>;
    /// Every migration this daemon runs or recently ran: outgoing ones (`source`), and the
    /// incoming sessions it holds (`destination`). libvirt's `domjobinfo`, QEMU's
    /// `query-migrate`.
    async fn migrations() -> Vec<MigrationInfo>;
    /// Source side: starts migrating as `migrate` does and returns the migration's id at once.
    async fn migrate_detached(request: MigrateRequest) -> Result<String, ApiError>;
    /// Source side: waits for migration `migration` to end and returns its report.
    async fn migration_wait(migration: String) -> Result<MigrationReport, ApiError>;
    /// Source side: cancels migration `migration` (or the running migration of the partition
    /// of that id) if it is before its handover: the guest runs on here and the destination
    /// frees everything. Refused after it, saying why.
    async fn migration_cancel(migration: String) -> Result<MigrationInfo, ApiError>;
    /// Source side: changes a running migration's downtime limit or bandwidth.
    async fn migration_set_limits(
        migration: String,
        limits: LiveLimits,
    ) -> Result<MigrationInfo, ApiError>;
    /// Source side: a hybrid migration cuts over to post-copy at its next check.
    async fn migration_postcopy(migration: String) -> Result<MigrationInfo, ApiError>;
    /// The warm heat of partition `id` (`serve --heat-profile warm`): what a migration would
    /// plan from now, with the window it covers and what that window's sampling cost.
    async fn warm_heat(id: String) -> Result<PartitionHeat, ApiError>;
}

/// How long heat carried by a migration stays in use at the destination.
pub const CARRIED_HEAT_FRESH: Duration = Duration::from_secs(120);

/// How `reconcile` settled an awaiting handover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reconciled {
    /// The destination runs the partition, as `id_on_destination`; the copy here is stopped.
    MovedTo { id_on_destination: Option<String> },
    /// The destination runs nothing of it: the partition runs here again.
    ResumedHere,
}

/// A migration as `migrator migrations` lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// `PARTITION.mN`: the partition it moves, and its number on this daemon.
    pub id: String,
    pub partition: String,
    /// The other daemon (the source's view; a destination does not know its source's API
    /// address).
    pub peer: Option<String>,
    /// `source` or `destination`.
    pub side: String,
    pub mode: Mode,
    /// The source's strategy (a destination is not told).
    pub strategy: Option<Strategy>,
    /// The phase, by name: the source engine's (`precopy`, `handing-over`, ...) or the
    /// destination session's (`Receiving`, `Parked`, ...).
    pub phase: String,
    /// Whether an operator's cancel can still undo it (only the source cancels).
    pub cancellable: bool,
    /// The source's progress.
    pub progress: Option<MigrationProgress>,
    pub started_unix_ms: Option<u64>,
    /// How it ended, once it has.
    pub status: Option<MigrationStatus>,
}
