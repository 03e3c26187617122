//! The decoder-only transformer of the Llama family, written on candle primitive ops so that
//! every op on the training path has a backward (candle's fused `softmax_last_dim`,
//! `rms_norm` and `rope*` kernels silently drop gradients; none of them is used here).
//!
//! Weight names are exactly the Hugging Face ones (`model.layers.{i}.self_attn.q_proj.weight`),
//! and the model is built by one walk ([`Transformer::build`]) that asks a closure for each
//! named tensor, so loading, saving, casting and making trainable variables share one code path.

use super::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, D};

/// A dense layer `y = x W^T (+ b)`, with `W` of shape `[out, in]` as in PyTorch.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `x` of any rank `[..., in]`; the model's layers pass `[rows, in]`, which needs no reshape.
    /// With fused kernels or `k.bf16`, f32 CPU products run as [`super::matmul::linear`]
    /// (bf16-rounded operands with `k.bf16`).
    pub fn forward(&self, x: &Tensor, k: Kernels) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let rows = dims[..dims.len() - 1].iter().product::<usize>();
        let x2 = if dims.len() == 2 {
            x.clone()
        } else {
            x.reshape((rows, inp))?
        };
        let y = if k.bf16_for(&x2) || k.fused_for(&x2) && x2.dtype() == DType::F32 {
            super::matmul::linear(&x2, &self.weight, k.bf16_for(&x2))?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        if dims.len() == 2 {
            return Ok(y);
        }
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.weight.dim(0)?;
        Ok(y.reshape(out)?)
    }
}

/// `x / sqrt(mean(x^2) + eps) * w`, on primitives (differentiable in x and w).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// Softmax over the last dimension on primitives. The max is a constant shift (detached): the
/// result and its gradient do not depend on it.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// `log(sum(exp(x)))` over the last dimension, keeping it, on primitives.
pub fn logsumexp_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    Ok((x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?)
}

/// Which implementation of RMSNorm, RoPE, attention softmax and SwiGLU a model runs, and in
/// which precision its matmuls multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    /// Fused CPU kernels with their own backward ([`super::fused`]) where the tensor is an f32
    /// or f64 CPU tensor; primitive ops elsewhere. `false`: candle primitive ops only (the
    /// reference implementation).
    pub fused: bool,
    /// The linear layers and the log-prob head multiply bf16-rounded operands with f32 sums
    /// ([`super::matmul`], `bf16 = true`), where the tensors are f32 CPU tensors.
    pub bf16: bool,
}

impl Default for Kernels {
    fn default() -> Self {
        Kernels::FUSED
    }
}

impl Kernels {
    /// Fused kernels, f32 matmuls (the default).
    pub const FUSED: Kernels = Kernels {
        fused: true,
        bf16: false,
    };
    /// Primitive ops, f32 matmuls.
    pub const PRIMITIVE: Kernels = Kernels {
        fused: false,
        bf16: false,
    };

    fn fused_for(self, x: &Tensor) -> bool {
        self.fused && super::fused::supported(x)
    }

    /// Whether a matmul with the activation `x` runs in bf16.
    pub fn bf16_for(self, x: &Tensor) -> bool {
        self.bf16 && x.dtype() == DType::F32 && x.device().is_cpu()
    }

    pub fn rms_norm(self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        if self.fused_for(x) {
            super::fused::rms_norm(x, w, eps)
        } else {
            rms_norm(x, w, eps)
        }
    }

    pub fn rope(self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.fused_for(x) {
            super::fused::rope(x, cos, sin)
        } else {
            apply_rope(x, cos, sin)
        }
    }

    /// `softmax(scale · scores + mask)` over the last dimension.
    pub fn masked_softmax(self, scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
        if self.fused_for(scores) {
            super::fused::masked_softmax(scores, mask, scale)
        } else {
            softmax_last(&(scores * scale)?.broadcast_add(mask)?)
        }
    }

    /// `silu(g) · u`.
    pub fn swiglu(self, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        if self.fused_for(g) {
            super::fused::swiglu(g, u)
        } else {
            Ok((g.silu()? * u)?)
        }
    }
}

/// RoPE in the HF layout: `x * cos + rotate_half(x) * sin`, `rotate_half([a, b]) = [-b, a]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

#[derive(Clone, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Clone, Debug)]
pub struct Block {
    pub input_layernorm: Tensor,
    pub self_attn: Attention,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
}

