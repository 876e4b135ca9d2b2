//! What a session reports when it fails: on the data path, and at each step.

use std::sync::Arc;

use thiserror::Error;

use crate::migration::{protocol::MAX_CONNECTIONS, transport::TransportError};
use crate::vmm::{PartitionError, memory::MemoryError, state::StateError};

use super::{PhaseError, SessionPhase};

/// What went wrong on the data path (the receiver, the fault handler).
#[derive(Debug, Error)]
pub enum DataError {
    #[error("accepting the data connection")]
    Accept(#[source] std::io::Error),
    #[error("the source never connected")]
    NeverConnected,
    #[error("the source closed the data connection early")]
    ClosedEarly,
    #[error("reading the data connection")]
    Read(#[source] TransportError),
    #[error("the source sent a demand frame")]
    UnexpectedDemand,
    #[error("the source sent a `Done` frame out of place")]
    UnexpectedDone(#[source] PhaseError),
    #[error("a second `Done` on one data connection before the others ended the phase")]
    DoneTwice,
    #[error("a `Done` frame on the urgent connection")]
    UrgentDone,
    #[error("writing page {page}")]
    Write {
        page: u64,
        #[source]
        source: MemoryError,
    },
    #[error("freeing page {page}")]
    Free {
        page: u64,
        #[source]
        source: MemoryError,
    },
    #[error("UFFDIO_COPY of page {page}")]
    Copy {
        page: u64,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("UFFDIO_ZEROPAGE of page {page}")]
    ZeroPage {
        page: u64,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("waking the vCPU waiting on page {page}")]
    Wake {
        page: u64,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("demanding page {page}")]
    Demand {
        page: u64,
        #[source]
        source: TransportError,
    },
    #[error("an `Urgent` frame out of place (not the first of a hybrid connection)")]
    UnexpectedUrgent,
    #[error("cannot start reading a data connection")]
    Reader(#[source] std::io::Error),
    #[error(
        "a `Discard` frame out of place (only a hybrid session before its commit takes one; \
         this one is {phase:?})"
    )]
    UnexpectedDiscard { phase: SessionPhase },
    #[error("a `Discarded` frame from the source")]
    UnexpectedDiscarded,
    #[error("answering the source's discard")]
    Discarded(#[source] TransportError),
}

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("the partition shape is invalid")]
    Shape(#[source] PartitionError),
    #[error("a migration uses 1 to {MAX_CONNECTIONS} data connections, not {0}")]
    Connections(u32),
    #[error("cannot open the data listener")]
    Listen(#[source] std::io::Error),
    #[error("the data connection failed")]
    Data(#[source] Arc<DataError>),
    #[error("timed out waiting for the source")]
    Timeout,
    #[error("the partition's saved state is invalid")]
    State(#[source] StateError),
    #[error("page {0} never arrived")]
    Missing(u64),
    #[error("stale page {0} is out of range")]
    StaleOutOfRange(u64),
    #[error("restoring the partition failed")]
    Restore(#[source] PartitionError),
    #[error("userfaultfd setup failed")]
    Userfault(#[source] userfaultfd::Error),
    #[error("cannot start the fault handler")]
    Handler(#[source] std::io::Error),
    #[error("dropping stale pages failed")]
    Stale(#[source] MemoryError),
    #[error("the session was aborted")]
    Aborted,
    #[error("the source opened no urgent connection, which post-copy sends its demands on")]
    NoUrgentConnection,
    #[error("the session refused the step")]
    Phase(#[from] PhaseError),
}
