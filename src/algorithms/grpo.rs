//! GRPO (DeepSeekMath, arXiv:2402.03300) with TRL's `GRPOTrainer` semantics: each generation
//! samples `num_generations` completions of every prompt of its batch ([`crate::sample`]: the
//! prompt is computed once for its group), scores them with the reward functions, turns the
//! rewards into group-relative advantages, and trains on the clipped surrogate with TRL's loss
//! variants and normalisations ([`super::grpo_loss`]) and, with `beta` > 0, the k3 estimate of
//! the KL to a frozen reference.
//!
//! A generation covers `steps_per_generation` (S) micro-batches of prompts and serves them
//! `num_iterations` (μ) times, as TRL's `_prepare_inputs` does: micro-step t (counted over the
//! run) trains on slice t mod S of generation ⌊t / (S·μ)⌋, whose prompts are the data order's
//! micro-batches S·g … S·g + S − 1. With TRL's default S = gradient accumulation and μ = 1
//! that is one generation per optimizer step, on that step's own micro-batches. A step that
//! trains on a generation made at an earlier step (μ > 1, or S above the accumulation) uses the
//! log-probs at generation time as the ratio's denominator, where the clipping binds; a step
//! that made it trains at ratio 1. With S ≠ the accumulation the generation's completions are
//! shuffled across its slices (seeded), as TRL shuffles the generation batch before splitting
//! it, and `dapo`'s normaliser is the generation's tokens × accumulation / S (TRL's).
//! Log-probs are those of the sampling distribution, `log softmax(logits / temperature)`, and
//! the logged `entropy` is that distribution's, as TRL computes them.
//!
//! `task = "rloo"` is the same rollout with RLOO's advantages (leave-one-out baseline, the k1
//! KL folded into the reward) and its sequence-level loss.

use super::grpo_loss::{
    advantages, grpo_loss_masked, high_entropy_mask, rloo_advantages, rloo_loss, LossSpec, TokenMask,
};
use super::rollout;
use super::{Algorithm, MicroBatch, StepCtx};
use crate::batch::{Layout, ScoredGroup};
use crate::config::grpo::{GrpoParams, MultiObjectiveAggregation, ScaleRewards};
use crate::config::TrainConfig;
use crate::data::prompts::Prompt;
use crate::error::{Error, Result};
use crate::model::logprobs::{group_sequence_logps_at, group_sequence_logps_entropy};
use crate::model::{LoadedModel, Transformer};
use crate::rewards::{Reward, Scores};
use crate::sample::{sample, FinishReason, SamplingParams};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

/// One prompt's completions in the current generation (all of them, or after the shuffle of a
/// generation spread over steps, those that fell in one slice).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Group {
    prompt: Vec<u32>,
    completions: Vec<Vec<u32>>,
    advantages: Vec<f64>,
    /// Which completions the loss counts (`mask_truncated_completions` drops those cut at
    /// `max_completion_length`).
    keep: Vec<bool>,
    /// The reference's per-token log-probs of its completions, one after another (`beta` > 0).
    reference: Option<Vec<f64>>,
    /// The policy's per-token log-probs at generation time (`num_iterations` > 1).
    old: Option<Vec<f64>>,
}

impl Group {
    /// The completions `which` of this group, as a group of their own (their per-token
    /// reference and old log-probs cut out of the group's).
    fn subset(&self, which: &[usize]) -> Group {
        let mut starts = vec![0usize];
        for c in &self.completions {
            starts.push(starts.last().expect("non-empty") + c.len());
        }
        let cut = |v: &Option<Vec<f64>>| {
            v.as_ref().map(|v| {
                which
                    .iter()
                    .flat_map(|&i| v[starts[i]..starts[i + 1]].iter().copied())
                    .collect()
            })
        };
        Group {
            prompt: self.prompt.clone(),
            completions: which.iter().map(|&i| self.completions[i].clone()).collect(),
            advantages: which.iter().map(|&i| self.advantages[i]).collect(),
            keep: which.iter().map(|&i| self.keep[i]).collect(),
            reference: cut(&self.reference),
            old: cut(&self.old),
        }
    }
}

