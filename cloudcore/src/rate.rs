//! Rate limits: a token bucket on `tokio::time` (so tests run with paused time).

use std::sync::Mutex;
use std::time::Duration;

/// A token bucket: `rate` units (bytes, handshakes) per second, bursts up to one second's
/// worth; a taker waits while the bucket is in debt.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    state: Mutex<(f64, tokio::time::Instant)>,
}

impl Bucket {
    pub(crate) fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        Self {
            rate,
            state: Mutex::new((rate, tokio::time::Instant::now())),
        }
    }

    /// Takes `n` units; waits while the bucket is in debt.
    pub(crate) async fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokio::time::Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
            s.0 = (s.0 + refill).min(self.rate) - n as f64;
            s.1 = now;
            if s.0 < 0.0 {
                Duration::from_secs_f64(-s.0 / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_bucket_holds_takers_to_its_rate() {
        let bucket = Bucket::new(1000);
        let start = tokio::time::Instant::now();
        bucket.take(1000).await;
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "one second's worth at once"
        );
        for _ in 0..3 {
            bucket.take(1000).await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(2990) && took <= Duration::from_millis(3010),
            "{took:?}"
        );
    }
}
