//! Small statistics for the figures of `apiserver_scale`: percentiles and the controller's
//! Prometheus histograms.

use std::collections::BTreeMap;

pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// `histogram_quantile` over the cumulative buckets `(le, count)` of a Prometheus histogram.
fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let mut b = buckets.to_vec();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut prev_le, mut prev_count) = (0.0, 0.0);
    for (le, count) in b {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            let width = count - prev_count;
            let frac = if width > 0.0 {
                (rank - prev_count) / width
            } else {
                1.0
            };
            return Some(prev_le + (le - prev_le) * frac);
        }
        (prev_le, prev_count) = (le, count);
    }
    None
}

/// A histogram of the controller's /metrics, summed over its label sets: the buckets, `_sum` and
/// `_count`; `None` when the controller does not expose it.
/// A Prometheus histogram: cumulative buckets `(le, count)`, `_sum` and `_count`.
struct Histogram {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

fn histogram(metrics: &str, name: &str) -> Option<Histogram> {
    let mut buckets: BTreeMap<String, f64> = BTreeMap::new();
    let (mut sum, mut count, mut found) = (0.0, 0.0, false);
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let base = series.split('{').next().unwrap_or_default();
        if base == format!("{name}_bucket") {
            found = true;
            let le = series
                .split("le=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or("+Inf")
                .to_string();
            *buckets.entry(le).or_default() += value;
        } else if base == format!("{name}_sum") {
            sum += value;
        } else if base == format!("{name}_count") {
            count += value;
            found = true;
        }
    }
    let buckets = buckets
        .into_iter()
        .map(|(le, n)| {
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            (le, n)
        })
        .collect();
    found.then_some(Histogram {
        buckets,
        sum,
        count,
    })
}

/// The decision latency by the controller's `twosite_fence_decision_seconds` histogram: p50 and
/// p99 (ms, when it has observations), mean (ms) and count; `None` when it has no such histogram.
pub fn decision_metric(metrics: &str) -> Option<(Option<f64>, Option<f64>, f64, f64)> {
    histogram(metrics, "twosite_fence_decision_seconds").map(
        |Histogram {
             buckets,
             sum,
             count,
         }| {
            (
                histogram_quantile(&buckets, 0.5).map(|s| s * 1000.0),
                histogram_quantile(&buckets, 0.99).map(|s| s * 1000.0),
                if count > 0.0 {
                    sum / count * 1000.0
                } else {
                    f64::NAN
                },
                count,
            )
        },
    )
}
