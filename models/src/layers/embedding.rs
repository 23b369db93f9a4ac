//! Token embedding table, also the lm_head when embeddings are tied (then, on CPU, it is kept
//! only in the packed matmul layout and lookups gather rows from it: one copy of the largest
//! matrix, not two).

use std::sync::Arc;

use candle_core::{Device, Result, Tensor};
use ember_kernels::{PackedWeight, QuantWeight};

use crate::weights::{MatrixRole, Weights};

#[derive(Debug, Clone)]
pub enum Embedding {
    Table(Tensor),
    Packed(Arc<PackedWeight>),
    /// A quantized table (GGUF) kept as it is: lookups dequantize their rows.
    Quantized(Arc<[QuantWeight]>),
}

impl Embedding {
    /// `tied`: the table is also the lm_head.
    pub fn load(vb: &Weights, vocab_size: usize, hidden_size: usize, tied: bool) -> Result<Self> {
        let file = std::slice::from_ref(vb);
        if let Some(q) = Weights::quantized_from_file(file, &[vocab_size], hidden_size)? {
            return Ok(Self::Quantized(q.into()));
        }
        // In-situ quantization: a tied table is the output matrix, as in llama.cpp.
        let role = if tied {
            MatrixRole::Output
        } else {
            MatrixRole::Projection
        };
        if let Some(q) = Weights::quantized_in_situ(file, &[vocab_size], hidden_size, role)? {
            return Ok(Self::Quantized(q.into()));
        }
        if tied {
            // Packed straight from a mapped checkpoint where there is one.
            let file = std::slice::from_ref(vb);
            if let Some(packed) = Weights::packed_from_file(file, &[vocab_size], hidden_size)? {
                return Ok(Self::Packed(Arc::new(packed)));
            }
        }
        let weight = vb.get((vocab_size, hidden_size), "weight")?;
        if tied && weight.device().is_cpu() {
            Ok(Self::Packed(Arc::new(PackedWeight::new(&weight)?)))
        } else {
            Ok(Self::Table(weight))
        }
    }

    /// `ids`: (tokens,) u32 -> (tokens, hidden).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Table(weight) => weight.index_select(ids, 0),
            Self::Packed(weight) => weight.gather_rows(&ids.to_vec1::<u32>()?),
            Self::Quantized(parts) => {
                let ids = ids.to_vec1::<u32>()?;
                let rows = parts[0]
                    .dequantize_rows(&ids)
                    .map_err(|e| candle_core::Error::Msg(format!("embedding: {e}")))?;
                Tensor::from_vec(rows, (ids.len(), parts[0].cols()), &Device::Cpu)
            }
        }
    }

    /// `x` (rows, hidden) times the table transposed: the tied lm_head.
    pub fn lm_head(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Table(weight) => ember_kernels::linear(x, weight),
            Self::Packed(weight) => ember_kernels::linear_packed(x, weight, None),
            Self::Quantized(parts) => ember_kernels::linear_quant(x, parts, None),
        }
    }
}
