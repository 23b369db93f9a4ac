//! The KV cache lives outside the model. The model only needs this narrow interface; the
//! paged cache of the engine implements it too.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use crate::batch::{Batch, SeqSlice};
use crate::config::ModelConfig;

pub trait KvCache {
    /// Stores this step's keys and values, (num_tokens, num_kv_heads, head_dim), for `seq` at
    /// `layer`, and returns all of that sequence's keys and values so far: (context, heads, dim).
    fn append(
        &mut self,
        layer: usize,
        seq: &SeqSlice,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)>;
}

/// One growing tensor pair per sequence and layer. Simple and exact; no sharing or paging.
#[derive(Debug, Default)]
pub struct ContiguousKvCache {
    num_layers: usize,
    slots: HashMap<usize, Vec<Option<(Tensor, Tensor)>>>,
}

impl ContiguousKvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            num_layers,
            slots: HashMap::new(),
        }
    }
}

impl KvCache for ContiguousKvCache {
    fn append(
        &mut self,
        layer: usize,
        seq: &SeqSlice,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let num_layers = self.num_layers;
        let layers = self
            .slots
            .entry(seq.slot)
            .or_insert_with(|| vec![None; num_layers]);
        let entry = layers
            .get_mut(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("layer {layer} out of range")))?;
        let (k_all, v_all) = match entry.take() {
            Some((k_old, v_old)) if seq.start_pos > 0 => {
                let cached = k_old.dims()[0];
                if cached < seq.start_pos {
                    candle_core::bail!(
                        "slot {} has {cached} cached tokens but the batch starts at {}",
                        seq.slot,
                        seq.start_pos
                    );
                }
                // Positions at or after start_pos are recomputed: drop their stale entries.
                let k_old = k_old.narrow(0, 0, seq.start_pos)?;
                let v_old = v_old.narrow(0, 0, seq.start_pos)?;
                (Tensor::cat(&[&k_old, k], 0)?, Tensor::cat(&[&v_old, v], 0)?)
            }
            None if seq.start_pos > 0 => {
                candle_core::bail!(
                    "slot {} has no cache but starts at {}",
                    seq.slot,
                    seq.start_pos
                )
            }
            _ => (k.clone(), v.clone()),
        };
        *entry = Some((k_all.clone(), v_all.clone()));
        Ok((k_all, v_all))
    }
}

/// Where one sequence's tokens live in the paged cache during one step.
#[derive(Debug)]
struct StepSlots {
    /// (new tokens, kv width) u32: each row repeats the token's cache slot, for `scatter_set`.
    write: Tensor,
    /// (context,) u32: the slots of all the sequence's tokens so far, in order.
    read: Tensor,
}

/// The paged KV cache: per layer, keys and values of shape (num_blocks * block_size,
/// kv_heads * head_dim); a token at position `p` of a sequence lives in slot
/// `table[p / block_size] * block_size + p % block_size`. Block tables come from the engine's
/// block manager through [`PagedKvCache::prepare`] before each forward pass.
#[derive(Debug)]
pub struct PagedKvCache {
    block_size: usize,
    num_blocks: usize,
    num_kv_heads: usize,
    head_dim: usize,
    layers: Vec<(Tensor, Tensor)>,
    step: HashMap<usize, StepSlots>,
}

impl PagedKvCache {
    /// Bytes one block takes over all layers, keys and values.
    pub fn bytes_per_block(cfg: &ModelConfig, block_size: usize, dtype: DType) -> usize {
        2 * cfg.num_hidden_layers
            * block_size
            * cfg.num_key_value_heads
            * cfg.head_dim
            * dtype.size_in_bytes()
    }

    pub fn new(
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let width = cfg.num_key_value_heads * cfg.head_dim;
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros((num_blocks * block_size, width), dtype, device)?,
                    Tensor::zeros((num_blocks * block_size, width), dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            block_size,
            num_blocks,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            layers,
            step: HashMap::new(),
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Gives the block table of each sequence of `batch` (same order) for the next forward pass.
    pub fn prepare(&mut self, batch: &Batch, tables: &[&[u32]]) -> Result<()> {
        if tables.len() != batch.seqs.len() {
            candle_core::bail!(
                "{} block tables for {} sequences",
                tables.len(),
                batch.seqs.len()
            );
        }
        self.step.clear();
        let device = batch.token_ids.device().clone();
        let width = self.num_kv_heads * self.head_dim;
        for (seq, table) in batch.seqs.iter().zip(tables) {
            let end = seq.start_pos + seq.num_tokens;
            if end > table.len() * self.block_size {
                candle_core::bail!("slot {}: {end} tokens but {} blocks", seq.slot, table.len());
            }
            let slot_of = |p: usize| -> Result<u32> {
                let block = table[p / self.block_size] as usize;
                if block >= self.num_blocks {
                    candle_core::bail!("block {block} out of range");
                }
                Ok((block * self.block_size + p % self.block_size) as u32)
            };
            let read: Vec<u32> = (0..end).map(slot_of).collect::<Result<_>>()?;
            let write: Vec<u32> = read[seq.start_pos..]
                .iter()
                .flat_map(|&s| std::iter::repeat_n(s, width))
                .collect();
            self.step.insert(
                seq.slot,
                StepSlots {
                    write: Tensor::from_vec(write, (seq.num_tokens, width), &device)?,
                    read: Tensor::from_vec(read, end, &device)?,
                },
            );
        }
        Ok(())
    }
}

impl KvCache for PagedKvCache {
    fn append(
        &mut self,
        layer: usize,
        seq: &SeqSlice,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let slots = self.step.get(&seq.slot).ok_or_else(|| {
            candle_core::Error::Msg(format!("slot {} was not prepared", seq.slot))
        })?;
        let (k_cache, v_cache) = self
            .layers
            .get(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("layer {layer} out of range")))?;
        let width = self.num_kv_heads * self.head_dim;
        let n = seq.num_tokens;
        k_cache.scatter_set(&slots.write, &k.reshape((n, width))?, 0)?;
        v_cache.scatter_set(&slots.write, &v.reshape((n, width))?, 0)?;
        let ctx = slots.read.dim(0)?;
        let shape = (ctx, self.num_kv_heads, self.head_dim);
        Ok((
            k_cache.index_select(&slots.read, 0)?.reshape(shape)?,
            v_cache.index_select(&slots.read, 0)?.reshape(shape)?,
        ))
    }
}
