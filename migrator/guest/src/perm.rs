//! A keyed bijection of `[0, n)`, to scatter a workload's hot keys or pages over memory the way
//! a hashed key-value store does (YCSB's ScrambledZipfian), while every key still has exactly
//! one place, so the self-checks keep working.
//!
//! A four-round balanced Feistel network over the smallest even number of bits that holds
//! `n - 1` is a permutation of `[0, 2^2h)`; cycle-walking (apply it again until the result is
//! below `n`) restricts it to `[0, n)`. The domain is under `4n`, so a walk takes fewer than
//! four steps on average. Four rounds with a good mixing function look random enough for
//! placement; nothing here needs cryptographic strength.

use crate::rng::{SplitMix64, mix};

const ROUNDS: usize = 4;

#[derive(Clone, Debug)]
pub struct Permutation {
    n: u64,
    /// Bits in each half of the Feistel block.
    half: u32,
    keys: [u64; ROUNDS],
}

impl Permutation {
    /// A permutation of `[0, n)` chosen by `seed`; `n` of 0 or 1 gives the identity.
    pub fn new(n: u64, seed: u64) -> Self {
        let bits = if n <= 1 {
            0
        } else {
            u64::BITS - (n - 1).leading_zeros()
        };
        let mut rng = SplitMix64::new(seed);
        Self {
            n,
            half: bits.div_ceil(2),
            keys: core::array::from_fn(|_| rng.next_u64()),
        }
    }

    /// The size of the permuted range.
    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Where `x` goes. Values outside `[0, n)` are returned unchanged: a walk from outside the
    /// range need not come back into it.
    pub fn apply(&self, x: u64) -> u64 {
        if x >= self.n {
            return x;
        }
        let mut y = self.forward(x);
        // The cycle through x holds x itself, so this ends at the latest back at x.
        while y >= self.n {
            y = self.forward(y);
        }
        y
    }

    /// The value that goes to `y`: `invert(apply(x)) == x`.
    pub fn invert(&self, y: u64) -> u64 {
        if y >= self.n {
            return y;
        }
        let mut x = self.backward(y);
        while x >= self.n {
            x = self.backward(x);
        }
        x
    }

    fn mask(&self) -> u64 {
        (1u64 << self.half) - 1
    }

    fn forward(&self, x: u64) -> u64 {
        let mask = self.mask();
        let (mut left, mut right) = (x >> self.half, x & mask);
        for key in self.keys {
            (left, right) = (right, left ^ (mix(right ^ key) & mask));
        }
        (left << self.half) | right
    }

    fn backward(&self, y: u64) -> u64 {
        let mask = self.mask();
        let (mut left, mut right) = (y >> self.half, y & mask);
        for key in self.keys.iter().rev() {
            (left, right) = (right ^ (mix(left ^ key) & mask), left);
        }
        (left << self.half) | right
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    fn assert_bijective(n: u64, seed: u64) {
        let perm = Permutation::new(n, seed);
        let mut seen = vec![false; n as usize];
        for x in 0..n {
            let y = perm.apply(x);
            assert!(y < n, "n={n} seed={seed}: {x} -> {y}");
            assert!(!seen[y as usize], "n={n} seed={seed}: {y} hit twice");
            seen[y as usize] = true;
            assert_eq!(perm.invert(y), x, "n={n} seed={seed}");
        }
    }

    #[test]
    fn is_a_bijection_for_small_primes_powers_of_two_and_their_neighbours() {
        let mut sizes: Vec<u64> = (0..=300).collect();
        sizes.extend([65_521, 65_537, 104_729, 999_983]);
        for k in 0..=20 {
            sizes.extend([(1u64 << k).saturating_sub(1), 1 << k, (1 << k) + 1]);
        }
        for n in sizes {
            for seed in [0, 1, 0xdead_beef] {
                assert_bijective(n, seed);
            }
        }
    }

    #[test]
    fn huge_ranges_stay_in_range_and_invert() {
        for n in [u64::MAX, 1 << 63, (1 << 40) + 3] {
            let perm = Permutation::new(n, 7);
            for x in [0, 1, n / 2, n - 2, n - 1] {
                let y = perm.apply(x);
                assert!(y < n);
                assert_eq!(perm.invert(y), x);
            }
        }
    }

    #[test]
    fn outside_the_range_is_left_alone() {
        let perm = Permutation::new(10, 3);
        assert_eq!(perm.apply(10), 10);
        assert_eq!(perm.invert(u64::MAX), u64::MAX);
        assert_eq!(Permutation::new(0, 3).apply(0), 0);
        assert_eq!(Permutation::new(1, 3).apply(0), 0);
    }

    #[test]
    fn scatters_a_contiguous_prefix() {
        // The 64 hottest of 4096 pages, which sit in one 64-page block unscattered, should land
        // in many blocks (random placement: about 40 of 64).
        let perm = Permutation::new(4096, 1);
        let mut blocks = [false; 64];
        for x in 0..64 {
            blocks[(perm.apply(x) / 64) as usize] = true;
        }
        let hit = blocks.iter().filter(|&&b| b).count();
        assert!(hit >= 30, "{hit} blocks");
        // And another seed gives another placement.
        let other = Permutation::new(4096, 2);
        assert!((0..64).any(|x| perm.apply(x) != other.apply(x)));
    }
}
