use super::*;

fn extras(json: &str) -> ChatExtras {
    serde_json::from_str(json).unwrap()
}

const WEATHER: &str = r#"{"type":"function","function":{"name":"get_weather","description":"Weather in a city",
    "parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}"#;
const TIME: &str = r#"{"type":"function","function":{"name":"get_time"}}"#;

fn set(choice: &str, format: Format) -> ToolSet {
    let json = format!(r#"{{"tools":[{WEATHER},{TIME}]{choice}}}"#);
    ToolSet::from_request(&extras(&json), format).unwrap().unwrap()
}

#[test]
fn choices_parse_and_bad_ones_name_their_field() {
    assert_eq!(set("", Format::Hermes).choice, Choice::Auto);
    assert_eq!(set(r#","tool_choice":"required""#, Format::Hermes).choice, Choice::Required);
    let named = set(r#","tool_choice":{"type":"function","function":{"name":"get_time"}}"#, Format::Hermes);
    assert_eq!(named.choice, Choice::Named("get_time".into()));
    // get_time had no parameters: the template sees an empty object schema.
    assert_eq!(named.tools_json[1]["function"]["parameters"]["type"], "object");
    assert!(ToolSet::from_request(&extras(&format!(r#"{{"tools":[{WEATHER}],"tool_choice":"none"}}"#)), Format::Hermes).unwrap().is_none());
    assert!(ToolSet::from_request(&extras("{}"), Format::Hermes).unwrap().is_none());
    let bad = [
        (format!(r#"{{"tools":[{WEATHER}],"tool_choice":{{"type":"function","function":{{"name":"nope"}}}}}}"#), "tool_choice"),
        (format!(r#"{{"tools":[{WEATHER}],"tool_choice":"sometimes"}}"#), "tool_choice"),
        (r#"{"tool_choice":"required"}"#.to_string(), "tool_choice"),
        (r#"{"tools":[{"type":"retrieval"}]}"#.to_string(), "tools"),
        (r#"{"tools":[{"type":"function","function":{"name":"bad name"}}]}"#.to_string(), "tools"),
        (format!(r#"{{"tools":[{WEATHER},{WEATHER}]}}"#), "tools"),
        (r#"{"tools":[{"type":"function","function":{"name":"f","parameters":3}}]}"#.to_string(), "tools"),
    ];
    for (json, field) in bad {
        assert_eq!(ToolSet::from_request(&extras(&json), Format::Hermes).unwrap_err().param.as_deref(), Some(field), "{json}");
    }
}

#[test]
fn formats_come_from_the_template() {
    assert_eq!(Format::of("{% if tools %}<tool_call>{% endif %}"), Format::Hermes);
    assert_eq!(Format::of("<|python_tag|>{{ x }}"), Format::Llama3Json);
    assert_eq!(Format::of("<|im_start|>{{ m.content }}"), Format::Hermes);
    // `--tool-call-parser` overrides the template.
    let llama: ToolCallParser = "llama3_json".parse().unwrap();
    assert_eq!(llama.format("{% if tools %}<tool_call>{% endif %}"), Format::Llama3Json);
    assert_eq!("hermes".parse::<ToolCallParser>().unwrap().format("<|python_tag|>"), Format::Hermes);
    assert_eq!(ToolCallParser::Auto.format("<|python_tag|>"), Format::Llama3Json);
    assert!("mistral".parse::<ToolCallParser>().is_err());
    for p in ["auto", "hermes", "llama3_json"] {
        assert_eq!(p.parse::<ToolCallParser>().unwrap().to_string(), p);
    }
}

#[test]
fn hermes_output_parses_into_calls() {
    let s = set("", Format::Hermes);
    let (content, calls) =
        s.parse("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>").unwrap();
    assert_eq!(content.as_deref(), Some("Let me check.\n"));
    assert_eq!(calls, vec![ParsedCall { name: "get_weather".into(), arguments: r#"{"city":"Paris"}"#.into() }]);
    let (content, calls) =
        s.parse("<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"get_time\"}").unwrap();
    assert_eq!((content, calls.len()), (None, 2));
    assert_eq!(s.parse("no calls here"), None);
    assert_eq!(s.parse("<tool_call>{broken</tool_call>"), None);
}

#[test]
fn llama_output_parses_into_calls() {
    let s = set("", Format::Llama3Json);
    let (_, calls) = s.parse("<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}").unwrap();
    assert_eq!(calls[0].arguments, r#"{"city":"Oslo"}"#);
    let (_, calls) =
        s.parse("{\"name\": \"get_time\", \"parameters\": {}}; {\"name\": \"get_weather\", \"parameters\": {\"city\": \"x;y\"}}").unwrap();
    assert_eq!(calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["get_time", "get_weather"]);
    assert_eq!(s.parse("The weather is fine."), None);
    assert_eq!(s.parse("{\"name\": \"get_time\"} and more"), None);
}

#[test]
fn required_and_named_choices_get_a_grammar() {
    assert!(set("", Format::Hermes).grammar().is_none());
    let Some(pb::Constraint { kind: Some(pb::constraint::Kind::Lark(g)) }) = set(r#","tool_choice":"required""#, Format::Hermes).grammar()
    else {
        panic!("no lark grammar")
    };
    assert!(g.starts_with("start: \"<tool_call>\\n\" %json {") && g.contains("anyOf") && g.contains("get_time"), "{g}");
    let named = set(r#","tool_choice":{"type":"function","function":{"name":"get_weather"}}"#, Format::Llama3Json);
    let Some(pb::Constraint { kind: Some(pb::constraint::Kind::Lark(g)) }) = named.grammar() else { panic!() };
    assert!(!g.contains("get_time") && g.contains("\"parameters\""), "{g}");
}

#[test]
fn assistant_calls_and_tool_results_reach_the_template() {
    let m: super::super::types::ChatMessageIn = serde_json::from_str(
        r#"{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
            "function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}}]}"#,
    )
    .unwrap();
    // Native templates get the arguments as an object; without support the call is also written as text.
    let native = template_message("assistant", String::new(), &m, Format::Hermes, true).unwrap();
    assert_eq!(native["tool_calls"][0]["function"]["arguments"]["city"], "Paris");
    assert_eq!(native["content"], "");
    let text = template_message("assistant", String::new(), &m, Format::Hermes, false).unwrap();
    // (Key order depends on serde_json's `preserve_order`, which feature unification may turn on: compare values.)
    let content = text["content"].as_str().unwrap();
    let body = content.strip_prefix("<tool_call>\n").and_then(|c| c.strip_suffix("\n</tool_call>")).unwrap();
    assert_eq!(serde_json::from_str::<Value>(body).unwrap(), json!({"name": "get_weather", "arguments": {"city": "Paris"}}));
    let tool: super::super::types::ChatMessageIn =
        serde_json::from_str(r#"{"role":"tool","tool_call_id":"call_1","content":"sunny"}"#).unwrap();
    assert_eq!(template_message("tool", "sunny".into(), &tool, Format::Hermes, false).unwrap()["tool_call_id"], "call_1");
    let bad: super::super::types::ChatMessageIn =
        serde_json::from_str(r#"{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":"{oops"}}]}"#).unwrap();
    assert_eq!(template_message("assistant", String::new(), &bad, Format::Hermes, true).unwrap_err().param.as_deref(), Some("messages"));
    let mut msgs = vec![json!({"role": "system", "content": "Be brief."}), json!({"role": "user", "content": "hi"})];
    add_system_prompt(&mut msgs, "TOOLS".into());
    assert_eq!((msgs.len(), msgs[0]["content"].as_str().unwrap()), (2, "Be brief.\n\nTOOLS"));
    let mut msgs = vec![json!({"role": "user", "content": "hi"})];
    add_system_prompt(&mut msgs, "TOOLS".into());
    assert_eq!((msgs.len(), &msgs[0]["role"]), (2, &json!("system")));
}

#[test]
fn auto_hermes_streams_the_text_before_a_call() {
    let s = set("", Format::Hermes);
    assert_eq!(s.streamable_len("Sure, "), 6);
    assert_eq!(s.streamable_len("Sure <tool"), 5); // `<tool` may become a call
    assert_eq!(s.streamable_len("Sure <tool_call>{\"name\""), 5);
    assert_eq!(s.streamable_len("\n<tool_call>"), 0); // whitespace alone is not content
    assert_eq!(s.streamable_len("a < b"), 5);
    assert_eq!(set(r#","tool_choice":"required""#, Format::Hermes).streamable_len("Sure"), 0);
    assert_eq!(set("", Format::Llama3Json).streamable_len("Sure"), 0);
}
