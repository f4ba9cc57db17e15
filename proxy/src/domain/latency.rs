//! Recent request latencies of this proxy (reads and writes of the data
//! listener), for the reshard copy's adaptive throttle.
//!
//! A fixed ring of samples, each one `AtomicU64` holding the time it was
//! taken (milliseconds since the window was created) and the latency in
//! microseconds; recording is one `fetch_add` and one store, no lock. The
//! driver asks for a percentile of the samples of the last few seconds a
//! few times per second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Samples kept: at 1,000 requests/s, the last four seconds.
const SLOTS: usize = 4096;

pub struct LatencyWindow {
    epoch: Instant,
    next: AtomicU64,
    slots: Box<[AtomicU64]>,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        LatencyWindow {
            epoch: Instant::now(),
            next: AtomicU64::new(0),
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl LatencyWindow {
    /// Records one request that took `took` and ended now.
    pub fn record(&self, took: Duration) {
        self.record_at(Instant::now(), took);
    }

    fn record_at(&self, at: Instant, took: Duration) {
        let ms = at.saturating_duration_since(self.epoch).as_millis() as u64;
        let us = took.as_micros().min(u32::MAX as u128) as u64;
        // 0 marks an empty slot: a sample is at least 1 ms after the epoch.
        let packed = ((ms + 1) << 32) | us;
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.slots.len();
        self.slots[i].store(packed, Ordering::Relaxed);
    }

    /// The `q` quantile (0..=1) of the latencies recorded in the `within`
    /// before `now`, and how many there were; `None` when there were none.
    pub fn quantile(&self, now: Instant, within: Duration, q: f64) -> Option<(Duration, usize)> {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64 + 1;
        let from_ms = now_ms.saturating_sub(within.as_millis() as u64);
        let mut us: Vec<u64> = self
            .slots
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&p| p != 0 && (from_ms..=now_ms).contains(&(p >> 32)))
            .map(|p| p & 0xffff_ffff)
            .collect();
        if us.is_empty() {
            return None;
        }
        us.sort_unstable();
        let rank = ((us.len() as f64 * q).ceil() as usize).clamp(1, us.len());
        Some((Duration::from_micros(us[rank - 1]), us.len()))
    }
}

/// The adaptive copy throttle: the next rows/s given the latency now and
/// before the reshard. Halves the rate while the recent p99 exceeds
/// `ratio` × the p99 before the reshard, otherwise adds a tenth of the
/// maximum (so a rate recovers from the minimum within about ten chunks);
/// always within `[min, max]`.
pub fn next_rate(
    rate: f64,
    recent: Duration,
    before: Duration,
    ratio: f64,
    min: f64,
    max: f64,
) -> f64 {
    let next = if recent.as_secs_f64() > ratio * before.as_secs_f64() {
        rate / 2.0
    } else {
        rate + max / 10.0
    };
    next.clamp(min.min(max), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn quantile_of_recent_samples_only() {
        let w = LatencyWindow::default();
        let t0 = w.epoch;
        // Old, slow samples; then 100 recent ones of 1..=100 ms.
        for _ in 0..50 {
            w.record_at(t0 + Duration::from_secs(1), 500 * MS);
        }
        for i in 1..=100u32 {
            w.record_at(t0 + Duration::from_secs(10), i * MS);
        }
        let now = t0 + Duration::from_secs(10);
        assert_eq!(
            w.quantile(now, Duration::from_secs(2), 0.99),
            Some((99 * MS, 100))
        );
        assert_eq!(
            w.quantile(now, Duration::from_secs(2), 1.0),
            Some((100 * MS, 100))
        );
        assert_eq!(
            w.quantile(now, Duration::from_secs(2), 0.0),
            Some((MS, 100))
        );
        // A window reaching back includes the old ones.
        assert_eq!(
            w.quantile(now, Duration::from_secs(20), 1.0),
            Some((500 * MS, 150))
        );
        assert_eq!(
            w.quantile(now + Duration::from_secs(5), Duration::from_secs(2), 0.99),
            None
        );
    }

    #[test]
    fn the_ring_keeps_the_newest_samples() {
        let w = LatencyWindow::default();
        let at = w.epoch + Duration::from_secs(1);
        for _ in 0..SLOTS {
            w.record_at(at, 900 * MS);
        }
        for _ in 0..SLOTS {
            w.record_at(at, 2 * MS);
        }
        assert_eq!(
            w.quantile(at, Duration::from_secs(1), 1.0),
            Some((2 * MS, SLOTS))
        );
    }

    #[test]
    fn the_rate_halves_above_the_ratio_and_recovers_below() {
        let before = 10 * MS;
        // 25 ms > 2 × 10 ms: halve, but not below the minimum.
        assert_eq!(
            next_rate(4000.0, 25 * MS, before, 2.0, 500.0, 5000.0),
            2000.0
        );
        assert_eq!(next_rate(800.0, 25 * MS, before, 2.0, 500.0, 5000.0), 500.0);
        // At or below: a tenth of the maximum more, up to the maximum.
        assert_eq!(
            next_rate(500.0, 20 * MS, before, 2.0, 500.0, 5000.0),
            1000.0
        );
        assert_eq!(
            next_rate(4800.0, 5 * MS, before, 2.0, 500.0, 5000.0),
            5000.0
        );
        // A minimum above the maximum is the maximum.
        assert_eq!(
            next_rate(100.0, 25 * MS, before, 2.0, 9000.0, 5000.0),
            5000.0
        );
    }
}
