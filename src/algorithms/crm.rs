//! Collaborative reward modeling (`crm = true`): two reward models from the same start with
//! different head initialisations, each trained only on the pairs its peer is most confident
//! about (the largest margins), with co-teaching's schedule for how much to filter. The peer
//! and its optimizer are this algorithm's own; checkpoints keep them in `peer_model/`.

use crate::data::TokenizedExample;
use crate::error::Result;
use crate::model::LoadedModel;
use crate::objectives::{Objective, PairStats};
use crate::optim::{Optimizer, OPTIMIZER_FILE};
use crate::stats::{group_rewards, SeqStats};
use candle_core::{DType, Tensor};
use std::path::Path;

/// Where checkpoints and the final output keep the peer.
pub const PEER_DIR: &str = "peer_model";

pub struct Crm {
    pub peer: LoadedModel,
    pub opt: Optimizer,
    /// Fraction of each batch a model keeps once the filter is fully on.
    pub keep_ratio: f64,
    /// Fraction of the run over which the filtered fraction ramps from 0 to 1 − keep_ratio.
    pub warmup_ratio: f64,
}

/// 1.0 for the `ceil(keep · B)` pairs with the largest margins, 0.0 for the rest.
pub fn confident_mask(margins: &[f64], keep: f64) -> Vec<f64> {
    let n = ((keep * margins.len() as f64).ceil() as usize).clamp(1, margins.len());
    let mut idx: Vec<usize> = (0..margins.len()).collect();
    idx.sort_by(|&a, &b| margins[b].total_cmp(&margins[a]));
    let mut m = vec![0.0; margins.len()];
    for &i in &idx[..n] {
        m[i] = 1.0;
    }
    m
}

/// `r_w − r_l` of every pair, as f64.
fn margins(st: &SeqStats) -> Result<Vec<f64>> {
    let p = PairStats::from_stats(st)?;
    Ok((&p.policy_chosen - &p.policy_rejected)?
        .detach()
        .to_dtype(DType::F64)?
        .to_vec1()?)
}

/// `Σ l·m / Σ m`.
fn masked_mean(l: &Tensor, m: &[f64]) -> Result<Tensor> {
    let t = Tensor::new(m, l.device())?.to_dtype(l.dtype())?;
    Ok(((l * t)?.sum_all()? / m.iter().sum::<f64>())?)
}

impl Crm {
    /// The model's loss on a micro-batch, filtered by the peer's confidence; the peer's own
    /// filtered loss is backpropagated into the peer's optimizer here. Returns the model's
    /// loss and the number of pairs filtered for each.
    #[allow(clippy::too_many_arguments)]
    pub fn filtered_loss(
        &mut self,
        objective: &Objective,
        own: &SeqStats,
        own_losses: &Tensor,
        batch: &[&TokenizedExample],
        step: usize,
        total_steps: usize,
        accumulation: usize,
    ) -> Result<(Tensor, f64, f64)> {
        let pstats = group_rewards(&self.peer.transformer, batch, self.peer.tokenizer.pad_id, None)?;
        let pout = objective.loss(&pstats)?;
        // co-teaching's schedule: filter nothing at first, all of 1 − keep after the warmup
        let warmup = (self.warmup_ratio * total_steps as f64).ceil();
        let ramp = if warmup > 0.0 {
            (step as f64 / warmup).min(1.0)
        } else {
            1.0
        };
        let keep = 1.0 - (1.0 - self.keep_ratio) * ramp;
        let mask_for_self = confident_mask(&margins(&pstats)?, keep);
        let mask_for_peer = confident_mask(&margins(own)?, keep);
        let ploss = masked_mean(&pout.losses, &mask_for_peer)?;
        let mut pgrads = self.peer.transformer.backward(&(ploss / accumulation as f64)?)?;
        self.opt.accumulate(&mut pgrads)?;
        let dropped = |m: &[f64]| m.iter().filter(|&&x| x == 0.0).count() as f64;
        Ok((
            masked_mean(own_losses, &mask_for_self)?,
            dropped(&mask_for_self),
            dropped(&mask_for_peer),
        ))
    }

    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let d = dir.join(PEER_DIR);
        crate::model::hf::save_dir(&self.peer, &d)?;
        self.opt.save_file(&d.join(OPTIMIZER_FILE))
    }

    pub fn restore(&mut self, dir: &Path, optimizer_steps: u64) -> Result<()> {
        self.opt
            .load_file(&dir.join(PEER_DIR).join(OPTIMIZER_FILE), optimizer_steps)
    }
}
