//! Where models come from, in one place: an HF directory (`config.json` + safetensors,
//! single or sharded) or a GGUF file, chosen by what the path is; a frozen model kept in its
//! stored precision ([`compact`]); a weight-space soup of several checkpoints. The formats'
//! own readers (and the HF writer) are [`hf`] and [`gguf`].

pub mod compact;
pub mod gguf;
pub mod hf;

use crate::error::{Error, Result};
use crate::model::{LoadedModel, ModelConfig, Transformer};
use crate::tokenizer::TextTokenizer;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// Load a model from an HF directory (`config.json` + safetensors) or a `.gguf` file,
/// with parameters in `dtype` on `device`.
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
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

/// Only the tokenizer of a model directory or `.gguf` file (no weights are read).
pub fn load_tokenizer(path: &Path) -> Result<TextTokenizer> {
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
