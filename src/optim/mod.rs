//! Optimizers over flat buffers: AdamW (PyTorch's `AdamW` arithmetic) and SGD, with
//! global-norm clipping (`clip_grad_norm_`). With one micro-batch per step the gradients are
//! used where backward left them (no copy); with accumulation they are summed on the host in
//! f32. The update is one parallel pass per parameter that writes the weights in place.

pub mod schedule;

/// The file a checkpoint keeps an optimizer's state in.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

use crate::error::{Error, Result};
use candle_core::{backprop::GradStore, CpuStorage, DType, InplaceOp1, Layout, Tensor, TensorId, Var};
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
    /// Only its squared norm `sq` (`optimizer_in_backward`): the gradient was dropped after a
    /// first backward pass measured it, and a second pass computes it again and hands it to
    /// [`Optimizer::update_streamed`], whole or a run of rows at a time, in order; `done` values
    /// are updated so far (when all are, `None`).
    Streamed { sq: f64, done: usize },
}

/// Run `f` on the f32 contents of `t` (in place when `t` is a contiguous f32 CPU tensor).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
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
    /// Run `f` on the gradient's values; `None` when there is none (or only its norm).
    fn with<R>(&self, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
        match self {
            Grad::None | Grad::Streamed { .. } => Ok(None),
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

/// `Σ g²` in f64, in 8 independent lanes (so the loop vectorises), compiled a second time for
/// AVX2 and chosen at run time. With the fixed chunks of [`Optimizer::grad_norm`], added in
/// order, the norm is the same whatever the number of threads.
fn sum_of_squares(g: &[f32]) -> f64 {
    #[inline(always)]
    fn imp(g: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let chunks = g.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                acc[i] += (c[i] as f64) * (c[i] as f64);
            }
        }
        for (a, &x) in acc.iter_mut().zip(rest) {
            *a += (x as f64) * (x as f64);
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v3(g: &[f32]) -> f64 {
            imp(g)
        }
        if crate::model::kernels::CpuPath::Avx2.allows() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time); no fusing, same values.
            return unsafe { v3(g) };
        }
    }
    imp(g)
}

/// `Σ g²` of each row of `row` values of `g` (the last one may be shorter), computed in
/// parallel.
pub(crate) fn row_sums_of_squares(g: &[f32], row: usize) -> Vec<f64> {
    g.par_chunks(row.max(1)).map(sum_of_squares).collect()
}

/// `Σ g²` of a gradient whose rows have `row` values: each row's sum, added in row order, so
/// it is the same whatever the threads, and wherever it is computed ([`Optimizer::grad_norm`],
/// and the first pass of `optimizer_in_backward`, which may have a matrix's rows one block at a
/// time: the sums agree to the bit).
pub(crate) fn squared_norm_of(g: &[f32], row: usize) -> f64 {
    row_sums_of_squares(g, row).iter().sum()
}

/// The length of a row of `t` (its last dimension; 1 for a scalar): the rows of its norm.
pub(crate) fn row_len(t: &Tensor) -> usize {
    t.dims().last().copied().unwrap_or(1)
}

/// [`squared_norm_of`] a gradient tensor.
pub(crate) fn squared_norm(g: &Tensor) -> Result<f64> {
    with_f32(g, |v| squared_norm_of(v, row_len(g)))
}

/// The scalars of one AdamW update of a parameter (PyTorch's `AdamW` arithmetic, f32).
struct AdamConsts {
    /// The clipping factor applied to the gradient.
    scale: f32,
    b1: f32,
    b2: f32,
    /// `sqrt(1 - beta2^t)`.
    bc2_sqrt: f32,
    eps: f32,
    /// `1 - lr * weight_decay` (1 without decay).
    decay: f32,
    /// `lr / (1 - beta1^t)`.
    step: f32,
}

