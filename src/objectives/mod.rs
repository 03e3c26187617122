//! Objectives: pure functions of sequence statistics (DESIGN.md). An objective never touches
//! weights: it gets summed log-probs and token counts of policy and reference and returns a
//! per-example loss plus named metrics.
//!
//! Adding a pairwise objective is one small function `fn(&Ctx) -> Result<Tensor>` in its
//! family's file plus one line in [`REGISTRY`]. `loss_type` may name several, combined with
//! `loss_weights` (TRL: L = Σ_k w_k · mean(loss_k)).

pub mod dpo;
pub mod listwise;
pub mod noisy;
pub mod reference_free;
pub mod reward;
pub mod unpaired;

pub mod pairs;
pub mod registry;

pub use pairs::{Ctx, PairStats};
pub use registry::{lookup, EndStepFn, LossFn, LossKind, MetricsFn, ObjectiveEntry, RewardKind, Status, REGISTRY};

use crate::data::Shape;
use crate::error::{Error, Result};
use crate::stats::SeqStats;
use candle_core::{DType, Tensor};
use serde_json::Value;

/// What an objective returns for a batch.
#[derive(Debug)]
pub struct ObjectiveOutput {
    /// `[B]` per-example losses (the trainer averages them).
    pub losses: Tensor,
    /// Named metrics, each a batch mean (TRL's names: `rewards/chosen`, ...).
    pub metrics: Vec<(String, f64)>,
}

choice! {
    /// TRL's transform of the log-ratios Δ before a pairwise loss (`f_divergence_type`).
    pub enum FDivergenceType {
        ReverseKl = "reverse_kl",
        ForwardKl = "forward_kl",
        JsDivergence = "js_divergence",
        AlphaDivergence = "alpha_divergence",
    }
}

settings! {
    /// Objectives: the hyperparameters every pairwise objective reads (TRL's DPOConfig names).
    pub struct ObjectiveParams {
        /// Temperature β: scales the implicit reward β·log(π/π_ref) (ORPO: the odds-ratio
        /// weight λ).
        pub beta: f64 = 0.1,
        /// Label-flip rate ε of cdpo, robust, exo_pair, aot, simpo, cpo (sigmoid ignores it, as
        /// TRL ≥0.29).
        pub label_smoothing: f64 = 0.0,
        /// reverse_kl | forward_kl | js_divergence | alpha_divergence: transform of the log-ratios (TRL).
        pub f_divergence_type: FDivergenceType = FDivergenceType::ReverseKl,
        /// α of alpha_divergence.
        pub f_alpha_divergence_coef: f64 = 0.5,
    }
    flatten {
        pub dpo: dpo::DpoParams,
        pub reference_free: reference_free::ReferenceFreeParams,
        pub unpaired: unpaired::UnpairedParams,
        pub listwise: listwise::ListwiseParams,
        pub noisy: noisy::NoisyParams,
        pub reward: reward::RewardParams,
    }
}

/// An objective: one registry entry, or a weighted sum of several (`loss_weights`).
pub struct Objective {
    pub parts: Vec<(f64, &'static ObjectiveEntry)>,
    pub params: ObjectiveParams,
}

impl Objective {
    pub fn name(&self) -> String {
        self.parts.iter().map(|(_, e)| e.name).collect::<Vec<_>>().join("+")
    }

    /// Whether the objective reads a Gaussian reward head's log-variances.
    pub fn needs_reward_variance(&self) -> bool {
        self.parts
            .iter()
            .any(|(_, e)| e.rewards == RewardKind::RewardDistribution)
    }

    pub fn needs_reference(&self) -> bool {
        self.parts.iter().any(|(_, e)| e.needs_reference)
    }

    /// The data shape this objective accepts.
    pub fn shape(&self) -> Shape {
        self.parts[0].1.loss.shape()
    }

    /// Whether examples need a mismatched completion for a KL estimate (KTO).
    pub fn needs_kl(&self) -> bool {
        self.parts.iter().any(|(_, e)| e.needs_kl)
    }

    /// After an optimizer step: objectives whose hyperparameters move (LCPO) update them from
    /// the step's averaged metrics.
    pub fn end_step(&mut self, step_metrics: &std::collections::BTreeMap<String, f64>) {
        for (_, e) in &self.parts {
            if let Some((f, _)) = e.end_step {
                f(&mut self.params, step_metrics);
            }
        }
    }

    /// The hyperparameters that moved during training (see [`ObjectiveEntry::end_step`]), as a
    /// JSON object of config keys; empty for most objectives.
    pub fn state(&self) -> Value {
        let all = serde_json::to_value(&self.params).expect("parameters serialise");
        let mut out = serde_json::Map::new();
        for (_, e) in &self.parts {
            for &k in e.end_step.map(|(_, keys)| keys).unwrap_or_default() {
                out.insert(k.to_string(), all[k].clone());
            }
        }
        Value::Object(out)
    }

