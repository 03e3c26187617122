//! Positions and attention pattern of one forward pass: rotary tables and the blocks of
//! tokens that attend to each other (one block per padded batch, one per packed unit).

use super::config::ModelConfig;
use crate::batch::Collated;
use crate::error::{Error, Result};
use crate::model::kernels::AttentionPart;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// Positions and attention pattern for one forward pass over a `[B, T]` batch.
///
/// Attention is computed block by block: the tokens of a block attend only to tokens of the
/// same block (and row), as its mask allows. A padded batch is one block spanning all of `T`;
/// a padding-free (packed) row holds one block per packed unit, so no work is spent on pairs
/// of tokens that may not see each other.
#[derive(Clone, Debug)]
pub struct AttentionInputs {
    /// `[B, 1, T, D]` cos and sin of the rotary embedding at each token's position.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Blocks in order; together they cover `0..T` without overlap.
    pub blocks: Vec<AttentionBlock>,
}

/// Tokens `start..start + len` of every row, with their `[B, 1, len, len]` additive mask:
/// 0 where query i may attend key j, a large negative elsewhere.
#[derive(Clone, Debug)]
pub struct AttentionBlock {
    pub start: usize,
    pub len: usize,
    pub mask: Tensor,
    /// The same attention as dense parts that skip the pairs the mask forbids, where that
    /// saves work (a prompt shared by several responses); the fused kernel then uses them.
    pub parts: Option<Arc<Vec<AttentionPart>>>,
}

/// `allowed(query, key)` within one attention block.
pub type BlockMask<'a> = &'a dyn Fn(usize, usize) -> bool;

