//! Tokenizers: a Hugging Face [`tokenizers::Tokenizer`] built from GGUF tokenizer metadata, or loaded from a
//! `tokenizer.json`.
//!
//! GGUF support covers `tokenizer.ggml.model == "gpt2"` (byte-level BPE), the way llama.cpp's converter writes it:
//! - `tokenizer.ggml.tokens` is the vocabulary (index = id) in byte-level form (`Ġ` for a space), and
//!   `tokenizer.ggml.merges` holds the merges as `"left right"` strings (byte-level tokens never contain a plain
//!   space, so the first space separates the pair);
//! - `tokenizer.ggml.token_type` marks control tokens (3, e.g. `<|im_start|>`) and user-defined tokens (4). Both become
//!   added tokens, so the encoder never splits them; control tokens are *special* (dropped by
//!   `decode(.., skip_special_tokens = true)`);
//! - `tokenizer.ggml.pre` selects the pre-tokenizer (see [`tokenizer_from_gguf`]).
//!
//! SentencePiece vocabularies (`tokenizer.ggml.model == "llama"`) are not supported yet: they fail with a clear
//! [`ModelError::Tokenizer`]; such models need a `tokenizer.json` ([`tokenizer_from_file`]).
//!
//! The construction follows mistral.rs `mistralrs-core/src/gguf/gguf_tokenizer.rs` and the pre-tokenizer choices of
//! llama.cpp `src/llama-vocab.cpp`. With the default model (SmolLM2) it matches transformers' tokenizer exactly
//! (`common/tests/tokenizer_reference.rs`).

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::ModelError;
use crate::gguf::GgufFile;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_PAD: &str = "tokenizer.ggml.padding_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";

/// GGUF `token_type` of control tokens (`<|im_start|>`, `<|begin_of_text|>`, ...).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `token_type` of user-defined added tokens.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The Llama 3 pre-tokenizer regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`, HF `tokenizer.json` of Llama 3).
const LLAMA3_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special-token facts the engine needs.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether a BOS token is prepended to every prompt ([`tokenizer_from_gguf`] then adds it on
    /// `encode(.., add_special_tokens = true)`).
    pub add_bos: bool,
    pub pad: Option<u32>,
}

/// The pre-tokenizer families we can build, keyed by `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreKind {
    /// GPT-2 regex (ByteLevel with `use_regex`).
    Gpt2,
    /// Every digit split off, then the GPT-2 regex (SmolLM / StarCoder vocabularies).
    SmolLm,
    /// Llama 3 regex, then ByteLevel without its own regex.
    Llama3,
}

impl PreKind {
    fn parse(pre: Option<&str>) -> Option<Self> {
        match pre {
            // llama.cpp's "default" uses its own regex set; HF (transformers' GGUF converter) uses GPT-2's, and so do we.
            None | Some("default" | "gpt-2" | "gpt2") => Some(PreKind::Gpt2),
            Some("smollm") => Some(PreKind::SmolLm),
            Some("llama-bpe" | "llama3" | "llama-v3") => Some(PreKind::Llama3),
            Some(_) => None,
        }
    }
}

fn tok_err(g: &GgufFile, detail: impl Into<String>) -> ModelError {
    ModelError::Tokenizer { path: g.path().to_path_buf(), detail: detail.into() }
}

/// `tokenizer.ggml.add_bos_token`, or llama.cpp's default when the key is absent: true for SentencePiece (`llama`)
/// vocabularies and for the Llama 3 pre-tokenizer, false otherwise.
fn add_bos_of(g: &GgufFile) -> bool {
    if let Some(v) = g.get(KEY_ADD_BOS).and_then(|v| v.as_bool()) {
        return v;
    }
    let model = g.get(KEY_MODEL).and_then(|v| v.as_str());
    let pre = g.get(KEY_PRE).and_then(|v| v.as_str());
    model == Some("llama") || PreKind::parse(pre) == Some(PreKind::Llama3)
}

fn token_id(g: &GgufFile, key: &str) -> Option<u32> {
    g.get(key).and_then(|v| v.as_u64()).and_then(|v| u32::try_from(v).ok())
}

/// Reads BOS/EOS/padding ids and `add_bos_token` from GGUF metadata. Missing or non-integer ids are `None`.
pub fn special_tokens_from_gguf(g: &GgufFile) -> SpecialTokens {
    SpecialTokens { bos: token_id(g, KEY_BOS), eos: token_id(g, KEY_EOS), add_bos: add_bos_of(g), pad: token_id(g, KEY_PAD) }
}

