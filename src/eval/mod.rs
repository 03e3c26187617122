//! Evaluation of a policy on preference pairs: implicit-reward accuracy and margin (DPO's
//! β·log π/π_ref), and ranking accuracy (does the policy give the chosen completion the higher
//! summed log-prob?).

pub mod factors;
pub mod generation;

use crate::error::Result;
use crate::objectives::{Objective, PairStats};
use serde::Serialize;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EvalSummary {
    pub pairs: usize,
    /// Scores came from an explicit reward model (not log-probs).
    pub reward_model: bool,
    /// Fraction of pairs where β(log π − log π_ref) is higher for chosen (TRL's `rewards/accuracies`).
    pub reward_accuracy: Option<f64>,
    /// Mean of β(log π − log π_ref)(chosen) − (rejected) (TRL's `rewards/margins`).
    pub reward_margin: Option<f64>,
    /// The objective whose rewards and loss these are (the run's `loss_type`).
    pub loss_type: Option<String>,
    /// Mean loss of that objective.
    pub loss: Option<f64>,
    /// Fraction of pairs where the policy's summed log-prob of chosen exceeds rejected.
    pub ranking_accuracy: f64,
    /// The same, with length-normalised (per-token mean) log-probs.
    pub ranking_accuracy_normalized: f64,
    /// Ranking accuracy of the reference model.
    pub ref_ranking_accuracy: Option<f64>,
    /// Ranking accuracy of the ideal DPO optimum given the true preference probabilities
    /// (Chen et al. 2024), and the alignment gap = idealised − actual ranking accuracy.
    pub idealized_ranking_accuracy: Option<f64>,
    pub alignment_gap: Option<f64>,
    /// Fraction of pairs the reference misranks, and the mean DPO loss they must reach to flip.
    pub difficulty: Option<Difficulty>,
    /// Expected calibration error of the model's preference probability: σ(r_chosen − r_rejected)
    /// (explicit rewards, or DPO's implicit reward with a reference), or a Gaussian head's
    /// Φ(Δμ/√(σ_w² + σ_l²)); see [`calibration`].
    pub calibration_ece: Option<f64>,
}

/// One bin of a reliability diagram.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CalibrationBin {
    /// Confidence range `[lo, hi)` (the last bin includes 1).
    pub lo: f64,
    pub hi: f64,
    pub count: usize,
    /// Mean confidence of the pairs in the bin, and the fraction of them ranked correctly.
    pub confidence: f64,
    pub accuracy: f64,
}

/// Calibration of a preference model's probabilities: p_i is the model's probability that the
/// labelled-chosen response of pair i is preferred (σ(margin_i) for a Bradley-Terry reward,
/// Φ(Δμ/√(σ_w² + σ_l²)) for a Gaussian head). Its confidence is
/// max(p, 1 − p) and it is right when p > 1/2. Pairs are binned by confidence over [1/2, 1];
/// ECE = Σ_bins (count / N)·|accuracy − confidence|.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Calibration {
    pub bins: Vec<CalibrationBin>,
    pub ece: f64,
}

pub fn calibration(probabilities: &[f64], bins: usize) -> Calibration {
    let bins = bins.max(1);
    let width = 0.5 / bins as f64;
    let mut acc = vec![(0usize, 0.0f64, 0usize); bins]; // count, Σ confidence, correct
    for &p in probabilities {
        let conf = p.max(1.0 - p);
        let b = (((conf - 0.5) / width) as usize).min(bins - 1);
        acc[b].0 += 1;
        acc[b].1 += conf;
        acc[b].2 += (p > 0.5) as usize;
    }
    let n = probabilities.len().max(1) as f64;
    let mut ece = 0.0;
    let bins = acc
        .iter()
        .enumerate()
        .map(|(i, &(count, sum_conf, correct))| {
            let c = count.max(1) as f64;
            let (confidence, accuracy) = (sum_conf / c, correct as f64 / c);
            ece += count as f64 / n * (accuracy - confidence).abs();
            CalibrationBin {
                lo: 0.5 + i as f64 * width,
                hi: 0.5 + (i + 1) as f64 * width,
                count,
                confidence,
                accuracy,
            }
        })
        .collect();
    Calibration { bins, ece }
}

