//! Sequence statistics: the bridge from the model (log-probs of token sequences) to the
//! objectives (functions of summed log-probs and token counts). Every example is a prompt with
//! one or more responses (pairwise: chosen, rejected; ranked: best first; unpaired: one), and
//! a batch's statistics ([`SeqStats`], the one type objectives read) are one summed log-prob
//! per response, example after example, with the reference's beside them. Where reference
//! log-probs come from is [`reference`](mod@reference).
//!
//! Two TRL options change the statistics themselves, so they live here rather than in any one
//! objective: `ld_alpha` (LD-DPO: tokens past the shortest response's length count α times)
//! and `use_weighting` (WPO: each example's loss is weighted by the policy's own per-token
//! probability of its responses, relative to `Σ_v p(v)²`).

pub mod reference;

use crate::batch::{example_groups, example_sequences, Layout};
use crate::data::{ExampleMeta, TokenizedExample};
use crate::error::Result;
use crate::model::logprobs::segment_sums;
use crate::model::{group_sequence_logps, Transformer};
use candle_core::{DType, Tensor};

/// Options that change how sequence statistics are computed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatsOptions {
    /// LD-DPO's α: log π = Σ over the first min_k |y_k| tokens + α Σ over the rest.
    pub ld_alpha: Option<f64>,
    /// WPO weights (policy only).
    pub use_weighting: bool,
    /// How sequences are laid out for the forward pass (the values do not depend on it).
    pub layout: Layout,
}

/// Statistics of a batch of examples of any shape: one summed log-prob (or reward) per
/// response, example after example, with the reference's, token counts and the examples' labels.
#[derive(Clone, Debug)]
pub struct SeqStats {
    /// `[R]` policy log-probs (differentiable): response k of example e is at `offsets[e] + k`.
    /// A reward model's rewards (a Gaussian head's means) for reward models.
    pub policy: Tensor,
    /// `[R]` reference log-probs (no gradient); `None` for reference-free objectives.
    pub reference: Option<Tensor>,
    /// Completion tokens of each response (EOS included).
    pub tokens: Vec<usize>,
    /// `B + 1` offsets: example e owns responses `offsets[e]..offsets[e + 1]`.
    pub offsets: Vec<usize>,
    /// The examples' labels, scores, strengths, margins and annotators.
    pub meta: Vec<ExampleMeta>,
    /// `[B]` per-example loss weights (WPO's `Π_k ω_k`, `use_weighting`), no gradient.
    pub weights: Option<Tensor>,
    /// `[R]` a Gaussian reward head's log σ² per response (`policy` holds the means μ).
    pub log_variance: Option<Tensor>,
}

/// Summed log-probs of every response (differentiable), with the options applied.
pub fn group_logps(model: &Transformer, examples: &[&TokenizedExample], opts: &StatsOptions) -> Result<SeqStats> {
    let groups = example_groups(examples);
    let mut offsets = vec![0];
    for e in examples {
        offsets.push(offsets[offsets.len() - 1] + e.responses.len());
    }
    let lp = group_sequence_logps(model, &groups, opts.layout, opts.use_weighting)?;
    let tokens = lp.counts();
    let sums = match opts.ld_alpha {
        None => lp.sums.clone(),
        Some(alpha) => {
            // token t of a response weighs 1 while t < the example's shortest response, α after
            let mut w = Vec::with_capacity(lp.token_logps.dim(0)?);
            for e in 0..examples.len() {
                let group = &tokens[offsets[e]..offsets[e + 1]];
                let m = group.iter().copied().min().unwrap_or(0);
                for &n in group {
                    w.extend((0..n).map(|t| if t < m { 1.0 } else { alpha }));
                }
            }
            let w = Tensor::new(w, lp.token_logps.device())?.to_dtype(lp.token_logps.dtype())?;
            segment_sums(&(&lp.token_logps * w)?, &lp.offsets)?
        }
    };
    let weights = match &lp.log_sum_sq {
        None => None,
        Some(sq) => {
            // ω = exp(mean_t[log p_t(y_t) − log Σ_v p_t(v)²]) per response, multiplied per example
            let adj = (lp.token_logps.detach() - sq)?;
            let n = Tensor::new(
                tokens.iter().map(|&c| c.max(1) as f64).collect::<Vec<_>>(),
                adj.device(),
            )?
            .to_dtype(adj.dtype())?;
            let mean = (segment_sums(&adj, &lp.offsets)? / n)?;
            Some(segment_sums(&mean, &offsets)?.exp()?)
        }
    };
    Ok(SeqStats {
        policy: sums,
        reference: None,
        tokens,
        offsets,
        meta: examples.iter().map(|e| e.meta.clone()).collect(),
        weights,
        log_variance: None,
    })
}

