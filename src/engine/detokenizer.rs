//! Incremental detokenization: each new token yields the text it completes, never a broken
//! UTF-8 sequence (byte-level BPE splits characters across tokens), with the work per token
//! bounded by the few tokens since the last complete character. Stop strings are found in
//! the text as it grows, each search looking only at the new text plus a stop string's length.

use tokenizers::Tokenizer;

/// Most tokens held back waiting for a character to complete.
const MAX_PENDING: usize = 8;

/// What one step of detokenization made visible.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextDelta {
    /// Text that can be sent to the client now.
    pub text: String,
    /// A stop string was found: the sequence is finished (the text up to it is in `text`).
    pub stopped_by: Option<String>,
}

pub struct Detokenizer {
    skip_special_tokens: bool,
    tokens: Vec<u32>,
    /// tokens[prefix_offset..read_offset] decode to text already in `text`.
    prefix_offset: usize,
    read_offset: usize,
    /// All decoded output text.
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stop: Vec<String>,
    max_stop_len: usize,
    include_stop_str: bool,
    /// Bytes of `text` already searched for stop strings (minus overlap).
    searched: usize,
    finished: bool,
}

impl Detokenizer {
    pub fn new(skip_special_tokens: bool, stop: Vec<String>, include_stop_str: bool) -> Self {
        let max_stop_len = stop.iter().map(String::len).max().unwrap_or(0);
        Self {
            skip_special_tokens,
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            emitted: 0,
            stop,
            max_stop_len,
            include_stop_str,
            searched: 0,
            finished: false,
        }
    }

    fn decode(&self, tokenizer: &Tokenizer, range: std::ops::Range<usize>) -> String {
        tokenizer
            .decode(&self.tokens[range], self.skip_special_tokens)
            .unwrap_or_default()
    }

