//! Fused CPU kernels with their backward passes, as candle custom ops: RMSNorm, RoPE, the
//! scaled masked softmax of attention, and SwiGLU.
//!
//! Written on primitives, each of these is 5–9 graph nodes, and candle's backward allocates a
//! zero gradient and adds into it for every node; fused, each is one node whose backward is
//! one pass. The primitive versions in [`super::transformer`] remain the reference: tests
//! check values and gradients of each fused op against them in f64 and f32.
//!
//! The kernels run on contiguous CPU tensors in f32 or f64; anything else (another device or
//! dtype) goes through the primitive version, so a model never fails for lack of a kernel.

use crate::error::Result;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// Whether `t` can go through a fused kernel.
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [T]> {
    let v = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The element types the kernels are written for.
trait Elem: Float + std::ops::AddAssign + std::ops::MulAssign + candle_core::WithDType + Send + Sync {}
impl Elem for f32 {}
impl Elem for f64 {}

/// Run the generic kernel `$f::<T>(args...)` for the dtype of storage `$s`.
macro_rules! by_dtype {
    ($s:expr, $op:expr, $f:ident($($arg:expr),*)) => {
        match $s {
            CpuStorage::F32(_) => $f::<f32>($($arg),*),
            CpuStorage::F64(_) => $f::<f64>($($arg),*),
            _ => candle_core::bail!("{}: only f32 and f64 have a fused kernel", $op),
        }
    };
}

/// Rows per parallel task: enough work per task to amortise scheduling.
fn rows_per_task(rows: usize, width: usize) -> usize {
    let per = (1 << 15) / width.max(1);
    per.max(1).min(rows.div_ceil(rayon::current_num_threads()).max(1))
}

fn num<T: Float>(x: f64) -> T {
    T::from(x).unwrap_or_else(T::nan)
}

fn out<T: Elem>(v: Vec<T>, shape: Shape) -> CResult<(CpuStorage, Shape)> {
    Ok((T::to_cpu_storage_owned(v), shape))
}

// ---------------------------------------------------------------- RMSNorm

struct RmsNorm {
    eps: f64,
}

struct RmsNormBwd {
    eps: f64,
}

fn inv_rms<T: Float>(row: &[T], eps: f64) -> T {
    let ss = row.iter().fold(T::zero(), |a, &x| a + x * x);
    T::one() / (ss / num(row.len() as f64) + num(eps)).sqrt()
}

fn rms_fwd<T: Elem>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    eps: f64,
) -> CResult<(CpuStorage, Shape)> {
    let h = l2.dims()[0];
    let x = slice::<T>(s1, l1, "fused-rms-norm")?;
    let w = slice::<T>(s2, l2, "fused-rms-norm")?;
    let mut y = vec![T::zero(); x.len()];
    let chunk = rows_per_task(x.len() / h, h) * h;
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(y, x)| {
        for (y, x) in y.chunks_mut(h).zip(x.chunks(h)) {
            let inv = inv_rms(x, eps);
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * inv * w;
            }
        }
    });
    out(y, l1.shape().clone())
}

/// `[rows + 1, H]`: dx for every row, then dw.
/// dx_j = inv·w_j·dy_j − x_j·inv³·(Σ_k dy_k w_k x_k)/H ; dw_j = Σ_rows dy_j·x_j·inv
#[allow(clippy::too_many_arguments)]
fn rms_bwd<T: Elem>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
    eps: f64,
) -> CResult<(CpuStorage, Shape)> {
    let op = "fused-rms-norm-bwd";
    let h = l2.dims()[0];
    let (x, w, dy) = (
        slice::<T>(s1, l1, op)?,
        slice::<T>(s2, l2, op)?,
        slice::<T>(s3, l3, op)?,
    );
    let rows = x.len() / h;
    let chunk = rows_per_task(rows, h) * h;
    let mut res = vec![T::zero(); x.len() + h];
    let hf: T = num(h as f64);
    let dw = res[..x.len()]
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dx, (x, dy))| {
            let mut dw = vec![T::zero(); h];
            for ((dx, x), dy) in dx.chunks_mut(h).zip(x.chunks(h)).zip(dy.chunks(h)) {
                let inv = inv_rms(x, eps);
                let a = x
                    .iter()
                    .zip(dy)
                    .zip(w)
                    .fold(T::zero(), |s, ((&x, &g), &w)| s + x * g * w);
                let c = inv * inv * inv * a / hf;
                for j in 0..h {
                    dx[j] = inv * w[j] * dy[j] - x[j] * c;
                    dw[j] += dy[j] * x[j] * inv;
                }
            }
            dw
        })
        .reduce(
            || vec![T::zero(); h],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        );
    res[x.len()..].copy_from_slice(&dw);
    out(res, Shape::from((rows + 1, h)))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1, self.name(), rms_fwd(s1, l1, s2, l2, self.eps))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let h = w.dim(0)?;
        let rows = x.elem_count() / h;
        let both = x.apply_op3_no_bwd(w, &dy.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = both.narrow(0, rows, 1)?.reshape(h)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1, self.name(), rms_bwd(s1, l1, s2, l2, s3, l3, self.eps))
    }
}

