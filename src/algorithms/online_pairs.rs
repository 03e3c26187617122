//! The online pairwise methods: two completions of every prompt, ranked by the reward, and a
//! loss on the pair. TRL's trainers, with their names and defaults:
//!
//! - **Online DPO / IPO** (`task = "online_dpo"`, Guo et al. 2024, arXiv:2402.04792; TRL 1.16's
//!   `trl.experimental.online_dpo`): both completions from the policy; the better-rewarded is
//!   chosen; any pairwise objective of the catalogue (`loss_type`: `sigmoid` = DPO, `ipo`, ...)
//!   on the ranked pair, with the frozen starting model as reference.
//! - **XPO** (`task = "xpo"`, Xie et al. 2024, arXiv:2405.21046; TRL ≤ 0.2x's `XPOTrainer`,
//!   removed from TRL 1.x): one completion from the policy, one from the reference; the DPO/IPO
//!   loss on the ranked pair plus `alpha`·log π(y_ref), the exploration term.
//! - **Nash-MD** (`task = "nash_md"`, Munos et al. 2024, arXiv:2312.00886; TRL ≤ 0.2x's
//!   `NashMDTrainer`): one completion y from the policy, one y' from the geometric mixture
//!   `softmax(α·ref_logits + (1−α)·policy_logits)` (`mixture_coef` α), sampled with one KV cache
//!   per model ([`crate::sample::sample_mixture`]) instead of TRL's recompute without cache. With
//!   p = σ(r(y) − r(y')), the loss of y is `β·Σ_t sg(log π_t − log π_ref,t)·log π_t −
//!   (p − ½)·Σ_t log π_t`: REINFORCE on the preference with ½ as control variate, and on the KL.
//! - **IPO-MD** (`task = "ipo_md"`, Calandriello et al. 2024, arXiv:2403.08635; not in TRL,
//!   experimental): online IPO on data from Nash-MD's regularised sampler, both completions
//!   drawn from the mixture `softmax(α·ref_logits + (1−α)·policy_logits)`; ranked by the
//!   reward, then the IPO loss (`loss_type`, default `ipo`) against the frozen reference. The
//!   paper's soft-label variant (the preference probability as the IPO target) is not built:
//!   pairs are ranked, as in online IPO.
//!
//! Rewards come from `reward_funcs` (rules, `cmd:` commands, reward models prefer trained) and
//! `reward_model_path`; `missing_eos_penalty` is subtracted from a completion that did not end
//! with EOS. A pairwise judge (`judge = "cmd:..."`, [`crate::rewards::judge`]) may rank the
//! pairs instead: its probability that the first completion is better picks the chosen one
//! (≥ ½), or is Nash-MD's p. Log-probs are those of the model at temperature 1, as TRL computes
//! them for these trainers.

use super::rollout;
use super::{Algorithm, MicroBatch, StepCtx};
use crate::batch::{Layout, ScoredGroup};
use crate::config::online::at_epoch;
use crate::config::{Task, TrainConfig};
use crate::data::prompts::Prompt;
use crate::data::{ExampleMeta, Shape, TokenizedExample};
use crate::error::{Error, Result};
use crate::model::logprobs::group_sequence_logps_at;
use crate::model::{LoadedModel, Transformer};
use crate::objectives::Objective;
use crate::rewards::judge::{Judge, Pair};
use crate::rewards::Reward;
use crate::sample::{sample, sample_mixture, Completion, FinishReason, SamplingParams};
use crate::stats::{group_logps, SeqStats, StatsOptions};
use candle_core::{DType, Tensor};
use serde_json::json;
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

/// Which method.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    OnlineDpo,
    NashMd,
    Xpo,
    IpoMd,
}

/// One prompt's pair in the current step.
struct Unit {
    /// Online DPO and XPO: a pairwise example `[chosen, rejected]`; Nash-MD: the policy's
    /// completion alone.
    example: TokenizedExample,
    /// The reference's summed log-probs of `[chosen, rejected]` (online DPO, XPO), or its
    /// per-token log-probs of the policy's completion (Nash-MD).
    reference: Vec<f64>,
    /// XPO: which response came from the reference (the exploration term's).
    ref_index: usize,
    /// Nash-MD: the probability that the policy's completion beats the mixture's.
    probability: f64,
}

