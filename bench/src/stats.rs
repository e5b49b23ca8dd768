//! Percentiles, medians and a lock-free latency histogram.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Deserializer, Serialize};

/// p50 / p99 / max (and count) of a set of samples, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Dist {
    /// Samples.
    pub count: u64,
    /// Median.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p50: f64,
    /// 99th percentile.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub p99: f64,
    /// Largest sample.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub max: f64,
}

/// JSON has no NaN: serde_json writes it as null; read null back as NaN.
pub fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// NaN: the serde default of a figure that older results do not have.
pub fn nan() -> f64 {
    f64::NAN
}

/// A distribution of no samples (NaN figures): the serde default of a distribution
/// that older results do not have.
pub fn nan_dist() -> Dist {
    Dist {
        count: 0,
        p50: f64::NAN,
        p99: f64::NAN,
        max: f64::NAN,
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Dist {
    /// From raw samples (any order).
    pub fn of(mut samples: Vec<f64>) -> Dist {
        samples.retain(|s| s.is_finite());
        samples.sort_by(f64::total_cmp);
        Dist {
            count: samples.len() as u64,
            p50: percentile(&samples, 50.0),
            p99: percentile(&samples, 99.0),
            max: samples.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Median of the finite values (NaN when there are none).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median of each field of several distributions.
pub fn median_dist(ds: &[Dist]) -> Dist {
    Dist {
        count: median(ds.iter().map(|d| d.count as f64)) as u64,
        p50: median(ds.iter().map(|d| d.p50)),
        p99: median(ds.iter().map(|d| d.p99)),
        max: median(ds.iter().map(|d| d.max)),
    }
}

/// Bucket width of [`Histogram`].
const BUCKET_US: u64 = 25;
/// Buckets of [`Histogram`]: 25 µs wide up to 30 s; later samples land in the last one.
const BUCKETS: usize = (30_000_000 / BUCKET_US) as usize;

/// A fixed-resolution (25 µs) histogram that many tasks record into at once; used
/// where storing every sample (millions of deliveries) would cost too much memory.
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    max_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one sample, in microseconds.
    pub fn record_us(&self, us: u64) {
        let i = ((us / BUCKET_US) as usize).min(BUCKETS - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// The distribution so far (bucket upper bounds, so within 25 µs).
    pub fn dist(&self) -> Dist {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let at = |p: f64| -> f64 {
            if total == 0 {
                return f64::NAN;
            }
            let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return ((i as u64 + 1) * BUCKET_US) as f64 / 1000.0;
                }
            }
            f64::NAN
        };
        Dist {
            count: total,
            p50: at(50.0),
            p99: at(99.0),
            max: if total == 0 {
                f64::NAN
            } else {
                self.max_us.load(Ordering::Relaxed) as f64 / 1000.0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let d = Dist::of((1..=100).map(f64::from).collect());
        assert_eq!((d.p50, d.p99, d.max, d.count), (50.0, 99.0, 100.0, 100));
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median([]).is_nan());
        let h = Histogram::default();
        for us in [100, 200, 300, 40_000] {
            h.record_us(us);
        }
        let d = h.dist();
        assert_eq!(d.count, 4);
        assert_eq!(d.p50, 0.2 + 0.025);
        assert_eq!(d.max, 40.0);
    }
}