/// A generation: its slices' groups (one slice per micro-batch it serves) and what it logged,
/// kept for the steps that train on it (and in checkpoints taken between them).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Generation {
    /// Its number g: it covers micro-steps g·S·μ … (g+1)·S·μ − 1.
    #[serde(default)]
    number: usize,
    /// The optimizer step that sampled it.
    step: usize,
    batches: Vec<Vec<Group>>,
    /// Completion tokens the loss counts over the whole generation (`dapo`'s normaliser).
    tokens: usize,
    metrics: Vec<(String, f64)>,
}

/// One micro-batch's share of a generation, queued for the step that trains on it.
struct Slice {
    groups: Vec<Group>,
    /// Whether the generation was sampled in this optimizer step (the policy is unchanged
    /// since, so its own log-probs are the old ones: ratio 1).
    fresh: bool,
    /// `dapo`'s normaliser for this slice: the generation's tokens × accumulation / S.
    step_tokens: f64,
    metrics: Vec<(String, f64)>,
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
    /// The loss's options (`accumulation` and `step_tokens` set per micro-batch).
    spec: LossSpec,
    scale: ScaleRewards,
    aggregation: MultiObjectiveAggregation,
    num_iterations: usize,
    /// Micro-batches each generation covers (S).
    steps_per_generation: usize,
    /// Micro-batches per optimizer step.
    accumulation: usize,
    mask_truncated: bool,
    top_entropy_quantile: f64,
    sampling: SamplingParams,
    rewards: Vec<Box<dyn Reward>>,
    reward_weights: Option<Vec<f64>>,
    reference: Option<rollout::OnlineReference>,
    seed: u64,
    generation: Option<Generation>,
    /// The current step's micro-batches, in the order they come (a prompt may appear twice in
    /// a step, across an epoch's end).
    rollout: VecDeque<Slice>,
    /// Prompt and completion tokens of every generation so far (TRL's `num_tokens`).
    num_tokens: f64,
}

/// Where a run keeps the generation that later steps reuse (when generations span steps).
const GENERATION_FILE: &str = "grpo_generation.json";

