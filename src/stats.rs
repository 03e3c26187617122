//! Sequence statistics of preference pairs: the bridge from the model (log-probs of token
//! sequences) to the objectives (functions of summed log-probs and token counts).
//!
//! Two TRL options change the statistics themselves, so they live here rather than in any one
//! objective: `ld_alpha` (LD-DPO: tokens past the shorter completion's length count α times)
//! and `use_weighting` (WPO: each pair's loss is weighted by the policy's own per-token
//! probability of its completions, relative to `Σ_v p(v)²`).

use crate::data::TokenizedPair;
use crate::error::Result;
use crate::model::logprobs::{segment_sums, sequence_logps_with};
use crate::model::{PaddingSide, ScoredSeq, Transformer};
use candle_core::{DType, Tensor};

/// Options that change how sequence statistics are computed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatsOptions {
    /// LD-DPO's α: log π = Σ over the first min(|y_w|, |y_l|) tokens + α Σ over the rest.
    pub ld_alpha: Option<f64>,
    /// WPO weights (policy only).
    pub use_weighting: bool,
}

/// Summed completion log-probs of a batch of pairs.
#[derive(Debug)]
pub struct PairLogps {
    /// `[B]`, differentiable.
    pub chosen: Tensor,
    pub rejected: Tensor,
    /// `[B]` WPO weights ω_w·ω_l (no gradient), with `use_weighting`.
    pub weights: Option<Tensor>,
}

/// The 2B sequences of a batch of B pairs: all chosen (prompt + chosen), then all rejected.
pub fn pair_sequences(pairs: &[&TokenizedPair]) -> Vec<ScoredSeq> {
    let seq = |p: &TokenizedPair, c: &[u32]| ScoredSeq {
        ids: p.prompt_ids.iter().chain(c).copied().collect(),
        completion_start: p.prompt_ids.len(),
    };
    pairs
        .iter()
        .map(|p| seq(p, &p.chosen_ids))
        .chain(pairs.iter().map(|p| seq(p, &p.rejected_ids)))
        .collect()
}

/// Summed completion log-probs of chosen and rejected (differentiable), with the options applied.
pub fn pair_logps(model: &Transformer, pairs: &[&TokenizedPair], opts: &StatsOptions) -> Result<PairLogps> {
    let b = pairs.len();
    let lp = sequence_logps_with(model, &pair_sequences(pairs), PaddingSide::Right, opts.use_weighting)?;
    let counts = lp.counts();
    let sums = match opts.ld_alpha {
        None => lp.sums.clone(),
        Some(alpha) => {
            // token t of sequence s weighs 1 while t < min(|y_w|, |y_l|) of its pair, α after
            let mut w = Vec::with_capacity(lp.offsets[2 * b]);
            for (s, &n) in counts.iter().enumerate() {
                let pair = s % b;
                let m = counts[pair].min(counts[pair + b]);
                w.extend((0..n).map(|t| if t < m { 1.0 } else { alpha }));
            }
            let w = Tensor::new(w, lp.token_logps.device())?.to_dtype(lp.token_logps.dtype())?;
            segment_sums(&(&lp.token_logps * w)?, &lp.offsets)?
        }
    };
    let weights = match &lp.log_sum_sq {
        None => None,
        Some(sq) => {
            // ω = exp(mean_t[log p_t(y_t) − log Σ_v p_t(v)²]) per sequence, then ω_w·ω_l
            let adj = (lp.token_logps.detach() - sq)?;
            let n = Tensor::new(
                counts.iter().map(|&c| c.max(1) as f64).collect::<Vec<_>>(),
                adj.device(),
            )?
            .to_dtype(adj.dtype())?;
            let mean = (segment_sums(&adj, &lp.offsets)? / n)?;
            Some((mean.narrow(0, 0, b)? + mean.narrow(0, b, b)?)?.exp()?)
        }
    };
    Ok(PairLogps {
        chosen: sums.narrow(0, 0, b)?,
        rejected: sums.narrow(0, b, b)?,
        weights,
    })
}

/// Summed log-probs (chosen, rejected) of every pair, in batches, as f64 (no gradient kept).
pub fn score_pairs(
    model: &Transformer,
    pairs: &[TokenizedPair],
    batch_size: usize,
    opts: &StatsOptions,
    mut progress: impl FnMut(usize),
) -> Result<Vec<(f64, f64)>> {
    let opts = StatsOptions {
        use_weighting: false,
        ..opts.clone()
    };
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        let lp = pair_logps(model, &refs, &opts)?;
        let c: Vec<f64> = lp.chosen.detach().to_dtype(DType::F64)?.to_vec1()?;
        let r: Vec<f64> = lp.rejected.detach().to_dtype(DType::F64)?.to_vec1()?;
        out.extend(c.into_iter().zip(r));
        progress(chunk.len());
    }
    Ok(out)
}
