//! Optimizers over flat buffers: AdamW (PyTorch's `AdamW` arithmetic) and SGD, with
//! global-norm clipping (`clip_grad_norm_`). With one micro-batch per step the gradients are
//! used where backward left them (no copy); with accumulation they are summed on the host in
//! f32. The update is one parallel pass per parameter that writes the weights in place.

pub mod schedule;

/// The file a checkpoint keeps an optimizer's state in.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

use crate::error::{Error, Result};
use candle_core::{backprop::GradStore, CpuStorage, DType, InplaceOp1, Layout, Tensor, Var};
use rayon::prelude::*;
use std::cell::RefCell;

/// A parameter's gradient for the current step.
#[derive(Debug, Default)]
pub enum Grad {
    /// No backward pass yet this step.
    #[default]
    None,
    /// The tensor backward produced (one micro-batch so far).
    Tensor(Tensor),
    /// A sum over micro-batches.
    Host(Vec<f32>),
}

/// Run `f` on the f32 contents of `t` (in place when `t` is a contiguous f32 CPU tensor).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.flatten_all()?.to_dtype(DType::F32)?.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match (&*st, l.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => {
            drop(st);
            Ok(f(&t.to_vec1::<f32>()?))
        }
    }
}

impl Grad {
    /// Run `f` on the gradient's values; `None` when there is none.
    fn with<R>(&self, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
        match self {
            Grad::None => Ok(None),
            Grad::Tensor(t) => with_f32(t, f).map(Some),
            Grad::Host(v) => Ok(Some(f(v))),
        }
    }
}

/// Applies `f` to an f32 CPU tensor's storage in place.
struct InPlace<F: FnMut(&mut [f32])>(RefCell<F>);

impl<F: FnMut(&mut [f32])> InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "optimizer-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => {
                (self.0.borrow_mut())(&mut v[a..b]);
                Ok(())
            }
            _ => candle_core::bail!("optimizer: parameters must be contiguous f32 CPU tensors"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum OptimKind {
    AdamW { beta1: f64, beta2: f64, eps: f64 },
    Sgd,
}

/// One trainable parameter with its optimizer state.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Accumulated gradient for the current step.
    pub grad: Grad,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub decay: bool,
}

pub struct Optimizer {
    pub kind: OptimKind,
    pub weight_decay: f64,
    pub params: Vec<Param>,
    /// Optimizer steps taken.
    pub t: u64,
    /// Factor applied to the accumulated gradient in the next step (global-norm clipping).
    pub grad_scale: f32,
}

