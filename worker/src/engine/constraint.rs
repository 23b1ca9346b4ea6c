//! Constrained decoding with llguidance: the token table, grammar compilation, and the per-sequence matcher the
//! engine asks for a token mask before each draw.
//!
//! - [`GrammarCompiler`] is built once per model ([`GrammarCompiler::new`]): it turns the tokenizer's vocabulary into
//!   llguidance's token trie (the bytes each token id stands for) and holds llguidance's `ParserFactory`. We build the
//!   table here from our own `tokenizers::Tokenizer` rather than with `toktrie_hf_tokenizers`, which pins an older
//!   `tokenizers` (0.21); the construction is the same (GPT-2 byte-level alphabet, or SentencePiece byte fallback).
//! - [`GrammarCompiler::compile`] turns a wire [`pb::Constraint`] into a [`Grammar`] (a matcher at its start state).
//!   It may take milliseconds to seconds for a large schema: the gRPC service runs it on the blocking pool with a
//!   deadline, never on the engine thread, and a grammar llguidance rejects is a [`ConstraintError`] the service turns
//!   into a structured rejection naming `constraint`.
//! - [`Constraint`] is one sequence's matcher (each of a request's `n` completions gets a deep clone). For a draw the
//!   engine computes [`Constraint::next_mask`] on a helper thread while the step's forward pass runs, then applies
//!   it (disallowed logits become -inf, so every sampling path (greedy, the host sampler) only ever sees allowed
//!   tokens); after the draw, [`Constraint::accept`]. The sequence stops when the grammar is
//!   complete ([`Constraint::is_complete`]).
//!
//! JSON Schemas compile with fixed separators (`", "`, `": "`) and no free whitespace between tokens (vLLM's
//! `disable-any-whitespace`), unless the schema carries its own `x-guidance` options: with free whitespace a small
//! model can emit newlines until its token limit and never close the object.

use std::collections::HashMap;
use std::sync::Arc;

use ferrite_common::proto::worker as pb;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use tokenizers::{DecoderWrapper, Tokenizer};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

/// Why a constraint could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// The tokenizer's vocabulary cannot be mapped to bytes (neither byte-level BPE nor byte fallback).
    #[error("constrained decoding is not available for this tokenizer: {0}")]
    Tokenizer(String),
    /// llguidance refused the grammar (a bad schema, regex or Lark grammar, or one over its limits).
    #[error("{0}")]
    Grammar(String),
    /// The request carried an empty `Constraint`.
    #[error("the constraint names no grammar")]
    Empty,
}

/// The token table and parser factory of one model (see the module docs).
pub struct GrammarCompiler {
    factory: ParserFactory,
}

/// A compiled grammar at its start state; [`Grammar::start`] gives each completion its own matcher.
pub struct Grammar(Matcher);

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammar")
    }
}

impl Clone for Grammar {
    fn clone(&self) -> Self {
        Self(self.0.deep_clone())
    }
}

impl Grammar {
    /// A fresh matcher for one completion.
    pub fn start(&self) -> Constraint {
        Constraint { matcher: self.0.deep_clone() }
    }
}

/// One sequence's position in its grammar.
pub struct Constraint {
    matcher: Matcher,
}

