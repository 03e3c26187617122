//! Per-token log-probabilities of completion tokens, for a padded batch, without ever
//! materialising `log_softmax` over the vocabulary for every position: only the rows that
//! predict a completion token go through the output projection, in chunks, and each row keeps
//! just `logit[target] - logsumexp(logits)`.

use super::inputs::AttentionInputs;
use super::kernels::primitive::logsumexp_last;
use super::Transformer;
use crate::batch::{collate, Layout, PaddingSide, ScoredGroup, ScoredSeq};
use crate::error::Result;
use candle_core::{DType, Tensor};

/// Rows of hidden states sent through the output projection at once.
pub const LOGIT_CHUNK_ROWS: usize = 256;

/// Log-probs of a batch of sequences.
#[derive(Debug)]
pub struct SeqLogps {
    /// `[N]`: every scored token of every sequence, sequence after sequence.
    pub token_logps: Tensor,
    /// Sequence s owns `token_logps[offsets[s]..offsets[s + 1]]`.
    pub offsets: Vec<usize>,
    /// `[S]`: summed log-prob of each sequence's scored tokens.
    pub sums: Tensor,
    /// `[N]`, only when asked for: `log Σ_v p_t(v)²` at each scored position (no gradient),
    /// for WPO's weights.
    pub log_sum_sq: Option<Tensor>,
    /// `[N]`, only when asked for: the entropy of the distribution at each scored position
    /// (no gradient), for GRPO's `entropy` metric and `top_entropy_quantile`.
    pub entropies: Option<Vec<f64>>,
    /// `[N]`, with `entropies`: the largest log-prob at each scored position (the target is
    /// the top-1 token where its log-prob equals it).
    pub top_logps: Option<Vec<f64>>,
}

