//! ggml's quantized block formats, as GGUF files store them: which types exist, their block
//! geometry, and dequantization to f32 (the reference every quantized kernel is tested
//! against, and the path for weights that are not matmul inputs: norms, embedding rows).
//!
//! A row of `k` weights is `k / block_len` blocks of `block_bytes` each, little-endian. The
//! dequantization here performs the same f32 operations in the same order as ggml's reference
//! (`dequantize_row_*`) and the `gguf` Python package, so its results are bit for bit theirs.

mod act;
mod blocks;
mod dot;
mod interleave;
mod matmul;
mod quantize;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use matmul::{Activations, QuantWeight};

use half::{bf16, f16};

/// A ggml tensor type, by its GGUF id. Every id ggml defines is named (so a file of a type
/// Ember cannot run is refused with that type's name); [`GgmlType::is_supported`] says which
/// Ember runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    Bf16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
}

impl GgmlType {
    /// The type with GGUF id `id`, if ggml defines one.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => Iq2Xxs,
            17 => Iq2Xs,
            18 => Iq3Xxs,
            19 => Iq1S,
            20 => Iq4Nl,
            21 => Iq3S,
            22 => Iq2S,
            23 => Iq4Xs,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => Iq1M,
            30 => Bf16,
            34 => Tq1_0,
            35 => Tq2_0,
            39 => Mxfp4,
            _ => return None,
        })
    }

    /// ggml's name of the type (`q4_K`, `bf16`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "f32",
            F16 => "f16",
            Q4_0 => "q4_0",
            Q4_1 => "q4_1",
            Q5_0 => "q5_0",
            Q5_1 => "q5_1",
            Q8_0 => "q8_0",
            Q8_1 => "q8_1",
            Q2K => "q2_K",
            Q3K => "q3_K",
            Q4K => "q4_K",
            Q5K => "q5_K",
            Q6K => "q6_K",
            Q8K => "q8_K",
            Iq2Xxs => "iq2_xxs",
            Iq2Xs => "iq2_xs",
            Iq3Xxs => "iq3_xxs",
            Iq1S => "iq1_s",
            Iq4Nl => "iq4_nl",
            Iq3S => "iq3_s",
            Iq2S => "iq2_s",
            Iq4Xs => "iq4_xs",
            I8 => "i8",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            F64 => "f64",
            Iq1M => "iq1_m",
            Bf16 => "bf16",
            Tq1_0 => "tq1_0",
            Tq2_0 => "tq2_0",
            Mxfp4 => "mxfp4",
        }
    }

    /// Whether Ember loads and runs tensors of this type.
    pub fn is_supported(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | Bf16 | Q4_0 | Q5_0 | Q8_0 | Q4K | Q5K | Q6K
        )
    }

    /// Whether this is one of the block-quantized types Ember runs (not a plain float).
    pub fn is_quantized(self) -> bool {
        self.is_supported() && !matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16)
    }

    /// Elements per block (1 for plain types), for the supported types.
    pub fn block_len(self) -> usize {
        use GgmlType::*;
        match self {
            Q4_0 | Q5_0 | Q8_0 => 32,
            Q4K | Q5K | Q6K => 256,
            _ => 1,
        }
    }

    /// Bytes per block, for the supported types (0 for the others).
    pub fn block_bytes(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | Bf16 => 2,
            Q4_0 => blocks::Q4_0_BYTES,
            Q5_0 => blocks::Q5_0_BYTES,
            Q8_0 => blocks::Q8_0_BYTES,
            Q4K => blocks::Q4K_BYTES,
            Q5K => blocks::Q5K_BYTES,
            Q6K => blocks::Q6K_BYTES,
            _ => 0,
        }
    }

    /// The type `--quantization NAME` asks for: one of the quantized types Ember computes with,
    /// by its ggml name in any case (`q8_0`, `q4_k`, `Q6_K`, ...).
    pub fn parse_quantized(name: &str) -> Option<Self> {
        use GgmlType::*;
        [Q8_0, Q4_0, Q5_0, Q4K, Q5K, Q6K]
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name.trim()))
    }

    /// The type llama.cpp's quantizer stores a matrix of rows of `k` in when asked for `self`
    /// (`llama-quant.cpp`): a k-quant falls back where `k` is not a multiple of 256 — Q4_K to
    /// Q5_0, Q6_K to Q8_0, and Q5_K to Q5_0 (llama.cpp uses Q5_1, the same five bits plus an
    /// offset, which Ember does not compute with). `None` where even the fallback's blocks of
    /// 32 do not divide `k`: the matrix stays unquantized.
    pub fn for_row_len(self, k: usize) -> Option<Self> {
        use GgmlType::*;
        let ty = match self {
            Q4K | Q5K if !k.is_multiple_of(256) => Q5_0,
            Q6K if !k.is_multiple_of(256) => Q8_0,
            t => t,
        };
        Some(ty).filter(|t| t.is_quantized() && t.row_bytes(k).is_some_and(|r| r > 0))
    }

    /// The type llama.cpp gives the output matrix (lm_head, or the embedding table it is tied
    /// to) when asked for `self`: Q8_0 if that was asked for or rows of `k` are not whole Q6_K
    /// blocks, else Q6_K (the logits are the most sensitive product).
    pub fn for_output(self, k: usize) -> Option<Self> {
        let ty = if self == GgmlType::Q8_0 || !k.is_multiple_of(256) {
            GgmlType::Q8_0
        } else {
            GgmlType::Q6K
        };
        ty.for_row_len(k)
    }

    /// Bytes of a row of `k` elements, or `None` when `k` is not a whole number of blocks (or
    /// the type is not supported).
    pub fn row_bytes(self, k: usize) -> Option<usize> {
        if !self.is_supported() || !k.is_multiple_of(self.block_len()) {
            return None;
        }
        (k / self.block_len()).checked_mul(self.block_bytes())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An error of [`dequantize`]: the bytes are not whole rows of the type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantError(pub String);

impl std::fmt::Display for QuantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QuantError {}

/// Dequantizes `bytes` (whole blocks of `ty`) into `out`, one f32 per element: `out.len()`
/// elements must be exactly what the bytes hold.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    let (len, size) = (ty.block_len(), ty.block_bytes());
    if !ty.is_supported() || !out.len().is_multiple_of(len) || bytes.len() != out.len() / len * size
    {
        return Err(QuantError(format!(
            "{} bytes of {ty} for {} elements",
            bytes.len(),
            out.len()
        )));
    }
    let pairs = bytes.chunks_exact(size).zip(out.chunks_exact_mut(len));
    match ty {
        GgmlType::F32 => {
            pairs.for_each(|(b, o)| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => pairs.for_each(|(b, o)| o[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Bf16 => {
            pairs.for_each(|(b, o)| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::Q4_0 => pairs.for_each(|(b, o)| blocks::dequantize_q4_0(b, o)),
        GgmlType::Q5_0 => pairs.for_each(|(b, o)| blocks::dequantize_q5_0(b, o)),
        GgmlType::Q8_0 => pairs.for_each(|(b, o)| blocks::dequantize_q8_0(b, o)),
        GgmlType::Q4K => pairs.for_each(|(b, o)| blocks::dequantize_q4k(b, o)),
        GgmlType::Q5K => pairs.for_each(|(b, o)| blocks::dequantize_q5k(b, o)),
        GgmlType::Q6K => pairs.for_each(|(b, o)| blocks::dequantize_q6k(b, o)),
        _ => unreachable!("checked by is_supported"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_names_and_geometry_is_ggml_s() {
        let mut named = 0;
        for id in 0..64 {
            if let Some(t) = GgmlType::from_id(id) {
                named += 1;
                assert!(!t.name().is_empty());
            }
        }
        assert_eq!(named, 32);
        // ggml's block sizes (ggml-common.h): 2 + 16, 2 + 4 + 16, 2 + 32, 2·2 + 12 + 128,
        // 2·2 + 12 + 32 + 128, 128 + 64 + 16 + 2.
        let expect = [
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::Q5_0, 32, 22),
            (GgmlType::Q8_0, 32, 34),
            (GgmlType::Q4K, 256, 144),
            (GgmlType::Q5K, 256, 176),
            (GgmlType::Q6K, 256, 210),
        ];
        for (t, len, bytes) in expect {
            assert_eq!((t.block_len(), t.block_bytes()), (len, bytes), "{t}");
            assert_eq!(t.row_bytes(2 * len), Some(2 * bytes));
            assert_eq!(t.row_bytes(len + 1), None);
        }
        assert_eq!(GgmlType::from_id(12).map(GgmlType::name), Some("q4_K"));
        assert!(!GgmlType::Iq4Nl.is_supported() && GgmlType::Iq4Nl.row_bytes(32).is_none());
    }

    #[test]
    fn dequantize_refuses_partial_blocks() {
        let mut out = vec![0f32; 32];
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], &mut out).is_err());
        assert!(dequantize(GgmlType::Q8_0, &[0; 34], &mut out[..31]).is_err());
        assert!(dequantize(GgmlType::Q2K, &[0; 84], &mut vec![0f32; 256]).is_err());
        assert!(dequantize(GgmlType::Q8_0, &[0; 34], &mut out).is_ok());
    }
}
