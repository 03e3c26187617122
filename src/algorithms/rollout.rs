//! What every online method's rollout shares: its reward functions (from `reward_funcs` and
//! `reward_model_path`), its sampling options, one seed per step (a resumed run draws the same
//! completions), TRL's NaN-aware totals and statistics of the rewards, and the completions log.

use crate::config::TrainConfig;
use crate::data::prompts::Prompt;
use crate::error::{Error, Result};
use crate::model::{LoadedModel, Transformer};
use crate::rewards::{Reward, RewardInput, RewardOptions, Scores};
use crate::sample::{Completion, FinishReason, SamplingParams};
use serde_json::Value;
use std::path::Path;

/// Where the sampled completions of each logging step go, in `output_dir`.
pub const COMPLETIONS_LOG: &str = "completions.jsonl";

/// A run's reward functions and their weights (`None`: 1 each).
pub type Rewards = (Vec<Box<dyn Reward>>, Option<Vec<f64>>);

/// The run's reward functions and their weights (checked against each other).
pub fn rewards(cfg: &TrainConfig) -> Result<Rewards> {
    let g = &cfg.grpo;
    let opts = RewardOptions {
        format_regex: g.reward_format_regex.clone(),
        length_target: g.reward_length_target,
        command_timeout: g.reward_timeout,
    };
    let mut names = g.reward_funcs.clone();
    if let Some(p) = &cfg.online.reward_model_path {
        names.push(format!("model:{p}"));
    }
    let rewards = names
        .iter()
        .map(|r| crate::rewards::by_name(r, &opts))
        .collect::<Result<Vec<_>>>()?;
    if let Some(w) = &g.reward_weights {
        if w.len() != rewards.len() {
            return Err(Error::Config(format!(
                "reward_weights has {} entries for {} reward functions ({})",
                w.len(),
                rewards.len(),
                names.join(", ")
            )));
        }
    }
    Ok((rewards, g.reward_weights.clone()))
}

/// The sampling options of the config (GRPO's keys), stopping at the tokenizer's EOS.
pub fn sampling(cfg: &TrainConfig, eos_id: u32) -> SamplingParams {
    let g = &cfg.grpo;
    SamplingParams {
        temperature: g.temperature,
        top_p: g.top_p,
        top_k: g.top_k,
        min_p: g.min_p,
        repetition_penalty: g.repetition_penalty,
        max_completion_length: g.max_completion_length,
        stop_tokens: vec![eos_id],
        bf16_weights: g.bf16_sampling,
    }
}

/// The sampling seed of optimizer step `step` in a run seeded with `seed`.
pub fn step_seed(seed: u64, step: usize) -> u64 {
    let mut h = crate::util::Fnv64::default();
    h.update(&seed.to_le_bytes());
    h.update(&(step as u64).to_le_bytes());
    h.finish()
}

/// Score completions (`prompts[i]` is completion i's prompt): each reward's scores, and the
/// weighted total per completion as TRL sums them (`nansum`: a reward that skipped a
/// completion adds nothing; NaN when every reward skipped it).
pub fn score(
    rewards: &mut [Box<dyn Reward>],
    weights: Option<&[f64]>,
    prompts: &[&Prompt],
    comps: &[Completion],
    texts: &[String],
) -> Result<(Vec<Scores>, Vec<f64>)> {
    let inputs: Vec<RewardInput> = comps
        .iter()
        .zip(texts)
        .zip(prompts)
        .map(|((c, t), p)| RewardInput {
            prompt: &p.text,
            completion: t,
            completion_tokens: c.ids.len(),
            stopped: c.finish_reason == FinishReason::Stop,
            columns: &p.columns,
        })
        .collect();
    let (per, _) = crate::rewards::score_all(rewards, weights, &inputs)?;
    let totals = (0..comps.len())
        .map(|i| {
            let parts: Vec<f64> = per
                .iter()
                .enumerate()
                .filter_map(|(k, s)| s[i].map(|v| v * weights.map_or(1.0, |w| w[k])))
                .collect();
            match parts.is_empty() {
                true => f64::NAN,
                false => parts.iter().sum(),
            }
        })
        .collect();
    Ok((per, totals))
}

