//! The model layer: the config, one folder per architecture family ([`llama`]: forward and
//! hand-written backward together), the kernels ([`kernels`]), what the model adds to candle's
//! backward ([`autograd`]), attention inputs ([`inputs`]), loaders and the HF writer ([`load`](mod@load)),
//! and log-probs of token sequences ([`logprobs`]).

pub mod autograd;
pub mod config;
pub mod inputs;
pub mod kernels;
pub mod llama;
pub mod load;
pub mod logprobs;
pub mod lora;

pub use config::ModelConfig;
pub use inputs::AttentionInputs;
pub use kernels::Kernels;
pub use llama::Transformer;
pub use load::{compact, gguf, hf, load, load_frozen, load_soup, load_tokenizer, mix_into_reference};
pub use logprobs::{group_sequence_logps, sequence_logps, SeqLogps};

use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;
use candle_core::Var;
use std::path::PathBuf;

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

impl LoadedModel {
    /// Make every parameter a trainable `Var`. The returned model reads the variables, so an
    /// optimizer that updates them in place updates the model.
    /// With LoRA adapters, only the adapters (under PEFT's names) and the base parameters of
    /// `modules_to_save` become variables; the base stays frozen.
    pub fn into_trainable(self) -> Result<(LoadedModel, Vec<(String, Var)>)> {
        let mut vars = Vec::new();
        if let Some(adapters) = self.transformer.adapters() {
            let spec = adapters.spec.clone();
            let adapters = adapters.map(|name, t| {
                let v = Var::from_tensor(t)?;
                let out = v.as_tensor().clone();
                vars.push((name.to_string(), v));
                Ok(out)
            })?;
            let transformer = self.transformer.map(|name, t| {
                if !spec.saves(name) {
                    return Ok(t.detach());
                }
                let v = Var::from_tensor(t)?;
                let out = v.as_tensor().clone();
                vars.push((name.to_string(), v));
                Ok(out)
            })?;
            let transformer = transformer.with_adapters(adapters)?;
            return Ok((LoadedModel { transformer, ..self }, vars));
        }
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
        let old_t = &self.transformer;
        let mut transformer = Transformer::build_parts(
            &cfg,
            |name, shape| {
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
            },
            old_t.compact.is_none(),
        )?;
        transformer.kernels = old_t.kernels;
        transformer.compact = old_t.compact.clone();
        transformer.adapters = old_t.adapters.clone();
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
