//! A GGUF file's tensors under the Hugging Face checkpoint names the model code asks for
//! (`model.layers.3.self_attn.q_proj.weight` is `blk.3.attn_q.weight`), as a candle
//! [`SimpleBackend`]: plain and quantized tensors alike come out as dense tensors of the asked
//! dtype (quantized ones dequantized). Linear layers on the CPU read quantized weights in place
//! instead ([`crate::Weights::quantized_from_file`]).

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::{GgufFile, TensorView};

/// Where a Hugging Face tensor lives in a GGUF file: a tensor, or one expert's slice (the
/// outermost index) of a stacked experts tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufName {
    pub name: String,
    pub expert: Option<usize>,
}

/// The GGUF name of a Hugging Face tensor name, or `None` for a name the converter does not
/// write.
pub fn gguf_name(hf: &str) -> Option<GgufName> {
    let plain = |name: String| Some(GgufName { name, expert: None });
    match hf {
        "model.embed_tokens.weight" => return plain("token_embd.weight".into()),
        "model.norm.weight" => return plain("output_norm.weight".into()),
        "lm_head.weight" => return plain("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let blk = |name: &str| plain(format!("blk.{layer}.{name}.{suffix}"));
    if let Some(expert) = module.strip_prefix("mlp.experts.") {
        let (e, proj) = expert.split_once('.')?;
        let kind = proj.strip_suffix("_proj")?;
        if !matches!(kind, "gate" | "up" | "down") {
            return None;
        }
        return Some(GgufName {
            name: format!("blk.{layer}.ffn_{kind}_exps.{suffix}"),
            expert: Some(e.parse().ok()?),
        });
    }
    match module {
        "input_layernorm" => blk("attn_norm"),
        "post_attention_layernorm" => blk("ffn_norm"),
        "self_attn.q_proj" => blk("attn_q"),
        "self_attn.k_proj" => blk("attn_k"),
        "self_attn.v_proj" => blk("attn_v"),
        "self_attn.o_proj" => blk("attn_output"),
        "self_attn.q_norm" => blk("attn_q_norm"),
        "self_attn.k_norm" => blk("attn_k_norm"),
        "mlp.gate_proj" => blk("ffn_gate"),
        "mlp.up_proj" => blk("ffn_up"),
        "mlp.down_proj" => blk("ffn_down"),
        "mlp.gate" => blk("ffn_gate_inp"),
        "mlp.shared_expert.gate_proj" => blk("ffn_gate_shexp"),
        "mlp.shared_expert.up_proj" => blk("ffn_up_shexp"),
        "mlp.shared_expert.down_proj" => blk("ffn_down_shexp"),
        "mlp.shared_expert_gate" => blk("ffn_gate_inp_shexp"),
        _ => None,
    }
}

/// The GGUF tensors behind Hugging Face names.
#[derive(Clone)]
pub struct GgufTensors(pub Arc<GgufFile>);

/// A tensor's bytes and shape in candle order (an expert's slice cut out of its stack).
pub struct HfView<'a> {
    pub view: TensorView<'a>,
    /// Candle order, outermost first.
    pub shape: Vec<usize>,
}

impl GgufTensors {
    /// The tensor behind Hugging Face name `hf`, in place.
    pub fn view(&self, hf: &str) -> candle_core::Result<HfView<'_>> {
        let Some(g) = gguf_name(hf) else {
            candle_core::bail!("no GGUF tensor corresponds to {hf}");
        };
        let view = self.0.tensor(&g.name).map_err(candle_core::Error::wrap)?;
        let mut shape: Vec<usize> = view.dims.iter().rev().copied().collect();
        let Some(e) = g.expert else {
            return Ok(HfView { view, shape });
        };
        let experts = shape.remove(0);
        if e >= experts || shape.is_empty() {
            candle_core::bail!("{}: no expert {e} of {experts}", g.name);
        }
        let per = view.data.len() / experts;
        let view = TensorView {
            data: &view.data[e * per..(e + 1) * per],
            dims: &view.dims[..view.dims.len() - 1],
            ty: view.ty,
        };
        Ok(HfView { view, shape })
    }

    fn load(&self, hf: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let HfView { view, shape } = self.view(hf)?;
        let mut values = vec![0f32; shape.iter().product()];
        ember_kernels::dequantize(view.ty, view.data, &mut values)
            .map_err(|e| candle_core::Error::Msg(format!("{hf}: {e}")))?;
        Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)
    }
}

impl SimpleBackend for GgufTensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        // GGUF stores a (1, n) gate as a vector of n: the same elements in the same order.
        if t.shape() != &s && t.elem_count() == s.elem_count() && t.rank() != s.rank() {
            return t.reshape(s);
        }
        if t.shape() != &s {
            candle_core::bail!(
                "shape mismatch for {name}: expected {s:?}, the GGUF file has {:?}",
                t.shape()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.0.tensors.contains_key(&g.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_names_map_to_llama_cpp_s() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight", None),
            ("lm_head.weight", "output.weight", None),
            ("model.norm.weight", "output_norm.weight", None),
            (
                "model.layers.0.input_layernorm.weight",
                "blk.0.attn_norm.weight",
                None,
            ),
            (
                "model.layers.11.self_attn.q_proj.bias",
                "blk.11.attn_q.bias",
                None,
            ),
            (
                "model.layers.2.self_attn.o_proj.weight",
                "blk.2.attn_output.weight",
                None,
            ),
            (
                "model.layers.2.self_attn.k_norm.weight",
                "blk.2.attn_k_norm.weight",
                None,
            ),
            (
                "model.layers.1.mlp.down_proj.weight",
                "blk.1.ffn_down.weight",
                None,
            ),
            (
                "model.layers.1.mlp.gate.weight",
                "blk.1.ffn_gate_inp.weight",
                None,
            ),
            (
                "model.layers.1.mlp.experts.7.up_proj.weight",
                "blk.1.ffn_up_exps.weight",
                Some(7),
            ),
            (
                "model.layers.0.mlp.shared_expert_gate.weight",
                "blk.0.ffn_gate_inp_shexp.weight",
                None,
            ),
            (
                "model.layers.0.mlp.shared_expert.down_proj.weight",
                "blk.0.ffn_down_shexp.weight",
                None,
            ),
        ];
        for (hf, gguf, expert) in cases {
            assert_eq!(
                gguf_name(hf),
                Some(GgufName {
                    name: gguf.into(),
                    expert
                }),
                "{hf}"
            );
        }
        for hf in [
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.0.mlp.experts.1.fc.weight",
            "model.layers.0.unknown.weight",
            "model.layers.0.mlp.up_proj.scale",
            "something",
        ] {
            assert_eq!(gguf_name(hf), None, "{hf}");
        }
    }
}