    /// Adds a generated token.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> TextDelta {
        if self.finished {
            return TextDelta::default();
        }
        self.tokens.push(token);
        let prefix = self.decode(tokenizer, self.prefix_offset..self.read_offset);
        let full = self.decode(tokenizer, self.prefix_offset..self.tokens.len());
        // Wait while the newest bytes are an incomplete character, but never for more than
        // MAX_PENDING tokens: a character is at most 4 bytes, so a longer wait means bytes that
        // will never form one (or tokens that decode to nothing), and each push re-decodes
        // the whole wait (quadratic in a run that logit_bias can force).
        let forced = self.tokens.len() - self.read_offset >= MAX_PENDING;
        let complete = full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.starts_with(prefix.as_str());
        if complete || forced {
            if let Some(rest) = full.strip_prefix(prefix.as_str()) {
                self.text.push_str(rest);
            }
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
        }
        self.take(false)
    }

    /// Ends the sequence: everything not yet handed out (an incomplete character included).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> TextDelta {
        if self.finished {
            return TextDelta::default();
        }
        if self.read_offset < self.tokens.len() {
            let prefix = self.decode(tokenizer, self.prefix_offset..self.read_offset);
            let full = self.decode(tokenizer, self.prefix_offset..self.tokens.len());
            if let Some(rest) = full.strip_prefix(prefix.as_str()) {
                self.text.push_str(rest);
            }
            self.read_offset = self.tokens.len();
        }
        self.take(true)
    }

    /// Looks for stop strings in the unsearched text and hands out what is safe to send.
    fn take(&mut self, at_end: bool) -> TextDelta {
        let mut stopped_by = None;
        if !self.stop.is_empty() {
            // A stop string may straddle the boundary: back up by its length minus one.
            let mut from = self
                .searched
                .saturating_sub(self.max_stop_len.saturating_sub(1));
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            let found = self
                .stop
                .iter()
                .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| (from + i, s)))
                .min_by_key(|&(i, s)| (i, std::cmp::Reverse(s.len())));
            if let Some((at, s)) = found {
                let end = if self.include_stop_str {
                    at + s.len()
                } else {
                    at
                };
                stopped_by = Some(s.clone());
                self.text.truncate(end.max(self.emitted));
            }
            self.searched = self.text.len();
        }
        let done = at_end || stopped_by.is_some();
        // Hold back a tail that could still grow into a stop string.
        let mut upto = if done || self.stop.is_empty() {
            self.text.len()
        } else {
            self.text
                .len()
                .saturating_sub(self.max_stop_len.saturating_sub(1))
        };
        upto = upto.max(self.emitted);
        while !self.text.is_char_boundary(upto) {
            upto -= 1;
        }
        let text = self.text[self.emitted..upto.max(self.emitted)].to_string();
        self.emitted = upto.max(self.emitted);
        if done {
            self.finished = true;
        }
        TextDelta { text, stopped_by }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tokenizer() -> Tokenizer {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tokenizer/tokenizer.json");
        Tokenizer::from_file(path).unwrap()
    }

    fn stream(tok: &Tokenizer, d: &mut Detokenizer, ids: &[u32]) -> (Vec<String>, Option<String>) {
        let mut pieces = Vec::new();
        for &id in ids {
            let delta = d.push(tok, id);
            pieces.push(delta.text);
            if delta.stopped_by.is_some() {
                return (pieces, delta.stopped_by);
            }
        }
        pieces.push(d.finish(tok).text);
        (pieces, None)
    }

    #[test]
    fn streams_exactly_the_full_decode_without_broken_characters() {
        let tok = tokenizer();
        for text in [
            "Hello, world!",
            "你好，世界🙂 Ember 🚀🚀 café",
            "emoji 🙂🙂🙂 and 中文混合 text",
        ] {
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            let mut d = Detokenizer::new(true, vec![], false);
            let (pieces, _) = stream(&tok, &mut d, &ids);
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
            assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap());
            assert_eq!(pieces.concat(), text);
        }
    }

    #[test]
    fn stop_strings_end_the_text_and_are_excluded_by_default() {
        let tok = tokenizer();
        let ids = tok
            .encode("The capital of France is Paris. The end", false)
            .unwrap()
            .get_ids()
            .to_vec();
        let mut d = Detokenizer::new(true, vec!["Paris".into(), "is P".into()], false);
        let (pieces, stop) = stream(&tok, &mut d, &ids);
        assert_eq!(stop.as_deref(), Some("is P"), "the earliest match wins");
        assert_eq!(pieces.concat(), "The capital of France ");
        let mut d = Detokenizer::new(true, vec!["Paris".into()], true);
        let (pieces, stop) = stream(&tok, &mut d, &ids);
        assert_eq!(stop.as_deref(), Some("Paris"));
        assert_eq!(pieces.concat(), "The capital of France is Paris");
    }

    #[test]
    fn special_tokens_are_skipped_or_kept() {
        let tok = tokenizer();
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        let mut ids = tok.encode("Hi", false).unwrap().get_ids().to_vec();
        ids.push(im_end);
        let mut d = Detokenizer::new(true, vec![], false);
        assert_eq!(stream(&tok, &mut d, &ids).0.concat(), "Hi");
        let mut d = Detokenizer::new(false, vec![], false);
        assert_eq!(stream(&tok, &mut d, &ids).0.concat(), "Hi<|im_end|>");
    }

    #[test]
    fn bytes_that_never_form_a_character_are_released_within_a_bounded_wait() {
        let tok = tokenizer();
        // A token that decodes to a lone UTF-8 continuation byte (shown as U+FFFD).
        let lone = (0..tok.get_vocab_size(true) as u32)
            .find(|&id| tok.decode(&[id], false).ok().as_deref() == Some("\u{FFFD}"))
            .expect("a byte-level token for a continuation byte");
        let ids = vec![lone; 64];
        let mut d = Detokenizer::new(true, vec![], false);
        let mut before_finish = String::new();
        for &id in &ids {
            before_finish.push_str(&d.push(&tok, id).text);
        }
        // Released as it goes (at most MAX_PENDING held), not all at the end.
        let released = before_finish.chars().filter(|&c| c == '\u{FFFD}').count();
        assert!(released >= 64 - MAX_PENDING, "{released} released");
        let all = before_finish + &d.finish(&tok).text;
        assert_eq!(all, tok.decode(&ids, true).unwrap());
    }
}
