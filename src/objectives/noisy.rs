//! Soft and noisy labels, and scored pairs: OSP's soft-preference cross-entropy, the LCPO /
//! RE-PO label-correctness wrapper, CoPG. The papers' exact formulas could not be consulted
//! (ALGORITHMS.md tags them \[not found\] / \[recalled\]); these are the documented shapes and are
//! listed as experimental.

use super::{log_sigmoid, lookup, mean, Ctx, LossKind, ObjectiveParams, PairStats};
use crate::error::{Error, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;

settings! {
    /// Objectives, noisy labels (lcpo).
    pub struct NoisyParams {
        /// The pairwise objective lcpo wraps.
        pub lcpo_base: String = "sigmoid".into(),
        /// lcpo's initial label-noise rate η, re-estimated each step (EM) and logged as
        /// lcpo/noise_rate.
        pub lcpo_noise_rate: f64 = 0.1,
    }
}

fn strength(c: &Ctx) -> Result<Tensor> {
    let p = &c.s.policy_chosen;
    Ok(Tensor::new(c.s.strength.clone(), p.device())?.to_dtype(p.dtype())?)
}

/// OSP soft-preference cross-entropy: −[p log σ(βh) + (1−p) log σ(−βh)], p =
/// `preference_strength` (1 when absent, which is DPO).
pub fn osp(c: &Ctx) -> Result<Tensor> {
    let z = (c.h()? * c.p.beta)?;
    let p = strength(c)?;
    let a = (log_sigmoid(&z)? * &p)?;
    let b = (log_sigmoid(&z.neg()?)? * (1.0 - &p)?)?;
    Ok((a + b)?.neg()?)
}

/// CoPG: (R̃_w − R̃_l)² with R̃ = R − β(log π − log π_ref), R the pair's scores.
pub fn copg(c: &Ctx) -> Result<Tensor> {
    let scores =
        c.s.scores
            .as_ref()
            .ok_or_else(|| Error::msg("copg needs scored pairs (chosen_score and rejected_score)"))?;
    let dev = c.s.policy_chosen.device();
    let dt = c.s.policy_chosen.dtype();
    let rdiff = Tensor::new(scores.iter().map(|(w, l)| w - l).collect::<Vec<_>>(), dev)?.to_dtype(dt)?;
    Ok((rdiff - (c.h()? * c.p.beta)?)?.sqr()?)
}

fn swapped(s: &PairStats) -> PairStats {
    PairStats {
        policy_chosen: s.policy_rejected.clone(),
        policy_rejected: s.policy_chosen.clone(),
        ref_chosen: s.ref_rejected.clone(),
        ref_rejected: s.ref_chosen.clone(),
        chosen_tokens: s.rejected_tokens.clone(),
        rejected_tokens: s.chosen_tokens.clone(),
        weights: s.weights.clone(),
        strength: s.strength.iter().map(|p| 1.0 - p).collect(),
        scores: s.scores.as_ref().map(|v| v.iter().map(|(w, l)| (*l, *w)).collect()),
        margin: s.margin.iter().map(|m| -m).collect(),
        log_variance: s.log_variance.as_ref().map(|(w, l)| (l.clone(), w.clone())),
    }
}

/// (ℓ(w, l), ℓ(l, w), γ): the base loss both ways and the posterior that each label is
/// correct, γ = (1−η)P / ((1−η)P + η(1−P)) with P = σ(ℓ(l,w) − ℓ(w,l)) (the link P ∝ e^{−ℓ}),
/// no gradient through γ.
fn lcpo_parts(c: &Ctx) -> Result<(Tensor, Tensor, Tensor)> {
    let base = lookup(&c.p.noisy.lcpo_base)?;
    let LossKind::Pairwise(f) = base.loss else {
        return Err(Error::Config(format!(
            "lcpo_base `{}` is not a pairwise objective",
            base.name
        )));
    };
    if base.name == "lcpo" {
        return Err(Error::Config("lcpo_base cannot be lcpo".into()));
    }
    let fwd = f(c)?;
    let sw = swapped(c.s);
    let back = f(&Ctx { s: &sw, p: c.p })?;
    let p = super::sigmoid(&(back.detach() - fwd.detach())?)?;
    let eta = c.p.noisy.lcpo_noise_rate;
    let num = (&p * (1.0 - eta))?;
    let gamma = (&num / (&num + ((1.0 - &p)? * eta)?)?)?;
    Ok((fwd, back, gamma))
}

/// LCPO / RE-PO: γ ℓ(w, l) + (1−γ) ℓ(l, w) around the pairwise objective `lcpo_base`.
pub fn lcpo(c: &Ctx) -> Result<Tensor> {
    let (fwd, back, gamma) = lcpo_parts(c)?;
    Ok(((&gamma * fwd)? + ((1.0 - &gamma)? * back)?)?)
}

/// `lcpo/noise_rate` (η in use) and `lcpo/estimated_noise` (batch mean of 1 − γ, the M-step).
pub fn lcpo_metrics(c: &Ctx) -> Result<Vec<(String, f64)>> {
    let (_, _, gamma) = lcpo_parts(c)?;
    Ok(vec![
        ("lcpo/noise_rate".into(), c.p.noisy.lcpo_noise_rate),
        ("lcpo/estimated_noise".into(), 1.0 - mean(&gamma)?),
    ])
}

/// LCPO's M-step, after each optimizer step: η moves towards the step's estimate of the
/// label-noise rate (`lcpo/estimated_noise`, averaged over the step's micro-batches).
pub fn lcpo_end_step(p: &mut ObjectiveParams, step_metrics: &BTreeMap<String, f64>) {
    if let Some(est) = step_metrics.get("lcpo/estimated_noise") {
        p.noisy.lcpo_noise_rate = 0.9 * p.noisy.lcpo_noise_rate + 0.1 * est;
    }
}
