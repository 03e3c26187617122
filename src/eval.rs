//! Evaluation of a policy on preference pairs: implicit-reward accuracy and margin (DPO's
//! β·log π/π_ref), and ranking accuracy (does the policy give the chosen completion the higher
//! summed log-prob?).

use serde::Serialize;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EvalSummary {
    pub pairs: usize,
    /// Fraction of pairs where β(log π − log π_ref) is higher for chosen (TRL's `rewards/accuracies`).
    pub reward_accuracy: Option<f64>,
    /// Mean of β(log π − log π_ref)(chosen) − (rejected) (TRL's `rewards/margins`).
    pub reward_margin: Option<f64>,
    /// Mean DPO sigmoid loss at this β.
    pub dpo_loss: Option<f64>,
    /// Fraction of pairs where the policy's summed log-prob of chosen exceeds rejected.
    pub ranking_accuracy: f64,
    /// The same, with length-normalised (per-token mean) log-probs.
    pub ranking_accuracy_normalized: f64,
    /// Ranking accuracy of the reference model.
    pub ref_ranking_accuracy: Option<f64>,
}

/// Summarise per-pair (chosen, rejected) summed log-probs of the policy and, optionally, the
/// reference. `lengths` are (chosen, rejected) completion token counts.
pub fn summarize(
    policy: &[(f64, f64)],
    reference: Option<&[(f64, f64)]>,
    lengths: &[(usize, usize)],
    beta: f64,
) -> EvalSummary {
    let n = policy.len().max(1) as f64;
    let frac = |c: usize| c as f64 / n;
    let ranking = policy.iter().filter(|(c, r)| c > r).count();
    let ranking_norm = policy
        .iter()
        .zip(lengths)
        .filter(|((c, r), (lc, lr))| c / (*lc).max(1) as f64 > r / (*lr).max(1) as f64)
        .count();
    let (mut acc, mut margin, mut loss, mut ref_rank) = (None, None, None, None);
    if let Some(rf) = reference {
        let rewards: Vec<(f64, f64)> = policy
            .iter()
            .zip(rf)
            .map(|((pc, pr), (rc, rr))| (beta * (pc - rc), beta * (pr - rr)))
            .collect();
        acc = Some(frac(rewards.iter().filter(|(c, r)| c > r).count()));
        margin = Some(rewards.iter().map(|(c, r)| c - r).sum::<f64>() / n);
        loss = Some(
            rewards
                .iter()
                .map(|(c, r)| {
                    let z = c - r;
                    // −log σ(z), stable
                    if z > 0.0 {
                        (-z).exp().ln_1p()
                    } else {
                        -z + z.exp().ln_1p()
                    }
                })
                .sum::<f64>()
                / n,
        );
        ref_rank = Some(frac(rf.iter().filter(|(c, r)| c > r).count()));
    }
    EvalSummary {
        pairs: policy.len(),
        reward_accuracy: acc,
        reward_margin: margin,
        dpo_loss: loss,
        ranking_accuracy: frac(ranking),
        ranking_accuracy_normalized: frac(ranking_norm),
        ref_ranking_accuracy: ref_rank,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_made_summary() {
        let policy = [(-1.0, -3.0), (-5.0, -4.0), (-2.0, -2.5), (-10.0, -6.0)];
        let reference = [(-2.0, -2.0), (-5.0, -5.0), (-2.0, -2.0), (-8.0, -8.0)];
        let lengths = [(1, 3), (5, 2), (1, 1), (10, 3)];
        let s = summarize(&policy, Some(&reference), &lengths, 0.5);
        assert_eq!(s.ranking_accuracy, 0.5); // pairs 0 and 2
                                             // normalised: -1 > -1 (no), -1 < -2? pair1: -1 vs -2 → yes; pair2 yes; pair3: -1 vs -2 → yes
        assert_eq!(s.ranking_accuracy_normalized, 0.75);
        // rewards (β=0.5): (0.5,-0.5), (0,0.5), (0,-0.25), (-1,1)
        assert_eq!(s.reward_accuracy, Some(0.5));
        let margin = (1.0 - 0.5 + 0.25 - 2.0) / 4.0;
        assert!((s.reward_margin.unwrap() - margin).abs() < 1e-15);
        let nls = |z: f64| (1.0 + (-z).exp()).ln();
        let loss = (nls(1.0) + nls(-0.5) + nls(0.25) + nls(-2.0)) / 4.0;
        assert!((s.dpo_loss.unwrap() - loss).abs() < 1e-15);
        assert_eq!(s.ref_ranking_accuracy, Some(0.0));
        let s = summarize(&policy, None, &lengths, 0.5);
        assert_eq!((s.reward_accuracy, s.ranking_accuracy), (None, 0.5));
    }
}