impl Optimizer {
    pub fn new(kind: OptimKind, weight_decay: f64, vars: Vec<(String, Var)>) -> Self {
        let adam = matches!(kind, OptimKind::AdamW { .. });
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let n = var.as_tensor().elem_count();
                let decay = !(name.ends_with(".bias") || name.contains("norm"));
                Param {
                    name,
                    var,
                    grad: Grad::None,
                    m: if adam { vec![0.0; n] } else { vec![] },
                    v: if adam { vec![0.0; n] } else { vec![] },
                    decay,
                }
            })
            .collect();
        Optimizer {
            kind,
            weight_decay,
            params,
            t: 0,
            grad_scale: 1.0,
        }
    }

    /// Forget the accumulated gradient (and free its memory until the next backward pass).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.grad = Grad::None;
        }
        self.grad_scale = 1.0;
    }

    /// Add the gradients of one backward pass to the accumulators. Each gradient is taken out
    /// of `grads`; the first is kept as it is, later ones are summed on the host.
    pub fn accumulate(&mut self, grads: &mut GradStore) -> Result<()> {
        for p in &mut self.params {
            let g = grads
                .remove(p.var.as_tensor())
                .ok_or_else(|| Error::msg(format!("parameter `{}` received no gradient", p.name)))?;
            p.grad = match std::mem::take(&mut p.grad) {
                Grad::None => Grad::Tensor(g),
                Grad::Tensor(first) => {
                    let mut sum: Vec<f32> = first.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                    with_f32(&g, |g| sum.par_iter_mut().zip(g.par_iter()).for_each(|(a, b)| *a += b))?;
                    Grad::Host(sum)
                }
                Grad::Host(mut sum) => {
                    with_f32(&g, |g| sum.par_iter_mut().zip(g.par_iter()).for_each(|(a, b)| *a += b))?;
                    Grad::Host(sum)
                }
            };
        }
        Ok(())
    }

    /// Global L2 norm of the accumulated gradient (before clipping).
    pub fn grad_norm(&self) -> Result<f64> {
        let mut total = 0.0;
        for p in &self.params {
            total += p
                .grad
                .with(|g| g.par_iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>())?
                .unwrap_or(0.0);
        }
        Ok(total.sqrt())
    }

    /// Clip to `max_norm` like `torch.nn.utils.clip_grad_norm_`; returns the norm before
    /// clipping. The scaling is applied inside [`Self::step`] (no separate pass).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.grad_norm()?;
        self.grad_scale = 1.0;
        if max_norm > 0.0 {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                self.grad_scale = coef as f32;
            }
        }
        Ok(norm)
    }

    /// Apply one update with learning rate `lr`, writing the weights in place: one parallel
    /// pass over weight, gradient and moments per parameter.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let wd = self.weight_decay;
        let scale = self.grad_scale;
        let kind = self.kind.clone();
        for p in &mut self.params {
            let n = p.var.as_tensor().elem_count();
            let (m, v) = (&mut p.m, &mut p.v);
            let decay = p.decay;
            let applied = p.grad.with(|g| -> Result<()> {
                if g.len() != n {
                    return Err(Error::msg(format!(
                        "parameter `{}`: gradient size {} != {n}",
                        p.name,
                        g.len()
                    )));
                }
                let chunk = (n / (4 * rayon::current_num_threads())).max(1 << 14);
                let update = |w: &mut [f32]| match kind {
                    OptimKind::AdamW { beta1, beta2, eps } => {
                        let bc1 = 1.0 - beta1.powi(t);
                        let bc2_sqrt = ((1.0 - beta2.powi(t)).sqrt()) as f32;
                        let step = (lr / bc1) as f32;
                        let decay = if decay { (1.0 - lr * wd) as f32 } else { 1.0 };
                        let (b1, b2, eps) = (beta1 as f32, beta2 as f32, eps as f32);
                        w.par_chunks_mut(chunk)
                            .zip(g.par_chunks(chunk))
                            .zip(m.par_chunks_mut(chunk))
                            .zip(v.par_chunks_mut(chunk))
                            .for_each(|(((w, g), m), v)| {
                                for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                                    let g = g * scale;
                                    *m = b1 * *m + (1.0 - b1) * g;
                                    *v = b2 * *v + (1.0 - b2) * g * g;
                                    let denom = v.sqrt() / bc2_sqrt + eps;
                                    *w = *w * decay - step * *m / denom;
                                }
                            });
                    }
                    OptimKind::Sgd => {
                        let wd = if decay { wd as f32 } else { 0.0 };
                        let lr = lr as f32;
                        w.par_chunks_mut(chunk).zip(g.par_chunks(chunk)).for_each(|(w, g)| {
                            for (w, &g) in w.iter_mut().zip(g) {
                                *w -= lr * (g * scale + wd * *w);
                            }
                        });
                    }
                };
                Ok(p.var.as_tensor().inplace_op1(&InPlace(RefCell::new(update)))?)
            })?;
            match applied {
                Some(r) => r?,
                None => {
                    return Err(Error::msg(format!(
                        "parameter `{}` has no accumulated gradient: call accumulate() before step()",
                        p.name
                    )))
                }
            }
        }
        Ok(())
    }

    /// Optimizer state as named tensors (for checkpoints).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for p in &self.params {
            let shape = p.var.as_tensor().shape();
            if !p.m.is_empty() {
                out.push((
                    format!("exp_avg.{}", p.name),
                    Tensor::from_slice(&p.m, shape, &candle_core::Device::Cpu)?,
                ));
                out.push((
                    format!("exp_avg_sq.{}", p.name),
                    Tensor::from_slice(&p.v, shape, &candle_core::Device::Cpu)?,
                ));
            }
        }
        Ok(out)
    }

    /// Restore from [`Self::state_tensors`].
    /// Write the optimizer state ([`Self::state_tensors`]) as a safetensors file, atomically.
    pub fn save_file(&self, path: &std::path::Path) -> Result<()> {
        crate::util::write_atomic(
            path,
            &crate::model::hf::model_safetensors_bytes(&self.state_tensors()?)?,
        )
    }

    /// Restore the state [`Self::save_file`] wrote, after `steps` updates; a missing file is a
    /// fresh state (a checkpoint of SGD has none).
    pub fn load_file(&mut self, path: &std::path::Path, steps: u64) -> Result<()> {
        let tensors = if path.is_file() {
            candle_core::safetensors::load(path, &candle_core::Device::Cpu)
                .map_err(|e| Error::model(path, e.to_string()))?
        } else {
            Default::default()
        };
        self.load_state(tensors, steps)
    }

    pub fn load_state(&mut self, mut tensors: std::collections::HashMap<String, Tensor>, t: u64) -> Result<()> {
        self.t = t;
        for p in &mut self.params {
            if p.m.is_empty() {
                continue;
            }
            for (key, buf) in [("exp_avg", &mut p.m), ("exp_avg_sq", &mut p.v)] {
                let name = format!("{key}.{}", p.name);
                let tns = tensors
                    .remove(&name)
                    .ok_or_else(|| Error::msg(format!("optimizer state lacks `{name}`")))?;
                *buf = tns.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two AdamW steps against the formula in f64, with clipping and weight decay.
    #[test]
    fn adamw_matches_pytorch_arithmetic() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(
            OptimKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            0.1,
            vec![("w".into(), var.clone())],
        );
        let (mut w, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        let grads = [[3.0f64, 4.0], [-1.0, 0.5]];
        for (step, g) in grads.iter().enumerate() {
            opt.zero_grad();
            opt.params[0].grad = Grad::Host(g.iter().map(|&x| x as f32).collect());
            let norm = opt.clip_grad_norm(1.0).unwrap();
            let gn = (g[0] * g[0] + g[1] * g[1]).sqrt();
            assert!((norm - gn).abs() < 1e-6);
            let coef = (1.0 / (gn + 1e-6)).min(1.0);
            opt.step(0.01).unwrap();
            let t = (step + 1) as i32;
            for i in 0..2 {
                let gi = g[i] * coef;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.999 * v[i] + 0.001 * gi * gi;
                w[i] *= 1.0 - 0.01 * 0.1;
                w[i] -= 0.01 / (1.0 - 0.9f64.powi(t)) * m[i] / (v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - w[i]).abs() < 1e-6, "{} vs {}", got[i], w[i]);
        }
    }

    #[test]
    fn sgd_and_no_decay_on_norms() {
        let w = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let n = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(
            OptimKind::Sgd,
            0.5,
            vec![("a.weight".into(), w.clone()), ("model.norm.weight".into(), n.clone())],
        );
        opt.params[0].grad = Grad::Host(vec![2.0]);
        opt.params[1].grad = Grad::Host(vec![2.0]);
        opt.step(0.1).unwrap();
        assert!((w.as_tensor().to_vec1::<f32>().unwrap()[0] - (1.0 - 0.1 * 2.5)).abs() < 1e-7);
        assert!((n.as_tensor().to_vec1::<f32>().unwrap()[0] - 0.8).abs() < 1e-7);
    }
}
