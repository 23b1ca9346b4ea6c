//! Edge validation: OpenAI requests become [`ValidRequest`]s (parse, don't validate). The value ranges are
//! `ferrite_common::sampling`'s, the same rules the worker applies (temperature [0, 2], top_p (0, 1], penalties
//! [-2, 2], n in [1, 16], logprobs ≤ 20, ...); this module adds what only the OpenAI surface has (string
//! `logit_bias` keys, `top_k` -1, `max_tokens` ≥ 1, the context limit). Every error names its OpenAI field.

use ferrite_common::proto::worker as pb;
use ferrite_common::sampling::{MAX_N, MAX_TOP_LOGPROBS, ParamError, SamplingParams, StoppingParams};

use crate::openai::error::{ApiError, ErrorKind};
use crate::openai::types::CommonParams;

/// The OpenAI request field for a field of the worker protocol (`GenerateRequest` and its sampling params).
pub(crate) fn openai_param(wire_field: &str) -> Option<&'static str> {
    Some(match wire_field {
        "max_new_tokens" => "max_tokens",
        "prompt_ids" => "prompt",
        "stop_token_ids" => "stop",
        "temperature" => "temperature",
        "top_p" => "top_p",
        "top_k" => "top_k",
        "min_p" => "min_p",
        "repetition_penalty" => "repetition_penalty",
        "presence_penalty" => "presence_penalty",
        "frequency_penalty" => "frequency_penalty",
        "logit_bias" => "logit_bias",
        "logprobs" => "logprobs",
        "top_logprobs" => "top_logprobs",
        "min_tokens" => "min_tokens",
        "n" => "n",
        "seed" => "seed",
        // The worker could not compile the grammar (`response_format` or a `guided_*` field).
        "constraint" => "response_format",
        _ => return None,
    })
}

fn param_error(e: ParamError) -> ApiError {
    ApiError { param: openai_param(e.field).map(str::to_string), ..ApiError::new(ErrorKind::InvalidRequest, e.to_string()) }
}

/// Which logprobs shape the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsMode {
    None,
    /// Completions: `logprobs: N` alternatives.
    Completion(u32),
    /// Chat: `logprobs: true` with `top_logprobs` alternatives.
    Chat(u32),
}

/// A validated request, ready to send to a worker once per prompt.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompts: Vec<Vec<u32>>,
    pub max_new_tokens: Vec<u32>,
    pub n: u32,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: LogprobsMode,
    pub echo: bool,
    /// Template of the worker request (id, prompt and max_new_tokens are filled per prompt).
    pub proto: pb::GenerateRequest,
    /// Chat with tools: the output is parsed into tool calls.
    pub tools: Option<std::sync::Arc<crate::openai::tools::ToolSet>>,
    /// The request field `proto.constraint` came from: a worker that cannot compile the grammar is reported as a
    /// 400 naming it.
    pub constraint_field: Option<&'static str>,
}

impl ValidRequest {
    /// A worker's error, with a grammar it refused (`constraint`, reported as `response_format`) named after the
    /// field that asked for it.
    pub fn name_constraint(&self, mut e: ApiError) -> ApiError {
        if let Some(field) = self.constraint_field
            && e.param.as_deref() == openai_param("constraint")
        {
            e.param = Some(field.to_string());
        }
        e
    }
}

/// Facts about the served model the validator needs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_model_len: usize,
    pub vocab_size: usize,
}

