//! Per-token log-probabilities of completion tokens, for a padded batch, without ever
//! materialising `log_softmax` over the vocabulary for every position: only the rows that
//! predict a completion token go through the output projection, in chunks, and each row keeps
//! just `logit[target] - logsumexp(logits)`.

use super::transformer::{logsumexp_last, AttentionInputs, BlockMask, Transformer};
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

/// How the sequences of a batch are laid out for the forward pass. Every layout gives the same
/// log-probs (to float rounding; tested); they differ in how many token positions are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Lay out a prompt and all its responses as one unit `[prompt, r1, r2, ...]`, in which
    /// each response attends to the prompt and to itself only, with positions restarting after
    /// the prompt. The prompt is computed once instead of once per response.
    pub share_prompt: bool,
    /// Concatenate all units into one row (each attending only within itself) instead of
    /// padding every unit to the longest one.
    pub padding_free: bool,
    /// Side of the padding when not padding-free.
    pub padding_side: PaddingSide,
}

impl Layout {
    /// One padded row per sequence: the layout of TRL and transformers.
    pub const PADDED: Layout = Layout {
        share_prompt: false,
        padding_free: false,
        padding_side: PaddingSide::Right,
    };
    /// Shared prompts, packed without padding: the fastest exact layout.
    pub const PACKED: Layout = Layout {
        share_prompt: true,
        padding_free: true,
        padding_side: PaddingSide::Right,
    };
}

impl Default for Layout {
    fn default() -> Self {
        Layout::PACKED
    }
}

/// A prompt and the responses scored after it.
#[derive(Clone, Copy, Debug)]
pub struct ScoredGroup<'a> {
    pub prompt: &'a [u32],
    pub responses: &'a [Vec<u32>],
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

/// One attention unit of a layout: token ids, positions, and the segment of each token
/// (0 = prompt, k = response k).
struct Unit {
    ids: Vec<u32>,
    positions: Vec<usize>,
    segment: Vec<usize>,
}

impl Unit {
    /// Causal attention in which a response token sees the prompt and its own response.
    fn allowed(&self, i: usize, j: usize) -> bool {
        j <= i && (self.segment[j] == 0 || self.segment[j] == self.segment[i])
    }
}

/// Log-probs of every response of every group, responses in order, group after group, in one
/// forward pass with the given layout. Differentiable in the model's parameters.
pub fn group_sequence_logps(
    model: &Transformer,
    groups: &[ScoredGroup],
    layout: Layout,
    with_sum_sq: bool,
) -> Result<SeqLogps> {
    if groups.is_empty() {
        return Err(Error::msg("sequence_logps: empty batch"));
    }
    // Units, and for each scored token the (unit, index in unit) of the position predicting it.
    let mut units: Vec<Unit> = Vec::new();
    let mut scored: Vec<(usize, usize)> = Vec::new();
    let mut targets = Vec::new();
    let mut offsets = vec![0usize];
    let mut seq = 0;
    for g in groups {
        let p = g.prompt.len();
        for r in g.responses {
            if p == 0 || r.is_empty() {
                return Err(Error::msg(format!(
                    "sequence {seq}: completion_start {p} must be in 1..={} (the first token has no logits to score it)",
                    p + r.len()
                )));
            }
            seq += 1;
        }
        let per_unit: Vec<&[Vec<u32>]> = if layout.share_prompt {
            vec![g.responses]
        } else {
            g.responses.chunks(1).collect()
        };
        for rs in per_unit {
            let mut u = Unit {
                ids: g.prompt.to_vec(),
                positions: (0..p).collect(),
                segment: vec![0; p],
            };
            for (k, r) in rs.iter().enumerate() {
                let start = u.ids.len();
                for (t, &id) in r.iter().enumerate() {
                    scored.push((units.len(), if t == 0 { p - 1 } else { start + t - 1 }));
                    targets.push(id);
                    u.ids.push(id);
                    u.positions.push(p + t);
                    u.segment.push(k + 1);
                }
                offsets.push(targets.len());
            }
            units.push(u);
        }
    }
    let cfg = &model.cfg;
    let dev = model.device();
    let (input, attn, rows) = if layout.padding_free {
        let mut starts = Vec::with_capacity(units.len());
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for u in &units {
            starts.push(ids.len());
            ids.extend_from_slice(&u.ids);
            positions.extend_from_slice(&u.positions);
        }
        let preds: Vec<Box<dyn Fn(usize, usize) -> bool + '_>> = units
            .iter()
            .map(|u| Box::new(move |i, j| u.allowed(i, j)) as Box<dyn Fn(usize, usize) -> bool>)
            .collect();
        let blocks: Vec<(usize, BlockMask)> = units
            .iter()
            .zip(&preds)
            .map(|(u, f)| (u.ids.len(), f.as_ref()))
            .collect();
        let attn = AttentionInputs::packed(cfg, &positions, &blocks, model.dtype(), dev)?;
        let rows: Vec<u32> = scored.iter().map(|&(u, i)| (starts[u] + i) as u32).collect();
        let n = ids.len();
        (Tensor::from_vec(ids, (1, n), dev)?, attn, rows)
    } else {
        let t = units.iter().map(|u| u.ids.len()).max().unwrap_or(0);
        let shift = |u: &Unit| match layout.padding_side {
            PaddingSide::Left => t - u.ids.len(),
            PaddingSide::Right => 0,
        };
        let mut ids = vec![0u32; units.len() * t];
        let mut positions = vec![vec![0usize; t]; units.len()];
        for (b, u) in units.iter().enumerate() {
            let s = shift(u);
            ids[b * t + s..b * t + s + u.ids.len()].copy_from_slice(&u.ids);
            positions[b][s..s + u.ids.len()].copy_from_slice(&u.positions);
        }
        let allowed = |b: usize, i: usize, j: usize| {
            let u = &units[b];
            let s = shift(u);
            let real = |x: usize| x >= s && x < s + u.ids.len();
            i == j || real(i) && real(j) && u.allowed(i - s, j - s)
        };
        let attn = AttentionInputs::new(cfg, &positions, allowed, model.dtype(), dev)?;
        let rows: Vec<u32> = scored
            .iter()
            .map(|&(u, i)| (u * t + shift(&units[u]) + i) as u32)
            .collect();
        (Tensor::from_vec(ids, (units.len(), t), dev)?, attn, rows)
    };
    let hidden = model.hidden_states(&input, &attn)?;
    let (b, t) = input.dims2()?;
    let hidden = hidden.reshape((b * t, cfg.hidden_size))?;
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
    if !with_sum_sq && model.kernels.fused && super::fused::supported(hidden) {
        let h = hidden.index_select(&Tensor::new(rows, dev)?, 0)?;
        let bf16 = model.kernels.bf16_for(&h);
        return Ok((
            super::fused::token_logps(&h, model.output_weight(), targets, bf16)?,
            None,
        ));
    }
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
