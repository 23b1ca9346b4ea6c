//! The GGUF-built tokenizer and chat template against the transformers reference for the default model
//! (`tests/data/reference/reference.json`).
//!
//! Needs the default model: `$FERRITE_MODEL`, else what `scripts/fetch-model.sh` prints (it fetches into the model
//! cache folder once) (a fetch failure fails the test; nothing is skipped). The reference folder is
//! `$FERRITE_REFERENCE_DIR`, else `<workspace>/tests/data/reference`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ferrite_common::chat::{ChatMessage, ChatTemplate};
use ferrite_common::gguf::GgufFile;
use ferrite_common::tokenizer::{SpecialTokens, special_tokens_from_gguf, tokenizer_from_gguf};
use tokenizers::Tokenizer;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The default model, fetched with `scripts/fetch-model.sh` if it is not there yet.
fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRITE_MODEL") {
        return PathBuf::from(p);
    }
    let root = workspace_root();
    let out =
        Command::new("bash").arg(root.join("scripts/fetch-model.sh")).current_dir(&root).output().expect("run scripts/fetch-model.sh");
    assert!(out.status.success(), "scripts/fetch-model.sh failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    let fetched = PathBuf::from(printed.lines().last().expect("fetch-model.sh printed no path").trim());
    assert!(fetched.is_file(), "fetch-model.sh printed {fetched:?}, which is not a file");
    fetched
}

fn reference() -> serde_json::Value {
    let dir = std::env::var_os("FERRITE_REFERENCE_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("tests/data/reference"));
    let path = dir.join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn load() -> (GgufFile, Tokenizer) {
    let g = GgufFile::open(&model_path()).unwrap();
    let t0 = Instant::now();
    let tok = tokenizer_from_gguf(&g).unwrap();
    let took = t0.elapsed();
    eprintln!("tokenizer_from_gguf: {took:?}");
    // The bound is loose so a loaded CI machine does not flake; it is ~tens of ms in release.
    assert!(took.as_secs_f64() < 5.0, "tokenizer construction took {took:?}");
    (g, tok)
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn tokenizer_matches_reference_strings() {
    let (_g, tok) = load();
    let r = reference();
    let cases = r["tokenizer"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids_of(&case["ids"]);
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "encode {text:?}");
        assert_eq!(tok.decode(&got, false).unwrap(), text, "decode {text:?}");
    }
}

#[test]
fn prompt_ids_match_reference() {
    let (_g, tok) = load();
    let r = reference();
    let cases = r["cases"].as_object().unwrap();
    assert!(cases.values().any(|c| c["kind"] == "chat"));
    for (name, case) in cases {
        let text = case["prompt_text"].as_str().unwrap();
        let want = ids_of(&case["prompt_ids"]);
        // `add_special_tokens = true` too: the default model has add_bos_token = false, so nothing is added.
        for add_special in [false, true] {
            let got = tok.encode(text, add_special).unwrap().get_ids().to_vec();
            assert_eq!(got, want, "case {name} (add_special_tokens = {add_special})");
        }
        assert_eq!(tok.decode(&want, false).unwrap(), text, "case {name} decode");
    }
}

#[test]
fn chat_template_matches_reference() {
    let (g, tok) = load();
    let source = g.require("tokenizer.chat_template").unwrap().as_str().unwrap();
    let special = special_tokens_from_gguf(&g);
    let name = |id: Option<u32>| id.and_then(|id| tok.id_to_token(id));
    let template = ChatTemplate::new(source, name(special.bos), name(special.eos)).unwrap();
    let r = reference();
    let mut n = 0;
    for (case_name, case) in r["cases"].as_object().unwrap() {
        if case["kind"] != "chat" {
            continue;
        }
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let rendered = template.render(&messages, true).unwrap();
        assert_eq!(rendered, case["prompt_text"].as_str().unwrap(), "case {case_name}");
        n += 1;
    }
    assert!(n >= 3, "only {n} chat cases");
}

#[test]
fn special_tokens_of_default_model() {
    let (g, tok) = load();
    let s = special_tokens_from_gguf(&g);
    assert_eq!(s, SpecialTokens { bos: Some(1), eos: Some(2), add_bos: false, pad: Some(2) });
    assert_eq!(tok.id_to_token(1).as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    // Control tokens are atomic when encoding and dropped by skip_special decoding.
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap().get_ids().to_vec();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
    assert_eq!(tok.decode(&[1], true).unwrap(), "");
    assert_eq!(tok.decode(&[1], false).unwrap(), "<|im_start|>");
    assert_eq!(tok.get_vocab_size(true), 49152);
}