impl AdamConsts {
    /// One element's update from its gradient and moments (f32 whatever the moments are
    /// stored in); returns the new moments.
    #[inline(always)]
    fn update(&self, w: &mut f32, g: f32, m: f32, v: f32) -> (f32, f32) {
        let g = g * self.scale;
        let m = self.b1 * m + (1.0 - self.b1) * g;
        let v = self.b2 * v + (1.0 - self.b2) * g * g;
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        *w = *w * self.decay - self.step * m / denom;
        (m, v)
    }
}

/// AdamW on f32 moments, in place ([`AdamConsts::update`] per element); compiled a second time
/// for AVX2, chosen at run time (the crate targets the baseline, whose loop ran 4 lanes at a
/// time and took 0.25 s per step of SmolLM2-135M on a 2-vCPU EPYC).
fn adamw_f32(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamConsts) {
    #[inline(always)]
    fn imp(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamConsts) {
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            (*m, *v) = c.update(w, g, *m, *v);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v3(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamConsts) {
            imp(w, g, m, v, c)
        }
        if crate::model::kernels::CpuPath::Avx2.allows() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time). Rust never fuses a
            // multiply and an add on its own, so the values equal the baseline loop's.
            return unsafe { v3(w, g, m, v, c) };
        }
    }
    imp(w, g, m, v, c)
}

/// One optimizer step's update of one parameter: the step's constants.
struct UpdateOf<'a> {
    kind: &'a OptimKind,
    /// The step's number (1 for the first).
    t: u64,
    lr: f64,
    weight_decay: f64,
    /// The clipping factor.
    scale: f32,
    /// The parameter's index (bf16 moments' rounding bits depend on it).
    pid: usize,
}

impl<'a> UpdateOf<'a> {
    fn of(kind: &'a OptimKind, t: u64, lr: f64, weight_decay: f64, scale: f32, pid: usize) -> Self {
        UpdateOf {
            kind,
            t,
            lr,
            weight_decay,
            scale,
            pid,
        }
    }

    /// Update values `offset..offset + g.len()` of `var` (named `name`) in place from their
    /// gradient `g`, and the same values of its moments; `offset` 0 with the whole gradient for
    /// the whole parameter.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        name: &str,
        var: &Var,
        m: &mut Moment,
        v: &mut Moment,
        decay: bool,
        offset: usize,
        g: &[f32],
    ) -> Result<()> {
        let total = var.as_tensor().elem_count();
        if offset + g.len() > total {
            return Err(Error::msg(format!(
                "parameter `{name}`: gradient values {offset}..{} of {total}",
                offset + g.len()
            )));
        }
        let n = g.len();
        let range = offset..offset + n;
        let (t, lr, wd, scale) = (self.t as i32, self.lr, self.weight_decay, self.scale);
        let chunk = (n / (4 * rayon::current_num_threads())).max(1 << 14);
        let update = |w: &mut [f32]| match *self.kind {
            OptimKind::AdamW { beta1, beta2, eps, .. } => {
                let bc1 = 1.0 - beta1.powi(t);
                let bc2_sqrt = ((1.0 - beta2.powi(t)).sqrt()) as f32;
                let step = (lr / bc1) as f32;
                let decay = if decay { (1.0 - lr * wd) as f32 } else { 1.0 };
                let adam = AdamConsts {
                    scale,
                    b1: beta1 as f32,
                    b2: beta2 as f32,
                    bc2_sqrt,
                    eps: eps as f32,
                    decay,
                    step,
                };
                let w = &mut w[range.clone()];
                match (&mut *m, &mut *v) {
                    (Moment::F32(m), Moment::F32(v)) => w
                        .par_chunks_mut(chunk)
                        .zip(g.par_chunks(chunk))
                        .zip(m[range.clone()].par_chunks_mut(chunk))
                        .zip(v[range.clone()].par_chunks_mut(chunk))
                        .for_each(|(((w, g), m), v)| adamw_f32(w, g, m, v, &adam)),
                    (Moment::Bf16(m), Moment::Bf16(v)) => {
                        let key = rounding_key(t as u64, self.pid as u64);
                        w.par_chunks_mut(chunk)
                            .zip(g.par_chunks(chunk))
                            .zip(m[range.clone()].par_chunks_mut(chunk))
                            .zip(v[range.clone()].par_chunks_mut(chunk))
                            .enumerate()
                            .for_each(|(c, (((w, g), m), v))| {
                                let items = w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
                                for (j, (((w, &g), m), v)) in items.enumerate() {
                                    let (nm, nv) = adam.update(w, g, bf16_to_f32(*m), bf16_to_f32(*v));
                                    // the value's index in the parameter, wherever the part starts
                                    let r = rounding_bits(key, (offset + c * chunk + j) as u32);
                                    *m = bf16_stochastic(nm, r);
                                    *v = bf16_stochastic(nv, r >> 16);
                                }
                            })
                    }
                    _ => unreachable!("both moments share one dtype"),
                }
            }
            OptimKind::Sgd => {
                let wd = if decay { wd as f32 } else { 0.0 };
                let lr = lr as f32;
                w[range.clone()]
                    .par_chunks_mut(chunk)
                    .zip(g.par_chunks(chunk))
                    .for_each(|(w, g)| {
                        for (w, &g) in w.iter_mut().zip(g) {
                            *w -= lr * (g * scale + wd * *w);
                        }
                    });
            }
        };
        Ok(var.as_tensor().inplace_op1(&InPlace(RefCell::new(update)))?)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum OptimKind {
    /// `bf16_moments`: keep the two moments in bf16 ([`Moment::Bf16`]).
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
        bf16_moments: bool,
    },
    Sgd,
}