/// A reward model's scalar reward for every response (differentiable), laid out like
/// [`SeqStats::policy`]; `pad_id` marks padding as in transformers' sequence classification.
/// With several heads, `heads[e]` picks the head (preference cluster) of example e.
pub fn group_rewards(
    model: &Transformer,
    examples: &[&TokenizedExample],
    pad_id: u32,
    heads: Option<&[usize]>,
) -> Result<SeqStats> {
    let (seqs, offsets) = example_sequences(examples);
    let ids: Vec<Vec<u32>> = seqs.iter().map(|s| s.ids.clone()).collect();
    let tokens = seqs.iter().map(|s| s.ids.len() - s.completion_start).collect();
    let mut log_variance = None;
    let sums = match heads {
        None if model.cfg.reward_variance => {
            let m = model.reward_matrix(&ids, pad_id)?;
            log_variance = Some(m.narrow(1, 1, 1)?.squeeze(1)?.contiguous()?);
            m.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?
        }
        None => model.rewards(&ids, pad_id)?,
        Some(h) => {
            let m = model.reward_matrix(&ids, pad_id)?;
            let idx: Vec<u32> = (0..examples.len())
                .flat_map(|e| std::iter::repeat_n(h[e] as u32, offsets[e + 1] - offsets[e]))
                .collect();
            let idx = Tensor::from_vec(idx, (seqs.len(), 1), m.device())?;
            m.gather(&idx, 1)?.squeeze(1)?
        }
    };
    Ok(SeqStats {
        policy: sums,
        reference: None,
        tokens,
        offsets,
        meta: examples.iter().map(|e| e.meta.clone()).collect(),
        weights: None,
        log_variance,
    })
}

/// Every head's reward for every response: per example, `[response][head]`, as f64.
pub fn score_reward_heads(
    model: &Transformer,
    examples: &[TokenizedExample],
    batch_size: usize,
    pad_id: u32,
) -> Result<Vec<Vec<Vec<f64>>>> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedExample> = chunk.iter().collect();
        let (seqs, offsets) = example_sequences(&refs);
        let ids: Vec<Vec<u32>> = seqs.iter().map(|s| s.ids.clone()).collect();
        let m: Vec<Vec<f64>> = model
            .reward_matrix(&ids, pad_id)?
            .detach()
            .to_dtype(DType::F64)?
            .to_vec2()?;
        out.extend(offsets.windows(2).map(|w| m[w[0]..w[1]].to_vec()));
    }
    Ok(out)
}

/// Rewards of every response of every example, in batches, as f64.
pub fn score_rewards(
    model: &Transformer,
    examples: &[TokenizedExample],
    batch_size: usize,
    pad_id: u32,
) -> Result<Vec<Vec<f64>>> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedExample> = chunk.iter().collect();
        let g = group_rewards(model, &refs, pad_id, None)?;
        let v: Vec<f64> = g.policy.detach().to_dtype(DType::F64)?.to_vec1()?;
        out.extend(g.offsets.windows(2).map(|w| v[w[0]..w[1]].to_vec()));
    }
    Ok(out)
}

/// Summed log-probs of every response of every example, in batches, as f64 (no gradient).
pub fn score_examples(
    model: &Transformer,
    examples: &[TokenizedExample],
    batch_size: usize,
    opts: &StatsOptions,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Vec<f64>>> {
    let opts = StatsOptions {
        use_weighting: false,
        ..opts.clone()
    };
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedExample> = chunk.iter().collect();
        let lp = group_logps(model, &refs, &opts)?;
        let v: Vec<f64> = lp.policy.detach().to_dtype(DType::F64)?.to_vec1()?;
        out.extend(lp.offsets.windows(2).map(|w| v[w[0]..w[1]].to_vec()));
        progress(chunk.len());
    }
    Ok(out)
}
