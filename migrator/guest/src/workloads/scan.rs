//! `scan`: a large read-only table scanned sequentially, plus a small hot write set.
//!
//! Arguments: `hot_pages` (default 64), `write_every` (table pages scanned per hot-page write,
//! default 16), `rate`. One operation is one table page scanned; a full sweep of the table is a
//! check, after which the hot set is verified too.

use super::{
    PAGE_WORDS, Runner, WorkloadError, load, pattern, split_versions, verify_page, write_page,
};
use crate::{Platform, args::Args, rng::SplitMix64};

/// Tags keep pages of different regions from passing for each other.
const TABLE_TAG: u64 = 1 << 40;
const HOT_TAG: u64 = 2 << 40;

pub fn run<'a, P: Platform>(
    args: &Args<'a>,
    mem: &mut [u64],
    seed: u64,
    runner: &mut Runner<'_, P>,
) -> Result<(), WorkloadError<'a>> {
    let hot_pages = args.u64("hot_pages", 64)? as usize;
    let write_every = args.u64("write_every", 16)?.max(1);
    let (versions, data) = split_versions(mem, hot_pages.max(1)).ok_or(WorkloadError::TooSmall)?;
    let pages = data.len() / PAGE_WORDS;
    if pages <= hot_pages + 1 {
        return Err(WorkloadError::TooSmall);
    }
    let (hot, table) = data.split_at_mut(hot_pages * PAGE_WORDS);
    let table_pages = pages - hot_pages;
    for p in 0..table_pages {
        for w in 0..PAGE_WORDS {
            super::store(
                table,
                p * PAGE_WORDS + w,
                pattern(TABLE_TAG | p as u64, 0, w),
            );
        }
    }
    for p in 0..hot_pages {
        write_page(hot, versions, p, HOT_TAG | p as u64, 1);
    }
    let mut rng = SplitMix64::new(seed);
    let mut page = 0;
    let mut sweep = 0usize;
    while !runner.should_stop() {
        // Read the whole page, as a scan would; verify two words that move with the sweep.
        let base = page * PAGE_WORDS;
        let mut sum = 0u64;
        for w in 0..PAGE_WORDS {
            sum = sum.wrapping_add(load(table, base + w));
        }
        core::hint::black_box(sum);
        let tag = TABLE_TAG | page as u64;
        let probe = (sweep * 7 + page) % PAGE_WORDS;
        if load(table, base) != pattern(tag, 0, 0)
            || load(table, base + probe) != pattern(tag, 0, probe)
        {
            runner.error(page as u64, probe as u64);
        }
        runner.op_done();
        if hot_pages > 0 && runner.progress().ops.is_multiple_of(write_every) {
            let p = rng.below(hot_pages as u64) as usize;
            let version = load(versions, p) + 1;
            write_page(hot, versions, p, HOT_TAG | p as u64, version);
        }
        page += 1;
        if page == table_pages {
            page = 0;
            sweep += 1;
            for p in 0..hot_pages {
                if let Err(word) = verify_page(hot, versions, p, HOT_TAG | p as u64, PAGE_WORDS) {
                    runner.error(p as u64, word as u64);
                }
            }
            runner.check_done();
        }
    }
    Ok(())
}
