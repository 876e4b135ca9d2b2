//! The data connections of one migration (`--connections N`): pages striped across them, each
//! connection with a sender thread of its own, as QEMU's multifd channels and Cloud
//! Hypervisor's connections are.
//!
//! A page always travels on the same connection, chosen by its index, so every copy of it
//! arrives in the order it was sent and a later round's copy never lands under an earlier
//! one. Pages go by runs of [`STRIPE_PAGES`] neighbours, so the receiver still writes runs.
//! A batch is split among the connections in plan order and sent at once on all of them:
//! within a connection the plan's order is kept, and across connections it holds to within
//! a batch.

use std::io;

use super::MigrationError;
use crate::{
    migration::{
        compress::Compress,
        link::{DataStream, LinkError, set_send_buffer},
        transport::{PageSender, SendCounts, TransportError},
    },
    vmm::GuestMemory,
};

/// Neighbouring pages that go on one connection: 256 KiB, so a stripe is a run the receiver
/// writes with one call.
pub const STRIPE_PAGES: u64 = 64;

/// The connection `page` travels on, of `connections`.
pub fn stripe_of(page: u64, connections: usize) -> usize {
    ((page / STRIPE_PAGES) % connections.max(1) as u64) as usize
}

/// The data connections of a migration, one sender each.
pub(super) struct Stripes {
    senders: Vec<PageSender<DataStream>>,
}