    /// Restore what [`Self::state`] saved (a missing or empty state changes nothing).
    pub fn restore(&mut self, state: &Value) -> Result<()> {
        let Some(saved) = state.as_object().filter(|m| !m.is_empty()) else {
            return Ok(());
        };
        let mut all = serde_json::to_value(&self.params).expect("parameters serialise");
        for (k, v) in saved {
            all[k] = v.clone();
        }
        self.params = serde_json::from_value(all)
            .map_err(|e| Error::msg(format!("checkpoint: objective state does not fit: {e}")))?;
        Ok(())
    }

    /// Per-example losses and metrics for a batch of the objective's shape.
    pub fn loss(&self, stats: &SeqStats) -> Result<ObjectiveOutput> {
        let mut out = match self.shape() {
            Shape::Pairwise => return self.loss_pairs(&PairStats::from_stats(stats)?),
            Shape::Unpaired => {
                let ctx = unpaired::UnpairedCtx::new(stats, &self.params, self.needs_kl())?;
                self.combine(|k| match k {
                    LossKind::Unpaired(f) => f(&ctx),
                    _ => unreachable!("build() checks that parts share a shape"),
                })?
            }
            Shape::Ranked => {
                let ctx = listwise::ListCtx::new(stats, &self.params)?;
                self.combine(|k| match k {
                    LossKind::Listwise(f) => f(&ctx),
                    _ => unreachable!("build() checks that parts share a shape"),
                })?
            }
        };
        if let Some(w) = &stats.weights {
            out.losses = (out.losses * w)?;
        }
        Ok(out)
    }

    /// Σ_k w_k · losses_k, with the first part's metrics.
    fn combine(&self, mut f: impl FnMut(&LossKind) -> Result<ObjectiveOutput>) -> Result<ObjectiveOutput> {
        let mut total: Option<ObjectiveOutput> = None;
        for (w, e) in &self.parts {
            let o = f(&e.loss)?;
            let l = (o.losses * *w)?;
            total = Some(match total {
                None => ObjectiveOutput {
                    losses: l,
                    metrics: o.metrics,
                },
                Some(t) => ObjectiveOutput {
                    losses: (t.losses + l)?,
                    metrics: t.metrics,
                },
            });
        }
        Ok(total.expect("at least one part"))
    }

    /// Each pair's (chosen, rejected) reward as this objective defines it (its first part's
    /// kind: `rewards/chosen` and `rewards/rejected` before the batch mean), as f64.
    pub fn pair_rewards(&self, stats: &PairStats) -> Result<Vec<(f64, f64)>> {
        let ctx = Ctx {
            s: stats,
            p: &self.params,
        };
        let (c, r) = implicit_rewards(&ctx, self.parts[0].1.rewards)?;
        let f = |t: Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1()?) };
        Ok(f(c)?.into_iter().zip(f(r)?).collect())
    }

    /// Per-example losses `Σ_k w_k loss_k` and metrics of a pairwise objective.
    pub fn loss_pairs(&self, stats: &PairStats) -> Result<ObjectiveOutput> {
        let ctx = Ctx {
            s: stats,
            p: &self.params,
        };
        let mut total: Option<Tensor> = None;
        let mut metrics = reward_metrics(&ctx, self.parts[0].1.rewards)?;
        for (w, e) in &self.parts {
            let LossKind::Pairwise(loss) = e.loss else {
                return Err(Error::msg(format!("`{}` is not a pairwise objective", e.name)));
            };
            let l = (loss(&ctx)? * *w)?;
            total = Some(match total {
                None => l,
                Some(t) => (t + l)?,
            });
            if let Some(m) = e.metrics {
                metrics.extend(m(&ctx)?);
            }
        }
        let mut losses = total.expect("at least one part");
        if let Some(w) = &stats.weights {
            losses = (losses * w)?;
        }
        Ok(ObjectiveOutput { losses, metrics })
    }
}