/// `x / sqrt(mean(x²) + eps) * w` over the last dimension, fused.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })?)
}

// ---------------------------------------------------------------- RoPE

/// `x·cos + rotate_half(x)·sin` (`transpose`: its adjoint, for the backward pass).
struct Rope {
    transpose: bool,
}

/// x `[B, h, L, D]`, cos and sin `[B, 1, L, D]`.
/// y1 = x1·c1 − x2·s1, y2 = x2·c2 + x1·s2 ; adjoint: dx1 = g1·c1 + g2·s2, dx2 = g2·c2 − g1·s1
#[allow(clippy::too_many_arguments)]
fn rope_fwd<T: Elem>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
    transpose: bool,
) -> CResult<(CpuStorage, Shape)> {
    let op = "fused-rope";
    let (b, nh, l, d) = l1.shape().dims4()?;
    if l2.dims() != [b, 1, l, d] || l3.dims() != [b, 1, l, d] {
        candle_core::bail!("{op}: cos/sin {:?} do not match x {:?}", l2.dims(), l1.dims());
    }
    let half = d / 2;
    let (x, cos, sin) = (
        slice::<T>(s1, l1, op)?,
        slice::<T>(s2, l2, op)?,
        slice::<T>(s3, l3, op)?,
    );
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(l * d)
        .zip(x.par_chunks(l * d))
        .enumerate()
        .for_each(|(bh, (y, x))| {
            let base = (bh / nh) * l * d;
            for t in 0..l {
                let c = &cos[base + t * d..base + (t + 1) * d];
                let s = &sin[base + t * d..base + (t + 1) * d];
                let (x, y) = (&x[t * d..(t + 1) * d], &mut y[t * d..(t + 1) * d]);
                for j in 0..half {
                    let (x1, x2) = (x[j], x[j + half]);
                    if transpose {
                        y[j] = x1 * c[j] + x2 * s[j + half];
                        y[j + half] = x2 * c[j + half] - x1 * s[j];
                    } else {
                        y[j] = x1 * c[j] - x2 * s[j];
                        y[j + half] = x2 * c[j + half] + x1 * s[j + half];
                    }
                }
            }
        });
    out(y, l1.shape().clone())
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1, self.name(), rope_fwd(s1, l1, s2, l2, s3, l3, self.transpose))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                transpose: !self.transpose,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// Rotary embedding in the HF layout, fused. `cos`, `sin`: `[B, 1, L, D]` (no gradient).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { transpose: false })?)
}

// ---------------------------------------------------------------- attention softmax

/// `softmax(scale · scores + mask)` over the last dimension; scores `[B, h, L, L]`, mask
/// `[B, 1, L, L]` (additive, no gradient).
struct MaskedSoftmax {
    scale: f64,
}

/// dS = scale · P ⊙ (dP − Σ_j dP_j P_j), from P and dP.
struct MaskedSoftmaxBwd {
    scale: f64,
}

fn softmax_fwd<T: Elem>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    scale: f64,
) -> CResult<(CpuStorage, Shape)> {
    let op = "fused-masked-softmax";
    let (b, nh, l, w) = l1.shape().dims4()?;
    if l2.dims() != [b, 1, l, w] {
        candle_core::bail!("{op}: mask {:?} does not match scores {:?}", l2.dims(), l1.dims());
    }
    let (x, mask) = (slice::<T>(s1, l1, op)?, slice::<T>(s2, l2, op)?);
    let scale: T = num(scale);
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(l * w)
        .zip(x.par_chunks(l * w))
        .enumerate()
        .for_each(|(bh, (y, x))| {
            let m = &mask[(bh / nh) * l * w..(bh / nh + 1) * l * w];
            for ((y, x), m) in y.chunks_mut(w).zip(x.chunks(w)).zip(m.chunks(w)) {
                let mut mx = T::neg_infinity();
                for ((y, &x), &m) in y.iter_mut().zip(x).zip(m) {
                    *y = x * scale + m;
                    mx = Float::max(mx, *y);
                }
                let mut sum = T::zero();
                for y in y.iter_mut() {
                    *y = (*y - mx).exp();
                    sum += *y;
                }
                let inv = T::one() / sum;
                y.iter_mut().for_each(|y| *y *= inv);
            }
        });
    out(y, l1.shape().clone())
}

