//! Sampling and stopping parameters: defaults, validation, and conversion from the wire.
//!
//! The proto marks every sampling field `optional` because proto3's zero is not the semantic default (an unset
//! temperature is 1.0, not greedy; sglang's scheduler proto documents the same trap). [`SamplingParams::from_proto`]
//! applies the defaults here, in one place, and [`SamplingParams::validate`] names the offending field.
//!
//! These are the one set of rules: the router validates a request with them before it picks a worker (rendering a
//! [`ParamError`] as an OpenAI error naming the field), and the worker checks what arrives over gRPC with them again
//! (rejecting with a structured [`crate::proto::worker::Rejection`]).

use crate::proto::worker as pb;

/// Maximum `top_logprobs` (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Maximum completions per request (`n`).
pub const MAX_N: u32 = 16;
/// Largest temperature (OpenAI's range is [0, 2]).
pub const MAX_TEMPERATURE: f32 = 2.0;
/// Largest `logit_bias` magnitude (OpenAI's range is [-100, 100]).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// Validated sampling parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: u32,
    /// Minimum probability relative to the top token, in [0, 1]; 0 = off.
    pub min_p: f32,
    /// > 0; 1 = off. Divides positive logits (multiplies negative ones) of tokens seen in prompt or output.
    pub repetition_penalty: f32,
    /// In [-2, 2]; subtracted once from logits of tokens present in the output.
    pub presence_penalty: f32,
    /// In [-2, 2]; subtracted per occurrence in the output.
    pub frequency_penalty: f32,
    /// Added to logits before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// Per-request seed; `None` draws one at admission.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

/// When to stop and what to report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoppingParams {
    pub max_new_tokens: u32,
    pub min_tokens: u32,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub logprobs: bool,
    pub top_logprobs: u32,
}

/// A bad parameter: the field name (as on the wire) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {message}")]
pub struct ParamError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> ParamError {
    ParamError { field, message: message.into() }
}

impl SamplingParams {
    /// Applies defaults to unset wire fields. `top_k` ≤ 0 on the wire means off (OpenAI-style -1 included).
    pub fn from_proto(p: Option<&pb::SamplingParams>, logit_bias: &[pb::LogitBias], seed: Option<u64>) -> Self {
        let d = Self::default();
        let p = p.cloned().unwrap_or_default();
        Self {
            temperature: p.temperature.unwrap_or(d.temperature),
            top_p: p.top_p.unwrap_or(d.top_p),
            top_k: p.top_k.map_or(0, |k| u32::try_from(k).unwrap_or(0)),
            min_p: p.min_p.unwrap_or(d.min_p),
            repetition_penalty: p.repetition_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: p.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: p.frequency_penalty.unwrap_or(d.frequency_penalty),
            logit_bias: logit_bias.iter().map(|b| (b.token_id, b.bias)).collect(),
            seed,
        }
    }

    /// Checks ranges; `vocab_size` bounds logit-bias token ids.
    pub fn validate(&self, vocab_size: usize) -> Result<(), ParamError> {
        let finite = |f: &'static str, v: f32| if v.is_finite() { Ok(()) } else { Err(bad(f, "must be a finite number")) };
        finite("temperature", self.temperature)?;
        if !(0.0..=MAX_TEMPERATURE).contains(&self.temperature) {
            return Err(bad("temperature", format!("must be in [0, {MAX_TEMPERATURE}], got {}", self.temperature)));
        }
        finite("top_p", self.top_p)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        finite("min_p", self.min_p)?;
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(bad("min_p", format!("must be in [0, 1], got {}", self.min_p)));
        }
        finite("repetition_penalty", self.repetition_penalty)?;
        if self.repetition_penalty <= 0.0 {
            return Err(bad("repetition_penalty", format!("must be > 0, got {}", self.repetition_penalty)));
        }
        for (f, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            finite(f, v)?;
            if !(-2.0..=2.0).contains(&v) {
                return Err(bad(f, format!("must be in [-2, 2], got {v}")));
            }
        }
        for &(id, b) in &self.logit_bias {
            if id as usize >= vocab_size {
                return Err(bad("logit_bias", format!("token id {id} is out of range (vocab size {vocab_size})")));
            }
            if !(b.is_finite() && (-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&b)) {
                return Err(bad("logit_bias", format!("bias for token {id} must be in [-100, 100], got {b}")));
            }
        }
        Ok(())
    }
}

impl StoppingParams {
    /// Checks stop ids against the vocabulary, the logprobs options and `min_tokens` against the budget.
    pub fn validate(&self, vocab_size: usize) -> Result<(), ParamError> {
        if let Some(id) = self.stop_token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(bad("stop_token_ids", format!("token id {id} is out of range (vocab size {vocab_size})")));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(bad("top_logprobs", format!("must be <= {MAX_TOP_LOGPROBS}, got {}", self.top_logprobs)));
        }
        if self.top_logprobs > 0 && !self.logprobs {
            return Err(bad("top_logprobs", "requires `logprobs` to be true"));
        }
        if self.max_new_tokens > 0 && self.min_tokens > self.max_new_tokens {
            return Err(bad("min_tokens", format!("({}) must be <= max_new_tokens ({})", self.min_tokens, self.max_new_tokens)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_fields_get_semantic_defaults_not_zero() {
        let p = SamplingParams::from_proto(None, &[], None);
        assert_eq!(p, SamplingParams::default());
        assert_eq!(p.temperature, 1.0);
        let wire = pb::SamplingParams { temperature: Some(0.0), top_k: Some(-1), ..Default::default() };
        let p = SamplingParams::from_proto(Some(&wire), &[pb::LogitBias { token_id: 5, bias: -3.0 }], Some(7));
        assert_eq!((p.temperature, p.top_k, p.top_p, p.seed), (0.0, 0, 1.0, Some(7)));
        assert_eq!(p.logit_bias, vec![(5, -3.0)]);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (SamplingParams { temperature: -1.0, ..Default::default() }, "temperature"),
            (SamplingParams { temperature: 2.5, ..Default::default() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { min_p: 1.5, ..Default::default() }, "min_p"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
            (SamplingParams { presence_penalty: 3.0, ..Default::default() }, "presence_penalty"),
            (SamplingParams { frequency_penalty: -2.5, ..Default::default() }, "frequency_penalty"),
            (SamplingParams { logit_bias: vec![(100, 1.0)], ..Default::default() }, "logit_bias"),
            (SamplingParams { logit_bias: vec![(1, 101.0)], ..Default::default() }, "logit_bias"),
        ];
        for (p, field) in cases {
            let e = p.validate(100).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().starts_with(&format!("`{field}`")));
        }
        assert!(SamplingParams::default().validate(100).is_ok());
        let s = |f: fn(&mut StoppingParams)| {
            let mut p = StoppingParams::default();
            f(&mut p);
            p.validate(100).map_err(|e| e.field)
        };
        assert_eq!(s(|p| p.stop_token_ids = vec![100]), Err("stop_token_ids"));
        assert_eq!(s(|p| p.top_logprobs = 3), Err("top_logprobs"));
        assert_eq!(s(|p| (p.logprobs, p.top_logprobs) = (true, 21)), Err("top_logprobs"));
        assert_eq!(s(|p| (p.max_new_tokens, p.min_tokens) = (2, 3)), Err("min_tokens"));
        assert_eq!(s(|p| (p.logprobs, p.top_logprobs) = (true, 20)), Ok(()));
    }
}
