//! Series that every relayed operation updates, kept per thread: each
//! thread adds to a stripe of its own (its own cache lines) and a scrape
//! sums the stripes. With one shared atomic per counter, and
//! prometheus-client's histogram behind a lock, each operation moved
//! those cache lines between the cores that relay — a cost that grows
//! with the cores (issue 21 found it in the relay's profile).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::{Atomic, Counter};
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Threads beyond this many share stripes (still correct, just shared).
const STRIPES: usize = 16;

/// Two cache lines: x86 fetches lines in adjacent pairs.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded<T>(T);

/// This thread's stripe, handed out round robin as threads first count.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static STRIPE: usize = NEXT.fetch_add(1, Relaxed) % STRIPES);
    STRIPE.with(|stripe| *stripe)
}

/// A counter's value as stripes.
#[derive(Debug, Default)]
pub struct Stripes([Padded<AtomicU64>; STRIPES]);

impl Atomic<u64> for Stripes {
    fn inc(&self) -> u64 {
        self.inc_by(1)
    }

    /// Returns this thread's stripe before the increment (not the total:
    /// summing would read every stripe; nothing here uses the result).
    fn inc_by(&self, v: u64) -> u64 {
        self.0[stripe()].0.fetch_add(v, Relaxed)
    }

    fn get(&self) -> u64 {
        self.0.iter().map(|stripe| stripe.0.load(Relaxed)).sum()
    }
}

/// A Prometheus counter counted in stripes.
pub type StripedCounter = Counter<u64, Stripes>;

/// The upper bounds of a latency histogram: 50 µs doubling 18 times
/// (to 6.6 s); the last bucket, +Inf, takes the rest.
const BOUNDS: usize = 18;

#[derive(Debug, Default)]
struct HistogramStripe {
    /// The sum of the observations, an f64's bits.
    sum: AtomicU64,
    buckets: [AtomicU64; BOUNDS + 1],
}

#[derive(Debug)]
struct HistogramInner {
    bounds: [f64; BOUNDS],
    stripes: [Padded<HistogramStripe>; STRIPES],
}

/// A latency histogram observed in stripes; encoded as prometheus-client's
/// own histogram is. A scrape during observations may see a bucket
/// counted before the sum has the value (as between any two series).
#[derive(Clone, Debug)]
pub struct LatencyHistogram(Arc<HistogramInner>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        let mut bounds = [0.0; BOUNDS];
        for (slot, bound) in bounds.iter_mut().zip(exponential_buckets(0.000_05, 2.0, BOUNDS as u16)) {
            *slot = bound;
        }
        LatencyHistogram(Arc::new(HistogramInner {
            bounds,
            stripes: Default::default(),
        }))
    }
}

impl LatencyHistogram {
    pub fn observe(&self, seconds: f64) {
        let inner = &*self.0;
        let bucket = inner
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BOUNDS);
        let stripe = &inner.stripes[stripe()].0;
        stripe.buckets[bucket].fetch_add(1, Relaxed);
        // Only this thread (or the few sharing its stripe) adds here: the
        // exchange all but always succeeds first time.
        let _ = stripe.sum.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + seconds).to_bits())
        });
    }

    /// The sum, the count and each bucket's own count with its upper bound.
    fn totals(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let inner = &*self.0;
        let mut buckets: Vec<(f64, u64)> = inner.bounds.iter().chain([&f64::MAX]).map(|&b| (b, 0)).collect();
        let mut sum = 0.0;
        for stripe in &inner.stripes {
            sum += f64::from_bits(stripe.0.sum.load(Relaxed));
            for (total, count) in buckets.iter_mut().zip(&stripe.0.buckets) {
                total.1 += count.load(Relaxed);
            }
        }
        let count = buckets.iter().map(|(_, count)| count).sum();
        (sum, count, buckets)
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let (sum, count, buckets) = self.totals();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    use super::*;

    fn exposition(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn counts_from_many_threads_add_up_exactly() {
        let counter = StripedCounter::default();
        let histogram = LatencyHistogram::default();
        std::thread::scope(|scope| {
            for _ in 0..STRIPES + 4 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        counter.inc_by(2);
                        histogram.observe(0.000_1);
                    }
                });
            }
        });
        assert_eq!(counter.get(), 2 * 1000 * (STRIPES as u64 + 4));
        let (sum, count, buckets) = histogram.totals();
        assert_eq!(count, 1000 * (STRIPES as u64 + 4));
        assert_eq!(buckets[1], (0.000_1, count), "0.1 ms is in the second bucket");
        assert!((sum - 0.000_1 * count as f64).abs() < 1e-9, "sum {sum}");
    }

    #[test]
    fn a_latency_histogram_reads_as_prometheus_clients_own() {
        let observations = [0.000_01, 0.000_05, 0.000_07, 0.003, 0.25, 6.0, 7.0, 1e9];
        let ours = LatencyHistogram::default();
        let theirs = Histogram::new(exponential_buckets(0.000_05, 2.0, BOUNDS as u16));
        for &seconds in &observations {
            ours.observe(seconds);
            theirs.observe(seconds);
        }
        assert_eq!(
            exposition(|registry| registry.register("latency", "help", ours)),
            exposition(|registry| registry.register("latency", "help", theirs)),
        );
    }
}
