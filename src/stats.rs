//! Sequence statistics: the bridge from the model (log-probs of token sequences) to the
//! objectives (functions of summed log-probs and token counts). Every example is a prompt with
//! one or more responses (pairwise: chosen, rejected; ranked: best first; unpaired: one), and
//! a batch's statistics are one summed log-prob per response, example after example.
//!
//! Two TRL options change the statistics themselves, so they live here rather than in any one
//! objective: `ld_alpha` (LD-DPO: tokens past the shortest response's length count α times)
//! and `use_weighting` (WPO: each example's loss is weighted by the policy's own per-token
//! probability of its responses, relative to `Σ_v p(v)²`).

use crate::data::TokenizedExample;
use crate::error::Result;
use crate::model::logprobs::segment_sums;
use crate::model::{group_sequence_logps, Layout, ScoredGroup, ScoredSeq, Transformer};
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

/// Summed completion log-probs of every response of a batch of examples.
#[derive(Debug)]
pub struct GroupLogps {
    /// `[R]`, differentiable: response k of example e is at `offsets[e] + k`.
    pub sums: Tensor,
    /// `B + 1` offsets into `sums`.
    pub offsets: Vec<usize>,
    /// Completion tokens of each response (EOS included).
    pub tokens: Vec<usize>,
    /// `[B]` WPO weights `Π_k ω_k` (no gradient), with `use_weighting`.
    pub weights: Option<Tensor>,
    /// `[R]`, differentiable: a Gaussian reward head's log σ² per response (`sums` is μ).
    pub log_variance: Option<Tensor>,
}

/// The sequences of a batch, example after example, and each example's offset.
pub fn example_sequences(examples: &[&TokenizedExample]) -> (Vec<ScoredSeq>, Vec<usize>) {
    let mut seqs = Vec::new();
    let mut offsets = vec![0];
    for e in examples {
        for r in &e.responses {
            seqs.push(ScoredSeq {
                ids: e.prompt_ids.iter().chain(r).copied().collect(),
                completion_start: e.prompt_ids.len(),
            });
        }
        offsets.push(seqs.len());
    }
    (seqs, offsets)
}

/// Token positions one forward pass over `examples` computes under `layout` (padding included).
pub fn forward_positions(examples: &[&TokenizedExample], layout: Layout) -> usize {
    let units: Vec<usize> = examples
        .iter()
        .flat_map(|e| {
            let p = e.prompt_ids.len();
            if layout.share_prompt {
                vec![p + e.responses.iter().map(Vec::len).sum::<usize>()]
            } else {
                e.responses.iter().map(|r| p + r.len()).collect()
            }
        })
        .collect();
    if layout.padding_free {
        units.iter().sum()
    } else {
        units.len() * units.iter().copied().max().unwrap_or(0)
    }
}

/// Summed log-probs of every response (differentiable), with the options applied.
pub fn group_logps(model: &Transformer, examples: &[&TokenizedExample], opts: &StatsOptions) -> Result<GroupLogps> {
    let groups: Vec<ScoredGroup> = examples
        .iter()
        .map(|e| ScoredGroup {
            prompt: &e.prompt_ids,
            responses: &e.responses,
        })
        .collect();
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
    Ok(GroupLogps {
        sums,
        offsets,
        tokens,
        weights,
        log_variance: None,
    })
}

/// A reward model's scalar reward for every response (differentiable), laid out like
/// [`GroupLogps::sums`]; `pad_id` marks padding as in transformers' sequence classification.
/// With several heads, `heads[e]` picks the head (preference cluster) of example e.
pub fn group_rewards(
    model: &Transformer,
    examples: &[&TokenizedExample],
    pad_id: u32,
    heads: Option<&[usize]>,
) -> Result<GroupLogps> {
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
    Ok(GroupLogps {
        sums,
        offsets,
        tokens,
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
        let v: Vec<f64> = g.sums.detach().to_dtype(DType::F64)?.to_vec1()?;
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
        let v: Vec<f64> = lp.sums.detach().to_dtype(DType::F64)?.to_vec1()?;
        out.extend(lp.offsets.windows(2).map(|w| v[w[0]..w[1]].to_vec()));
        progress(chunk.len());
    }
    Ok(out)
}
