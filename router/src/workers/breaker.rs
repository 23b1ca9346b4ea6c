//! A per-worker circuit breaker: stop sending requests to a worker that keeps failing, and probe it back.
//!
//! Closed (requests pass) → Open after [`BreakerConfig::failures`] consecutive failures, or at once on a hard failure
//! (the worker could not be reached) → after the backoff, HalfOpen: exactly one request (the probe) passes → Closed
//! when it succeeds, Open again with twice the backoff (up to [`BreakerConfig::max_backoff`]) when it fails. A failure
//! of an attempt that started before the last success is stale and ignored (a connection attempt made while the
//! worker was still starting must not reopen a breaker that a later attempt closed). Sans IO: the caller passes the
//! time, so the state machine is tested without sleeping.

use std::time::{Duration, Instant};

/// Breaker tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive (soft) failures that open the breaker.
    pub failures: u32,
    /// How long the breaker stays open the first time.
    pub backoff: Duration,
    /// The longest it stays open.
    pub max_backoff: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failures: 3, backoff: Duration::from_millis(500), max_backoff: Duration::from_secs(10) }
    }
}

/// What the breaker lets through (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    /// The backoff has passed: one probe may go (or is on its way).
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// `probing`: the one probe request is out.
    HalfOpen {
        probing: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    st: St,
    /// The next open period.
    backoff: Duration,
    /// When the worker last answered.
    last_success: Option<Instant>,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Self { cfg, st: St::Closed { failures: 0 }, backoff: cfg.backoff, last_success: None }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.st {
            St::Closed { .. } => BreakerState::Closed,
            St::Open { until } if now < until => BreakerState::Open,
            St::Open { .. } | St::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a request may go now (without taking the probe).
    pub fn can_pass(&self, now: Instant) -> bool {
        match self.st {
            St::Closed { .. } => true,
            St::Open { until } => now >= until,
            St::HalfOpen { probing } => !probing,
        }
    }

    /// Lets one request through if it may go; `Some(true)` when it is the half-open probe (the caller reports its
    /// outcome, or [`Breaker::release_probe`] if it has none), `None` when it may not go.
    pub fn admit(&mut self, now: Instant) -> Option<bool> {
        match self.st {
            St::Closed { .. } => Some(false),
            St::Open { until } if now < until => None,
            St::Open { .. } | St::HalfOpen { probing: false } => {
                self.st = St::HalfOpen { probing: true };
                Some(true)
            }
            St::HalfOpen { probing: true } => None,
        }
    }

    /// The worker answered at `now`: close.
    pub fn success(&mut self, now: Instant) {
        self.st = St::Closed { failures: 0 };
        self.backoff = self.cfg.backoff;
        self.last_success = Some(self.last_success.map_or(now, |t| t.max(now)));
    }

    /// An attempt that began at `started` failed at `now` (`hard`: the worker could not be reached at all). Returns
    /// true when this opened the breaker. Stale failures (the worker answered after the attempt began) are ignored.
    pub fn failure(&mut self, now: Instant, hard: bool, started: Instant) -> bool {
        if self.last_success.is_some_and(|t| t > started) {
            return false;
        }
        match self.st {
            St::Closed { failures } => {
                let failures = failures + 1;
                if hard || failures >= self.cfg.failures {
                    self.open(now);
                    true
                } else {
                    self.st = St::Closed { failures };
                    false
                }
            }
            // Already open: the failure of a request let through before it opened changes nothing.
            St::Open { .. } => false,
            St::HalfOpen { .. } => {
                self.open(now);
                true
            }
        }
    }

    /// The probe ended without telling whether the worker is well (its client went away): let another one go.
    pub fn release_probe(&mut self) {
        if let St::HalfOpen { probing: true } = self.st {
            self.st = St::HalfOpen { probing: false };
        }
    }

    fn open(&mut self, now: Instant) {
        self.st = St::Open { until: now + self.backoff };
        self.backoff = (self.backoff * 2).min(self.cfg.max_backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: BreakerConfig = BreakerConfig { failures: 3, backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(3) };

    #[test]
    fn opens_after_consecutive_failures_and_a_success_resets_the_count() {
        let t = Instant::now();
        let mut b = Breaker::new(CFG);
        assert!(!b.failure(t, false, t));
        assert!(!b.failure(t, false, t));
        b.success(t);
        assert!(!b.failure(t, false, t));
        assert!(!b.failure(t, false, t));
        assert_eq!(b.admit(t), Some(false), "two failures since the success: still closed");
        assert!(b.failure(t, false, t), "the third in a row opens it");
        assert_eq!(b.state(t), BreakerState::Open);
        assert!(!b.can_pass(t));
        assert_eq!(b.admit(t), None);
    }

    #[test]
    fn a_hard_failure_opens_at_once_and_one_probe_passes_after_the_backoff() {
        let t = Instant::now();
        let mut b = Breaker::new(CFG);
        assert!(b.failure(t, true, t));
        assert_eq!(b.admit(t + Duration::from_millis(999)), None);
        let later = t + Duration::from_secs(1);
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert!(b.can_pass(later));
        assert_eq!(b.admit(later), Some(true), "the probe");
        assert!(!b.can_pass(later));
        assert_eq!(b.admit(later), None, "only one probe at a time");
        // A probe whose client left tells nothing: another may go.
        b.release_probe();
        assert_eq!(b.admit(later), Some(true));
        b.success(t);
        assert_eq!(b.state(later), BreakerState::Closed);
        assert_eq!(b.admit(later), Some(false));
    }

    #[test]
    fn a_failed_probe_reopens_with_a_doubled_backoff_up_to_the_limit() {
        let mut t = Instant::now();
        let mut b = Breaker::new(CFG);
        b.failure(t, true, t); // open for 1 s
        for expected in [2, 3, 3] {
            t += Duration::from_secs(5);
            assert_eq!(b.admit(t), Some(true));
            assert!(b.failure(t, false, t), "a failed probe reopens");
            assert_eq!(b.admit(t + Duration::from_secs(expected) - Duration::from_millis(1)), None);
            assert!(b.can_pass(t + Duration::from_secs(expected)), "open for {expected} s");
        }
        // Failures of requests admitted before it opened change nothing while it is open.
        assert!(!b.failure(t, true, t));
        b.success(t);
        b.failure(t, true, t);
        assert!(b.can_pass(t + Duration::from_secs(1)), "a success resets the backoff");
    }

    #[test]
    fn a_failure_of_an_attempt_older_than_the_last_success_is_stale() {
        let t = Instant::now();
        let mut b = Breaker::new(CFG);
        // Started at t (the worker not listening yet), answered by another attempt at t+1, reported failed at t+2.
        b.success(t + Duration::from_secs(1));
        assert!(!b.failure(t + Duration::from_secs(2), true, t), "stale: ignored");
        assert_eq!(b.state(t + Duration::from_secs(2)), BreakerState::Closed);
        // An attempt begun after the success counts.
        assert!(b.failure(t + Duration::from_secs(2), true, t + Duration::from_secs(1) + Duration::from_millis(1)));
        assert_eq!(b.state(t + Duration::from_secs(2)), BreakerState::Open);
    }
}
