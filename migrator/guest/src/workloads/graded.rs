//! `graded`: page popularity falling as a power law of the page's rank, rank 0 at the start of
//! the data pages (or scattered): no clear hot/cold line, so a heat order is only as good as
//! its ranking.
//!
//! Arguments: `alpha` (the exponent: rank r is chosen with probability proportional to
//! 1 / (r + 1)^alpha; in [0, 1), 0 is uniform; default 0.99), `write` (fraction of operations
//! that write, default 0.2), `scatter` (`1`: ranks are placed by a keyed permutation instead of
//! in address order; default 0), `check_every` (operations between full checks, default: as
//! many as data pages), `rate`, `seed` (also picks the scatter).
//!
//! Ranks come from the Zipf sampler (Gray et al.'s method, as YCSB's), which needs alpha
//! below 1. A read checks the page's header against the version table; a write bumps it; a full
//! check reads every word of every page.

use super::{
    Runner, WorkloadError,
    pages::{self, Layout, Op},
};
use crate::{Platform, args::Args, zipf::Zipf};

const TAG: u64 = 6 << 40;
const KEYS: [&str; 6] = ["alpha", "write", "scatter", "check_every", "rate", "seed"];

/// The parsed arguments over a share of a given size.
#[derive(Clone, Debug)]
pub struct Graded {
    layout: Layout,
    zipf: Zipf,
    write: f64,
    check_every: u64,
}

impl Graded {
    pub fn parse<'a>(args: &Args<'a>, words: usize) -> Result<Self, WorkloadError<'a>> {
        if let Some(key) = args.unknown_key(&KEYS) {
            return Err(WorkloadError::UnknownArg(key));
        }
        let alpha = args.float("alpha", 0.99)?;
        if alpha >= 1.0 {
            return Err(WorkloadError::BadArg("alpha"));
        }
        let write = args.fraction("write", 0.2)?;
        let scatter = args.flag("scatter", false)?;
        let layout = Layout::new(words, scatter, args.u64("seed", 1)?)?;
        let pages = layout.pages();
        let check_every = args.u64("check_every", pages as u64)?.max(1);
        Ok(Self {
            zipf: Zipf::new(pages as u64, alpha),
            layout,
            write,
            check_every,
        })
    }

    /// Touches per operation of page `share_page` of the share (see [`Layout::weight`]).
    pub fn weight(&self, share_page: usize) -> f64 {
        self.layout
            .weight(share_page, |rank| self.zipf.probability(rank as u64))
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
    let spec = Graded::parse(args, mem.len())?;
    pages::drive(
        &spec.layout,
        mem,
        TAG,
        seed,
        spec.check_every,
        runner,
        |rng| Op {
            rank: spec.zipf.next(rng) as usize,
            write: rng.unit() < spec.write,
        },
    );
    Ok(())
}
