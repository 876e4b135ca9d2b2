//! Pacing: a token bucket that keeps a sender to its bandwidth limit.

use std::time::{Duration, Instant};

/// Spreads writes so that no more than `bytes_per_sec` leave: a token bucket whose credit
/// starts at the first send (time before it, such as a heat profile, earns nothing) and is
/// capped at [`BURST`] of the rate, so an idle gap never lets a burst through that the link
/// would have to queue.
pub struct Pacer {
    bytes_per_sec: Option<u64>,
    /// When the credit was last brought up to date; `None` until the first send.
    last: Option<Instant>,
    /// Bytes that may leave now without waiting; negative while a send is paid off.
    credit: f64,
}

/// The most credit an idle spell earns, as time at the rate.
pub const BURST: Duration = Duration::from_millis(50);

impl Pacer {
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        Self {
            bytes_per_sec,
            last: None,
            credit: 0.0,
        }
    }

    /// Accounts for `bytes` about to be sent, sleeping first if that would exceed the rate.
    pub fn pace(&mut self, bytes: u64) {
        let wait = self.delay(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// How long `bytes` sent at `now` must wait to keep to the rate.
    pub fn delay(&mut self, bytes: u64, now: Instant) -> Duration {
        let Some(rate) = self.bytes_per_sec.filter(|r| *r > 0).map(|r| r as f64) else {
            return Duration::ZERO;
        };
        if let Some(last) = self.last {
            let earned = now.saturating_duration_since(last).as_secs_f64() * rate;
            self.credit = (self.credit + earned).min(BURST.as_secs_f64() * rate);
        }
        self.last = Some(now);
        self.credit -= bytes as f64;
        if self.credit >= 0.0 {
            Duration::ZERO
        } else {
            // Once slept, the next send's refill counts the sleep, which pays this off.
            Duration::from_secs_f64(-self.credit / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{BURST, Pacer};

    const MB: u64 = 1_000_000;

    #[test]
    fn the_pacer_keeps_to_its_rate() {
        let mut pacer = Pacer::new(Some(100 * MB));
        let t0 = Instant::now();
        // The first send has no credit: 1 MB at 100 MB/s waits 10 ms.
        assert_eq!(pacer.delay(MB, t0), Duration::from_millis(10));
        // Sent right after that wait, the next one waits its own 10 ms.
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(pacer.delay(MB, t1), Duration::from_millis(10));
        assert_eq!(Pacer::new(None).delay(u64::MAX, t0), Duration::ZERO);
    }

    #[test]
    fn time_before_the_first_send_earns_nothing() {
        // Created long before it sends (a profile window), it still starts without credit.
        let mut pacer = Pacer::new(Some(100 * MB));
        let later = Instant::now() + Duration::from_secs(5);
        assert_eq!(pacer.delay(50 * MB, later), Duration::from_millis(500));
    }

    #[test]
    fn an_idle_gap_earns_no_more_than_the_burst() {
        let mut pacer = Pacer::new(Some(100 * MB));
        let t0 = Instant::now();
        let _ = pacer.delay(MB, t0);
        // Ten idle seconds earn at most BURST of credit (5 MB at 100 MB/s).
        let t1 = t0 + Duration::from_secs(10);
        let burst = (BURST.as_secs_f64() * 100e6) as u64;
        assert_eq!(pacer.delay(burst, t1), Duration::ZERO);
        // Anything beyond it waits at the rate.
        assert_eq!(pacer.delay(10 * MB, t1), Duration::from_millis(100));
    }
}