impl Stripes {
    /// Pages over `streams` (at least one), paced together to `bytes_per_sec`.
    pub(super) fn new(streams: Vec<DataStream>, bytes_per_sec: Option<u64>) -> Self {
        let share = share(bytes_per_sec, streams.len());
        Self {
            senders: streams
                .into_iter()
                .map(|stream| PageSender::new(stream, share))
                .collect(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.senders.len()
    }

    /// Sends `pages` of `memory`, each on its connection, and pushes onto `hashes` the xxh3
    /// of each page as sent, in the order of `pages`.
    pub(super) fn send_pages(
        &mut self,
        memory: &GuestMemory,
        pages: &[u64],
        hashes: &mut Vec<u64>,
    ) -> Result<SendCounts, TransportError> {
        let lanes = self.senders.len();
        if let [sender] = self.senders.as_mut_slice() {
            return sender.send_pages(memory, pages, hashes);
        }
        let mut split: Vec<Vec<u64>> = vec![Vec::with_capacity(pages.len() / lanes + 1); lanes];
        for &page in pages {
            split[stripe_of(page, lanes)].push(page);
        }
        let results: Vec<Result<(SendCounts, Vec<u64>), TransportError>> =
            std::thread::scope(|scope| {
                let running: Vec<_> = self
                    .senders
                    .iter_mut()
                    .zip(&split)
                    .filter(|(_, pages)| !pages.is_empty())
                    .map(|(sender, pages)| {
                        scope.spawn(move || {
                            let mut hashes = Vec::with_capacity(pages.len());
                            sender
                                .send_pages(memory, pages, &mut hashes)
                                .map(|counts| (counts, hashes))
                        })
                    })
                    .collect();
                running
                    .into_iter()
                    .map(|thread| {
                        thread.join().unwrap_or_else(|_| {
                            Err(TransportError::Io(io::Error::other(
                                "a data connection's sender panicked",
                            )))
                        })
                    })
                    .collect()
            });
        let mut counts = SendCounts::default();
        let mut lane_hashes: Vec<std::vec::IntoIter<u64>> = Vec::with_capacity(lanes);
        let mut results = results.into_iter();
        for pages in &split {
            if pages.is_empty() {
                lane_hashes.push(Vec::new().into_iter());
                continue;
            }
            let (sent, hashes) = results
                .next()
                .ok_or_else(|| io::Error::other("a data connection's sender did not answer"))??;
            counts += sent;
            lane_hashes.push(hashes.into_iter());
        }
        for &page in pages {
            let hash = lane_hashes[stripe_of(page, lanes)]
                .next()
                .ok_or_else(|| io::Error::other("a data connection hashed fewer pages"))?;
            hashes.push(hash);
        }
        Ok(counts)
    }

    /// Tells the destination, on every connection, that every page of this phase is sent.
    pub(super) fn send_done(&mut self) -> Result<(), TransportError> {
        self.senders.iter_mut().try_for_each(PageSender::send_done)
    }

    /// Sends `Discard` frames for `pages`, each on its page's connection; returns the frames
    /// sent on each connection, whose answers come back on it.
    pub(super) fn send_discard(&mut self, pages: &[u64]) -> Result<Vec<usize>, TransportError> {
        let lanes = self.senders.len();
        let mut split: Vec<Vec<u64>> = vec![Vec::new(); lanes];
        for &page in pages {
            split[stripe_of(page, lanes)].push(page);
        }
        self.senders
            .iter_mut()
            .zip(&split)
            .map(|(sender, pages)| {
                if pages.is_empty() {
                    Ok(0)
                } else {
                    sender.send_discard(pages)
                }
            })
            .collect()
    }

    /// Compresses every connection's frames with `compress`, each deciding for itself.
    pub(super) fn set_compression(&mut self, compress: Compress) -> Result<(), TransportError> {
        self.senders
            .iter_mut()
            .try_for_each(|sender| sender.set_compression(compress))
    }

    /// Paces from now on at `bytes_per_sec` in all (`None`: not at all).
    pub(super) fn set_rate(&mut self, bytes_per_sec: Option<u64>) {
        let share = share(bytes_per_sec, self.senders.len());
        for sender in &mut self.senders {
            sender.set_rate(share);
        }
    }

    /// Bytes written on any connection that the peer has not yet acknowledged.
    pub(super) fn unsent_bytes(&self) -> io::Result<u64> {
        self.senders
            .iter()
            .map(|sender| sender.stream().unsent_bytes())
            .sum()
    }

    /// Caps every connection's send buffer at `bytes`.
    pub(super) fn set_send_buffer(&self, bytes: usize) -> Result<(), LinkError> {
        for sender in &self.senders {
            set_send_buffer(sender.stream(), bytes)?;
        }
        Ok(())
    }

    /// Clones of every connection, in stripe order, to read the destination's answers on.
    pub(super) fn clone_streams(&self) -> Result<Vec<DataStream>, MigrationError> {
        self.senders
            .iter()
            .map(|sender| {
                sender
                    .stream()
                    .try_clone()
                    .map_err(|e| MigrationError::Connect(LinkError::Socket(e)))
            })
            .collect()
    }
}

/// Each of `lanes` connections' part of a rate.
fn share(bytes_per_sec: Option<u64>, lanes: usize) -> Option<u64> {
    bytes_per_sec.map(|rate| (rate / lanes.max(1) as u64).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_always_takes_the_same_connection_and_neighbours_go_together() {
        for lanes in 1..=4 {
            for page in 0..1024 {
                let lane = stripe_of(page, lanes);
                assert!(lane < lanes);
                assert_eq!(lane, stripe_of(page, lanes), "stable");
                assert_eq!(lane, stripe_of(page / STRIPE_PAGES * STRIPE_PAGES, lanes));
            }
        }
        // Every connection gets a share.
        let used: std::collections::HashSet<usize> =
            (0..1024).map(|page| stripe_of(page, 4)).collect();
        assert_eq!(used.len(), 4);
        assert_eq!(stripe_of(5, 0), 0, "no connections reads as one");
    }

    #[test]
    fn every_copy_of_a_page_goes_on_its_stripe_and_the_hashes_come_back_in_order() {
        use std::net::{TcpListener, TcpStream};

        use xxhash_rust::xxh3::xxh3_64;

        use crate::{
            migration::transport::{Frame, FrameReader},
            vmm::{GuestAddress, memory::PAGE_SIZE},
        };

        let frames = 600;
        let memory = GuestMemory::new(frames * PAGE_SIZE).unwrap();
        for page in (0..frames).step_by(2) {
            memory
                .write(GuestAddress(page * PAGE_SIZE), &(page + 1).to_le_bytes())
                .unwrap();
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            ours.push(DataStream::Tcp(TcpStream::connect(addr).unwrap()));
            theirs.push(listener.accept().unwrap().0);
        }
        let readers: Vec<_> = theirs
            .into_iter()
            .map(|stream| {
                std::thread::spawn(move || {
                    let mut reader = FrameReader::new(stream, frames);
                    let mut pages = Vec::new();
                    while let Some(frame) = reader.next_frame().unwrap() {
                        match frame {
                            Frame::Pages(got) => pages.extend(got.iter().map(|(page, _)| *page)),
                            Frame::Done => break,
                            _ => panic!("only pages and their end were sent"),
                        }
                    }
                    pages
                })
            })
            .collect();
        let mut stripes = Stripes::new(ours, None);
        // Two rounds in different orders: a page's second copy must follow its first.
        let first: Vec<u64> = (0..frames).collect();
        let second: Vec<u64> = (0..frames).rev().step_by(3).collect();
        for order in [&first, &second] {
            let mut hashes = Vec::new();
            let counts = stripes.send_pages(&memory, order, &mut hashes).unwrap();
            assert_eq!(counts.pages, order.len() as u64);
            let mut page = [0u8; PAGE_SIZE as usize];
            for (&frame, &hash) in order.iter().zip(&hashes) {
                memory.copy_frame(frame, &mut page).unwrap();
                assert_eq!(hash, xxh3_64(&page), "page {frame}'s hash in its place");
            }
            assert_eq!(hashes.len(), order.len());
        }
        stripes.send_done().unwrap();
        for (lane, reader) in readers.into_iter().enumerate() {
            let got = reader.join().unwrap();
            assert!(
                got.iter().all(|&page| stripe_of(page, 3) == lane),
                "lane {lane}"
            );
            let want: Vec<u64> = first
                .iter()
                .chain(&second)
                .copied()
                .filter(|&page| stripe_of(page, 3) == lane)
                .collect();
            assert_eq!(got, want, "lane {lane} keeps the plan's order");
        }
    }

    #[test]
    fn a_rate_is_shared_among_the_connections() {
        assert_eq!(share(Some(1000), 4), Some(250));
        assert_eq!(
            share(Some(3), 4),
            Some(1),
            "never zero, which would mean unpaced"
        );
        assert_eq!(share(None, 4), None);
    }
}