impl SeqLogps {
    pub fn counts(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

/// Score `seqs` in one padded forward pass. Differentiable in the model's parameters.
pub fn sequence_logps(model: &Transformer, seqs: &[ScoredSeq], side: PaddingSide) -> Result<SeqLogps> {
    sequence_logps_with(model, seqs, side, false)
}

/// [`sequence_logps`], optionally with `log Σ_v p_t(v)²` per scored token.
pub fn sequence_logps_with(
    model: &Transformer,
    seqs: &[ScoredSeq],
    side: PaddingSide,
    with_sum_sq: bool,
) -> Result<SeqLogps> {
    let responses: Vec<Vec<Vec<u32>>> = seqs
        .iter()
        .map(|s| vec![s.ids.get(s.completion_start..).unwrap_or(&[]).to_vec()])
        .collect();
    let groups: Vec<ScoredGroup> = seqs
        .iter()
        .zip(&responses)
        .map(|(s, r)| ScoredGroup {
            prompt: &s.ids[..s.completion_start.min(s.ids.len())],
            responses: r,
        })
        .collect();
    let layout = Layout {
        padding_side: side,
        ..Layout::PADDED
    };
    group_sequence_logps(model, &groups, layout, with_sum_sq)
}

/// Log-probs of every response of every group, responses in order, group after group, in one
/// forward pass with the given layout ([`crate::batch::collate`]). Differentiable in the
/// model's parameters.
pub fn group_sequence_logps(
    model: &Transformer,
    groups: &[ScoredGroup],
    layout: Layout,
    with_sum_sq: bool,
) -> Result<SeqLogps> {
    group_sequence_logps_at(model, groups, layout, with_sum_sq, 1.0)
}

/// [`group_sequence_logps`] of the distribution at `temperature`: `log softmax(logits / T)`,
/// what a sampler drawing at T reports (online training at T ≠ 1).
pub fn group_sequence_logps_at(
    model: &Transformer,
    groups: &[ScoredGroup],
    layout: Layout,
    with_sum_sq: bool,
    temperature: f64,
) -> Result<SeqLogps> {
    group_logps_impl(model, groups, layout, with_sum_sq, temperature, false)
}

/// [`group_sequence_logps_at`] with the entropy of the distribution (at `temperature`) at every
/// scored position, from the same pass over the logits.
pub fn group_sequence_logps_entropy(
    model: &Transformer,
    groups: &[ScoredGroup],
    layout: Layout,
    temperature: f64,
) -> Result<SeqLogps> {
    group_logps_impl(model, groups, layout, false, temperature, true)
}

fn group_logps_impl(
    model: &Transformer,
    groups: &[ScoredGroup],
    layout: Layout,
    with_sum_sq: bool,
    temperature: f64,
    with_entropy: bool,
) -> Result<SeqLogps> {
    let batch = collate(groups, layout)?;
    let dev = model.device();
    let input = Tensor::from_slice(&batch.ids, (batch.rows, batch.cols), dev)?;
    let attn = AttentionInputs::for_batch(&model.cfg, &batch, model.dtype(), dev)?;
    let hidden = model.hidden_states(&input, &attn)?;
    let hidden = hidden.reshape((batch.rows * batch.cols, model.cfg.hidden_size))?;
    // the logits are linear in the final hidden state: scaling it scales them
    let hidden = if temperature != 1.0 {
        (hidden / temperature)?
    } else {
        hidden
    };
    let (token_logps, log_sum_sq, stats) =
        gather_logps_full(model, &hidden, &batch.scored, &batch.targets, with_sum_sq, with_entropy)?;
    let sums = segment_sums(&token_logps, &batch.offsets)?;
    let (entropies, top_logps) = match stats {
        Some((e, t)) => (Some(e), Some(t)),
        None => (None, None),
    };
    Ok(SeqLogps {
        token_logps,
        offsets: batch.offsets,
        sums,
        log_sum_sq,
        entropies,
        top_logps,
    })
}

/// `log p(target | row)` for each (row, target) pair, through the output projection in chunks.
pub fn gather_logps(model: &Transformer, hidden: &Tensor, rows: &[u32], targets: &[u32]) -> Result<Tensor> {
    Ok(gather_logps_with(model, hidden, rows, targets, false)?.0)
}

/// [`gather_logps`], optionally with `log Σ_v p(v)² = logsumexp(2·logits) − 2·logsumexp(logits)`
/// per row (detached).
pub fn gather_logps_with(
    model: &Transformer,
    hidden: &Tensor,
    rows: &[u32],
    targets: &[u32],
    with_sum_sq: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (lp, sq, _) = gather_logps_full(model, hidden, rows, targets, with_sum_sq, false)?;
    Ok((lp, sq))
}

/// [`gather_logps_with`], optionally with each row's entropy and largest log-prob.
#[allow(clippy::type_complexity)]
fn gather_logps_full(
    model: &Transformer,
    hidden: &Tensor,
    rows: &[u32],
    targets: &[u32],
    with_sum_sq: bool,
    with_entropy: bool,
) -> Result<(Tensor, Option<Tensor>, Option<(Vec<f64>, Vec<f64>)>)> {
    let dev = model.device();
    if !with_sum_sq && model.kernels.fused && super::kernels::supported(hidden) {
        let h = hidden.index_select(&Tensor::new(rows, dev)?, 0)?;
        let bf16 = model.kernels.bf16_for(&h);
        let (w, sink) = (model.output_weight(), model.head_grad_sink());
        if with_entropy {
            let (lp, e, t) = super::kernels::token_logps_stats_into(&h, w, targets, bf16, sink)?;
            return Ok((lp, None, Some((e, t))));
        }
        return Ok((
            super::kernels::token_logps_into(&h, w, targets, bf16, sink)?,
            None,
            None,
        ));
    }
    let mut parts = Vec::new();
    let mut sq_parts = Vec::new();
    let mut entropies = Vec::new();
    let mut tops = Vec::new();
    for (r, tg) in rows.chunks(LOGIT_CHUNK_ROWS).zip(targets.chunks(LOGIT_CHUNK_ROWS)) {
        let h = hidden.index_select(&Tensor::new(r, dev)?, 0)?;
        let logits = model.logits(&h)?; // [n, V]
        let lse = logsumexp_last(&logits)?.squeeze(1)?;
        if with_entropy {
            // H = lse − Σ_v softmax_v · z_v
            let l = logits.detach();
            let p = l.broadcast_sub(&lse.detach().unsqueeze(1)?)?.exp()?;
            let h = (lse.detach() - (p * &l)?.sum(1)?)?;
            entropies.extend(h.to_dtype(DType::F64)?.to_vec1::<f64>()?);
            let top = (l.max(1)? - lse.detach())?;
            tops.extend(top.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        if with_sum_sq {
            let l = logits.detach();
            let lse2 = logsumexp_last(&(l * 2.0)?)?.squeeze(1)?;
            sq_parts.push((lse2 - (lse.detach() * 2.0)?)?);
        }
        let tgt = Tensor::new(tg, dev)?.unsqueeze(1)?;
        let picked = logits.gather(&tgt, 1)?.squeeze(1)?;
        parts.push((picked - lse)?);
    }
    let sq = if with_sum_sq {
        Some(Tensor::cat(&sq_parts, 0)?)
    } else {
        None
    };
    Ok((Tensor::cat(&parts, 0)?, sq, with_entropy.then_some((entropies, tops))))
}

/// Per-token log-probs (f32) of `ids[completion_start..]` for one sequence.
pub fn token_logprobs(model: &Transformer, ids: &[u32], completion_start: usize) -> Result<Vec<f32>> {
    let seq = ScoredSeq {
        ids: ids.to_vec(),
        completion_start,
    };
    let lp = sequence_logps(model, &[seq], PaddingSide::Right)?;
    Ok(lp.token_logps.to_dtype(DType::F32)?.to_vec1()?)
}

/// Sum of `x[offsets[s]..offsets[s+1]]` for each s, as a `[S]` tensor (differentiable).
pub fn segment_sums(x: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    let n = x.dim(0)?;
    let s = offsets.len() - 1;
    let mut sel = vec![0f32; s * n];
    for i in 0..s {
        for j in offsets[i]..offsets[i + 1] {
            sel[i * n + j] = 1.0;
        }
    }
    let sel = Tensor::from_vec(sel, (s, n), x.device())?.to_dtype(x.dtype())?;
    Ok(sel.matmul(&x.unsqueeze(1)?)?.squeeze(1)?)
}

/// Greedy decoding (no KV cache: every step reruns the prefix; fine for short replies).
pub fn generate_greedy(model: &Transformer, prompt: &[u32], max_new_tokens: usize, stop: &[u32]) -> Result<Vec<u32>> {
    let dev = model.device();
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new_tokens {
        let t = ids.len();
        let input = Tensor::new(ids.as_slice(), dev)?.unsqueeze(0)?;
        let attn = AttentionInputs::padded(&model.cfg, &[vec![true; t]], model.dtype(), dev)?;
        let hidden = model.hidden_states(&input, &attn)?;
        let last = hidden.narrow(1, t - 1, 1)?.reshape((1, model.cfg.hidden_size))?;
        let logits = model.logits(&last)?.to_dtype(DType::F32)?.squeeze(0)?;
        let next = logits.argmax(0)?.to_scalar::<u32>()?;
        if stop.contains(&next) {
            break;
        }
        ids.push(next);
        out.push(next);
    }
    Ok(out)
}
