//! Where models come from, in one place: an HF directory (`config.json` + safetensors,
//! single or sharded) or a GGUF file, chosen by what the path is; a frozen model kept in its
//! stored precision ([`compact`]); a weight-space soup of several checkpoints. The formats'
//! own readers (and the HF writer) are [`hf`] and [`gguf`].

pub mod compact;
pub mod gguf;
pub mod hf;

use crate::error::{Error, Result};
use crate::model::lora;
use crate::model::{LoadedModel, ModelConfig, Transformer};
use crate::tokenizer::TextTokenizer;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// Load a model from an HF directory (`config.json` + safetensors) or a `.gguf` file,
/// with parameters in `dtype` on `device`.
/// A PEFT adapter directory loads its base (`base_model_name_or_path`) with the adapter on.
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    if lora::is_adapter_dir(path) {
        let base = load(&adapter_base(path)?, dtype, device)?;
        return attach_adapter(base, path);
    }
    if path.is_dir() {
        hf::load_dir(path, dtype, device)
    } else if path.is_file() {
        gguf::load_gguf(path, dtype, device)
    } else {
        Err(Error::model(
            path,
            "no such model: give an HF model directory (config.json + model.safetensors) or a .gguf file",
        ))
    }
}

/// `model` (an HF directory, a .gguf file or a PEFT adapter directory) with the PEFT adapter
/// in `adapter` on it, if given (`--model BASE --adapter DIR`).
pub fn load_with_adapter(model: &Path, adapter: Option<&Path>, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let m = load(model, dtype, device)?;
    match adapter {
        Some(a) => attach_adapter(m, a),
        None => Ok(m),
    }
}

/// The base model a PEFT adapter directory names (`base_model_name_or_path`): as written, or
/// relative to the adapter's directory.
pub fn adapter_base(dir: &Path) -> Result<PathBuf> {
    let spec = lora::read_spec(dir)?;
    let named = PathBuf::from(&spec.base);
    let candidates = [named.clone(), dir.join(&named)];
    candidates
        .into_iter()
        .find(|p| !spec.base.is_empty() && p.exists())
        .ok_or_else(|| {
            Error::model(
                dir.join(lora::ADAPTER_CONFIG),
                format!(
                    "base_model_name_or_path `{}` is not a model on this machine (prefer does not download from the hub); \
                     give the base explicitly: --model BASE --adapter {}",
                    spec.base,
                    dir.display()
                ),
            )
        })
}

/// `model` with the PEFT adapter saved in `dir` on its layers, and the adapter's modules to save
/// (a reward model's `score`) in place of the base's.
pub fn attach_adapter(model: LoadedModel, dir: &Path) -> Result<LoadedModel> {
    if model.transformer.adapters().is_some() {
        return Err(Error::model(
            dir,
            "the model already has an adapter; merge it first (`prefer merge`)",
        ));
    }
    let t = &model.transformer;
    let (adapters, saved) = lora::load(dir, &t.cfg, t.dtype(), t.device())?;
    let mut model = model;
    if let Some((_, score)) = saved.iter().find(|(n, _)| n == "score.weight") {
        if !model.transformer.cfg.reward_head {
            model = model.with_reward_heads(0, score.dim(0)?)?;
        }
    }
    let saved: std::collections::HashMap<String, candle_core::Tensor> = saved.into_iter().collect();
    let mut missing: Vec<&String> = saved.keys().collect();
    let transformer = model.transformer.map(|name, t| {
        missing.retain(|m| *m != name);
        match saved.get(name) {
            Some(s) if s.dims() == t.dims() => Ok(s.clone()),
            Some(s) => Err(Error::model(
                dir,
                format!(
                    "saved module `{name}` has shape {:?}, the model's {:?}",
                    s.dims(),
                    t.dims()
                ),
            )),
            None => Ok(t.clone()),
        }
    })?;
    if let Some(m) = missing.first() {
        return Err(Error::model(
            dir,
            format!("saved module `{m}` is not a parameter of the base model"),
        ));
    }
    let transformer = transformer.with_adapters(adapters)?;
    let mut weight_files = model.weight_files.clone();
    weight_files.push(dir.join(lora::ADAPTER_WEIGHTS));
    Ok(LoadedModel {
        transformer,
        weight_files,
        ..model
    })
}

/// Only the tokenizer of a model directory or `.gguf` file (no weights are read).
pub fn load_tokenizer(path: &Path) -> Result<TextTokenizer> {
    if lora::is_adapter_dir(path) {
        return load_tokenizer(&adapter_base(path)?);
    }
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let v: serde_json::Value = serde_json::from_str(&crate::util::read_to_string(&cfg_path)?)
            .map_err(|e| Error::model(&cfg_path, format!("invalid JSON: {e}")))?;
        let cfg = ModelConfig::from_json(&v, &cfg_path)?;
        TextTokenizer::from_dir(path, cfg.eos_token_id, cfg.pad_token_id)
    } else if path.is_file() {
        gguf::load_tokenizer(path)
    } else {
        Err(Error::model(
            path,
            "no such model: give an HF model directory or a .gguf file",
        ))
    }
}

/// Load `path` (an HF directory or a `.gguf` file) as a frozen model whose decoder layers stay
/// in the file's precision ([`compact::CompactLayers`]); `None` when that would not be smaller than
/// widening them to `dtype` (e.g. an f32 checkpoint).
pub fn load_frozen(path: &Path, dtype: DType, device: &Device) -> Result<Option<LoadedModel>> {
    if lora::is_adapter_dir(path) {
        return load_frozen(&adapter_base(path)?, dtype, device)?
            .map(|m| attach_adapter(m, path))
            .transpose();
    }
    let m = if path.is_dir() {
        hf::load_dir_frozen(path, dtype, device)?
    } else {
        gguf::load_gguf_frozen(path, dtype, device)?
    };
    Ok(m.filter(|m| {
        m.transformer
            .compact
            .as_ref()
            .is_some_and(|c| c.bytes() < c.widened_bytes())
    }))
}

/// Load one model, or several with the same architecture averaged in weight space (SALSA).
pub fn load_soup(paths: &[PathBuf], dtype: DType, dev: &Device) -> Result<LoadedModel> {
    let first = load(&paths[0], dtype, dev)?;
    if paths.len() == 1 {
        return Ok(first);
    }
    let mut sums: Vec<candle_core::Tensor> = first.transformer.params().iter().map(|(_, t)| t.clone()).collect();
    for p in &paths[1..] {
        let m = load(p, dtype, dev)?;
        if m.transformer.cfg != first.transformer.cfg {
            return Err(Error::Config(format!(
                "ref_model soup: {} has another architecture than {}",
                p.display(),
                paths[0].display()
            )));
        }
        for (s, (_, t)) in sums.iter_mut().zip(m.transformer.params()) {
            *s = (&*s + t)?;
        }
    }
    let k = paths.len() as f64;
    let mut it = sums.into_iter();
    let transformer = first.transformer.map(|_, _| Ok((it.next().expect("same walk") / k)?))?;
    Ok(LoadedModel { transformer, ..first })
}

/// TR-DPO's reference update: `ref ← α·policy + (1−α)·ref`.
pub fn mix_into_reference(reference: &Transformer, policy: &Transformer, alpha: f64) -> Result<Transformer> {
    let mut it = policy.params().iter();
    reference.map(|_, r| {
        let (_, p) = it.next().expect("same architecture");
        Ok(((p.detach() * alpha)? + (r * (1.0 - alpha))?)?)
    })
}
