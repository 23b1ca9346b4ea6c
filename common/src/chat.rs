//! Chat templates: Hugging Face Jinja chat templates rendered with minijinja.
//!
//! The template comes from GGUF `tokenizer.chat_template` or the `chat_template` field of `tokenizer_config.json`
//! ([`chat_template_from_tokenizer_config`]). Rendering mirrors transformers' `apply_chat_template`:
//! - Jinja settings `trim_blocks = true`, `lstrip_blocks = true`, no trailing newline kept;
//! - Python string/dict/list methods (`.strip()`, `.items()`, ...) through `minijinja_contrib::pycompat`;
//! - the globals `raise_exception(msg)` (fails the render with `msg`) and `strftime_now(fmt)` (current UTC time);
//! - a `tojson` filter that writes like Python's `json.dumps(ensure_ascii=False)` (`", "`/`": "` separators, no HTML
//!   escaping; minijinja's built-in escapes `<`, `>`, `&`, `'`);
//! - variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token` (an absent token is undefined, so it
//!   renders as the empty string, as in transformers).
//!
//! As in TGI `router/src/infer/chat_template.rs`, the template is compiled once in [`ChatTemplate::new`].

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::Serialize;

const TEMPLATE_NAME: &str = "chat_template";

/// One chat message (content already flattened to a string).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Why a chat template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("invalid chat template: {0}")]
    Syntax(String),
    #[error("chat template failed: {0}")]
    Render(String),
}