fn softmax_bwd<T: Elem>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    scale: f64,
) -> CResult<(CpuStorage, Shape)> {
    let op = "fused-masked-softmax-bwd";
    let w = l1.dims()[l1.dims().len() - 1];
    let (p, dp) = (slice::<T>(s1, l1, op)?, slice::<T>(s2, l2, op)?);
    let scale: T = num(scale);
    let mut ds = vec![T::zero(); p.len()];
    let chunk = rows_per_task(p.len() / w, w) * w;
    ds.par_chunks_mut(chunk)
        .zip(p.par_chunks(chunk).zip(dp.par_chunks(chunk)))
        .for_each(|(ds, (p, dp))| {
            for ((ds, p), dp) in ds.chunks_mut(w).zip(p.chunks(w)).zip(dp.chunks(w)) {
                let dot = p.iter().zip(dp).fold(T::zero(), |a, (&p, &g)| a + p * g);
                for ((ds, &p), &g) in ds.iter_mut().zip(p).zip(dp) {
                    *ds = scale * p * (g - dot);
                }
            }
        });
    out(ds, l1.shape().clone())
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1, self.name(), softmax_fwd(s1, l1, s2, l2, self.scale))
    }

    fn bwd(&self, _x: &Tensor, _mask: &Tensor, p: &Tensor, dp: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let ds = p.apply_op2_no_bwd(&dp.contiguous()?, &MaskedSoftmaxBwd { scale: self.scale })?;
        Ok((Some(ds), None))
    }
}

impl CustomOp2 for MaskedSoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-masked-softmax-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1, self.name(), softmax_bwd(s1, l1, s2, l2, self.scale))
    }
}

/// `softmax(scale · scores + mask)` over the last dimension, fused.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(scores
        .contiguous()?
        .apply_op2(&mask.contiguous()?, MaskedSoftmax { scale })?)
}

// ---------------------------------------------------------------- SwiGLU

/// `silu(g) · u`.
struct SwiGlu;

/// `[2, n]`: dg then du, from g, u and dy.
struct SwiGluBwd;

const ELEMS_PER_TASK: usize = 1 << 15;

fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

fn swiglu_fwd<T: Elem>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
    let op = "fused-swiglu";
    if l1.dims() != l2.dims() {
        candle_core::bail!("{op}: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
    }
    let (g, u) = (slice::<T>(s1, l1, op)?, slice::<T>(s2, l2, op)?);
    let c = ELEMS_PER_TASK;
    let mut y = vec![T::zero(); g.len()];
    y.par_chunks_mut(c)
        .zip(g.par_chunks(c).zip(u.par_chunks(c)))
        .for_each(|(y, (g, u))| {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = g * sigmoid(g) * u;
            }
        });
    out(y, l1.shape().clone())
}

/// d silu(g)/dg = σ(g)·(1 + g·(1 − σ(g)))
#[allow(clippy::too_many_arguments)]
fn swiglu_bwd<T: Elem>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> CResult<(CpuStorage, Shape)> {
    let op = "fused-swiglu-bwd";
    let (g, u, dy) = (
        slice::<T>(s1, l1, op)?,
        slice::<T>(s2, l2, op)?,
        slice::<T>(s3, l3, op)?,
    );
    let n = g.len();
    let c = ELEMS_PER_TASK;
    let mut res = vec![T::zero(); 2 * n];
    let (dg, du) = res.split_at_mut(n);
    dg.par_chunks_mut(c)
        .zip(du.par_chunks_mut(c))
        .zip(g.par_chunks(c).zip(u.par_chunks(c)).zip(dy.par_chunks(c)))
        .for_each(|((dg, du), ((g, u), dy))| {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                du[i] = dy[i] * g[i] * s;
                dg[i] = dy[i] * u[i] * s * (T::one() + g[i] * (T::one() - s));
            }
        });
    out(res, Shape::from((2, n)))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1, self.name(), swiglu_fwd(s1, l1, s2, l2))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op3_no_bwd(u, &dy.contiguous()?, &SwiGluBwd)?;
        let dg = both.get(0)?.reshape(g.shape())?;
        let du = both.get(1)?.reshape(u.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1, self.name(), swiglu_bwd(s1, l1, s2, l2, s3, l3))
    }
}

