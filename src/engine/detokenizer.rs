//! Incremental detokenization: each new token yields the text it completes, never a broken
//! UTF-8 sequence (byte-level BPE splits characters across tokens). Stop strings are found in
//! the text as it grows, each search looking only at the new text plus a stop string's length.
//!
//! Byte-level tokenizers (every Qwen one) go byte-exact: each token's bytes come from a table
//! built once ([`TokenBytes`]) and pass through a streaming UTF-8 decoder that holds back at
//! most an incomplete character's 3 bytes and replaces invalid bytes as
//! `String::from_utf8_lossy` does, so the pieces add up to `Tokenizer::decode` exactly, with
//! O(1) work per token. Other decoders re-decode a short window of tokens, waiting at most
//! [`MAX_PENDING`] tokens for a character to complete.

use std::sync::Arc;

use tokenizers::{DecoderWrapper, Tokenizer};

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

/// Every token's bytes as a byte-level decoder produces them, and whether it is special: what
/// `Tokenizer::decode` concatenates before its lossy UTF-8 conversion.
#[derive(Debug)]
pub struct TokenBytes {
    bytes: Vec<u8>,
    /// Token id's bytes are `bytes[ends[id - 1]..ends[id]]` (from 0 for id 0).
    ends: Vec<u32>,
    special: Vec<bool>,
}

/// GPT-2's byte-to-character map, inverted: printable Latin-1 bytes stand for themselves, the
/// rest (controls, space, 0x7f-0xa0, 0xad) for U+0100 upward in byte order.
fn byte_of_char(c: char) -> Option<u8> {
    static TABLE: std::sync::OnceLock<[Option<u8>; 512]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [None; 512];
        let mut next = 256;
        for b in 0..=255u8 {
            let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
            let c = if printable {
                usize::from(b)
            } else {
                next += 1;
                next - 1
            };
            table[c] = Some(b);
        }
        table
    });
    table.get(c as usize).copied().flatten()
}

impl TokenBytes {
    /// The table for a tokenizer whose decoder is plain byte-level; None for any other.
    pub fn new(tokenizer: &Tokenizer) -> Option<Self> {
        if !matches!(tokenizer.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            return None;
        }
        let specials: std::collections::HashSet<u32> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let n = tokenizer.get_vocab_size(true);
        let mut table = Self {
            bytes: Vec::new(),
            ends: Vec::with_capacity(n),
            special: Vec::with_capacity(n),
        };
        for id in 0..n as u32 {
            if let Some(token) = tokenizer.id_to_token(id) {
                // As the byte-level decoder does: mapped bytes where every character is in
                // the map, else the token's own UTF-8 (added tokens such as `<think>`).
                match token.chars().map(byte_of_char).collect::<Option<Vec<u8>>>() {
                    Some(bytes) => table.bytes.extend(bytes),
                    None => table.bytes.extend(token.as_bytes()),
                }
            }
            table.ends.push(u32::try_from(table.bytes.len()).ok()?);
            table.special.push(specials.contains(&id));
        }
        Some(table)
    }

    /// Tokens in the table.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Token `id`'s bytes and whether it is special (None outside the vocabulary).
    pub fn token(&self, id: u32) -> Option<(&[u8], bool)> {
        let special = *self.special.get(id as usize)?;
        Some((self.of(id, false), special))
    }

    /// A token's bytes (none for an id outside the vocabulary, or a skipped special token).
    fn of(&self, id: u32, skip_special: bool) -> &[u8] {
        let i = id as usize;
        if i >= self.ends.len() || (skip_special && self.special[i]) {
            return &[];
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.bytes[start..self.ends[i] as usize]
    }
}

pub struct Detokenizer {
    /// The byte-exact path's table and the bytes of a character not yet complete.
    exact: Option<(Arc<TokenBytes>, Vec<u8>)>,
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
            exact: None,
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

    /// Decodes byte-exact from `table` (see the module's notes) instead of re-decoding tokens.
    pub fn exact(mut self, table: Arc<TokenBytes>) -> Self {
        self.exact = Some((table, Vec::new()));
        self
    }

