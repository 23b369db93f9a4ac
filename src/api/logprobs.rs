//! Log-probabilities in OpenAI's two shapes: chat (`content: [{token, logprob, bytes,
//! top_logprobs}]`) and legacy completions (`tokens`, `token_logprobs`, `top_logprobs`,
//! `text_offset`).

use serde_json::{json, Map, Value as Json};
use tokenizers::Tokenizer;

use crate::engine::TokenLogprob;

/// Names tokens the way clients see them.
pub struct TokenNames<'a> {
    pub tokenizer: &'a Tokenizer,
    /// vLLM's `return_tokens_as_token_ids`: "token_id:123" instead of text.
    pub as_ids: bool,
}

/// The byte a byte-level BPE (GPT-2, Qwen) vocabulary character stands for.
fn byte_level_char_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    match c {
        // Printable bytes map to themselves.
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(c as u8),
        // The rest were shifted to U+0100.. in order.
        0x100..=0x143 => {
            let k = (c - 0x100) as u8;
            // The k-th byte that is not printable.
            (0u8..=255)
                .filter(|b| !matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF))
                .nth(k as usize)
        }
        _ => None,
    }
}

impl TokenNames<'_> {
    /// The raw bytes of a token (a byte-level piece may be part of a UTF-8 character).
    pub fn bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.tokenizer.id_to_token(id) else {
            return Vec::new();
        };
        // Added tokens (<|im_end|>, <think>) are ASCII, which the byte-level alphabet maps
        // to itself; a piece outside the alphabet is taken as plain text.
        let mapped: Option<Vec<u8>> = piece.chars().map(byte_level_char_to_byte).collect();
        mapped.unwrap_or_else(|| piece.into_bytes())
    }

    pub fn name(&self, id: u32) -> String {
        if self.as_ids {
            format!("token_id:{id}")
        } else {
            String::from_utf8_lossy(&self.bytes(id)).into_owned()
        }
    }

    fn chat_entry(&self, id: u32, logprob: f32) -> Json {
        json!({"token": self.name(id), "logprob": clamp(logprob), "bytes": self.bytes(id)})
    }

    /// One entry of a chat completion's `logprobs.content`.
    pub fn chat(&self, lp: &TokenLogprob) -> Json {
        let mut entry = self.chat_entry(lp.token, lp.logprob);
        let top: Vec<Json> = lp.top.iter().map(|&(t, l)| self.chat_entry(t, l)).collect();
        entry["top_logprobs"] = Json::Array(top);
        entry
    }
}

/// JSON has no -inf: a token the model gives no chance gets the lowest finite value, as vLLM does.
fn clamp(logprob: f32) -> f32 {
    if logprob.is_nan() {
        f32::MIN
    } else {
        logprob.max(-9999.0)
    }
}

/// Legacy completions logprobs, built token by token.
#[derive(Debug, Default)]
pub struct LegacyLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Json>,
    top_logprobs: Vec<Json>,
    text_offset: Vec<usize>,
    /// Characters of text before the next token.
    offset: usize,
}

impl LegacyLogprobs {
    pub fn starting_at(offset: usize) -> Self {
        Self {
            offset,
            ..Self::default()
        }
    }

    /// Adds a token; `lp` is None for the first prompt token, which nothing predicts.
    pub fn push(&mut self, names: &TokenNames, token: u32, lp: Option<&TokenLogprob>) {
        let name = names.name(token);
        self.text_offset.push(self.offset);
        self.offset += name.chars().count();
        match lp {
            Some(lp) => {
                self.token_logprobs.push(json!(clamp(lp.logprob)));
                let mut top = Map::new();
                for &(t, l) in &lp.top {
                    top.insert(names.name(t), json!(clamp(l)));
                }
                // Like OpenAI, the chosen token is among its alternatives.
                top.entry(name.clone())
                    .or_insert_with(|| json!(clamp(lp.logprob)));
                self.top_logprobs.push(Json::Object(top));
            }
            None => {
                self.token_logprobs.push(Json::Null);
                self.top_logprobs.push(Json::Null);
            }
        }
        self.tokens.push(name);
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The JSON of the tokens so far, leaving this empty (the offset carries on).
    pub fn take(&mut self) -> Json {
        json!({
            "tokens": std::mem::take(&mut self.tokens),
            "token_logprobs": std::mem::take(&mut self.token_logprobs),
            "top_logprobs": std::mem::take(&mut self.top_logprobs),
            "text_offset": std::mem::take(&mut self.text_offset),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::byte_level_char_to_byte;

    #[test]
    fn byte_level_alphabet_round_trips() {
        // The alphabet is a bijection between 256 chars and the 256 bytes.
        let mut seen = [false; 256];
        let chars = (0x21u32..=0x7E)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .chain(0x100..=0x143);
        for c in chars {
            let b = byte_level_char_to_byte(char::from_u32(c).unwrap()).unwrap();
            assert!(!seen[b as usize], "byte {b} twice");
            seen[b as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(byte_level_char_to_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_char_to_byte('Ċ'), Some(b'\n'));
        assert_eq!(byte_level_char_to_byte('a'), Some(b'a'));
        assert_eq!(byte_level_char_to_byte('好'), None);
    }
}
