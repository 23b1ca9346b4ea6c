//! Tool calling: `tools` and `tool_choice` in, `message.tool_calls` out.
//!
//! - **Prompt.** The tools go to the chat template as `tools` (as transformers' `apply_chat_template(tools=...)`)
//!   when the template reads that variable; otherwise [`ToolSet::system_prompt`] describes them in a system message
//!   (Hermes style: the tools inside `<tools></tools>`, calls inside `<tool_call></tool_call>`), merged into the
//!   conversation's first system message. Assistant messages with `tool_calls` reach the template with their
//!   arguments as objects (what HF templates expect), and as `<tool_call>` text when the fallback prompt is used.
//! - **Format**, picked from the template ([`Format::of`]) unless `--tool-call-parser` names one ([`ToolCallParser`]): Hermes `<tool_call>{"name", "arguments"}</tool_call>`
//!   (Qwen, Hermes, SmolLM-family templates, and the fallback), or Llama 3.1/3.2 JSON (`{"name", "parameters"}`,
//!   optionally after `<|python_tag|>`).
//! - **`tool_choice`.** `none` (no tools at all), `auto` (the model decides; the output is parsed), `required` and a
//!   named function: a grammar ([`ToolSet::grammar`]) forces one call to one of the allowed functions whose arguments
//!   match that function's JSON Schema, so even the 135M default model produces a call that parses.
//! - **Parsing** ([`ToolSet::parse`]): the whole output; calls that do not parse leave the text as content.

use ferrite_common::proto::worker as pb;
use serde_json::{Value, json};

use super::error::ApiError;
use super::fields::ChatExtras;

/// How the model writes a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
    Hermes,
    /// `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>` (Llama 3.1/3.2).
    Llama3Json,
}

impl Format {
    /// A call as the model writes it (assistant messages with `tool_calls`, rendered as text without native support).
    pub fn call_text(self, name: &str, arguments: &Value) -> String {
        match self {
            Format::Hermes => format!("<tool_call>\n{}\n</tool_call>", json!({"name": name, "arguments": arguments})),
            Format::Llama3Json => json!({"name": name, "parameters": arguments}).to_string(),
        }
    }

    /// The format a chat template teaches (Hermes when it says nothing: that is what the fallback prompt asks for).
    pub fn of(template_source: &str) -> Format {
        if template_source.contains("<tool_call>") {
            Format::Hermes
        } else if template_source.contains("<|python_tag|>") || template_source.contains("\"parameters\"") {
            Format::Llama3Json
        } else {
            Format::Hermes
        }
    }
}

/// `--tool-call-parser`: the format named, or `auto` (from the chat template, [`Format::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToolCallParser {
    #[default]
    Auto,
    Fixed(Format),
}

impl ToolCallParser {
    /// The format for a model whose chat template is `template_source`.
    pub fn format(self, template_source: &str) -> Format {
        match self {
            ToolCallParser::Auto => Format::of(template_source),
            ToolCallParser::Fixed(f) => f,
        }
    }
}

impl std::fmt::Display for ToolCallParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ToolCallParser::Auto => "auto",
            ToolCallParser::Fixed(Format::Hermes) => "hermes",
            ToolCallParser::Fixed(Format::Llama3Json) => "llama3_json",
        })
    }
}

/// A `--tool-call-parser` value that names no parser.
#[derive(Debug, thiserror::Error)]
#[error("unknown tool-call parser `{0}` (expected auto, hermes or llama3_json)")]
pub struct UnknownToolCallParser(pub String);

impl std::str::FromStr for ToolCallParser {
    type Err = UnknownToolCallParser;

    /// vLLM's names (`--tool-call-parser hermes|llama3_json`), plus `auto`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ToolCallParser::Auto),
            "hermes" => Ok(ToolCallParser::Fixed(Format::Hermes)),
            "llama3_json" => Ok(ToolCallParser::Fixed(Format::Llama3Json)),
            other => Err(UnknownToolCallParser(other.to_string())),
        }
    }
}

/// Which calls the output must make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Auto,
    Required,
    Named(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Function {
    name: String,
    parameters: Value,
}

/// A parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments as a JSON string (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// A request's tools (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSet {
    functions: Vec<Function>,
    pub choice: Choice,
    pub format: Format,
    /// The request's `tools`, normalized (what the template gets).
    pub tools_json: Value,
}

