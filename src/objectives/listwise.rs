//! Listwise objectives over ranked responses (best first, with graded labels ψ).

use super::{log_sigmoid, ObjectiveOutput, ObjectiveParams};
use crate::error::{Error, Result};
use crate::model::kernels::primitive::logsumexp_last;
use crate::stats::SeqStats;
use candle_core::{DType, Tensor};

settings! {
    /// Objectives, ranked lists (pro).
    pub struct ListwiseParams {
        /// Weight of PRO's SFT term on the best response.
        pub pro_sft_weight: f64 = 1.0,
    }
}

/// A ranked batch: per response log-probs and token counts, per example its labels.
pub struct ListCtx<'a> {
    pub s: &'a SeqStats,
    pub p: &'a ObjectiveParams,
    /// ψ per example, best first (higher = better).
    pub labels: Vec<Vec<f64>>,
    /// Whether the labels came from a reward model's `scores` (not from ranks).
    pub scored: Vec<bool>,
}

impl<'a> ListCtx<'a> {
    pub fn new(s: &'a SeqStats, p: &'a ObjectiveParams) -> Result<Self> {
        let labels = s
            .meta
            .iter()
            .map(|m| {
                m.scores
                    .clone()
                    .ok_or_else(|| Error::msg("a listwise objective got an example without ranks or scores"))
            })
            .collect::<Result<Vec<_>>>()?;
        let scored = s.meta.iter().map(|m| !m.scores_from_ranks).collect();
        Ok(ListCtx { s, p, labels, scored })
    }

    fn responses(&self, e: usize) -> std::ops::Range<usize> {
        self.s.offsets[e]..self.s.offsets[e + 1]
    }

    /// Metrics from implicit rewards `r` (one per response): best vs worst response, and the
    /// fraction of correctly ordered pairs as `rewards/accuracies`.
    fn metrics(&self, r: &Tensor) -> Result<Vec<(String, f64)>> {
        let r: Vec<f64> = r.detach().to_dtype(DType::F64)?.to_vec1()?;
        let lp: Vec<f64> = self.s.policy.detach().to_dtype(DType::F64)?.to_vec1()?;
        let b = self.labels.len() as f64;
        let (mut best, mut worst, mut lbest, mut lworst, mut right, mut pairs) = (0.0, 0.0, 0.0, 0.0, 0usize, 0usize);
        for (e, psi) in self.labels.iter().enumerate() {
            let rs = self.responses(e);
            best += r[rs.start];
            worst += r[rs.end - 1];
            lbest += lp[rs.start];
            lworst += lp[rs.end - 1];
            for i in 0..psi.len() {
                for j in 0..psi.len() {
                    if psi[i] > psi[j] {
                        pairs += 1;
                        right += (r[rs.start + i] > r[rs.start + j]) as usize;
                    }
                }
            }
        }
        Ok(vec![
            ("rewards/chosen".into(), best / b),
            ("rewards/rejected".into(), worst / b),
            ("rewards/margins".into(), (best - worst) / b),
            ("rewards/accuracies".into(), right as f64 / pairs.max(1) as f64),
            ("logps/chosen".into(), lbest / b),
            ("logps/rejected".into(), lworst / b),
        ])
    }
}

