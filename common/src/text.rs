//! The text side of a model: tokenizer, chat template and the special tokens, loaded from whichever format the model
//! came in (GGUF metadata, or `tokenizer.json` + `tokenizer_config.json` in an HF directory).

use tokenizers::Tokenizer;

use crate::chat::{ChatMessage, ChatTemplate, chat_template_from_tokenizer_config};
use crate::error::ModelError;
use crate::model::{ModelFiles, WeightStore};
use crate::tokenizer::{special_tokens_from_gguf, tokenizer_from_file, tokenizer_from_gguf};

/// Tokenizer, optional chat template, and stop ids of a model.
#[derive(Debug)]
pub struct TextAssets {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Token ids that end generation (eos ids of the model and its generation config).
    pub eos_token_ids: Vec<u32>,
}

impl TextAssets {
    /// Loads the tokenizer and chat template that belong to `model`.
    pub fn load(model: &ModelFiles) -> Result<Self, ModelError> {
        let path = model.path.as_path();
        let template_err = |detail: String| ModelError::ChatTemplate { path: path.into(), detail };
        let (tokenizer, template) = match &model.store {
            WeightStore::Gguf(g) => {
                let tokenizer = tokenizer_from_gguf(g)?;
                let special = special_tokens_from_gguf(g);
                let name = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
                let template = match g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
                    Some(src) => {
                        Some(ChatTemplate::new(src, name(special.bos), name(special.eos)).map_err(|e| template_err(e.to_string()))?)
                    }
                    None => None,
                };
                (tokenizer, template)
            }
            WeightStore::Hf(_) => {
                let tokenizer = tokenizer_from_file(&path.join("tokenizer.json"))?;
                let cfg_path = path.join("tokenizer_config.json");
                let template = if cfg_path.exists() {
                    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::Io { path: cfg_path.clone(), source: e })?;
                    let v: serde_json::Value =
                        serde_json::from_str(&text).map_err(|e| ModelError::Tokenizer { path: cfg_path.clone(), detail: e.to_string() })?;
                    match chat_template_from_tokenizer_config(&v) {
                        Some((src, bos, eos)) => Some(ChatTemplate::new(&src, bos, eos).map_err(|e| template_err(e.to_string()))?),
                        None => None,
                    }
                } else {
                    None
                };
                (tokenizer, template)
            }
        };
        let mut eos_token_ids = model.config.eos_token_ids.clone();
        for id in &model.generation.eos_token_ids {
            if !eos_token_ids.contains(id) {
                eos_token_ids.push(*id);
            }
        }
        Ok(Self { tokenizer, chat_template: template, eos_token_ids })
    }

    /// Renders a single user message with the chat template (generation prompt appended).
    pub fn render_user_prompt(&self, user: &str) -> Result<Option<String>, ModelError> {
        let Some(t) = &self.chat_template else { return Ok(None) };
        let msgs = [ChatMessage { role: "user".into(), content: user.into() }];
        t.render(&msgs, true).map(Some).map_err(|e| ModelError::ChatTemplate { path: "<chat template>".into(), detail: e.to_string() })
    }
}
