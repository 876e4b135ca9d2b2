//! Zipf-distributed keys, by the method of Gray et al. ("Quickly generating billion-record
//! synthetic databases", SIGMOD 1994), as YCSB's ZipfianGenerator does: key 0 is the most
//! popular.

use crate::rng::SplitMix64;

#[derive(Clone, Debug)]
pub struct Zipf {
    items: u64,
    theta: f64,
    alpha: f64,
    zeta_n: f64,
    eta: f64,
    half_pow_theta: f64,
}

/// zeta(n, theta) = sum_{i=1..n} 1 / i^theta. For large n the tail is approximated by its
/// integral, so construction stays fast inside a guest without an FPU (soft-float).
fn zeta(n: u64, theta: f64) -> f64 {
    const EXACT: u64 = 4096;
    let exact = n.min(EXACT);
    let mut sum = 0.0;
    for i in 1..=exact {
        sum += 1.0 / libm::pow(i as f64, theta);
    }
    if n > EXACT {
        let (a, b) = (EXACT as f64 + 0.5, n as f64 + 0.5);
        sum += if (theta - 1.0).abs() < 1e-9 {
            libm::log(b / a)
        } else {
            (libm::pow(b, 1.0 - theta) - libm::pow(a, 1.0 - theta)) / (1.0 - theta)
        };
    }
    sum
}

impl Zipf {
    /// `items` > 0 keys, skew `theta` in [0, 1) (0.99 is YCSB's default); theta 0 is uniform.
    pub fn new(items: u64, theta: f64) -> Self {
        let items = items.max(1);
        let theta = theta.clamp(0.0, 0.999_999);
        let zeta_n = zeta(items, theta);
        let zeta_2 = zeta(2.min(items), theta);
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - libm::pow(2.0 / items as f64, 1.0 - theta)) / (1.0 - zeta_2 / zeta_n);
        Self {
            items,
            theta,
            alpha,
            zeta_n,
            eta,
            half_pow_theta: 1.0 + libm::pow(0.5, theta),
        }
    }

    /// The probability the distribution gives `key` (the sampler below follows it closely: exactly
    /// for keys 0 and 1, by Gray et al.'s approximation beyond). Zero outside `0..items`.
    pub fn probability(&self, key: u64) -> f64 {
        if key >= self.items {
            0.0
        } else if self.theta == 0.0 {
            1.0 / self.items as f64
        } else {
            1.0 / (libm::pow((key + 1) as f64, self.theta) * self.zeta_n)
        }
    }

    /// A key in `0..items`.
    pub fn next(&self, rng: &mut SplitMix64) -> u64 {
        if self.theta == 0.0 {
            return rng.below(self.items);
        }
        let u = rng.unit();
        let uz = u * self.zeta_n;
        if uz < 1.0 {
            return 0;
        }
        if uz < self.half_pow_theta {
            return 1.min(self.items - 1);
        }
        let key = (self.items as f64 * libm::pow(self.eta * u - self.eta + 1.0, self.alpha)) as u64;
        key.min(self.items - 1)
    }
}
