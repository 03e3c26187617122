//! The losses of the GRPO family, apart from the rollout that feeds them: group-relative
//! advantages ([`advantages`]) and RLOO's leave-one-out ones ([`rloo_advantages`]), the
//! clipped surrogate with TRL's normalisations and variants ([`grpo_loss`]), and RLOO's
//! sequence-level loss ([`rloo_loss`]). Each is a plain function of tensors and slices, tested
//! by hand below.

use crate::config::grpo::{GrpoLoss, ImportanceSamplingLevel, ScaleRewards};
use crate::error::Result;
use candle_core::{DType, Tensor};

/// Group-relative advantages of `rewards` (groups of `g` consecutive completions; `NaN` marks
/// a completion every reward skipped, whose advantage is 0): `r − mean(group)`, divided by the
/// group's (or the whole batch's) unbiased standard deviation + 1e-4 unless `scale` is `none`.
/// Returns the advantages and each group's standard deviation.
pub fn advantages(rewards: &[f64], g: usize, scale: ScaleRewards) -> (Vec<f64>, Vec<f64>) {
    let std = |xs: &[f64]| -> f64 {
        let v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.len() < 2 {
            return 0.0;
        }
        let m = v.iter().sum::<f64>() / v.len() as f64;
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
    };
    let mean = |xs: &[f64]| -> f64 {
        let v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let batch_std = std(rewards);
    let mut adv = Vec::with_capacity(rewards.len());
    let mut stds = Vec::new();
    for grp in rewards.chunks(g) {
        let (m, s) = (mean(grp), std(grp));
        stds.push(s);
        let denom = match scale {
            ScaleRewards::Group => s + 1e-4,
            ScaleRewards::Batch => batch_std + 1e-4,
            ScaleRewards::None => 1.0,
        };
        adv.extend(grp.iter().map(|&r| if r.is_nan() { 0.0 } else { (r - m) / denom }));
    }
    (adv, stds)
}

/// RLOO's advantages (TRL 1.16): `r − mean of the group's other scorable rewards`, `NaN`
/// rewards (unscorable) excluded from baselines; optionally standardised over the batch
/// (Bessel-corrected); unscorable completions and groups with one scorable completion get 0.
pub fn rloo_advantages(rewards: &[f64], g: usize, normalize: bool) -> Vec<f64> {
    let mut adv = Vec::with_capacity(rewards.len());
    for grp in rewards.chunks(g) {
        let scorable = grp.iter().filter(|x| !x.is_nan()).count() as f64;
        let sum: f64 = grp.iter().filter(|x| !x.is_nan()).sum();
        adv.extend(grp.iter().map(|&r| r - (sum - r) / (scorable - 1.0)));
    }
    if normalize {
        let v: Vec<f64> = adv.iter().copied().filter(|x| x.is_finite()).collect();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        for a in adv.iter_mut() {
            *a = (*a - mean) / (std + 1e-4);
        }
    }
    adv.into_iter().map(|a| if a.is_finite() { a } else { 0.0 }).collect()
}

/// RLOO's loss of a micro-batch (TRL 1.16 `RLOOTrainer._compute_loss`): per sequence, with
/// ρ = exp(Σ log π − Σ log π_old), −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A); the mean over sequences.
pub fn rloo_loss(
    token_logps: &Tensor,
    old: &Tensor,
    offsets: &[usize],
    advantages: &[f64],
    epsilon_low: f64,
    epsilon_high: f64,
) -> Result<(Tensor, Vec<(String, f64)>)> {
    let seg = |x: &Tensor| crate::model::logprobs::segment_sums(x, offsets);
    let coef = (seg(token_logps)? - seg(old)?)?.exp()?;
    let a = Tensor::new(advantages, token_logps.device())?.to_dtype(token_logps.dtype())?;
    let clipped = coef.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)?;
    let loss = (&coef * &a)?.minimum(&(&clipped * &a)?)?.neg()?.mean_all()?;
    let c: Vec<f64> = coef.detach().to_dtype(DType::F64)?.to_vec1()?;
    let frac = |f: &dyn Fn(f64, f64) -> bool| {
        c.iter().zip(advantages).filter(|(c, a)| f(**c, **a)).count() as f64 / c.len().max(1) as f64
    };
    let low = frac(&|c, a| c < 1.0 - epsilon_low && a < 0.0);
    let high = frac(&|c, a| c > 1.0 + epsilon_high && a > 0.0);
    let region = frac(&|c, a| (c < 1.0 - epsilon_low && a < 0.0) || (c > 1.0 + epsilon_high && a > 0.0));
    Ok((
        loss,
        vec![
            ("clip_ratio/low_mean".into(), low),
            ("clip_ratio/high_mean".into(), high),
            ("clip_ratio/region_mean".into(), region),
        ],
    ))
}

