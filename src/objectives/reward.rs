//! Reward-model objectives: the statistics are a reward model's scalar rewards r (one per
//! response), not log-probs.

use super::{log_ndtr, log_sigmoid, mean, Ctx};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

settings! {
    /// Reward models (task = "reward"; TRL's RewardConfig names).
    pub struct RewardParams {
        /// Reward models: weight η of the centring term mean((r_w + r_l)²) (TRL).
        pub center_rewards_coefficient: Option<f64> = None,
    }
}

/// Bradley-Terry: −log σ(r_w − r_l − m) + η·(r_w + r_l)², m = per-pair `margin` (0 if absent),
/// η = `center_rewards_coefficient` (TRL RewardTrainer; the centring term's batch mean is
/// η·mean((r_w + r_l)²)).
pub fn bradley_terry(c: &Ctx) -> Result<Tensor> {
    let (rw, rl) = (&c.s.policy_chosen, &c.s.policy_rejected);
    let dev = rw.device();
    let m = Tensor::new(c.s.margin.clone(), dev)?.to_dtype(rw.dtype())?;
    let mut loss = log_sigmoid(&((rw - rl)? - m)?)?.neg()?;
    if let Some(eta) = c.p.reward.center_rewards_coefficient {
        loss = (loss + ((rw + rl)?.sqr()? * eta)?)?;
    }
    Ok(loss)
}

/// Gaussian reward head: −log Φ(z), z = (μ_w − μ_l − m)/√(σ_w² + σ_l²), with σ² = exp(log σ²)
/// from the head's second output; the probability that a reward drawn for y_w exceeds one
/// drawn for y_l (Thurstone). `center_rewards_coefficient` acts on the means as in
/// [`bradley_terry`].
pub fn gaussian(c: &Ctx) -> Result<Tensor> {
    let (rw, rl) = (&c.s.policy_chosen, &c.s.policy_rejected);
    let (vw, vl) = c.s.log_variance.as_ref().ok_or_else(|| {
        Error::Config("loss_type `gaussian` needs a Gaussian reward head (mean and log-variance outputs)".into())
    })?;
    let m = Tensor::new(c.s.margin.clone(), rw.device())?.to_dtype(rw.dtype())?;
    let scale = (vw.exp()? + vl.exp()?)?.sqrt()?;
    let z = (((rw - rl)? - m)? / scale)?;
    let mut loss = log_ndtr(&z)?.neg()?;
    if let Some(eta) = c.p.reward.center_rewards_coefficient {
        loss = (loss + ((rw + rl)?.sqr()? * eta)?)?;
    }
    Ok(loss)
}

/// The Gaussian head's own metrics: `mean_sigma` (mean σ over responses) and
/// `mean_probability` (mean Φ(z), the model's probability that chosen is preferred).
pub fn gaussian_metrics(c: &Ctx) -> Result<Vec<(String, f64)>> {
    let Some((vw, vl)) = &c.s.log_variance else {
        return Ok(vec![]);
    };
    let host = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.detach().to_dtype(DType::F64)?.to_vec1()?) };
    let (mw, ml, vw, vl) = (
        host(&c.s.policy_chosen)?,
        host(&c.s.policy_rejected)?,
        host(vw)?,
        host(vl)?,
    );
    let n = mw.len().max(1) as f64;
    let sigma = vw.iter().chain(&vl).map(|v| (0.5 * v).exp()).sum::<f64>() / (2.0 * n);
    let p = (0..mw.len())
        .map(|i| crate::util::gaussian_preference_probability(mw[i], vw[i], ml[i], vl[i]))
        .sum::<f64>()
        / n;
    Ok(vec![("mean_sigma".into(), sigma), ("mean_probability".into(), p)])
}

/// TRL RewardTrainer's metrics: `accuracy`, `margin`, `mean_reward`, `min_reward`, `max_reward`.
pub fn metrics(c: &Ctx) -> Result<Vec<(String, f64)>> {
    let rw: Vec<f64> = c.s.policy_chosen.detach().to_dtype(DType::F64)?.to_vec1()?;
    let rl: Vec<f64> = c.s.policy_rejected.detach().to_dtype(DType::F64)?.to_vec1()?;
    let all: Vec<f64> = rw.iter().chain(&rl).copied().collect();
    let acc = rw.iter().zip(&rl).filter(|(a, b)| a > b).count() as f64 / rw.len().max(1) as f64;
    Ok(vec![
        ("accuracy".into(), acc),
        ("margin".into(), mean(&(&c.s.policy_chosen - &c.s.policy_rejected)?)?),
        ("mean_reward".into(), all.iter().sum::<f64>() / all.len().max(1) as f64),
        ("min_reward".into(), all.iter().cloned().fold(f64::INFINITY, f64::min)),
        (
            "max_reward".into(),
            all.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        ),
    ])
}
