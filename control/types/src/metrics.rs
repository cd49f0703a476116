//! What the parts of swarmnet count for `--metrics-addr` (issue 21), kept as plain atomics
//! where the work happens (no metrics library in the hot paths, and nothing to lock): the
//! daemon reads them when it is scraped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A latency histogram with fixed buckets (seconds), cumulative when read.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum of the observations in ns.
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// Buckets from 100 µs to 10 s, for network round trips and kernel programming.
pub const LATENCY_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(LATENCY_BUCKETS)
    }
}

/// A histogram as read: its sum (s), count, and cumulative `(upper bound, count)` buckets
/// ending with `+Inf`.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    pub sum: f64,
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_ns: AtomicU64::new(0), count: AtomicU64::new(0) }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| s <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let count = self.count.load(Ordering::Relaxed);
        let mut acc = 0;
        let mut buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| {
                acc += c.load(Ordering::Relaxed);
                (*b, acc)
            })
            .collect();
        // Read apart from the buckets: never fewer than the last bucket says.
        buckets.push((f64::INFINITY, count.max(acc)));
        HistogramSnapshot { sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9, count: count.max(acc), buckets }
    }
}

/// A histogram owned by one loop (no atomics), with the buckets of [`LATENCY_BUCKETS`]:
/// comparable and cloneable, for a loop's statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoopHistogram {
    /// Per bucket (not cumulative), then the count over the last bound.
    counts: Vec<u64>,
    sum_ns: u64,
    count: u64,
}

impl LoopHistogram {
    pub fn observe(&mut self, d: Duration) {
        if self.counts.is_empty() {
            self.counts = vec![0; LATENCY_BUCKETS.len() + 1];
        }
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|b| s <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i] += 1;
        self.sum_ns = self.sum_ns.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.count += 1;
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .enumerate()
            .map(|(i, b)| {
                acc += self.counts.get(i).copied().unwrap_or(0);
                (*b, acc)
            })
            .collect();
        buckets.push((f64::INFINITY, self.count));
        HistogramSnapshot { sum: self.sum_ns as f64 / 1e9, count: self.count, buckets }
    }
}

/// A fixed set of counters named by label values (a DNS query's type, a reply's code).
#[derive(Debug)]
pub struct LabeledCounters {
    pub labels: &'static [&'static str],
    counts: Vec<AtomicU64>,
}

impl LabeledCounters {
    pub fn new(labels: &'static [&'static str]) -> LabeledCounters {
        LabeledCounters { labels, counts: (0..labels.len()).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Counts one for label `i` (the last label for anything out of range).
    pub fn inc(&self, i: usize) {
        let i = i.min(self.counts.len().saturating_sub(1));
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `(label, count)` for every label.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        self.labels.iter().zip(&self.counts).map(|(l, c)| (*l, c.load(Ordering::Relaxed))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_reads_cumulative_with_its_sum_and_count() {
        let h = Histogram::new(&[0.001, 0.01, 0.1]);
        for ms in [0, 1, 5, 50, 2000] {
            h.observe(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.buckets, vec![(0.001, 2), (0.01, 3), (0.1, 4), (f64::INFINITY, 5)]);
        assert!((s.sum - 2.056).abs() < 1e-9, "{}", s.sum);
    }

    #[test]
    fn a_loop_histogram_reads_like_the_shared_one() {
        let mut l = LoopHistogram::default();
        let h = Histogram::default();
        for ms in [0, 3, 40, 20_000] {
            l.observe(Duration::from_millis(ms));
            h.observe(Duration::from_millis(ms));
        }
        assert_eq!(l.snapshot(), h.snapshot());
    }

    #[test]
    fn labeled_counters_count_out_of_range_as_the_last() {
        let c = LabeledCounters::new(&["a", "other"]);
        c.inc(0);
        c.inc(7);
        c.inc(1);
        assert_eq!(c.read(), vec![("a", 1), ("other", 2)]);
    }
}