impl EvalSummary {
    /// Add the reference-based diagnostics: idealised ranking accuracy (when the true
    /// preference probability of each pair is known) and per-pair difficulty.
    pub fn with_ideal(mut self, reference: &[(f64, f64)], alphas: Option<&[f64]>, beta: f64) -> Self {
        if let Some(a) = alphas {
            let ideal = idealized_ranking_accuracy(reference, a, beta);
            self.idealized_ranking_accuracy = Some(ideal);
            self.alignment_gap = Some(ideal - self.ranking_accuracy);
        }
        self.difficulty = Some(difficulty(reference, beta));
        self
    }
}

/// The Bradley-Terry preference probabilities σ(r_w − r_l) of (chosen, rejected) rewards.
pub fn bt_probabilities(rewards: &[(f64, f64)]) -> Vec<f64> {
    rewards
        .iter()
        .map(|(c, r)| crate::util::log_sigmoid(c - r).exp())
        .collect()
}

/// Explicit reward model on pairs: accuracy (r_w > r_l), mean margin, and the calibration of
/// the model's preference `probabilities` (see [`calibration`]).
pub fn summarize_rewards(rewards: &[(f64, f64)], probabilities: &[f64]) -> EvalSummary {
    let n = rewards.len().max(1) as f64;
    let acc = rewards.iter().filter(|(c, r)| c > r).count() as f64 / n;
    EvalSummary {
        calibration_ece: Some(calibration(probabilities, CALIBRATION_BINS).ece),
        pairs: rewards.len(),
        reward_model: true,
        reward_accuracy: Some(acc),
        reward_margin: Some(rewards.iter().map(|(c, r)| c - r).sum::<f64>() / n),
        loss_type: None,
        loss: None,
        ranking_accuracy: acc,
        ranking_accuracy_normalized: acc,
        ref_ranking_accuracy: None,
        idealized_ranking_accuracy: None,
        alignment_gap: None,
        difficulty: None,
    }
}

/// Summarise per-pair (chosen, rejected) summed log-probs of the policy and, optionally, the
/// reference. `lengths` are (chosen, rejected) completion token counts. Rewards and the loss
/// are the `objective`'s (the evaluated run's `loss_type` and `beta`), computed through the
/// objective registry wherever its inputs are there (a reference, if it needs one).
pub fn summarize(
    policy: &[(f64, f64)],
    reference: Option<&[(f64, f64)]>,
    lengths: &[(usize, usize)],
    objective: &Objective,
) -> Result<EvalSummary> {
    let n = policy.len().max(1) as f64;
    let frac = |c: usize| c as f64 / n;
    let ranking = policy.iter().filter(|(c, r)| c > r).count();
    let ranking_norm = policy
        .iter()
        .zip(lengths)
        .filter(|((c, r), (lc, lr))| c / (*lc).max(1) as f64 > r / (*lr).max(1) as f64)
        .count();
    let (mut acc, mut margin, mut loss, mut ece) = (None, None, None, None);
    if reference.is_some() || !objective.needs_reference() {
        let stats = PairStats::from_f64(policy, reference, lengths)?;
        let rewards = objective.pair_rewards(&stats)?;
        acc = Some(frac(rewards.iter().filter(|(c, r)| c > r).count()));
        margin = Some(rewards.iter().map(|(c, r)| c - r).sum::<f64>() / n);
        loss = Some(crate::objectives::mean(&objective.loss_pairs(&stats)?.losses)?);
        ece = Some(calibration(&bt_probabilities(&rewards), CALIBRATION_BINS).ece);
    }
    let ref_rank = reference.map(|rf| frac(rf.iter().filter(|(c, r)| c > r).count()));
    Ok(EvalSummary {
        pairs: policy.len(),
        reward_model: false,
        loss_type: Some(objective.name()),
        reward_accuracy: acc,
        reward_margin: margin,
        loss,
        ranking_accuracy: frac(ranking),
        ranking_accuracy_normalized: frac(ranking_norm),
        ref_ranking_accuracy: ref_rank,
        idealized_ranking_accuracy: None,
        alignment_gap: None,
        difficulty: None,
        calibration_ece: ece,
    })
}