/// TRL's `nanmean` and `nanstd` (Bessel-corrected; NaN with fewer than two values).
pub fn nan_stats(xs: &[f64]) -> (f64, f64) {
    let v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n.max(1.0);
    let std = match v.len() > 1 {
        true => (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt(),
        false => f64::NAN,
    };
    (mean, std)
}

/// Each reward's mean and standard deviation (`rewards/<name>/mean|std`).
pub fn reward_metrics(rewards: &[Box<dyn Reward>], per: &[Scores]) -> Vec<(String, f64)> {
    let mut m = Vec::new();
    for (r, s) in rewards.iter().zip(per) {
        let v: Vec<f64> = s.iter().map(|x| x.unwrap_or(f64::NAN)).collect();
        let (mean, std) = nan_stats(&v);
        m.push((format!("rewards/{}/mean", r.name()), mean));
        m.push((format!("rewards/{}/std", r.name()), std));
    }
    m
}

/// TRL's completion-length metrics (`completions/mean_length`, ...).
pub fn length_metrics(comps: &[&Completion]) -> Vec<(String, f64)> {
    let lens: Vec<f64> = comps.iter().map(|c| c.ids.len() as f64).collect();
    let n = lens.len().max(1) as f64;
    let clipped = comps.iter().filter(|c| c.finish_reason == FinishReason::Length).count() as f64;
    vec![
        ("completions/mean_length".into(), lens.iter().sum::<f64>() / n),
        (
            "completions/min_length".into(),
            lens.iter().cloned().fold(f64::INFINITY, f64::min),
        ),
        (
            "completions/max_length".into(),
            lens.iter().cloned().fold(0.0, f64::max),
        ),
        ("completions/clipped_ratio".into(), clipped / n),
    ]
}

/// Whether step `step` (0-based) is a logging step.
pub fn is_logging_step(cfg: &TrainConfig, step: usize, total_steps: usize) -> bool {
    let s1 = step + 1;
    s1.is_multiple_of(cfg.logging_steps.max(1)) || s1 == total_steps
}

/// Append one JSON line per record to `output_dir/completions.jsonl`.
pub fn log_completions(cfg: &TrainConfig, records: impl IntoIterator<Item = Value>) -> Result<()> {
    let path = cfg.output_dir().join(COMPLETIONS_LOG);
    crate::util::create_dir_all(&cfg.output_dir())?;
    for rec in records {
        crate::util::fs::append_jsonl(&path, &rec)?;
    }
    Ok(())
}

/// Each reward's score of completion `i`, by the reward's name (a JSON object).
pub fn scores_by_name(rewards: &[Box<dyn Reward>], per: &[Scores], i: usize) -> Value {
    Value::Object(
        rewards
            .iter()
            .zip(per)
            .map(|(r, s)| (r.name().to_string(), serde_json::json!(s[i])))
            .collect(),
    )
}

/// An online method's frozen reference: the starting model (or `ref_model`), also when a run
/// resumes, and with `sync_ref_model` moved toward the policy every `ref_model_sync_steps`
/// (TR-DPO's rule, which TRL's GRPO and online trainers share); a checkpoint keeps the moved
/// reference for an exact resume.
pub struct OnlineReference {
    pub model: Transformer,
    sync: Option<super::preference::RefSync>,
}

impl OnlineReference {
    /// `samples`: the method samples from the reference (XPO, Nash-MD), so its layers are kept
    /// widened rather than in their stored precision.
    pub fn new(
        cfg: &TrainConfig,
        policy: &LoadedModel,
        resume: Option<&Path>,
        samples: bool,
    ) -> Result<OnlineReference> {
        if cfg.precompute_ref_log_probs {
            return Err(Error::Config(
                "precompute_ref_log_probs does not apply to online training: every step's completions are new".into(),
            ));
        }
        let model = match super::preference::reference_for_run(cfg, true, policy, &[], &[], resume, samples)? {
            crate::stats::reference::Reference::Model(m) => *m,
            _ => return Err(Error::msg("online training needs a live reference model")),
        };
        Ok(OnlineReference {
            model,
            sync: cfg.sync_ref_model.then_some(super::preference::RefSync {
                every: cfg.ref_model_sync_steps,
                alpha: cfg.ref_model_mixup_alpha,
            }),
        })
    }

    /// After optimizer step `step` (0-based): the sync, when one is due.
    pub fn end_step(&mut self, step: usize, policy: &Transformer) -> Result<()> {
        if let Some(sync) = self.sync {
            if (step + 1).is_multiple_of(sync.every) {
                let mut mixed = crate::model::mix_into_reference(&self.model, policy, sync.alpha)?;
                mixed.kernels = self.model.kernels;
                self.model = mixed;
            }
        }
        Ok(())
    }

    /// With `sync_ref_model`, write the moved reference into the checkpoint `dir`.
    pub fn save_checkpoint(&self, dir: &Path, policy: &LoadedModel) -> Result<()> {
        if self.sync.is_some() {
            let synced = LoadedModel {
                transformer: self.model.clone(),
                ..policy.clone()
            };
            crate::model::hf::save_dir(&synced, &dir.join(crate::stats::reference::SYNCED_REF_DIR))?;
        }
        Ok(())
    }
}