    /// The byte-exact step: appends the token's bytes and moves every complete character (and
    /// a U+FFFD for each invalid sequence, as `from_utf8_lossy`) into the text; an incomplete
    /// character's bytes wait, or at the end become one U+FFFD.
    fn push_bytes(&mut self, token: Option<u32>) -> bool {
        let Some((table, pending)) = self.exact.as_mut() else {
            return false;
        };
        if let Some(id) = token {
            pending.extend_from_slice(table.of(id, self.skip_special_tokens));
        }
        let mut rest: &[u8] = pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    self.text.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // The first `valid_up_to` bytes are valid UTF-8: this never falls back.
                    self.text
                        .push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            self.text.push('\u{FFFD}');
                            rest = &after[n..];
                        }
                        None if token.is_none() => {
                            self.text.push('\u{FFFD}');
                            rest = &[];
                            break;
                        }
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let drop = pending.len() - keep;
        pending.drain(..drop);
        true
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
        if self.push_bytes(Some(token)) {
            return self.take(false);
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
        if self.push_bytes(None) {
            return self.take(true);
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

    fn table(tok: &Tokenizer) -> Arc<TokenBytes> {
        Arc::new(TokenBytes::new(tok).expect("a byte-level tokenizer"))
    }

    #[test]
    fn the_byte_map_covers_every_byte_once() {
        let mut seen = [0u32; 256];
        for c in (0..0x200u32).filter_map(char::from_u32) {
            if let Some(b) = byte_of_char(c) {
                seen[b as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
        assert_eq!(byte_of_char('Ġ'), Some(b' '));
        assert_eq!(byte_of_char('Ċ'), Some(b'\n'));
        assert_eq!(byte_of_char('中'), None);
    }

    /// Any ids at all (broken UTF-8, lone continuation bytes, specials, real U+FFFD text): the
    /// byte-exact pieces add up to `Tokenizer::decode`, skipping specials or not, and an
    /// incomplete character never waits for more than its own bytes.
    #[test]
    fn byte_exact_pieces_add_up_to_the_full_decode_for_any_ids() {
        use rand::{Rng, SeedableRng};
        let tok = tokenizer();
        let table = table(&tok);
        let vocab = tok.get_vocab_size(true) as u32;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut cases: Vec<Vec<u32>> = (0..300)
            .map(|_| {
                let n = rng.random_range(0..40);
                (0..n).map(|_| rng.random_range(0..vocab)).collect()
            })
            .collect();
        cases.push(
            tok.encode("\u{FFFD}\u{FFFD}\u{800} 🙂 中文", false)
                .unwrap()
                .get_ids()
                .to_vec(),
        );
        for ids in &cases {
            for skip in [true, false] {
                let mut d = Detokenizer::new(skip, vec![], false).exact(table.clone());
                let (pieces, _) = stream(&tok, &mut d, ids);
                assert_eq!(pieces.concat(), tok.decode(ids, skip).unwrap(), "{ids:?}");
                let held = d.exact.as_ref().map_or(0, |(_, p)| p.len());
                assert_eq!(held, 0, "finish releases everything");
            }
        }
    }

    #[test]
    fn byte_exact_streams_characters_as_soon_as_they_are_complete() {
        let tok = tokenizer();
        let text = "你好🙂 café \u{FFFD}\u{FFFD}\u{800}";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let mut d = Detokenizer::new(true, vec![], false).exact(table(&tok));
        let mut out = String::new();
        for (i, &id) in ids.iter().enumerate() {
            out += &d.push(&tok, id).text;
            // Only final text goes out, and all of it but at most one character still
            // incomplete (shown as one U+FFFD by a decode of the ids so far).
            let so_far = tok.decode(&ids[..=i], true).unwrap();
            let held_back = so_far.chars().last().map_or(0, char::len_utf8);
            assert!(
                text.starts_with(out.as_str()),
                "after {} ids: {out:?}",
                i + 1
            );
            assert!(
                out.len() + held_back >= so_far.len(),
                "after {} ids: {out:?}",
                i + 1
            );
        }
        out += &d.finish(&tok).text;
        assert_eq!(out, text);
    }
}