impl Linear {
    fn map(&self, f: &impl Fn(&Tensor) -> Tensor) -> Linear {
        Linear {
            weight: f(&self.weight),
            bias: self.bias.as_ref().map(f),
        }
    }

    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        std::iter::once(&self.weight).chain(self.bias.as_ref())
    }
}

impl Block {
    /// Layer `i` of a model, asking `take(name, shape)` for each tensor in a fixed order.
    pub fn build(
        cfg: &ModelConfig,
        i: usize,
        take: &mut impl FnMut(String, &[usize]) -> Result<Tensor>,
    ) -> Result<Block> {
        let (hs, q, kv, is) = (
            cfg.hidden_size,
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
            cfg.intermediate_size,
        );
        let p = format!("model.layers.{i}");
        let mut lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let weight = take(format!("{p}.{name}.weight"), &[out, inp])?;
            let bias = if bias {
                Some(take(format!("{p}.{name}.bias"), &[out])?)
            } else {
                None
            };
            Ok(Linear { weight, bias })
        };
        let self_attn = Attention {
            q_proj: lin("self_attn.q_proj", q, hs, cfg.qkv_bias)?,
            k_proj: lin("self_attn.k_proj", kv, hs, cfg.qkv_bias)?,
            v_proj: lin("self_attn.v_proj", kv, hs, cfg.qkv_bias)?,
            o_proj: lin("self_attn.o_proj", hs, q, cfg.o_bias)?,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        };
        let mlp = Mlp {
            gate_proj: lin("mlp.gate_proj", is, hs, false)?,
            up_proj: lin("mlp.up_proj", is, hs, false)?,
            down_proj: lin("mlp.down_proj", hs, is, false)?,
        };
        let input_layernorm = take(format!("{p}.input_layernorm.weight"), &[hs])?;
        let post_attention_layernorm = take(format!("{p}.post_attention_layernorm.weight"), &[hs])?;
        Ok(Block {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
        })
    }

    /// `x + attn(norm(x))`, then `+ mlp(norm(·))`: one decoder layer on `[rows, H]`.
    pub fn forward(&self, x: &Tensor, a: &AttentionInputs, k: Kernels, eps: f64) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&k.rms_norm(x, &self.input_layernorm, eps)?, a, k)?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&k.rms_norm(&x, &self.post_attention_layernorm, eps)?, k)?;
        Ok((x + h)?)
    }

    /// The same layer with every tensor replaced by `f(tensor)`.
    pub fn map_tensors(&self, f: impl Fn(&Tensor) -> Tensor) -> Block {
        let a = &self.self_attn;
        let m = &self.mlp;
        Block {
            input_layernorm: f(&self.input_layernorm),
            self_attn: Attention {
                q_proj: a.q_proj.map(&f),
                k_proj: a.k_proj.map(&f),
                v_proj: a.v_proj.map(&f),
                o_proj: a.o_proj.map(&f),
                ..a.clone()
            },
            post_attention_layernorm: f(&self.post_attention_layernorm),
            mlp: Mlp {
                gate_proj: m.gate_proj.map(&f),
                up_proj: m.up_proj.map(&f),
                down_proj: m.down_proj.map(&f),
            },
        }
    }

    /// Every parameter of the layer.
    pub fn tensors(&self) -> Vec<&Tensor> {
        let a = &self.self_attn;
        let m = &self.mlp;
        [&self.input_layernorm, &self.post_attention_layernorm]
            .into_iter()
            .chain(
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
                .into_iter()
                .flat_map(Linear::tensors),
            )
            .collect()
    }
}

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
            blocks: vec![AttentionBlock { start: 0, len: t, mask }],
        })
    }

    /// A single row made of consecutive blocks (padding-free packing). `positions` covers the
    /// whole row; `blocks[k]` is `(len, allowed(query, key))` with indices local to the block.
    pub fn packed(
        cfg: &ModelConfig,
        positions: &[usize],
        blocks: &[(usize, BlockMask)],
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
            out.push(AttentionBlock { start, len, mask });
            start += len;
        }
        Ok(AttentionInputs { cos, sin, blocks: out })
    }
}

/// A fused attention op and the rows of its block (`None`: all rows).
pub(crate) type FusedBlock = (super::fused::Attention, Option<(usize, usize)>);

fn block_rows(z: &Tensor, rows: Option<(usize, usize)>) -> Result<Tensor> {
    Ok(match rows {
        Some((s, l)) => z.narrow(0, s, l)?,
        None => z.clone(),
    })
}