/// One of AdamW's moments of a parameter: f32, or bf16 (half the memory) stored with
/// stochastic rounding. Round to nearest would lose the moments' small updates: with β₂ =
/// 0.999 each step moves v by 0.1 %, under bf16's resolution of 0.4 %, so v would stop moving.
/// Rounding up with probability equal to the remainder keeps every update in expectation. The
/// random bits are a hash of (step, parameter, element), so runs and resumes repeat.
#[derive(Clone, Debug)]
pub enum Moment {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl Moment {
    fn zeros(n: usize, bf16: bool) -> Moment {
        match bf16 {
            true => Moment::Bf16(vec![0; n]),
            false => Moment::F32(vec![0.0; n]),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Moment::F32(v) => v.len(),
            Moment::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32 (exact for bf16).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Moment::F32(v) => v.clone(),
            Moment::Bf16(v) => v.iter().map(|&b| bf16_to_f32(b)).collect(),
        }
    }
}

#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `x` rounded to bf16 up or down with the probability that keeps its expectation: `r` is 16
/// random bits added below the kept ones. Infinities and NaN keep their kind.
#[inline(always)]
pub fn bf16_stochastic(x: f32, r: u32) -> u16 {
    if !x.is_finite() {
        return ((x.to_bits() >> 16) as u16) | if x.is_nan() { 0x40 } else { 0 };
    }
    (x.to_bits().wrapping_add(r & 0xffff) >> 16) as u16
}

/// The key of step `t`'s rounding bits for parameter `param` (SplitMix64's finaliser).
fn rounding_key(t: u64, param: u64) -> u32 {
    let mut z = t
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(param.wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}

/// 32 random bits for element `i` under `key` (a 32-bit integer hash, "lowbias32"): the low
/// 16 round the first moment, the high 16 the second.
#[inline(always)]
fn rounding_bits(key: u32, i: u32) -> u32 {
    let mut x = i ^ key;
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// One trainable parameter with its optimizer state.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Accumulated gradient for the current step.
    pub grad: Grad,
    /// AdamW's first and second moments (empty for SGD).
    pub m: Moment,
    pub v: Moment,
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
        let (adam, bf16) = match kind {
            OptimKind::AdamW { bf16_moments, .. } => (true, bf16_moments),
            OptimKind::Sgd => (false, false),
        };
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let n = if adam { var.as_tensor().elem_count() } else { 0 };
                let decay = !(name.ends_with(".bias") || name.contains("norm"));
                Param {
                    name,
                    var,
                    grad: Grad::None,
                    m: Moment::zeros(n, bf16),
                    v: Moment::zeros(n, bf16),
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
            if matches!(p.grad, Grad::Streamed { .. }) {
                continue;
            }
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
                Grad::Streamed { .. } => unreachable!("skipped above"),
            };
        }
        Ok(())
    }