pub struct OnlinePairs {
    method: Method,
    objective: Objective,
    stats_options: StatsOptions,
    reference: rollout::OnlineReference,
    sampling: SamplingParams,
    rewards: Vec<Box<dyn Reward>>,
    reward_weights: Option<Vec<f64>>,
    /// A pairwise judge, in place of the rewards.
    judge: Option<Judge>,
    missing_eos_penalty: Option<f64>,
    seed: u64,
    /// beta, alpha (XPO), mixture_coef (Nash-MD): one value, or one per epoch.
    beta: (f64, Option<Vec<f64>>),
    alpha: (f64, Option<Vec<f64>>),
    mixture_coef: (f64, Option<Vec<f64>>),
    rollout: VecDeque<Vec<Unit>>,
    step_metrics: Vec<(String, f64)>,
}

impl OnlinePairs {
    pub fn new(cfg: &TrainConfig, policy: &LoadedModel, resume: Option<&Path>) -> Result<OnlinePairs> {
        if policy.transformer.cfg.reward_head {
            return Err(Error::Config(format!(
                "{} is a reward model (it has a score head); online training starts from a causal LM",
                policy.source.display()
            )));
        }
        let method = match cfg.task {
            Task::OnlineDpo => Method::OnlineDpo,
            Task::NashMd => Method::NashMd,
            Task::Xpo => Method::Xpo,
            Task::IpoMd => Method::IpoMd,
            t => {
                return Err(Error::msg(format!(
                    "task `{}` is not an online pairwise method",
                    t.as_str()
                )))
            }
        };
        let (rewards, reward_weights) = rollout::rewards(cfg)?;
        let reference = rollout::OnlineReference::new(cfg, policy, resume, method != Method::OnlineDpo)?;
        let o = &cfg.online;
        Ok(OnlinePairs {
            method,
            objective: cfg.objective()?,
            stats_options: StatsOptions {
                use_weighting: false,
                ..cfg.stats_options()
            },
            reference,
            sampling: rollout::sampling(cfg, policy.tokenizer.eos_id),
            rewards,
            reward_weights,
            judge: o
                .judge
                .as_deref()
                .map(|j| Judge::new(j, cfg.grpo.reward_timeout))
                .transpose()?,
            missing_eos_penalty: o.missing_eos_penalty,
            seed: cfg.seed,
            beta: (cfg.params.beta, o.beta_per_epoch.clone()),
            alpha: (cfg.params.reference_free.alpha, o.alpha_per_epoch.clone()),
            mixture_coef: (o.mixture_coef, o.mixture_coef_per_epoch.clone()),
            rollout: VecDeque::new(),
            step_metrics: Vec::new(),
        })
    }

    fn beta(&self) -> f64 {
        self.objective.params.beta
    }
}

/// The reference's summed log-probs of each example's responses (no gradient).
fn reference_sums(reference: &Transformer, examples: &[&TokenizedExample], opts: &StatsOptions) -> Result<Vec<f64>> {
    let s = group_logps(reference, examples, opts)?;
    Ok(s.policy.detach().to_dtype(DType::F64)?.to_vec1()?)
}

/// Nash-MD's loss on a batch of policy completions: per completion i with per-token log-probs
/// `lp` (differentiable), the reference's `ref_lp` and the preference probability `p_i`,
/// `β·Σ_t sg(lp_t − ref_t)·lp_t − (p_i − ½)·Σ_t lp_t`, averaged over completions. Returns the
/// loss with the batch means of the score term `(p − ½)·Σ lp` and of the KL `Σ (lp − ref)`.
pub fn nash_md_loss(
    token_logps: &Tensor,
    offsets: &[usize],
    reference: &[f64],
    probability: &[f64],
    beta: f64,
) -> Result<(Tensor, f64, f64)> {
    let lp: Vec<f64> = token_logps.detach().to_dtype(DType::F64)?.to_vec1()?;
    let n = offsets.len() - 1;
    let mut w = vec![0.0; lp.len()];
    let (mut score, mut kl) = (0.0, 0.0);
    for i in 0..n {
        let (a, b) = (offsets[i], offsets[i + 1]);
        let c = probability[i] - 0.5;
        let sum: f64 = lp[a..b].iter().sum();
        score += c * sum;
        for t in a..b {
            kl += lp[t] - reference[t];
            w[t] = beta * (lp[t] - reference[t]) - c;
        }
    }
    let w = Tensor::new(w, token_logps.device())?.to_dtype(token_logps.dtype())?;
    let loss = ((token_logps * w)?.sum_all()? / n.max(1) as f64)?;
    Ok((loss, score / n.max(1) as f64, kl / n.max(1) as f64))
}

