//! Hugging Face checkpoint layout: `config.json` + `model.safetensors` (or sharded with
//! `model.safetensors.index.json`), tokenizer files, `generation_config.json`. Writes are atomic.

use crate::error::{Error, Result};
use crate::model::{config::ModelConfig, LoadedModel, Transformer};
use crate::tokenizer::TextTokenizer;
use crate::util::{read_to_string, write_atomic};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&read_to_string(path)?).map_err(|e| Error::model(path, format!("invalid JSON: {e}")))
}

/// The safetensors files of a checkpoint directory, single or sharded.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::model(&index, "no `weight_map` object"))?;
        let mut files: Vec<PathBuf> = map.values().filter_map(Value::as_str).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    Err(Error::model(
        dir,
        "no model.safetensors or model.safetensors.index.json (PyTorch .bin checkpoints are not read; re-save with safe_serialization=True)",
    ))
}

/// Load an HF checkpoint directory.
pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    load(dir, dtype, device, false)
}

/// Load an HF checkpoint directory as a frozen model whose decoder layers stay in the file's
/// dtype ([`super::compact::CompactLayers`]).
pub(crate) fn load_dir_frozen(dir: &Path, dtype: DType, device: &Device) -> Result<Option<LoadedModel>> {
    load(dir, dtype, device, true).map(Some)
}

fn load(dir: &Path, dtype: DType, device: &Device, compact: bool) -> Result<LoadedModel> {
    use super::compact::{layer_tensor_names, CompactLayers, Stored};
    let cfg_path = dir.join("config.json");
    let cfg = ModelConfig::from_json(&read_json(&cfg_path)?, &cfg_path)?;
    let files = weight_files(dir)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in &files {
        let loaded = candle_core::safetensors::load(f, device).map_err(|e| Error::model(f, e.to_string()))?;
        tensors.extend(loaded);
    }
    let mut take = |name: &str| {
        tensors
            .remove(name)
            .ok_or_else(|| Error::model(dir, format!("tensor `{name}` is missing from the safetensors files")))
    };
    let mut transformer = Transformer::build_parts(&cfg, |name, _| Ok(take(name)?.to_dtype(dtype)?), !compact)?;
    if compact {
        let mut stored = HashMap::new();
        for i in 0..cfg.num_hidden_layers {
            for name in layer_tensor_names(&cfg, i)? {
                let t = take(&name)?;
                // narrower than the model's dtype: keep as stored (widening is exact)
                let t = if t.dtype().size_in_bytes() < dtype.size_in_bytes() {
                    t
                } else {
                    t.to_dtype(dtype)?
                };
                stored.insert(name, Stored::Dense(t));
            }
        }
        let layers = CompactLayers::new(&cfg, stored, dtype, device)?;
        transformer.compact = Some(std::sync::Arc::new(layers));
    }
    let tokenizer = TextTokenizer::from_dir(dir, cfg.eos_token_id, cfg.pad_token_id)?;
    Ok(LoadedModel {
        transformer,
        tokenizer,
        source: dir.to_path_buf(),
        weight_files: files,
    })
}

/// Save `model` as an HF checkpoint directory that `transformers` loads unchanged. Weights are
/// written in f32 (the training master precision); every file is written atomically.
/// A model with LoRA adapters is saved as a PEFT adapter directory instead (see
/// [`save_adapter_dir`]).
pub fn save_dir(model: &LoadedModel, dir: &Path) -> Result<()> {
    crate::util::create_dir_all(dir)?;
    if model.transformer.adapters().is_some() {
        return save_adapter_dir(model, dir);
    }
    let t = &model.transformer;
    let mut cfg = t.cfg.clone();
    cfg.eos_token_id = Some(model.tokenizer.eos_id);
    cfg.pad_token_id = Some(model.tokenizer.pad_id);
    if let Some(b) = &model.tokenizer.bos_token {
        cfg.bos_token_id = model.tokenizer.inner.token_to_id(b);
    }
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, p) in t.params() {
        tensors.push((name.clone(), p.detach().to_dtype(DType::F32)?));
    }
    let st = model_safetensors_bytes(&tensors)?;
    write_atomic(&dir.join("model.safetensors"), &st)?;
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON value serialises");
    write_atomic(&dir.join("config.json"), &pretty(&cfg.to_json()))?;
    save_tokenizer(model, dir, cfg.bos_token_id)
}

/// A model with LoRA adapters as PEFT saves it (`adapter_config.json`,
/// `adapter_model.safetensors` with the adapters and the modules to save), with the tokenizer
/// files beside them as TRL's trainers save them.
pub fn save_adapter_dir(model: &LoadedModel, dir: &Path) -> Result<()> {
    let t = &model.transformer;
    let adapters = t
        .adapters()
        .ok_or_else(|| Error::msg("save_adapter_dir: the model has no adapters"))?;
    let saved: Vec<(String, Tensor)> = t
        .params()
        .iter()
        .filter(|(n, _)| adapters.spec.saves(n))
        .cloned()
        .collect();
    adapters.save(dir, &saved)?;
    let bos = model
        .tokenizer
        .bos_token
        .as_ref()
        .and_then(|b| model.tokenizer.inner.token_to_id(b));
    save_tokenizer(model, dir, bos)
}

/// `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`.
fn save_tokenizer(model: &LoadedModel, dir: &Path, bos_token_id: Option<u32>) -> Result<()> {
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON value serialises");
    write_atomic(&dir.join("tokenizer.json"), model.tokenizer.json.as_bytes())?;
    write_atomic(
        &dir.join("tokenizer_config.json"),
        &pretty(&model.tokenizer.config_json()),
    )?;
    let mut gen = json!({"eos_token_id": model.tokenizer.eos_id, "pad_token_id": model.tokenizer.pad_id});
    if let Some(b) = bos_token_id {
        gen["bos_token_id"] = json!(b);
    }
    write_atomic(&dir.join("generation_config.json"), &pretty(&gen))?;
    Ok(())
}

/// Serialise tensors to safetensors bytes with `{"format": "pt"}` metadata (what transformers expects).
pub fn model_safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::msg(format!("safetensors: {e}")))
}
