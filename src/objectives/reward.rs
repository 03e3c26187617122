//! Reward-model objectives: the statistics are a reward model's scalar rewards r (one per
//! response), not log-probs.

use super::{log_sigmoid, mean, Ctx};
use crate::error::Result;
use candle_core::{DType, Tensor};

/// Bradley-Terry: −log σ(r_w − r_l − m) + η·(r_w + r_l)², m = per-pair `margin` (0 if absent),
/// η = `center_rewards_coefficient` (TRL RewardTrainer; the centring term's batch mean is
/// η·mean((r_w + r_l)²)).
pub fn bradley_terry(c: &Ctx) -> Result<Tensor> {
    let (rw, rl) = (&c.s.policy_chosen, &c.s.policy_rejected);
    let dev = rw.device();
    let m = Tensor::new(c.s.margin.clone(), dev)?.to_dtype(rw.dtype())?;
    let mut loss = log_sigmoid(&((rw - rl)? - m)?)?.neg()?;
    if let Some(eta) = c.p.center_rewards_coefficient {
        loss = (loss + ((rw + rl)?.sqr()? * eta)?)?;
    }
    Ok(loss)
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