impl GrammarCompiler {
    /// Builds the token table of `tokenizer` for a model with `vocab_size` logits (ids past the tokenizer's vocabulary
    /// are never allowed) and `eos_ids` (the first is the grammar's end token; all of them end a sequence).
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize, eos_ids: &[u32]) -> Result<Self, ConstraintError> {
        let words = token_bytes(tokenizer, vocab_size)?;
        let eos = *eos_ids.first().ok_or_else(|| ConstraintError::Tokenizer("the model has no eos token".into()))?;
        let info = TokRxInfo::new(words.len() as u32, eos);
        let mut trie = TokTrie::from(&info, &words);
        if eos_ids.len() > 1 {
            trie = trie.with_eos_tokens(eos_ids);
        }
        let env: TokEnv = Arc::new(Env { trie, tokenizer: tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| ConstraintError::Tokenizer(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// Compiles a wire constraint (blocking: call it off the engine thread).
    pub fn compile(&self, c: &pb::Constraint) -> Result<Grammar, ConstraintError> {
        use pb::constraint::Kind;
        let grammar = match c.kind.as_ref().ok_or(ConstraintError::Empty)? {
            Kind::JsonSchema(text) => {
                let mut schema: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| ConstraintError::Grammar(format!("the JSON Schema is not JSON: {e}")))?;
                if let Some(obj) = schema.as_object_mut()
                    && !obj.contains_key("x-guidance")
                {
                    obj.insert(
                        "x-guidance".into(),
                        serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
                    );
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Kind::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Kind::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| ConstraintError::Grammar(e.to_string()))?;
        Ok(Grammar(Matcher::new(Ok(parser))))
    }
}

/// The tokens a grammar allows next (computed by [`Constraint::next_mask`], possibly on another thread while the
/// step's forward pass runs).
pub struct TokenMask(toktrie::SimpleVob);

impl TokenMask {
    /// Sets every logit the mask does not allow to -inf (the device sampler's host twin, on the same words).
    pub fn apply(&self, logits: &mut [f32]) {
        ferrite_kernels::cpu::sample::apply_mask(logits, self.0.as_slice());
    }

    /// The mask as words (bit `i % 32` of word `i / 32` set = id `i` allowed: llguidance's own layout, which
    /// `ferrite_kernels::cpu::sample::apply_mask` and the device sampler take).
    pub fn into_words(self) -> Vec<u32> {
        self.0.as_slice().to_vec()
    }
}

impl Constraint {
    /// The tokens the grammar allows next. `Err` when the matcher failed or allows nothing (the engine ends the
    /// sequence).
    pub fn next_mask(&mut self) -> Result<TokenMask, String> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        if allowed.is_zero() {
            return Err("the grammar allows no token".into());
        }
        Ok(TokenMask(allowed))
    }

    /// Advances the grammar by the drawn token.
    pub fn accept(&mut self, token: u32) -> Result<(), String> {
        if self.matcher.is_stopped() {
            return Ok(()); // the eos that ends a complete grammar
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// Whether the output is complete: the grammar allows nothing but its end.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// llguidance's view of the tokenizer: the trie, and our tokenizer for text it must tokenize (forced strings).
struct Env {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            // A failed encode falls back to the trie's greedy tokenization.
            self.tokenizer.encode(s, false).map(|e| e.get_ids().to_vec()).unwrap_or_else(|_| self.trie.greedy_tokenize(s.as_bytes()))
        })
    }
}

/// GPT-2's byte-level alphabet: the char that stands for each byte in a byte-level BPE vocabulary.
fn byte_level_chars() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = HashMap::with_capacity(256);
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        if printable(b) {
            map.insert(char::from(b), b);
        } else {
            map.insert(char::from_u32(next).expect("a valid char"), b);
            next += 1;
        }
    }
    map
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alphabet {
    ByteLevel,
    ByteFallback,
}

fn alphabet(d: &DecoderWrapper) -> Option<Alphabet> {
    match d {
        DecoderWrapper::ByteLevel(_) => Some(Alphabet::ByteLevel),
        DecoderWrapper::ByteFallback(_) => Some(Alphabet::ByteFallback),
        DecoderWrapper::Sequence(s) => s.get_decoders().iter().find_map(alphabet),
        _ => None,
    }
}

/// The bytes of every token id below `vocab_size`: special tokens as llguidance's marker byte plus their name (so a
/// grammar never produces them by accident), ids the tokenizer lacks as unreachable specials.
fn token_bytes(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Vec<Vec<u8>>, ConstraintError> {
    let alphabet = tokenizer
        .get_decoder()
        .and_then(alphabet)
        .ok_or_else(|| ConstraintError::Tokenizer("its decoder is neither byte-level nor byte fallback".into()))?;
    let chars = byte_level_chars();
    let added = tokenizer.get_added_tokens_decoder();
    let special = |name: &str| {
        let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
        b.extend_from_slice(name.as_bytes());
        b
    };
    let mut out = Vec::with_capacity(vocab_size);
    for id in 0..vocab_size as u32 {
        let bytes = match (added.get(&id), tokenizer.id_to_token(id)) {
            (Some(a), _) if a.special => special(&a.content),
            (Some(a), _) => a.content.as_bytes().to_vec(),
            (None, Some(name)) => match alphabet {
                Alphabet::ByteLevel => {
                    name.chars().map(|c| chars.get(&c).copied()).collect::<Option<Vec<u8>>>().unwrap_or_else(|| special(&name))
                }
                Alphabet::ByteFallback => match name.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
                    Some(hex) if hex.len() == 2 => {
                        vec![u8::from_str_radix(hex, 16).map_err(|e| ConstraintError::Tokenizer(e.to_string()))?]
                    }
                    _ => name.replace('\u{2581}', " ").into_bytes(),
                },
            },
            (None, None) => special(&format!("<[{id}]>")),
        };
        out.push(bytes);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_alphabet_is_a_bijection() {
        let m = byte_level_chars();
        assert_eq!(m.len(), 256);
        let mut bytes: Vec<u8> = m.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(m[&'Ġ'], b' ');
        assert_eq!(m[&'Ċ'], b'\n');
    }
}
