//! The pairwise view of a batch's statistics, and the quantities pairwise objectives are
//! written in ([`Ctx`]: Δ, h, the f-divergence scores, lengths; notation of ALGORITHMS.md).

use super::{log_sigmoid, FDivergenceType, ObjectiveParams};
use crate::error::{Error, Result};
use crate::stats::SeqStats;
use candle_core::Tensor;

/// Sequence statistics of a batch of B preference pairs. Tensors are `[B]`.
#[derive(Clone, Debug)]
pub struct PairStats {
    /// Summed completion log-probs under the policy.
    pub policy_chosen: Tensor,
    pub policy_rejected: Tensor,
    /// Summed reference log-probs; `None` for reference-free objectives.
    pub ref_chosen: Option<Tensor>,
    pub ref_rejected: Option<Tensor>,
    /// Completion token counts (EOS included).
    pub chosen_tokens: Vec<usize>,
    pub rejected_tokens: Vec<usize>,
    /// `[B]` per-pair loss weights (WPO's ω_w·ω_l with `use_weighting`), no gradient.
    pub weights: Option<Tensor>,
    /// Per pair: probability that chosen is preferred (`preference_strength`; 1 when absent).
    pub strength: Vec<f64>,
    /// Per pair: (chosen_score, rejected_score), when the data has them.
    pub scores: Option<Vec<(f64, f64)>>,
    /// Per pair: the reward margin `margin` a reward model must exceed (0 when absent).
    pub margin: Vec<f64>,
    /// A Gaussian reward head's (chosen, rejected) log σ²; `policy_*` are then the means μ.
    pub log_variance: Option<(Tensor, Tensor)>,
}

impl PairStats {
    /// Pairs from summed log-probs given as numbers (evaluation, `prefer objectives eval`):
    /// (chosen, rejected) under the policy and, optionally, the reference, with completion
    /// token counts; f64 tensors, no labels beyond the pairs' order.
    pub fn from_f64(
        policy: &[(f64, f64)],
        reference: Option<&[(f64, f64)]>,
        lengths: &[(usize, usize)],
    ) -> Result<PairStats> {
        let dev = &candle_core::Device::Cpu;
        let col = |v: &[(f64, f64)], k: usize| -> Result<Tensor> {
            let x: Vec<f64> = v.iter().map(|p| if k == 0 { p.0 } else { p.1 }).collect();
            Ok(Tensor::new(x, dev)?)
        };
        let n = policy.len();
        Ok(PairStats {
            policy_chosen: col(policy, 0)?,
            policy_rejected: col(policy, 1)?,
            ref_chosen: reference.map(|r| col(r, 0)).transpose()?,
            ref_rejected: reference.map(|r| col(r, 1)).transpose()?,
            chosen_tokens: lengths.iter().map(|l| l.0).collect(),
            rejected_tokens: lengths.iter().map(|l| l.1).collect(),
            weights: None,
            strength: vec![1.0; n],
            scores: None,
            margin: vec![0.0; n],
            log_variance: None,
        })
    }

    /// The pairwise view of a batch: chosen = response 0, rejected = response 1 of each example.
    pub fn from_stats(stats: &SeqStats) -> Result<PairStats> {
        let s = stats;
        let b = s.offsets.len() - 1;
        let idx = |k: usize| -> Result<Tensor> {
            let v: Vec<u32> = (0..b).map(|e| (s.offsets[e] + k) as u32).collect();
            Ok(Tensor::new(v, s.policy.device())?)
        };
        for e in 0..b {
            if s.offsets[e + 1] - s.offsets[e] != 2 {
                return Err(Error::msg(
                    "a pairwise objective got an example without exactly two responses",
                ));
            }
        }
        let (c, r) = (idx(0)?, idx(1)?);
        let pick = |t: &Tensor, i: &Tensor| -> Result<Tensor> { Ok(t.index_select(i, 0)?) };
        Ok(PairStats {
            policy_chosen: pick(&s.policy, &c)?,
            policy_rejected: pick(&s.policy, &r)?,
            ref_chosen: s.reference.as_ref().map(|t| pick(t, &c)).transpose()?,
            ref_rejected: s.reference.as_ref().map(|t| pick(t, &r)).transpose()?,
            chosen_tokens: (0..b).map(|e| s.tokens[s.offsets[e]]).collect(),
            rejected_tokens: (0..b).map(|e| s.tokens[s.offsets[e] + 1]).collect(),
            weights: s.weights.clone(),
            strength: s.meta.iter().map(|m| m.strength.unwrap_or(1.0)).collect(),
            scores: s
                .meta
                .iter()
                .map(|m| m.scores.as_ref().map(|s| (s[0], s[1])))
                .collect::<Option<Vec<_>>>(),
            margin: s.meta.iter().map(|m| m.margin.unwrap_or(0.0)).collect(),
            log_variance: match &s.log_variance {
                None => None,
                Some(v) => Some((pick(v, &c)?, pick(v, &r)?)),
            },
        })
    }
}

