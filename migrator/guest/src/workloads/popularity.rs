//! The heat a workload's arguments intend, page by page, computed without running it: the
//! ground truth a heat profiler's ranking is measured against.
//!
//! Pages are numbered within one vCPU's share of memory (see [`super::vcpu_share`]): page `p`
//! of vCPU `i`'s share is guest frame `vcpu_share(..).start / 4096 + p`. Every share of a
//! partition has the same popularity (the placement depends on the user's `seed`, not the
//! vCPU). The weights are expectations of the random operations only; the periodic full check
//! reads every page alike and changes no ranking.

use super::{WorkloadError, graded::Graded, hotspot::Hotspot, kv_zipf::KvZipf, words_of_share};
use crate::args::Args;

/// Why a popularity could not be given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PopularityError<'a> {
    /// The arguments would not start the workload either.
    Workload(WorkloadError<'a>),
    /// A built-in workload whose popularity is not modelled here.
    NotModelled(&'a str),
}

impl<'a> From<WorkloadError<'a>> for PopularityError<'a> {
    fn from(e: WorkloadError<'a>) -> Self {
        Self::Workload(e)
    }
}

/// The intended page popularity of `hotspot`, `graded` or `kv-zipf` on one share.
#[derive(Clone, Debug)]
pub struct Popularity {
    model: Model,
}

#[derive(Clone, Debug)]
enum Model {
    Hotspot(Hotspot),
    Graded(Graded),
    KvZipf(KvZipf),
}

/// The popularity of the share's pages for boot args `args` (`NAME key=value ...`, what the
/// guest sees: `PartitionConfig::boot_args`) on a share of `share_bytes` bytes. Refuses what
/// the workload itself would refuse, with the same error.
pub fn popularity(args: &str, share_bytes: u64) -> Result<Popularity, PopularityError<'_>> {
    let args = Args::new(args);
    let name = args.name().ok_or(WorkloadError::NoName)?;
    let words = words_of_share(share_bytes);
    let model = match name {
        "hotspot" => Model::Hotspot(Hotspot::parse(&args, words)?),
        "graded" => Model::Graded(Graded::parse(&args, words)?),
        "kv-zipf" => Model::KvZipf(KvZipf::parse(&args, words)?),
        other if super::NAMES.contains(&other) => return Err(PopularityError::NotModelled(other)),
        other => return Err(WorkloadError::Unknown(other).into()),
    };
    Ok(Popularity { model })
}

impl Popularity {
    /// Pages in the share (version tables included; pages past the data weigh 0).
    pub fn pages(&self) -> usize {
        match &self.model {
            Model::Hotspot(m) => m.share_pages(),
            Model::Graded(m) => m.share_pages(),
            Model::KvZipf(m) => m.share_pages(),
        }
    }

    /// Expected touches of page `page` per operation. A data page's weight is the chance an
    /// operation picks it; a version-table page's is the sum over the pages or keys whose
    /// versions it holds, so table pages are the hottest of all, as a profiler will see them.
    /// Over the data pages the weights sum to 1 (more for `kv-zipf` values that straddle
    /// pages), over the table pages to 1.
    pub fn weight(&self, page: usize) -> f64 {
        match &self.model {
            Model::Hotspot(m) => m.weight(page),
            Model::Graded(m) => m.weight(page),
            Model::KvZipf(m) => m.weight(page),
        }
    }

    /// The same popularity once the guest has made `ops` operations on the share: a
    /// `hotspot` with `move_every` has moved its hot region since; the others do not move.
    pub fn after_ops(self, ops: u64) -> Self {
        match self.model {
            Model::Hotspot(m) => Self {
                model: Model::Hotspot(m.after_ops(ops)),
            },
            other => Self { model: other },
        }
    }

    /// The share's pages that hold data (values or data pages), the rest being version
    /// tables before them and unused pages after: a benchmark that wants the hot data alone
    /// (`hotspot`'s hot region: the first `hot` data pages of the ranking) filters by it.
    pub fn data_pages(&self) -> core::ops::Range<usize> {
        match &self.model {
            Model::Hotspot(m) => m.data_pages(),
            Model::Graded(m) => m.data_pages(),
            Model::KvZipf(m) => m.data_pages(),
        }
    }

    /// Every page of the share, hottest first (equal weights in address order): the "truly
    /// hot" set of size k is the first k.
    #[cfg(not(target_os = "none"))]
    pub fn ranking(&self) -> alloc::vec::Vec<usize> {
        let weights: alloc::vec::Vec<f64> = (0..self.pages()).map(|p| self.weight(p)).collect();
        let mut pages: alloc::vec::Vec<usize> = (0..self.pages()).collect();
        pages.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
        pages
    }
}
