//! GRPO (DeepSeekMath, arXiv:2402.03300) with TRL's `GRPOTrainer` semantics: each step samples
//! `num_generations` completions of every prompt of its batch ([`crate::sample`]: the prompt is
//! computed once for its group), scores them with the reward functions, turns the rewards into
//! group-relative advantages, and trains on the clipped surrogate with TRL's loss
//! normalisations (`dapo`, `grpo`, `bnpo`, `dr_grpo`) and, with `beta` > 0, the k3 estimate of
//! the KL to a frozen reference.
//!
//! This first version generates once per optimizer step and trains on the samples once
//! (TRL's defaults `steps_per_generation` = gradient accumulation, `num_iterations` = 1), so the
//! importance ratio is 1 in value and the clipping never binds. Log-probs are those of the
//! sampling distribution, `log softmax(logits / temperature)`, as TRL computes them.

use super::grpo_loss::{advantages, grpo_loss, rloo_advantages, rloo_loss, LossSpec};
use super::rollout;
use super::{Algorithm, MicroBatch, StepCtx};
use crate::batch::{Layout, ScoredGroup};
use crate::config::grpo::{GrpoLoss, GrpoParams, ImportanceSamplingLevel, ScaleRewards};
use crate::config::TrainConfig;
use crate::data::prompts::Prompt;
use crate::data::TokenizedExample;
use crate::error::{Error, Result};
use crate::model::logprobs::group_sequence_logps_at;
use crate::model::LoadedModel;
use crate::rewards::Reward;
use crate::sample::{sample, SamplingParams};
use candle_core::{DType, Tensor};
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

/// One prompt's completions in the current step.
struct Group {
    prompt: Vec<u32>,
    completions: Vec<Vec<u32>>,
    advantages: Vec<f64>,
    /// The reference's per-token log-probs of each completion (with `beta` > 0).
    reference: Option<Vec<f64>>,
}

/// Which method: GRPO, or RLOO with its options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    Grpo,
    /// TRL's RLOO: leave-one-out baseline, the k1 KL folded into the reward, a sequence-level
    /// ratio, optional standardisation and reward clipping.
    Rloo {
        normalize_advantages: bool,
        reward_clip_range: Option<(f64, f64)>,
    },
}

pub struct Grpo {
    method: Method,
    num_generations: usize,
    loss: GrpoLoss,
    level: ImportanceSamplingLevel,
    epsilon_low: f64,
    epsilon_high: f64,
    delta: Option<f64>,
    sapo_temperatures: (f64, f64),
    beta: f64,
    scale: ScaleRewards,
    max_completion_length: usize,
    sampling: SamplingParams,
    rewards: Vec<Box<dyn Reward>>,
    reward_weights: Option<Vec<f64>>,
    reference: Option<rollout::OnlineReference>,
    seed: u64,
    /// The current step's rollout: each micro-batch's groups, in the order the micro-batches
    /// come (a prompt may appear twice in a step, across an epoch's end).
    rollout: VecDeque<Vec<Group>>,
    /// Completion tokens of the whole step (DAPO's normaliser).
    step_tokens: usize,
    step_metrics: Vec<(String, f64)>,
}

impl Grpo {
    pub fn new(cfg: &TrainConfig, policy: &LoadedModel, resume: Option<&Path>) -> Result<Grpo> {
        let g = &cfg.grpo;
        let (rewards, reward_weights) = super::rollout::rewards(cfg)?;
        let beta = cfg.params.beta;
        let reference = match beta != 0.0 {
            true => Some(rollout::OnlineReference::new(cfg, policy, resume)?),
            false => None,
        };
        let method = match cfg.task {
            crate::config::Task::Rloo => Method::Rloo {
                normalize_advantages: g.normalize_advantages,
                reward_clip_range: g.reward_clip_range.as_ref().map(|r| (r[0], r[1])),
            },
            _ => Method::Grpo,
        };
        Ok(Grpo {
            method,
            num_generations: g.num_generations,
            loss: GrpoParams::loss(cfg)?,
            level: g.importance_sampling_level,
            epsilon_low: g.epsilon,
            epsilon_high: g.epsilon_high.unwrap_or(g.epsilon),
            delta: g.delta,
            sapo_temperatures: (g.sapo_temperature_pos, g.sapo_temperature_neg),
            beta,
            scale: g.scale_rewards,
            max_completion_length: g.max_completion_length,
            sampling: super::rollout::sampling(cfg, policy.tokenizer.eos_id),
            rewards,
            reward_weights,
            reference,
            seed: cfg.seed,
            rollout: VecDeque::new(),
            step_tokens: 0,
            step_metrics: Vec::new(),
        })
    }
}

pub use super::rollout::COMPLETIONS_LOG;

