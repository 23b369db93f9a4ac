//! Prompts for `ember bench serve`: synthetic prompts of a given token length (random tokens
//! decoded to text, so no two share a prefix) or a JSONL file.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use tokenizers::Tokenizer;

/// One request to send.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchPrompt {
    pub text: String,
    /// Tokens of `text` by the benchmark's tokenizer (the server's usage wins when it reports one).
    pub num_tokens: usize,
    pub max_tokens: usize,
}

/// `input_len` tokens of random text for each of `count` prompts.
pub fn synthetic(
    tokenizer: &Tokenizer,
    count: usize,
    input_len: usize,
    output_len: usize,
    seed: u64,
) -> Result<Vec<BenchPrompt>> {
    let vocab = tokenizer.get_vocab_size(false) as u32;
    if vocab < 64 {
        bail!("the tokenizer's vocabulary ({vocab}) is too small for synthetic prompts");
    }
    // Ordinary tokens from the bulk of the vocabulary: past the single bytes, before the rare
    // tail (and the special tokens after it).
    let (lower, upper) = (1000.min(vocab / 8), vocab.min(100_000));
    let mut rng = StdRng::seed_from_u64(seed);
    let decode = |ids: &[u32]| {
        tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding a synthetic prompt: {e}"))
    };
    let encode = |text: &str| -> Result<Vec<u32>> {
        Ok(tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("encoding a synthetic prompt: {e}"))?
            .get_ids()
            .to_vec())
    };
    (0..count)
        .map(|_| {
            // Decoding and re-encoding merges some tokens: top up and trim until the text is
            // input_len tokens (or close to it).
            let mut ids: Vec<u32> = (0..input_len)
                .map(|_| rng.random_range(lower..upper))
                .collect();
            let mut text = decode(&ids)?;
            for _ in 0..4 {
                let actual = encode(&text)?;
                if actual.len() == input_len {
                    break;
                }
                ids = actual;
                ids.truncate(input_len);
                while ids.len() < input_len {
                    ids.push(rng.random_range(lower..upper));
                }
                text = decode(&ids)?;
            }
            let num_tokens = encode(&text)?.len();
            Ok(BenchPrompt {
                text,
                num_tokens,
                max_tokens: output_len,
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct JsonlLine {
    prompt: String,
    #[serde(alias = "max_tokens")]
    output_len: Option<usize>,
}

/// Prompts from a JSONL file: `{"prompt": "...", "output_len": 128}` per line (`output_len`
/// optional, else `default_output_len`). Cycles through the file to make `count` requests.
pub fn jsonl(
    path: &Path,
    tokenizer: Option<&Tokenizer>,
    count: usize,
    default_output_len: usize,
) -> Result<Vec<BenchPrompt>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let parsed: JsonlLine = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", path.display(), i + 1))?;
        let num_tokens = match tokenizer {
            Some(t) => t
                .encode(parsed.prompt.as_str(), false)
                .map_err(|e| anyhow!("encoding: {e}"))?
                .len(),
            None => 0,
        };
        lines.push(BenchPrompt {
            text: parsed.prompt,
            num_tokens,
            max_tokens: parsed.output_len.unwrap_or(default_output_len),
        });
    }
    if lines.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(lines.iter().cycle().take(count).cloned().collect())
}
