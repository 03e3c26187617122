//! One decoder layer of the Llama family (Llama, SmolLM2, Mistral, Qwen2): its parts, its one
//! forward pass, and its hand-written backward (fused kernels on f32 rows), which
//! [`crate::model::autograd`] runs inside one op for all the layers.

use crate::error::Result;
use crate::model::autograd::{GradSink, LayerCall};
use crate::model::config::ModelConfig;
use crate::model::inputs::{AttentionBlock, AttentionInputs};
use crate::model::kernels::{self, matmul, Kernels};
use crate::model::llama::LayerStore;
use crate::model::lora::{Lora, Module};
use candle_core::{DType, Tensor};
use std::borrow::Cow;
use std::sync::Arc;
/// A dense layer `y = x W^T (+ b)`, with `W` of shape `[out, in]` as in PyTorch.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// A LoRA adapter on this layer (attached per forward pass by `Transformer::layer`).
    pub lora: Option<Lora>,
    /// `Wᵀ` rounded to bf16 and packed once for `bf16 = true` products (a frozen reference's
    /// layers, [`crate::model::load::compact::PackedLayers`]): the forward pass multiplies by it
    /// instead of packing `weight` again, and `weight` is then only a placeholder of its shape.
    pub packed: Option<Arc<matmul::Rhs>>,
}

