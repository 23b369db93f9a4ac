//! Where a model's tensors come from: candle's [`VarBuilder`] (every tensor, on any device) and,
//! for a memory-mapped safetensors checkpoint on the CPU, the mapped bytes themselves, so that
//! the weights Ember's matmul repacks are packed straight from the file. Going through the
//! VarBuilder instead copies each weight into fresh memory first and then packs the copy: two
//! writes of every weight byte into memory the kernel must fault in and zero, most of `ember
//! serve`'s start-up, and twice the peak memory while loading.

use std::ops::Deref;
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Result};
use candle_nn::VarBuilder;
use ember_kernels::{GgmlType, HostRows, PackedWeight, QuantWeight};

use crate::gguf::GgufTensors;
use half::{bf16, f16};

/// A [`VarBuilder`] (reached through `Deref`), plus the mapped checkpoint when there is one.
#[derive(Clone)]
pub struct Weights<'a> {
    vb: VarBuilder<'a>,
    mapped: Option<Arc<MmapedSafetensors>>,
    /// A GGUF file: its quantized matrices are used as they are on the CPU.
    gguf: Option<GgufTensors>,
    /// `--quantization`: matrices quantized at load.
    in_situ: Option<InSitu>,
}

/// What a matrix is, for the type in-situ quantization gives it (llama.cpp's rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixRole {
    /// Attention and MLP projections, an untied embedding table: the requested type, or its
    /// fallback ([`GgmlType::for_row_len`]).
    Projection,
    /// The lm_head, or the embedding table tied to it: [`GgmlType::for_output`].
    Output,
}

/// One matrix quantized at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizedMatrix {
    pub name: String,
    pub ty: GgmlType,
    /// In the checkpoint.
    pub bytes_before: usize,
    pub bytes_after: usize,
}

/// In-situ quantization of a checkpoint's matrices at load, and the record of what it did.
#[derive(Debug, Clone)]
pub struct InSitu {
    ty: GgmlType,
    done: Arc<Mutex<Vec<QuantizedMatrix>>>,
}

impl InSitu {
    /// Quantize to `ty` (one of [`GgmlType::parse_quantized`]'s types).
    pub fn new(ty: GgmlType) -> Self {
        Self {
            ty,
            done: Arc::default(),
        }
    }

    /// The matrices quantized so far, in checkpoint order.
    pub fn report(&self) -> Vec<QuantizedMatrix> {
        let mut done = self.done.lock().map(|d| d.clone()).unwrap_or_default();
        done.sort_by(|a, b| a.name.cmp(&b.name));
        done
    }

    /// The type a matrix of rows of `k` gets.
    pub fn type_for(&self, role: MatrixRole, k: usize) -> Option<GgmlType> {
        match role {
            MatrixRole::Projection => self.ty.for_row_len(k),
            MatrixRole::Output => self.ty.for_output(k),
        }
    }
}

impl<'a> From<VarBuilder<'a>> for Weights<'a> {
    /// Tensors through the VarBuilder only.
    fn from(vb: VarBuilder<'a>) -> Self {
        Self {
            vb,
            mapped: None,
            gguf: None,
            in_situ: None,
        }
    }
}

impl<'a> Deref for Weights<'a> {
    type Target = VarBuilder<'a>;

    fn deref(&self) -> &VarBuilder<'a> {
        &self.vb
    }
}

impl<'a> Weights<'a> {
    /// `vb` reads `mapped`; packed weights are read from `mapped` directly.
    pub fn mapped(vb: VarBuilder<'a>, mapped: Arc<MmapedSafetensors>) -> Self {
        Self {
            vb,
            mapped: Some(mapped),
            gguf: None,
            in_situ: None,
        }
    }

    /// Quantize the matrices (on the CPU) as `in_situ` says, instead of keeping them dense.
    pub fn with_in_situ(self, in_situ: InSitu) -> Self {
        Self {
            in_situ: Some(in_situ),
            ..self
        }
    }

    /// The same weights, none quantized at load (a MoE router, kept as llama.cpp keeps it).
    pub fn unquantized(&self) -> Self {
        Self {
            in_situ: None,
            ..self.clone()
        }
    }

    /// `vb` reads the GGUF file `tensors` (dequantizing); quantized matrices are read from it
    /// directly by [`Self::quantized_from_file`].
    pub fn gguf(vb: VarBuilder<'a>, tensors: GgufTensors) -> Self {
        Self {
            vb,
            mapped: None,
            gguf: Some(tensors),
            in_situ: None,
        }
    }

    /// The same weights under `<prefix>.<s>`.
    pub fn pp<S: ToString>(&self, s: S) -> Self {
        Self {
            vb: self.vb.pp(s),
            mapped: self.mapped.clone(),
            gguf: self.gguf.clone(),
            in_situ: self.in_situ.clone(),
        }
    }

