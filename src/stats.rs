//! Sequence statistics of preference pairs: the bridge from the model (log-probs of token
//! sequences) to the objectives (functions of summed log-probs and token counts).

use crate::data::TokenizedPair;
use crate::error::Result;
use crate::model::{sequence_logps, PaddingSide, ScoredSeq, Transformer};
use candle_core::{DType, Tensor};

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

/// Summed completion log-probs `[B]` of chosen and rejected (differentiable).
pub fn pair_logps(model: &Transformer, pairs: &[&TokenizedPair]) -> Result<(Tensor, Tensor)> {
    let b = pairs.len();
    let lp = sequence_logps(model, &pair_sequences(pairs), PaddingSide::Right)?;
    Ok((lp.sums.narrow(0, 0, b)?, lp.sums.narrow(0, b, b)?))
}

/// Summed log-probs (chosen, rejected) of every pair, in batches, as f64 (no gradient kept).
pub fn score_pairs(
    model: &Transformer,
    pairs: &[TokenizedPair],
    batch_size: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<(f64, f64)>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        let (c, r) = pair_logps(model, &refs)?;
        let c: Vec<f64> = c.detach().to_dtype(DType::F64)?.to_vec1()?;
        let r: Vec<f64> = r.detach().to_dtype(DType::F64)?.to_vec1()?;
        out.extend(c.into_iter().zip(r));
        progress(chunk.len());
    }
    Ok(out)
}
