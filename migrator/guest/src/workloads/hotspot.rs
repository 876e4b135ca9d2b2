//! `hotspot`: a flat hot region that takes most of the writes, uniform writes over all pages for
//! the rest: the classic hot/cold split, which pre-copy migrates well only if it sends the hot
//! region last.
//!
//! Arguments: `hot` (the hot region's share of the data pages, as `1/64` or `0.015625`; at
//! least one page; default `1/64`), `hot_share` (fraction of writes that go to the hot region,
//! default 0.95), `scatter` (`1`: the hot pages are scattered over the share by a keyed
//! permutation instead of sitting at its start; default 0), `move_every` (operations after
//! which the hot region moves on to the next ranks, as far as its own size, wrapping round;
//! default 0, never: a hot set that moves), `check_every` (writes between full checks,
//! default: as many as data pages), `rate`, `seed` (also picks the scatter).
//!
//! Every operation is a write; a full check reads every word of every page.

use super::{
    Runner, WorkloadError,
    pages::{self, Layout, Op},
};
use crate::{Platform, args::Args};

const TAG: u64 = 5 << 40;
const KEYS: [&str; 7] = [
    "hot",
    "hot_share",
    "scatter",
    "move_every",
    "check_every",
    "rate",
    "seed",
];

/// The parsed arguments over a share of a given size.
#[derive(Clone, Debug)]
pub struct Hotspot {
    layout: Layout,
    /// Pages in the hot region: ranks `0..hot`.
    hot: usize,
    hot_share: f64,
    check_every: u64,
    /// Operations between two moves of the hot region; 0: it never moves.
    move_every: u64,
    /// Moves made so far, for the popularity model ([`Self::after_ops`]).
    moves: u64,
}

impl Hotspot {
    pub fn parse<'a>(args: &Args<'a>, words: usize) -> Result<Self, WorkloadError<'a>> {
        if let Some(key) = args.unknown_key(&KEYS) {
            return Err(WorkloadError::UnknownArg(key));
        }
        let hot = args.fraction("hot", 1.0 / 64.0)?;
        if hot == 0.0 {
            return Err(WorkloadError::BadArg("hot"));
        }
        let hot_share = args.fraction("hot_share", 0.95)?;
        let scatter = args.flag("scatter", false)?;
        let layout = Layout::new(words, scatter, args.u64("seed", 1)?)?;
        let pages = layout.pages();
        let hot = ((hot * pages as f64) as usize).clamp(1, pages);
        let check_every = args.u64("check_every", pages as u64)?.max(1);
        let move_every = args.u64("move_every", 0)?;
        Ok(Self {
            layout,
            hot,
            hot_share,
            check_every,
            move_every,
            moves: 0,
        })
    }

    /// The same popularity once the guest has made `ops` operations: its hot region where
    /// they moved it.
    pub fn after_ops(self, ops: u64) -> Self {
        Self {
            moves: ops.checked_div(self.move_every).unwrap_or(0),
            ..self
        }
    }

    /// The first rank of the hot region after `moves` moves.
    fn hot_start(&self, moves: u64) -> usize {
        let pages = self.layout.pages() as u64;
        (moves.wrapping_mul(self.hot as u64) % pages.max(1)) as usize
    }

    /// Writes per operation to page `share_page` of the share (see [`Layout::weight`]).
    pub fn weight(&self, share_page: usize) -> f64 {
        let (hot, pages) = (self.hot as f64, self.layout.pages() as f64);
        let background = (1.0 - self.hot_share) / pages;
        let start = self.hot_start(self.moves);
        let total = self.layout.pages();
        self.layout.weight(share_page, |rank| {
            if (rank + total - start) % total.max(1) < self.hot {
                self.hot_share / hot + background
            } else {
                background
            }
        })
    }

    pub fn share_pages(&self) -> usize {
        self.layout.share_pages()
    }

    pub fn data_pages(&self) -> core::ops::Range<usize> {
        self.layout.data_pages()
    }
}

pub fn run<'a, P: Platform>(
    args: &Args<'a>,
    mem: &mut [u64],
    seed: u64,
    runner: &mut Runner<'_, P>,
) -> Result<(), WorkloadError<'a>> {
    let spec = Hotspot::parse(args, mem.len())?;
    let pages = spec.layout.pages() as u64;
    let mut done = 0u64;
    pages::drive(
        &spec.layout,
        mem,
        TAG,
        seed,
        spec.check_every,
        runner,
        |rng| {
            let moves = done.checked_div(spec.move_every).unwrap_or(0);
            done += 1;
            let rank = if rng.unit() < spec.hot_share {
                (spec.hot_start(moves) as u64 + rng.below(spec.hot as u64)) % pages
            } else {
                rng.below(pages)
            };
            Op {
                rank: rank as usize,
                write: true,
            }
        },
    );
    Ok(())
}
