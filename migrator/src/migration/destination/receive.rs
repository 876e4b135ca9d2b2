//! Receiving: the data connections accepted, each read by a thread of its own, the frames
//! installed, demands sent back on the urgent connection in hybrid, and the end of the
//! pages noticed.

use std::{
    net::TcpListener,
    sync::{Arc, MutexGuard, atomic::Ordering},
    time::{Duration, Instant},
};

use heatprobe::probes::error_chain;
use tracing::warn;

use crate::migration::{
    link::{DataStream, tune_peer_socket},
    report::Mode,
    transport::{Frame, FrameReader, send_demand, send_discarded},
};

use super::{DataError, STEP_TIMEOUT, Session, SessionEvent, SessionPhase};

/// What one data connection has said so far.
pub(super) struct Connection {
    pub(super) generation: u32,
    /// No frame read yet: only the first may say the connection is the urgent one.
    first: bool,
    urgent: bool,
    /// The `Done` frames this connection sent; a recovery's connections start in the push,
    /// pre-copy's phase ended.
    dones: u32,
}

impl Connection {
    pub(super) fn new(generation: u32) -> Self {
        Self {
            generation,
            first: true,
            urgent: false,
            dones: u32::from(generation > 0),
        }
    }
}

impl Session {
    /// The receiver thread: accepts the source's connections (its data connections, and in
    /// hybrid mode one more, opened with an `Urgent` frame), each read by a thread of its own
    /// that installs frames until the end. With TLS on, a connection that fails the handshake is dropped and
    /// the wait goes on, so a stranger on the network cannot take the source's place or end
    /// the session.
    /// `generation` is 0 for the prepare's listener and a recovery's number for its own.
    pub(super) fn receive(self: Arc<Self>, listener: TcpListener, generation: u32) {
        let wanted = match self.mode {
            Mode::Precopy => self.connections,
            Mode::Hybrid => self.connections + 1,
        };
        // The source connects as soon as `prepare` answers.
        let deadline = Instant::now() + (2 * self.peer_timeout).min(STEP_TIMEOUT);
        let _ = listener.set_nonblocking(true);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let mut accepted = 0;
        while accepted < wanted {
            match listener.accept() {
                Ok((stream, peer)) => match tune_peer_socket(&stream, self.peer_timeout) {
                    Ok(()) => self.link.accept_into(stream, peer, ready_tx.clone()),
                    Err(e) => warn!("refused a data connection from {peer}: {}", error_chain(&e)),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.fail(DataError::Accept(e));
                    return;
                }
            }
            while accepted < wanted
                && let Ok((peer, secured)) = ready.try_recv()
            {
                match secured {
                    Ok(stream) => {
                        accepted += 1;
                        if !self.accepted(generation, accepted == 1) {
                            return;
                        }
                        if let Err(e) = self.read_connection(stream, generation) {
                            self.fail_in(generation, DataError::Reader(e));
                            return;
                        }
                    }
                    Err(e) => warn!("refused a data connection from {peer}: {}", error_chain(&e)),
                }
            }
            if accepted < wanted {
                if self.aborted.load(Ordering::Relaxed) || Instant::now() > deadline {
                    // Without its urgent connection a hybrid session refuses its commit.
                    if accepted == 0 {
                        self.fail_in(generation, DataError::NeverConnected);
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Later connections (strangers, or a second try) are refused from here on.
        drop(listener);
    }

    /// Whether a connection of `generation` just accepted is read: its generation is the
    /// session's, and the first of a listener moves the session on (`Connected`).
    pub(super) fn accepted(&self, generation: u32, first: bool) -> bool {
        self.current(generation) && (!first || self.advance(SessionEvent::Connected).is_ok())
    }

    /// Starts the thread that reads connection `stream`, of `generation`.
    pub(super) fn read_connection(
        self: &Arc<Self>,
        stream: DataStream,
        generation: u32,
    ) -> std::io::Result<()> {
        let clone = stream.try_clone()?;
        self.lock_streams().push(clone);
        let reader = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("migration-rx".into())
            .spawn(move || reader.install_from(stream, generation))?;
        self.threads().push(thread);
        Ok(())
    }

    pub(super) fn lock_streams(&self) -> MutexGuard<'_, Vec<DataStream>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs the frames of one connection, of `generation`, until it ends or a recovery
    /// replaces it. The urgent connection says so first; the destination's demands go out on
    /// it.
    pub(super) fn install_from(&self, stream: DataStream, generation: u32) {
        let mut answers = stream.try_clone();
        let mut reader = FrameReader::new(stream, self.memory.frames());
        let mut connection = Connection::new(generation);
        loop {
            if !self.reads(&connection) {
                return;
            }
            let result = match reader.next_frame() {
                Ok(Some(frame)) => self.take_frame(&mut connection, frame, &mut answers),
                Ok(None) => {
                    self.connection_ended(&connection);
                    return;
                }
                Err(e) => Err(DataError::Read(e)),
            };
            if let Err(e) = result {
                self.fail_in(generation, e);
                return;
            }
        }
    }

    /// Whether `connection` is still read: the session goes on, and no recovery replaced it.
    pub(super) fn reads(&self, connection: &Connection) -> bool {
        !self.aborted.load(Ordering::Relaxed) && self.current(connection.generation)
    }

    /// The end of `connection`'s stream. A data connection may end once it has ended its
    /// phase, while the others still send theirs; before that, the session fails.
    pub(super) fn connection_ended(&self, connection: &Connection) {
        if !self.all_sent() && connection.dones <= self.phases_done() {
            self.fail_in(connection.generation, DataError::ClosedEarly);
        }
    }

    /// One frame `connection` read; `answers` is the way back on it. An error ends the
    /// connection, and the caller fails the session with it.
    pub(super) fn take_frame(
        &self,
        connection: &mut Connection,
        frame: Frame<'_>,
        answers: &mut std::io::Result<DataStream>,
    ) -> Result<(), DataError> {
        let first = std::mem::replace(&mut connection.first, false);
        match frame {
            Frame::Pages(pages) => self.install(&pages),
            Frame::Done if connection.urgent => Err(DataError::UrgentDone),
            Frame::Done => {
                connection.dones += 1;
                self.pages_done(connection.dones, connection.generation)
            }
            Frame::Demand(_) => Err(DataError::UnexpectedDemand),
            Frame::Urgent if first && self.mode == Mode::Hybrid => match answers {
                Ok(answers) => answers
                    .try_clone()
                    .map_err(DataError::Reader)
                    .and_then(|clone| {
                        connection.urgent = true;
                        self.demand_on(connection.generation, clone)
                    }),
                Err(e) => Err(DataError::Reader(std::io::Error::new(
                    e.kind(),
                    e.to_string(),
                ))),
            },
            Frame::Urgent => Err(DataError::UnexpectedUrgent),
            Frame::Discard(pages) => self.drop_stale_copies(pages).and_then(|()| match answers {
                Ok(answer) => send_discarded(answer).map_err(DataError::Discarded),
                Err(e) => Err(DataError::Reader(std::io::Error::new(
                    e.kind(),
                    e.to_string(),
                ))),
            }),
            Frame::Discarded => Err(DataError::UnexpectedDiscarded),
        }
    }

    /// The urgent connection of `generation` arrived: demands go out on it from now on, and
    /// those that waited while post-copy was paused (or were lost with the connection before)
    /// go again, at once.
    pub(super) fn demand_on(
        &self,
        generation: u32,
        mut stream: DataStream,
    ) -> Result<(), DataError> {
        let mut demand_stream = self.lock_demand_stream();
        let pending: Vec<u64> = {
            let mut progress = self.lock();
            if progress.generation != generation {
                return Ok(());
            }
            progress.urgent = true;
            let mut pending: Vec<u64> = progress.demanded.keys().copied().collect();
            pending.sort_unstable();
            progress.rerequests += pending.len() as u64;
            pending
        };
        self.changed.notify_all();
        if let Some(&page) = pending.first() {
            send_demand(&mut stream, &pending)
                .map_err(|source| DataError::Demand { page, source })?;
        }
        *demand_stream = Some((generation, stream));
        Ok(())
    }

    /// A data connection's `Done` frame, its `dones`-th: the end of pre-copy, or in post-copy
    /// the end of the push, once every data connection has sent its own. One in a phase that
    /// expects none (a second before the commit, say) ends the session, as does a second on
    /// one connection before the others sent their first.
    pub(super) fn pages_done(&self, dones: u32, generation: u32) -> Result<(), DataError> {
        {
            let mut progress = self.lock();
            if progress.generation != generation {
                return Ok(());
            }
            if dones > progress.dones / self.connections + 1 {
                return Err(DataError::DoneTwice);
            }
            progress.dones += 1;
            if !progress.dones.is_multiple_of(self.connections) {
                return Ok(());
            }
        }
        self.advance(SessionEvent::PagesDone)
            .map(drop)
            .map_err(DataError::UnexpectedDone)
    }

    /// Phases every data connection has ended with its `Done`.
    pub(super) fn phases_done(&self) -> u32 {
        self.lock().dones / self.connections
    }

    /// Whether the source has sent everything it will send, so a closed connection is no
    /// failure.
    pub(super) fn all_sent(&self) -> bool {
        use SessionPhase as P;
        match (self.mode, self.phase()) {
            // Already over: nothing more to say.
            (_, P::Failed | P::Aborted) => true,
            // Paused: the connections that end now are the broken ones.
            (Mode::Hybrid, P::PostcopyPaused) => true,
            (
                Mode::Precopy,
                P::Received | P::Restoring { received: true } | P::Parked | P::Restored,
            ) => true,
            (Mode::Hybrid, P::Postcopy { pushed: true } | P::Finished) => true,
            _ => false,
        }
    }
}