    /// `<part>.weight` of each part (`rows[i]` × `cols`) quantized at load, when in-situ
    /// quantization is on, on the CPU, and `cols` is whole blocks of the type `role` gets (else
    /// `None`: the caller loads dense weights). Each matrix is read as f32 (exactly, from any
    /// checkpoint dtype) and quantized row by row, as llama-quantize does.
    pub fn quantized_in_situ(
        parts: &[Weights],
        rows: &[usize],
        cols: usize,
        role: MatrixRole,
    ) -> Result<Option<Vec<QuantWeight>>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let (Some(in_situ), true) = (&first.in_situ, first.vb.device().is_cpu()) else {
            return Ok(None);
        };
        let Some(ty) = in_situ.type_for(role, cols) else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(parts.len());
        for (part, &n) in parts.iter().zip(rows) {
            let name = part.path("weight");
            let weight = part
                .vb
                .clone()
                .set_dtype(DType::F32)
                .get((n, cols), "weight")?;
            let stored = part
                .mapped
                .as_ref()
                .and_then(|m| m.get(&name).ok())
                .map(|v| v.data().len())
                .unwrap_or(n * cols * part.vb.dtype().size_in_bytes());
            let values = weight.flatten_all()?.to_vec1::<f32>()?;
            let q = QuantWeight::quantize(ty, &values, n, cols)
                .map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
            if let Ok(mut done) = in_situ.done.lock() {
                done.push(QuantizedMatrix {
                    name,
                    ty,
                    bytes_before: stored,
                    bytes_after: q.size_in_bytes(),
                });
            }
            out.push(q);
        }
        Ok(Some(out))
    }

    /// `<part>.weight` of each part (`rows[i]` × `cols`) as quantized matrices, one per part,
    /// straight from a GGUF file on the CPU — or `None` when that cannot be done (no GGUF file,
    /// not the CPU, a part missing, of another shape, or not quantized), and the caller loads
    /// dense tensors through the VarBuilder.
    pub fn quantized_from_file(
        parts: &[Weights],
        rows: &[usize],
        cols: usize,
    ) -> Result<Option<Vec<QuantWeight>>> {
        let mut out = Vec::with_capacity(parts.len());
        for (part, &n) in parts.iter().zip(rows) {
            let Some(gguf) = &part.gguf else {
                return Ok(None);
            };
            if !part.vb.device().is_cpu() {
                return Ok(None);
            }
            let Ok(t) = gguf.view(&part.path("weight")) else {
                return Ok(None);
            };
            if !t.view.ty.is_quantized() || t.shape != [n, cols] {
                return Ok(None);
            }
            out.push(
                QuantWeight::from_parts(t.view.ty, &[t.view.data], cols).map_err(|e| {
                    candle_core::Error::Msg(format!("{}: {e}", part.path("weight")))
                })?,
            );
        }
        Ok(Some(out).filter(|o| o.len() == rows.len() && !o.is_empty()))
    }

    /// The checkpoint name of `<prefix>.<name>`.
    fn path(&self, name: &str) -> String {
        let prefix = self.vb.prefix();
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    }

    /// `<part>.weight` of each part (`rows[i]` × `cols`), packed one after another straight
    /// from the mapped file — or `None` where that cannot be done (no mapped file, not the CPU,
    /// a tensor missing or of another shape or dtype than the model's, an unaligned tensor, a
    /// big-endian host), and the caller loads through the VarBuilder, which also reports what
    /// is wrong.
    pub fn packed_from_file(
        parts: &[Weights],
        rows: &[usize],
        cols: usize,
    ) -> Result<Option<PackedWeight>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        if cfg!(target_endian = "big") || !first.vb.device().is_cpu() || parts.len() != rows.len() {
            return Ok(None);
        }
        let dtype = first.vb.dtype();
        let mut bytes = Vec::with_capacity(parts.len());
        for (part, &n) in parts.iter().zip(rows) {
            let (Some(mapped), true) = (&part.mapped, part.vb.dtype() == dtype) else {
                return Ok(None);
            };
            let Ok(view) = mapped.get(&part.path("weight")) else {
                return Ok(None);
            };
            let same_dtype = matches!(
                (view.dtype(), dtype),
                (safetensors::Dtype::F32, DType::F32)
                    | (safetensors::Dtype::BF16, DType::BF16)
                    | (safetensors::Dtype::F16, DType::F16)
            );
            if !same_dtype || view.shape() != [n, cols] {
                return Ok(None);
            }
            bytes.push(view.data());
        }
        macro_rules! pack {
            ($t:ty, $variant:ident) => {{
                let mut slices: Vec<&[$t]> = Vec::with_capacity(bytes.len());
                for b in &bytes {
                    // SAFETY: f32, bf16 and f16 accept every bit pattern, and the file's
                    // little-endian layout is the host's (checked above); align_to hands back
                    // only the aligned middle, which must then be the whole tensor.
                    let (head, body, tail) = unsafe { b.align_to::<$t>() };
                    if !head.is_empty() || !tail.is_empty() {
                        return Ok(None);
                    }
                    slices.push(body);
                }
                PackedWeight::from_host(HostRows::$variant(&slices), cols).map(Some)
            }};
        }
        match dtype {
            DType::F32 => pack!(f32, F32),
            DType::BF16 => pack!(bf16, Bf16),
            DType::F16 => pack!(f16, F16),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use candle_core::{Device, Tensor};

    use super::*;

    /// A checkpoint of q/k/v projections (rows 4, 2, 2 of 6 columns) in bf16, written to a
    /// temporary file and mapped.
    fn checkpoint(tag: &str) -> (PathBuf, Arc<MmapedSafetensors>) {
        let dev = Device::Cpu;
        let mut tensors = HashMap::new();
        for (i, (name, rows)) in [("q_proj", 4), ("k_proj", 2), ("v_proj", 2)]
            .into_iter()
            .enumerate()
        {
            let values: Vec<f32> = (0..rows * 6).map(|v| (v + 100 * i) as f32 / 7.0).collect();
            let t = Tensor::from_vec(values, (rows, 6), &dev)
                .and_then(|t| t.to_dtype(DType::BF16))
                .expect("tensor");
            tensors.insert(format!("attn.{name}.weight"), t);
        }
        let path = std::env::temp_dir().join(format!(
            "ember-weights-{tag}-{}.safetensors",
            std::process::id()
        ));
        candle_core::safetensors::save(&tensors, &path).expect("save");
        // SAFETY: a file this test wrote and nobody else touches.
        let mapped = unsafe { MmapedSafetensors::new(&path) }.expect("map");
        (path, Arc::new(mapped))
    }

    /// The VarBuilder's own mapping of the file.
    fn var_builder(path: &PathBuf, dtype: DType) -> VarBuilder<'static> {
        // SAFETY: as in `checkpoint`.
        let mapped = unsafe { MmapedSafetensors::new(path) }.expect("map");
        VarBuilder::from_backend(Box::new(mapped), dtype, Device::Cpu)
    }

    fn weights(path: &PathBuf, mapped: &Arc<MmapedSafetensors>, dtype: DType) -> Weights<'static> {
        Weights::mapped(var_builder(path, dtype), mapped.clone()).pp("attn")
    }

    #[test]
    fn packs_straight_from_the_file_what_the_tensors_pack_to() {
        let (path, mapped) = checkpoint("same");
        let w = weights(&path, &mapped, DType::BF16);
        let parts = [w.pp("q_proj"), w.pp("k_proj"), w.pp("v_proj")];
        let direct = Weights::packed_from_file(&parts, &[4, 2, 2], 6)
            .expect("pack")
            .expect("a bf16 checkpoint for a bf16 model packs from the file");
        let loaded: Vec<Tensor> = parts
            .iter()
            .zip([4, 2, 2])
            .map(|(p, rows)| p.get((rows, 6), "weight").expect("tensor"))
            .collect();
        let loaded: Vec<&Tensor> = loaded.iter().collect();
        let through_tensors = PackedWeight::concat(&loaded).expect("concat");
        assert_eq!(direct, through_tensors);
        assert_eq!((direct.rows(), direct.cols()), (8, 6));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn anything_else_goes_through_the_var_builder() {
        let (path, mapped) = checkpoint("other");
        // Another dtype than the file's: converted by the VarBuilder, not packed from the file.
        let f32_model = weights(&path, &mapped, DType::F32);
        let q = [f32_model.pp("q_proj")];
        assert!(Weights::packed_from_file(&q, &[4], 6)
            .expect("pack")
            .is_none());
        // Another shape than the checkpoint's, or a missing tensor: the VarBuilder's error.
        let bf16_model = weights(&path, &mapped, DType::BF16);
        let q = [bf16_model.pp("q_proj")];
        assert!(Weights::packed_from_file(&q, &[3], 6)
            .expect("pack")
            .is_none());
        let missing = [bf16_model.pp("o_proj")];
        assert!(Weights::packed_from_file(&missing, &[4], 6)
            .expect("pack")
            .is_none());
        // No mapped file at all.
        let plain = Weights::from(var_builder(&path, DType::BF16));
        let q = [plain.pp("attn").pp("q_proj")];
        assert!(Weights::packed_from_file(&q, &[4], 6)
            .expect("pack")
            .is_none());
        let _ = std::fs::remove_file(path);
    }
}
