//! Latency histograms and the numbers reported from them.
//!
//! Every latency is recorded in nanoseconds into an HdrHistogram (3 significant digits, so a
//! reported value is within 0.1% of the recorded one) and reported in microseconds.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Longest latency recorded; anything slower is recorded as this (and shows as the max).
pub const LATENCY_MAX_NS: u64 = 60_000_000_000;
const SIGNIFICANT_DIGITS: u8 = 3;

/// The quantiles every summary reports, by name.
pub const REPORTED_QUANTILES: [(&str, f64); 5] =
    [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999), ("p99.99", 0.9999)];

/// Quantiles kept for the percentile plot (the last one is the max).
pub const SPECTRUM_QUANTILES: [f64; 11] = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999, 1.0];

#[derive(Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Latency({} samples)", self.histogram.len())
    }
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        let histogram =
            Histogram::new_with_bounds(1, LATENCY_MAX_NS, SIGNIFICANT_DIGITS).expect("constant bounds are valid");
        Latency { histogram }
    }

    pub fn record_ns(&mut self, latency_ns: u64) {
        self.histogram.saturating_record(latency_ns.clamp(1, LATENCY_MAX_NS));
    }

    /// Coordinated-omission correction for open-loop load: the latency of an operation is
    /// counted from when it was *due* to start, not from when the client got round to it, so
    /// a stall also delays the clock of every operation queued behind it.
    pub fn record_since_due(&mut self, due_ns: u64, done_ns: u64) {
        self.record_ns(done_ns.saturating_sub(due_ns));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    pub fn quantile_ns(&self, quantile: f64) -> u64 {
        if self.histogram.is_empty() {
            return 0;
        }
        self.histogram.value_at_quantile(quantile)
    }

    pub fn summary(&self) -> LatencySummary {
        let us = |ns: u64| ns as f64 / 1000.0;
        let q = |quantile: f64| us(self.quantile_ns(quantile));
        LatencySummary {
            count: self.count(),
            mean_us: if self.histogram.is_empty() { 0.0 } else { self.histogram.mean() / 1000.0 },
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            p9999_us: q(0.9999),
            max_us: if self.histogram.is_empty() { 0.0 } else { us(self.histogram.max()) },
            spectrum_us: SPECTRUM_QUANTILES.iter().map(|&quantile| (quantile, q(quantile))).collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub p9999_us: f64,
    pub max_us: f64,
    /// (quantile, µs) at `SPECTRUM_QUANTILES`, for the percentile plot.
    pub spectrum_us: Vec<(f64, f64)>,
}

impl LatencySummary {
    /// The value of a named quantile ("p50" … "p99.99", "max").
    pub fn named(&self, name: &str) -> Option<f64> {
        match name {
            "p50" => Some(self.p50_us),
            "p90" => Some(self.p90_us),
            "p99" => Some(self.p99_us),
            "p99.9" => Some(self.p999_us),
            "p99.99" => Some(self.p9999_us),
            "max" => Some(self.max_us),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Throughput {
    pub msgs_per_sec: f64,
    /// Megabytes (10^6 bytes) of message bodies per second.
    pub mb_per_sec: f64,
}

pub fn throughput(messages: u64, body_bytes: usize, elapsed_secs: f64) -> Throughput {
    if elapsed_secs <= 0.0 {
        return Throughput { msgs_per_sec: 0.0, mb_per_sec: 0.0 };
    }
    let msgs_per_sec = messages as f64 / elapsed_secs;
    Throughput { msgs_per_sec, mb_per_sec: msgs_per_sec * body_bytes as f64 / 1e6 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// HdrHistogram with 3 significant digits reports within 0.1% of the recorded value.
    fn close(actual_us: f64, expected_us: f64) -> bool {
        (actual_us - expected_us).abs() <= expected_us * 0.001
    }

    #[test]
    fn percentiles_of_one_to_a_hundred_milliseconds() {
        let mut latency = Latency::new();
        for ms in 1..=100 {
            latency.record_ns(ms * MS);
        }
        let s = latency.summary();
        assert_eq!(s.count, 100);
        // The p-th percentile of 1..=100 is the value at rank ceil(p * 100).
        for (actual, expected_ms) in
            [(s.p50_us, 50.0), (s.p90_us, 90.0), (s.p99_us, 99.0), (s.p999_us, 100.0), (s.p9999_us, 100.0)]
        {
            assert!(close(actual, expected_ms * 1000.0), "{actual} vs {expected_ms} ms");
        }
        assert!(close(s.max_us, 100_000.0));
        assert!(close(s.mean_us, 50_500.0), "mean {}", s.mean_us);
        assert_eq!(s.spectrum_us.len(), SPECTRUM_QUANTILES.len());
        assert_eq!(s.spectrum_us.last().map(|p| p.0), Some(1.0));
    }

    #[test]
    fn a_one_percent_tail_shows_above_p99_only() {
        // 990 samples of 1 ms and 10 of 100 ms: rank 990 (p99) is still 1 ms, rank 999 is 100 ms.
        let mut latency = Latency::new();
        for i in 0..1000 {
            latency.record_ns(if i < 990 { MS } else { 100 * MS });
        }
        let s = latency.summary();
        assert!(close(s.p50_us, 1000.0));
        assert!(close(s.p90_us, 1000.0));
        assert!(close(s.p99_us, 1000.0));
        assert!(close(s.p999_us, 100_000.0));
        assert!(close(s.max_us, 100_000.0));
        assert!(close(s.mean_us, (990.0 * 1000.0 + 10.0 * 100_000.0) / 1000.0));
    }

    #[test]
    fn due_time_correction_counts_the_wait_before_sending() {
        let mut latency = Latency::new();
        // Due at 1 ms, sent late at 10 ms, answered at 10.1 ms: 9.1 ms, not the 0.1 ms service time.
        latency.record_since_due(MS, 10 * MS + MS / 10);
        assert!(close(latency.summary().p50_us, 9100.0));
        // A reply stamped before its due time (clock granularity) counts as the shortest latency.
        latency.record_since_due(5 * MS, 4 * MS);
        assert_eq!(latency.count(), 2);
    }

    #[test]
    fn out_of_range_samples_are_clamped_not_dropped() {
        let mut latency = Latency::new();
        latency.record_ns(0);
        latency.record_ns(LATENCY_MAX_NS * 10);
        assert_eq!(latency.count(), 2);
        assert!(latency.summary().max_us >= LATENCY_MAX_NS as f64 / 1000.0 * 0.999);
    }

    #[test]
    fn empty_histograms_summarise_to_zero() {
        let s = Latency::new().summary();
        assert_eq!((s.count, s.p50_us, s.max_us, s.mean_us), (0, 0.0, 0.0, 0.0));
    }

    #[test]
    fn throughput_in_messages_and_megabytes() {
        let t = throughput(10_000, 1024, 2.0);
        assert_eq!(t.msgs_per_sec, 5000.0);
        assert!((t.mb_per_sec - 5.12).abs() < 1e-9);
        assert_eq!(throughput(5, 10, 0.0).msgs_per_sec, 0.0);
    }
}