impl Linear {
    /// `x` of any rank `[..., in]`; the model's layers pass `[rows, in]`, which needs no reshape.
    /// With fused kernels or `k.bf16`, f32 CPU products run as [`matmul::linear`]
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
        let y = if let Some(rhs) = &self.packed {
            if !k.bf16_for(&x2) || x2.track_op() {
                return Err(crate::error::Error::msg(
                    "a layer packed for bf16 products runs only forward passes without gradients, with bf16 = true",
                ));
            }
            matmul::matmul_tensor(&x2, false, rhs)?
        } else if k.bf16_for(&x2) || k.fused_for(&x2) && x2.dtype() == DType::F32 {
            matmul::linear(&x2, &self.weight, k.bf16_for(&x2))?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let y = match &self.lora {
            Some(l) => (y + l.delta(&x2, k)?)?,
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
#[derive(Clone, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub(crate) n_heads: usize,
    pub(crate) n_kv_heads: usize,
    pub(crate) head_dim: usize,
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
            lora: self.lora.as_ref().map(|l| Lora {
                a: f(&l.a),
                b: f(&l.b),
                ..l.clone()
            }),
            // the weight it was packed from is not `weight`; maps keep the values (detach)
            packed: self.packed.clone(),
        }
    }

    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        std::iter::once(&self.weight)
            .chain(self.bias.as_ref())
            .chain(self.lora.iter().flat_map(|l| [&l.a, &l.b]))
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
            Ok(Linear {
                weight,
                bias,
                lora: None,
                packed: None,
            })
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
        Ok(self.run(x, a, k, eps, false)?.0)
    }

    /// Whether [`Self::run`] can keep the [`Activations`] of the hand-written backward for `x`:
    /// fused kernels on f32 CPU rows whose attention blocks the fused op covers.
    fn can_keep(&self, x: &Tensor, a: &AttentionInputs, k: Kernels) -> Result<bool> {
        Ok(k.fused && x.dtype() == DType::F32 && x.device().is_cpu() && self.self_attn.fused_applies(x, a, k)?)
    }

    /// The layer's one forward pass; with `keep` (where [`Self::can_keep`]), also the
    /// activations its hand-written backward reads.
    fn run(
        &self,
        x: &Tensor,
        a: &AttentionInputs,
        k: Kernels,
        eps: f64,
        keep: bool,
    ) -> Result<(Tensor, Option<Activations>)> {
        let n1 = k.rms_norm(x, &self.input_layernorm, eps)?;
        let AttentionPass { q, k: kk, v, ops, out } = self.self_attn.forward(&n1, a, k)?;
        let h = (x + out)?;
        let n2 = k.rms_norm(&h, &self.post_attention_layernorm, eps)?;
        let m = &self.mlp;
        let (g, u) = (m.gate_proj.forward(&n2, k)?, m.up_proj.forward(&n2, k)?);
        let s = k.swiglu(&g, &u)?;
        let y = (&h + m.down_proj.forward(&s, k)?)?;
        let kept = match ops {
            Some(ops) if keep && x.dtype() == DType::F32 => Some(Activations {
                ops,
                x: x.clone(),
                q,
                k: kk,
                v,
                h,
                g,
                u,
            }),
            _ => None,
        };
        Ok((y, kept))
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

    /// The layer's linear layers, in [`Module::ALL`]'s order.
    pub(crate) fn linears_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }

    /// The same layer with `loras[m]` on the linear layer of `Module::ALL[m]`.
    pub fn with_adapters(mut self, loras: [Option<Lora>; 7]) -> Block {
        for (lin, lora) in self.linears_mut().into_iter().zip(loras) {
            lin.lora = lora;
        }
        self
    }

    /// The linear layer of `m`.
    pub fn linear(&self, m: Module) -> &Linear {
        let (a, mlp) = (&self.self_attn, &self.mlp);
        match m {
            Module::QProj => &a.q_proj,
            Module::KProj => &a.k_proj,
            Module::VProj => &a.v_proj,
            Module::OProj => &a.o_proj,
            Module::GateProj => &mlp.gate_proj,
            Module::UpProj => &mlp.up_proj,
            Module::DownProj => &mlp.down_proj,
        }
    }

    /// The tensor at `path` inside the layer (`self_attn.q_proj.weight`, `input_layernorm.weight`).
    pub fn get(&self, path: &str) -> Option<&Tensor> {
        match path {
            "input_layernorm.weight" => return Some(&self.input_layernorm),
            "post_attention_layernorm.weight" => return Some(&self.post_attention_layernorm),
            _ => {}
        }
        let (module, field) = path.rsplit_once('.')?;
        let m = *Module::ALL.iter().find(|m| m.path() == module)?;
        let l = self.linear(m);
        match field {
            "weight" => Some(&l.weight),
            "bias" => l.bias.as_ref(),
            _ => None,
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
/// A fused attention op and the rows of its block (`None`: all rows).
type FusedBlock = (kernels::Attention, Option<(usize, usize)>);

/// What [`Attention::forward`] computed: the projections, the fused ops (if they applied), and
/// the sublayer's output.
pub(crate) struct AttentionPass {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ops: Option<Vec<FusedBlock>>,
    pub(crate) out: Tensor,
}

fn block_rows(z: &Tensor, rows: Option<(usize, usize)>) -> Result<Tensor> {
    Ok(match rows {
        Some((s, l)) => z.narrow(0, s, l)?,
        None => z.clone(),
    })
}

impl Attention {
    /// The attention sublayer on the normed rows `x` `[B·T, H]` of a `[B, T]` batch (the shape
    /// `a` describes): projections, attention (one fused node per block where the fused op
    /// applies, on the 2-D rows: a block of a packed row is a row range), output projection.
    pub(crate) fn forward(&self, x: &Tensor, a: &AttentionInputs, kern: Kernels) -> Result<AttentionPass> {
        let (q, k, v) = (
            self.q_proj.forward(x, kern)?,
            self.k_proj.forward(x, kern)?,
            self.v_proj.forward(x, kern)?,
        );
        let ops = self.fused_ops(x, a, kern)?;
        let att = match &ops {
            Some(ops) => Self::attend_fused(&q, &k, &v, ops)?,
            None => self.attend_unfused(&q, &k, &v, a, kern)?,
        };
        let out = self.o_proj.forward(&att, kern)?;
        Ok(AttentionPass { q, k, v, ops, out })
    }

    /// Attention of projected `q, k, v` rows `[B·T, heads·D]` of a `[B, T]` batch (the shape
    /// `a` describes), block by block, without the fused op (primitive ops, or several padded
    /// rows with partial blocks).
    fn attend_unfused(&self, q: &Tensor, k: &Tensor, v: &Tensor, a: &AttentionInputs, kern: Kernels) -> Result<Tensor> {
        let (b, t) = (a.cos.dim(0)?, a.cos.dim(2)?);
        let rows3 = |z: &Tensor| -> Result<Tensor> { Ok(z.reshape((b, t, z.dim(1)?))?) };
        let (q, k, v) = (rows3(q)?, rows3(k)?, rows3(v)?);
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
        Ok(out.reshape((b * t, self.n_heads * self.head_dim))?)
    }

    /// Whether the fused attention op covers `x`'s rows under `a` (see [`Self::fused_ops`]).
    fn fused_applies(&self, x: &Tensor, a: &AttentionInputs, kern: Kernels) -> Result<bool> {
        let (b, t) = (a.cos.dim(0)?, a.cos.dim(2)?);
        let whole = |blk: &AttentionBlock| blk.start == 0 && blk.len == t;
        Ok(kern.fused_for(x) && (b == 1 || a.blocks.iter().all(whole)))
    }

    /// The fused attention op of each block of `a` with its row range (`None`: the whole
    /// batch), when the fused kernel applies to `x`'s rows (one row, or blocks that span it).
    fn fused_ops(&self, x: &Tensor, a: &AttentionInputs, kern: Kernels) -> Result<Option<Vec<FusedBlock>>> {
        let (b, t) = (a.cos.dim(0)?, a.cos.dim(2)?);
        let whole = |blk: &AttentionBlock| blk.start == 0 && blk.len == t;
        if !self.fused_applies(x, a, kern)? {
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
            let op = kernels::Attention {
                cos: part(&a.cos)?,
                sin: part(&a.sin)?,
                mask: blk.mask.contiguous()?,
                batch: b,
                n_heads: self.n_heads,
                n_kv_heads: self.n_kv_heads,
                head_dim: self.head_dim,
                split: blk.parts.clone(),
                bf16: kern.bf16_attention_for(x),
            };
            ops.push((op, rows));
        }
        Ok(Some(ops))
    }

    /// Attention of projected `q, k, v` rows through the fused ops of [`Self::fused_ops`].
    fn attend_fused(q: &Tensor, k: &Tensor, v: &Tensor, ops: &[FusedBlock]) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(ops.len());
        for (op, rows) in ops {
            let p = |z: &Tensor| block_rows(z, *rows);
            outs.push(kernels::attention(&p(q)?, &p(k)?, &p(v)?, op.clone())?);
        }
        Ok(if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 0)?
        })
    }

    /// The gradients of [`Self::attend_fused`]'s `q, k, v` for the output gradient `d_out`.
    fn attend_fused_bwd(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ops: &[FusedBlock],
        d_out: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (mut dq, mut dk, mut dv) = (Vec::new(), Vec::new(), Vec::new());
        for (op, rows) in ops {
            let p = |z: &Tensor| block_rows(z, *rows);
            let (a, b, c) = kernels::attention_grads(&p(q)?, &p(k)?, &p(v)?, op, &p(d_out)?)?;
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
        if kern.bf16_attention_for(&q) {
            // the fused kernel's bf16 products: rounded operands, rounded result gradients
            use kernels::primitive::{bf16_operand, bf16_result};
            let (q, k, v) = (bf16_operand(&q)?, bf16_operand(&k)?, bf16_operand(&v)?);
            let scores = bf16_result(&q.matmul(&k.t()?.contiguous()?)?)?;
            let probs = bf16_operand(&kern.masked_softmax(&scores, mask, 1.0 / (d as f64).sqrt())?)?;
            return Ok(bf16_result(&probs.matmul(&v)?)?
                .transpose(1, 2)?
                .reshape((b, t, h * d))?);
        }
        let scores = q.matmul(&k.t()?.contiguous()?)?;
        let probs = kern.masked_softmax(&scores, mask, 1.0 / (d as f64).sqrt())?;
        Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * d))?)
    }
}
/// A decoder layer's activations, for its hand-written backward (fused kernels, f32): the
/// input, the projections, the residual between the two halves, and the MLP's gate and up
/// outputs. Both norms' outputs, the attention output and the SwiGLU output are not kept: the
/// backward makes them again from these (the same values bit for bit; the norms and SwiGLU are
/// one pass over each row, the attention output one more attention pass, cheap beside the
/// layer's products), which keeps 3264 of every 8448 floats a token costs a SmolLM2 layer out
/// of memory.
pub struct Activations {
    /// The fused attention op of each block, as the forward built them.
    ops: Vec<FusedBlock>,
    x: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    h: Tensor,
    g: Tensor,
    u: Tensor,
}
/// The input gradient of a layer kept by [`Block::run`], for the output gradient `dy`,
/// by the fused kernels' backward functions in reverse order; parameter gradients go to
/// `sink` under the ids of `layer`'s variables. No autograd graph: no zero-filled gradient
/// buffers, and each activation is read once.
fn backward_by_hand(
    layer: &Block,
    s: &Activations,
    dy: &Tensor,
    k: Kernels,
    eps: f64,
    sink: &GradSink,
) -> Result<Tensor> {
    use kernels::{rms_norm_grads, swiglu_grads};
    let lin = |l: &Linear, x: &Tensor, dy: &Tensor| -> Result<Tensor> {
        // a frozen weight (a LoRA base) gets no gradient: only the input's product runs
        let mut dx = if l.weight.is_variable() {
            let (dx, dw) = matmul::linear_bwd(x, &l.weight, dy, k.bf16)?;
            sink.add(l.weight.id(), dw)?;
            dx
        } else {
            matmul::linear_bwd_input(&l.weight, dy, k.bf16)?
        };
        if let Some(b) = l.bias.as_ref().filter(|b| b.is_variable()) {
            sink.add(b.id(), dy.sum(0)?)?;
        }
        if let Some(lora) = &l.lora {
            dx = (dx + lora.backward(x, dy, sink)?)?;
        }
        Ok(dx)
    };
    let m = &layer.mlp;
    let ds = lin(&m.down_proj, &k.swiglu(&s.g, &s.u)?, dy)?;
    let (dg, du) = swiglu_grads(&s.g, &s.u, &ds)?;
    let n2 = k.rms_norm(&s.h, &layer.post_attention_layernorm.detach(), eps)?;
    let dn2 = (lin(&m.gate_proj, &n2, &dg)? + lin(&m.up_proj, &n2, &du)?)?;
    drop(n2);
    let (dh_norm, dw_post) = rms_norm_grads(&s.h, &layer.post_attention_layernorm, &dn2, eps)?;
    if layer.post_attention_layernorm.is_variable() {
        sink.add(layer.post_attention_layernorm.id(), dw_post)?;
    }
    let dh = (dy + dh_norm)?;
    let at = &layer.self_attn;
    let a = Attention::attend_fused(&s.q, &s.k, &s.v, &s.ops)?;
    let da = lin(&at.o_proj, &a, &dh)?;
    drop(a);
    let (dq, dk, dv) = Attention::attend_fused_bwd(&s.q, &s.k, &s.v, &s.ops, &da)?;
    let n1 = k.rms_norm(&s.x, &layer.input_layernorm.detach(), eps)?;
    let dn1 = ((lin(&at.q_proj, &n1, &dq)? + lin(&at.k_proj, &n1, &dk)?)? + lin(&at.v_proj, &n1, &dv)?)?;
    drop(n1);
    let (dx_norm, dw_in) = rms_norm_grads(&s.x, &layer.input_layernorm, &dn1, eps)?;
    if layer.input_layernorm.is_variable() {
        sink.add(layer.input_layernorm.id(), dw_in)?;
    }
    Ok((dh + dx_norm)?)
}