impl Attention {
    /// `x`: the `[B·T, H]` hidden rows of a `[B, T]` batch (the shape `a` describes).
    pub(crate) fn forward(&self, x: &Tensor, a: &AttentionInputs, kern: Kernels) -> Result<Tensor> {
        let (b, t) = (a.cos.dim(0)?, a.cos.dim(2)?);
        let (q, k, v) = (
            self.q_proj.forward(x, kern)?,
            self.k_proj.forward(x, kern)?,
            self.v_proj.forward(x, kern)?,
        );
        let out = if let Some(ops) = self.fused_ops(x, a, kern)? {
            // one fused node per block, on the 2-D rows (a block of a packed row is a row range)
            Self::attend_fused(&q, &k, &v, &ops)?
        } else {
            let rows3 = |z: &Tensor| -> Result<Tensor> { Ok(z.reshape((b, t, z.dim(1)?))?) };
            let (q, k, v) = (rows3(&q)?, rows3(&k)?, rows3(&v)?);
            let mut outs = Vec::with_capacity(a.blocks.len());
            for blk in &a.blocks {
                let part = |z: &Tensor, dim: usize| z.narrow(dim, blk.start, blk.len);
                outs.push(self.attend(
                    &part(&q, 1)?,
                    &part(&k, 1)?,
                    &part(&v, 1)?,
                    &part(&a.cos, 2)?,
                    &part(&a.sin, 2)?,
                    &blk.mask,
                    kern,
                )?);
            }
            let out = if outs.len() == 1 {
                outs.remove(0)
            } else {
                Tensor::cat(&outs, 1)?
            };
            out.reshape((b * t, self.n_heads * self.head_dim))?
        };
        self.o_proj.forward(&out, kern)
    }

    /// The fused attention op of each block of `a` with its row range (`None`: the whole
    /// batch), when the fused kernel applies to `x`'s rows (one row, or blocks that span it).
    pub(crate) fn fused_ops(&self, x: &Tensor, a: &AttentionInputs, kern: Kernels) -> Result<Option<Vec<FusedBlock>>> {
        let (b, t) = (a.cos.dim(0)?, a.cos.dim(2)?);
        let whole = |blk: &AttentionBlock| blk.start == 0 && blk.len == t;
        if !(kern.fused_for(x) && (b == 1 || a.blocks.iter().all(whole))) {
            return Ok(None);
        }
        let mut ops = Vec::with_capacity(a.blocks.len());
        for blk in &a.blocks {
            let rows = (!whole(blk)).then_some((blk.start, blk.len));
            let part = |z: &Tensor| -> Result<Tensor> {
                Ok(match rows {
                    Some((s, l)) => z.narrow(2, s, l)?.contiguous()?,
                    None => z.contiguous()?,
                })
            };
            let op = super::fused::Attention {
                cos: part(&a.cos)?,
                sin: part(&a.sin)?,
                mask: blk.mask.contiguous()?,
                batch: b,
                n_heads: self.n_heads,
                n_kv_heads: self.n_kv_heads,
                head_dim: self.head_dim,
            };
            ops.push((op, rows));
        }
        Ok(Some(ops))
    }

    /// Attention of projected `q, k, v` rows through the fused ops of [`Self::fused_ops`].
    pub(crate) fn attend_fused(q: &Tensor, k: &Tensor, v: &Tensor, ops: &[FusedBlock]) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(ops.len());
        for (op, rows) in ops {
            let p = |z: &Tensor| block_rows(z, *rows);
            outs.push(super::fused::attention(&p(q)?, &p(k)?, &p(v)?, op.clone())?);
        }
        Ok(if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 0)?
        })
    }

    /// The gradients of [`Self::attend_fused`]'s `q, k, v` for the output gradient `d_out`.
    pub(crate) fn attend_fused_bwd(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ops: &[FusedBlock],
        d_out: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (mut dq, mut dk, mut dv) = (Vec::new(), Vec::new(), Vec::new());
        for (op, rows) in ops {
            let p = |z: &Tensor| block_rows(z, *rows);
            let (a, b, c) = super::fused::attention_grads(&p(q)?, &p(k)?, &p(v)?, op, &p(d_out)?)?;
            dq.push(a);
            dk.push(b);
            dv.push(c);
        }
        let cat =
            |mut v: Vec<Tensor>| -> Result<Tensor> { Ok(if v.len() == 1 { v.remove(0) } else { Tensor::cat(&v, 0)? }) };
        Ok((cat(dq)?, cat(dk)?, cat(dv)?))
    }

    /// Attention of one block: projected `q, k, v` `[B, L, heads * D]` to `[B, L, H * D]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        kern: Kernels,
    ) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads =
            |y: &Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?) };
        let q = kern.rope(&heads(q, h)?, cos, sin)?;
        let k = kern.rope(&heads(k, kvh)?, cos, sin)?;
        let v = heads(v, kvh)?;
        let (k, v) = if h == kvh {
            (k, v)
        } else {
            let rep = h / kvh;
            let repeat = |z: Tensor| -> Result<Tensor> { Ok(Tensor::cat(&vec![&z; rep], 2)?.reshape((b, h, t, d))?) };
            (repeat(k)?, repeat(v)?)
        };
        let scores = q.matmul(&k.t()?.contiguous()?)?;
        let probs = kern.masked_softmax(&scores, mask, 1.0 / (d as f64).sqrt())?;
        Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * d))?)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, k: Kernels) -> Result<Tensor> {
        let g = self.gate_proj.forward(x, k)?;
        self.down_proj.forward(&k.swiglu(&g, &self.up_proj.forward(x, k)?)?, k)
    }
}

