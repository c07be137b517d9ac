//! Summaries of repeated measurements (median, min, max) and the clock they are taken with.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The spread of one quantity over the repetitions of a benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// Summarises `samples`; no samples gives zeros with `n` = 0.
    pub fn of(samples: &[f64]) -> Summary {
        let mut s: Vec<f64> = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = match n {
            0 => 0.0,
            _ if n % 2 == 1 => s[n / 2],
            _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        };
        Summary { median, min: s.first().copied().unwrap_or(0.0), max: s.last().copied().unwrap_or(0.0), n }
    }

    /// `median (min–max)` with `decimals` digits, for the text report.
    pub fn show(&self, decimals: usize) -> String {
        format!("{:.d$} ({:.d$}–{:.d$})", self.median, self.min, self.max, d = decimals)
    }
}

/// Milliseconds, as the reports give times.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `f` and answers its result with how long it took in milliseconds.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    (out, ms(t.elapsed()))
}

/// [`timed`] for a future.
pub async fn timed_async<T>(f: impl Future<Output = T>) -> (T, f64) {
    let t = Instant::now();
    let out = f.await;
    (out, ms(t.elapsed()))
}

/// `a / b`, or NaN (null in JSON) when `b` is zero.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        f64::NAN
    } else {
        a / b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(Summary::of(&[3.0, 1.0, 2.0]).median, 2.0);
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 4));
        assert_eq!(Summary::of(&[]).n, 0);
    }
}