/// What the loss needs besides the log-probs.
#[derive(Clone, Copy, Debug)]
pub struct LossSpec {
    pub loss: GrpoLoss,
    pub level: ImportanceSamplingLevel,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// Cap on the unclipped ratio (two-sided clipping).
    pub delta: Option<f64>,
    pub sapo_temperature_pos: f64,
    pub sapo_temperature_neg: f64,
    /// vespo's Gamma weights: (k, λ) for A ≥ 0 and for A < 0.
    pub vespo_pos: (f64, f64),
    pub vespo_neg: (f64, f64),
    pub beta: f64,
    pub max_completion_length: usize,
    /// Micro-batches per step (TRL divides every loss but `dapo`'s and `cispo`'s by it; the
    /// core does).
    pub accumulation: usize,
    /// Completion tokens of the whole step that count (`dapo`'s, `cispo`'s and `vespo`'s
    /// normaliser; TRL's generation tokens × accumulation / steps_per_generation).
    pub step_tokens: f64,
}

/// Which tokens a micro-batch's loss counts.
#[derive(Clone, Debug, Default)]
pub struct TokenMask {
    /// Per completion (`mask_truncated_completions`: a completion cut at
    /// `max_completion_length` counts for nothing, in the loss and its normalisers).
    pub keep: Option<Vec<bool>>,
    /// Per token (`top_entropy_quantile`): the policy term acts only on these tokens; the KL
    /// term and the normalisers still count every kept token, as in TRL.
    pub entropy: Option<Vec<bool>>,
}

/// TRL's `top_entropy_quantile` mask: the tokens (among `counted`) whose entropy is at least the
/// `1 − q` quantile of the counted tokens' entropies (torch.quantile's linear interpolation).
pub fn high_entropy_mask(entropies: &[f64], counted: &[bool], q: f64) -> Vec<bool> {
    let mut v: Vec<f64> = entropies
        .iter()
        .zip(counted)
        .filter(|(_, &c)| c)
        .map(|(e, _)| *e)
        .collect();
    if v.is_empty() {
        return vec![false; entropies.len()];
    }
    v.sort_by(f64::total_cmp);
    let pos = (1.0 - q).clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let threshold = v[lo] + (v[hi] - v[lo]) * (pos - lo as f64);
    entropies
        .iter()
        .zip(counted)
        .map(|(&e, &c)| c && e >= threshold)
        .collect()
}

/// The GRPO loss of a micro-batch as TRL 1.16 computes it (`GRPOTrainer._compute_loss`), times
/// `accumulation` for `dapo` and `cispo` (the core divides every micro-batch's loss by it).
/// With ρ = exp(log π − log π_old) per token, or per sequence as the exp of its mean log-ratio
/// (GSPO), A the completion's advantage, per token:
/// - `grpo`, `bnpo`, `dr_grpo`, `dapo`: −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A), ρ capped at `delta`;
/// - `cispo`: −stop(min(ρ, ε_high))·A·log π;
/// - `sapo`: −σ(τ(ρ − 1))·4/τ·A, τ by the sign of A;
///
/// plus β·(e^{ref − log π} − (ref − log π) − 1), then normalised by `loss`. `token_logps` `[N]`
/// holds the completions' tokens one after another (`offsets`), `old` the sampling log-probs.
pub fn grpo_loss(
    token_logps: &Tensor,
    old: &Tensor,
    offsets: &[usize],
    advantages: &[f64],
    reference: Option<&Tensor>,
    spec: &LossSpec,
) -> Result<(Tensor, Vec<(String, f64)>)> {
    grpo_loss_masked(
        token_logps,
        old,
        offsets,
        advantages,
        reference,
        spec,
        &TokenMask::default(),
    )
}

