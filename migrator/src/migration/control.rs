//! The control channel of a migration: what the source asks of the destination (prepare,
//! commit, finish, abort, the data connection) and how each call can fail.
//!
//! The data path (pages) runs beside it on its own connection (`link`, `transport`).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{
    link::{DataStream, LinkError},
    report::{Latency, Mode, PostCutoverFaults},
};
use crate::vmm::PartitionConfig;

/// Asks the destination to get ready for a partition of this shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrepareRequest {
    pub protocol_min: u16,
    pub protocol_max: u16,
    pub config: PartitionConfig,
    pub mode: Mode,
    /// How long after the resume the destination counts the guest's faults (0: not at all).
    pub fault_window_ms: u64,
    /// Data connections the pages come striped across (protocol 4; one before).
    #[serde(default = "one_connection")]
    pub connections: u32,
}

fn one_connection() -> u32 {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrepareReply {
    pub session: u64,
    pub data_port: u16,
    /// What freeing one stale page costs there, measured on the session's memory: a hybrid
    /// cutover's downtime pays it for every stale page it does not send.
    pub remove_ns_per_page: u64,
}

/// The cutover: the vCPU state, and in hybrid mode the pages whose copy is stale.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitRequest {
    /// The partition's saved state (`vmm::state`), which the destination checks before it
    /// restores anything.
    pub snapshot: Vec<u8>,
    pub stale_pages: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitReply {
    pub id_on_destination: String,
    /// The digest of the memory the destination installed (precopy: at once; hybrid: later,
    /// from `finish`).
    pub dest_digest: Option<String>,
    /// What the commit spent on the destination, so the source can say where its downtime
    /// went: the source sees only the round trip.
    pub timings: CommitTimings,
}

/// The destination's own account of a commit, in milliseconds of its clock. Untrusted by the
/// source: it only ever splits the round trip the source measured itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CommitTimings {
    /// Waiting for the last pages and the done marker, still in flight when the commit came,
    /// to be written into guest memory.
    pub pages_wait_ms: f64,
    /// Checking and decoding the saved state, and restoring the partition with its vCPUs
    /// parked (hybrid: with the stale pages dropped and userfaultfd set up first).
    pub restore_ms: f64,
    /// Starting the restored partition's vCPUs: 0 from the commit, which leaves them parked
    /// until the handover; the source fills it in from the handover's answer.
    pub resume_ms: f64,
}

/// The destination ran the partition its commit restored parked.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HandoverReply {
    /// The partition's id there.
    pub id_on_destination: String,
    /// Starting the vCPUs there, in milliseconds of its clock (0 when a handover came again
    /// and found it running).
    pub resume_ms: f64,
}

/// The heat the source's plan was made from, sent once the guest runs on the destination
/// (never in the downtime) so that heat there starts warm, and a migration back plans from it
/// without profiling again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CarriedHeat {
    /// Milliseconds between the end of the source's profile and this being sent: the
    /// destination decays the heat by that age.
    pub age_ms: u64,
    pub pages: Vec<heatprobe::PageHeat>,
}

/// What the destination says once every page has arrived (hybrid mode).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FinishReply {
    pub dest_digest: String,
    pub postcopy_requests: u64,
    /// Demands sent again after a post-copy recovery: faults that waited out the pause, or
    /// whose demand was lost with the broken connection.
    #[serde(default)]
    pub rerequests: u64,
    pub fault_latency_us: Latency,
    /// The time every vCPU waited on a missing page at once, in milliseconds.
    pub blocktime_ms: f64,
    /// What each vCPU waited on missing pages, in milliseconds, in vCPU order.
    pub vcpu_blocktime_ms: Vec<f64>,
}

/// The destination's answer to a post-copy recovery: where the new connections go, and what
/// it still lacks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Recovery {
    pub data_port: u16,
    /// The pages not in place there, a bit each: bit `page % 64` of word `page / 64`.
    pub missing: Vec<u64>,
}

/// Why a call to the destination did not succeed. The difference matters: a refusal is an
/// answer (the destination did not do it), while no answer leaves the outcome unknown.
#[derive(Debug, Error)]
pub enum DestinationError {
    #[error("the destination refused")]
    Refused(#[source] Refusal),
    #[error("the destination did not answer {what}")]
    Unreachable {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What a destination refused with. The engine owns this type (the daemon's API maps its
/// errors to it): all the engine needs of a refusal is whether it says, for certain, that
/// nothing of the session runs there.
#[derive(Debug, Error)]
pub enum Refusal {
    /// Nothing of the session runs there, nor will: it was dropped with whatever it restored.
    #[error("nothing of the session runs there: {0}")]
    NothingRunsHere(String),
    /// Any other refusal: the destination did not do what was asked, and says nothing of
    /// what runs there.
    #[error("{0}")]
    Other(String),
}

impl DestinationError {
    /// Whether the destination said, for certain, that nothing of the session runs there:
    /// only then may the source resume its copy after a handover it asked for. Any other
    /// answer (an unknown session, an internal error, no answer) leaves the outcome open.
    pub fn nothing_runs_there(&self) -> bool {
        matches!(self, Self::Refused(Refusal::NothingRunsHere(_)))
    }
}

/// The destination as the source sees it. The daemon implements it over tarpc
/// (`daemon::peer`); tests implement it in-process.
pub trait Destination {
    fn prepare(&mut self, request: PrepareRequest) -> Result<PrepareReply, DestinationError>;
    fn commit(
        &mut self,
        session: u64,
        request: CommitRequest,
    ) -> Result<CommitReply, DestinationError>;
    /// The source's copy is stopped for good: run the partition the commit restored parked.
    /// Refused, the destination runs nothing of the session and has dropped it; unanswered,
    /// the outcome is unknown and asking again is safe.
    fn handover(&mut self, session: u64) -> Result<HandoverReply, DestinationError>;
    fn finish(&mut self, session: u64) -> Result<FinishReply, DestinationError>;
    /// Hands the heat the plan was made from to the destination, once the move completed.
    fn carry_heat(&mut self, session: u64, heat: CarriedHeat) -> Result<(), DestinationError>;
    /// The guest's faults over the fault window from its resume, once the window is over.
    fn faults(&mut self, session: u64) -> Result<PostCutoverFaults, DestinationError>;
    /// The round trip of a call that does nothing there, if it can be measured: with the
    /// prepare's, a bound on what the commit's call itself costs.
    fn round_trip(&mut self) -> Option<std::time::Duration> {
        None
    }
    /// Who the destination is, for a partition awaiting its handover.
    fn peer(&self) -> String {
        "the destination".into()
    }
    /// Best effort: a destination that cannot be reached drops the session by itself.
    fn abort(&mut self, session: u64);
    /// Post-copy broke: the destination drops the old connections, listens for new ones and
    /// says which pages it still lacks.
    fn recover(&mut self, session: u64) -> Result<Recovery, DestinationError>;
    /// Opens the control channel again (after a broken link); a destination in the same
    /// process has nothing to reopen.
    fn reconnect(&mut self) -> Result<(), DestinationError> {
        Ok(())
    }
    /// Opens the data connection to the listener the destination prepared on `port`.
    fn connect_data(&self, port: u16) -> Result<DataStream, LinkError>;
}
