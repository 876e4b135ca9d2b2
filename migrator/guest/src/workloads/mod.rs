//! The built-in workloads. Each keeps its data self-verifying: every value or page carries
//! what it should contain (its key or index, and a version recorded in a separate table), so a
//! lost, zeroed, misplaced or stale page after a migration is caught by the guest itself.
//!
//! Every workload takes `rate` (operations per second over all vCPUs, paced with the tick
//! counter; 0 = flat out), `check_every` (operations between full self-checks) and `seed`.
//! `fill` refuses keys it does not take, as `hotspot` and `graded` do.
//! [`popularity`] gives, on the host, the page heat that `hotspot`, `graded` and `kv-zipf`
//! arguments intend.

mod fill;
mod graded;
mod hotspot;
mod idle;
mod kv_zipf;
mod pages;
mod popularity;
mod rw_mix;
mod scan;
#[cfg(test)]
mod tests;
mod uniform_write;

pub use popularity::{Popularity, PopularityError, popularity};

use crate::{
    Platform, Progress,
    abi::STACK_SIZE,
    args::{Args, BadArg},
    rng::mix,
};

/// Names of the built-in workloads.
pub const NAMES: [&str; 8] = [
    "kv-zipf",
    "scan",
    "rw-mix",
    "uniform-write",
    "fill",
    "hotspot",
    "graded",
    "idle",
];

/// Words per 4 KiB page.
pub const PAGE_WORDS: usize = 512;

/// Why a workload could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadError<'a> {
    Unknown(&'a str),
    NoName,
    BadArg(&'a str),
    /// A key the workload does not take (so a misspelt one is not silently ignored).
    UnknownArg(&'a str),
    /// The vCPU's share of memory is too small for the arguments.
    TooSmall,
}

impl<'a> From<BadArg<'a>> for WorkloadError<'a> {
    fn from(bad: BadArg<'a>) -> Self {
        Self::BadArg(bad.0)
    }
}

/// Runs the workload named by `args` on `mem`, this vCPU's share of memory, until the platform
/// says stop. Only returns early on bad arguments.
pub fn run<'a, P: Platform>(
    args: &Args<'a>,
    mem: &mut [u64],
    vcpu: u32,
    vcpus: u32,
    platform: &mut P,
) -> Result<(), WorkloadError<'a>> {
    let name = args.name().ok_or(WorkloadError::NoName)?;
    let rate = args.u64("rate", 0)?;
    let seed = args.u64("seed", 1)? ^ mix(u64::from(vcpu) + 1);
    let mut runner = Runner::new(platform, rate / u64::from(vcpus.max(1)), rate > 0);
    match name {
        "kv-zipf" => kv_zipf::run(args, mem, seed, &mut runner),
        "scan" => scan::run(args, mem, seed, &mut runner),
        "rw-mix" => rw_mix::run(args, mem, seed, &mut runner),
        "uniform-write" => uniform_write::run(args, mem, seed, &mut runner),
        "fill" => fill::run(args, mem, seed, &mut runner),
        "hotspot" => hotspot::run(args, mem, seed, &mut runner),
        "graded" => graded::run(args, mem, seed, &mut runner),
        "idle" => idle::run(&mut runner),
        other => Err(WorkloadError::Unknown(other)),
    }
}

/// Guest addresses of vCPU `vcpu`'s share of memory in the built-in image: what lies between
/// the image's end (`image_end`, page-aligned) and the vCPUs' stacks, split evenly, in whole
/// pages. The host uses it to turn [`popularity`]'s pages into guest frames.
pub fn vcpu_share(image_end: u64, mem_size: u64, vcpus: u32, vcpu: u32) -> core::ops::Range<u64> {
    let vcpus = u64::from(vcpus.max(1));
    let end = mem_size.saturating_sub(vcpus.saturating_mul(STACK_SIZE));
    let share = (end.saturating_sub(image_end) / vcpus) & !4095;
    let base = image_end.saturating_add(u64::from(vcpu).saturating_mul(share));
    base..base.saturating_add(share)
}

/// How many u64 words a share of `bytes` bytes holds.
fn words_of_share(bytes: u64) -> usize {
    usize::try_from(bytes / 8).unwrap_or(usize::MAX)
}

/// Counts, reports and paces a workload's operations.
pub struct Runner<'p, P: Platform> {
    platform: &'p mut P,
    progress: Progress,
    paced: bool,
    ticks_per_op: u64,
    next_op: u64,
}

impl<'p, P: Platform> Runner<'p, P> {
    fn new(platform: &'p mut P, rate: u64, paced: bool) -> Self {
        let ticks_per_op = if paced {
            (platform.ticks_per_ms() * 1000) / rate.max(1)
        } else {
            0
        };
        let next_op = platform.ticks();
        Self {
            platform,
            progress: Progress::default(),
            paced,
            ticks_per_op,
            next_op,
        }
    }

    /// Counts one operation and waits for the next one's turn when paced.
    #[inline]
    pub fn op_done(&mut self) {
        self.progress.ops += 1;
        if self.progress.ops.is_multiple_of(256) {
            self.publish();
        }
        if self.paced {
            self.pace();
        }
    }