/// Bins of the reliability diagram behind `calibration_ece`.
pub const CALIBRATION_BINS: usize = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_made_summary() {
        let policy = [(-1.0, -3.0), (-5.0, -4.0), (-2.0, -2.5), (-10.0, -6.0)];
        let reference = [(-2.0, -2.0), (-5.0, -5.0), (-2.0, -2.0), (-8.0, -8.0)];
        let lengths = [(1, 3), (5, 2), (1, 1), (10, 3)];
        let dpo = |beta: f64| {
            let p = crate::objectives::ObjectiveParams {
                beta,
                ..Default::default()
            };
            crate::objectives::build(&["sigmoid".into()], None, &p).unwrap()
        };
        let s = summarize(&policy, Some(&reference), &lengths, &dpo(0.5)).unwrap();
        assert_eq!(s.ranking_accuracy, 0.5); // pairs 0 and 2
                                             // normalised: -1 > -1 (no), -1 < -2? pair1: -1 vs -2 → yes; pair2 yes; pair3: -1 vs -2 → yes
        assert_eq!(s.ranking_accuracy_normalized, 0.75);
        // rewards (β=0.5): (0.5,-0.5), (0,0.5), (0,-0.25), (-1,1)
        assert_eq!(s.reward_accuracy, Some(0.5));
        let margin = (1.0 - 0.5 + 0.25 - 2.0) / 4.0;
        assert!((s.reward_margin.unwrap() - margin).abs() < 1e-15);
        let nls = |z: f64| (1.0 + (-z).exp()).ln();
        let loss = (nls(1.0) + nls(-0.5) + nls(0.25) + nls(-2.0)) / 4.0;
        assert!((s.loss.unwrap() - loss).abs() < 1e-15);
        assert_eq!(s.ref_ranking_accuracy, Some(0.0));
        let s = summarize(&policy, None, &lengths, &dpo(0.5)).unwrap();
        assert_eq!((s.reward_accuracy, s.ranking_accuracy), (None, 0.5));
    }

    /// Reliability bins and ECE by hand: margins ±ln 3 give p = 3/4 or 1/4 (confidence 3/4),
    /// ln 19 gives 0.95, 0 gives 1/2 (counted wrong).
    #[test]
    fn hand_made_calibration() {
        let l3 = 3f64.ln();
        let p = |m: &[f64]| bt_probabilities(&m.iter().map(|&m| (m, 0.0)).collect::<Vec<_>>());
        let c = calibration(&p(&[l3, l3, -l3, 19f64.ln(), 0.0]), 5);
        // bins of width 0.1 over [0.5, 1]: 0.5 -> bin 0, 0.75 -> bin 2, 0.95 -> bin 4
        let counts: Vec<usize> = c.bins.iter().map(|b| b.count).collect();
        assert_eq!(counts, vec![1, 0, 3, 0, 1]);
        assert!((c.bins[2].confidence - 0.75).abs() < 1e-12);
        assert!((c.bins[2].accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!((c.bins[0].accuracy, c.bins[4].accuracy), (0.0, 1.0));
        let ece = (1.0 * 0.5 + 3.0 * (0.75f64 - 2.0 / 3.0).abs() + 1.0 * 0.05) / 5.0;
        assert!((c.ece - ece).abs() < 1e-12, "{} vs {ece}", c.ece);
        // a perfectly calibrated set: confidence 3/4, three of four right
        assert!(calibration(&p(&[l3, l3, l3, -l3]), 10).ece < 1e-12);
    }
}

/// Idealised ranking accuracy (Chen et al. 2024, "Preference Learning Algorithms Do Not Learn
/// Preference Rankings"): the ranking accuracy of the exact DPO/RLHF optimum
/// π* ∝ π_ref · exp(r*/β) when the true preference probability of each pair is α:
/// R* = mean 1[log π_ref(y_w)/π_ref(y_l) + (1/β) log(α/(1−α)) > 0].
/// `reference` holds summed (chosen, rejected) log-probs; α = 1 counts as always ranked right.
pub fn idealized_ranking_accuracy(reference: &[(f64, f64)], alphas: &[f64], beta: f64) -> f64 {
    let right = reference
        .iter()
        .zip(alphas)
        .filter(|((c, r), &a)| {
            if a >= 1.0 {
                return true;
            }
            if a <= 0.0 {
                return false;
            }
            (c - r) + (a / (1.0 - a)).ln() / beta > 0.0
        })
        .count();
    right as f64 / reference.len().max(1) as f64
}

/// The DPO loss a pair must be driven below before the policy ranks it right (exact for DPO):
/// π(y_w) > π(y_l) ⟺ L_DPO < −log σ(β log π_ref(y_l)/π_ref(y_w)). Small values mean hard pairs:
/// the reference misranks them by a wide margin.
pub fn flip_threshold_loss(ref_chosen: f64, ref_rejected: f64, beta: f64) -> f64 {
    -crate::util::log_sigmoid(beta * (ref_rejected - ref_chosen))
}

/// Per-pair difficulty summary: how many pairs the reference misranks, and the mean loss
/// threshold over those.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Difficulty {
    pub reference_misranked: f64,
    pub mean_flip_threshold_misranked: Option<f64>,
}

