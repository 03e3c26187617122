//! The DPO family with TRL's current semantics (trl `DPOTrainer._compute_loss`, see
//! ALGORITHMS.md §0), plus the legacy/paper forms under their own names (`cdpo`, `ipo_sum`).
//! Notation: Δ = log π − log π_ref; s = f-divergence transform of Δ; d = s_w − s_l;
//! d̄ = s_w/|y_w| − s_l/|y_l|; h = Δ_w − Δ_l; ε = `label_smoothing`.

use super::{log_sigmoid, sigmoid as sig, Ctx};
use crate::error::Result;
use candle_core::{DType, Tensor};

settings! {
    /// Objectives, DPO family: the extra hyperparameters of discopop and dpop.
    pub struct DpoParams {
        /// τ of the discopop loss.
        pub discopop_tau: f64 = 0.05,
        /// λ of dpop: the weight of the penalty on the chosen completion's log-ratio falling
        /// below 0 (the paper uses 50).
        pub dpop_lambda: f64 = 50.0,
    }
}

/// −log σ(βd). (TRL ≥0.29 ignores ε here; `cdpo` is the smoothed form.)
pub fn sigmoid(c: &Ctx) -> Result<Tensor> {
    Ok(log_sigmoid(&(c.d()? * c.p.beta)?)?.neg()?)
}

/// DPO-Positive: −log σ(β(h − λ·max(0, −Δ_w))): DPO with a penalty, inside the sigmoid,
/// wherever the policy makes the chosen completion less likely than the reference does.
pub fn dpop(c: &Ctx) -> Result<Tensor> {
    let (dw, _) = c.deltas()?;
    let penalty = (dw.neg()?.relu()? * c.p.dpo.dpop_lambda)?;
    Ok(log_sigmoid(&((c.h()? - penalty)? * c.p.beta)?)?.neg()?)
}

/// max(0, 1 − βd).
pub fn hinge(c: &Ctx) -> Result<Tensor> {
    Ok((1.0 - (c.d()? * c.p.beta)?)?.relu()?)
}

/// (d̄ − 1/(2β))², β playing IPO's τ.
pub fn ipo(c: &Ctx) -> Result<Tensor> {
    Ok((c.d_norm()? - 1.0 / (2.0 * c.p.beta))?.sqr()?)
}

/// σ(βd)[log σ(βd) − log(1−ε)] + σ(−βd)[log σ(−βd) − log ε], ε defaulting to 1e-3.
pub fn exo_pair(c: &Ctx) -> Result<Tensor> {
    let eps = if c.p.label_smoothing > 0.0 {
        c.p.label_smoothing
    } else {
        1e-3
    };
    let z = (c.d()? * c.p.beta)?;
    let pos = (sig(&z)? * (log_sigmoid(&z)? - (1.0 - eps).ln())?)?;
    let nz = z.neg()?;
    let neg = (sig(&nz)? * (log_sigmoid(&nz)? - eps.ln())?)?;
    Ok((pos + neg)?)
}

/// −log σ(βs_w) − ½ log σ(−βs_w) − ½ log σ(−βs_l).
pub fn nca_pair(c: &Ctx) -> Result<Tensor> {
    let (w, l) = c.scores()?;
    let (w, l) = ((w * c.p.beta)?, (l * c.p.beta)?);
    let a = log_sigmoid(&w)?.neg()?;
    let b = (log_sigmoid(&w.neg()?)? * 0.5)?;
    let d = (log_sigmoid(&l.neg()?)? * 0.5)?;
    Ok(((a - b)? - d)?)
}

/// [−(1−ε) log σ(βd) + ε log σ(−βd)] / (1−2ε): unbiased under label-flip rate ε.
pub fn robust(c: &Ctx) -> Result<Tensor> {
    let eps = c.p.label_smoothing;
    let z = (c.d()? * c.p.beta)?;
    let l = ((log_sigmoid(&z)? * -(1.0 - eps))? + (log_sigmoid(&z.neg()?)? * eps)?)?;
    Ok((l / (1.0 - 2.0 * eps))?)
}

/// −log σ(βs_w) − log σ(−βs_l).
pub fn bco_pair(c: &Ctx) -> Result<Tensor> {
    let (w, l) = c.scores()?;
    let a = log_sigmoid(&(w * c.p.beta)?)?;
    let b = log_sigmoid(&(l * -c.p.beta)?)?;
    Ok((a + b)?.neg()?)
}

