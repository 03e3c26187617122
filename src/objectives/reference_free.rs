//! Reference-free objectives (no reference model is loaded or run): SimPO, CPO, AlphaPO,
//! ORPO, with TRL's CPOTrainer / ORPOTrainer arithmetic.

use super::{log_sigmoid, mean, Ctx};
use crate::error::Result;
use candle_core::Tensor;

settings! {
    /// Objectives, reference-free (simpo, cpo, alphapo, mapo, slic; TRL's CPOConfig names).
    pub struct ReferenceFreeParams {
        /// Target reward margin γ of simpo and alphapo.
        pub simpo_gamma: f64 = 0.5,
        /// Weight of the NLL term of cpo.
        pub cpo_alpha: f64 = 1.0,
        /// AlphaPO reward-shape α (0 = SimPO's log reward). With task = "xpo": XPO's weight of
        /// log π(y_ref) (TRL's XPOConfig alpha, default 1e-5 there).
        pub alpha: f64 = 0.0,
        /// MaPO's k in φ(ℓ) = kℓ/(e^{kℓ} − 1).
        pub mapo_k: f64 = 0.5,
        /// MaPO's scale T of the margin.
        pub mapo_t: f64 = 1000.0,
        /// SLiC's margin δ.
        pub slic_delta: f64 = 1.0,
        /// SLiC's weight λ of the NLL term.
        pub slic_lambda: f64 = 0.1,
    }
}

fn smoothed(x: &Tensor, c: &Ctx) -> Result<Tensor> {
    let eps = c.p.label_smoothing;
    let z = (x * c.p.beta)?;
    Ok(((log_sigmoid(&z)? * -(1.0 - eps))? - (log_sigmoid(&z.neg()?)? * eps)?)?)
}

/// SimPO: −log σ(β(ℓ̄_w − ℓ̄_l − γ/β)), with ε smoothing as TRL; γ = `simpo_gamma`.
pub fn simpo(c: &Ctx) -> Result<Tensor> {
    let (w, l) = c.mean_logps()?;
    smoothed(&((w - l)? - c.p.reference_free.simpo_gamma / c.p.beta)?, c)
}

/// AlphaPO: SimPO with the reward r = (1 − p^{−α})/α, p = exp(ℓ̄) (α = 0: r = ℓ̄).
pub fn alphapo(c: &Ctx) -> Result<Tensor> {
    let (w, l) = c.mean_logps()?;
    let a = c.p.reference_free.alpha;
    let r = |x: Tensor| -> Result<Tensor> {
        if a == 0.0 {
            Ok(x)
        } else {
            Ok(((1.0 - (x * -a)?.exp()?)? / a)?)
        }
    };
    smoothed(&((r(w)? - r(l)?)? - c.p.reference_free.simpo_gamma / c.p.beta)?, c)
}

/// CPO: −log σ(β(log π_w − log π_l)) (ε-smoothed) + `cpo_alpha` · NLL(y_w) (batch token mean).
pub fn cpo(c: &Ctx) -> Result<Tensor> {
    let pref = smoothed(&(&c.s.policy_chosen - &c.s.policy_rejected)?, c)?;
    Ok((pref + (c.chosen_nll_batch_token_mean()? * c.p.reference_free.cpo_alpha)?)?)
}

/// log odds(y) = ℓ̄ − log(1 − e^ℓ̄), for chosen minus rejected.
fn log_odds_diff(c: &Ctx) -> Result<Tensor> {
    let (w, l) = c.mean_logps()?;
    let lo = |x: Tensor| -> Result<Tensor> { Ok((&x - (1.0 - x.exp()?)?.log()?)?) };
    Ok((lo(w)? - lo(l)?)?)
}

/// ORPO: NLL(y_w) − λ log σ(log odds(y_w) − log odds(y_l)), λ = `beta`.
pub fn orpo(c: &Ctx) -> Result<Tensor> {
    let ratio = log_sigmoid(&log_odds_diff(c)?)?;
    Ok((c.chosen_nll_batch_token_mean()? - (ratio * c.p.beta)?)?)
}

/// ORPO's metrics: `nll_loss`, `log_odds_ratio` (mean log σ(·)), `log_odds_chosen`.
pub fn orpo_metrics(c: &Ctx) -> Result<Vec<(String, f64)>> {
    let lo = log_odds_diff(c)?;
    Ok(vec![
        ("nll_loss".into(), mean(&c.chosen_nll_batch_token_mean()?)?),
        ("log_odds_ratio".into(), mean(&log_sigmoid(&lo)?)?),
        ("log_odds_chosen".into(), mean(&lo)?),
    ])
}

/// MaPO for language models: ℓ = mean token NLL; φ(ℓ) = kℓ/(e^{kℓ} − 1);
/// L = ℓ_w − β log σ(T(φ(ℓ_w) − φ(ℓ_l))), k = `mapo_k`, T = `mapo_t` (official diffusion code:
/// k = 0.5, T = 1000).
pub fn mapo(c: &Ctx) -> Result<Tensor> {
    let (w, l) = c.mean_logps()?;
    let (nw, nl) = (w.neg()?, l.neg()?);
    let k = c.p.reference_free.mapo_k;
    let phi = |x: &Tensor| -> Result<Tensor> { Ok(((x * k)? / ((x * k)?.exp()? - 1.0)?)?) };
    let margin = ((phi(&nw)? - phi(&nl)?)? * c.p.reference_free.mapo_t)?;
    Ok((nw - (log_sigmoid(&margin)? * c.p.beta)?)?)
}

/// SLiC-HF: max(0, δ − log π(y_w) + log π(y_l)) − λ log π(y_w), the chosen completion standing
/// in for the SFT target; δ = `slic_delta`, λ = `slic_lambda`.
pub fn slic(c: &Ctx) -> Result<Tensor> {
    let margin = (&c.s.policy_chosen - &c.s.policy_rejected)?;
    let hinge = (c.p.reference_free.slic_delta - margin)?.relu()?;
    Ok((hinge - (&c.s.policy_chosen * c.p.reference_free.slic_lambda)?)?)
}
