//! The model layer: config, transformer, loaders (HF safetensors, GGUF), saving, log-probs.

pub mod backward;
pub mod compact;
pub mod config;
pub mod fused;
pub mod gguf;
pub mod hf;
pub mod logprobs;
pub mod matmul;
pub mod transformer;

pub use config::ModelConfig;
pub use logprobs::{group_sequence_logps, sequence_logps, Layout, PaddingSide, ScoredGroup, ScoredSeq, SeqLogps};
pub use transformer::{AttentionInputs, Kernels, Transformer};

use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;
use candle_core::{DType, Device, Var};
use std::path::{Path, PathBuf};

/// A model with its tokenizer, as loaded from disk.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub transformer: Transformer,
    pub tokenizer: TextTokenizer,
    /// Where it came from (a directory or a .gguf file).
    pub source: PathBuf,
    /// Files whose bytes identify the weights (for cache keys).
    pub weight_files: Vec<PathBuf>,
}

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

impl LoadedModel {
    /// Make every parameter a trainable `Var`. The returned model reads the variables, so an
    /// optimizer that updates them in place updates the model.
    pub fn into_trainable(self) -> Result<(LoadedModel, Vec<(String, Var)>)> {
        let mut vars = Vec::new();
        let transformer = self.transformer.map(|name, t| {
            let v = Var::from_tensor(t)?;
            let out = v.as_tensor().clone();
            vars.push((name.to_string(), v));
            Ok(out)
        })?;
        Ok((LoadedModel { transformer, ..self }, vars))
    }

    /// This model with a freshly initialised scalar reward head (`score.weight`, normal with std
    /// 0.02 as transformers initialises it, seeded), and without the language-model head: the
    /// layout of `*ForSequenceClassification`. A model that already has a head is returned as is.
    pub fn with_reward_head(self, seed: u64) -> Result<LoadedModel> {
        self.with_reward_heads(seed, 1)
    }

    /// [`Self::with_reward_head`] with `k` outputs (one reward per preference cluster).
    pub fn with_reward_heads(self, seed: u64, k: usize) -> Result<LoadedModel> {
        self.add_reward_head(seed, k.max(1), false)
    }

    /// [`Self::with_reward_head`] with a Gaussian head: output 0 is the reward's mean, output 1
    /// its log-variance, initialised to 0 (σ = 1 for every response).
    pub fn with_gaussian_reward_head(self, seed: u64) -> Result<LoadedModel> {
        self.add_reward_head(seed, 2, true)
    }

    fn add_reward_head(self, seed: u64, k: usize, variance: bool) -> Result<LoadedModel> {
        let have = &self.transformer.cfg;
        if have.reward_head {
            if have.num_labels != k || have.reward_variance != variance {
                let what = |k: usize, v: bool| match v {
                    true => "a Gaussian head (mean and log-variance)".to_string(),
                    false => format!("{k} reward head(s)"),
                };
                return Err(Error::model(
                    &self.source,
                    format!(
                        "this reward model has {}, but the run asks for {}",
                        what(have.num_labels, have.reward_variance),
                        what(k, variance)
                    ),
                ));
            }
            return Ok(self);
        }
        let mut cfg = self.transformer.cfg.clone();
        cfg.reward_head = true;
        cfg.num_labels = k;
        cfg.reward_variance = variance;
        let old: std::collections::HashMap<String, candle_core::Tensor> =
            self.transformer.params().iter().cloned().collect();
        let mut rng = crate::util::Rng::new(seed);
        let hidden = cfg.hidden_size;
        let mut transformer = Transformer::build(&cfg, |name, shape| {
            if name == "score.weight" {
                let n: usize = shape.iter().product();
                let v: Vec<f64> = (0..n)
                    .map(|i| match variance && i >= hidden {
                        true => 0.0, // log σ² starts at 0
                        false => 0.02 * rng.normal(),
                    })
                    .collect();
                let t = candle_core::Tensor::from_vec(v, shape, self.transformer.device())?;
                return Ok(t.to_dtype(self.transformer.dtype())?);
            }
            old.get(name)
                .cloned()
                .ok_or_else(|| Error::msg(format!("missing `{name}`")))
        })?;
        transformer.kernels = self.transformer.kernels;
        Ok(LoadedModel { transformer, ..self })
    }

    /// An independent frozen copy (the reference model).
    pub fn frozen_copy(&self) -> Result<LoadedModel> {
        let transformer = self.transformer.map(|_, t| Ok(t.detach().copy()?))?;
        Ok(LoadedModel {
            transformer,
            ..self.clone()
        })
    }
}