    fn pace(&mut self) {
        self.next_op += self.ticks_per_op;
        let now = self.platform.ticks();
        let per_ms = self.platform.ticks_per_ms().max(1);
        if now > self.next_op + 100 * per_ms {
            // Far behind (the guest was paused, say): do not burst to catch up.
            self.next_op = now;
            return;
        }
        // Ahead of the schedule by more than a millisecond: sleep it off. Less than that, run
        // on: the operations of a millisecond come in a burst and the vCPU sleeps between
        // bursts. Spinning to each operation's own tick instead kept a host core busy for a
        // guest at 1000 operations a second, a core the migrator then lacked.
        if self.next_op > now + per_ms {
            let nanos = (self.next_op - now) * 1_000_000 / per_ms;
            self.platform.sleep(nanos);
        }
    }

    /// Publishes the counters now.
    pub fn publish(&mut self) {
        self.progress.heartbeat = self.progress.heartbeat.wrapping_add(1);
        self.platform.report(&self.progress);
    }

    /// Records a failed self-check.
    pub fn error(&mut self, detail0: u64, detail1: u64) {
        self.progress.errors += 1;
        self.platform.check_failed(detail0, detail1);
        self.publish();
    }

    /// Records a completed full self-check.
    pub fn check_done(&mut self) {
        self.progress.checks += 1;
        self.publish();
    }

    pub fn should_stop(&self) -> bool {
        self.platform.should_stop(&self.progress)
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    pub fn platform(&mut self) -> &mut P {
        self.platform
    }
}

/// Reads a word the way a self-check must: from memory, every time.
#[inline(always)]
pub fn load(mem: &[u64], index: usize) -> u64 {
    // SAFETY: indexing checked by the slice access that produced the reference.
    unsafe { core::ptr::read_volatile(&mem[index]) }
}

/// Writes a word so the store really happens (it is what a migration must carry over).
#[inline(always)]
pub fn store(mem: &mut [u64], index: usize, value: u64) {
    // SAFETY: as for `load`.
    unsafe { core::ptr::write_volatile(&mut mem[index], value) }
}

/// The content of word `word` of a page identified by `tag` at `version`.
#[inline(always)]
pub fn pattern(tag: u64, version: u64, word: usize) -> u64 {
    mix(tag.rotate_left(20) ^ version.rotate_left(44) ^ word as u64)
}

/// The loop `uniform-write` and `fill` share: every data page written at version 1 by
/// `write`, then one page chosen uniformly at random rewritten per operation at its next
/// version, and every `check_every` operations (default: as many as pages) each page checked
/// by `check`, which names the first wrong word.
fn rewrite_at_random<'a, P: Platform>(
    args: &Args<'a>,
    mem: &mut [u64],
    seed: u64,
    runner: &mut Runner<'_, P>,
    write: impl Fn(&mut [u64], &mut [u64], usize, u64),
    check: impl Fn(&[u64], &[u64], usize) -> Result<(), usize>,
) -> Result<(), WorkloadError<'a>> {
    let total = mem.len() / PAGE_WORDS;
    let (versions, data) = split_versions(mem, total).ok_or(WorkloadError::TooSmall)?;
    let pages = data.len() / PAGE_WORDS;
    if pages == 0 {
        return Err(WorkloadError::TooSmall);
    }
    let check_every = args.u64("check_every", pages as u64)?.max(1);
    for p in 0..pages {
        write(data, versions, p, 1);
    }
    let mut rng = crate::rng::SplitMix64::new(seed);
    let mut since_check = 0;
    while !runner.should_stop() {
        let p = rng.below(pages as u64) as usize;
        write(data, versions, p, load(versions, p) + 1);
        runner.op_done();
        since_check += 1;
        if since_check >= check_every {
            since_check = 0;
            for p in 0..pages {
                if let Err(word) = check(data, versions, p) {
                    runner.error(p as u64, word as u64);
                }
            }
            runner.check_done();
        }
    }
    Ok(())
}

/// Splits `mem` into a version table of `entries` words (rounded up to whole pages) and the rest.
pub fn split_versions(mem: &mut [u64], entries: usize) -> Option<(&mut [u64], &mut [u64])> {
    let table = entries.div_ceil(PAGE_WORDS) * PAGE_WORDS;
    if table >= mem.len() {
        return None;
    }
    Some(mem.split_at_mut(table))
}

/// Writes page `page` of `data` (tag, version, pattern words) and records the version.
pub fn write_page(data: &mut [u64], versions: &mut [u64], page: usize, tag: u64, version: u64) {
    let base = page * PAGE_WORDS;
    store(data, base, tag);
    store(data, base + 1, version);
    for w in 2..PAGE_WORDS {
        store(data, base + w, pattern(tag, version, w));
    }
    store(versions, page, version);
}

/// Checks page `page` against its tag and recorded version: the header words and `sample`
/// pattern words spread over the page. Returns the mismatching word's index on failure.
pub fn verify_page(
    data: &[u64],
    versions: &[u64],
    page: usize,
    tag: u64,
    sample: usize,
) -> Result<(), usize> {
    let base = page * PAGE_WORDS;
    let version = load(versions, page);
    if load(data, base) != tag {
        return Err(0);
    }
    if load(data, base + 1) != version {
        return Err(1);
    }
    let step = (PAGE_WORDS - 2) / sample.max(1);
    let mut w = 2 + (version as usize % step.max(1));
    while w < PAGE_WORDS {
        if load(data, base + w) != pattern(tag, version, w) {
            return Err(w);
        }
        w += step.max(1);
    }
    Ok(())
}