/// Build the objective for `loss_type` names with `loss_weights` (default 1.0 each).
pub fn build(names: &[String], weights: Option<&[f64]>, params: &ObjectiveParams) -> Result<Objective> {
    if names.is_empty() {
        return Err(Error::Config("loss_type is empty".into()));
    }
    if let Some(w) = weights {
        if w.len() != names.len() {
            return Err(Error::Config(format!(
                "loss_weights has {} entries but loss_type names {}",
                w.len(),
                names.len()
            )));
        }
    }
    let parts = names
        .iter()
        .enumerate()
        .map(|(i, n)| Ok((weights.map_or(1.0, |w| w[i]), lookup(n)?)))
        .collect::<Result<Vec<_>>>()?;
    let shape = parts[0].1.loss.shape();
    if let Some((_, e)) = parts.iter().find(|(_, e)| e.loss.shape() != shape) {
        return Err(Error::Config(format!(
            "loss_type combines `{}` ({shape}) with `{}` ({}); combined objectives must read the same data shape",
            parts[0].1.name,
            e.name,
            e.loss.shape()
        )));
    }
    if params.label_smoothing != 0.0 && parts.iter().any(|(_, e)| e.name == "sigmoid") {
        return Err(Error::Config(
            "label_smoothing has no effect on loss_type `sigmoid` (TRL ≥0.29 ignores it); use `cdpo` for label-smoothed DPO or `robust` for rDPO".into(),
        ));
    }
    if parts.iter().any(|(_, e)| e.name == "lcpo") {
        let base = lookup(&params.noisy.lcpo_base).map_err(|e| Error::Config(format!("lcpo_base: {e}")))?;
        if !matches!(base.loss, LossKind::Pairwise(_)) || base.name == "lcpo" {
            return Err(Error::Config(format!(
                "lcpo_base `{}` must be a pairwise objective other than lcpo",
                base.name
            )));
        }
    }
    Ok(Objective {
        parts,
        params: params.clone(),
    })
}

/// `log(sigmoid(x)) = -log(exp(0) + exp(-x))`, computed as a log-sum-exp with the shift
/// `m = max(0, -x)` held constant, so it is stable for large |x| and its gradient is exact
/// everywhere (including x = 0, where `min`/`abs` formulations pick a one-sided subgradient).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let m = x.neg()?.maximum(0.0)?.detach();
    let sum = (m.neg()?.exp()? + (x.neg()? - &m)?.exp()?)?;
    Ok((sum.log()? + m)?.neg()?)
}

/// `log Φ(x)` elementwise (standard normal CDF), computed in f64 on the host
/// ([`crate::util::log_ndtr`]); its gradient is the exact `φ(x)/Φ(x)`, attached as
/// `(x − stop(x))·g + stop(log Φ(x))` (first derivatives only).
pub fn log_ndtr(x: &Tensor) -> Result<Tensor> {
    let z: Vec<f64> = x.detach().to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let host = |f: fn(f64) -> f64| -> Result<Tensor> {
        let v: Vec<f64> = z.iter().map(|&z| f(z)).collect();
        Ok(Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?)
    };
    let (value, slope) = (host(crate::util::log_ndtr)?, host(crate::util::d_log_ndtr)?);
    Ok(((x - x.detach())? * slope)?.add(&value)?)
}

/// `sigmoid(x) = exp(log_sigmoid(x))`, stable.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(x)?.exp()?)
}

/// Batch mean of a `[B]` tensor as f64 (for metrics; no gradient).
pub fn mean(x: &Tensor) -> Result<f64> {
    Ok(x.detach().to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

/// The (chosen, rejected) rewards of each pair as an objective of `kind` defines them
/// (no gradient): β·Δ (implicit), β·log π (summed or per token), or a reward model's rewards.
fn implicit_rewards(c: &Ctx, kind: RewardKind) -> Result<(Tensor, Tensor)> {
    let beta = c.p.beta;
    Ok(match kind {
        RewardKind::Implicit => {
            let (w, l) = c.deltas()?;
            ((w.detach() * beta)?, (l.detach() * beta)?)
        }
        RewardKind::PolicySum => (
            (c.s.policy_chosen.detach() * beta)?,
            (c.s.policy_rejected.detach() * beta)?,
        ),
        RewardKind::PolicyMean => {
            let (w, l) = c.mean_logps()?;
            ((w.detach() * beta)?, (l.detach() * beta)?)
        }
        RewardKind::Reward | RewardKind::RewardDistribution => {
            (c.s.policy_chosen.detach(), c.s.policy_rejected.detach())
        }
    })
}

/// TRL's reward metrics for the objective's kind of implicit reward.
fn reward_metrics(c: &Ctx, kind: RewardKind) -> Result<Vec<(String, f64)>> {
    if matches!(kind, RewardKind::Reward | RewardKind::RewardDistribution) {
        return reward::metrics(c);
    }
    let (chosen, rejected) = implicit_rewards(c, kind)?;
    let acc = chosen.gt(&rejected)?.to_dtype(chosen.dtype())?;
    Ok(vec![
        ("rewards/chosen".into(), mean(&chosen)?),
        ("rewards/rejected".into(), mean(&rejected)?),
        ("rewards/accuracies".into(), mean(&acc)?),
        ("rewards/margins".into(), mean(&(chosen - rejected)?)?),
        ("logps/chosen".into(), mean(&c.s.policy_chosen)?),
        ("logps/rejected".into(), mean(&c.s.policy_rejected)?),
    ])
}
