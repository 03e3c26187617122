//! Unpaired objectives: each example is one completion with a desirable / undesirable label
//! (TRL's KTOTrainer).

use super::{mean, sigmoid, ObjectiveOutput, ObjectiveParams};
use crate::error::{Error, Result};
use crate::stats::SeqStats;
use candle_core::{DType, Tensor};

settings! {
    /// Objectives, unpaired (kto; TRL's KTOConfig names).
    pub struct UnpairedParams {
        /// KTO's λ_D: weight of desirable completions.
        pub desirable_weight: f64 = 1.0,
        /// KTO's λ_U: weight of undesirable completions.
        pub undesirable_weight: f64 = 1.0,
    }
}

/// An unpaired batch: Δ = log π − log π_ref of each completion, its label, and (KTO) the
/// reference point z0 estimated from mismatched completions.
pub struct UnpairedCtx<'a> {
    pub p: &'a ObjectiveParams,
    pub policy: Tensor,
    pub delta: Tensor,
    /// 1.0 for desirable, 0.0 for undesirable.
    pub desirable: Tensor,
    pub labels: Vec<bool>,
    /// z0 = max(0, mean over the batch of log π(y'|x) − log π_ref(y'|x)), no gradient.
    pub z0: Option<f64>,
}

impl<'a> UnpairedCtx<'a> {
    /// With `needs_kl`, each example carries a second response: the mismatched completion
    /// (another example's) used for z0.
    pub fn new(s: &SeqStats, p: &'a ObjectiveParams, needs_kl: bool) -> Result<Self> {
        let b = s.offsets.len() - 1;
        let per = if needs_kl { 2 } else { 1 };
        if (0..b).any(|e| s.offsets[e + 1] - s.offsets[e] != per) {
            return Err(Error::msg(
                "an unpaired objective got an example with an unexpected number of responses",
            ));
        }
        let reference = s
            .reference
            .as_ref()
            .ok_or_else(|| Error::msg("unpaired objectives need reference log-probs"))?;
        let idx = |k: usize| -> Result<Tensor> {
            Ok(Tensor::new(
                (0..b).map(|e| (s.offsets[e] + k) as u32).collect::<Vec<_>>(),
                s.policy.device(),
            )?)
        };
        let i0 = idx(0)?;
        let policy = s.policy.index_select(&i0, 0)?;
        let delta = (&policy - reference.index_select(&i0, 0)?)?;
        let labels: Vec<bool> = s
            .meta
            .iter()
            .map(|m| {
                m.label
                    .ok_or_else(|| Error::msg("an unpaired objective got an example without a label"))
            })
            .collect::<Result<_>>()?;
        let desirable = Tensor::new(
            labels.iter().map(|&l| if l { 1.0 } else { 0.0 }).collect::<Vec<f64>>(),
            s.policy.device(),
        )?
        .to_dtype(s.policy.dtype())?;
        let z0 = if needs_kl {
            let i1 = idx(1)?;
            let kl = (s.policy.index_select(&i1, 0)?.detach() - reference.index_select(&i1, 0)?)?;
            Some(mean(&kl)?.max(0.0))
        } else {
            None
        };
        Ok(UnpairedCtx {
            p,
            policy,
            delta,
            desirable,
            labels,
            z0,
        })
    }

    /// TRL's KTO metrics: rewards and log-probs of desirable ("chosen") and undesirable
    /// ("rejected") completions, and `kl` (z0).
    fn metrics(&self) -> Result<Vec<(String, f64)>> {
        let r: Vec<f64> = (self.delta.detach() * self.p.beta)?.to_dtype(DType::F64)?.to_vec1()?;
        let lp: Vec<f64> = self.policy.detach().to_dtype(DType::F64)?.to_vec1()?;
        let avg = |v: &[f64], want: bool| -> Option<f64> {
            let xs: Vec<f64> = v
                .iter()
                .zip(&self.labels)
                .filter(|(_, &l)| l == want)
                .map(|(x, _)| *x)
                .collect();
            (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
        };
        let mut m = vec![];
        if let Some(z) = self.z0 {
            m.push(("kl".to_string(), z));
        }
        let (rc, rr) = (avg(&r, true), avg(&r, false));
        for (k, v) in [
            ("rewards/chosen", rc),
            ("rewards/rejected", rr),
            ("logps/chosen", avg(&lp, true)),
            ("logps/rejected", avg(&lp, false)),
        ] {
            if let Some(v) = v {
                m.push((k.to_string(), v));
            }
        }
        if let (Some(c), Some(r)) = (rc, rr) {
            m.push(("rewards/margins".to_string(), c - r));
        }
        Ok(m)
    }

    /// `λ_D · d + λ_U · u` per example, d for desirable rows and u for undesirable ones.
    fn by_label(&self, d: Tensor, u: Tensor) -> Result<Tensor> {
        let und = (1.0 - &self.desirable)?;
        Ok(((d * &self.desirable)? * self.p.unpaired.desirable_weight)?
            .add(&((u * und)? * self.p.unpaired.undesirable_weight)?)?)
    }
}

/// KTO: desirable λ_D(1 − σ(β(Δ − z0))), undesirable λ_U(1 − σ(β(z0 − Δ))).
pub fn kto(c: &UnpairedCtx) -> Result<ObjectiveOutput> {
    let z0 = c.z0.ok_or_else(|| Error::msg("kto needs the KL reference point"))?;
    let b = c.p.beta;
    let d = (1.0 - sigmoid(&((&c.delta - z0)? * b)?)?)?;
    let u = (1.0 - sigmoid(&((&c.delta - z0)? * -b)?)?)?;
    Ok(ObjectiveOutput {
        losses: c.by_label(d, u)?,
        metrics: c.metrics()?,
    })
}

/// APO-zero (unpaired): desirable 1 − σ(βΔ), undesirable σ(βΔ).
pub fn apo_zero_unpaired(c: &UnpairedCtx) -> Result<ObjectiveOutput> {
    let s = sigmoid(&(&c.delta * c.p.beta)?)?;
    Ok(ObjectiveOutput {
        losses: c.by_label((1.0 - &s)?, s)?,
        metrics: c.metrics()?,
    })
}