/// Builds a HF `tokenizers::Tokenizer` from GGUF tokenizer metadata (`tokenizer.ggml.model == "gpt2"`: byte-level
/// BPE).
///
/// Pre-tokenizer by `tokenizer.ggml.pre`:
/// - `smollm`: `Sequence[Digits{individual_digits}, ByteLevel{use_regex}]`;
/// - `default`, `gpt-2` or absent: `ByteLevel{use_regex}` (the GPT-2 regex);
/// - `llama-bpe` (Llama 3): `Sequence[Split(llama3 regex, Isolated), ByteLevel{use_regex: false}]`, with BPE
///   `ignore_merges` as Llama 3's `tokenizer.json` sets it;
/// - anything else: [`ModelError::Tokenizer`] (unsupported).
///
/// The decoder is ByteLevel. There is no unknown token (every byte has a token in byte-level BPE). BOS is added by a
/// `TemplateProcessing` post-processor only when [`SpecialTokens::add_bos`] is true (SmolLM2 has
/// `add_bos_token = false`, so nothing is added there).
///
/// SentencePiece vocabularies (`tokenizer.ggml.model == "llama"`) are out of scope for now and return an error.
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<Tokenizer, ModelError> {
    let model = g.require(KEY_MODEL)?.as_str().ok_or_else(|| tok_err(g, format!("`{KEY_MODEL}` is not a string")))?;
    if model != "gpt2" {
        return Err(tok_err(g, format!("unsupported tokenizer model `{model}` (supported: `gpt2` byte-level BPE; use a tokenizer.json)")));
    }
    let pre = match g.get(KEY_PRE) {
        None => None,
        Some(v) => Some(v.as_str().ok_or_else(|| tok_err(g, format!("`{KEY_PRE}` is not a string")))?),
    };
    let pre_kind = PreKind::parse(pre).ok_or_else(|| {
        tok_err(
            g,
            format!(
                "unsupported pre-tokenizer `{}` in `{KEY_PRE}` (supported: smollm, llama-bpe, gpt-2, default)",
                pre.unwrap_or_default()
            ),
        )
    })?;

    let tokens = g.string_array(KEY_TOKENS)?;
    let merges = g.string_array(KEY_MERGES)?;
    if u32::try_from(tokens.len()).is_err() {
        return Err(tok_err(g, format!("{} tokens do not fit u32 ids", tokens.len())));
    }

    // As in transformers' converter (`{word: i for i, word in enumerate(tokens)}`), a duplicated token string keeps
    // its last id.
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert((*tok).to_string(), id as u32);
    }
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| tok_err(g, format!("merge {i} `{m}` has no space")))?;
        pairs.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(pre_kind == PreKind::Llama3)
        .build()
        .map_err(|e| tok_err(g, format!("cannot build BPE model: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre_kind).map_err(|e| tok_err(g, e))?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let added = added_tokens(g, &tokens)?;
    if !added.is_empty() {
        tokenizer.add_tokens(added).map_err(|e| tok_err(g, format!("cannot add control/user-defined tokens: {e}")))?;
    }

    let special = special_tokens_from_gguf(g);
    if special.add_bos {
        let bos = special.bos.ok_or_else(|| tok_err(g, format!("`{KEY_ADD_BOS}` is set but `{KEY_BOS}` is missing")))?;
        let content = tokens
            .get(bos as usize)
            .ok_or_else(|| tok_err(g, format!("bos token id {bos} is outside the vocabulary ({})", tokens.len())))?;
        tokenizer.with_post_processor(Some(bos_processor(bos, content).map_err(|e| tok_err(g, e))?));
    }
    Ok(tokenizer)
}

fn pre_tokenizer(kind: PreKind) -> Result<PreTokenizerWrapper, String> {
    Ok(match kind {
        PreKind::Gpt2 => ByteLevel::new(false, true, true).into(),
        PreKind::SmolLm => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
        PreKind::Llama3 => {
            let split = Split::new(SplitPattern::Regex(LLAMA3_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| format!("llama3 pre-tokenizer regex: {e}"))?;
            Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
    })
}

/// Control (type 3, special) and user-defined (type 4) tokens as added tokens. A missing `token_type` array means
/// there are none.
fn added_tokens(g: &GgufFile, tokens: &[&str]) -> Result<Vec<AddedToken>, ModelError> {
    let Some(types) = g.get(KEY_TOKEN_TYPE) else {
        return Ok(Vec::new());
    };
    let types = types.as_array().ok_or_else(|| tok_err(g, format!("`{KEY_TOKEN_TYPE}` is not an array")))?;
    if types.len() != tokens.len() {
        return Err(tok_err(g, format!("`{KEY_TOKEN_TYPE}` has {} entries for {} tokens", types.len(), tokens.len())));
    }
    let mut added = Vec::new();
    for (id, (ty, tok)) in types.iter().zip(tokens).enumerate() {
        let ty = ty.as_i64().ok_or_else(|| tok_err(g, format!("`{KEY_TOKEN_TYPE}`[{id}] is not an integer")))?;
        let special = match ty {
            TOKEN_TYPE_CONTROL => true,
            TOKEN_TYPE_USER_DEFINED => false,
            _ => continue,
        };
        if tok.is_empty() {
            continue;
        }
        // Added tokens are matched on the raw text (there is no normalizer), never split by the pre-tokenizer.
        added.push(AddedToken::from(*tok, special).normalized(false));
    }
    Ok(added)
}

/// `bos $A` for single sequences and `bos $A bos $B` for pairs (as Llama 3's `tokenizer.json` does).
fn bos_processor(bos: u32, content: &str) -> Result<TemplateProcessing, String> {
    TemplateProcessing::builder()
        .try_single("bos:0 $A:0")
        .and_then(|b| b.try_pair("bos:0 $A:0 bos:1 $B:1"))
        .map_err(|e| format!("bos template: {e}"))?
        .special_tokens(vec![SpecialToken::new("bos".into(), vec![bos], vec![content.to_string()]).map_err(|e| e.to_string())?])
        .build()
        .map_err(|e| format!("bos template: {e}"))
}

/// Loads a `tokenizer.json`.
pub fn tokenizer_from_file(path: &Path) -> Result<Tokenizer, ModelError> {
    Tokenizer::from_file(path)
        .map_err(|e| ModelError::Tokenizer { path: path.to_path_buf(), detail: format!("cannot load tokenizer.json: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::writer::{Meta, to_bytes};

    /// A tiny byte-level vocabulary: ids 0..=2 are control tokens, 3 is user-defined.
    const TOKENS: &[&str] = &[
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<tool>",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "Ġ",
        "2",
        "0",
        "he",
        "ll",
        "hell",
        "hello",
        "Ġw",
        "or",
        "Ġwor",
        "Ġworl",
        "Ġworld",
        "20",
        "<",
        ">",
        "t",
    ];
    const MERGES: &[&str] = &["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "2 0"];

    fn id(tok: &str) -> u32 {
        TOKENS.iter().position(|t| *t == tok).unwrap() as u32
    }

    fn gguf(extra: Vec<(&str, Meta<'_>)>) -> (tempfile::TempDir, GgufFile) {
        let types: Vec<i32> = (0..TOKENS.len())
            .map(|i| {
                if i < 3 {
                    3
                } else if i == 3 {
                    4
                } else {
                    1
                }
            })
            .collect();
        // `extra` comes last: the reader keeps the last value of a repeated key, so it overrides these defaults.
        let mut meta = vec![
            (KEY_MODEL, Meta::Str("gpt2")),
            (KEY_TOKENS, Meta::StrArray(TOKENS)),
            (KEY_TOKEN_TYPE, Meta::I32Array(&types)),
            (KEY_MERGES, Meta::StrArray(MERGES)),
            (KEY_BOS, Meta::U32(1)),
            (KEY_EOS, Meta::U32(2)),
        ];
        meta.extend(extra);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok.gguf");
        std::fs::write(&path, to_bytes(&meta, &[])).unwrap();
        let g = GgufFile::open(&path).unwrap();
        (dir, g)
    }

    fn ids(t: &Tokenizer, text: &str, add_special: bool) -> Vec<u32> {
        t.encode(text, add_special).unwrap().get_ids().to_vec()
    }

    #[test]
    fn encodes_and_decodes_with_merges() {
        let (_d, g) = gguf(vec![(KEY_PRE, Meta::Str("smollm"))]);
        let t = tokenizer_from_gguf(&g).unwrap();
        let got = ids(&t, "hello world", false);
        assert_eq!(got, vec![id("hello"), id("Ġworld")]);
        assert_eq!(t.decode(&got, false).unwrap(), "hello world");
        assert_eq!(ids(&t, "hello world", true), got, "add_bos_token absent: nothing is added");
    }

    #[test]
    fn special_tokens_are_atomic_and_skippable() {
        let (_d, g) = gguf(vec![(KEY_PRE, Meta::Str("smollm"))]);
        let t = tokenizer_from_gguf(&g).unwrap();
        let got = ids(&t, "<|im_start|>hello<|im_end|><tool>", false);
        assert_eq!(got, vec![1, id("hello"), 2, 3]);
        assert_eq!(t.decode(&got, false).unwrap(), "<|im_start|>hello<|im_end|><tool>");
        // Control tokens are dropped, the user-defined one stays.
        assert_eq!(t.decode(&got, true).unwrap(), "hello<tool>");
    }

    #[test]
    fn smollm_splits_every_digit_and_gpt2_does_not() {
        let (_d, g) = gguf(vec![(KEY_PRE, Meta::Str("smollm"))]);
        let t = tokenizer_from_gguf(&g).unwrap();
        assert_eq!(ids(&t, "2020", false), vec![id("2"), id("0"), id("2"), id("0")]);
        let (_d, g) = gguf(vec![(KEY_PRE, Meta::Str("gpt-2"))]);
        let t = tokenizer_from_gguf(&g).unwrap();
        assert_eq!(ids(&t, "2020", false), vec![id("20"), id("20")]);
        let (_d, g) = gguf(vec![]);
        let t = tokenizer_from_gguf(&g).unwrap();
        assert_eq!(ids(&t, "2020", false), vec![id("20"), id("20")], "absent pre = GPT-2 regex");
    }

    #[test]
    fn llama3_pre_tokenizer_builds() {
        let (_d, g) = gguf(vec![(KEY_PRE, Meta::Str("llama-bpe")), (KEY_ADD_BOS, Meta::Bool(false))]);
        let t = tokenizer_from_gguf(&g).unwrap();
        let got = ids(&t, "hello world", false);
        assert_eq!(got, vec![id("hello"), id("Ġworld")]);
        assert_eq!(t.decode(&got, false).unwrap(), "hello world");
        // Without add_bos_token, llama.cpp's default for Llama 3 is to add BOS.
        let (_d, g) = gguf(vec![(KEY_PRE, Meta::Str("llama-bpe"))]);
        assert!(special_tokens_from_gguf(&g).add_bos);
    }

    #[test]
    fn add_bos_prepends_bos() {
        let (_d, g) = gguf(vec![(KEY_PRE, Meta::Str("smollm")), (KEY_ADD_BOS, Meta::Bool(true))]);
        let t = tokenizer_from_gguf(&g).unwrap();
        assert_eq!(ids(&t, "hello", true), vec![1, id("hello")]);
        assert_eq!(ids(&t, "hello", false), vec![id("hello")]);
        assert_eq!(t.decode(&[1, id("hello")], true).unwrap(), "hello");
    }

    #[test]
    fn special_token_ids() {
        let (_d, g) = gguf(vec![(KEY_PAD, Meta::U32(0))]);
        let s = special_tokens_from_gguf(&g);
        assert_eq!(s, SpecialTokens { bos: Some(1), eos: Some(2), add_bos: false, pad: Some(0) });
        let (_d, g) = gguf(vec![(KEY_ADD_BOS, Meta::Bool(true))]);
        assert!(special_tokens_from_gguf(&g).add_bos);
    }

    #[test]
    fn rejects_unsupported_model_and_pre() {
        let (_d, g) = gguf(vec![(KEY_MODEL, Meta::Str("llama"))]);
        let e = tokenizer_from_gguf(&g).unwrap_err().to_string();
        assert!(e.contains("unsupported tokenizer model `llama`"), "{e}");
        let (_d, g) = gguf(vec![(KEY_PRE, Meta::Str("qwen2"))]);
        let e = tokenizer_from_gguf(&g).unwrap_err().to_string();
        assert!(e.contains("unsupported pre-tokenizer `qwen2`"), "{e}");
        assert!(matches!(tokenizer_from_gguf(&g), Err(ModelError::Tokenizer { .. })));
    }

    #[test]
    fn rejects_bad_merges() {
        let bad: &[&str] = &["h e", "x y"];
        let (_d, g) = gguf(vec![(KEY_MERGES, Meta::StrArray(bad))]);
        let e = tokenizer_from_gguf(&g).unwrap_err().to_string();
        assert!(e.contains("cannot build BPE model"), "{e}");
        let bad: &[&str] = &["he"];
        let (_d, g) = gguf(vec![(KEY_MERGES, Meta::StrArray(bad))]);
        let e = tokenizer_from_gguf(&g).unwrap_err().to_string();
        assert!(e.contains("merge 0 `he` has no space"), "{e}");
    }

    #[test]
    fn tokenizer_json_round_trip() {
        let (_d, g) = gguf(vec![(KEY_PRE, Meta::Str("smollm"))]);
        let t = tokenizer_from_gguf(&g).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        t.save(&path, false).unwrap();
        let t2 = tokenizer_from_file(&path).unwrap();
        let text = "<|im_start|>hello world 2020<|im_end|>";
        assert_eq!(ids(&t2, text, false), ids(&t, text, false));
        let e = tokenizer_from_file(&dir.path().join("missing.json")).unwrap_err();
        assert!(matches!(e, ModelError::Tokenizer { .. }), "{e}");
    }
}