/// Where a [`BlockCall`] gets its layer: held whole, or widened from a layer store on each use
/// (a frozen base in its stored precision: the widened weights live only while used), with
/// the layer's adapters attached.
pub enum LayerSource {
    Held(Block),
    Stored {
        store: Arc<dyn LayerStore>,
        cfg: Box<ModelConfig>,
        index: usize,
        loras: [Option<Lora>; 7],
    },
}

impl LayerSource {
    /// The layer.
    pub fn block(&self) -> Result<Cow<'_, Block>> {
        Ok(match self {
            LayerSource::Held(b) => Cow::Borrowed(b),
            LayerSource::Stored {
                store,
                cfg,
                index,
                loras,
            } => Cow::Owned(store.layer(cfg, *index)?.with_adapters(loras.clone())),
        })
    }

    /// The same source reading detached copies of its trainable tensors.
    pub fn detached(&self) -> LayerSource {
        match self {
            LayerSource::Held(b) => LayerSource::Held(b.map_tensors(Tensor::detach)),
            LayerSource::Stored {
                store,
                cfg,
                index,
                loras,
            } => LayerSource::Stored {
                store: store.clone(),
                cfg: cfg.clone(),
                index: *index,
                loras: loras.clone().map(|l| {
                    l.map(|l| Lora {
                        a: l.a.detach(),
                        b: l.b.detach(),
                        ..l
                    })
                }),
            },
        }
    }

    /// The tensors that may be trained (a stored layer's are its adapters only).
    fn params(&self) -> Vec<&Tensor> {
        match self {
            LayerSource::Held(b) => b.tensors(),
            LayerSource::Stored { loras, .. } => loras.iter().flatten().flat_map(|l| l.tensors()).collect(),
        }
    }
}