/// A compiled chat template plus the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The template reads a `tools` variable (transformers passes the request's tools under that name).
    uses_tools: bool,
    /// The template source, for callers that pick a tool-call format from it.
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// `source` is the Jinja template text (GGUF `tokenizer.chat_template` or tokenizer_config.json `chat_template`).
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| ChatTemplateError::Syntax(error_text(&e)))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string()).map_err(|e| ChatTemplateError::Syntax(error_text(&e)))?;
        let uses_tools = source.contains("tools");
        Ok(ChatTemplate { env, bos_token, eos_token, uses_tools, source: source.to_string() })
    }

    /// Renders `messages`; with `add_generation_prompt` the template appends the assistant header.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatTemplateError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Whether the template renders a `tools` list (else callers describe the tools in a system prompt).
    pub fn uses_tools(&self) -> bool {
        self.uses_tools
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders messages of any serializable shape (tool calls and tool results included) with `tools` (OpenAI's
    /// `tools` list, undefined when `None`), as transformers' `apply_chat_template(messages, tools=...)`.
    pub fn render_with_tools<M: Serialize>(
        &self,
        messages: &[M],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let token = |t: &Option<String>| t.as_deref().map_or(Value::UNDEFINED, Value::from);
        let ctx = context! {
            messages => Value::from(Serde(messages)),
            tools => tools.map_or(Value::UNDEFINED, |t| Value::from(Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => token(&self.bos_token),
            eos_token => token(&self.eos_token),
        };
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(|e| ChatTemplateError::Render(error_text(&e)))?;
        tmpl.render(ctx).map_err(|e| ChatTemplateError::Render(error_text(&e)))
    }
}

/// The error with its chain of causes (minijinja puts the location in the message itself).
fn error_text(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Reads `chat_template` (a string, or the HF list-of-`{name, template}` form, from which `"default"` is picked) plus
/// `bos_token`/`eos_token` (strings or `{"content": ...}` objects) from a parsed `tokenizer_config.json`.
pub fn chat_template_from_tokenizer_config(v: &serde_json::Value) -> Option<(String, Option<String>, Option<String>)> {
    let template = match v.get("chat_template")? {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())?
            .to_string(),
        _ => return None,
    };
    let token = |key: &str| match v.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        obj @ serde_json::Value::Object(_) => obj.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    };
    Some((template, token("bos_token"), token("eos_token")))
}

/// `raise_exception(message)`: fails the render with the template's message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time formatted with [`strftime`].
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    strftime(&format, secs)
}

const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// A minimal strftime over a UTC Unix time: `%Y %y %m %d %e %B %b %A %a %H %M %S %%` and the glibc no-padding forms
/// `%-d %-m %-H %-M %-S`. Anything else is copied through unchanged (as glibc does).
fn strftime(format: &str, unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day % 3600 / 60, secs_of_day % 60);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = ((days + 3) % 7) as usize;
    let month_name = MONTHS[(month - 1) as usize];
    let weekday_name = WEEKDAYS[weekday];

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            if unpadded {
                out.push('-');
            }
            break;
        };
        let num = |v: u64| if unpadded { v.to_string() } else { format!("{v:02}") };
        match spec {
            'Y' => out.push_str(&year.to_string()),
            'y' => out.push_str(&format!("{:02}", year % 100)),
            'm' => out.push_str(&num(month)),
            'd' => out.push_str(&num(day)),
            'e' => out.push_str(&format!("{day:>2}")),
            'H' => out.push_str(&num(hour)),
            'M' => out.push_str(&num(minute)),
            'S' => out.push_str(&num(second)),
            'B' => out.push_str(month_name),
            'b' | 'h' => out.push_str(&month_name[..3]),
            'A' => out.push_str(weekday_name),
            'a' => out.push_str(&weekday_name[..3]),
            '%' => out.push('%'),
            other => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Python `json.dumps` separators for one-line output: `", "` between items and `": "` after keys.
struct PySpacedFormatter;

impl serde_json::ser::Formatter for PySpacedFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `tojson` as transformers defines it (`json.dumps(x, ensure_ascii=False, indent=indent)`), with `indent` given
/// positionally or as a keyword. Map order is kept.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let mut out = Vec::new();
    let result = match indent {
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PySpacedFormatter)),
        Some(n) => {
            let spaces = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, fmt))
        }
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON").with_source(e))?;
    let text = String::from_utf8(out).map_err(|e| Error::new(ErrorKind::InvalidOperation, "JSON is not UTF-8").with_source(e))?;
    Ok(Value::from_safe_string(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let msgs = [msg("system", "Be brief."), msg("user", "Hi")];
        let with = t.render(&msgs, true).unwrap();
        assert_eq!(with, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let without = t.render(&msgs, false).unwrap();
        assert_eq!(without, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn trims_blocks_like_hf() {
        // Block tags on their own lines leave no blank lines or indentation behind (trim_blocks + lstrip_blocks),
        // and the final newline of the template is dropped.
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU: {{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&[msg("user", "a"), msg("assistant", "b")], false).unwrap(), "U: a\n");
    }

    #[test]
    fn special_tokens_and_pycompat() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m['content'].strip().upper() }}{{ eos_token }}{% endfor %}";
        let t = ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into())).unwrap();
        assert_eq!(t.render(&[msg("user", "  hi  ")], false).unwrap(), "<s>HI</s>");
        // An absent token renders as the empty string.
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&[msg("user", "x")], false).unwrap(), "X");
    }

    #[test]
    fn raise_exception_fails_render_with_message() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&[msg("user", "x")], false).unwrap(), "ok");
        let err = t.render(&[msg("system", "x")], false).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render(_)));
        assert!(err.to_string().contains("Conversation must start with user"), "{err}");
    }

    #[test]
    fn syntax_error_is_reported_at_construction() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", None, None).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Syntax(_)), "{err}");
        assert!(err.to_string().starts_with("invalid chat template:"), "{err}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let src = "{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let out = t.render(&[msg("user", "don't <b>é</b>")], false).unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"don't <b>é</b>\"}|[\n  {\n    \"role\": \"user\",\n    \"content\": \"don't <b>é</b>\"\n  }\n]"
        );
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_721_999_109;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(strftime("%B %-d, %Y", t), "July 26, 2024");
        assert_eq!(strftime("%A %a %H:%M:%S %y %m %%", t), "Friday Fri 13:05:09 24 07 %");
        assert_eq!(strftime("%Q and %", t), "%Q and %");
        assert_eq!(civil_from_days(951_782_400 / 86_400), (2000, 2, 29));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).unwrap();
        let year: u32 = t.render(&[], false).unwrap().parse().unwrap();
        assert!(year >= 2024);
    }

    #[test]
    fn reads_tokenizer_config() {
        let v = serde_json::json!({
            "chat_template": "T",
            "bos_token": "<s>",
            "eos_token": {"content": "</s>", "lstrip": false}
        });
        assert_eq!(chat_template_from_tokenizer_config(&v), Some(("T".to_string(), Some("<s>".to_string()), Some("</s>".to_string()))));
        let v = serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "X"}, {"name": "default", "template": "D"}],
            "eos_token": null
        });
        assert_eq!(chat_template_from_tokenizer_config(&v), Some(("D".to_string(), None, None)));
        let v = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "X"}]});
        assert_eq!(chat_template_from_tokenizer_config(&v), None);
        assert_eq!(chat_template_from_tokenizer_config(&serde_json::json!({})), None);
    }
}
