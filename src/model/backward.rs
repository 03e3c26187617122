//! What the model adds to candle's backward pass: [`Transformer::backward`] is `loss.backward()`
//! plus the gradients that these options route around candle's graph.
//!
//! **One op per decoder layer** (`layer_op`), for a model that is being trained, with either
//! of two options:
//!
//! - *Gradient checkpointing*: the op's forward computes the layer outside the autograd graph,
//!   so only the layer's input is kept for backward; its backward recomputes the layer. Activation
//!   memory drops from every layer's intermediates to one `[rows, H]` tensor per layer, at the
//!   cost of a second forward pass of the layers.
//! - *Per-layer graphs* (`layer_graphs`): the op's forward keeps the layer's activations until
//!   its own backward has run, so they are freed layer by layer during the backward pass instead
//!   of all at its end, while the gradients are being allocated.
//!
//! Either way the layer's backward is written by hand where the fused kernels run on f32 rows
//! (`backward_by_hand`): the fused kernels' backward functions and the linear layers' products
//! in reverse order, with no autograd graph, hence none of its zero-filled gradient buffers.
//! Elsewhere (primitive ops, f64) the layer runs with a graph of its own and is backpropagated
//! through it.
//!
//! A CustomOp can only return gradients for its tensor arguments. The parameter gradients
//! therefore go into a [`GradSink`], and [`Transformer::backward`] moves them into the
//! `GradStore` that the optimizer reads.
//!
//! **Sparse embedding gradients.** candle's backward of the embedding lookup materialises a
//! dense `[vocab, H]` zero tensor, adds the rows into it, and then adds that into the tied
//! output projection's gradient: ~4 passes over 113 MB for SmolLM2 to move a few hundred rows.
//! With this option, the lookup's output is a leaf variable of the graph. [`Transformer::backward`]
//! then adds its gradient rows into the embedding's gradient in place.

use super::fused::{storage_to_tensor, tensor_to_storage};
use super::transformer::{AttentionInputs, Block, Kernels, Transformer};
use crate::error::Result;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Which of the module's options a model uses (all off by default; the trainer turns
/// `sparse_embedding_grad` and `layer_graphs` on, and `gradient_checkpointing` from the config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackwardOptions {
    pub gradient_checkpointing: bool,
    pub sparse_embedding_grad: bool,
    /// Each decoder layer keeps its activations in a graph of its own, freed as soon as the
    /// layer's backward has run (instead of when the whole backward pass ends). Same numbers,
    /// no recomputation; ignored when `gradient_checkpointing` is on.
    pub layer_graphs: bool,
}

/// A lookup's leaf output and the token ids it gathered.
type Lookup = (TensorId, Vec<u32>);

/// Gradients that bypass candle's graph until [`Transformer::backward`] collects them:
/// parameter gradients of recomputed layers, and the embedding lookups to scatter.
#[derive(Debug, Default)]
pub struct GradSink {
    params: Mutex<HashMap<TensorId, Tensor>>,
    /// Lookups since the last backward.
    lookups: Mutex<Vec<Lookup>>,
}

impl GradSink {
    fn add(&self, id: TensorId, grad: Tensor) -> candle_core::Result<()> {
        let mut map = self
            .params
            .lock()
            .map_err(|_| candle_core::Error::Msg("gradient sink poisoned".into()))?;
        let sum = match map.remove(&id) {
            Some(g) => (g + grad)?,
            None => grad,
        };
        map.insert(id, sum);
        Ok(())
    }
}

/// One decoder layer as one op of the model's graph; see the module docs.
struct CheckpointedLayer {
    /// The layer with its parameters (variables): used to recompute in backward.
    layer: Block,
    /// The same layer with detached parameters, for the untracked forward.
    detached: Block,
    attn: AttentionInputs,
    kernels: Kernels,
    eps: f64,
    sink: Arc<GradSink>,
    /// `Some` for a layer graph ([`BackwardOptions::layer_graphs`]): what the forward kept
    /// for backward, until backward takes it.
    kept: Option<Mutex<Option<Kept>>>,
}