    /// [`Self::accumulate`] for a backward pass whose decoder layers left only the squared
    /// norms of their gradients (`optimizer_in_backward`'s first pass): the parameters in
    /// `norms` get [`Grad::Streamed`], the others their gradient from `grads`. One micro-batch
    /// per step only: a streamed gradient cannot be summed.
    pub fn accumulate_streamed(
        &mut self,
        grads: &mut GradStore,
        norms: &std::collections::HashMap<TensorId, f64>,
    ) -> Result<()> {
        for p in &mut self.params {
            let Some(&sq) = norms.get(&p.var.as_tensor().id()) else {
                continue;
            };
            if !matches!(p.grad, Grad::None) || grads.get(p.var.as_tensor()).is_some() {
                return Err(Error::msg(format!(
                    "optimizer_in_backward: parameter `{}` has a gradient besides the streamed one \
                     (more than one micro-batch per step, or a weight shared outside its layer); turn \
                     optimizer_in_backward off",
                    p.name
                )));
            }
            p.grad = Grad::Streamed { sq, done: 0 };
        }
        self.accumulate(grads)
    }

    /// Global L2 norm of the accumulated gradient (before clipping).
    pub fn grad_norm(&self) -> Result<f64> {
        let mut total = 0.0;
        for p in &self.params {
            total += match p.grad {
                Grad::Streamed { sq, .. } => sq,
                _ => {
                    let row = row_len(p.var.as_tensor());
                    p.grad.with(|g| squared_norm_of(g, row))?.unwrap_or(0.0)
                }
            };
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
    /// pass over weight, gradient and moments per parameter. A parameter whose gradient is
    /// [`Grad::Streamed`] is left for [`Self::update_streamed`], which comes after this step.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.t += 1;
        for pid in 0..self.params.len() {
            let p = &mut self.params[pid];
            if matches!(p.grad, Grad::Streamed { .. }) {
                continue;
            }
            let update = UpdateOf::of(&self.kind, self.t, lr, self.weight_decay, self.grad_scale, pid);
            let (grad, m, v) = (&p.grad, &mut p.m, &mut p.v);
            let n = p.var.as_tensor().elem_count();
            let whole = |g: &[f32]| match g.len() == n {
                true => update.apply(&p.name, &p.var, m, v, p.decay, 0, g),
                false => Err(Error::msg(format!(
                    "parameter `{}`: gradient size {} != {n}",
                    p.name,
                    g.len()
                ))),
            };
            match grad.with(whole)? {
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

    /// The update of [`Self::step`] (which must have run: it counts the step) for values
    /// `offset..offset + g.len()` of the parameter `id`, whose gradient was [`Grad::Streamed`]:
    /// `g` is that part of it, computed again by the second backward pass of
    /// `optimizer_in_backward`. The parts come in order. Same arithmetic, same clipping factor.
    pub fn update_streamed(&mut self, id: TensorId, offset: usize, g: &[f32], lr: f64) -> Result<()> {
        let Some(pid) = self.params.iter().position(|p| p.var.as_tensor().id() == id) else {
            return Err(Error::msg(
                "optimizer_in_backward: the second backward pass gave the gradient of a tensor the optimizer does not train",
            ));
        };
        let p = &mut self.params[pid];
        let n = p.var.as_tensor().elem_count();
        let Grad::Streamed { sq, done } = p.grad else {
            return Err(Error::msg(format!(
                "optimizer_in_backward: parameter `{}` was given a gradient it did not expect (a second one, or one \
                 the first backward pass did not measure)",
                p.name
            )));
        };
        if offset != done || offset + g.len() > n {
            return Err(Error::msg(format!(
                "optimizer_in_backward: parameter `{}` was given values {offset}..{} after {done} of {n}",
                p.name,
                offset + g.len()
            )));
        }
        let update = UpdateOf::of(&self.kind, self.t, lr, self.weight_decay, self.grad_scale, pid);
        update.apply(&p.name, &p.var, &mut p.m, &mut p.v, p.decay, offset, g)?;
        let done = offset + g.len();
        p.grad = match done == n {
            true => Grad::None,
            false => Grad::Streamed { sq, done },
        };
        Ok(())
    }

    /// After [`Self::update_streamed`]: an error naming a parameter whose streamed gradient never
    /// came (its weights were not updated this step).
    pub fn check_streamed_done(&self) -> Result<()> {
        match self.params.iter().find(|p| matches!(p.grad, Grad::Streamed { .. })) {
            Some(p) => Err(Error::msg(format!(
                "optimizer_in_backward: the second backward pass gave no gradient for `{}`",
                p.name
            ))),
            None => Ok(()),
        }
    }

    /// Optimizer state as named tensors (for checkpoints).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for p in &self.params {
            let shape = p.var.as_tensor().shape();
            if !p.m.is_empty() {
                // bf16 moments are saved as bf16 (exact: they widen to f32 and narrow back)
                let dtype = match p.m {
                    Moment::Bf16(_) => DType::BF16,
                    Moment::F32(_) => DType::F32,
                };
                for (key, moment) in [("exp_avg", &p.m), ("exp_avg_sq", &p.v)] {
                    let t = Tensor::from_vec(moment.to_f32(), shape, &candle_core::Device::Cpu)?.to_dtype(dtype)?;
                    out.push((format!("{key}.{}", p.name), t));
                }
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
                let vals: Vec<f32> = tns.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                if vals.len() != buf.len() {
                    return Err(Error::msg(format!(
                        "optimizer state `{name}` has {} values for a parameter of {}",
                        vals.len(),
                        buf.len()
                    )));
                }
                // kept in the run's moment dtype (an f32 state resumed with bf16 moments is
                // rounded to nearest once)
                *buf = match buf {
                    Moment::F32(_) => Moment::F32(vals),
                    Moment::Bf16(_) => Moment::Bf16(
                        vals.iter()
                            .map(|&x| crate::model::kernels::matmul::to_bf16_bits(x))
                            .collect(),
                    ),
                };
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
                bf16_moments: false,
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

    /// The AdamW pass and the squared-norm sum (compiled for AVX2 where the CPU has it) give
    /// what one element at a time gives: the update bit for bit (f32, the same operations in
    /// the same order), the sum of squares to f64 rounding, over lengths that leave remainders.
    #[test]
    fn vectorised_update_and_norm_equal_one_element_at_a_time() {
        let mut rng = crate::util::rng::Rng::new(7);
        for n in [1usize, 7, 8, 9, 1000, 4099] {
            let draw = |rng: &mut crate::util::rng::Rng, s: f32| -> Vec<f32> {
                (0..n).map(|_| (rng.uniform() as f32 - 0.5) * s).collect()
            };
            let (w0, g, m0) = (draw(&mut rng, 2.0), draw(&mut rng, 0.1), draw(&mut rng, 0.01));
            let v0: Vec<f32> = draw(&mut rng, 1e-3).iter().map(|x| x.abs()).collect();
            let c = AdamConsts {
                scale: 0.37,
                b1: 0.9,
                b2: 0.999,
                bc2_sqrt: 0.0447,
                eps: 1e-8,
                decay: 0.999,
                step: 1e-3,
            };
            let (mut w, mut m, mut v) = (w0.clone(), m0.clone(), v0.clone());
            adamw_f32(&mut w, &g, &mut m, &mut v, &c);
            for i in 0..n {
                let gi = g[i] * c.scale;
                let mi = c.b1 * m0[i] + (1.0 - c.b1) * gi;
                let vi = c.b2 * v0[i] + (1.0 - c.b2) * gi * gi;
                let wi = w0[i] * c.decay - c.step * mi / (vi.sqrt() / c.bc2_sqrt + c.eps);
                assert_eq!(
                    (w[i].to_bits(), m[i].to_bits(), v[i].to_bits()),
                    (wi.to_bits(), mi.to_bits(), vi.to_bits()),
                    "n {n}, element {i}"
                );
            }
            let exact: f64 = g.iter().map(|&x| (x as f64) * (x as f64)).sum();
            let got = sum_of_squares(&g);
            assert!((got - exact).abs() <= 1e-14 * exact, "n {n}: {got} vs {exact}");
        }
        // the global norm is the same, bit for bit, on 1, 2 and 3 threads
        let g: Vec<f32> = (0..(1 << 16) * 37 + 5)
            .map(|_| (rng.normal() * 10f64.powf(6.0 * rng.uniform())) as f32)
            .collect();
        let var = Var::new(vec![0f32; g.len()], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(OptimKind::Sgd, 0.0, vec![("w".into(), var)]);
        opt.params[0].grad = Grad::Host(g);
        let norms: Vec<u64> = [1, 2, 3]
            .iter()
            .map(|&t| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
                pool.install(|| opt.grad_norm().unwrap()).to_bits()
            })
            .collect();
        assert!(norms.iter().all(|&n| n == norms[0]), "{norms:?}");
    }

    /// Over all 2^16 values of the random bits, stochastic rounding's mean is the value itself,
    /// exactly; infinities and NaN keep their kind; a bf16 value is left as it is.
    #[test]
    fn stochastic_rounding_is_exactly_unbiased() {
        for x in [1.0f32 + 1.0 / 1024.0, -3.3e-5, 0.1, 7.77e20, 1e-30] {
            let sum: f64 = (0..1u32 << 16).map(|r| bf16_to_f32(bf16_stochastic(x, r)) as f64).sum();
            assert_eq!(sum / 65536.0, x as f64, "{x}");
        }
        assert_eq!(bf16_to_f32(bf16_stochastic(f32::INFINITY, 0xffff)), f32::INFINITY);
        assert_eq!(
            bf16_to_f32(bf16_stochastic(f32::NEG_INFINITY, 0xffff)),
            f32::NEG_INFINITY
        );
        assert!(bf16_to_f32(bf16_stochastic(f32::NAN, 0)).is_nan());
        for r in [0, 1, 0x8000, 0xffff] {
            assert_eq!(bf16_to_f32(bf16_stochastic(1.5, r)), 1.5);
        }
    }

    fn adam_kind(bf16_moments: bool) -> OptimKind {
        OptimKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            bf16_moments,
        }
    }

    /// Runs AdamW with moments in bf16 or f32 on a quadratic (gradient w − target, plus a
    /// seeded jitter), returning the weights and the second moment's mean after each step.
    fn quadratic_run(bf16: bool, steps: usize) -> (Vec<f32>, Vec<f64>) {
        let n = 2000;
        let mut rng = crate::util::Rng::new(9);
        let target: Vec<f32> = (0..n).map(|_| rng.uniform() as f32 - 0.5).collect();
        let w = Var::new(vec![0f32; n], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(adam_kind(bf16), 0.0, vec![("w".into(), w.clone())]);
        let mut v_means = Vec::new();
        for _ in 0..steps {
            let cur: Vec<f32> = w.as_tensor().to_vec1().unwrap();
            let g: Vec<f32> = cur
                .iter()
                .zip(&target)
                .map(|(w, t)| w - t + 0.3 * (rng.uniform() as f32 - 0.5))
                .collect();
            opt.zero_grad();
            opt.params[0].grad = Grad::Host(g);
            opt.step(1e-3).unwrap();
            let v = opt.params[0].v.to_f32();
            v_means.push(v.iter().map(|&x| x as f64).sum::<f64>() / n as f64);
        }
        (w.as_tensor().to_vec1().unwrap(), v_means)
    }

    /// bf16 moments track f32 ones: the second moment's mean within 2 % at every step over
    /// 400 steps (where its per-step change, 0.1 %, is below bf16's resolution, so round to
    /// nearest would freeze it), and the weights close. The same run twice is the same, bit
    /// for bit.
    #[test]
    fn adamw_with_bf16_moments_tracks_f32_moments() {
        let (w32, v32) = quadratic_run(false, 400);
        let (w16, v16) = quadratic_run(true, 400);
        for (s, (a, b)) in v32.iter().zip(&v16).enumerate() {
            assert!((a - b).abs() <= 0.02 * a, "step {s}: v mean {b} vs f32 {a}");
        }
        let (num, den) = w32.iter().zip(&w16).fold((0f64, 0f64), |(n, d), (a, b)| {
            (n + ((a - b) as f64).powi(2), d + (*a as f64).powi(2))
        });
        assert!((num / den).sqrt() < 0.01, "weights differ by {}", (num / den).sqrt());
        assert_eq!(quadratic_run(true, 50).0, quadratic_run(true, 50).0);
        // round to nearest instead: the increments of v are lost once v is large enough
        let mut v = 0f32;
        let mut rtn = 0u16;
        for _ in 0..400 {
            v = 0.999 * v + 0.001 * 0.25;
            rtn = crate::model::kernels::matmul::to_bf16_bits(0.999 * bf16_to_f32(rtn) + 0.001 * 0.25);
        }
        assert!(
            bf16_to_f32(rtn) < 0.8 * v,
            "round to nearest {} kept up with {v}",
            bf16_to_f32(rtn)
        );
    }

    /// bf16 moments are saved as bf16 and restored bit for bit; the next step then equals the
    /// uninterrupted one.
    #[test]
    fn bf16_moments_round_trip_through_a_checkpoint() {
        let make = || {
            let w = Var::new(vec![0.5f32, -1.0, 2.0, 0.25], &Device::Cpu).unwrap();
            (w.clone(), Optimizer::new(adam_kind(true), 0.01, vec![("w".into(), w)]))
        };
        let (wa, mut a) = make();
        for k in 0..3 {
            a.zero_grad();
            a.params[0].grad = Grad::Host(vec![0.1 * k as f32, -0.3, 1.0, 0.7]);
            a.step(0.1).unwrap();
        }
        let state: std::collections::HashMap<String, Tensor> = a.state_tensors().unwrap().into_iter().collect();
        assert_eq!(state["exp_avg.w"].dtype(), DType::BF16);
        let (wb, mut b) = make();
        wb.set(wa.as_tensor()).unwrap();
        b.load_state(state, a.t).unwrap();
        for (x, y) in [(&a.params[0].m, &b.params[0].m), (&a.params[0].v, &b.params[0].v)] {
            match (x, y) {
                (Moment::Bf16(x), Moment::Bf16(y)) => assert_eq!(x, y),
                _ => panic!("bf16 moments expected"),
            }
        }
        for opt in [&mut a, &mut b] {
            opt.zero_grad();
            opt.params[0].grad = Grad::Host(vec![0.2, 0.2, -0.5, 0.1]);
            opt.step(0.1).unwrap();
        }
        assert_eq!(
            wa.as_tensor().to_vec1::<f32>().unwrap(),
            wb.as_tensor().to_vec1::<f32>().unwrap()
        );
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
