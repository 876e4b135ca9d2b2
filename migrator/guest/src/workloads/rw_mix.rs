//! `rw-mix`: a hot read-only region, a hot written region and a cold remainder, so a migration
//! plan has both orders to get right.
//!
//! Arguments: `hot_ro` and `hot_rw` (pages; defaults 1/16 and 1/32 of memory), `write`
//! (fraction of operations that write, default 0.2), `check_every` (default: every page once),
//! `rate`. Reads check the page they read; a full check walks every page.

use super::{PAGE_WORDS, Runner, WorkloadError, load, split_versions, verify_page, write_page};
use crate::{Platform, args::Args, rng::SplitMix64};

const TAG: u64 = 3 << 40;

pub fn run<'a, P: Platform>(
    args: &Args<'a>,
    mem: &mut [u64],
    seed: u64,
    runner: &mut Runner<'_, P>,
) -> Result<(), WorkloadError<'a>> {
    let total = mem.len() / PAGE_WORDS;
    // One version per page of the data area; the table takes total/512 pages.
    let (versions, data) = split_versions(mem, total).ok_or(WorkloadError::TooSmall)?;
    let pages = data.len() / PAGE_WORDS;
    let hot_ro = args.u64("hot_ro", (pages / 16).max(1) as u64)? as usize;
    let hot_rw = args.u64("hot_rw", (pages / 32).max(1) as u64)? as usize;
    if hot_ro + hot_rw >= pages || hot_ro == 0 || hot_rw == 0 {
        return Err(WorkloadError::TooSmall);
    }
    let write = args.fraction("write", 0.2)?;
    let check_every = args.u64("check_every", pages as u64)?.max(1);
    // Pages [0, hot_ro) are read-hot, [hot_ro, hot_ro + hot_rw) write-hot, the rest cold.
    for p in 0..pages {
        write_page(data, versions, p, TAG | p as u64, 1);
    }
    let mut rng = SplitMix64::new(seed);
    let mut since_check = 0;
    while !runner.should_stop() {
        if rng.unit() < write {
            let p = hot_ro + rng.below(hot_rw as u64) as usize;
            let version = load(versions, p) + 1;
            write_page(data, versions, p, TAG | p as u64, version);
        } else {
            let p = rng.below(hot_ro as u64) as usize;
            if let Err(word) = verify_page(data, versions, p, TAG | p as u64, 8) {
                runner.error(p as u64, word as u64);
            }
        }
        runner.op_done();
        since_check += 1;
        if since_check >= check_every {
            since_check = 0;
            for p in 0..pages {
                if let Err(word) = verify_page(data, versions, p, TAG | p as u64, 8) {
                    runner.error(p as u64, word as u64);
                }
            }
            runner.check_done();
        }
    }
    Ok(())
}