/// What a layer op's forward keeps for its backward.
enum Kept {
    /// The input variable and the output, with the layer's own autograd graph.
    Graph(Var, Tensor),
    /// The activations [`backward_by_hand`] needs.
    Activations(Activations),
}

/// A decoder layer's activations, for its hand-written backward (fused kernels, f32): the
/// input, both norms' outputs, the projections, the attention output, the residual between the
/// two halves, and the MLP's gate, up and SwiGLU outputs.
struct Activations {
    /// The fused attention op of each block, as the forward built them.
    ops: Vec<super::transformer::FusedBlock>,
    x: Tensor,
    n1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    h: Tensor,
    n2: Tensor,
    g: Tensor,
    u: Tensor,
    s: Tensor,
}

/// The layer's forward on `x` without any autograd graph (`layer` with detached parameters),
/// keeping its [`Activations`]; `None` where the hand-written backward does not apply (not the
/// fused kernels on f32 CPU rows).
fn forward_keeping(
    layer: &Block,
    x: &Tensor,
    a: &AttentionInputs,
    k: Kernels,
    eps: f64,
) -> Result<Option<(Tensor, Activations)>> {
    if !(k.fused && x.dtype() == candle_core::DType::F32 && x.device().is_cpu()) {
        return Ok(None);
    }
    let at = &layer.self_attn;
    let n1 = k.rms_norm(x, &layer.input_layernorm, eps)?;
    let Some(ops) = at.fused_ops(&n1, a, k)? else {
        return Ok(None);
    };
    let (q, kk, v) = (
        at.q_proj.forward(&n1, k)?,
        at.k_proj.forward(&n1, k)?,
        at.v_proj.forward(&n1, k)?,
    );
    let att = super::transformer::Attention::attend_fused(&q, &kk, &v, &ops)?;
    let h = (x + at.o_proj.forward(&att, k)?)?;
    let n2 = k.rms_norm(&h, &layer.post_attention_layernorm, eps)?;
    let m = &layer.mlp;
    let (g, u) = (m.gate_proj.forward(&n2, k)?, m.up_proj.forward(&n2, k)?);
    let s = k.swiglu(&g, &u)?;
    let y = (&h + m.down_proj.forward(&s, k)?)?;
    let acts = Activations {
        ops,
        x: x.clone(),
        n1,
        q,
        k: kk,
        v,
        a: att,
        h,
        n2,
        g,
        u,
        s,
    };
    Ok(Some((y, acts)))
}

/// The input gradient of a layer kept by [`forward_keeping`], for the output gradient `dy`,
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
    use super::fused::{rms_norm_grads, swiglu_grads};
    let lin = |l: &super::transformer::Linear, x: &Tensor, dy: &Tensor| -> Result<Tensor> {
        let (dx, dw) = super::matmul::linear_bwd(x, &l.weight, dy, k.bf16)?;
        sink.add(l.weight.id(), dw)?;
        if let Some(b) = &l.bias {
            sink.add(b.id(), dy.sum(0)?)?;
        }
        Ok(dx)
    };
    let m = &layer.mlp;
    let ds = lin(&m.down_proj, &s.s, dy)?;
    let (dg, du) = swiglu_grads(&s.g, &s.u, &ds)?;
    let dn2 = (lin(&m.gate_proj, &s.n2, &dg)? + lin(&m.up_proj, &s.n2, &du)?)?;
    let (dh_norm, dw_post) = rms_norm_grads(&s.h, &layer.post_attention_layernorm, &dn2, eps)?;
    sink.add(layer.post_attention_layernorm.id(), dw_post)?;
    let dh = (dy + dh_norm)?;
    let at = &layer.self_attn;
    let da = lin(&at.o_proj, &s.a, &dh)?;
    let (dq, dk, dv) = super::transformer::Attention::attend_fused_bwd(&s.q, &s.k, &s.v, &s.ops, &da)?;
    let dn1 = ((lin(&at.q_proj, &s.n1, &dq)? + lin(&at.k_proj, &s.n1, &dk)?)? + lin(&at.v_proj, &s.n1, &dv)?)?;
    let (dx_norm, dw_in) = rms_norm_grads(&s.x, &layer.input_layernorm, &dn1, eps)?;
    sink.add(layer.input_layernorm.id(), dw_in)?;
    Ok((dh + dx_norm)?)
}