/// XPO's exploration term `alpha · mean_k log π(y_ref,k)`: `sums` holds each pair's summed
/// log-probs `[chosen, rejected]`, `ref_index[k]` which of pair k's came from the reference.
pub fn xpo_exploration(sums: &Tensor, ref_index: &[usize], alpha: f64) -> Result<Tensor> {
    let idx: Vec<u32> = ref_index.iter().enumerate().map(|(k, &r)| (2 * k + r) as u32).collect();
    let idx = Tensor::new(idx, sums.device())?;
    Ok((sums.index_select(&idx, 0)?.mean_all()? * alpha)?)
}

impl Algorithm for OnlinePairs {
    fn step_logs(&self) -> &[&'static str] {
        &[rollout::COMPLETIONS_LOG]
    }

    /// Sample each prompt's two completions, score and rank them, and compute what the
    /// reference contributes.
    fn begin_step(&mut self, ctx: &StepCtx, batches: &[Vec<usize>]) -> Result<()> {
        let epoch = ctx.step * ctx.accumulation / ctx.batches_per_epoch.max(1);
        self.objective.params.beta = at_epoch(&self.beta.1, self.beta.0, epoch);
        let alpha = at_epoch(&self.alpha.1, self.alpha.0, epoch);
        let mixture_coef = at_epoch(&self.mixture_coef.1, self.mixture_coef.0, epoch);
        let order: Vec<usize> = batches.concat();
        let rows: Vec<&Prompt> = order.iter().map(|&i| &ctx.data.prompts[i]).collect();
        let prompts: Vec<Vec<u32>> = rows.iter().map(|p| p.ids.clone()).collect();
        let seed = rollout::step_seed(self.seed, ctx.step);
        let policy = &ctx.policy.transformer;
        let none = |_: &[u32]| false;
        // `n` completions of every prompt from `model`, or from Nash-MD's geometric mixture of
        // the policy and the reference; each source's draws seeded apart by `salt`
        let from = |model: Option<&Transformer>, n: usize, salt: u64| match model {
            Some(m) => sample(m, &prompts, n, &self.sampling, seed ^ salt, &none, &mut |_| {}),
            None => sample_mixture(
                &[(policy, 1.0 - mixture_coef), (&self.reference.model, mixture_coef)],
                &prompts,
                n,
                &self.sampling,
                seed ^ salt,
                &none,
                &mut |_| {},
            ),
        };
        // a[k] and b[k]: prompt k's two completions (b: the policy's again, the reference's,
        // or the mixture's)
        let (a, b): (Vec<Completion>, Vec<Completion>) = match self.method {
            Method::OnlineDpo | Method::IpoMd => {
                let both = match self.method {
                    Method::OnlineDpo => from(Some(policy), 2, 0)?,
                    _ => from(None, 2, 0x4950_4f4d)?,
                };
                let mut it = both.into_iter();
                let mut pairs = (Vec::new(), Vec::new());
                while let (Some(x), Some(y)) = (it.next(), it.next()) {
                    pairs.0.push(x);
                    pairs.1.push(y);
                }
                pairs
            }
            Method::Xpo => (
                from(Some(policy), 1, 0)?,
                from(Some(&self.reference.model), 1, 0x0058_504f)?,
            ),
            Method::NashMd => (from(Some(policy), 1, 0)?, from(None, 1, 0x004e_4d44)?),
        };
        let n = prompts.len();
        let all: Vec<Completion> = a.iter().chain(&b).cloned().collect();
        let texts: Vec<String> = all
            .iter()
            .map(|c| ctx.policy.tokenizer.decode(&c.ids, true))
            .collect::<Result<_>>()?;
        let row_of: Vec<&Prompt> = rows.iter().chain(&rows).copied().collect();
        let (per, mut totals) =
            rollout::score(&mut self.rewards, self.reward_weights.as_deref(), &row_of, &all, &texts)?;
        if let Some(pen) = self.missing_eos_penalty {
            for (t, c) in totals.iter_mut().zip(&all) {
                if c.finish_reason != FinishReason::Stop {
                    *t -= pen;
                }
            }
        }
        let (ra, rb) = totals.split_at(n);
        // a judge's probability that the first completion is better, in place of the rewards
        let judged: Option<Vec<f64>> = match &mut self.judge {
            Some(j) => {
                let pairs: Vec<Pair> = (0..n)
                    .map(|k| Pair {
                        prompt: &rows[k].text,
                        first: &texts[k],
                        second: &texts[n + k],
                        columns: &rows[k].columns,
                    })
                    .collect();
                Some(j.judge(&pairs)?)
            }
            None => None,
        };
        let scored = judged.is_none();
        let eos = |cs: &[Completion]| {
            cs.iter().filter(|c| c.finish_reason == FinishReason::Stop).count() as f64 / cs.len().max(1) as f64
        };
        let beta = self.beta();
        let mut m: Vec<(String, f64)> = Vec::new();
        let mut units = Vec::with_capacity(n);
        // TRL's ranking: the first is chosen when its reward is ≥ the second's (so a NaN
        // reward ranks the first completion second)
        let first_wins: Vec<bool> = match &judged {
            Some(p) => p.iter().map(|&p| p >= 0.5).collect(),
            None => (0..n).map(|k| ra[k] >= rb[k]).collect(),
        };
        match self.method {
            Method::OnlineDpo | Method::Xpo | Method::IpoMd => {
                let examples: Vec<TokenizedExample> = (0..n)
                    .map(|k| {
                        let (c, r) = match first_wins[k] {
                            true => (&a[k], &b[k]),
                            false => (&b[k], &a[k]),
                        };
                        TokenizedExample {
                            line: rows[k].line,
                            prompt_ids: prompts[k].clone(),
                            responses: vec![c.ids.clone(), r.ids.clone()],
                            meta: ExampleMeta::new(Shape::Pairwise),
                            prompt_truncated: false,
                            completion_truncated: a[k].finish_reason == FinishReason::Length,
                        }
                    })
                    .collect();
                let mut refs = Vec::with_capacity(2 * n);
                for chunk in examples.chunks(8) {
                    let batch: Vec<&TokenizedExample> = chunk.iter().collect();
                    refs.extend(reference_sums(&self.reference.model, &batch, &self.stats_options)?);
                }
                let margin: Vec<f64> = (0..n)
                    .map(|k| if first_wins[k] { ra[k] - rb[k] } else { rb[k] - ra[k] })
                    .collect();
                let margin = rollout::nan_stats(&margin).0;
                if self.method != Method::Xpo {
                    if self.method == Method::IpoMd {
                        m.push(("mixture_coef".into(), mixture_coef));
                    }
                    if scored {
                        m.push(("objective/scores".into(), rollout::nan_stats(&totals).0));
                        m.push(("objective/scores_margin".into(), margin));
                    }
                    m.push(("val/contain_eos_token".into(), eos(&all)));
                } else {
                    if scored {
                        m.push(("objective/model_scores".into(), rollout::nan_stats(ra).0));
                        m.push(("objective/ref_scores".into(), rollout::nan_stats(rb).0));
                        let d: Vec<f64> = (0..n).map(|k| ra[k] - rb[k]).collect();
                        m.push(("objective/scores_margin".into(), rollout::nan_stats(&d).0));
                    }
                    m.push(("val/model_contain_eos_token".into(), eos(&a)));
                    m.push(("val/ref_contain_eos_token".into(), eos(&b)));
                    m.push(("alpha".into(), alpha));
                }
                for (k, e) in examples.into_iter().enumerate() {
                    units.push(Unit {
                        example: e,
                        reference: refs[2 * k..2 * k + 2].to_vec(),
                        // the reference's completion is b: rejected when the policy's won
                        ref_index: if first_wins[k] { 1 } else { 0 },
                        probability: f64::NAN,
                    });
                }
            }
            Method::NashMd => {
                let probs: Vec<f64> = match &judged {
                    Some(p) => p.clone(),
                    None => (0..n)
                        .map(|k| {
                            let d = ra[k] - rb[k];
                            // no preference signal when a reward skipped a completion
                            if d.is_nan() {
                                0.5
                            } else {
                                1.0 / (1.0 + (-d).exp())
                            }
                        })
                        .collect(),
                };
                let mut ref_tokens = Vec::new();
                for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
                    let responses: Vec<Vec<Vec<u32>>> = chunk.iter().map(|&k| vec![a[k].ids.clone()]).collect();
                    let groups: Vec<ScoredGroup> = chunk
                        .iter()
                        .zip(&responses)
                        .map(|(&k, r)| ScoredGroup {
                            prompt: &prompts[k],
                            responses: r,
                        })
                        .collect();
                    let lp = group_sequence_logps_at(&self.reference.model, &groups, Layout::PACKED, false, 1.0)?;
                    let v: Vec<f64> = lp.token_logps.detach().to_dtype(DType::F64)?.to_vec1()?;
                    ref_tokens.extend(lp.offsets.windows(2).map(|w| v[w[0]..w[1]].to_vec()));
                }
                m.push((
                    "rewards/probabilities".into(),
                    probs.iter().sum::<f64>() / n.max(1) as f64,
                ));
                if scored {
                    m.push(("rewards/chosen".into(), rollout::nan_stats(ra).0));
                    m.push(("rewards/rejected".into(), rollout::nan_stats(rb).0));
                }
                m.push(("val/model_contain_eos_token".into(), eos(&a)));
                m.push(("val/ref_contain_eos_token".into(), eos(&b)));
                m.push(("mixture_coef".into(), mixture_coef));
                for (k, r) in ref_tokens.into_iter().enumerate() {
                    units.push(Unit {
                        example: TokenizedExample {
                            line: rows[k].line,
                            prompt_ids: prompts[k].clone(),
                            responses: vec![a[k].ids.clone()],
                            meta: ExampleMeta::new(Shape::Unpaired),
                            prompt_truncated: false,
                            completion_truncated: a[k].finish_reason == FinishReason::Length,
                        },
                        reference: r,
                        ref_index: 0,
                        probability: probs[k],
                    });
                }
            }
        }
        m.push(("beta".into(), beta));
        if scored {
            m.push(("reward".into(), rollout::nan_stats(&totals).0));
            m.extend(rollout::reward_metrics(&self.rewards, &per));
        }
        m.extend(rollout::length_metrics(&all.iter().collect::<Vec<_>>()));
        if rollout::is_logging_step(ctx.cfg, ctx.step, ctx.total_steps) {
            let step = ctx.step + 1;
            let source = match self.method {
                Method::OnlineDpo => ["policy", "policy"],
                Method::Xpo => ["policy", "reference"],
                Method::NashMd => ["policy", "mixture"],
                Method::IpoMd => ["mixture", "mixture"],
            };
            rollout::log_completions(
                ctx.cfg,
                (0..2 * n).map(|i| {
                    let k = i % n;
                    let first = i < n;
                    json!({
                        "step": step,
                        "prompt": row_of[i].text,
                        "completion": texts[i],
                        "reward": if totals[i].is_nan() { None } else { Some(totals[i]) },
                        "rewards": rollout::scores_by_name(&self.rewards, &per, i),
                        "sampled_from": source[if first { 0 } else { 1 }],
                        "judge": judged.as_ref().map(|p| if first { p[k] } else { 1.0 - p[k] }),
                        "chosen": first == first_wins[k],
                        "completion_tokens": all[i].ids.len(),
                    })
                }),
            )?;
        }
        self.step_metrics = m;
        self.rollout.clear();
        let mut units = units.into_iter();
        for b in batches {
            self.rollout.push_back(units.by_ref().take(b.len()).collect());
        }
        Ok(())
    }

    fn micro_batch(&mut self, ctx: &StepCtx, indices: &[usize]) -> Result<MicroBatch> {
        let units = self
            .rollout
            .pop_front()
            .filter(|r| r.len() == indices.len())
            .ok_or_else(|| Error::msg("online training: a micro-batch without its rollout"))?;
        let examples: Vec<&TokenizedExample> = units.iter().map(|u| &u.example).collect();
        let policy = &ctx.policy.transformer;
        let dev = policy.device().clone();
        let n = units.len() as f64;
        let (loss, mut metrics) = match self.method {
            Method::OnlineDpo | Method::Xpo | Method::IpoMd => {
                let lp = group_logps(policy, &examples, &self.stats_options)?;
                let reference: Vec<f64> = units.iter().flat_map(|u| u.reference.iter().copied()).collect();
                let reference = Tensor::new(reference, &dev)?.to_dtype(lp.policy.dtype())?;
                let stats = SeqStats {
                    reference: Some(reference.clone()),
                    ..lp
                };
                let out = self.objective.loss(&stats)?;
                let mut metrics = out.metrics;
                let pol: Vec<f64> = stats.policy.detach().to_dtype(DType::F64)?.to_vec1()?;
                let rf: Vec<f64> = reference.to_dtype(DType::F64)?.to_vec1()?;
                // per completion, over both of every pair (TRL's means over the 2B sequences)
                let kl = pol.iter().zip(&rf).map(|(p, r)| p - r).sum::<f64>() / (2.0 * n);
                let entropy = -pol.iter().sum::<f64>() / (2.0 * n);
                let mut loss = out.losses.mean_all()?;
                if self.method == Method::Xpo {
                    // alpha · log π(y_ref), the exploration term, on the reference's completion
                    let alpha = self.step_metrics.iter().find(|m| m.0 == "alpha").map_or(0.0, |m| m.1);
                    let ref_index: Vec<usize> = units.iter().map(|u| u.ref_index).collect();
                    let xpo = xpo_exploration(&stats.policy, &ref_index, alpha)?;
                    let dpo_mean = out.losses.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    metrics.push(("loss/dpo".into(), dpo_mean));
                    metrics.push(("loss/xpo".into(), xpo.to_dtype(DType::F64)?.to_scalar::<f64>()?));
                    loss = (loss + xpo)?;
                    metrics.push(("objective/kl".into(), kl));
                    metrics.push(("objective/entropy".into(), entropy));
                } else {
                    let beta = self.beta();
                    metrics.push(("objective/kl".into(), kl));
                    metrics.push(("objective/entropy".into(), entropy));
                    metrics.push(("objective/non_score_reward".into(), -beta * kl));
                    let scores = self
                        .step_metrics
                        .iter()
                        .find(|m| m.0 == "objective/scores")
                        .map_or(0.0, |m| m.1);
                    metrics.push(("objective/rlhf_reward".into(), scores - beta * kl));
                }
                (loss, metrics)
            }
            Method::NashMd => {
                let responses: Vec<&Vec<Vec<u32>>> = examples.iter().map(|e| &e.responses).collect();
                let groups: Vec<ScoredGroup> = examples
                    .iter()
                    .zip(&responses)
                    .map(|(e, r)| ScoredGroup {
                        prompt: &e.prompt_ids,
                        responses: r,
                    })
                    .collect();
                let lp = group_sequence_logps_at(policy, &groups, self.stats_options.layout, false, 1.0)?;
                let reference: Vec<f64> = units.iter().flat_map(|u| u.reference.iter().copied()).collect();
                let probs: Vec<f64> = units.iter().map(|u| u.probability).collect();
                let (loss, score, kl) = nash_md_loss(&lp.token_logps, &lp.offsets, &reference, &probs, self.beta())?;
                let sums: Vec<f64> = lp.sums.detach().to_dtype(DType::F64)?.to_vec1()?;
                let ref_sums: Vec<f64> = lp
                    .offsets
                    .windows(2)
                    .map(|w| reference[w[0]..w[1]].iter().sum())
                    .collect();
                let margins: Vec<f64> = sums.iter().zip(&ref_sums).map(|(p, r)| p - r).collect();
                let metrics = vec![
                    ("loss/score".into(), score),
                    ("loss/kl".into(), kl),
                    ("logps/chosen".into(), sums.iter().sum::<f64>() / n),
                    ("logps/rejected".into(), ref_sums.iter().sum::<f64>() / n),
                    ("objective/entropy".into(), -sums.iter().sum::<f64>() / n),
                    ("rewards/margins".into(), margins.iter().sum::<f64>() / n),
                    (
                        "rewards/accuracies".into(),
                        margins.iter().filter(|&&d| d > 0.0).count() as f64 / n,
                    ),
                ];
                (loss, metrics)
            }
        };
        metrics.extend(self.step_metrics.iter().cloned());
        let tokens = examples.iter().map(|e| e.num_tokens()).sum();
        let positions = crate::batch::forward_positions(&examples, self.stats_options.layout);
        Ok(MicroBatch {
            loss,
            metrics,
            counts: Vec::new(),
            tokens,
            positions,
        })
    }

    fn end_step(&mut self, ctx: &StepCtx, _metrics: &BTreeMap<String, f64>, _lr: f64) -> Result<()> {
        self.reference.end_step(ctx.step, &ctx.policy.transformer)
    }

    fn save_checkpoint(&self, dir: &Path, policy: &LoadedModel) -> Result<()> {
        self.reference.save_checkpoint(dir, policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// XPO's exploration term picks the reference's completion of each pair.
    #[test]
    fn xpo_exploration_by_hand() {
        let v = Var::new(&[-1.0f64, -2.0, -3.0, -4.0][..], &Device::Cpu).unwrap();
        // pair 0: the reference's completion was rejected (index 1); pair 1: chosen (index 0)
        let t = xpo_exploration(v.as_tensor(), &[1, 0], 0.5).unwrap();
        assert_eq!(t.to_scalar::<f64>().unwrap(), 0.5 * (-2.0 + -3.0) / 2.0);
        let g: Vec<f64> = t.backward().unwrap().get(&v).unwrap().to_vec1().unwrap();
        assert_eq!(g, vec![0.0, 0.25, 0.25, 0.0]);
    }

    /// Nash-MD's loss and its gradient against the formula by hand in f64.
    #[test]
    fn nash_md_loss_by_hand() {
        // two completions: 2 tokens and 1 token
        let lp = [-0.5f64, -1.25, -2.0];
        let reference = [-0.75, -1.0, -1.5];
        let p = [0.8, 0.3];
        let beta = 0.1;
        let v = Var::new(&lp[..], &Device::Cpu).unwrap();
        let (loss, score, kl) = nash_md_loss(v.as_tensor(), &[0, 2, 3], &reference, &p, beta).unwrap();
        // completion 0: β·((−0.5+0.75)(−0.5) + (−1.25+1)(−1.25)) − 0.3·(−1.75)
        let l0 = beta * (0.25 * -0.5 + -0.25 * -1.25) - 0.3 * -1.75;
        // completion 1: β·(−0.5)(−2) − (−0.2)(−2)
        let l1 = beta * (-0.5 * -2.0) - (-0.2 * -2.0);
        let got = loss.to_scalar::<f64>().unwrap();
        assert!((got - (l0 + l1) / 2.0).abs() < 1e-12, "{got}");
        assert!((score - (0.3 * -1.75 + -0.2 * -2.0) / 2.0).abs() < 1e-12);
        assert!((kl - (0.25 - 0.25 - 0.5) / 2.0).abs() < 1e-12);
        // d/d lp_t = (β·(lp_t − ref_t) − (p − ½)) / n: the KL's factor is held fixed, as TRL's
        // torch.no_grad() log-ratio
        let g = loss.backward().unwrap();
        let g: Vec<f64> = g.get(&v).unwrap().to_vec1().unwrap();
        let want = [
            (beta * 0.25 - 0.3) / 2.0,
            (beta * -0.25 - 0.3) / 2.0,
            (beta * -0.5 + 0.2) / 2.0,
        ];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{g:?} vs {want:?}");
        }
    }
}
