//! A reward model prefer trained (`task = "reward"`) as a reward function, scored in-process:
//! `reward_funcs = ["path/to/reward_model"]` (or `model:<path>`), or `reward_model_path`.
//!
//! Each completion is scored as the model was trained: its own tokenizer encodes
//! `prompt + completion (+ EOS when the completion ended on a stop token)`, the prompt being
//! the policy's rendered prompt text. A single head gives the reward; a Gaussian head its mean
//! μ; several heads (MaxMin-RLHF's one per annotator cluster) the minimum over heads, the
//! egalitarian utility MaxMin-RLHF's policy step maximises.

use super::{Reward, RewardInput};
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use candle_core::{DType, Device};
use std::path::Path;

/// Sequences per forward pass of the reward model.
const BATCH: usize = 8;

pub struct RewardModel {
    name: String,
    model: LoadedModel,
}

impl RewardModel {
    /// Load the reward model at `path` (an HF directory with `score.weight`, as `prefer train`
    /// with `task = "reward"` writes).
    pub fn load(path: &Path) -> Result<RewardModel> {
        if !path.exists() {
            return Err(Error::Config(format!(
                "reward model {}: no such file or directory (reward_funcs takes accuracy, format, length, cmd:<command line>, or the path of a reward model)",
                path.display()
            )));
        }
        let model = crate::model::load(path, DType::F32, &Device::Cpu)?;
        if !model.transformer.cfg.reward_head {
            return Err(Error::Config(format!(
                "reward model {}: it has no reward head (score.weight); a reward model is what `prefer train` with task = \"reward\" writes",
                path.display()
            )));
        }
        Ok(RewardModel {
            name: format!("model:{}", path.display()),
            model,
        })
    }

    /// Rewards of already-tokenised sequences, as [`RewardModel`] documents.
    pub fn score_ids(&self, seqs: &[Vec<u32>]) -> Result<Vec<f64>> {
        let t = &self.model.transformer;
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(BATCH) {
            let m: Vec<Vec<f64>> = t
                .reward_matrix(chunk, self.model.tokenizer.pad_id)?
                .detach()
                .to_dtype(DType::F64)?
                .to_vec2()?;
            out.extend(m.into_iter().map(|heads| match t.cfg.reward_variance {
                true => heads[0],
                false => heads.into_iter().fold(f64::INFINITY, f64::min),
            }));
        }
        Ok(out)
    }
}

impl Reward for RewardModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<Option<f64>>> {
        let tok = &self.model.tokenizer;
        let max = self.model.transformer.cfg.max_position_embeddings;
        let seqs = batch
            .iter()
            .map(|x| {
                let eos = if x.stopped { tok.eos_token.as_str() } else { "" };
                let mut ids = tok.encode(&format!("{}{}{eos}", x.prompt, x.completion), true)?;
                if max > 0 && ids.len() > max {
                    // keep the end: the reward head reads the last token
                    ids.drain(..ids.len() - max);
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(self.score_ids(&seqs)?.into_iter().map(Some).collect())
    }
}