/// Cos and sin tables `[B, 1, T, D]` for per-row token positions.
fn rope_tables(cfg: &ModelConfig, positions: &[Vec<usize>], dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let b = positions.len();
    let t = positions.first().map_or(0, Vec::len);
    let inv = cfg.rope_inv_freq();
    let d = cfg.head_dim;
    let mut cos = Vec::with_capacity(b * t * d);
    let mut sin = Vec::with_capacity(b * t * d);
    for row in positions {
        for &p in row {
            for _half in 0..2 {
                for f in &inv {
                    let a = p as f64 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
    }
    let mk = |v: Vec<f64>| -> Result<Tensor> { Ok(Tensor::from_vec(v, (b, 1, t, d), device)?.to_dtype(dtype)?) };
    Ok((mk(cos)?, mk(sin)?))
}

/// `[B, 1, len, len]` additive mask from `allowed(row, query, key)`.
fn mask_tensor(
    rows: usize,
    len: usize,
    allowed: impl Fn(usize, usize, usize) -> bool,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut mask = Vec::with_capacity(rows * len * len);
    for bi in 0..rows {
        for i in 0..len {
            for j in 0..len {
                mask.push(if allowed(bi, i, j) { 0f32 } else { -1e9 });
            }
        }
    }
    Ok(Tensor::from_vec(mask, (rows, 1, len, len), device)?.to_dtype(dtype)?)
}

/// A block's attention as dense parts, one per run of equal `segments`: each run's queries
/// attend the runs up to it that `allowed` lets any of its queries see. `None` when the block
/// has fewer than three runs (nothing to skip), or when some allowed pair would be left out
/// (so the split never changes what is computed).
fn split_block(
    segments: &[u32],
    allowed: BlockMask,
    dtype: DType,
    device: &Device,
) -> Result<Option<Vec<AttentionPart>>> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        match runs.last_mut() {
            Some(r) if segments[r.0] == *s => r.1 += 1,
            _ => runs.push((i, 1)),
        }
    }
    if runs.len() < 3 {
        return Ok(None);
    }
    let mut parts = Vec::with_capacity(runs.len());
    for (k, &(r0, rl)) in runs.iter().enumerate() {
        // which runs any query of this one may see: only earlier runs and itself can be keys
        let seen: Vec<bool> = runs
            .iter()
            .map(|&(s, n)| (r0..r0 + rl).any(|i| (s..s + n).any(|j| allowed(i, j))))
            .collect();
        if seen[k + 1..].iter().any(|&b| b) {
            return Ok(None);
        }
        let keys: Vec<(usize, usize)> = runs[..=k]
            .iter()
            .zip(&seen)
            .filter(|(_, &b)| b)
            .map(|(&r, _)| r)
            .collect();
        let cols: Vec<usize> = keys.iter().flat_map(|&(s, n)| s..s + n).collect();
        let mut mask = Vec::with_capacity(rl * cols.len());
        for i in r0..r0 + rl {
            mask.extend(cols.iter().map(|&j| if allowed(i, j) { 0f32 } else { -1e9 }));
        }
        let mask = Tensor::from_vec(mask, (1, 1, rl, cols.len()), device)?.to_dtype(dtype)?;
        parts.push(AttentionPart {
            rows: (r0, rl),
            keys,
            mask,
        });
    }
    Ok(Some(parts))
}

impl AttentionInputs {
    /// Causal attention over a padded batch. `valid[b][t]` is true for real tokens; padding may
    /// be on either side. Positions count real tokens only (HF: `cumsum(mask) - 1`).
    pub fn padded(cfg: &ModelConfig, valid: &[Vec<bool>], dtype: DType, device: &Device) -> Result<Self> {
        // Position of a real token = number of real tokens before it; padding gets 0.
        let positions: Vec<Vec<usize>> = valid
            .iter()
            .map(|row| {
                let mut n = 0usize;
                row.iter()
                    .map(|&v| {
                        if v {
                            n += 1;
                            n - 1
                        } else {
                            0
                        }
                    })
                    .collect()
            })
            .collect();
        Self::new(
            cfg,
            &positions,
            |b, i, j| j <= i && valid[b][j] && valid[b][i] || i == j,
            dtype,
            device,
        )
    }

    /// One block over the whole batch: per-row positions and a predicate
    /// `allowed(b, query, key)`. A query row must allow at least itself (padding rows do) so no
    /// softmax row is empty.
    pub fn new(
        cfg: &ModelConfig,
        positions: &[Vec<usize>],
        allowed: impl Fn(usize, usize, usize) -> bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let t = positions.first().map_or(0, Vec::len);
        let (cos, sin) = rope_tables(cfg, positions, dtype, device)?;
        let mask = mask_tensor(positions.len(), t, allowed, dtype, device)?;
        Ok(AttentionInputs {
            cos,
            sin,
            blocks: vec![AttentionBlock {
                start: 0,
                len: t,
                mask,
                parts: None,
            }],
        })
    }

    /// A single row made of consecutive blocks (padding-free packing). `positions` covers the
    /// whole row; `blocks[k]` is `(len, allowed(query, key))` with indices local to the block.
    /// With `segments` (one per token of the row; equal neighbours form a run, as in
    /// [`Collated::segments`]), a block of three or more runs whose forbidden pairs cover whole
    /// runs is also split into dense parts ([`AttentionPart`]).
    pub fn packed(
        cfg: &ModelConfig,
        positions: &[usize],
        blocks: &[(usize, BlockMask)],
        segments: Option<&[u32]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let total: usize = blocks.iter().map(|b| b.0).sum();
        if total != positions.len() {
            return Err(Error::msg(format!(
                "packed attention: blocks cover {total} tokens but the row has {}",
                positions.len()
            )));
        }
        let (cos, sin) = rope_tables(cfg, &[positions.to_vec()], dtype, device)?;
        let mut start = 0;
        let mut out = Vec::with_capacity(blocks.len());
        for &(len, allowed) in blocks {
            let mask = mask_tensor(1, len, |_, i, j| allowed(i, j), dtype, device)?;
            let parts = match segments {
                Some(seg) => split_block(&seg[start..start + len], allowed, dtype, device)?.map(Arc::new),
                None => None,
            };
            out.push(AttentionBlock {
                start,
                len,
                mask,
                parts,
            });
            start += len;
        }
        Ok(AttentionInputs { cos, sin, blocks: out })
    }

    /// The attention inputs of a collated batch ([`crate::batch::Collated`]): one block per
    /// packed unit of a padding-free row, else one block over the padded rows.
    pub fn for_batch(cfg: &ModelConfig, batch: &Collated, dtype: DType, device: &Device) -> Result<Self> {
        if batch.packed {
            let preds: Vec<Box<dyn Fn(usize, usize) -> bool + '_>> = batch
                .blocks
                .iter()
                .map(|&(s, _)| {
                    Box::new(move |i, j| batch.allowed(0, s + i, s + j)) as Box<dyn Fn(usize, usize) -> bool>
                })
                .collect();
            let blocks: Vec<(usize, BlockMask)> = batch
                .blocks
                .iter()
                .zip(&preds)
                .map(|(&(_, len), f)| (len, f.as_ref()))
                .collect();
            Self::packed(cfg, &batch.positions, &blocks, Some(&batch.segments), dtype, device)
        } else {
            Self::new(
                cfg,
                &batch.position_rows(),
                |b, i, j| batch.allowed(b, i, j),
                dtype,
                device,
            )
        }
    }
}
