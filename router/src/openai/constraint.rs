//! Structured output: `response_format` (OpenAI) and the vLLM-style `guided_json`, `guided_regex`, `guided_choice`
//! and `guided_grammar` become one worker [`pb::Constraint`] (a JSON Schema, a regex or a Lark grammar). Only the
//! shape is checked here; the worker compiles the grammar (llguidance) and refuses one it cannot compile, which the
//! client sees as a 400 naming `response_format` with the compiler's reason.

use ferrite_common::proto::worker as pb;
use pb::constraint::Kind;
use serde_json::Value;

use super::error::ApiError;
use super::types::CommonParams;

/// The largest grammar sent to a worker (schema, regex or Lark text). Larger ones are refused here: compile time
/// and memory grow with the grammar.
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;

/// JSON mode: any JSON object.
const JSON_OBJECT_SCHEMA: &str = r#"{"type":"object"}"#;

/// The constraint a request asks for, if any (at most one of `response_format` (json) and the `guided_*` fields),
/// with the field it came from (a worker's refusal to compile it names that field).
pub fn constraint_of(c: &CommonParams) -> Result<Option<(&'static str, pb::Constraint)>, ApiError> {
    let mut found: Vec<(&'static str, Kind)> = Vec::new();
    if let Some(rf) = &c.response_format
        && let Some(kind) = response_format(rf)?
    {
        found.push(("response_format", kind));
    }
    if let Some(schema) = &c.guided_json {
        let text = match schema {
            Value::String(s) => {
                serde_json::from_str::<Value>(s)
                    .map_err(|e| ApiError::invalid("guided_json", format!("`guided_json` is not JSON: {e}")))?;
                s.clone()
            }
            Value::Object(_) | Value::Bool(_) => schema.to_string(),
            _ => return Err(ApiError::invalid("guided_json", "`guided_json` must be a JSON Schema object")),
        };
        found.push(("guided_json", Kind::JsonSchema(text)));
    }
    if let Some(rx) = &c.guided_regex {
        found.push(("guided_regex", Kind::Regex(rx.clone())));
    }
    if let Some(choices) = &c.guided_choice {
        if choices.is_empty() || choices.iter().any(String::is_empty) {
            return Err(ApiError::invalid("guided_choice", "`guided_choice` must be a list of non-empty strings"));
        }
        let alternatives: Vec<String> = choices.iter().map(|s| regex_escape(s)).collect();
        found.push(("guided_choice", Kind::Regex(format!("({})", alternatives.join("|")))));
    }
    if let Some(g) = &c.guided_grammar {
        found.push(("guided_grammar", Kind::Lark(g.clone())));
    }
    match found.len() {
        0 => Ok(None),
        1 => {
            let (field, kind) = found.pop().expect("one constraint");
            let len = match &kind {
                Kind::JsonSchema(s) | Kind::Regex(s) | Kind::Lark(s) => s.len(),
            };
            if len == 0 {
                return Err(ApiError::invalid(field, format!("`{field}` is empty")));
            }
            if len > MAX_GRAMMAR_BYTES {
                return Err(ApiError::invalid(field, format!("`{field}` is too large ({len} bytes; at most {MAX_GRAMMAR_BYTES})")));
            }
            Ok(Some((field, pb::Constraint { kind: Some(kind) })))
        }
        _ => {
            let names: Vec<&str> = found.iter().map(|f| f.0).collect();
            Err(ApiError::invalid(names[1], format!("at most one output constraint per request, got {}", names.join(", "))))
        }
    }
}

/// `response_format`: `text` (no constraint), `json_object`, or `json_schema` with `json_schema.schema`.
fn response_format(rf: &Value) -> Result<Option<Kind>, ApiError> {
    let bad = |msg: String| ApiError::invalid("response_format", msg);
    let kind = rf.get("type").and_then(Value::as_str).ok_or_else(|| bad("`response_format` must be an object with a `type`".into()))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Kind::JsonSchema(JSON_OBJECT_SCHEMA.into()))),
        "json_schema" => {
            let js = rf
                .get("json_schema")
                .filter(|v| v.is_object())
                .ok_or_else(|| bad("`response_format.json_schema` must be an object with a `schema`".into()))?;
            match js.get("schema") {
                Some(s @ (Value::Object(_) | Value::Bool(_))) => Ok(Some(Kind::JsonSchema(s.to_string()))),
                Some(_) => Err(bad("`response_format.json_schema.schema` must be a JSON Schema object".into())),
                None => Err(bad("`response_format.json_schema.schema` is required".into())),
            }
        }
        other => Err(bad(format!("unknown `response_format` type `{other}` (expected `text`, `json_object` or `json_schema`)"))),
    }
}