#[derive(Clone, Debug)]
pub struct Transformer {
    pub cfg: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    /// `None` when the output projection is tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
    /// The reward head `[1, H]` of a reward model.
    pub score: Option<Tensor>,
    /// Every parameter with its HF name, in a fixed order (the walk order of [`Self::build`]).
    params: Vec<(String, Tensor)>,
    /// Fused or primitive kernels (the same values; fused is faster and uses less memory).
    pub kernels: Kernels,
    /// What [`Transformer::backward`] adds to candle's backward (see [`super::backward`]):
    /// gradient checkpointing and sparse embedding gradients, both off by default.
    pub backward_options: super::backward::BackwardOptions,
    /// Where those leave gradients for [`Transformer::backward`].
    pub(crate) sink: std::sync::Arc<super::backward::GradSink>,
    /// A frozen model's decoder layers kept in the checkpoint's own precision and widened one
    /// layer at a time in forward (`layers` is then empty); see [`super::compact`].
    pub(crate) compact: Option<std::sync::Arc<super::compact::CompactLayers>>,
}

impl Transformer {
    /// Build the model by asking `get(name, shape)` for each parameter, in a fixed order.
    pub fn build(cfg: &ModelConfig, get: impl FnMut(&str, &[usize]) -> Result<Tensor>) -> Result<Self> {
        Self::build_parts(cfg, get, true)
    }

