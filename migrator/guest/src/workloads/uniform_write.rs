//! `uniform-write`: dirties pages uniformly at random as fast as it can (or at `rate`), the case
//! where pre-copy never converges.
//!
//! Arguments: `check_every` (default: as many operations as pages), `rate`. Each write stamps
//! the page with its index, a new version and a few pattern words; a full check walks every page.

use super::{PAGE_WORDS, Runner, WorkloadError, load, pattern, rewrite_at_random, store};
use crate::{Platform, args::Args};

const TAG: u64 = 4 << 40;
/// Pattern words stamped per write besides the header: enough to make the write real,
/// few enough to dirty pages fast.
const STAMPED: usize = 8;

fn stamp(data: &mut [u64], versions: &mut [u64], page: usize, version: u64) {
    let base = page * PAGE_WORDS;
    let tag = TAG | page as u64;
    store(data, base, tag);
    store(data, base + 1, version);
    for w in 2..2 + STAMPED {
        store(data, base + w, pattern(tag, version, w));
    }
    store(versions, page, version);
}

pub fn run<'a, P: Platform>(
    args: &Args<'a>,
    mem: &mut [u64],
    seed: u64,
    runner: &mut Runner<'_, P>,
) -> Result<(), WorkloadError<'a>> {
    rewrite_at_random(args, mem, seed, runner, stamp, check_stamp)
}

/// Checks a page's header and its stamped words (the rest of the page is not written).
fn check_stamp(data: &[u64], versions: &[u64], page: usize) -> Result<(), usize> {
    let base = page * PAGE_WORDS;
    let version = load(versions, page);
    if load(data, base) != TAG | page as u64 {
        return Err(0);
    }
    if load(data, base + 1) != version {
        return Err(1);
    }
    for w in 2..2 + STAMPED {
        if load(data, base + w) != pattern(TAG | page as u64, version, w) {
            return Err(w);
        }
    }
    Ok(())
}
