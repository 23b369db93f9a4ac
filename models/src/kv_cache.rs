//! The KV cache lives outside the model. The model only needs this narrow interface; the
//! paged cache of the engine implements it too.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use ember_kernels::{KvLayout, PagedSeq};

use crate::batch::{Batch, SeqSlice};
use crate::config::ModelConfig;

pub trait KvCache: Send {
    /// Stores this step's keys and values, (tokens, num_kv_heads, head_dim), of every sequence
    /// of `batch` at `layer`, then returns causal attention of `q`, (tokens, heads, head_dim),
    /// over each sequence's whole context: (tokens, heads * head_dim).
    fn attend(
        &mut self,
        layer: usize,
        batch: &Batch,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> Result<Tensor>;
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

impl ContiguousKvCache {
    /// Appends `k`, `v` of `seq` at `layer` and returns its whole context.
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

impl KvCache for ContiguousKvCache {
    fn attend(
        &mut self,
        layer: usize,
        batch: &Batch,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> Result<Tensor> {
        let mut outputs = Vec::with_capacity(batch.seqs.len());
        for (offset, seq) in batch.offsets() {
            let n = seq.num_tokens;
            let (k_all, v_all) = self.append(
                layer,
                seq,
                &k.narrow(0, offset, n)?,
                &v.narrow(0, offset, n)?,
            )?;
            let q_s = q.narrow(0, offset, n)?;
            outputs.push(ember_kernels::causal_attention(
                &q_s,
                &k_all,
                &v_all,
                seq.start_pos,
                scale,
            )?);
        }
        if outputs.len() == 1 {
            Ok(outputs.remove(0))
        } else {
            Tensor::cat(&outputs, 0)
        }
    }
}

/// The paged KV cache: per layer, keys and values of shape (num_blocks * block_size,
/// kv_heads * head_dim); a token at position `p` of a sequence lives in slot
/// `table[p / block_size] * block_size + p % block_size`. Block tables come from the engine's
/// block manager through [`PagedKvCache::prepare`] before each forward pass; attention reads
/// the blocks where they lie ([`ember_kernels::paged_attention`]). On CPU the keys of each
/// block are stored transposed ([`KvLayout::Columns`]: one vector load = one dimension of 16
/// keys); values, and keys on other devices, are rows.
#[derive(Debug)]
pub struct PagedKvCache {
    block_size: usize,
    num_blocks: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    key_layout: KvLayout,
    layers: Vec<(Tensor, Tensor)>,
    /// This step's block table of each sequence, in batch order.
    tables: Vec<Vec<u32>>,
    /// This step's cache slot of each new token, in batch order.
    write_slots: Vec<u32>,
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

    /// `dtype` is the cache's element type, independent of the model's (f32, bf16 or f16).
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
                    ember_kernels::zeros_lazy((num_blocks * block_size, width), dtype, device)?,
                    ember_kernels::zeros_lazy((num_blocks * block_size, width), dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            block_size,
            num_blocks,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            dtype,
            key_layout: if device.is_cpu() {
                KvLayout::Columns { block_size }
            } else {
                KvLayout::Rows
            },
            layers,
            tables: Vec::new(),
            write_slots: Vec::new(),
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn dtype(&self) -> DType {
        self.dtype
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
        self.tables.clear();
        self.write_slots.clear();
        for (seq, table) in batch.seqs.iter().zip(tables) {
            let end = seq.start_pos + seq.num_tokens;
            if end > table.len() * self.block_size {
                candle_core::bail!("slot {}: {end} tokens but {} blocks", seq.slot, table.len());
            }
            let used = &table[..end.div_ceil(self.block_size)];
            if let Some(b) = used.iter().find(|&&b| b as usize >= self.num_blocks) {
                candle_core::bail!("block {b} out of range");
            }
            let bs = self.block_size;
            self.write_slots.extend(
                (seq.start_pos..end).map(|p| (table[p / bs] as usize * bs + p % bs) as u32),
            );
            self.tables.push(used.to_vec());
        }
        Ok(())
    }
}

impl KvCache for PagedKvCache {
    fn attend(
        &mut self,
        layer: usize,
        batch: &Batch,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> Result<Tensor> {
        if self.tables.len() != batch.seqs.len() {
            candle_core::bail!("the paged cache was not prepared for this batch");
        }
        let (k_cache, v_cache) = self
            .layers
            .get(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("layer {layer} out of range")))?;
        let width = self.num_kv_heads * self.head_dim;
        let tokens = self.write_slots.len();
        let (keys, values) = (self.key_layout, KvLayout::Rows);
        ember_kernels::write_kv(
            k_cache,
            &k.reshape((tokens, width))?,
            &self.write_slots,
            keys,
        )?;
        ember_kernels::write_kv(
            v_cache,
            &v.reshape((tokens, width))?,
            &self.write_slots,
            values,
        )?;
        let seqs: Vec<PagedSeq> = batch
            .seqs
            .iter()
            .zip(&self.tables)
            .map(|(s, table)| PagedSeq {
                start_pos: s.start_pos,
                num_tokens: s.num_tokens,
                block_table: table,
            })
            .collect();
        ember_kernels::paged_attention(
            q,
            k_cache,
            v_cache,
            &seqs,
            self.block_size,
            self.key_layout,
            self.num_kv_heads,
            scale,
        )
    }
}
