//! Gradient checkpointing, layer by layer.
//!
//! With checkpointing on, each decoder layer of a model that is being trained runs as one
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

use super::transformer::{AttentionInputs, Block, Kernels, Transformer};
use crate::error::Result;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Parameter gradients that recomputed layers produce during backward.
#[derive(Debug, Default)]
pub struct GradSink(Mutex<HashMap<TensorId, Tensor>>);

impl GradSink {
    fn add(&self, id: TensorId, grad: Tensor) -> candle_core::Result<()> {
        let mut map = self
            .0
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

/// One decoder layer as a checkpointed op; see the module docs.
struct CheckpointedLayer {
    /// The layer with its parameters (variables): used to recompute in backward.
    layer: Block,
    /// The same layer with detached parameters, for the untracked forward.
    detached: Block,
    attn: AttentionInputs,
    kernels: Kernels,
    eps: f64,
    sink: Arc<GradSink>,
}

fn msg(e: crate::error::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl CustomOp1 for CheckpointedLayer {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((lo, hi)) = l.contiguous_offsets() else {
            candle_core::bail!("checkpointed-layer: the layer input must be contiguous")
        };
        let dev = candle_core::Device::Cpu;
        let x = match s {
            CpuStorage::F32(v) => Tensor::from_slice(&v[lo..hi], l.shape(), &dev)?,
            CpuStorage::F64(v) => Tensor::from_slice(&v[lo..hi], l.shape(), &dev)?,
            _ => candle_core::bail!("checkpointed-layer: only f32 and f64"),
        };
        let y = self
            .detached
            .forward(&x, &self.attn, self.kernels, self.eps)
            .map_err(msg)?
            .flatten_all()?;
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(y.to_vec1()?),
            _ => CpuStorage::F64(y.to_vec1()?),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = self
            .layer
            .forward(x.as_tensor(), &self.attn, self.kernels, self.eps)
            .map_err(msg)?;
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

/// `layer.forward(x)` as a checkpointed op whose parameter gradients go to `sink`.
pub(crate) fn checkpointed(
    layer: &Block,
    x: &Tensor,
    a: &AttentionInputs,
    kernels: Kernels,
    eps: f64,
    sink: &Arc<GradSink>,
) -> Result<Tensor> {
    let op = CheckpointedLayer {
        layer: layer.clone(),
        detached: layer.map_tensors(Tensor::detach),
        attn: a.clone(),
        kernels,
        eps,
        sink: sink.clone(),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

impl Transformer {
    /// Turn layer-by-layer gradient checkpointing on or off (see the module docs).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpoint = on.then(|| Arc::new(GradSink::default()));
    }

    /// `loss.backward()`, plus the parameter gradients of checkpointed layers: use this, not
    /// `Tensor::backward`, for a loss that depends on this model.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        if let Some(sink) = &self.checkpoint {
            let mut map = sink
                .0
                .lock()
                .map_err(|_| crate::error::Error::msg("gradient sink poisoned"))?;
            for (_, p) in self.params() {
                if let Some(g) = map.remove(&p.id()) {
                    let g = match grads.get(p) {
                        Some(other) => (other + g)?,
                        None => g,
                    };
                    grads.insert(p, g);
                }
            }
        }
        Ok(grads)
    }
}