/// (s_w − 1/(2β))² + (s_l + 1/(2β))².
pub fn sppo_hard(c: &Ctx) -> Result<Tensor> {
    let (w, l) = c.scores()?;
    let half = 1.0 / (2.0 * c.p.beta);
    Ok(((w - half)?.sqr()? + (l + half)?.sqr()?)?)
}

/// Sort a `[B]` tensor ascending along the batch (differentiable: a gather).
pub fn sort_batch(x: &Tensor) -> Result<Tensor> {
    let v: Vec<f64> = x.detach().to_dtype(DType::F64)?.to_vec1()?;
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    idx.sort_by(|&a, &b| v[a as usize].total_cmp(&v[b as usize]));
    Ok(x.index_select(&Tensor::new(idx, x.device())?, 0)?)
}

fn smoothed_sigmoid(u: &Tensor, c: &Ctx) -> Result<Tensor> {
    let eps = c.p.label_smoothing;
    let z = (u * c.p.beta)?;
    Ok(((log_sigmoid(&z)? * -(1.0 - eps))? - (log_sigmoid(&z.neg()?)? * eps)?)?)
}

/// AOT: u = sort_B(log π_w − log π_l) − sort_B(log π_ref,w − log π_ref,l); −(1−ε) log σ(βu) − ε log σ(−βu).
pub fn aot(c: &Ctx) -> Result<Tensor> {
    let (rc, rr) = c.reference()?;
    let a = sort_batch(&(&c.s.policy_chosen - &c.s.policy_rejected)?)?;
    let b = sort_batch(&(rc - rr)?)?;
    smoothed_sigmoid(&(a - b)?, c)
}

/// AOT unpaired: u = sort_B(Δ_w) − sort_B(Δ_l).
pub fn aot_unpaired(c: &Ctx) -> Result<Tensor> {
    let (w, l) = c.deltas()?;
    smoothed_sigmoid(&(sort_batch(&w)? - sort_batch(&l)?)?, c)
}

/// (1 − σ(βΔ_w)) + σ(βΔ_l).
pub fn apo_zero(c: &Ctx) -> Result<Tensor> {
    let (w, l) = c.deltas()?;
    Ok(((1.0 - sig(&(w * c.p.beta)?)?)? + sig(&(l * c.p.beta)?)?)?)
}

/// σ(βΔ_w) + (1 − σ(βd)).
pub fn apo_down(c: &Ctx) -> Result<Tensor> {
    let (w, _) = c.deltas()?;
    Ok((sig(&(w * c.p.beta)?)? + (1.0 - sig(&(c.d()? * c.p.beta)?)?)?)?)
}

/// z = βd, m = σ(z/τ): (1−m)(−log σ(z)) + m e^{−z}, τ = `discopop_tau`.
pub fn discopop(c: &Ctx) -> Result<Tensor> {
    let z = (c.d()? * c.p.beta)?;
    let m = sig(&(&z / c.p.dpo.discopop_tau)?)?;
    let logistic = log_sigmoid(&z)?.neg()?;
    let exp = z.neg()?.exp()?;
    Ok((((1.0 - &m)? * logistic)? + (m * exp)?)?)
}

/// Token-mean cross-entropy of the chosen completions over the batch (broadcast per row).
pub fn sft(c: &Ctx) -> Result<Tensor> {
    c.chosen_nll_batch_token_mean()
}

/// −log σ(βd̄).
pub fn sigmoid_norm(c: &Ctx) -> Result<Tensor> {
    Ok(log_sigmoid(&(c.d_norm()? * c.p.beta)?)?.neg()?)
}

/// Conservative DPO: −(1−ε) log σ(βh) − ε log σ(−βh), on reverse-KL log-ratios.
pub fn cdpo(c: &Ctx) -> Result<Tensor> {
    smoothed_sigmoid(&c.h()?, c)
}

/// IPO on summed log-ratios (OpenRLHF): (h − 1/(2β))².
pub fn ipo_sum(c: &Ctx) -> Result<Tensor> {
    Ok((c.h()? - 1.0 / (2.0 * c.p.beta))?.sqr()?)
}