fn msg(e: crate::error::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl CustomOp1 for CheckpointedLayer {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = storage_to_tensor(s, l, self.name())?;
        if let Some(kept) = &self.kept {
            let (y, k) = match forward_keeping(&self.detached, &x, &self.attn, self.kernels, self.eps).map_err(msg)? {
                Some((y, acts)) => (y, Kept::Activations(acts)),
                None => {
                    let x = Var::from_tensor(&x)?;
                    let y = self
                        .layer
                        .forward(x.as_tensor(), &self.attn, self.kernels, self.eps)
                        .map_err(msg)?;
                    (y.clone(), Kept::Graph(x, y))
                }
            };
            let out = tensor_to_storage(&y, self.name())?;
            *kept
                .lock()
                .map_err(|_| candle_core::Error::Msg("layer graph poisoned".into()))? = Some(k);
            return Ok(out);
        }
        let y = self
            .detached
            .forward(&x, &self.attn, self.kernels, self.eps)
            .map_err(msg)?;
        tensor_to_storage(&y, self.name())
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let kept = match &self.kept {
            Some(k) => k
                .lock()
                .map_err(|_| candle_core::Error::Msg("layer graph poisoned".into()))?
                .take(),
            None => None,
        };
        // the kept activations or graph (freed at the end of this function), or the layer
        // recomputed (checkpointing)
        let kept = match kept {
            None => forward_keeping(&self.detached, &arg.detach(), &self.attn, self.kernels, self.eps)
                .map_err(msg)?
                .map(|(_, acts)| Kept::Activations(acts)),
            k => k,
        };
        let (x, y) = match kept {
            Some(Kept::Activations(acts)) => {
                let dx =
                    backward_by_hand(&self.layer, &acts, grad_res, self.kernels, self.eps, &self.sink).map_err(msg)?;
                return Ok(Some(dx));
            }
            Some(Kept::Graph(x, y)) => (x, y),
            None => {
                let x = Var::from_tensor(&arg.detach())?;
                let y = self
                    .layer
                    .forward(x.as_tensor(), &self.attn, self.kernels, self.eps)
                    .map_err(msg)?;
                (x, y)
            }
        };
        // d/dy Σ y·g = g: backpropagating this gives the layer's vector-Jacobian products
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        for p in self.layer.tensors() {
            if let Some(g) = grads.get(p) {
                self.sink.add(p.id(), g.clone())?;
            }
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}

/// `layer.forward(x)` as one op whose parameter gradients go to `sink`: recomputed in backward
/// (`keep = false`, gradient checkpointing) or kept in a graph of the layer's own until its
/// backward (`keep = true`, [`BackwardOptions::layer_graphs`]).
pub(crate) fn layer_op(
    layer: &Block,
    x: &Tensor,
    a: &AttentionInputs,
    kernels: Kernels,
    eps: f64,
    sink: &Arc<GradSink>,
    keep: bool,
) -> Result<Tensor> {
    let op = CheckpointedLayer {
        layer: layer.clone(),
        detached: layer.map_tensors(Tensor::detach),
        attn: a.clone(),
        kernels,
        eps,
        sink: sink.clone(),
        kept: keep.then(|| Mutex::new(None)),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// `dst[ids[r]] += src[r]` for every row r of `src` `[N, H]` into `dst` `[V, H]`, in place.
struct ScatterAddRows<'a>(&'a [u32]);

impl candle_core::InplaceOp2 for ScatterAddRows<'_> {
    fn name(&self) -> &'static str {
        "scatter-add-rows"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout) -> candle_core::Result<()> {
        fn go<T: Copy + std::ops::AddAssign>(dst: &mut [T], src: &[T], ids: &[u32], h: usize) {
            for (r, &t) in ids.iter().enumerate() {
                let row = &src[r * h..(r + 1) * h];
                for (d, &s) in dst[t as usize * h..(t as usize + 1) * h].iter_mut().zip(row) {
                    *d += s;
                }
            }
        }
        let (Some((d0, d1)), Some((s0, s1))) = (dl.contiguous_offsets(), sl.contiguous_offsets()) else {
            candle_core::bail!("scatter-add-rows: both tensors must be contiguous")
        };
        let h = dl.dims()[1];
        if sl.dims() != [self.0.len(), h] || self.0.iter().any(|&t| (t as usize + 1) * h > d1 - d0) {
            candle_core::bail!(
                "scatter-add-rows: shapes {:?} and {:?} do not match the ids",
                dl.dims(),
                sl.dims()
            )
        }
        match (dst, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => go(&mut d[d0..d1], &s[s0..s1], self.0, h),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => go(&mut d[d0..d1], &s[s0..s1], self.0, h),
            _ => candle_core::bail!("scatter-add-rows: only f32 and f64, of one dtype"),
        }
        Ok(())
    }
}

fn poisoned<T>(_: T) -> crate::error::Error {
    crate::error::Error::msg("gradient sink poisoned")
}

impl Transformer {
    /// Turn layer-by-layer gradient checkpointing on or off (see the module docs).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.backward_options.gradient_checkpointing = on;
    }

    /// Turn per-layer graphs on or off ([`BackwardOptions::layer_graphs`]).
    pub fn set_layer_graphs(&mut self, on: bool) {
        self.backward_options.layer_graphs = on;
    }

    /// Turn sparse embedding gradients on or off (see the module docs).
    pub fn set_sparse_embedding_grad(&mut self, on: bool) {
        self.backward_options.sparse_embedding_grad = on;
    }

    /// The embedding rows `[N, H]` of `ids` `[N]`; a leaf variable whose lookup is recorded for
    /// [`Self::backward`] when sparse embedding gradients are on and the model is trained.
    pub(crate) fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        if !(self.backward_options.sparse_embedding_grad && self.embed_tokens.is_variable()) {
            return Ok(self.embed_tokens.index_select(ids, 0)?);
        }
        let rows = Var::from_tensor(&self.embed_tokens.detach().index_select(ids, 0)?)?;
        let ids: Vec<u32> = ids.to_vec1()?;
        self.sink
            .lookups
            .lock()
            .map_err(poisoned)?
            .push((rows.as_tensor().id(), ids));
        Ok(rows.as_tensor().clone())
    }

    /// `loss.backward()`, plus the gradients that [`BackwardOptions`] route around candle's
    /// graph: use this, not `Tensor::backward`, for a loss that depends on a model with either
    /// option on. Lookups recorded by forward passes that were never backpropagated (e.g.
    /// evaluation) are dropped here.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let mut params = self.sink.params.lock().map_err(poisoned)?;
        for (_, p) in self.params() {
            if let Some(g) = params.remove(&p.id()) {
                let g = match grads.get(p) {
                    Some(other) => (other + g)?,
                    None => g,
                };
                grads.insert(p, g);
            }
        }
        let lookups = std::mem::take(&mut *self.sink.lookups.lock().map_err(poisoned)?);
        let w = &self.embed_tokens;
        for (id, ids) in lookups {
            let Some(rows) = grads.get_id(id).cloned() else {
                continue;
            };
            let dw = match grads.remove(w) {
                Some(g) => g.contiguous()?,
                None => w.zeros_like()?,
            };
            dw.inplace_op2(&rows.contiguous()?, &ScatterAddRows(&ids))?;
            grads.insert(w, dw);
        }
        Ok(grads)
    }
}
