//! What one forward pass computes: a flat list of new tokens from several sequences, each
//! sequence continuing from its own position. The engine builds one per step.

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};

/// One sequence's share of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSlice {
    /// The sequence's slot in the KV cache.
    pub slot: usize,
    /// Number of tokens of this sequence already in the cache (the position of its first new token).
    pub start_pos: usize,
    /// Number of new tokens in this batch.
    pub num_tokens: usize,
}

/// Which rows of the batch get logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsRows {
    /// The last new token of each sequence (generation).
    LastPerSeq,
    /// Every new token (prompt logprobs, parity tests).
    All,
    /// Per sequence: every new token (true) or the last one (false).
    PerSeq(Vec<bool>),
}

impl LogitsRows {
    /// Row indices into the flat batch, in order.
    pub fn rows(&self, batch: &Batch) -> Vec<u32> {
        let mut rows = Vec::new();
        for (i, (offset, s)) in batch.offsets().enumerate() {
            let all = match self {
                Self::LastPerSeq => false,
                Self::All => true,
                Self::PerSeq(flags) => flags.get(i).copied().unwrap_or(false),
            };
            let first = if all {
                offset
            } else {
                offset + s.num_tokens - 1
            };
            rows.extend(first as u32..(offset + s.num_tokens) as u32);
        }
        rows
    }
}

#[derive(Debug, Clone)]
pub struct Batch {
    /// (total_tokens,) u32
    pub token_ids: Tensor,
    /// (total_tokens,) u32: each token's absolute position in its sequence.
    pub positions: Tensor,
    pub seqs: Vec<SeqSlice>,
    pub logits_rows: LogitsRows,
}

impl Batch {
    /// `seqs`: (slot, start_pos, new tokens) for each sequence.
    pub fn new(
        seqs: &[(usize, usize, &[u32])],
        logits_rows: LogitsRows,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        if seqs.is_empty() {
            return Err(ModelError::Batch(
                "a batch needs at least one sequence".into(),
            ));
        }
        let total: usize = seqs.iter().map(|s| s.2.len()).sum();
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut slices = Vec::with_capacity(seqs.len());
        for &(slot, start_pos, tokens) in seqs {
            if tokens.is_empty() {
                return Err(ModelError::Batch(format!(
                    "sequence in slot {slot} has no new tokens"
                )));
            }
            let end = start_pos + tokens.len();
            if end > max_positions {
                return Err(ModelError::Batch(format!(
                    "sequence in slot {slot} reaches position {end}, beyond the model's {max_positions}"
                )));
            }
            ids.extend_from_slice(tokens);
            positions.extend((start_pos..end).map(|p| p as u32));
            slices.push(SeqSlice {
                slot,
                start_pos,
                num_tokens: tokens.len(),
            });
        }
        Ok(Self {
            token_ids: Tensor::from_vec(ids, total, device)?,
            positions: Tensor::from_vec(positions, total, device)?,
            seqs: slices,
            logits_rows,
        })
    }

    /// Row offset of each sequence's first token in the flat batch.
    pub fn offsets(&self) -> impl Iterator<Item = (usize, &SeqSlice)> {
        self.seqs.iter().scan(0usize, |offset, s| {
            let start = *offset;
            *offset += s.num_tokens;
            Some((start, s))
        })
    }
}
