//! Request and error rates per app over the last hour, for the dashboard's sparklines: the
//! proxy's counters ([`crate::proxy::ProxyMetrics::app_totals`], atomics only) sampled every
//! [`STEP`] by one task that `escale serve` runs and ends at shutdown; each app keeps the
//! requests, 5xx answers and latency histogram of its last [`POINTS`] steps, so the page
//! shows the last hour's percentiles ([`summed`]) and a p95 line per step.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::proxy::metrics::AppTotals;
use crate::proxy::ProxyMetrics;

/// Time between samples.
pub const STEP: Duration = Duration::from_secs(30);
/// Samples kept: one hour.
pub const POINTS: usize = 120;

/// Requests, 5xx answers and times to the response head (per latency bucket) in one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Point {
    pub requests: u64,
    pub errors: u64,
    /// Responses per latency bucket in this step (bounds in
    /// [`crate::proxy::metrics::BUCKET_BOUNDS_MS`]).
    pub latency: [u64; 11],
}

impl Point {
    /// This step's counts as [`AppTotals`] (for its quantiles).
    fn totals(&self) -> AppTotals {
        AppTotals {
            requests: self.requests,
            errors: self.errors,
            buckets: self.latency,
            ..Default::default()
        }
    }

    /// The bucket bound under which `q` of this step's responses' times fall, in ms.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        self.totals().quantile_ms(q)
    }
}

/// The steps of `points` summed: the last hour's counts, for its quantiles.
pub fn summed(points: &[Point]) -> AppTotals {
    let mut t = AppTotals::default();
    for p in points {
        t.requests += p.requests;
        t.errors += p.errors;
        for (i, n) in p.latency.iter().enumerate() {
            t.buckets[i] += n;
        }
    }
    t
}

#[derive(Debug, Default)]
struct AppSeries {
    last: AppTotals,
    points: VecDeque<Point>,
}

/// The sampled series of every app the proxy has seen.
#[derive(Debug, Default)]
pub struct Rates {
    apps: Mutex<HashMap<String, AppSeries>>,
}

impl Rates {
    pub fn new() -> Rates {
        Rates::default()
    }

    /// Takes one sample of `app`'s counters (the difference since the previous one).
    pub fn sample(&self, app: &str, now: AppTotals) {
        let mut apps = self.apps.lock().unwrap_or_else(PoisonError::into_inner);
        let s = apps.entry(app.to_string()).or_default();
        let point = Point {
            requests: now.requests.saturating_sub(s.last.requests),
            errors: now.errors.saturating_sub(s.last.errors),
            latency: std::array::from_fn(|i| now.buckets[i].saturating_sub(s.last.buckets[i])),
        };
        s.last = now;
        s.points.push_back(point);
        while s.points.len() > POINTS {
            s.points.pop_front();
        }
    }

    /// `app`'s points, oldest first (empty before its first request).
    pub fn series(&self, app: &str) -> Vec<Point> {
        let apps = self.apps.lock().unwrap_or_else(PoisonError::into_inner);
        apps.get(app)
            .map(|s| s.points.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Samples every app of `metrics` each [`STEP`] until `stop` resolves.
    pub async fn run(self: Arc<Self>, metrics: Arc<ProxyMetrics>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(STEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {
                    for app in metrics.app_names() {
                        if let Some(t) = metrics.app_totals(&app) {
                            self.sample(&app, t);
                        }
                    }
                }
            }
        }
    }
}

/// Requests per second over the last step of `points`.
pub fn per_second(points: &[Point]) -> f64 {
    points
        .last()
        .map_or(0.0, |p| p.requests as f64 / STEP.as_secs_f64())
}

/// An SVG polyline's `points` for `values` in a `w`×`h` box, `max` at the top.
pub fn polyline(values: &[u64], max: u64, w: f64, h: f64) -> String {
    if values.is_empty() {
        return String::new();
    }
    let max = max.max(1) as f64;
    let step = if values.len() > 1 {
        w / (values.len() - 1) as f64
    } else {
        0.0
    };
    values
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * step, h - (*v as f64 / max) * h))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_differences_and_keep_one_hour() {
        let r = Rates::new();
        let t = |requests, errors| AppTotals {
            requests,
            errors,
            ..Default::default()
        };
        r.sample("a", t(10, 1));
        r.sample("a", t(25, 1));
        r.sample("a", t(25, 4));
        assert_eq!(
            r.series("a"),
            vec![
                Point {
                    requests: 10,
                    errors: 1,
                    ..Default::default()
                },
                Point {
                    requests: 15,
                    errors: 0,
                    ..Default::default()
                },
                Point {
                    requests: 0,
                    errors: 3,
                    ..Default::default()
                },
            ]
        );
        for i in 0..200 {
            r.sample("a", t(25 + i, 4));
        }
        assert_eq!(r.series("a").len(), POINTS);
        assert!(r.series("b").is_empty());
        assert!(
            (per_second(&[Point {
                requests: 60,
                errors: 0,
                ..Default::default()
            }]) - 2.0)
                .abs()
                < 1e-9
        );
    }

    #[test]
    fn the_last_hours_percentiles_come_from_the_steps_histograms() {
        let r = Rates::new();
        let t = |fast: u64, slow: u64| {
            let mut buckets = [0; 11];
            buckets[0] = fast; // <= 5 ms
            buckets[6] = slow; // <= 500 ms
            AppTotals {
                requests: fast + slow,
                buckets,
                ..Default::default()
            }
        };
        // Since start: 1,000 slow answers before the hour (the first sample's difference
        // includes them; the hour drops that step once it is old).
        r.sample("a", t(0, 1000));
        for i in 1..=POINTS as u64 {
            r.sample("a", t(100 * i, 1000));
        }
        let hour = r.series("a");
        assert_eq!(hour.len(), POINTS);
        let all = summed(&hour);
        assert_eq!(all.requests, 100 * POINTS as u64);
        assert_eq!(all.quantile_ms(0.99), Some(5.0), "the slow ones are older");
        assert_eq!(hour[0].quantile_ms(0.5), Some(5.0));
        assert_eq!(Point::default().quantile_ms(0.5), None);
    }

    #[test]
    fn a_polyline_spans_the_box() {
        assert_eq!(
            polyline(&[0, 5, 10], 10, 100.0, 20.0),
            "0.0,20.0 50.0,10.0 100.0,0.0"
        );
        assert_eq!(polyline(&[0, 5], 20, 100.0, 20.0), "0.0,20.0 100.0,15.0");
        assert_eq!(polyline(&[], 0, 100.0, 20.0), "");
        assert_eq!(polyline(&[0, 0], 0, 10.0, 20.0), "0.0,20.0 10.0,20.0");
    }
}
