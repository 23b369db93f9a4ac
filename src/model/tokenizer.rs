//! The tokenizer of a GGUF file, rebuilt from the `tokenizer.ggml.*` metadata llama.cpp's
//! converter wrote: byte-level BPE with Qwen's pre-tokenizer, as the tokenizer.json it came
//! from (NFC, the Qwen split regex, GPT-2's byte alphabet, merges in rank order; control tokens
//! special, user-defined ones plain added tokens), so ids match tokenizer.json's.

use anyhow::{anyhow, Result};
use ember_models::gguf::{GgufVocab, TokenType};
use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

/// Qwen2/Qwen2.5/Qwen3's pre-tokenizer split (llama.cpp's `qwen2` pre-tokenizer).
const QWEN_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer that `vocab` describes.
pub fn from_gguf_vocab(vocab: &GgufVocab) -> Result<Tokenizer> {
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
    });
    let mut model_vocab = Map::new();
    let mut added = Vec::new();
    for (id, (text, ty)) in vocab.tokens.iter().zip(&vocab.types).enumerate() {
        match ty {
            TokenType::Normal | TokenType::Byte => {
                model_vocab.insert(text.clone(), id.into());
            }
            TokenType::Control | TokenType::UserDefined => added.push(json!({
                "id": id,
                "content": text,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": *ty == TokenType::Control,
            })),
            // Padding rows of the embedding ([PAD151665] ...): never produced by the text.
            TokenType::Unused | TokenType::Unknown | TokenType::Undefined => {}
        }
    }
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": { "type": "NFC" },
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": { "Regex": QWEN_SPLIT },
                    "behavior": "Isolated",
                    "invert": false
                },
                byte_level.clone()
            ]
        },
        "post_processor": byte_level.clone(),
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": Value::Object(model_vocab),
            "merges": vocab.merges,
        }
    });
    json.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| anyhow!("rebuilding the tokenizer from GGUF metadata: {e}"))
}
