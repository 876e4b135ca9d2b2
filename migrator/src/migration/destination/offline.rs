//! A session with no network and no KVM, for the `destination_session` fuzz target
//! (`crate::fuzzing`). It is the real [`Session`], made by the constructor `prepare` uses, over
//! a small guest memory:
//!
//! - its data connections are accepted as the receiver accepts them (`accepted`: the first of
//!   a generation moves the session on), and each one's bytes, whenever they come, are read by
//!   the receiver's own steps (`take_frame`: frames decoded, pages installed, `Done` counted,
//!   the urgent connection taken, discards carried out and answered on a socket pair; a
//!   refused frame fails the session as the receiver does; `connection_ended` at a close);
//! - its control calls are the real entry points where they need neither KVM nor a wait
//!   (`abort`, `discard`, `finish` once the push has ended, a `commit` whose saved state does
//!   not decode, a recovery's new generation), and elsewhere the event the entry point raises
//!   through `advance`, the one function that moves a session's phase: a `commit` whose state
//!   decodes (before its restore), the restore's end, the handover's resume.
//!
//! What it cannot reach: the KVM restore and resume, userfaultfd (pages go through the memfd
//! after a hybrid commit too, where a real session places them through userfaultfd), the
//! demands a guest's faults send, TLS, and connections read at the same time (here one step
//! at a time, in the input's order).

use std::{
    io::{self, Read},
    net::{IpAddr, Ipv4Addr},
    os::unix::net::UnixStream,
    sync::Arc,
    time::Duration,
};

use super::{
    DataError, PhaseError, ProbeSlot, Session, SessionError, SessionEvent, SessionPhase,
    receive::Connection,
};
use crate::{
    migration::{
        control::{CommitRequest, PrepareRequest},
        link::{DataLink, DataStream},
        report::Mode,
        transport::FrameReader,
    },
    vmm::{GuestAddress, GuestImage, GuestMemory, PartitionConfig, memory::PAGE_SIZE},
};

/// A control call, or the event its entry point raises.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// `commit` with a saved state that does not decode: refused before anything changes.
    CommitUndecodable(Vec<u8>),
    /// `commit` with a state that decodes, up to its restore.
    Commit,
    /// The commit's restore ended, the partition parked.
    Restored,
    /// `handover` resumed the parked partition.
    Handover,
    Finish,
    /// A data connection or an install failed.
    Failure,
    Abort,
    Discard,
    /// `recover`: a new generation of connections.
    Recover,
}

impl Control {
    /// The event the call raises.
    pub fn event(&self) -> SessionEvent {
        match self {
            Self::CommitUndecodable(_) | Self::Commit => SessionEvent::Commit,
            Self::Restored => SessionEvent::Restored,
            Self::Handover => SessionEvent::Handover,
            Self::Finish => SessionEvent::Finish,
            Self::Failure => SessionEvent::Failure,
            Self::Abort => SessionEvent::Abort,
            Self::Discard => SessionEvent::Discard,
            Self::Recover => SessionEvent::Recover,
        }
    }
}

/// What the session holds of one page.
pub struct PageHeld {
    pub received: bool,
    /// The page's hash as the session will report it in its digest.
    pub digest: u64,
    /// The page in guest memory.
    pub bytes: Vec<u8>,
}

/// A data connection: what the receiver knows of it, its way back (the session's end of a
/// socket pair), and the source's end, where the answers arrive.
struct Link {
    connection: Connection,
    answers: io::Result<DataStream>,
    source: UnixStream,
    open: bool,
}

/// A session of `pages` pages of guest memory, in `mode`, over `connections` data connections.
pub struct OfflineSession {
    session: Arc<Session>,
    links: Vec<Link>,
    /// The generation whose listener accepts, and how many connections it accepted; `None`
    /// once it accepts no more.
    listener: (u32, Option<u32>),
}

impl OfflineSession {
    pub fn new(mode: Mode, connections: u32, pages: u64) -> Result<Self, SessionError> {
        let request = PrepareRequest {
            protocol_min: 0,
            protocol_max: 0,
            config: PartitionConfig {
                name: Some("offline".into()),
                mem_size: pages * PAGE_SIZE,
                vcpus: 1,
                image: GuestImage::Builtin("idle".into()),
                args: String::new(),
            },
            mode,
            fault_window_ms: 0,
            connections,
        };
        let memory =
            GuestMemory::new(request.config.mem_size).map_err(|e| SessionError::Shape(e.into()))?;
        let session = Arc::new(Session::new(
            &request,
            Arc::new(memory),
            DataLink::Plain,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            Duration::from_secs(1),
            ProbeSlot::default(),
        ));
        Ok(Self {
            session,
            links: Vec::new(),
            listener: (0, Some(0)),
        })
    }

