//! The keys of the online pairwise methods (task = "online_dpo" | "nash_md" | "xpo" | "ipo_md"; TRL's
//! `OnlineDPOConfig`, `NashMDConfig` and `XPOConfig` names and defaults), flattened into the
//! run config. Their sampling keys (`temperature`, `max_completion_length`, `top_p`, ...) and
//! `reward_funcs` are GRPO's.
//!
//! `beta`, `alpha` (XPO) and `mixture_coef` (Nash-MD) may be written as lists, as in TRL: the
//! value for epoch e is entry e, the last entry after the list ends. The loader keeps the first
//! entry in the key itself and the list in `<key>_per_epoch`.

use crate::config::TrainConfig;
use crate::error::{Error, Result};

settings! {
    /// Online DPO / IPO, Nash-MD, XPO and IPO-MD (task = "online_dpo" | "nash_md" | "xpo" |
    /// "ipo_md"; TRL's names).
    /// Two completions per prompt are ranked by reward_funcs (or reward_model_path); the
    /// sampling keys are GRPO's (defaults here as TRL's OnlineDPOConfig: temperature 0.9,
    /// max_completion_length (TRL: max_new_tokens) 64, learning_rate 5e-7). loss_type: any
    /// pairwise objective (sigmoid, ipo, ...) for online_dpo, xpo and ipo_md (default ipo).
    /// per_device_train_batch_size counts prompts.
    pub struct OnlineParams {
        /// Subtracted from the reward of a completion that did not end with EOS (none by default).
        pub missing_eos_penalty: Option<f64> = None,
        /// Nash-MD: the second completion is sampled from softmax(mixture_coef·ref_logits +
        /// (1 − mixture_coef)·policy_logits); IPO-MD: both are. A list gives one value per epoch.
        pub mixture_coef: f64 = 0.5,
        /// A reward model prefer trained (task = "reward"), added to reward_funcs.
        pub reward_model_path: Option<String> = None,
        /// A pairwise judge instead of rewards (TRL's `judge`): `cmd:<command line>` reads JSON
        /// lines (`prompt`, `completions`: the two texts, the row's columns) and writes, per pair,
        /// the probability that the first completion is better (1, 0, or anything between).
        pub judge: Option<String> = None,
        /// beta per epoch (written as `beta = [..]`; the last value holds after the list ends).
        pub beta_per_epoch: Option<Vec<f64>> = None,
        /// XPO's alpha per epoch (written as `alpha = [..]`).
        pub alpha_per_epoch: Option<Vec<f64>> = None,
        /// Nash-MD's mixture_coef per epoch (written as `mixture_coef = [..]`).
        pub mixture_coef_per_epoch: Option<Vec<f64>> = None,
    }
}

/// The value of a per-epoch list at `epoch` (0-based), or `one` without a list.
pub fn at_epoch(list: &Option<Vec<f64>>, one: f64, epoch: usize) -> f64 {
    match list {
        Some(v) if !v.is_empty() => v[epoch.min(v.len() - 1)],
        _ => one,
    }
}

/// Move `key = [a, b, ...]` to `key_per_epoch` and keep `a` in `key` (see the module's doc).
pub fn split_per_epoch_list(table: &mut toml::Table, key: &str) -> Result<()> {
    let Some(toml::Value::Array(list)) = table.get(key).cloned() else {
        return Ok(());
    };
    let nums: Vec<f64> = list
        .iter()
        .map(|v| match v {
            toml::Value::Float(f) => Some(*f),
            toml::Value::Integer(i) => Some(*i as f64),
            _ => None,
        })
        .collect::<Option<_>>()
        .filter(|v: &Vec<f64>| !v.is_empty())
        .ok_or_else(|| Error::Config(format!("`{key}`: a list must hold numbers, one per epoch")))?;
    table.insert(key.into(), toml::Value::Float(nums[0]));
    table.insert(
        format!("{key}_per_epoch"),
        toml::Value::Array(nums.into_iter().map(toml::Value::Float).collect()),
    );
    Ok(())
}

impl OnlineParams {
    /// The checks an online pairwise run needs before it loads anything.
    pub fn validate(cfg: &TrainConfig) -> Result<()> {
        let g = &cfg.grpo;
        let o = &cfg.online;
        let bad = |m: String| Err(Error::Config(m));
        let has_rewards = !g.reward_funcs.is_empty() || o.reward_model_path.is_some();
        if !has_rewards && o.judge.is_none() {
            return bad(format!(
                "task = \"{}\" ranks two completions per prompt by a reward: set reward_funcs (accuracy, format, length, cmd:<command line>, a reward model's path), reward_model_path, or a pairwise judge (judge = \"cmd:<command line>\")",
                cfg.task.as_str()
            ));
        }
        if has_rewards && o.judge.is_some() {
            return bad("judge and reward_funcs / reward_model_path both rank the pairs: keep one".into());
        }
        if let Some(j) = &o.judge {
            crate::rewards::judge::Judge::new(j, g.reward_timeout)?;
        }
        if matches!(o.missing_eos_penalty, Some(p) if p < 0.0) {
            return bad("missing_eos_penalty must be ≥ 0 (it is subtracted)".into());
        }
        let coefs = o.mixture_coef_per_epoch.clone().unwrap_or_else(|| vec![o.mixture_coef]);
        if coefs.iter().any(|c| !(0.0..=1.0).contains(c)) {
            return bad("mixture_coef must be in [0, 1]".into());
        }
        if g.max_completion_length == 0 {
            return bad("max_completion_length must be ≥ 1".into());
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) || g.temperature <= 0.0 {
            return bad("online sampling: top_p must be in (0, 1] and temperature > 0".into());
        }
        let betas = o.beta_per_epoch.clone().unwrap_or_else(|| vec![cfg.params.beta]);
        if betas.iter().any(|b| *b <= 0.0) {
            return bad("beta must be > 0".into());
        }
        if cfg.task == crate::config::Task::NashMd && cfg.loss_type.names() != ["sigmoid"] {
            return bad("task = \"nash_md\" has one loss (Nash-MD's); remove loss_type".into());
        }
        if cfg.task != crate::config::Task::NashMd {
            let objective = cfg.objective()?;
            if objective.shape() != crate::data::Shape::Pairwise {
                return bad(format!(
                    "task = \"{}\" trains on ranked pairs: loss_type must be a pairwise objective (sigmoid, ipo, ...), not `{}`",
                    cfg.task.as_str(),
                    objective.name()
                ));
            }
        }
        Ok(())
    }
}