pub fn difficulty(reference: &[(f64, f64)], beta: f64) -> Difficulty {
    let mis: Vec<f64> = reference
        .iter()
        .filter(|(c, r)| r > c)
        .map(|(c, r)| flip_threshold_loss(*c, *r, beta))
        .collect();
    Difficulty {
        reference_misranked: mis.len() as f64 / reference.len().max(1) as f64,
        mean_flip_threshold_misranked: (!mis.is_empty()).then(|| mis.iter().sum::<f64>() / mis.len() as f64),
    }
}

#[cfg(test)]
mod ideal_tests {
    use super::*;

    #[test]
    fn idealized_accuracy_and_flip_threshold_by_hand() {
        // pair 0: ref prefers chosen; pair 1: ref prefers rejected by 2 nats; pair 2: by 10 nats
        let reference = [(-5.0, -6.0), (-6.0, -4.0), (-15.0, -5.0)];
        let alphas = [0.6, 0.9, 0.9];
        // β = 1: log(0.9/0.1) = 2.197 > 2 (pair 1 flips to right), < 10 (pair 2 stays wrong)
        assert!((idealized_ranking_accuracy(&reference, &alphas, 1.0) - 2.0 / 3.0).abs() < 1e-15);
        // β = 0.1: the optimum moves far from the reference: all three ranked right
        assert_eq!(idealized_ranking_accuracy(&reference, &alphas, 0.1), 1.0);
        assert_eq!(idealized_ranking_accuracy(&reference, &[1.0, 1.0, 0.0], 1.0), 2.0 / 3.0);
        // threshold: −log σ(β (ref_l − ref_w)); pair 1 at β = 1: −log σ(2)
        let t = flip_threshold_loss(-6.0, -4.0, 1.0);
        assert!((t - (1.0 + (-2.0f64).exp()).ln()).abs() < 1e-15);
        // the harder pair 2 needs a much lower loss
        assert!(flip_threshold_loss(-15.0, -5.0, 1.0) < 1e-4);
        let d = difficulty(&reference, 1.0);
        assert!((d.reference_misranked - 2.0 / 3.0).abs() < 1e-15);
        let want = (flip_threshold_loss(-6.0, -4.0, 1.0) + flip_threshold_loss(-15.0, -5.0, 1.0)) / 2.0;
        assert!((d.mean_flip_threshold_misranked.unwrap() - want).abs() < 1e-15);
    }
}