/// The quantities objectives are written in (notation of ALGORITHMS.md).
pub struct Ctx<'a> {
    pub s: &'a PairStats,
    pub p: &'a ObjectiveParams,
}

impl Ctx<'_> {
    pub fn reference(&self) -> Result<(&Tensor, &Tensor)> {
        match (&self.s.ref_chosen, &self.s.ref_rejected) {
            (Some(c), Some(r)) => Ok((c, r)),
            _ => Err(Error::msg("this objective needs reference log-probs")),
        }
    }
    /// Δ_w = log π(y_w) − log π_ref(y_w), Δ_l likewise.
    pub fn deltas(&self) -> Result<(Tensor, Tensor)> {
        let (rc, rr) = self.reference()?;
        Ok(((&self.s.policy_chosen - rc)?, (&self.s.policy_rejected - rr)?))
    }
    /// h = Δ_w − Δ_l.
    pub fn h(&self) -> Result<Tensor> {
        let (w, l) = self.deltas()?;
        Ok((w - l)?)
    }
    /// Token counts |y_w|, |y_l| as tensors (clamped to ≥ 1).
    pub fn lengths(&self) -> Result<(Tensor, Tensor)> {
        let t = |v: &[usize]| -> Result<Tensor> {
            let x: Vec<f64> = v.iter().map(|&n| n.max(1) as f64).collect();
            Ok(Tensor::new(x, self.s.policy_chosen.device())?.to_dtype(self.s.policy_chosen.dtype())?)
        };
        Ok((t(&self.s.chosen_tokens)?, t(&self.s.rejected_tokens)?))
    }
    /// ℓ̄ = log π(y)/|y| for chosen and rejected.
    pub fn mean_logps(&self) -> Result<(Tensor, Tensor)> {
        let (nw, nl) = self.lengths()?;
        Ok(((&self.s.policy_chosen / nw)?, (&self.s.policy_rejected / nl)?))
    }
    /// Scores after TRL's f-divergence transform of Δ (`f_divergence_type`), f′(exp Δ) with
    /// its constant terms, exactly as TRL 1.16 writes them: they cancel in s_w − s_l but not
    /// once chosen and rejected are divided by different lengths (`ipo`, `sigmoid_norm`).
    /// forward KL: 1 − e^(−Δ); JS: log 2 + log σ(Δ); α: (e^((α−1)Δ) − 1)/(α − 1), the exponent
    /// clamped at 80.
    pub fn scores(&self) -> Result<(Tensor, Tensor)> {
        let (w, l) = self.deltas()?;
        let f = |d: Tensor| -> Result<Tensor> {
            Ok(match self.p.f_divergence_type {
                FDivergenceType::ForwardKl => (1.0 - d.neg()?.exp()?)?,
                FDivergenceType::JsDivergence => (log_sigmoid(&d)? + std::f64::consts::LN_2)?,
                FDivergenceType::AlphaDivergence if (self.p.f_alpha_divergence_coef - 1.0).abs() >= 1e-6 => {
                    let a = self.p.f_alpha_divergence_coef;
                    (((d * (a - 1.0))?.minimum(80.0)?.exp()? - 1.0)? / (a - 1.0))?
                }
                _ => d,
            })
        };
        Ok((f(w)?, f(l)?))
    }
    /// d = s_w − s_l.
    pub fn d(&self) -> Result<Tensor> {
        let (w, l) = self.scores()?;
        Ok((w - l)?)
    }
    /// d̄ = s_w/|y_w| − s_l/|y_l|.
    pub fn d_norm(&self) -> Result<Tensor> {
        let (w, l) = self.scores()?;
        let (nw, nl) = self.lengths()?;
        Ok(((w / nw)? - (l / nl)?)?)
    }
    /// Per-example terms whose batch mean is the token-mean NLL of the chosen completions over
    /// the whole batch (`Σ −log π(y_w) / Σ |y_w|`, as `nn.CrossEntropyLoss` over the batch).
    pub fn chosen_nll_batch_token_mean(&self) -> Result<Tensor> {
        let b = self.s.chosen_tokens.len() as f64;
        let total: usize = self.s.chosen_tokens.iter().sum();
        Ok((self.s.policy_chosen.neg()? * (b / total.max(1) as f64))?)
    }
}