/// LiPO-λ: Σ_{ψ_i > ψ_j} Δ_ij · −log σ(s_i − s_j), s = β(log π − log π_ref),
/// Δ_ij = |G_i − G_j| · |1/D(τ_i) − 1/D(τ_j)|, G = 2^ψ − 1, D(τ) = log(1 + τ), τ the rank of s
/// (1 = highest; weights carry no gradient).
pub fn lipo(c: &ListCtx) -> Result<ObjectiveOutput> {
    let reference =
        c.s.reference
            .as_ref()
            .ok_or_else(|| Error::msg("lipo needs reference log-probs"))?;
    let s = ((&c.s.policy - reference)? * c.p.beta)?;
    let sv: Vec<f64> = s.detach().to_dtype(DType::F64)?.to_vec1()?;
    let (mut ii, mut jj, mut ww, mut offsets) = (vec![], vec![], vec![], vec![0usize]);
    for (e, psi) in c.labels.iter().enumerate() {
        let rs = c.responses(e);
        let k = psi.len();
        // τ: 1-based rank by current s, descending
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|&a, &b| sv[rs.start + b].total_cmp(&sv[rs.start + a]));
        let mut tau = vec![0usize; k];
        for (pos, &i) in order.iter().enumerate() {
            tau[i] = pos + 1;
        }
        let gain = |x: f64| 2f64.powf(x) - 1.0;
        let disc = |t: usize| 1.0 / (1.0 + t as f64).ln();
        for i in 0..k {
            for j in 0..k {
                if psi[i] > psi[j] {
                    ii.push((rs.start + i) as u32);
                    jj.push((rs.start + j) as u32);
                    ww.push((gain(psi[i]) - gain(psi[j])).abs() * (disc(tau[i]) - disc(tau[j])).abs());
                }
            }
        }
        offsets.push(ii.len());
    }
    let dev = s.device();
    let losses = if ii.is_empty() {
        (s.narrow(0, 0, c.labels.len())? * 0.0)?
    } else {
        let diff = (s.index_select(&Tensor::new(ii, dev)?, 0)? - s.index_select(&Tensor::new(jj, dev)?, 0)?)?;
        let w = Tensor::new(ww, dev)?.to_dtype(s.dtype())?;
        let per_pair = (log_sigmoid(&diff)?.neg()? * w)?;
        crate::model::logprobs::segment_sums(&per_pair, &offsets)?
    };
    Ok(ObjectiveOutput {
        losses,
        metrics: c.metrics(&s)?,
    })
}

/// PRO: Plackett-Luce over the ranking on r = ℓ̄ (mean token log-prob), taking out the top
/// response each round, plus `pro_sft_weight` · NLL of the best response. With reward-model
/// `scores`, round k scales r_i by (ψ_k − ψ_i) (i > k) and r_k by the largest of those
/// (dynamic temperature); with ranks alone the temperature is 1.
pub fn pro(c: &ListCtx) -> Result<ObjectiveOutput> {
    let n = Tensor::new(
        c.s.tokens.iter().map(|&t| t.max(1) as f64).collect::<Vec<_>>(),
        c.s.policy.device(),
    )?
    .to_dtype(c.s.policy.dtype())?;
    let r = (&c.s.policy / n)?;
    let mut per_example = Vec::with_capacity(c.labels.len());
    for (e, psi) in c.labels.iter().enumerate() {
        let rs = c.responses(e);
        let k = psi.len();
        let re = r.narrow(0, rs.start, k)?;
        let mut loss = (re.narrow(0, 0, 1)?.neg()? * c.p.listwise.pro_sft_weight)?; // SFT on the best
        for top in 0..k - 1 {
            let mut f: Vec<f64> = vec![1.0; k - top];
            if c.scored[e] {
                let diffs: Vec<f64> = (top + 1..k).map(|i| psi[top] - psi[i]).collect();
                let mx = diffs.iter().cloned().fold(0.0, f64::max);
                if mx > 0.0 {
                    f[0] = mx;
                    f[1..].copy_from_slice(&diffs);
                }
            }
            let x = (re.narrow(0, top, k - top)? * Tensor::new(f, re.device())?.to_dtype(re.dtype())?)?;
            let lse = logsumexp_last(&x.unsqueeze(0)?)?.squeeze(0)?;
            loss = (loss + (lse - x.narrow(0, 0, 1)?)?)?;
        }
        per_example.push(loss);
    }
    let losses = Tensor::cat(&per_example, 0)?;
    Ok(ObjectiveOutput {
        losses,
        metrics: c.metrics(&(r * c.p.beta)?)?,
    })
}