impl Grpo {
    pub fn new(cfg: &TrainConfig, policy: &LoadedModel, resume: Option<&Path>) -> Result<Grpo> {
        let g = &cfg.grpo;
        let (rewards, reward_weights) = rollout::rewards(cfg)?;
        let beta = cfg.params.beta;
        let reference = match beta != 0.0 {
            true => Some(rollout::OnlineReference::new(cfg, policy, resume, false)?),
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
            spec: LossSpec {
                loss: GrpoParams::loss(cfg)?,
                level: g.importance_sampling_level,
                epsilon_low: g.epsilon,
                epsilon_high: g.epsilon_high.unwrap_or(g.epsilon),
                delta: g.delta,
                sapo_temperature_pos: g.sapo_temperature_pos,
                sapo_temperature_neg: g.sapo_temperature_neg,
                vespo_pos: (g.vespo_k_pos, g.vespo_lambda_pos),
                vespo_neg: (g.vespo_k_neg, g.vespo_lambda_neg),
                beta,
                max_completion_length: g.max_completion_length,
                accumulation: 1,
                step_tokens: 0.0,
            },
            scale: g.scale_rewards,
            aggregation: g.multi_objective_aggregation,
            num_iterations: g.num_iterations.max(1),
            steps_per_generation: GrpoParams::steps_per_generation(cfg)?,
            accumulation: cfg.gradient_accumulation_steps.max(1),
            mask_truncated: g.mask_truncated_completions,
            top_entropy_quantile: g.top_entropy_quantile,
            sampling: rollout::sampling(cfg, policy.tokenizer.eos_id),
            rewards,
            reward_weights,
            reference,
            seed: cfg.seed,
            generation: None,
            rollout: VecDeque::new(),
            num_tokens: 0.0,
        })
    }

    /// Per-token log-probs (f64, no gradient) of each completion of `prompts[k]` under `model` at
    /// the sampling temperature, prompt by prompt.
    fn token_logps(
        &self,
        model: &Transformer,
        prompts: &[Vec<u32>],
        completions: &[Vec<Vec<u32>>],
    ) -> Result<Vec<Vec<f64>>> {
        let mut out = Vec::new();
        for (p, cs) in prompts.iter().zip(completions) {
            let grp = [ScoredGroup {
                prompt: p,
                responses: cs,
            }];
            let lp = group_sequence_logps_at(model, &grp, Layout::PACKED, false, self.sampling.temperature)?;
            out.push(lp.token_logps.detach().to_dtype(DType::F64)?.to_vec1()?);
        }
        Ok(out)
    }

    /// Whether a generation outlives the optimizer step that samples it (μ > 1, or S not a
    /// divisor of the accumulation): then it keeps the log-probs at generation time, and
    /// checkpoints keep it.
    fn spans_steps(&self) -> bool {
        !self
            .accumulation
            .is_multiple_of(self.steps_per_generation * self.num_iterations)
    }

    /// Sample, score and lay out generation `number`, for the data-order micro-batches `batches`.
    fn generate(&mut self, ctx: &StepCtx, batches: &[Vec<usize>], number: usize) -> Result<Generation> {
        let g = self.num_generations;
        let order: Vec<usize> = batches.concat();
        let prompts: Vec<Vec<u32>> = order.iter().map(|&i| ctx.data.prompts[i].ids.clone()).collect();
        // a seed per generation, so a resumed run draws the same completions: the step's
        // seed when the generation begins a step (always, by default), else one of its own
        let first = number * self.steps_per_generation * self.num_iterations;
        let seed = match first.is_multiple_of(self.accumulation) {
            true => rollout::step_seed(self.seed, first / self.accumulation),
            false => rollout::step_seed(self.seed ^ 0x5350_4745_4e45_5241, number),
        };
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
        let by_prompt: Vec<Vec<Vec<u32>>> = comps
            .chunks(g)
            .map(|cs| cs.iter().map(|c| c.ids.clone()).collect())
            .collect();
        // the reference's per-token log-probs (beta ≠ 0) and, when later steps reuse this
        // generation, the policy's own at generation time
        let ref_logps = match &self.reference {
            Some(r) => Some(self.token_logps(&r.model, &prompts, &by_prompt)?),
            None => None,
        };
        let old_logps = match self.spans_steps() {
            true => Some(self.token_logps(&ctx.policy.transformer, &prompts, &by_prompt)?),
            false => None,
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
        let mut m: Vec<(String, f64)> = Vec::new();
        if let Method::Rloo { reward_clip_range, .. } = self.method {
            if let Some((lo, hi)) = reward_clip_range {
                for t in totals.iter_mut().filter(|t| !t.is_nan()) {
                    *t = t.clamp(lo, hi);
                }
            }
            // the k1 KL of each completion (sampling minus reference log-probs), summed over its
            // tokens, as a reward penalty
            if let Some(refs) = &ref_logps {
                let refs: Vec<f64> = refs.concat();
                let (mut sum, mut at) = (0.0, 0usize);
                for (t, c) in totals.iter_mut().zip(&comps) {
                    let r = &refs[at..at + c.ids.len()];
                    at += c.ids.len();
                    let kl: f64 = c.logprobs.iter().zip(r).map(|(&o, &r)| o as f64 - r).sum();
                    sum += kl;
                    *t -= self.spec.beta * kl;
                }
                m.push(("kl".into(), sum / at.max(1) as f64));
            }
        }
        let (adv, stds) = match (self.method, self.aggregation) {
            (Method::Grpo, MultiObjectiveAggregation::SumThenNormalize) => advantages(&totals, g, self.scale),
            (Method::Grpo, MultiObjectiveAggregation::NormalizeThenSum) => {
                normalize_then_sum(&per, self.reward_weights.as_deref(), g)
            }
            (
                Method::Rloo {
                    normalize_advantages, ..
                },
                _,
            ) => (
                rloo_advantages(&totals, g, normalize_advantages),
                advantages(&totals, g, self.scale).1,
            ),
        };
        if rollout::is_logging_step(ctx.cfg, ctx.step, ctx.total_steps) {
            // the generation's completions, as TRL logs them
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
        let (mean, std) = rollout::nan_stats(&totals);
        m.push(("reward".into(), mean));
        m.push(("reward_std".into(), std));
        m.push((
            "frac_reward_zero_std".into(),
            stds.iter().filter(|&&s| s == 0.0).count() as f64 / stds.len().max(1) as f64,
        ));
        m.extend(rollout::reward_metrics(&self.rewards, &per));
        let all: Vec<&crate::sample::Completion> = comps.iter().collect();
        m.extend(rollout::length_metrics(&all));
        // TRL's completions/*_terminated_length: the lengths of those that ended on EOS
        let done: Vec<&crate::sample::Completion> =
            comps.iter().filter(|c| c.finish_reason == FinishReason::Stop).collect();
        let lens: Vec<f64> = done.iter().map(|c| c.ids.len() as f64).collect();
        let (mean_t, min_t, max_t) = match lens.is_empty() {
            true => (0.0, 0.0, 0.0),
            false => (
                lens.iter().sum::<f64>() / lens.len() as f64,
                lens.iter().cloned().fold(f64::INFINITY, f64::min),
                lens.iter().cloned().fold(0.0, f64::max),
            ),
        };
        m.push(("completions/mean_terminated_length".into(), mean_t));
        m.push(("completions/min_terminated_length".into(), min_t));
        m.push(("completions/max_terminated_length".into(), max_t));
        let keep: Vec<bool> = comps
            .iter()
            .map(|c| !self.mask_truncated || c.finish_reason == FinishReason::Stop)
            .collect();
        let tokens = comps
            .iter()
            .zip(&keep)
            .filter(|(_, &k)| k)
            .map(|(c, _)| c.ids.len())
            .sum();
        self.num_tokens += comps
            .iter()
            .map(|c| (prompts[c.prompt_index].len() + c.ids.len()) as f64)
            .sum::<f64>();
        let mut groups = Vec::with_capacity(order.len());
        for (k, cs) in by_prompt.into_iter().enumerate() {
            groups.push(Group {
                prompt: prompts[k].clone(),
                completions: cs,
                advantages: adv[k * g..(k + 1) * g].to_vec(),
                keep: keep[k * g..(k + 1) * g].to_vec(),
                // GRPO's KL is in its loss; RLOO's is already in the reward
                reference: match self.method {
                    Method::Grpo => ref_logps.as_ref().map(|r| r[k].clone()),
                    Method::Rloo { .. } => None,
                },
                old: old_logps.as_ref().map(|o| o[k].clone()),
            });
        }
        let slices: Vec<Vec<Group>> = match self.steps_per_generation == self.accumulation {
            // one slice per micro-batch, each with its prompts' whole groups
            true => {
                let mut groups = groups.into_iter();
                batches
                    .iter()
                    .map(|b| groups.by_ref().take(b.len()).collect())
                    .collect()
            }
            // TRL shuffles the generation's completions before splitting it into slices
            false => {
                let mut items: Vec<(usize, usize)> =
                    (0..groups.len()).flat_map(|k| (0..g).map(move |i| (k, i))).collect();
                crate::util::Rng::new(seed ^ 0x5348_5546_464c_4521).shuffle(&mut items);
                let mut rest = items.as_slice();
                batches
                    .iter()
                    .map(|b| {
                        let (take, left) = rest.split_at((b.len() * g).min(rest.len()));
                        rest = left;
                        // the slice's completions, grouped by prompt in order of appearance
                        let mut by: Vec<(usize, Vec<usize>)> = Vec::new();
                        for &(k, i) in take {
                            match by.iter_mut().find(|(kk, _)| *kk == k) {
                                Some((_, v)) => v.push(i),
                                None => by.push((k, vec![i])),
                            }
                        }
                        by.iter().map(|(k, which)| groups[*k].subset(which)).collect()
                    })
                    .collect()
            }
        };
        Ok(Generation {
            number,
            step: ctx.step,
            batches: slices,
            tokens,
            metrics: m,
        })
    }
}

/// TRL's `normalize_then_sum` (GDPO): each reward standardised within its group (its own
/// nan-aware mean and Bessel std + 1e-4), the weighted sum (`nansum`; NaN when every reward
/// skipped the completion), then standardised over the batch. Returns the advantages (0 for
/// unscorable completions) and, per group, the batch std (for `frac_reward_zero_std`).
pub fn normalize_then_sum(per: &[Scores], weights: Option<&[f64]>, g: usize) -> (Vec<f64>, Vec<f64>) {
    let n = per.first().map_or(0, Vec::len);
    let mut total = vec![0.0; n];
    let mut scored = vec![false; n];
    for (k, s) in per.iter().enumerate() {
        let w = weights.map_or(1.0, |w| w[k]);
        for (start, grp) in (0..n).step_by(g).zip(s.chunks(g)) {
            let v: Vec<f64> = grp.iter().flatten().copied().collect();
            let (mean, std) = rollout::nan_stats(&v);
            let std = if std.is_nan() { 0.0 } else { std };
            for (i, x) in grp.iter().enumerate() {
                if let Some(x) = x {
                    total[start + i] += w * (x - mean) / (std + 1e-4);
                    scored[start + i] = true;
                }
            }
        }
    }
    let total: Vec<f64> = total
        .into_iter()
        .zip(&scored)
        .map(|(t, &s)| if s { t } else { f64::NAN })
        .collect();
    let (mean, std) = rollout::nan_stats(&total);
    let std = if std.is_nan() { 0.0 } else { std };
    let adv = total
        .iter()
        .map(|t| if t.is_nan() { 0.0 } else { (t - mean) / (std + 1e-4) })
        .collect();
    (adv, vec![std; n.div_ceil(g.max(1))])
}

pub use super::rollout::COMPLETIONS_LOG;

impl Algorithm for Grpo {
    fn step_logs(&self) -> &[&'static str] {
        &[COMPLETIONS_LOG]
    }

    fn units_per_micro_batch(&self, per_device_train_batch_size: usize) -> usize {
        (per_device_train_batch_size / self.num_generations).max(1)
    }

    fn steps_per_batch(&self) -> usize {
        self.num_iterations
    }

    /// Queue the step's micro-batches: slice t mod S of generation ⌊t / (S·μ)⌋ for each of its
    /// micro-steps t, sampling (and scoring) each generation when its first micro-step comes.
    fn begin_step(&mut self, ctx: &StepCtx, _batches: &[Vec<usize>]) -> Result<()> {
        let (s, every) = (
            self.steps_per_generation,
            self.steps_per_generation * self.num_iterations,
        );
        self.rollout.clear();
        for a in 0..ctx.accumulation {
            let t = ctx.step * ctx.accumulation + a;
            let number = t / every;
            if self.generation.as_ref().map(|g| g.number) != Some(number) {
                if !t.is_multiple_of(every) {
                    return Err(Error::msg(format!(
                        "GRPO: step {} trains on generation {number}, sampled earlier, which this run does not hold",
                        ctx.step + 1
                    )));
                }
                let window: Vec<Vec<usize>> = (0..s).map(|j| ctx.order.micro_batch(number * s + j)).collect();
                self.generation = Some(self.generate(ctx, &window, number)?);
            }
            let gen = self.generation.as_ref().expect("generated above");
            self.rollout.push_back(Slice {
                groups: gen.batches[t % s].clone(),
                fresh: gen.step == ctx.step,
                step_tokens: gen.tokens as f64 * ctx.accumulation as f64 / s as f64,
                metrics: gen.metrics.clone(),
            });
        }
        Ok(())
    }

    fn micro_batch(&mut self, ctx: &StepCtx, _indices: &[usize]) -> Result<MicroBatch> {
        let slice = self
            .rollout
            .pop_front()
            .ok_or_else(|| Error::msg("GRPO: a micro-batch without its rollout"))?;
        let rollout = &slice.groups;
        let groups: Vec<ScoredGroup> = rollout
            .iter()
            .map(|r| ScoredGroup {
                prompt: &r.prompt,
                responses: &r.completions,
            })
            .collect();
        let lp = group_sequence_logps_entropy(
            &ctx.policy.transformer,
            &groups,
            Layout::PACKED,
            self.sampling.temperature,
        )?;
        let dev = lp.token_logps.device().clone();
        let dt = lp.token_logps.dtype();
        let advantages: Vec<f64> = rollout.iter().flat_map(|r| r.advantages.iter().copied()).collect();
        let keep: Vec<bool> = rollout.iter().flat_map(|r| r.keep.iter().copied()).collect();
        let reference = match (&self.reference, self.method) {
            (Some(_), Method::Grpo) => {
                let v: Vec<f64> = rollout
                    .iter()
                    .flat_map(|r| r.reference.clone().unwrap_or_default())
                    .collect();
                Some(Tensor::new(v, &dev)?.to_dtype(dt)?)
            }
            _ => None,
        };
        // the policy at generation time: itself on a generation's first step
        let old = match rollout.iter().all(|r| r.old.is_some()) && !slice.fresh {
            true => {
                let v: Vec<f64> = rollout.iter().flat_map(|r| r.old.clone().unwrap_or_default()).collect();
                Tensor::new(v, &dev)?.to_dtype(dt)?
            }
            false => lp.token_logps.detach(),
        };
        // the tokens the loss counts, and their entropies
        let counted: Vec<bool> = lp
            .offsets
            .windows(2)
            .zip(&keep)
            .flat_map(|(w, &k)| std::iter::repeat_n(k, w[1] - w[0]))
            .collect();
        let entropies = lp.entropies.clone().unwrap_or_default();
        let n_counted = counted.iter().filter(|&&c| c).count().max(1) as f64;
        let entropy = entropies
            .iter()
            .zip(&counted)
            .filter(|(_, &c)| c)
            .map(|(e, _)| e)
            .sum::<f64>()
            / n_counted;
        let mask = TokenMask {
            keep: self.mask_truncated.then(|| keep.clone()),
            entropy: (self.top_entropy_quantile < 1.0)
                .then(|| high_entropy_mask(&entropies, &counted, self.top_entropy_quantile)),
        };
        let spec = LossSpec {
            accumulation: ctx.accumulation,
            step_tokens: slice.step_tokens,
            ..self.spec
        };
        let (loss, mut metrics) = match self.method {
            Method::Grpo => grpo_loss_masked(
                &lp.token_logps,
                &old,
                &lp.offsets,
                &advantages,
                reference.as_ref(),
                &spec,
                &mask,
            )?,
            Method::Rloo { .. } => rloo_loss(
                &lp.token_logps,
                &old,
                &lp.offsets,
                &advantages,
                self.spec.epsilon_low,
                self.spec.epsilon_high,
            )?,
        };
        metrics.push(("entropy".into(), entropy));
        metrics.extend(slice.metrics.iter().cloned());
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

    /// TRL's `num_tokens`: prompt and completion tokens of every generation so far (a running
    /// count, so logged as it stands rather than averaged over the logging window).
    fn log_metrics(&self) -> BTreeMap<String, f64> {
        BTreeMap::from([("num_tokens".to_string(), self.num_tokens)])
    }

    fn state(&self) -> Result<Value> {
        Ok(serde_json::json!({ "num_tokens": self.num_tokens }))
    }

    /// When generations span steps, the current one is kept, so that a resumed run trains the
    /// rest of it on the same completions; with `sync_ref_model`, the reference.
    fn save_checkpoint(&self, dir: &Path, policy: &LoadedModel) -> Result<()> {
        if let (Some(gen), true) = (&self.generation, self.spans_steps()) {
            let text = serde_json::to_string(gen).map_err(|e| Error::msg(format!("GRPO generation: {e}")))?;
            crate::util::fs::write_atomic(&dir.join(GENERATION_FILE), text.as_bytes())?;
        }
        match &self.reference {
            Some(r) => r.save_checkpoint(dir, policy),
            None => Ok(()),
        }
    }

    fn restore(&mut self, dir: &Path, state: &Value, _optimizer_steps: u64) -> Result<()> {
        self.num_tokens = state["num_tokens"].as_f64().unwrap_or(0.0);
        let path = dir.join(GENERATION_FILE);
        if path.is_file() {
            let text = crate::util::read_to_string(&path)?;
            let gen: Generation = serde_json::from_str(&text)
                .map_err(|e| Error::msg(format!("{}: not a GRPO generation: {e}", path.display())))?;
            self.generation = Some(gen);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A generation spread over steps is shuffled by completion: a group's subset carries each
    /// completion's advantage, mask and per-token reference log-probs with it.
    #[test]
    fn a_groups_subset_keeps_each_completions_own_token_values() {
        let g = Group {
            prompt: vec![1, 2],
            completions: vec![vec![5], vec![6, 7, 8], vec![9, 10]],
            advantages: vec![0.5, -1.0, 0.25],
            keep: vec![true, false, true],
            reference: Some(vec![-0.1, -0.2, -0.3, -0.4, -0.5, -0.6]),
            old: None,
        };
        let s = g.subset(&[2, 1]);
        assert_eq!(s.completions, vec![vec![9, 10], vec![6, 7, 8]]);
        assert_eq!((s.advantages, s.keep), (vec![0.25, -1.0], vec![true, false]));
        assert_eq!(s.reference, Some(vec![-0.5, -0.6, -0.2, -0.3, -0.4]));
        assert_eq!((s.old, s.prompt), (None, vec![1, 2]));
    }

    /// GDPO's normalize_then_sum by hand: two rewards, two groups of two.
    #[test]
    fn normalize_then_sum_by_hand() {
        // reward a: [1, 3 | 2, 2]; reward b: [0, 1 | None, 4]
        let a = vec![Some(1.0), Some(3.0), Some(2.0), Some(2.0)];
        let b = vec![Some(0.0), Some(1.0), None, Some(4.0)];
        let (adv, stds) = normalize_then_sum(&[a, b], Some(&[1.0, 0.5]), 2);
        // group 1: a → ∓1/(√2+1e-4), b → ∓0.5/(√(0.5)+1e-4); group 2: a → 0, b: one value,
        // std NaN → 0, so (4 − 4)/1e-4 = 0
        let s2 = 2f64.sqrt() + 1e-4;
        let s05 = 0.5f64.sqrt() + 1e-4;
        let t = [-1.0 / s2 + 0.5 * (-0.5 / s05), 1.0 / s2 + 0.5 * (0.5 / s05), 0.0, 0.0];
        let mean = t.iter().sum::<f64>() / 4.0;
        let std = (t.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 3.0).sqrt();
        for (g, w) in adv.iter().zip(t.iter().map(|x| (x - mean) / (std + 1e-4))) {
            assert!((g - w).abs() < 1e-12, "{adv:?}");
        }
        assert_eq!(stds.len(), 2);
        assert!((stds[0] - std).abs() < 1e-12);
        // a completion no reward scored gets 0
        let (adv, _) = normalize_then_sum(&[vec![Some(1.0), None, Some(0.0), Some(2.0)]], None, 2);
        assert_eq!(adv[1], 0.0);
    }
}