/// Validates the shared fields and builds the worker request template.
/// `max_tokens` is the client's limit (None ⇒ `default_max(prompt_len)`).
pub fn validate(
    common: CommonParams,
    prompts: Vec<Vec<u32>>,
    max_tokens: Option<u32>,
    default_max: impl Fn(usize) -> u32,
    logprobs: LogprobsMode,
    echo: bool,
    limits: Limits,
) -> Result<ValidRequest, ApiError> {
    if let Some(k) = common.top_k
        && k < -1
    {
        return Err(ApiError::invalid("top_k", format!("`top_k` must be -1 (off) or >= 0, got {k}")));
    }
    let n = common.n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::invalid("n", format!("`n` must be in [1, {MAX_N}], got {n}")));
    }
    match logprobs {
        LogprobsMode::Completion(k) | LogprobsMode::Chat(k) if k > MAX_TOP_LOGPROBS => {
            let field = if matches!(logprobs, LogprobsMode::Chat(_)) { "top_logprobs" } else { "logprobs" };
            return Err(ApiError::invalid(field, format!("`{field}` must be <= {MAX_TOP_LOGPROBS}, got {k}")));
        }
        _ => {}
    }
    if max_tokens == Some(0) {
        return Err(ApiError::invalid("max_tokens", "`max_tokens` must be >= 1"));
    }
    let mut logit_bias = Vec::new();
    for (k, &b) in common.logit_bias.iter().flatten() {
        let id: u32 = k.parse().map_err(|_| ApiError::invalid("logit_bias", format!("`logit_bias` key `{k}` is not a token id")))?;
        logit_bias.push(pb::LogitBias { token_id: id, bias: b });
    }
    logit_bias.sort_by_key(|b| b.token_id);
    let mut max_new = Vec::with_capacity(prompts.len());
    for p in &prompts {
        if p.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt is empty"));
        }
        if let Some(&id) = p.iter().find(|&&t| t as usize >= limits.vocab_size) {
            return Err(ApiError::invalid("prompt", format!("token id {id} is out of range (vocab size {})", limits.vocab_size)));
        }
        let m = max_tokens.unwrap_or_else(|| default_max(p.len()));
        if p.len() + m as usize > limits.max_model_len || m == 0 {
            return Err(ApiError {
                param: Some("max_tokens".into()),
                ..ApiError::new(
                    ErrorKind::ContextLength,
                    format!(
                        "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the prompt, {m} for the completion). Please reduce the prompt or max_tokens.",
                        limits.max_model_len,
                        p.len() + m as usize,
                        p.len()
                    ),
                )
            });
        }
        max_new.push(m);
    }
    let (constraint_field, constraint) = crate::openai::constraint::constraint_of(&common)?.unzip();
    let stops: Vec<String> = common.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > 16 {
        return Err(ApiError::invalid("stop", "at most 16 stop sequences"));
    }
    let (want_lp, top) = match logprobs {
        LogprobsMode::None => (false, 0),
        LogprobsMode::Completion(k) | LogprobsMode::Chat(k) => (true, k),
    };
    let sampling = pb::SamplingParams {
        temperature: common.temperature,
        top_p: common.top_p,
        top_k: common.top_k,
        min_p: common.min_p,
        repetition_penalty: common.repetition_penalty,
        presence_penalty: common.presence_penalty,
        frequency_penalty: common.frequency_penalty,
    };
    // The worker's own rules, checked here first so a bad request never reaches a worker.
    SamplingParams::from_proto(Some(&sampling), &logit_bias, common.seed).validate(limits.vocab_size).map_err(param_error)?;
    let min_tokens = common.min_tokens.unwrap_or(0);
    for &m in &max_new {
        let stopping = StoppingParams { max_new_tokens: m, min_tokens, logprobs: want_lp, top_logprobs: top, ..Default::default() };
        stopping.validate(limits.vocab_size).map_err(param_error)?;
    }
    let proto = pb::GenerateRequest {
        sampling: Some(sampling),
        ignore_eos: common.ignore_eos,
        seed: common.seed,
        logprobs: want_lp,
        top_logprobs: top,
        min_tokens,
        logit_bias,
        n,
        constraint,
        ..Default::default()
    };
    Ok(ValidRequest {
        prompts,
        max_new_tokens: max_new,
        n,
        stops,
        stream: common.stream,
        include_usage: common.stream_options.is_some_and(|o| o.include_usage),
        logprobs,
        echo,
        proto,
        tools: None,
        constraint_field,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_model_len: 100, vocab_size: 1000 };

    fn check(common: CommonParams, max_tokens: Option<u32>) -> Result<ValidRequest, ApiError> {
        validate(common, vec![vec![1, 2, 3]], max_tokens, |p| (100 - p) as u32, LogprobsMode::None, false, LIMITS)
    }

    #[test]
    fn ranges_name_their_field() {
        let bad: Vec<(CommonParams, &str)> = vec![
            (CommonParams { temperature: Some(2.5), ..Default::default() }, "temperature"),
            (CommonParams { top_p: Some(0.0), ..Default::default() }, "top_p"),
            (CommonParams { presence_penalty: Some(-3.0), ..Default::default() }, "presence_penalty"),
            (CommonParams { frequency_penalty: Some(2.1), ..Default::default() }, "frequency_penalty"),
            (CommonParams { n: Some(0), ..Default::default() }, "n"),
            (CommonParams { top_k: Some(-2), ..Default::default() }, "top_k"),
            (CommonParams { logit_bias: Some([("x".to_string(), 1.0)].into()), ..Default::default() }, "logit_bias"),
            (CommonParams { logit_bias: Some([("5".to_string(), 101.0)].into()), ..Default::default() }, "logit_bias"),
        ];
        for (c, field) in bad {
            let e = check(c, None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{e:?}");
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
        }
        assert_eq!(check(CommonParams::default(), Some(0)).unwrap_err().param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn context_limit_and_defaults() {
        let e = check(CommonParams::default(), Some(98)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ContextLength);
        assert_eq!(e.body().error.code, "context_length_exceeded");
        let ok = check(CommonParams { temperature: Some(0.0), n: Some(2), ..Default::default() }, None).unwrap();
        assert_eq!(ok.max_new_tokens, vec![97]);
        assert_eq!(ok.proto.n, 2);
        assert_eq!(ok.proto.sampling.unwrap().temperature, Some(0.0));
    }
}
