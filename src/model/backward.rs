//! What the model adds to candle's backward pass: [`Transformer::backward`] is `loss.backward()`
//! plus the gradients that these two options route around candle's graph.
//!
//! **Gradient checkpointing**, layer by layer. With it on, each decoder layer of a model that is being trained runs as one
//! candle CustomOp ([`checkpointed`]). Its forward computes the layer outside the autograd
//! graph, so only the layer's input is kept for backward. Its backward recomputes the layer
//! with a graph of its own and backpropagates through it. That gives the input's gradient
//! (returned to candle's backward) and the gradients of the layer's parameters.
//!
//! A CustomOp can only return gradients for its tensor arguments. The parameter gradients
//! therefore go into a [`GradSink`], and [`Transformer::backward`] moves them into the
//! `GradStore` that the optimizer reads. Activation memory drops from every layer's
//! intermediates to one `[rows, H]` tensor per layer, at the cost of a second forward pass of
//! the layers.
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
    /// `Some` for a layer graph ([`BackwardOptions::layer_graphs`]): the forward's input
    /// variable and output, with the layer's own graph, until backward takes them.
    kept: Option<Mutex<Option<(Var, Tensor)>>>,
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
            let x = Var::from_tensor(&x)?;
            let y = self
                .layer
                .forward(x.as_tensor(), &self.attn, self.kernels, self.eps)
                .map_err(msg)?;
            let out = tensor_to_storage(&y, self.name())?;
            *kept
                .lock()
                .map_err(|_| candle_core::Error::Msg("layer graph poisoned".into()))? = Some((x, y));
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
        // the kept graph (freed at the end of this function), or the layer recomputed
        let (x, y) = match kept {
            Some(xy) => xy,
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