impl ToolSet {
    /// The request's tools, or `None` when it has none or says `tool_choice: "none"`.
    pub fn from_request(x: &ChatExtras, format: Format) -> Result<Option<ToolSet>, ApiError> {
        let tools = x.tools.as_deref().unwrap_or_default();
        let choice = match &x.tool_choice {
            None if tools.is_empty() => return Ok(None),
            None => Choice::Auto,
            Some(Value::String(s)) if s == "none" => return Ok(None),
            Some(Value::String(s)) if s == "auto" => Choice::Auto,
            Some(Value::String(s)) if s == "required" => Choice::Required,
            Some(v @ Value::Object(_)) => match v.pointer("/function/name").and_then(Value::as_str) {
                Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => Choice::Named(name.to_string()),
                _ => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        "`tool_choice` must name a function: {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    ));
                }
            },
            Some(other) => return Err(ApiError::invalid("tool_choice", format!("unknown `tool_choice` {other}"))),
        };
        if tools.is_empty() {
            return Err(ApiError::invalid("tool_choice", "`tool_choice` needs `tools`"));
        }
        let mut functions = Vec::with_capacity(tools.len());
        let mut normalized = Vec::with_capacity(tools.len());
        for t in tools {
            let bad = |m: &str| ApiError::invalid("tools", m.to_string());
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad("each tool must be `{\"type\": \"function\", \"function\": {...}}`"));
            }
            let f = t.get("function").filter(|f| f.is_object()).ok_or_else(|| bad("a tool has no `function` object"))?;
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(bad("a function `name` must be 1 to 64 of a-z, A-Z, 0-9, `_` and `-`"));
            }
            if functions.iter().any(|g: &Function| g.name == name) {
                return Err(ApiError::invalid("tools", format!("function `{name}` is defined twice")));
            }
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => return Err(ApiError::invalid("tools", format!("the `parameters` of `{name}` must be a JSON Schema object"))),
            };
            let mut nf = json!({"name": name, "parameters": parameters});
            if let Some(d) = f.get("description").and_then(Value::as_str) {
                nf["description"] = Value::from(d);
            }
            normalized.push(json!({"type": "function", "function": nf}));
            functions.push(Function { name: name.to_string(), parameters });
        }
        if let Choice::Named(n) = &choice
            && !functions.iter().any(|f| &f.name == n)
        {
            return Err(ApiError::invalid("tool_choice", format!("`tool_choice` names `{n}`, which is not in `tools`")));
        }
        Ok(Some(ToolSet { functions, choice, format, tools_json: Value::Array(normalized) }))
    }

    /// The system prompt describing the tools, for templates that do not render `tools` themselves.
    pub fn system_prompt(&self) -> String {
        let list: Vec<String> = self.tools_json.as_array().into_iter().flatten().map(Value::to_string).collect();
        format!(
            "You are a function calling AI model. You may call one or more functions to assist with the user query. \
             The functions are described in JSON inside <tools></tools>:\n<tools>\n{}\n</tools>\n\
             To call a function, reply with a JSON object with the function name and its arguments inside \
             <tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
            list.join("\n")
        )
    }

    /// The grammar that forces one call for `required` and named choices (`None` for `auto`).
    pub fn grammar(&self) -> Option<pb::Constraint> {
        let allowed: Vec<&Function> = match &self.choice {
            Choice::Auto => return None,
            Choice::Required => self.functions.iter().collect(),
            Choice::Named(n) => self.functions.iter().filter(|f| &f.name == n).collect(),
        };
        let args_key = if self.format == Format::Hermes { "arguments" } else { "parameters" };
        let alternatives: Vec<Value> = allowed
            .iter()
            .map(|f| {
                json!({"type": "object", "properties": {"name": {"const": f.name}, args_key: f.parameters},
                       "required": ["name", args_key], "additionalProperties": false})
            })
            .collect();
        let mut schema = if alternatives.len() == 1 { alternatives[0].clone() } else { json!({"anyOf": alternatives}) };
        schema["x-guidance"] = json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        let lark = match self.format {
            Format::Hermes => format!("start: \"<tool_call>\\n\" %json {schema} \"\\n</tool_call>\""),
            Format::Llama3Json => format!("start: %json {schema}"),
        };
        Some(pb::Constraint { kind: Some(pb::constraint::Kind::Lark(lark)) })
    }

    /// How much of a growing output can be streamed as content already: with `auto` and Hermes calls, the text before
    /// a `<tool_call>` (or before a tail that may become one), once it is more than whitespace; otherwise nothing
    /// (the choice is sent when it finishes).
    pub fn streamable_len(&self, text: &str) -> usize {
        if self.choice != Choice::Auto || self.format != Format::Hermes {
            return 0;
        }
        let end = text.find(OPEN).unwrap_or_else(|| {
            let keep = (1..OPEN.len()).rev().find(|&k| text.ends_with(&OPEN[..k])).unwrap_or(0);
            text.len() - keep
        });
        if text[..end].trim().is_empty() { 0 } else { end }
    }

    /// The calls in a finished output, and the text before them (`None` when there is none). `None` when the output
    /// holds no call that parses.
    pub fn parse(&self, text: &str) -> Option<(Option<String>, Vec<ParsedCall>)> {
        match self.format {
            Format::Hermes => parse_hermes(text),
            Format::Llama3Json => parse_llama(text),
        }
    }
}

