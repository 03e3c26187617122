//! The DPO family.

use super::{log_sigmoid, mean, ObjectiveOutput, ObjectiveParams, PairStats, PairwiseObjective};
use crate::error::Result;
use candle_core::Tensor;

/// Implicit-reward metrics shared by reference-based pairwise objectives:
/// `rewards/chosen = β (log π(y_w) − log π_ref(y_w))`, etc., as TRL logs them.
pub fn reward_metrics(stats: &PairStats, beta: f64) -> Result<Vec<(String, f64)>> {
    let (rc, rr) = stats.reference("reward metrics")?;
    let chosen = ((stats.policy_chosen.detach() - rc)? * beta)?;
    let rejected = ((stats.policy_rejected.detach() - rr)? * beta)?;
    let acc = chosen.gt(&rejected)?.to_dtype(chosen.dtype())?;
    Ok(vec![
        ("rewards/chosen".into(), mean(&chosen)?),
        ("rewards/rejected".into(), mean(&rejected)?),
        ("rewards/accuracies".into(), mean(&acc)?),
        ("rewards/margins".into(), mean(&(chosen - rejected)?)?),
        ("logps/chosen".into(), mean(&stats.policy_chosen)?),
        ("logps/rejected".into(), mean(&stats.policy_rejected)?),
    ])
}

/// `h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))`.
pub fn dpo_logits(stats: &PairStats, name: &str) -> Result<Tensor> {
    let (rc, rr) = stats.reference(name)?;
    Ok(((&stats.policy_chosen - rc)? - (&stats.policy_rejected - rr)?)?)
}

/// DPO (`loss_type = "sigmoid"`): `−(1−ε) log σ(β h) − ε log σ(−β h)`; ε = `label_smoothing`
/// (conservative DPO), 0 by default. Identical to TRL's `sigmoid` loss.
pub struct Sigmoid(pub ObjectiveParams);

impl PairwiseObjective for Sigmoid {
    fn name(&self) -> &'static str {
        "sigmoid"
    }
    fn needs_reference(&self) -> bool {
        true
    }
    fn loss(&self, s: &PairStats) -> Result<ObjectiveOutput> {
        let p = &self.0;
        let z = (dpo_logits(s, self.name())? * p.beta)?;
        let mut losses = (log_sigmoid(&z)? * -(1.0 - p.label_smoothing))?;
        if p.label_smoothing != 0.0 {
            losses = (losses - (log_sigmoid(&z.neg()?)? * p.label_smoothing)?)?;
        }
        Ok(ObjectiveOutput {
            losses,
            metrics: reward_metrics(s, p.beta)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objectives::{build, ObjectiveParams};
    use candle_core::{Device, Var};

    /// Per-example loss and d loss / d (policy chosen, policy rejected) in f64 by hand.
    fn by_hand(pc: f64, pr: f64, rc: f64, rr: f64, beta: f64, eps: f64) -> (f64, f64, f64) {
        let z = beta * ((pc - rc) - (pr - rr));
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let ls = |x: f64| {
            if x < 0.0 {
                x - (1.0 + x.exp()).ln()
            } else {
                -(1.0 + (-x).exp()).ln()
            }
        };
        let loss = -(1.0 - eps) * ls(z) - eps * ls(-z);
        // d/dz: −(1−ε)(1−σ(z)) + ε σ(z)
        let dz = -(1.0 - eps) * (1.0 - sig(z)) + eps * sig(z);
        (loss, dz * beta, -dz * beta)
    }

    #[test]
    fn sigmoid_matches_hand_values_and_gradients() {
        let cases = [
            // (pc, pr, rc, rr)
            (-10.0, -12.0, -11.0, -11.5),
            (-5.0, -5.0, -5.0, -5.0),   // equal log-probs: loss = log 2
            (-1.0, -601.0, -1.0, -1.0), // margin +60 after β=0.1
            (-601.0, -1.0, -1.0, -1.0), // margin −60
            (-3.0, -2.0, -2.5, -2.5),
        ];
        for &(beta, eps) in &[(0.1, 0.0), (0.5, 0.2)] {
            let dev = Device::Cpu;
            let pc = Var::new(&cases.map(|c| c.0), &dev).unwrap();
            let pr = Var::new(&cases.map(|c| c.1), &dev).unwrap();
            let stats = PairStats {
                policy_chosen: pc.as_tensor().clone(),
                policy_rejected: pr.as_tensor().clone(),
                ref_chosen: Some(Tensor::new(&cases.map(|c| c.2), &dev).unwrap()),
                ref_rejected: Some(Tensor::new(&cases.map(|c| c.3), &dev).unwrap()),
                chosen_tokens: vec![1; 5],
                rejected_tokens: vec![1; 5],
            };
            let obj = build(
                "sigmoid",
                &ObjectiveParams {
                    beta,
                    label_smoothing: eps,
                },
            )
            .unwrap();
            let out = obj.loss(&stats).unwrap();
            let losses: Vec<f64> = out.losses.to_vec1().unwrap();
            let grads = out.losses.sum_all().unwrap().backward().unwrap();
            let gc: Vec<f64> = grads.get(pc.as_tensor()).unwrap().to_vec1().unwrap();
            let gr: Vec<f64> = grads.get(pr.as_tensor()).unwrap().to_vec1().unwrap();
            for (i, c) in cases.iter().enumerate() {
                let (l, dc, dr) = by_hand(c.0, c.1, c.2, c.3, beta, eps);
                assert!(
                    (losses[i] - l).abs() < 1e-12,
                    "loss {i}: {} vs {l}",
                    losses[i]
                );
                assert!(
                    (gc[i] - dc).abs() < 1e-12 && (gr[i] - dr).abs() < 1e-12,
                    "grad {i}"
                );
                assert!(losses[i].is_finite());
            }
            if eps == 0.0 {
                assert!((losses[1] - std::f64::consts::LN_2).abs() < 1e-15);
                assert!(losses[2] < 1e-20 && (losses[3] - 60.0).abs() < 1e-12);
            }
            let m: std::collections::HashMap<_, _> = out.metrics.into_iter().collect();
            // chosen rewards: β(pc − rc)
            let want: f64 = cases.iter().map(|c| beta * (c.0 - c.2)).sum::<f64>() / 5.0;
            assert!((m["rewards/chosen"] - want).abs() < 1e-12);
            assert!((m["rewards/accuracies"] - 0.4).abs() < 1e-12); // cases 0 and 2
        }
    }

    #[test]
    fn unknown_loss_type_suggests() {
        let e = build("sigmod", &ObjectiveParams::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("did you mean `sigmoid`"), "{e}");
    }
}
