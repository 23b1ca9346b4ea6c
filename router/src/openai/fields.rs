//! The chat request fields the openai SDK can send that Ferrite does not act on, and what it does with each (the
//! README's "Request fields" table lists the same decisions). A field is accepted and ignored only when ignoring it
//! cannot change what the client gets back; otherwise it is refused with a 400 naming it, because a silently dropped
//! `audio` or `web_search_options` would hand the client an answer that only looks like what it asked for.
//!
//! Honoured elsewhere: `max_completion_tokens` (over `max_tokens`), `stop` (a string or up to 16 strings; OpenAI's
//! limit is 4), `response_format` and the vLLM `guided_*` fields ([`super::constraint`]).

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;

/// Chat fields checked here (absent and `null` are the same).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ChatExtras {
    /// Ignored: tags for stored completions, and nothing is stored.
    pub metadata: Option<Value>,
    /// `true` is refused: nothing is stored, so a later retrieval would find nothing.
    pub store: Option<bool>,
    /// `auto` and `default` are accepted (there is one tier); `flex`, `priority` or `scale` are refused.
    pub service_tier: Option<String>,
    /// `["text"]` is accepted; any other output modality is refused.
    pub modalities: Option<Vec<String>>,
    /// Refused: no audio output.
    pub audio: Option<Value>,
    /// Ignored: a predicted output only speeds generation up at OpenAI; the text is the same without it.
    pub prediction: Option<Value>,
    /// Refused: the served models do not reason, so no effort level would change anything.
    pub reasoning_effort: Option<String>,
    /// Refused: there is no web search.
    pub web_search_options: Option<Value>,
    /// Tool calling ([`super::tools`]).
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    /// The deprecated function-calling fields: refused (use `tools`).
    pub functions: Option<Vec<Value>>,
    pub function_call: Option<Value>,
    /// Ignored: a forced call (`required`, named) is one call; with `auto` the model may write several.
    pub parallel_tool_calls: Option<bool>,
}

impl ChatExtras {
    /// The first field that cannot be served as asked, as a 400 naming it.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.store == Some(true) {
            return Err(ApiError::invalid("store", "`store: true` is not supported: this server does not store completions"));
        }
        if let Some(t) = self.service_tier.as_deref()
            && !matches!(t, "auto" | "default")
        {
            return Err(ApiError::invalid("service_tier", format!("`service_tier` `{t}` is not offered; use `auto` or `default`")));
        }
        if let Some(m) = self.modalities.iter().flatten().find(|m| m.as_str() != "text") {
            return Err(ApiError::invalid("modalities", format!("output modality `{m}` is not supported (only `text`)")));
        }
        if self.audio.is_some() {
            return Err(ApiError::invalid("audio", "audio output is not supported"));
        }
        if let Some(e) = &self.reasoning_effort {
            return Err(ApiError::invalid(
                "reasoning_effort",
                format!("`reasoning_effort` `{e}` is not supported: the model does not reason"),
            ));
        }
        if self.web_search_options.is_some() {
            return Err(ApiError::invalid("web_search_options", "web search is not supported"));
        }
        let function_call_none = self.function_call.as_ref().is_some_and(|c| c == "none");
        if self.functions.as_ref().is_some_and(|f| !f.is_empty()) && !function_call_none {
            return Err(ApiError::invalid("functions", "`functions` is not supported; use `tools`"));
        }
        Ok(())
    }
}

/// The chat roles OpenAI accepts. `developer` is rendered as `system` (what OpenAI does for models without a
/// developer role, and the served templates have none).
pub fn template_role(role: &str) -> Result<&str, ApiError> {
    match role {
        "system" | "user" | "assistant" | "tool" => Ok(role),
        "developer" => Ok("system"),
        _ => Err(ApiError::invalid(
            "messages",
            format!("unknown message role `{role}` (expected `system`, `developer`, `user`, `assistant` or `tool`)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extras(json: &str) -> ChatExtras {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn refused_fields_name_themselves_and_ignored_ones_pass() {
        let refused = [
            (r#"{"store":true}"#, "store"),
            (r#"{"service_tier":"priority"}"#, "service_tier"),
            (r#"{"modalities":["text","audio"]}"#, "modalities"),
            (r#"{"audio":{"voice":"alloy","format":"wav"}}"#, "audio"),
            (r#"{"reasoning_effort":"low"}"#, "reasoning_effort"),
            (r#"{"web_search_options":{}}"#, "web_search_options"),
            (r#"{"functions":[{"name":"f"}]}"#, "functions"),
        ];
        for (json, field) in refused {
            let e = extras(json).check().unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{json}");
        }
        let accepted = [
            "{}",
            r#"{"store":false,"metadata":{"k":"v"},"service_tier":"auto","modalities":["text"],"prediction":{"type":"content","content":"x"}}"#,
            r#"{"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"none","parallel_tool_calls":false}"#,
            r#"{"audio":null,"reasoning_effort":null,"store":null}"#,
        ];
        for json in accepted {
            assert_eq!(extras(json).check(), Ok(()), "{json}");
        }
    }

    #[test]
    fn roles() {
        assert_eq!(template_role("developer").unwrap(), "system");
        assert_eq!(template_role("tool").unwrap(), "tool");
        assert_eq!(template_role("wizard").unwrap_err().param.as_deref(), Some("messages"));
    }
}
