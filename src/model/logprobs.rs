//! Per-token log-probabilities of completion tokens, for a padded batch, without ever
//! materialising `log_softmax` over the vocabulary for every position: only the rows that
//! predict a completion token go through the output projection, in chunks, and each row keeps
//! just `logit[target] - logsumexp(logits)`.

use super::transformer::{logsumexp_last, AttentionInputs, Transformer};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

/// Rows of hidden states sent through the output projection at once.
pub const LOGIT_CHUNK_ROWS: usize = 256;

/// One sequence to score: `ids[completion_start..]` are the scored tokens (the completion,
/// EOS included); the log-prob of token t comes from the logits at t-1.
#[derive(Clone, Debug)]
pub struct ScoredSeq {
    pub ids: Vec<u32>,
    pub completion_start: usize,
}

/// Which side padding goes on in a batch. Results do not depend on it (tested).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaddingSide {
    Left,
    Right,
}

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
    if seqs.is_empty() {
        return Err(Error::msg("sequence_logps: empty batch"));
    }
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let dev = model.device();
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut valid = Vec::with_capacity(seqs.len());
    let mut rows = Vec::new(); // flat index of the hidden row that predicts each scored token
    let mut targets = Vec::new();
    let mut offsets = vec![0usize];
    for (b, s) in seqs.iter().enumerate() {
        if s.completion_start == 0 || s.completion_start > s.ids.len() {
            return Err(Error::msg(format!(
                "sequence {b}: completion_start {} must be in 1..={} (the first token has no logits to score it)",
                s.completion_start,
                s.ids.len()
            )));
        }
        let pad = t - s.ids.len();
        let shift = if side == PaddingSide::Left { pad } else { 0 };
        let mut row_valid = vec![false; t];
        let mut row_ids = vec![0u32; t];
        for (i, &id) in s.ids.iter().enumerate() {
            row_ids[shift + i] = id;
            row_valid[shift + i] = true;
        }
        for i in s.completion_start..s.ids.len() {
            rows.push((b * t + shift + i - 1) as u32);
            targets.push(s.ids[i]);
        }
        offsets.push(targets.len());
        ids.extend(row_ids);
        valid.push(row_valid);
    }
    let cfg = &model.cfg;
    let input = Tensor::from_vec(ids, (seqs.len(), t), dev)?;
    let attn = AttentionInputs::padded(cfg, &valid, model.dtype(), dev)?;
    let hidden = model.hidden_states(&input, &attn)?;
    let hidden = hidden.reshape((seqs.len() * t, cfg.hidden_size))?;
    let (token_logps, log_sum_sq) = gather_logps_with(model, &hidden, &rows, &targets, with_sum_sq)?;
    let sums = segment_sums(&token_logps, &offsets)?;
    Ok(SeqLogps {
        token_logps,
        offsets,
        sums,
        log_sum_sq,
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
    let dev = model.device();
    let mut parts = Vec::new();
    let mut sq_parts = Vec::new();
    for (r, tg) in rows.chunks(LOGIT_CHUNK_ROWS).zip(targets.chunks(LOGIT_CHUNK_ROWS)) {
        let h = hidden.index_select(&Tensor::new(r, dev)?, 0)?;
        let logits = model.logits(&h)?; // [n, V]
        let lse = logsumexp_last(&logits)?.squeeze(1)?;
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
    Ok((Tensor::cat(&parts, 0)?, sq))
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