/// `silu(g) · u`, fused.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok(g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)?)
}

#[cfg(test)]
mod tests {
    use super::super::transformer::Kernels;
    use candle_core::{DType, Device, Tensor, Var};

    /// Values and input gradients of `f` under fused and primitive kernels, for a random
    /// linear functional of the output.
    fn compare(
        dtype: DType,
        tol: f64,
        shapes: &[&[usize]],
        trainable: &[bool],
        f: impl Fn(Kernels, &[Tensor]) -> Tensor,
    ) {
        let dev = Device::Cpu;
        let inputs: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(0f64, 1.0, *s, &dev).unwrap().to_dtype(dtype).unwrap())
            .collect();
        let run = |k: Kernels| -> (Vec<f64>, Vec<Vec<f64>>) {
            let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let ts: Vec<Tensor> = vars
                .iter()
                .zip(trainable)
                .map(|(v, &tr)| {
                    if tr {
                        v.as_tensor().clone()
                    } else {
                        v.as_tensor().detach()
                    }
                })
                .collect();
            let y = f(k, &ts);
            // the same weights for both runs
            let r: Vec<f64> = (0..y.elem_count())
                .map(|i| ((i * 7919 % 97) as f64 / 48.5) - 1.0)
                .collect();
            let r = Tensor::from_vec(r, y.shape(), &dev).unwrap().to_dtype(dtype).unwrap();
            let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            let g = vars
                .iter()
                .zip(trainable)
                .filter(|(_, &tr)| tr)
                .map(|(v, _)| flat(grads.get(v.as_tensor()).expect("a gradient for every trainable input")))
                .collect();
            (flat(&y), g)
        };
        let (yf, gf) = run(Kernels::Fused);
        let (yp, gp) = run(Kernels::Primitive);
        let close = |a: &[f64], b: &[f64], what: &str| {
            assert_eq!(a.len(), b.len());
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() <= tol * (1.0 + y.abs()),
                    "{what}[{i}] {dtype:?}: fused {x} vs primitive {y}"
                );
            }
        };
        close(&yf, &yp, "value");
        for (k, (a, b)) in gf.iter().zip(&gp).enumerate() {
            close(a, b, &format!("gradient of input {k}"));
        }
    }

    const DTYPES: [(DType, f64); 2] = [(DType::F64, 1e-12), (DType::F32, 1e-5)];

    #[test]
    fn fused_rms_norm_matches_primitive() {
        for (dt, tol) in DTYPES {
            compare(dt, tol, &[&[2, 5, 16], &[16]], &[true, true], |k, x| {
                k.rms_norm(&x[0], &x[1], 1e-5).unwrap()
            });
        }
    }

    #[test]
    fn fused_rope_matches_primitive() {
        for (dt, tol) in DTYPES {
            compare(
                dt,
                tol,
                &[&[2, 3, 5, 8], &[2, 1, 5, 8], &[2, 1, 5, 8]],
                &[true, false, false],
                |k, x| k.rope(&x[0], &x[1], &x[2]).unwrap(),
            );
        }
    }

    #[test]
    fn fused_masked_softmax_matches_primitive() {
        for (dt, tol) in DTYPES {
            compare(dt, tol, &[&[2, 3, 6, 6]], &[true], |k, x| {
                // a causal mask with a blocked key, as packed units have
                let mask: Vec<f64> = (0..2 * 36)
                    .map(|i| {
                        let (q, key) = ((i % 36) / 6, i % 6);
                        if key <= q && !(key == 2 && q > 3) {
                            0.0
                        } else {
                            -1e9
                        }
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (2, 1, 6, 6), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                k.masked_softmax(&x[0], &mask, 0.35).unwrap()
            });
        }
    }

    #[test]
    fn fused_swiglu_matches_primitive() {
        for (dt, tol) in DTYPES {
            compare(dt, tol, &[&[3, 7, 10], &[3, 7, 10]], &[true, true], |k, x| {
                k.swiglu(&x[0], &x[1]).unwrap()
            });
        }
    }
}
