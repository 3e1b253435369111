//! Retry pacing for background tasks: exponential (backon's schedule), capped, with
//! full jitter applied on top (each wait is uniform in `0..=step`), so many agents that
//! lost the same server do not come back in lockstep.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

#[derive(Debug, Clone, Copy)]
pub struct BackoffPolicy {
    pub min: Duration,
    pub max: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// One retry sequence; `reset` after a success.
#[derive(Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    steps: ExponentialBackoff,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            steps: schedule(policy),
        }
    }

    pub fn reset(&mut self) {
        self.steps = schedule(self.policy);
    }

    /// The next wait: uniform between zero and the current exponential step.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.steps.next().unwrap_or(self.policy.max);
        let millis = u64::try_from(step.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(fastrand::u64(0..=millis))
    }
}

fn schedule(policy: BackoffPolicy) -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(policy.min)
        .with_max_delay(policy.max)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_full_jitter_and_resets() {
        let policy = BackoffPolicy {
            min: Duration::from_millis(100),
            max: Duration::from_millis(800),
        };
        let mut b = Backoff::new(policy);
        let mut caps = Vec::new();
        for _ in 0..8 {
            caps.push(b.steps.next().unwrap().as_millis());
        }
        assert_eq!(caps, [100, 200, 400, 800, 800, 800, 800, 800]);
        let waits: Vec<Duration> = (0..200).map(|_| b.next_delay()).collect();
        assert!(waits.iter().all(|w| *w <= policy.max));
        assert!(
            waits.iter().any(|w| *w < policy.max / 2),
            "jitter spreads waits"
        );
        b.reset();
        assert_eq!(b.steps.next().unwrap(), policy.min);
    }
}
