//! Exponential backoff with jitter, shared by the provider's retries and the rotation loop.
//!
//! Invariant: delays grow from `initial` by doubling up to `cap`, each drawn uniformly from
//! the upper half of the current step ("equal jitter"), so many rotators that failed together
//! do not retry together, and no delay exceeds `cap`.

use rand::Rng;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, cap: Duration) -> Self {
        Backoff {
            initial,
            cap: cap.max(initial),
            attempt: 0,
        }
    }

    /// Vault Agent's schedule: 1 s growing to 5 min.
    pub(crate) fn vault_like() -> Self {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(300))
    }

    /// The step before jitter for the current attempt.
    fn step(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(30)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.cap)
    }

    /// The next delay: a server's `Retry-After`, when it sent one (capped), else the jittered
    /// step.
    pub(crate) fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let step = self.step();
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let jittered = half + rand::rng().random_range(Duration::ZERO..=step - half);
        match retry_after {
            Some(ra) => ra.min(self.cap),
            None => jittered,
        }
    }

    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_and_stays_under_the_cap() {
        let mut b = Backoff::vault_like();
        let mut prev_step = Duration::ZERO;
        for i in 0..20 {
            let step = b.step();
            assert!(step >= prev_step);
            let d = b.next_delay(None);
            assert!(
                d >= step / 2 && d <= step,
                "attempt {i}: {d:?} not within [{:?}, {step:?}]",
                step / 2
            );
            assert!(d <= Duration::from_secs(300));
            prev_step = step;
        }
        assert_eq!(prev_step, Duration::from_secs(300));
        b.reset();
        assert!(b.next_delay(None) <= Duration::from_secs(1));
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(7000))),
            Duration::from_secs(60)
        );
    }
}
