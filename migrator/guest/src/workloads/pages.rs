//! What `hotspot` and `graded` share: the layout of a vCPU's share (a version table, then data
//! pages, each reached through its popularity rank, scattered or not) and the page format.
//!
//! A page holds its tag and index (word 0), its version (word 1), `STAMPED` words derived from
//! both, and a body derived from the index alone, written once. A write bumps the version and
//! restamps the header words only: enough to dirty the page, cheap enough to dirty many. A full
//! check reads every word, so a zeroed, misplaced, stale or torn page shows.

use super::{PAGE_WORDS, Runner, WorkloadError, load, pattern, store};
use crate::{
    Platform,
    perm::Permutation,
    rng::{SplitMix64, mix},
};

/// Words after the header that each write restamps.
const STAMPED: usize = 8;
/// Keeps the placement independent of the operation stream, which the same seed also drives.
const PLACEMENT_SALT: u64 = 0x5ca7_7e12;

/// A vCPU's share: `table_pages` of versions (one per data page), then `pages` data pages.
/// Popularity rank `r` lives at data page `place(r)`: `r` itself, or scattered.
#[derive(Clone, Debug)]
pub struct Layout {
    table_pages: usize,
    pages: usize,
    scatter: Option<Permutation>,
}

impl Layout {
    /// The layout of a share of `words` u64 words; the scatter depends on the user's `seed`
    /// only (not the vCPU), so every share of a partition is laid out alike.
    pub fn new<'a>(words: usize, scatter: bool, seed: u64) -> Result<Self, WorkloadError<'a>> {
        let total = words / PAGE_WORDS;
        let table_pages = total.div_ceil(PAGE_WORDS);
        if table_pages >= total {
            return Err(WorkloadError::TooSmall);
        }
        let pages = total - table_pages;
        let scatter = scatter.then(|| Permutation::new(pages as u64, mix(seed ^ PLACEMENT_SALT)));
        Ok(Self {
            table_pages,
            pages,
            scatter,
        })
    }

    /// Data pages.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Pages of the whole share, table included.
    pub fn share_pages(&self) -> usize {
        self.table_pages + self.pages
    }

    /// The share pages that hold data pages.
    pub fn data_pages(&self) -> core::ops::Range<usize> {
        self.table_pages..self.share_pages()
    }

    /// Splits a share into the version table and the data pages.
    pub fn split<'m>(&self, mem: &'m mut [u64]) -> (&'m mut [u64], &'m mut [u64]) {
        mem.split_at_mut(self.table_pages * PAGE_WORDS)
    }

    /// The data page of popularity rank `rank`.
    #[inline]
    pub fn place(&self, rank: usize) -> usize {
        match &self.scatter {
            Some(perm) => perm.apply(rank as u64) as usize,
            None => rank,
        }
    }

    /// The popularity rank of data page `page`.
    pub fn rank(&self, page: usize) -> usize {
        match &self.scatter {
            Some(perm) => perm.invert(page as u64) as usize,
            None => page,
        }
    }

    /// How often page `share_page` of the share is touched per operation, given how often
    /// each rank is: a data page as often as its rank, a table page as often as all the data
    /// pages whose versions it holds (each operation reads or bumps the version).
    pub fn weight(&self, share_page: usize, rank_weight: impl Fn(usize) -> f64) -> f64 {
        if share_page < self.table_pages {
            let first = share_page * PAGE_WORDS;
            let last = (first + PAGE_WORDS).min(self.pages);
            (first..last).map(|p| rank_weight(self.rank(p))).sum()
        } else if share_page < self.share_pages() {
            rank_weight(self.rank(share_page - self.table_pages))
        } else {
            0.0
        }
    }
}

/// Writes page `page` whole, at version 1.
pub fn init(data: &mut [u64], versions: &mut [u64], page: usize, tag: u64) {
    let base = page * PAGE_WORDS;
    let id = tag | page as u64;
    for w in 2 + STAMPED..PAGE_WORDS {
        store(data, base + w, pattern(id, 0, w));
    }
    stamp(data, versions, page, tag, 1);
}

/// Writes the header of page `page` at `version` and records the version.
#[inline]
pub fn stamp(data: &mut [u64], versions: &mut [u64], page: usize, tag: u64, version: u64) {
    let base = page * PAGE_WORDS;
    let id = tag | page as u64;
    store(data, base, id);
    store(data, base + 1, version);
    for w in 2..2 + STAMPED {
        store(data, base + w, pattern(id, version, w));
    }
    store(versions, page, version);
}

/// Checks page `page` against its recorded version: the header only, or (`full`) every word.
/// Returns the first mismatching word's index.
pub fn check(
    data: &[u64],
    versions: &[u64],
    page: usize,
    tag: u64,
    full: bool,
) -> Result<(), usize> {
    let base = page * PAGE_WORDS;
    let id = tag | page as u64;
    let version = load(versions, page);
    if load(data, base) != id {
        return Err(0);
    }
    if load(data, base + 1) != version {
        return Err(1);
    }
    let end = if full { PAGE_WORDS } else { 2 + STAMPED };
    for w in 2..end {
        let expected = pattern(id, if w < 2 + STAMPED { version } else { 0 }, w);
        if load(data, base + w) != expected {
            return Err(w);
        }
    }
    Ok(())
}

/// The full self-check: every word of every data page; a bad page counts once.
pub fn check_all<P: Platform>(
    runner: &mut Runner<'_, P>,
    data: &[u64],
    versions: &[u64],
    pages: usize,
    tag: u64,
) {
    for p in 0..pages {
        if let Err(word) = check(data, versions, p, tag, true) {
            runner.error(p as u64, word as u64);
        }
    }
    runner.check_done();
}

/// One operation of a page workload: the popularity rank it touches, and whether it writes
/// (a read checks that one page).
pub struct Op {
    pub rank: usize,
    pub write: bool,
}

/// Runs a page workload until the platform says stop: lays out and initialises every page of
/// `mem`, then does the operations `next` draws, with a full check every `check_every`.
pub fn drive<P: Platform>(
    layout: &Layout,
    mem: &mut [u64],
    tag: u64,
    seed: u64,
    check_every: u64,
    runner: &mut Runner<'_, P>,
    mut next: impl FnMut(&mut SplitMix64) -> Op,
) {
    let (versions, data) = layout.split(mem);
    let pages = layout.pages();
    for p in 0..pages {
        init(data, versions, p, tag);
    }
    let mut rng = SplitMix64::new(seed);
    let mut since_check = 0;
    while !runner.should_stop() {
        let op = next(&mut rng);
        let p = layout.place(op.rank);
        if op.write {
            stamp(data, versions, p, tag, load(versions, p) + 1);
        } else if let Err(word) = check(data, versions, p, tag, false) {
            runner.error(p as u64, word as u64);
        }
        runner.op_done();
        since_check += 1;
        if since_check >= check_every {
            since_check = 0;
            check_all(runner, data, versions, pages, tag);
        }
    }
}
