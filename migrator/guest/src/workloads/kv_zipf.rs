//! `kv-zipf`: a key-value store over guest memory with Zipf-distributed keys.
//!
//! Arguments: `keys` (default: as many as fill three quarters of memory), `value_size` (bytes,
//! multiple of 8, at least 32; default 128), `theta` (Zipf skew, default 0.99), `write`
//! (fraction of operations that write, default 0.2), `scramble` (`1`: a key's value sits at a
//! slot given by a keyed permutation of the keys, as YCSB's ScrambledZipfian hashes keys, so
//! the hot keys are scattered over memory; default 0: key k at slot k, the hottest first),
//! `rate`, `check_every` (default: `keys`), `seed` (also picks the scramble).
//!
//! Each value holds its key, its version and a checksum, then pattern words derived from
//! them; the expected version of every slot lives in a separate table, so a stale value page
//! (or a stale table page) shows as a version mismatch, and a value at the wrong slot as a key
//! mismatch. Unlike YCSB's hash, the permutation never puts two keys in one slot.

use super::{PAGE_WORDS, Runner, WorkloadError, load, store};
use crate::{Platform, args::Args, perm::Permutation, rng::SplitMix64, rng::mix, zipf::Zipf};

/// Keeps the placement independent of the operation stream, which the same seed also drives.
const PLACEMENT_SALT: u64 = 0x5c7a_b1e5;

fn checksum(key: u64, version: u64) -> u64 {
    mix(key.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ version)
}

fn write_value(values: &mut [u64], words: usize, slot: usize, key: u64, version: u64) {
    let base = slot * words;
    let sum = checksum(key, version);
    store(values, base, key);
    store(values, base + 1, version);
    store(values, base + 2, sum);
    for w in 3..words {
        store(values, base + w, sum.wrapping_add(w as u64));
    }
}

fn verify_value(values: &[u64], words: usize, slot: usize, key: u64, version: u64) -> bool {
    let base = slot * words;
    let sum = checksum(key, version);
    if load(values, base) != key
        || load(values, base + 1) != version
        || load(values, base + 2) != sum
    {
        return false;
    }
    (3..words).all(|w| load(values, base + w) == sum.wrapping_add(w as u64))
}

/// The parsed arguments over a share of a given size.
#[derive(Clone, Debug)]
pub struct KvZipf {
    keys: usize,
    /// Words per value.
    words: usize,
    /// Words of the version table (whole pages), before the values.
    table_words: usize,
    share_pages: usize,
    write: f64,
    check_every: u64,
    zipf: Zipf,
    scramble: Option<Permutation>,
}

impl KvZipf {
    pub fn parse<'a>(args: &Args<'a>, mem_words: usize) -> Result<Self, WorkloadError<'a>> {
        let value_size = args.u64("value_size", 128)?;
        if value_size < 32 || !value_size.is_multiple_of(8) {
            return Err(WorkloadError::BadArg("value_size"));
        }
        let words =
            usize::try_from(value_size / 8).map_err(|_| WorkloadError::BadArg("value_size"))?;
        let fit = (mem_words * 3 / 4) / (words + 1);
        let keys = args.u64("keys", fit as u64)?;
        if keys == 0 {
            return Err(WorkloadError::BadArg("keys"));
        }
        let theta = args.float("theta", 0.99)?;
        let write = args.fraction("write", 0.2)?;
        let check_every = args.u64("check_every", keys)?.max(1);
        let scramble = args.flag("scramble", false)?;
        let placement = mix(args.u64("seed", 1)? ^ PLACEMENT_SALT);
        // Each key takes a version word and `words` value words; checked so a huge `keys` or
        // `value_size` is refused rather than overflowing.
        let keys = usize::try_from(keys)
            .ok()
            .filter(|&k| k < mem_words)
            .ok_or(WorkloadError::TooSmall)?;
        let table_words = keys.div_ceil(PAGE_WORDS) * PAGE_WORDS;
        let needed = keys
            .checked_mul(words)
            .and_then(|v| v.checked_add(table_words));
        if needed.is_none_or(|n| n > mem_words) || table_words >= mem_words {
            return Err(WorkloadError::TooSmall);
        }
        Ok(Self {
            keys,
            words,
            table_words,
            share_pages: mem_words / PAGE_WORDS,
            write,
            check_every,
            zipf: Zipf::new(keys as u64, theta),
            scramble: scramble.then(|| Permutation::new(keys as u64, placement)),
        })
    }

    /// The slot that holds `key`'s value and version.
    #[inline]
    fn slot(&self, key: u64) -> usize {
        match &self.scramble {
            Some(perm) => perm.apply(key) as usize,
            None => key as usize,
        }
    }

    fn key_weight(&self, slot: usize) -> f64 {
        let key = match &self.scramble {
            Some(perm) => perm.invert(slot as u64),
            None => slot as u64,
        };
        self.zipf.probability(key)
    }

    /// Touches per operation of page `page` of the share: a table page as often as the keys
    /// whose versions it holds (every operation reads the version), a value page as often as
    /// the keys whose values overlap it.
    pub fn weight(&self, page: usize) -> f64 {
        let table_pages = self.table_words / PAGE_WORDS;
        let (first, last) = if page < table_pages {
            let first = page * PAGE_WORDS;
            (first, first + PAGE_WORDS)
        } else {
            let start = (page - table_pages) * PAGE_WORDS;
            (
                start / self.words,
                (start + PAGE_WORDS).div_ceil(self.words),
            )
        };
        (first..last.min(self.keys))
            .map(|slot| self.key_weight(slot))
            .sum()
    }

    pub fn share_pages(&self) -> usize {
        self.share_pages
    }

    pub fn data_pages(&self) -> core::ops::Range<usize> {
        let first = self.table_words / PAGE_WORDS;
        first..first + (self.keys * self.words).div_ceil(PAGE_WORDS)
    }
}

pub fn run<'a, P: Platform>(
    args: &Args<'a>,
    mem: &mut [u64],
    seed: u64,
    runner: &mut Runner<'_, P>,
) -> Result<(), WorkloadError<'a>> {
    let spec = KvZipf::parse(args, mem.len())?;
    let (keys, words) = (spec.keys, spec.words);
    let (versions, values) = mem.split_at_mut(spec.table_words);
    for key in 0..keys as u64 {
        let slot = spec.slot(key);
        write_value(values, words, slot, key, 1);
        store(versions, slot, 1);
    }
    let mut rng = SplitMix64::new(seed);
    let mut since_check = 0;
    while !runner.should_stop() {
        let key = spec.zipf.next(&mut rng);
        let slot = spec.slot(key);
        let version = load(versions, slot);
        if rng.unit() < spec.write {
            write_value(values, words, slot, key, version + 1);
            store(versions, slot, version + 1);
        } else if !verify_value(values, words, slot, key, version) {
            runner.error(key, version);
        }
        runner.op_done();
        since_check += 1;
        if since_check >= spec.check_every {
            since_check = 0;
            for key in 0..keys as u64 {
                let slot = spec.slot(key);
                let version = load(versions, slot);
                if !verify_value(values, words, slot, key, version) {
                    runner.error(key, version);
                }
            }
            runner.check_done();
        }
    }
    Ok(())
}