    /// [`Self::build`]; without the decoder layers when `with_layers` is false (their tensors
    /// are then not asked for: a model with [`CompactLayers`](super::compact::CompactLayers)).
    pub(crate) fn build_parts(
        cfg: &ModelConfig,
        mut get: impl FnMut(&str, &[usize]) -> Result<Tensor>,
        with_layers: bool,
    ) -> Result<Self> {
        let mut params = Vec::new();
        let mut take = |name: String, shape: &[usize]| -> Result<Tensor> {
            let t = get(&name, shape)?;
            if t.dims() != shape {
                return Err(Error::msg(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?} from config.json",
                    t.dims()
                )));
            }
            params.push((name, t.clone()));
            Ok(t)
        };
        let hs = cfg.hidden_size;
        let embed_tokens = take("model.embed_tokens.weight".into(), &[cfg.vocab_size, hs])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            if with_layers {
                layers.push(Block::build(cfg, i, &mut take)?);
            }
        }
        let norm = take("model.norm.weight".into(), &[hs])?;
        let (lm_head, score) = if cfg.reward_head {
            (None, Some(take("score.weight".into(), &[cfg.num_labels.max(1), hs])?))
        } else if cfg.tie_word_embeddings {
            (None, None)
        } else {
            (Some(take("lm_head.weight".into(), &[cfg.vocab_size, hs])?), None)
        };
        Ok(Transformer {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            score,
            params,
            kernels: Kernels::default(),
            backward_options: Default::default(),
            sink: Default::default(),
            compact: None,
        })
    }

    /// The decoder layers kept compact ([`super::compact`]), if this is such a frozen model.
    pub fn compact_layers(&self) -> Option<&super::compact::CompactLayers> {
        self.compact.as_deref()
    }

    /// Every parameter with its HF name (without the layers of a compact model).
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// A new model whose every parameter is `f(name, tensor)`, with the same kernels.
    pub fn map(&self, mut f: impl FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Self> {
        let mut it = self.params.iter();
        let mut m = Self::build_parts(
            &self.cfg,
            |name, _| {
                let (n, t) = it.next().ok_or_else(|| Error::msg("parameter walk mismatch"))?;
                debug_assert_eq!(n, name);
                f(name, t)
            },
            self.compact.is_none(),
        )?;
        m.compact = self.compact.clone();
        m.kernels = self.kernels;
        m.backward_options = self.backward_options;
        Ok(m)
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The output projection `[vocab, hidden]` (the embedding matrix when tied).
    pub fn output_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Final hidden states `[B, T, H]` (after the last RMSNorm) for `input_ids` `[B, T]`.
    pub fn hidden_states(&self, input_ids: &Tensor, a: &AttentionInputs) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let eps = self.cfg.rms_norm_eps;
        // the layers work on `[B·T, H]` rows: no reshapes around every projection
        let mut x = self.embed(&input_ids.flatten_all()?)?;
        let k = self.kernels;
        for i in 0..self.cfg.num_hidden_layers {
            let widened;
            let blk = match &self.compact {
                Some(c) => {
                    widened = c.layer(&self.cfg, i)?;
                    &widened
                }
                None => &self.layers[i],
            };
            let opts = self.backward_options;
            x = if (opts.gradient_checkpointing || opts.layer_graphs) && x.track_op() {
                // one op per layer: keep only the layer's input and recompute in backward
                // (checkpointing), or keep the layer's graph until its backward
                super::backward::layer_op(blk, &x, a, k, eps, &self.sink, !opts.gradient_checkpointing)?
            } else {
                blk.forward(&x, a, k, eps)?
            };
        }
        Ok(k.rms_norm(&x, &self.norm, eps)?.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Scalar rewards `[S]` of a right-padded batch: the reward head on the hidden state of each
    /// row's last token that is not `pad_id` (transformers' rule for sequence classification;
    /// a row of only pad tokens uses its last real position).
    pub fn rewards(&self, seqs: &[Vec<u32>], pad_id: u32) -> Result<Tensor> {
        let m = self.reward_matrix(seqs, pad_id)?;
        if self.cfg.reward_variance {
            // a Gaussian head's reward is its mean
            return Ok(m.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?);
        }
        if m.dim(1)? != 1 {
            return Err(Error::msg(format!(
                "this reward model has {} heads (one per preference cluster); choose one per sequence",
                m.dim(1)?
            )));
        }
        Ok(m.squeeze(1)?)
    }

    /// Rewards of every head: `[S, K]`.
    pub fn reward_matrix(&self, seqs: &[Vec<u32>], pad_id: u32) -> Result<Tensor> {
        let score = self
            .score
            .as_ref()
            .ok_or_else(|| Error::msg("this model has no reward head (score.weight)"))?;
        Ok(self.last_hidden(seqs, pad_id)?.matmul(&score.t()?)?)
    }

    /// The final hidden state `[S, H]` (after the last norm) of each right-padded sequence's
    /// last token that is not `pad_id` (a row of only pad tokens uses its last real position):
    /// what a sequence-classification head reads, and PAL's item embedding.
    pub fn last_hidden(&self, seqs: &[Vec<u32>], pad_id: u32) -> Result<Tensor> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let dev = self.device();
        let mut ids = Vec::with_capacity(seqs.len() * t);
        let mut valid = Vec::with_capacity(seqs.len());
        let mut rows = Vec::with_capacity(seqs.len());
        for (b, s) in seqs.iter().enumerate() {
            let last = s
                .iter()
                .rposition(|&x| x != pad_id)
                .unwrap_or(s.len().saturating_sub(1));
            rows.push((b * t + last) as u32);
            ids.extend(s.iter().copied().chain(std::iter::repeat_n(pad_id, t - s.len())));
            valid.push((0..t).map(|i| i < s.len()).collect::<Vec<bool>>());
        }
        let input = Tensor::from_vec(ids, (seqs.len(), t), dev)?;
        let attn = AttentionInputs::padded(&self.cfg, &valid, self.dtype(), dev)?;
        let hidden = self
            .hidden_states(&input, &attn)?
            .reshape((seqs.len() * t, self.cfg.hidden_size))?;
        Ok(hidden.index_select(&Tensor::new(rows, dev)?, 0)?)
    }

    /// Logits `[N, V]` for hidden rows `[N, H]` (bf16 products with `kernels.bf16`).
    pub fn logits(&self, hidden_rows: &Tensor) -> Result<Tensor> {
        if self.kernels.bf16_for(hidden_rows) {
            return super::matmul::linear(hidden_rows, self.output_weight(), true);
        }
        Ok(hidden_rows.matmul(&self.output_weight().t()?)?)
    }
}