/// `s` as a regex matching exactly `s` (every character that means something in a regex is escaped).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for ch in s.chars() {
        // regex-syntax's meta characters (`regex_syntax::is_meta_character`), the set llguidance's parser escapes.
        if r"\.+*?()|[]{}^$#&-~".contains(ch) {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(json: &str) -> Result<Option<(&'static str, pb::Constraint)>, ApiError> {
        constraint_of(&serde_json::from_str::<CommonParams>(json).unwrap())
    }

    fn kind(json: &str) -> Option<Kind> {
        of(json).unwrap().and_then(|(_, c)| c.kind)
    }

    #[test]
    fn each_shape_becomes_one_constraint() {
        assert_eq!(kind("{}"), None);
        assert_eq!(kind(r#"{"response_format":{"type":"text"}}"#), None);
        assert_eq!(kind(r#"{"response_format":{"type":"json_object"}}"#), Some(Kind::JsonSchema(JSON_OBJECT_SCHEMA.into())));
        // The shape `client.chat.completions.parse` sends.
        let parse = r#"{"response_format":{"type":"json_schema","json_schema":{"name":"P","strict":true,
            "schema":{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":false}}}}"#;
        let Some(Kind::JsonSchema(s)) = kind(parse) else { panic!("not a schema") };
        assert_eq!(serde_json::from_str::<Value>(&s).unwrap()["required"][0], "a");
        assert_eq!(kind(r#"{"guided_regex":"[0-9]+"}"#), Some(Kind::Regex("[0-9]+".into())));
        assert_eq!(of(r#"{"guided_regex":"a"}"#).unwrap().unwrap().0, "guided_regex");
        assert_eq!(kind(r#"{"guided_choice":["a.b","c"]}"#), Some(Kind::Regex(r"(a\.b|c)".into())));
        assert_eq!(kind(r#"{"guided_grammar":"start: \"x\""}"#), Some(Kind::Lark("start: \"x\"".into())));
        assert_eq!(kind(r#"{"guided_json":"{\"type\":\"string\"}"}"#), Some(Kind::JsonSchema(r#"{"type":"string"}"#.into())));
    }

    #[test]
    fn bad_shapes_name_their_field() {
        let cases = [
            (r#"{"response_format":{"type":"yaml"}}"#, "response_format"),
            (r#"{"response_format":{"type":"json_schema"}}"#, "response_format"),
            (r#"{"response_format":{"type":"json_schema","json_schema":{"name":"x"}}}"#, "response_format"),
            (r#"{"response_format":{"type":"json_schema","json_schema":{"schema":3}}}"#, "response_format"),
            (r#"{"response_format":"json"}"#, "response_format"),
            (r#"{"guided_json":"{not json"}"#, "guided_json"),
            (r#"{"guided_choice":[]}"#, "guided_choice"),
            (r#"{"guided_regex":""}"#, "guided_regex"),
            (r#"{"response_format":{"type":"json_object"},"guided_regex":"a"}"#, "guided_regex"),
        ];
        for (json, field) in cases {
            assert_eq!(of(json).unwrap_err().param.as_deref(), Some(field), "{json}");
        }
        let huge = format!(r#"{{"guided_regex":"{}"}}"#, "a".repeat(MAX_GRAMMAR_BYTES + 1));
        assert_eq!(of(&huge).unwrap_err().param.as_deref(), Some("guided_regex"));
    }

    #[test]
    fn escaped_choices_match_only_themselves() {
        assert_eq!(regex_escape("1+1=2 (yes)"), r"1\+1=2 \(yes\)");
    }
}
