//! Where a drain sends each partition, and at what bandwidth: pure bookkeeping, decided
//! before anything is asked of a daemon.

use std::net::SocketAddr;

/// The destinations and the guest memory each may still take, as their handshakes said at
/// the start, less what this drain has sent their way since.
#[derive(Clone, Debug)]
pub(crate) struct Ledger {
    free: Vec<(SocketAddr, u64)>,
}

impl Ledger {
    pub(crate) fn new(free: Vec<(SocketAddr, u64)>) -> Self {
        Self { free }
    }

    /// The destination with the most memory free that has room for `memory` bytes (the first
    /// given, among equals), or `None` if none has.
    pub(crate) fn choose(&self, memory: u64) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, &(_, free)) in self.free.iter().enumerate() {
            if free >= memory && best.is_none_or(|b| free > self.free[b].1) {
                best = Some(i);
            }
        }
        best
    }

    pub(crate) fn addr(&self, destination: usize) -> SocketAddr {
        self.free[destination].0
    }

    /// The most memory free on any destination.
    pub(crate) fn most_free(&self) -> u64 {
        self.free.iter().map(|&(_, free)| free).max().unwrap_or(0)
    }

    /// `memory` bytes are on their way to `destination`.
    pub(crate) fn take(&mut self, destination: usize, memory: u64) {
        let free = &mut self.free[destination].1;
        *free = free.saturating_sub(memory);
    }

    /// A migration to `destination` did not complete: its memory is free there again.
    pub(crate) fn give_back(&mut self, destination: usize, memory: u64) {
        let free = &mut self.free[destination].1;
        *free = free.saturating_add(memory);
    }
}

/// Each running migration's share of a total bandwidth, in bytes per second: an equal part
/// for each of `running` (at least one byte per second: 0 would lift the limit).
pub(crate) fn share(total: u64, running: usize) -> u64 {
    (total / running.max(1) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn partitions_spread_over_the_destinations_by_free_memory() {
        let mut ledger = Ledger::new(vec![(addr(1), 200 * MIB), (addr(2), 256 * MIB)]);
        let mut to = Vec::new();
        for _ in 0..4 {
            let d = ledger.choose(64 * MIB).expect("room");
            ledger.take(d, 64 * MIB);
            to.push(ledger.addr(d).port());
        }
        // 256 and 200 free: 2 (192 left), 1 (200 beats 192; 136 left), 2 (128 left), 1.
        assert_eq!(to, [2, 1, 2, 1]);
        assert_eq!(ledger.most_free(), 128 * MIB);
        assert_eq!(ledger.choose(129 * MIB), None);
        ledger.give_back(0, 64 * MIB);
        assert_eq!(ledger.choose(129 * MIB), Some(0));
    }

    #[test]
    fn equals_go_to_the_first_and_nothing_fits_nowhere() {
        let ledger = Ledger::new(vec![(addr(1), MIB), (addr(2), MIB)]);
        assert_eq!(ledger.choose(MIB), Some(0));
        assert_eq!(ledger.choose(MIB + 1), None);
        assert_eq!(Ledger::new(Vec::new()).choose(0), None);
    }

    #[test]
    fn the_total_is_split_evenly_and_never_lifted() {
        assert_eq!(share(100, 1), 100);
        assert_eq!(share(100, 3), 33);
        assert_eq!(share(1, 4), 1);
        assert_eq!(share(100, 0), 100);
    }
}