impl Algorithm for Grpo {
    fn step_logs(&self) -> &[&'static str] {
        &[COMPLETIONS_LOG]
    }

    fn units_per_micro_batch(&self, per_device_train_batch_size: usize) -> usize {
        (per_device_train_batch_size / self.num_generations).max(1)
    }

    /// Sample the step's completions, score them, and compute their advantages.
    fn begin_step(&mut self, ctx: &StepCtx, batches: &[Vec<usize>]) -> Result<()> {
        let g = self.num_generations;
        let order: Vec<usize> = batches.concat();
        let prompts: Vec<Vec<u32>> = order.iter().map(|&i| ctx.data.prompts[i].ids.clone()).collect();
        // a seed per step: a resumed run draws the same completions
        let seed = rollout::step_seed(self.seed, ctx.step);
        let comps = sample(
            &ctx.policy.transformer,
            &prompts,
            g,
            &self.sampling,
            seed,
            &|_| false,
            &mut |_| {},
        )?;
        let texts: Vec<String> = comps
            .iter()
            .map(|c| ctx.policy.tokenizer.decode(&c.ids, true))
            .collect::<Result<_>>()?;
        // the reference's per-token log-probs of each completion (with beta ≠ 0), prompt by prompt
        let ref_logps: Option<Vec<Vec<f64>>> = match &self.reference {
            Some(r) => {
                let mut out = Vec::with_capacity(comps.len());
                for (k, cs) in comps.chunks(g).enumerate() {
                    let responses: Vec<Vec<u32>> = cs.iter().map(|c| c.ids.clone()).collect();
                    let grp = [ScoredGroup {
                        prompt: &prompts[k],
                        responses: &responses,
                    }];
                    let lp = group_sequence_logps_at(&r.model, &grp, Layout::PACKED, false, self.sampling.temperature)?;
                    let v: Vec<f64> = lp.token_logps.detach().to_dtype(DType::F64)?.to_vec1()?;
                    out.extend(lp.offsets.windows(2).map(|w| v[w[0]..w[1]].to_vec()));
                }
                Some(out)
            }
            None => None,
        };
        let row_of: Vec<&Prompt> = comps.iter().map(|c| &ctx.data.prompts[order[c.prompt_index]]).collect();
        let (per, totals) = rollout::score(
            &mut self.rewards,
            self.reward_weights.as_deref(),
            &row_of,
            &comps,
            &texts,
        )?;
        let mut totals = totals;
        let mut kl_metric = None;
        if let Method::Rloo { reward_clip_range, .. } = self.method {
            if let Some((lo, hi)) = reward_clip_range {
                for t in totals.iter_mut().filter(|t| !t.is_nan()) {
                    *t = t.clamp(lo, hi);
                }
            }
            // the k1 KL of each completion (sampling minus reference log-probs), summed over its
            // tokens, as a reward penalty
            if let Some(refs) = &ref_logps {
                let (mut sum, mut count) = (0.0, 0usize);
                for ((t, c), r) in totals.iter_mut().zip(&comps).zip(refs) {
                    let kl: f64 = c.logprobs.iter().zip(r).map(|(&o, &r)| o as f64 - r).sum();
                    sum += kl;
                    count += r.len();
                    *t -= self.beta * kl;
                }
                kl_metric = Some(sum / count.max(1) as f64);
            }
        }
        let (adv, stds) = match self.method {
            Method::Grpo => advantages(&totals, g, self.scale),
            Method::Rloo {
                normalize_advantages, ..
            } => (
                rloo_advantages(&totals, g, normalize_advantages),
                advantages(&totals, g, self.scale).1,
            ),
        };
        if rollout::is_logging_step(ctx.cfg, ctx.step, ctx.total_steps) {
            // the step's completions, as TRL logs them
            let step = ctx.step + 1;
            rollout::log_completions(
                ctx.cfg,
                comps.iter().enumerate().map(|(i, c)| {
                    serde_json::json!({
                        "step": step,
                        "prompt": row_of[i].text,
                        "completion": texts[i],
                        "reward": if totals[i].is_nan() { None } else { Some(totals[i]) },
                        "rewards": rollout::scores_by_name(&self.rewards, &per, i),
                        "advantage": adv[i],
                        "completion_tokens": c.ids.len(),
                    })
                }),
            )?;
        }
        let mut m: Vec<(String, f64)> = Vec::new();
        let (mean, std) = rollout::nan_stats(&totals);
        if let Some(kl) = kl_metric {
            m.push(("kl".into(), kl));
        }
        m.push(("reward".into(), mean));
        m.push(("reward_std".into(), std));
        m.push((
            "frac_reward_zero_std".into(),
            stds.iter().filter(|&&s| s == 0.0).count() as f64 / stds.len().max(1) as f64,
        ));
        m.extend(rollout::reward_metrics(&self.rewards, &per));
        m.extend(rollout::length_metrics(&comps.iter().collect::<Vec<_>>()));
        self.step_tokens = comps.iter().map(|c| c.ids.len()).sum();
        self.step_metrics = m;
        self.rollout.clear();
        let mut by_prompt: Vec<Vec<crate::sample::Completion>> = vec![Vec::new(); order.len()];
        for c in comps {
            by_prompt[c.prompt_index].push(c);
        }
        let mut groups = Vec::with_capacity(order.len());
        for (k, cs) in by_prompt.into_iter().enumerate() {
            let completions: Vec<Vec<u32>> = cs.iter().map(|c| c.ids.clone()).collect();
            // GRPO's KL is in its loss; RLOO's is already in the reward
            let reference = match (&ref_logps, self.method) {
                (Some(refs), Method::Grpo) => Some(refs[k * g..(k + 1) * g].concat()),
                _ => None,
            };
            groups.push(Group {
                prompt: prompts[k].clone(),
                completions,
                advantages: adv[k * g..(k + 1) * g].to_vec(),
                reference,
            });
        }
        let mut groups = groups.into_iter();
        for b in batches {
            self.rollout.push_back(groups.by_ref().take(b.len()).collect());
        }
        Ok(())
    }