/// A layer with its attention inputs and kernels, as [`crate::model::autograd::layers_op`] runs
/// it: `layer` reads the parameters (variables), `detached` the same values outside the graph.
pub struct BlockCall {
    pub layer: LayerSource,
    pub detached: LayerSource,
    pub attn: AttentionInputs,
    pub kernels: Kernels,
    pub eps: f64,
}

impl LayerCall for BlockCall {
    type Kept = Activations;

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.layer.block()?.forward(x, &self.attn, self.kernels, self.eps)
    }

    fn forward_untracked(&self, x: &Tensor) -> Result<Tensor> {
        self.detached.block()?.forward(x, &self.attn, self.kernels, self.eps)
    }

    fn forward_keeping(&self, x: &Tensor) -> Result<Option<(Tensor, Activations)>> {
        let detached = self.detached.block()?;
        if !detached.can_keep(x, &self.attn, self.kernels)? {
            return Ok(None);
        }
        let (y, kept) = detached.run(x, &self.attn, self.kernels, self.eps, true)?;
        Ok(kept.map(|k| (y, k)))
    }

    fn backward_by_hand(&self, kept: &Activations, dy: &Tensor, sink: &GradSink) -> Result<Tensor> {
        backward_by_hand(&*self.layer.block()?, kept, dy, self.kernels, self.eps, sink)
    }

    fn params(&self) -> Vec<&Tensor> {
        self.layer.params()
    }

    fn recompute_backward(&self, x: &Tensor, dy: &Tensor, sink: &GradSink) -> Result<Option<Tensor>> {
        // a stored layer is widened once, for the recomputation and the backward both
        let (tracked, detached) = match (&self.layer, &self.detached) {
            (
                LayerSource::Stored {
                    store,
                    cfg,
                    index,
                    loras,
                },
                LayerSource::Stored { loras: plain, .. },
            ) => {
                let widened = store.layer(cfg, *index)?;
                (
                    Cow::Owned(widened.clone().with_adapters(loras.clone())),
                    Cow::Owned(widened.with_adapters(plain.clone())),
                )
            }
            _ => (self.layer.block()?, self.detached.block()?),
        };
        if !detached.can_keep(x, &self.attn, self.kernels)? {
            return Ok(None);
        }
        let (_, kept) = detached.run(x, &self.attn, self.kernels, self.eps, true)?;
        match kept {
            Some(k) => Ok(Some(backward_by_hand(&tracked, &k, dy, self.kernels, self.eps, sink)?)),
            None => Ok(None),
        }
    }
}