fn call_of(v: &Value, args_keys: &[&str]) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = args_keys.iter().find_map(|k| v.get(*k)).cloned().unwrap_or_else(|| json!({}));
    let arguments = match args {
        Value::String(s) => s,
        other => other.to_string(),
    };
    Some(ParsedCall { name, arguments })
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

fn parse_hermes(text: &str) -> Option<(Option<String>, Vec<ParsedCall>)> {
    let first = text.find(OPEN)?;
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(OPEN) {
        let body = &rest[start + OPEN.len()..];
        let (inner, after) = match body.find(CLOSE) {
            Some(end) => (&body[..end], &body[end + CLOSE.len()..]),
            None => (body, ""),
        };
        let v: Value = serde_json::from_str(inner.trim()).ok()?;
        calls.push(call_of(&v, &["arguments", "parameters"])?);
        rest = after;
    }
    // As written (streaming sends it as it comes), unless it is only whitespace.
    let content = &text[..first];
    Some(((!content.trim().is_empty()).then(|| content.to_string()), calls))
}

fn parse_llama(text: &str) -> Option<(Option<String>, Vec<ParsedCall>)> {
    let body = text.trim_start();
    let body = body.strip_prefix("<|python_tag|>").unwrap_or(body).trim();
    if !body.starts_with('{') {
        return None;
    }
    // One call, or several separated by `;` (Llama 3.2's parallel form).
    let mut calls = Vec::new();
    let mut pos = 0;
    loop {
        let mut de = serde_json::Deserializer::from_str(&body[pos..]).into_iter::<Value>();
        calls.push(call_of(&de.next()?.ok()?, &["parameters", "arguments"])?);
        pos += de.byte_offset();
        let rest = body[pos..].trim_start();
        if rest.is_empty() {
            break;
        }
        let next = rest.strip_prefix(';')?;
        if next.trim().is_empty() {
            break;
        }
        pos = body.len() - next.len();
    }
    (!calls.is_empty()).then_some((None, calls))
}

/// One request message as the chat template gets it: `role` and flattened `content`, plus the tool fields. Calls
/// carry their arguments as objects (HF templates index into them); when the template has no tool support (`native`
/// false) an assistant's calls are also written into its content, in `format`, the way the fallback prompt asks.
pub fn template_message(
    role: &str,
    content: String,
    m: &super::types::ChatMessageIn,
    format: Format,
    native: bool,
) -> Result<Value, ApiError> {
    let mut out = json!({"role": role, "content": content});
    if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_empty()) {
        let mut rendered = Vec::with_capacity(calls.len());
        let mut texts = Vec::new();
        for c in calls {
            let bad = || ApiError::invalid("messages", "an assistant `tool_calls` entry needs `function.name` and `function.arguments`");
            let name = c.pointer("/function/name").and_then(Value::as_str).ok_or_else(bad)?;
            let arguments = match c.pointer("/function/arguments") {
                Some(Value::String(s)) => serde_json::from_str(s)
                    .map_err(|e| ApiError::invalid("messages", format!("the arguments of a `{name}` call are not JSON: {e}")))?,
                Some(v @ Value::Object(_)) => v.clone(),
                _ => return Err(bad()),
            };
            if !native {
                texts.push(format.call_text(name, &arguments));
            }
            let id = c.get("id").cloned().unwrap_or(Value::Null);
            rendered.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}));
        }
        out["tool_calls"] = Value::Array(rendered);
        if !texts.is_empty() {
            let mut text = content;
            for t in texts {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&t);
            }
            out["content"] = Value::from(text);
        }
    }
    if let Some(id) = &m.tool_call_id {
        out["tool_call_id"] = Value::from(id.as_str());
    }
    if let Some(name) = &m.name {
        out["name"] = Value::from(name.as_str());
    }
    Ok(out)
}

/// Puts the fallback tool prompt first: into the conversation's system message, or as a new one.
pub fn add_system_prompt(messages: &mut Vec<Value>, prompt: String) {
    match messages.first_mut() {
        Some(m) if m["role"] == "system" => {
            let own = m["content"].as_str().unwrap_or_default();
            m["content"] = Value::from(if own.is_empty() { prompt } else { format!("{own}\n\n{prompt}") });
        }
        _ => messages.insert(0, json!({"role": "system", "content": prompt})),
    }
}

#[cfg(test)]
#[path = "tools_tests.rs"]
mod tests;