    fn micro_batch(&mut self, ctx: &StepCtx, indices: &[usize]) -> Result<MicroBatch> {
        let rollout = self
            .rollout
            .pop_front()
            .filter(|r| r.len() == indices.len())
            .ok_or_else(|| Error::msg("GRPO: a micro-batch without its rollout"))?;
        let groups: Vec<ScoredGroup> = rollout
            .iter()
            .map(|r| ScoredGroup {
                prompt: &r.prompt,
                responses: &r.completions,
            })
            .collect();
        let lp = group_sequence_logps_at(
            &ctx.policy.transformer,
            &groups,
            Layout::PACKED,
            false,
            self.sampling.temperature,
        )?;
        let advantages: Vec<f64> = rollout.iter().flat_map(|r| r.advantages.iter().copied()).collect();
        let reference = match (&self.reference, self.method) {
            (Some(_), Method::Grpo) => {
                let v: Vec<f64> = rollout
                    .iter()
                    .flat_map(|r| r.reference.clone().unwrap_or_default())
                    .collect();
                Some(Tensor::new(v, lp.token_logps.device())?.to_dtype(lp.token_logps.dtype())?)
            }
            _ => None,
        };
        let spec = LossSpec {
            loss: self.loss,
            level: self.level,
            epsilon_low: self.epsilon_low,
            epsilon_high: self.epsilon_high,
            delta: self.delta,
            sapo_temperature_pos: self.sapo_temperatures.0,
            sapo_temperature_neg: self.sapo_temperatures.1,
            beta: self.beta,
            max_completion_length: self.max_completion_length,
            accumulation: ctx.accumulation,
            step_tokens: self.step_tokens,
        };
        // one update per generation: the sampling policy is the policy itself
        let old = lp.token_logps.detach();
        let (loss, mut metrics) = match self.method {
            Method::Grpo => grpo_loss(
                &lp.token_logps,
                &old,
                &lp.offsets,
                &advantages,
                reference.as_ref(),
                &spec,
            )?,
            Method::Rloo { .. } => rloo_loss(
                &lp.token_logps,
                &old,
                &lp.offsets,
                &advantages,
                self.epsilon_low,
                self.epsilon_high,
            )?,
        };
        metrics.extend(self.step_metrics.iter().cloned());
        let tokens = groups
            .iter()
            .map(|g| g.responses.iter().map(|r| g.prompt.len() + r.len()).sum::<usize>())
            .sum();
        let positions = groups
            .iter()
            .map(|g| g.prompt.len() + g.responses.iter().map(Vec::len).sum::<usize>())
            .sum();
        Ok(MicroBatch {
            loss,
            metrics,
            counts: Vec::new(),
            tokens,
            positions,
        })
    }

    fn end_step(&mut self, ctx: &StepCtx, _metrics: &BTreeMap<String, f64>, _lr: f64) -> Result<()> {
        match &mut self.reference {
            Some(r) => r.end_step(ctx.step, &ctx.policy.transformer),
            None => Ok(()),
        }
    }

    fn save_checkpoint(&self, dir: &Path, policy: &LoadedModel) -> Result<()> {
        match &self.reference {
            Some(r) => r.save_checkpoint(dir, policy),
            None => Ok(()),
        }
    }

    fn evaluate(
        &self,
        _policy: &LoadedModel,
        _eval: &[TokenizedExample],
        _batch_size: usize,
    ) -> Result<Vec<(String, f64)>> {
        Ok(Vec::new())
    }
}
