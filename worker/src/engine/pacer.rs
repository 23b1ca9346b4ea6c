//! Step pacing for chunked prefill: while any stream decodes, each step's token count is chosen so the step takes
//! about a target time, from the measured cost of a token. Without it a prompt arriving mid-stream takes the whole
//! token budget in one step, and every running stream waits that long for its next token (on a 2-core CPU, 256
//! prompt tokens are most of a second). With it the prompt is prefilled over several shorter steps, each still
//! carrying the decode rows; the prompt's total work is the same, so its time to first token changes little.
//!
//! Pure arithmetic over the step times the engine thread measures (`super::core`); the scheduler gets the result
//! ([`super::step::EngineCore::set_decode_step_tokens`]) and never sees a clock.

use std::time::Duration;

/// Steps of fewer tokens, or mostly of decode rows, are not measured: their time is mostly the step's fixed cost
/// (every weight is read once per step whatever the batch) and the decode rows' attention, which would overstate what
/// one more prompt token costs.
const MIN_SAMPLE_TOKENS: usize = 32;
/// Weight of the newest measurement in the running estimate.
const EMA_WEIGHT: f64 = 0.25;

/// The running estimate of one token's cost and the token count that fits the target.
#[derive(Debug, Clone)]
pub(crate) struct StepPacer {
    target: Duration,
    max_tokens: usize,
    /// Seconds per token, once a step has been measured.
    per_token: Option<f64>,
}

impl StepPacer {
    pub(crate) fn new(target: Duration, max_tokens: usize) -> Self {
        Self { target, max_tokens, per_token: None }
    }

    /// Records a step that computed `tokens` tokens, `prompt_tokens` of them prompt (prefill) tokens, in `elapsed`.
    pub(crate) fn observe(&mut self, tokens: usize, prompt_tokens: usize, elapsed: Duration) {
        if tokens < MIN_SAMPLE_TOKENS || 2 * prompt_tokens < tokens {
            return;
        }
        let cost = elapsed.as_secs_f64() / tokens as f64;
        self.per_token = Some(match self.per_token {
            Some(old) => old + EMA_WEIGHT * (cost - old),
            None => cost,
        });
    }

    /// Tokens a step may compute while any stream decodes; `None` (the full budget) until a step was measured.
    pub(crate) fn tokens(&self) -> Option<usize> {
        let per_token = self.per_token?;
        let fit = self.target.as_secs_f64() / per_token.max(1e-9);
        Some((fit as usize).clamp(1, self.max_tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_limit_until_measured_and_small_steps_do_not_count() {
        let mut p = StepPacer::new(Duration::from_millis(100), 256);
        assert_eq!(p.tokens(), None);
        // A decode step of 4 rows: mostly fixed cost, not a measure of a token; nor is a step of 64 decode rows.
        p.observe(4, 0, Duration::from_millis(40));
        p.observe(64, 0, Duration::from_millis(300));
        p.observe(64, 20, Duration::from_millis(300));
        assert_eq!(p.tokens(), None);
        p.observe(200, 190, Duration::from_millis(500));
        // 2.5 ms a token: 40 tokens fit in 100 ms.
        assert_eq!(p.tokens(), Some(40));
    }

    #[test]
    fn follows_the_measured_cost_and_stays_within_the_budget() {
        let mut p = StepPacer::new(Duration::from_millis(100), 256);
        p.observe(100, 100, Duration::from_millis(100)); // 1 ms a token
        assert_eq!(p.tokens(), Some(100));
        // Tokens get dearer (longer contexts): the estimate moves a quarter of the way each step.
        for _ in 0..40 {
            p.observe(50, 50, Duration::from_millis(200)); // 4 ms a token
        }
        assert_eq!(p.tokens(), Some(25));
        // Very cheap tokens: never more than the budget.
        for _ in 0..80 {
            p.observe(1000, 1000, Duration::from_millis(1));
        }
        assert_eq!(p.tokens(), Some(256));
    }
}
