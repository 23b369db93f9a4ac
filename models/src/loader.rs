//! Finding and opening a checkpoint: a local directory in Hugging Face layout, or a Hub model
//! id resolved through `hf-hub` (downloaded with a progress bar, or read from the local cache
//! when offline). Weights are memory-mapped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{parse_token_ids, ModelConfig};
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufTensors};
use crate::qwen::QwenModel;
use ember_kernels::GgmlType;

use crate::weights::{InSitu, QuantizedMatrix, Weights};

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

/// The files of one checkpoint, wherever they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// Where the files live (a directory, or a Hub snapshot directory).
    pub root: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
}

/// How to reach the Hub; [`HubOptions::from_env`] reads the standard variables.
#[derive(Debug, Clone)]
pub struct HubOptions {
    pub cache_dir: PathBuf,
    pub endpoint: String,
    pub offline: bool,
    pub token: Option<String>,
    pub progress: bool,
    /// Connect and read timeout for Hub requests, so an unreachable Hub fails instead of hanging.
    pub timeout: Duration,
}

impl HubOptions {
    /// HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub; HF_ENDPOINT; HF_TOKEN
    /// (else the token file of HF_HOME); HF_HUB_OFFLINE.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let home = var("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            home.join(".cache").join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(hf_home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        Self {
            cache_dir,
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".to_string()),
            offline,
            token,
            progress: true,
            timeout: Duration::from_secs(20),
        }
    }
}

/// Resolves `model` as a local directory, else as a Hub id (`org/name`), with the environment's
/// Hub settings.
pub fn resolve(model: &str, revision: Option<&str>) -> Result<ModelFiles> {
    resolve_with(model, revision, &HubOptions::from_env())
}

pub fn resolve_with(model: &str, revision: Option<&str>, hub: &HubOptions) -> Result<ModelFiles> {
    let path = Path::new(model);
    if path.is_dir() {
        return local_files(path);
    }
    if !is_hub_id(model) {
        return Err(ModelError::MissingFile {
            path: path.to_path_buf(),
            reason: "not a directory, nor a Hub model id of the form org/name".into(),
        });
    }
    let revision = revision.unwrap_or("main");
    if hub.offline {
        cached_files(model, revision, hub)
    } else {
        download_files(model, revision, hub)
    }
}

fn is_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The file set of a checkpoint, given a way to test for a file and to fetch it.
fn collect_files(
    root: PathBuf,
    has: impl Fn(&str) -> bool,
    mut fetch: impl FnMut(&str) -> Result<PathBuf>,
) -> Result<ModelFiles> {
    let config = fetch("config.json")?;
    let weights = if has(INDEX) {
        let index = fetch(INDEX)?;
        shard_names(&index)?
            .iter()
            .map(|name| fetch(name))
            .collect::<Result<Vec<_>>>()?
    } else if has(SINGLE) {
        vec![fetch(SINGLE)?]
    } else {
        return Err(ModelError::MissingFile {
            path: root.join(SINGLE),
            reason: format!("no {SINGLE} nor {INDEX}"),
        });
    };
    let tokenizer = fetch("tokenizer.json")?;
    let mut optional = |name: &str| {
        if has(name) {
            fetch(name).map(Some)
        } else {
            Ok(None)
        }
    };
    Ok(ModelFiles {
        tokenizer_config: optional("tokenizer_config.json")?,
        generation_config: optional("generation_config.json")?,
        root,
        config,
        weights,
        tokenizer,
    })
}

fn local_files(dir: &Path) -> Result<ModelFiles> {
    collect_files(
        dir.to_path_buf(),
        |name| dir.join(name).is_file(),
        |name| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(ModelError::MissingFile {
                    path,
                    reason: "not found in the model directory".into(),
                })
            }
        },
    )
}

/// Shard file names from `model.safetensors.index.json`, in order, each once.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let parsed: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let names: BTreeSet<String> = parsed.weight_map.into_values().collect();
    for name in &names {
        if name.contains('/') || name.contains("..") {
            return Err(ModelError::Config(format!(
                "shard name {name:?} in {} leaves the model directory",
                index.display()
            )));
        }
    }
    Ok(names.into_iter().collect())
}

fn hub_repo(model: &str, revision: &str) -> Repo {
    Repo::with_revision(model.to_string(), RepoType::Model, revision.to_string())
}

