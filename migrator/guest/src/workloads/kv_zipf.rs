//! `kv-zipf`: a key-value store over guest memory with Zipf-distributed keys.
//!
//! Arguments: `keys` (default: as many as fill three quarters of memory), `value_size` (bytes,
//! multiple of 8, at least 32; default 128), `theta` (Zipf skew, default 0.99), `write`
//! (fraction of operations that write, default 0.2), `rate`, `check_every` (default: `keys`).
//!
//! Each value holds its key, its version and a checksum, then pattern words derived from
//! them; the expected version of every key lives in a separate table, so a stale value page
//! (or a stale table page) shows as a version mismatch.

use super::{Runner, WorkloadError, load, split_versions, store};
use crate::{Platform, args::Args, rng::SplitMix64, rng::mix, zipf::Zipf};

fn checksum(key: u64, version: u64) -> u64 {
    mix(key.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ version)
}

fn write_value(values: &mut [u64], words: usize, key: u64, version: u64) {
    let base = key as usize * words;
    let sum = checksum(key, version);
    store(values, base, key);
    store(values, base + 1, version);
    store(values, base + 2, sum);
    for w in 3..words {
        store(values, base + w, sum.wrapping_add(w as u64));
    }
}

fn verify_value(values: &[u64], words: usize, key: u64, version: u64) -> bool {
    let base = key as usize * words;
    let sum = checksum(key, version);
    if load(values, base) != key
        || load(values, base + 1) != version
        || load(values, base + 2) != sum
    {
        return false;
    }
    (3..words).all(|w| load(values, base + w) == sum.wrapping_add(w as u64))
}

pub fn run<'a, P: Platform>(
    args: &Args<'a>,
    mem: &mut [u64],
    seed: u64,
    runner: &mut Runner<'_, P>,
) -> Result<(), WorkloadError<'a>> {
    let value_size = args.u64("value_size", 128)?;
    if value_size < 32 || !value_size.is_multiple_of(8) {
        return Err(WorkloadError::BadArg("value_size"));
    }
    let words = (value_size / 8) as usize;
    let fit = (mem.len() * 3 / 4) / (words + 1);
    let keys = args.u64("keys", fit as u64)? as usize;
    if keys == 0 {
        return Err(WorkloadError::BadArg("keys"));
    }
    let theta = args.float("theta", 0.99)?;
    let write = args.fraction("write", 0.2)?;
    let check_every = args.u64("check_every", keys as u64)?.max(1);
    let (versions, values) = split_versions(mem, keys).ok_or(WorkloadError::TooSmall)?;
    if values.len() < keys * words {
        return Err(WorkloadError::TooSmall);
    }

    for key in 0..keys as u64 {
        write_value(values, words, key, 1);
        store(versions, key as usize, 1);
    }
    let zipf = Zipf::new(keys as u64, theta);
    let mut rng = SplitMix64::new(seed);
    let mut since_check = 0;
    while !runner.should_stop() {
        let key = zipf.next(&mut rng);
        let version = load(versions, key as usize);
        if rng.unit() < write {
            write_value(values, words, key, version + 1);
            store(versions, key as usize, version + 1);
        } else if !verify_value(values, words, key, version) {
            runner.error(key, version);
        }
        runner.op_done();
        since_check += 1;
        if since_check >= check_every {
            since_check = 0;
            for key in 0..keys as u64 {
                let version = load(versions, key as usize);
                if !verify_value(values, words, key, version) {
                    runner.error(key, version);
                }
            }
            runner.check_done();
        }
    }
    Ok(())
}