    /// The source opens a data connection: accepted as the receiver accepts it, while the
    /// current generation's listener still listens (it takes the data connections, and in
    /// hybrid the urgent one, then closes). Returns whether it is read.
    pub fn open(&mut self) -> io::Result<bool> {
        let session = &self.session;
        let generation = session.lock().generation;
        if self.listener.0 != generation {
            self.listener = (generation, Some(0));
        }
        let wanted = match session.mode {
            Mode::Precopy => session.connections,
            Mode::Hybrid => session.connections + 1,
        };
        let Some(accepted) = self.listener.1.filter(|&a| a < wanted) else {
            return Ok(false);
        };
        if !session.accepted(generation, accepted == 0) {
            self.listener.1 = None;
            return Ok(false);
        }
        self.listener.1 = Some(accepted + 1);
        let (source, ours) = UnixStream::pair()?;
        source.set_nonblocking(true)?;
        let stream = DataStream::Tunnel(ours, Arc::default(), Arc::default());
        session.lock_streams().push(stream.try_clone()?);
        self.links.push(Link {
            connection: Connection::new(generation),
            answers: Ok(stream),
            source,
            open: true,
        });
        Ok(true)
    }

    /// Connections opened so far, open or closed.
    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// Connection `link` sends `bytes`, read frame by frame as its receiver reads them (a
    /// frame cut at the end is the stream cut there). Returns what the session wrote back.
    pub fn send(&mut self, link: usize, bytes: &[u8]) -> io::Result<Vec<u8>> {
        let session = &self.session;
        let Some(link) = self.links.get_mut(link).filter(|l| l.open) else {
            return Ok(Vec::new());
        };
        let mut reader = FrameReader::new(bytes, session.memory.frames());
        while session.reads(&link.connection) {
            let result = match reader.next_frame() {
                Ok(Some(frame)) => {
                    session.take_frame(&mut link.connection, frame, &mut link.answers)
                }
                Ok(None) => break,
                Err(e) => Err(DataError::Read(e)),
            };
            if let Err(e) = result {
                session.fail_in(link.connection.generation, e);
                link.open = false;
                break;
            }
        }
        let mut answers = Vec::new();
        match link.source.read_to_end(&mut answers) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(answers),
        }
    }

    /// Connection `link` closes.
    pub fn close(&mut self, link: usize) {
        if let Some(link) = self.links.get_mut(link).filter(|l| l.open) {
            link.open = false;
            if self.session.reads(&link.connection) {
                self.session.connection_ended(&link.connection);
            }
        }
    }

    pub fn phase(&self) -> SessionPhase {
        self.session.phase()
    }

    pub fn mode(&self) -> Mode {
        self.session.mode
    }

    pub fn frames(&self) -> u64 {
        self.session.memory.frames()
    }

    /// Makes `call`; an error is its refusal.
    pub fn control(&self, call: Control) -> Result<(), SessionError> {
        let session = &self.session;
        let advance = |event| session.advance(event).map(drop).map_err(SessionError::from);
        match call {
            Control::CommitUndecodable(snapshot) => session
                .commit(CommitRequest {
                    snapshot,
                    stale_pages: Vec::new(),
                })
                .map(drop),
            // `finish` would wait for the push to end; it is refused the same way there.
            Control::Finish if session.phase() == (SessionPhase::Postcopy { pushed: false }) => {
                advance(SessionEvent::Finish)
            }
            Control::Finish => session.finish().map(drop),
            Control::Failure => {
                session.fail(DataError::ClosedEarly);
                Ok(())
            }
            Control::Abort => session.abort().map_err(SessionError::from),
            Control::Discard => session.discard().map_err(SessionError::from),
            Control::Recover => session
                .begin_recovery()
                .map(drop)
                .map_err(|e: PhaseError| e.into()),
            Control::Commit | Control::Restored | Control::Handover => advance(call.event()),
        }
    }

    /// Every page: whether the session has it, its hash as the digest will count it, and
    /// what guest memory holds there.
    pub fn pages(&self) -> io::Result<Vec<PageHeld>> {
        let progress = self.session.lock();
        (0..self.frames())
            .map(|page| {
                let mut bytes = vec![0; PAGE_SIZE as usize];
                self.session
                    .memory
                    .read(GuestAddress(page * PAGE_SIZE), &mut bytes)
                    .map_err(io::Error::other)?;
                Ok(PageHeld {
                    received: progress.received[page as usize],
                    digest: progress.page_digests[page as usize],
                    bytes,
                })
            })
            .collect()
    }
}