/// Offline: everything must already be in the Hub cache.
fn cached_files(model: &str, revision: &str, hub: &HubOptions) -> Result<ModelFiles> {
    let cache = Cache::new(hub.cache_dir.clone()).repo(hub_repo(model, revision));
    let config = cache.get("config.json").ok_or_else(|| {
        ModelError::Hub(format!(
            "HF_HUB_OFFLINE is set and {model}@{revision} is not in the cache at {}",
            hub.cache_dir.display()
        ))
    })?;
    let root = config.parent().map(Path::to_path_buf).unwrap_or_default();
    collect_files(
        root,
        |name| cache.get(name).is_some(),
        |name| {
            cache.get(name).ok_or_else(|| {
                ModelError::Hub(format!(
                    "HF_HUB_OFFLINE is set and {name} of {model}@{revision} is not in the cache at {}",
                    hub.cache_dir.display()
                ))
            })
        },
    )
}

/// Online: list the repository (with a timeout, so an unreachable Hub is a clear error), then
/// fetch what is missing from the cache.
fn download_files(model: &str, revision: &str, hub: &HubOptions) -> Result<ModelFiles> {
    let siblings = list_repo(model, revision, hub)?;
    let api = hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(hub.cache_dir.clone()))
        .with_endpoint(hub.endpoint.clone())
        .with_token(hub.token.clone())
        .with_progress(hub.progress)
        .build()
        .map_err(|e| ModelError::Hub(e.to_string()))?;
    let repo = api.repo(hub_repo(model, revision));
    let mut root = None;
    collect_files(
        hub.cache_dir.clone(),
        |name| siblings.contains(name),
        |name| {
            let path = repo
                .get(name)
                .map_err(|e| ModelError::Hub(format!("downloading {name} of {model}: {e}")))?;
            root.get_or_insert_with(|| path.parent().map(Path::to_path_buf));
            Ok(path)
        },
    )
    .map(|mut files| {
        if let Some(Some(dir)) = root {
            files.root = dir;
        }
        files
    })
}

