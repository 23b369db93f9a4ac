//! The KV cache lives outside the model. The model only needs this narrow interface; the
//! paged cache of the engine implements it too.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use crate::batch::SeqSlice;

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

    /// Forgets a sequence.
    pub fn free(&mut self, slot: usize) {
        self.slots.remove(&slot);
    }

    /// Tokens cached for `slot` (0 when unknown).
    pub fn len(&self, slot: usize) -> usize {
        self.slots
            .get(&slot)
            .and_then(|layers| layers.first())
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[0])
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
