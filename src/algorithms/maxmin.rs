//! MaxMin-RLHF's EM over annotator clusters (`reward_clusters` = K > 1): K reward heads on one
//! body; the E-step assigns each annotator to the head under which their preferences are most
//! likely, and each pair trains its annotator's head.

use crate::data::TokenizedExample;
use crate::error::Result;
use crate::model::LoadedModel;
use crate::util::log_sigmoid;
use std::collections::BTreeMap;

/// The clusters and when to recompute them.
#[derive(Clone, Debug, Default)]
pub struct MaxMin {
    /// Steps between E-steps; 0 = once per epoch.
    pub em_steps: usize,
    /// Annotator → head, after the first E-step.
    pub clusters: Option<BTreeMap<String, usize>>,
    /// Cluster sizes and per-cluster accuracy at the last E-step (logged with every record).
    pub metrics: BTreeMap<String, f64>,
}

impl MaxMin {
    /// Whether an E-step is due before step `step`.
    pub fn due(&self, step: usize, batches_per_epoch: usize, accumulation: usize) -> bool {
        let every = if self.em_steps > 0 {
            self.em_steps
        } else {
            (batches_per_epoch / accumulation).max(1)
        };
        self.clusters.is_none() || step.is_multiple_of(every)
    }

    /// The head of each example: its annotator's cluster (0 for an unknown annotator).
    pub fn heads(&self, batch: &[&TokenizedExample]) -> Option<Vec<usize>> {
        self.clusters.as_ref().map(|c| {
            batch
                .iter()
                .map(|e| e.meta.annotator.as_ref().and_then(|a| c.get(a)).copied().unwrap_or(0))
                .collect()
        })
    }

    /// The E-step: assign each annotator to the reward head under which their preferences are
    /// most likely (Σ log σ(r_k(y_w) − r_k(y_l)) over their pairs), and record cluster sizes
    /// and per-cluster accuracy.
    pub fn e_step(&mut self, policy: &LoadedModel, train: &[TokenizedExample], batch_size: usize) -> Result<()> {
        let k = policy.transformer.cfg.num_labels;
        let scores = crate::stats::score_reward_heads(&policy.transformer, train, batch_size, policy.tokenizer.pad_id)?;
        let mut ll: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (e, s) in train.iter().zip(&scores) {
            let a = e.meta.annotator.clone().unwrap_or_default();
            let row = ll.entry(a).or_insert_with(|| vec![0.0; k]);
            for (h, v) in row.iter_mut().enumerate() {
                *v += log_sigmoid(s[0][h] - s[1][h]);
            }
        }
        let assign: BTreeMap<String, usize> = ll
            .into_iter()
            .map(|(a, row)| {
                let best = (0..k).max_by(|&x, &y| row[x].total_cmp(&row[y])).unwrap_or(0);
                (a, best)
            })
            .collect();
        let mut m = BTreeMap::new();
        for h in 0..k {
            let members = assign.values().filter(|&&c| c == h).count();
            let (mut right, mut n) = (0usize, 0usize);
            for (e, s) in train.iter().zip(&scores) {
                if e.meta.annotator.as_ref().and_then(|a| assign.get(a)) == Some(&h) {
                    n += 1;
                    right += (s[0][h] > s[1][h]) as usize;
                }
            }
            m.insert(format!("maxmin/cluster_{h}_annotators"), members as f64);
            m.insert(
                format!("maxmin/cluster_{h}_accuracy"),
                if n > 0 { right as f64 / n as f64 } else { f64::NAN },
            );
        }
        self.clusters = Some(assign);
        self.metrics = m;
        Ok(())
    }
}