fn list_repo(model: &str, revision: &str, hub: &HubOptions) -> Result<BTreeSet<String>> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(hub.timeout)
        .timeout_read(hub.timeout)
        .try_proxy_from_env(true)
        .build();
    let url = format!(
        "{}/api/models/{model}/revision/{revision}",
        hub.endpoint.trim_end_matches('/')
    );
    let mut request = agent.get(&url);
    if let Some(token) = &hub.token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    let response = request.call().map_err(|e| match e {
        ureq::Error::Status(401 | 403, _) => ModelError::Hub(format!(
            "{model} needs authorization: set HF_TOKEN to a token with access to it"
        )),
        ureq::Error::Status(404, _) => ModelError::Hub(format!(
            "{model}@{revision} was not found on {}",
            hub.endpoint
        )),
        ureq::Error::Status(code, _) => ModelError::Hub(format!("{url} answered HTTP {code}")),
        ureq::Error::Transport(t) => ModelError::Hub(format!(
            "cannot reach {} ({t}); set HF_HUB_OFFLINE=1 to use only the local cache at {}",
            hub.endpoint,
            hub.cache_dir.display()
        )),
    })?;
    let info: Value = response
        .into_json()
        .map_err(|e| ModelError::Hub(format!("bad answer from {url}: {e}")))?;
    Ok(info
        .get("siblings")
        .and_then(Value::as_array)
        .map(|s| {
            s.iter()
                .filter_map(|f| f.get("rfilename").and_then(Value::as_str).map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

/// End-of-sequence ids: generation_config.json's `eos_token_id` (one id or a list), else
/// config.json's.
pub fn eos_token_ids(files: &ModelFiles, cfg: &ModelConfig) -> Result<Vec<u32>> {
    if let Some(path) = &files.generation_config {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.clone(),
            source,
        })?;
        let ids = parse_token_ids(value.get("eos_token_id"));
        if !ids.is_empty() {
            return Ok(ids);
        }
    }
    Ok(cfg.eos_token_ids.clone())
}

/// Parses the config and memory-maps the weights into a model of `dtype` on `device`.
pub fn load_model(files: &ModelFiles, dtype: DType, device: &Device) -> Result<QwenModel> {
    Ok(load_model_quantized(files, dtype, device, None)?.0)
}

/// [`load_model`], with the matrices quantized to `quantization` at load where it is given (on
/// the CPU; see [`crate::weights::MatrixRole`] for which type each gets): the model and what
/// was quantized.
pub fn load_model_quantized(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
    quantization: Option<GgmlType>,
) -> Result<(QwenModel, Vec<QuantizedMatrix>)> {
    if let Some(ty) = quantization {
        if !device.is_cpu() {
            return Err(ModelError::Unsupported(format!(
                "--quantization {ty} runs on the CPU only (quantized kernels are CPU kernels)"
            )));
        }
        if !ty.is_quantized() {
            return Err(ModelError::Unsupported(format!("quantization to {ty}")));
        }
    }
    let cfg = ModelConfig::from_file(&files.config)?;
    // SAFETY: the safetensors files are mapped read-only; like every mmap-based loader we rely on
    // nobody truncating or rewriting them while the process runs.
    let tensors = Arc::new(unsafe { MmapedSafetensors::multi(&files.weights)? });
    let vb = VarBuilder::from_backend(
        Box::new(HugePageCopies(tensors.clone())),
        dtype,
        device.clone(),
    );
    // Weights repacked for the CPU matmul are packed from the mapping itself (crate::weights).
    let mut weights = Weights::mapped(vb, tensors);
    let in_situ = quantization.map(InSitu::new);
    if let Some(q) = &in_situ {
        weights = weights.with_in_situ(q.clone());
    }
    let model = QwenModel::load(&cfg, weights)?;
    Ok((model, in_situ.map(|q| q.report()).unwrap_or_default()))
}

/// Builds the model a GGUF file holds (its metadata gives the config) as a model of `dtype` on
/// `device`.
pub fn load_gguf_model(gguf: &Arc<GgufFile>, dtype: DType, device: &Device) -> Result<QwenModel> {
    let cfg = gguf.model_config()?;
    let tensors = GgufTensors(gguf.clone());
    let vb = VarBuilder::from_backend(Box::new(tensors.clone()), dtype, device.clone());
    Ok(QwenModel::load(&cfg, Weights::gguf(vb, tensors))?)
}

/// Mapped safetensors whose CPU tensors are copied (one memcpy) into buffers advised for huge
/// pages ([`ember_kernels::Zeroed`]), instead of candle's copy into fresh 4 KB pages: faulting
/// in a 0.5B model's weights 4 KB at a time was most of `ember serve`'s start-up. Everything
/// else (other devices, dtypes, big-endian hosts) loads as candle loads it.
struct HugePageCopies(Arc<MmapedSafetensors>);

impl HugePageCopies {
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let view = self.0.get(name)?;
        let shape = view.shape().to_vec();
        let bytes = view.data();
        macro_rules! copy {
            ($t:ty) => {{
                let mut v = <$t as ember_kernels::Zeroed>::zeroed_vec(
                    bytes.len() / std::mem::size_of::<$t>(),
                );
                if std::mem::size_of_val(v.as_slice()) != bytes.len() {
                    candle_core::bail!("{name}: {} bytes for {:?}", bytes.len(), view.dtype());
                }
                // SAFETY: `v` owns exactly bytes.len() writable bytes (checked above) and does
                // not overlap the mapped file; every bit pattern is a valid f32/bf16/f16, and
                // the file's little-endian layout is the host's (cfg below).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        v.as_mut_ptr() as *mut u8,
                        bytes.len(),
                    )
                };
                Tensor::from_vec(v, shape, dev)?
            }};
        }
        let tensor = match view.dtype() {
            _ if !dev.is_cpu() || cfg!(target_endian = "big") => self.0.load(name, dev)?,
            safetensors::Dtype::F32 => copy!(f32),
            safetensors::Dtype::BF16 => copy!(half::bf16),
            safetensors::Dtype::F16 => copy!(half::f16),
            _ => self.0.load(name, dev)?,
        };
        tensor.to_dtype(dtype)
    }
}

impl SimpleBackend for HugePageCopies {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dtype, dev)?;
        if tensor.shape() != &s {
            candle_core::bail!(
                "shape mismatch for {name}: expected {s:?}, got {:?}",
                tensor.shape()
            );
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.get(name).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised() {
        assert!(is_hub_id("Qwen/Qwen3-0.6B"));
        assert!(is_hub_id("Qwen/Qwen2.5-0.5B-Instruct"));
        assert!(!is_hub_id("Qwen3-0.6B"));
        assert!(!is_hub_id("./models/x"));
        assert!(!is_hub_id("/abs/path"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("../x"));
    }
}