/// [`grpo_loss`] counting only the tokens of `mask`.
pub fn grpo_loss_masked(
    token_logps: &Tensor,
    old: &Tensor,
    offsets: &[usize],
    advantages: &[f64],
    reference: Option<&Tensor>,
    spec: &LossSpec,
    mask: &TokenMask,
) -> Result<(Tensor, Vec<(String, f64)>)> {
    let n = token_logps.dim(0)?;
    let dev = token_logps.device();
    let dt = token_logps.dtype();
    let per_token = |per_seq: &[f64]| -> Vec<f64> {
        let mut v = Vec::with_capacity(n);
        for (k, w) in offsets.windows(2).enumerate() {
            v.extend(std::iter::repeat_n(per_seq[k], w[1] - w[0]));
        }
        v
    };
    let a_host = per_token(advantages);
    let a = Tensor::new(a_host.as_slice(), dev)?.to_dtype(dt)?;
    let keep_seq: Vec<f64> = match &mask.keep {
        Some(k) => k.iter().map(|&x| x as u8 as f64).collect(),
        None => vec![1.0; offsets.len() - 1],
    };
    let m_host = per_token(&keep_seq);
    let m = Tensor::new(m_host.as_slice(), dev)?.to_dtype(dt)?;
    let log_ratio = (token_logps - old)?;
    // each sequence's counted tokens (at least 1, as TRL's clamp)
    let lens: Vec<f64> = offsets
        .windows(2)
        .zip(&keep_seq)
        .map(|(w, k)| ((w[1] - w[0]) as f64 * k).max(1.0))
        .collect();
    let seq_mean = |x: &Tensor| -> Result<Tensor> {
        let sums = crate::model::logprobs::segment_sums(x, offsets)?;
        Ok((sums / Tensor::new(lens.as_slice(), dev)?.to_dtype(dt)?)?)
    };
    let log_iw = match spec.level {
        ImportanceSamplingLevel::Token => log_ratio.clone(),
        ImportanceSamplingLevel::Sequence => {
            // each sequence's mean log-ratio, on each of its tokens
            let owner: Vec<u32> = offsets
                .windows(2)
                .enumerate()
                .flat_map(|(k, w)| std::iter::repeat_n(k as u32, w[1] - w[0]))
                .collect();
            seq_mean(&(&log_ratio * &m)?)?.index_select(&Tensor::new(owner, dev)?, 0)?
        }
    };
    let coef = log_iw.exp()?;
    let mut metrics = Vec::new();
    let counted = m_host.iter().filter(|&&x| x > 0.0).count().max(1) as f64;
    // TRL's statistics of a per-token flag: at token level the mean over counted tokens, at
    // sequence level (one ratio per completion) the mean over completions, masked or not
    let mask_mean = |v: Vec<bool>| match spec.level {
        ImportanceSamplingLevel::Token => {
            v.iter().zip(&m_host).filter(|(&x, &k)| x && k > 0.0).count() as f64 / counted
        }
        ImportanceSamplingLevel::Sequence => {
            let s = offsets.windows(2).filter(|w| w[1] > w[0] && v[w[0]]).count();
            s as f64 / (offsets.len() - 1).max(1) as f64
        }
    };
    // and per completion (TRL's `masked_seq_mean`): the flag's mean over its counted tokens,
    // NaN for a completion with none (skipped by the min and max), or its one value
    let per_seq = |v: &[bool]| -> Vec<f64> {
        offsets
            .windows(2)
            .map(|w| match spec.level {
                ImportanceSamplingLevel::Sequence if w[1] > w[0] => v[w[0]] as u8 as f64,
                _ => {
                    let n: f64 = (w[0]..w[1]).map(|t| m_host[t]).sum();
                    (w[0]..w[1]).map(|t| v[t] as u8 as f64 * m_host[t]).sum::<f64>() / n
                }
            })
            .collect()
    };
    let nan_fold =
        |xs: Vec<f64>, f: fn(f64, f64) -> f64| xs.into_iter().filter(|x| !x.is_nan()).reduce(f).unwrap_or(f64::NAN);
    let coef_host: Vec<f64> = coef.detach().to_dtype(DType::F64)?.to_vec1()?;
    let mut per = match spec.loss {
        GrpoLoss::Cispo => {
            let clamped = coef.clamp(f64::NEG_INFINITY, spec.epsilon_high)?.detach();
            metrics.push((
                "cispo_clip_ratio".into(),
                mask_mean(
                    coef_host
                        .iter()
                        .zip(&a_host)
                        .map(|(c, a)| *c > spec.epsilon_high && *a > 0.0)
                        .collect(),
                ),
            ));
            ((clamped * &a)? * token_logps)?.neg()?
        }
        GrpoLoss::Vespo => {
            // φ(w) = e^λ·w^k·e^{−λw} of the sequence's ratio w = exp(Σ_t clamp(log ρ_t, ±20)),
            // without gradient, times −A·log π
            let lr: Vec<f64> = log_ratio.detach().to_dtype(DType::F64)?.to_vec1()?;
            let lower = 1e-8f64.ln();
            let phi: Vec<f64> = offsets
                .windows(2)
                .enumerate()
                .map(|(k, w)| {
                    let seq: f64 = (w[0]..w[1]).map(|t| lr[t].clamp(-20.0, 20.0) * m_host[t]).sum();
                    let log_w = seq.clamp(lower, 20.0);
                    let (kk, lam) = if advantages[k] >= 0.0 {
                        spec.vespo_pos
                    } else {
                        spec.vespo_neg
                    };
                    let lam = lam.max(1e-4);
                    let p = (lam + kk * log_w - lam * log_w.exp()).exp();
                    if p.is_finite() {
                        p
                    } else {
                        0.0
                    }
                })
                .collect();
            metrics.push((
                "vespo/phi_seq_mean".into(),
                phi.iter().sum::<f64>() / phi.len().max(1) as f64,
            ));
            let phi = Tensor::new(per_token(&phi), dev)?.to_dtype(dt)?;
            ((phi * &a)? * token_logps)?.neg()?
        }
        GrpoLoss::Sapo => {
            let t: Vec<f64> = a_host
                .iter()
                .map(|&x| {
                    if x > 0.0 {
                        spec.sapo_temperature_pos
                    } else {
                        spec.sapo_temperature_neg
                    }
                })
                .collect();
            let t = Tensor::new(t, dev)?.to_dtype(dt)?;
            let soft = ((crate::objectives::sigmoid(&((&coef - 1.0)? * &t)?)? * 4.0)? / &t)?;
            (soft * &a)?.neg()?
        }
        _ => {
            let clipped = coef.clamp(1.0 - spec.epsilon_low, 1.0 + spec.epsilon_high)?;
            let capped = match spec.delta {
                Some(d) => coef.clamp(f64::NEG_INFINITY, d)?,
                None => coef.clone(),
            };
            let low: Vec<bool> = coef_host
                .iter()
                .zip(&a_host)
                .map(|(c, a)| *c < 1.0 - spec.epsilon_low && *a < 0.0)
                .collect();
            let high: Vec<bool> = coef_host
                .iter()
                .zip(&a_host)
                .map(|(c, a)| *c > 1.0 + spec.epsilon_high && *a > 0.0)
                .collect();
            let region: Vec<bool> = low.iter().zip(&high).map(|(l, h)| *l || *h).collect();
            metrics.push(("clip_ratio/low_min".into(), nan_fold(per_seq(&low), f64::min)));
            metrics.push(("clip_ratio/high_max".into(), nan_fold(per_seq(&high), f64::max)));
            metrics.push(("clip_ratio/low_mean".into(), mask_mean(low)));
            metrics.push(("clip_ratio/high_mean".into(), mask_mean(high)));
            metrics.push(("clip_ratio/region_mean".into(), mask_mean(region)));
            (&capped * &a)?.minimum(&(&clipped * &a)?)?.neg()?
        }
    };
    if let Some(e) = &mask.entropy {
        let e: Vec<f64> = e.iter().map(|&x| x as u8 as f64).collect();
        per = (per * Tensor::new(e, dev)?.to_dtype(dt)?)?;
    }
    if let (Some(r), true) = (reference, spec.beta != 0.0) {
        let d = (r - token_logps)?;
        let kl = ((d.exp()? - &d)? - 1.0)?;
        let kl_host: Vec<f64> = kl.detach().to_dtype(DType::F64)?.to_vec1()?;
        let kl_mean = kl_host.iter().zip(&m_host).map(|(k, m)| k * m).sum::<f64>() / counted;
        metrics.push(("kl".to_string(), kl_mean));
        per = (per + (kl * spec.beta)?)?;
    }
    let per = (per * &m)?;
    let completions = offsets.len() - 1;
    let loss = match spec.loss {
        GrpoLoss::Grpo | GrpoLoss::Sapo => seq_mean(&per)?.mean_all()?,
        GrpoLoss::Bnpo => (per.sum_all()? / counted)?,
        GrpoLoss::DrGrpo => (per.sum_all()? / (completions * spec.max_completion_length) as f64)?,
        GrpoLoss::Dapo | GrpoLoss::Cispo | GrpoLoss::Vespo => {
            (per.sum_all()? * (spec.accumulation as f64 / spec.step_tokens.max(1.0)))?
        }
        GrpoLoss::Luspo => crate::model::logprobs::segment_sums(&per, offsets)?.mean_all()?,
    };
    Ok((loss, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn advantages_by_hand() {
        // groups of 3: [1, 2, 3] (mean 2, unbiased std 1), [5, 5, NaN]
        let (a, s) = advantages(&[1.0, 2.0, 3.0, 5.0, 5.0, f64::NAN], 3, ScaleRewards::Group);
        assert_eq!(s, vec![1.0, 0.0]);
        let want = [-1.0 / 1.0001, 0.0, 1.0 / 1.0001, 0.0, 0.0, 0.0];
        for (g, w) in a.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{a:?}");
        }
        let (a, _) = advantages(&[1.0, 3.0], 2, ScaleRewards::None);
        assert_eq!(a, vec![-1.0, 1.0]);
        // batch std of [0, 2, 4, 6] = sqrt(20/3)
        let (a, _) = advantages(&[0.0, 2.0, 4.0, 6.0], 2, ScaleRewards::Batch);
        let s = (20.0f64 / 3.0).sqrt() + 1e-4;
        assert!((a[0] + 1.0 / s).abs() < 1e-12 && (a[3] - 1.0 / s).abs() < 1e-12);
    }

    /// Each normalisation by hand on two completions of 2 and 3 tokens, with the gradient
    /// (at ratio 1: −A/normaliser per token) and the k3 KL term.
    #[test]
    fn loss_normalisations_and_kl_by_hand() {
        let lp = Var::new(&[-1.0f64, -2.0, -0.5, -1.5, -3.0], &Device::Cpu).unwrap();
        let offsets = [0, 2, 5];
        let adv = [0.5, -2.0];
        let old = lp.as_tensor().detach();
        let spec = |loss, beta| LossSpec {
            loss,
            level: ImportanceSamplingLevel::Token,
            epsilon_low: 0.2,
            epsilon_high: 0.28,
            delta: None,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            vespo_pos: (2.0, 3.0),
            vespo_neg: (3.0, 2.0),
            beta,
            max_completion_length: 4,
            accumulation: 2,
            step_tokens: 10.0,
        };
        // per-token loss −A: [−.5, −.5, 2, 2, 2]
        let cases = [
            (
                GrpoLoss::Grpo,
                ((-1.0) / 2.0 + 6.0 / 3.0) / 2.0,
                vec![-0.125, -0.125, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0],
            ),
            (GrpoLoss::Bnpo, 5.0 / 5.0, vec![-0.1, -0.1, 0.4, 0.4, 0.4]),
            (GrpoLoss::DrGrpo, 5.0 / 8.0, vec![-0.0625, -0.0625, 0.25, 0.25, 0.25]),
            // Σ / step tokens, times the accumulation the core divides by again
            (GrpoLoss::Dapo, 5.0 / 10.0 * 2.0, vec![-0.1, -0.1, 0.4, 0.4, 0.4]),
        ];
        for (loss, want, grad) in cases {
            let (l, m) = grpo_loss(lp.as_tensor(), &old, &offsets, &adv, None, &spec(loss, 0.0)).unwrap();
            let v: f64 = l.to_scalar().unwrap();
            assert!((v - want).abs() < 1e-12, "{loss:?}: {v} vs {want}");
            let g: Vec<f64> = l.backward().unwrap().get(lp.as_tensor()).unwrap().to_vec1().unwrap();
            for (a, b) in g.iter().zip(&grad) {
                assert!((a - b).abs() < 1e-12, "{loss:?}: {g:?} vs {grad:?}");
            }
            assert_eq!(
                m.iter().find(|x| x.0 == "clip_ratio/region_mean").map(|x| x.1),
                Some(0.0)
            );
        }
        // k3: ref − lp = d; e^d − d − 1 per token, β-weighted, bnpo-normalised
        let r = Tensor::new(&[-1.5f64, -2.0, 0.0, -1.0, -2.0], &Device::Cpu).unwrap();
        let (l, m) = grpo_loss(
            lp.as_tensor(),
            &old,
            &offsets,
            &adv,
            Some(&r),
            &spec(GrpoLoss::Bnpo, 0.1),
        )
        .unwrap();
        let d = [-0.5f64, 0.0, 0.5, 0.5, 1.0];
        let kl: Vec<f64> = d.iter().map(|d| d.exp() - d - 1.0).collect();
        let want = (5.0 + 0.1 * kl.iter().sum::<f64>()) / 5.0;
        assert!((l.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
        let mean_kl = kl.iter().sum::<f64>() / 5.0;
        assert!((m.iter().find(|x| x.0 == "kl").unwrap().1 - mean_kl).abs() < 1e-12);
        // a ratio outside the clip range: the clipped term binds where it is smaller
        let moved = (lp.as_tensor() + 0.5).unwrap(); // ρ = e^0.5 > 1.28
        let (l, m) = grpo_loss(&moved, &old, &offsets, &adv, None, &spec(GrpoLoss::Bnpo, 0.0)).unwrap();
        let rho = 0.5f64.exp();
        // A > 0: min(ρA, 1.28A) = 1.28A; A < 0: min(ρA, 1.28A) = ρA
        let want = -(2.0 * 0.5 * 1.28 + 3.0 * (-2.0) * rho) / 5.0;
        assert!((l.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
        // TRL counts a high clip only where A > 0 (2 of the 5 tokens)
        assert_eq!(m.iter().find(|x| x.0 == "clip_ratio/high_mean").map(|x| x.1), Some(0.4));
        assert_eq!(m.iter().find(|x| x.0 == "clip_ratio/low_mean").map(|x| x.1), Some(0.0));
        // delta = 1.5 caps ρ for A < 0: min(1.5·(−2), 1.28·(−2)) = −3 per token
        let delta = LossSpec {
            delta: Some(1.5),
            ..spec(GrpoLoss::Bnpo, 0.0)
        };
        let (l, _) = grpo_loss(&moved, &old, &offsets, &adv, None, &delta).unwrap();
        assert!((l.to_scalar::<f64>().unwrap() - 1.544).abs() < 1e-12);
        // GSPO: one ratio per sequence, exp(mean log-ratio) = e^0.2 for both here
        let shifted = (lp.as_tensor() + Tensor::new(&[0.1f64, 0.3, 0.0, 0.0, 0.6], &Device::Cpu).unwrap()).unwrap();
        let gspo = LossSpec {
            level: ImportanceSamplingLevel::Sequence,
            ..spec(GrpoLoss::Grpo, 0.0)
        };
        let (l, _) = grpo_loss(&shifted, &old, &offsets, &adv, None, &gspo).unwrap();
        assert!((l.to_scalar::<f64>().unwrap() - 0.75 * 0.2f64.exp()).abs() < 1e-12);
        // cispo at ρ = 1: −stop(min(1, 0.28))·A·log π, normalised as dapo (×2/10)
        let (l, m) = grpo_loss(lp.as_tensor(), &old, &offsets, &adv, None, &spec(GrpoLoss::Cispo, 0.0)).unwrap();
        assert!((l.to_scalar::<f64>().unwrap() - (-2.38 * 0.2)).abs() < 1e-12);
        let g: Vec<f64> = l.backward().unwrap().get(lp.as_tensor()).unwrap().to_vec1().unwrap();
        for (a, b) in g.iter().zip([-0.028, -0.028, 0.112, 0.112, 0.112]) {
            assert!((a - b).abs() < 1e-12, "{g:?}");
        }
        assert_eq!(m.iter().find(|x| x.0 == "cispo_clip_ratio").map(|x| x.1), Some(0.4));
        // sapo at ρ = 1: −σ(0)·4/τ·A = −2A/τ (τ = 1 for A > 0, 1.05 else), normalised as grpo;
        // its gradient at ρ = 1 is GRPO's
        let (l, _) = grpo_loss(lp.as_tensor(), &old, &offsets, &adv, None, &spec(GrpoLoss::Sapo, 0.0)).unwrap();
        let want = (-1.0 + 4.0 / 1.05) / 2.0;
        assert!((l.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
        let g: Vec<f64> = l.backward().unwrap().get(lp.as_tensor()).unwrap().to_vec1().unwrap();
        for (a, b) in g.iter().zip([-0.125, -0.125, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]) {
            assert!((a - b).abs() < 1e-12, "{g:?}");
        }
    }

    /// luspo, vespo, the truncation and entropy masks, and the entropy quantile, by hand.
    #[test]
    fn luspo_vespo_and_masks_by_hand() {
        let lp = Var::new(&[-1.0f64, -2.0, -0.5, -1.5, -3.0], &Device::Cpu).unwrap();
        let offsets = [0, 2, 5];
        let adv = [0.5, -2.0];
        let old = lp.as_tensor().detach();
        let spec = |loss| LossSpec {
            loss,
            level: ImportanceSamplingLevel::Token,
            epsilon_low: 0.2,
            epsilon_high: 0.28,
            delta: None,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            vespo_pos: (2.0, 3.0),
            vespo_neg: (3.0, 2.0),
            beta: 0.0,
            max_completion_length: 4,
            accumulation: 2,
            step_tokens: 10.0,
        };
        // luspo at ρ = 1: per completion Σ_t −A, then the mean: (−0.5·2 + 2·3) / 2
        let (l, _) = grpo_loss(lp.as_tensor(), &old, &offsets, &adv, None, &spec(GrpoLoss::Luspo)).unwrap();
        assert!((l.to_scalar::<f64>().unwrap() - 2.5).abs() < 1e-12);
        let g: Vec<f64> = l.backward().unwrap().get(lp.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(g, vec![-0.25, -0.25, 1.0, 1.0, 1.0]);
        // vespo: w = exp(Σ log-ratio); φ = e^{λ + k log w − λ w}; at w = 1, φ = 1: −A·log π,
        // normalised as dapo (× 2 / 10)
        let (l, _) = grpo_loss(lp.as_tensor(), &old, &offsets, &adv, None, &spec(GrpoLoss::Vespo)).unwrap();
        let want = -(0.5 * -3.0 + -2.0 * -5.0) * 0.2;
        assert!((l.to_scalar::<f64>().unwrap() - want).abs() < 1e-12, "{l}");
        // a moved sequence: log w = 0.4 for the first (A > 0: k 2, λ 3), 0.3 for the second
        let moved = (lp.as_tensor() + Tensor::new(&[0.1f64, 0.3, 0.1, 0.1, 0.1], &Device::Cpu).unwrap()).unwrap();
        let (l, _) = grpo_loss(&moved, &old, &offsets, &adv, None, &spec(GrpoLoss::Vespo)).unwrap();
        let phi = |k: f64, lam: f64, lw: f64| (lam + k * lw - lam * lw.exp()).exp();
        let (p1, p2) = (phi(2.0, 3.0, 0.4), phi(3.0, 2.0, 0.3));
        let want = -(p1 * 0.5 * (-2.6) + p2 * -2.0 * (-4.7)) * 0.2;
        assert!((l.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
        // the second completion masked (truncated): bnpo over the first's 2 tokens only, dapo's
        // normaliser as given (the step's counted tokens), grpo's mean still over both
        // completions (TRL's), the KL metric over counted tokens
        let keep = TokenMask {
            keep: Some(vec![true, false]),
            entropy: None,
        };
        let masked = |loss| grpo_loss_masked(lp.as_tensor(), &old, &offsets, &adv, None, &spec(loss), &keep).unwrap();
        assert!((masked(GrpoLoss::Bnpo).0.to_scalar::<f64>().unwrap() - (-0.5)).abs() < 1e-12);
        assert!((masked(GrpoLoss::Grpo).0.to_scalar::<f64>().unwrap() - (-0.25)).abs() < 1e-12);
        // dapo: Σ (−A) over the kept 2 tokens = −1, times accumulation / step tokens = 2 / 10
        assert!((masked(GrpoLoss::Dapo).0.to_scalar::<f64>().unwrap() + 0.2).abs() < 1e-12);
        let g: Vec<f64> = masked(GrpoLoss::Bnpo)
            .0
            .backward()
            .unwrap()
            .get(lp.as_tensor())
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(g, vec![-0.25, -0.25, 0.0, 0.0, 0.0]);
        // an entropy mask drops the policy term on tokens 1 and 4 (bnpo still divides by 5)
        let ent = TokenMask {
            keep: None,
            entropy: Some(vec![true, false, true, true, false]),
        };
        let (l, _) = grpo_loss_masked(lp.as_tensor(), &old, &offsets, &adv, None, &spec(GrpoLoss::Bnpo), &ent).unwrap();
        assert!((l.to_scalar::<f64>().unwrap() - (-0.5 + 2.0 + 2.0) / 5.0).abs() < 1e-12);
        // torch.quantile with linear interpolation: entropies [0.1, 0.4, 0.2, 0.3] (token 4 not
        // counted), top 50% = at least the 0.5 quantile 0.25
        let m = high_entropy_mask(&[0.1, 0.4, 0.2, 0.3, 9.0], &[true, true, true, true, false], 0.5);
        assert_eq!(m, vec![false, true, false, true, false]);
        assert_eq!(high_entropy_mask(&[1.0, 2.0], &[false, false], 0.5), vec![false, false]);
    }

    /// RLOO by hand: leave-one-out baselines (unscorable rewards excluded, a lone scorable
    /// completion gets 0), standardisation, and the sequence-level loss with its gradient.
    #[test]
    fn rloo_advantages_and_loss_by_hand() {
        // groups of 3: [1, 2, 6] -> baselines 4, 3.5, 1.5; [3, NaN, 5] -> 5, NaN, 3
        let a = rloo_advantages(&[1.0, 2.0, 6.0, 3.0, f64::NAN, 5.0], 3, false);
        assert_eq!(a, vec![-3.0, -1.5, 4.5, -2.0, 0.0, 2.0]);
        assert_eq!(rloo_advantages(&[1.0, f64::NAN], 2, false), vec![0.0, 0.0]);
        let n = rloo_advantages(&[1.0, 2.0, 6.0, 3.0, f64::NAN, 5.0], 3, true);
        let v = [-3.0f64, -1.5, 4.5, -2.0, 2.0];
        let mean = v.iter().sum::<f64>() / 5.0;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0).sqrt() + 1e-4;
        assert!((n[0] - (-3.0 - mean) / std).abs() < 1e-12 && n[4] == 0.0, "{n:?}");
        // loss at ρ = 1: −mean(A); ∂/∂log π_t = −A_k / (number of sequences)
        let lp = Var::new(&[-1.0f64, -2.0, -0.5, -1.5, -3.0], &Device::Cpu).unwrap();
        let old = lp.as_tensor().detach();
        let (l, m) = rloo_loss(lp.as_tensor(), &old, &[0, 2, 5], &[0.5, -2.0], 0.2, 0.2).unwrap();
        assert!((l.to_scalar::<f64>().unwrap() - 0.75).abs() < 1e-12);
        let g: Vec<f64> = l.backward().unwrap().get(lp.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(g, vec![-0.25, -0.25, 1.0, 1.0, 1.0]);
        assert_eq!(m[2].1, 0.0);
        // ρ of the whole sequence: e^0.2 > 1.2 for the first (A > 0: clipped to 1.2·A), e^0.6 for
        // the second (A < 0: the unclipped ρ·A is the smaller and binds)
        let shifted = (lp.as_tensor() + Tensor::new(&[0.1f64, 0.1, 0.2, 0.2, 0.2], &Device::Cpu).unwrap()).unwrap();
        let (l, m) = rloo_loss(&shifted, &old, &[0, 2, 5], &[0.5, -2.0], 0.2, 0.2).unwrap();
        let want = -(0.5 * 1.2 - 2.0 * 0.6f64.exp()) / 2.0;
        assert!((l.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
        assert_eq!((m[0].1, m[1].1, m[2].1), (0.0, 0.5, 0.5), "low, high, region");
    }
}
