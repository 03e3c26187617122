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
trait Elem: Float + std::ops::AddAssign + std::ops::MulAssign + candle_core::WithDType + Send + Sync {
    /// `exp`, in a form the compiler can vectorise (f32: a polynomial within 2 ulp; f64: std).
    fn exp_fast(self) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        exp_f32(self)
    }
}

impl Elem for f64 {
    #[inline(always)]
    fn exp_fast(self) -> f64 {
        self.exp()
    }
}

/// `exp(x)` for f32 without a library call (Cephes' `expf`): `2^k · p(r)` with
/// `k = round(x / ln 2)` and a degree-7 polynomial on `|r| ≤ ln 2 / 2`; below -87 (past the
/// normal range) the result is 0, above 88 it saturates.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let k = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - k * 0.693_359_4 + k * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r
        + 0.5;
    let y = (p * r * r + r + 1.0) * f32::from_bits(((k as i32 + 127) as u32) << 23);
    if underflow {
        0.0
    } else {
        y
    }
}

/// Whether this CPU runs the AVX2 + FMA versions of the row kernels.
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// A generic row kernel compiled twice, for the baseline target and for AVX2 + FMA, the
/// latter chosen at run time (the crate is built for the baseline, so the element-wise loops
/// would otherwise not use the wide registers).
macro_rules! multiversioned {
    ($(#[$m:meta])* fn $name:ident<T>($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        fn $name<T: Elem>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp<T: Elem>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3<T: Elem>($($arg: $ty),*) $(-> $ret)? {
                    imp::<T>($($arg),*)
                }
                if has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    return unsafe { v3::<T>($($arg),*) };
                }
            }
            imp::<T>($($arg),*)
        }
    };
}

/// Lanes of the manual reductions (independent accumulators, so they vectorise).
const LANES: usize = 8;

#[inline(always)]
fn lane_max<T: Elem>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc.iter().fold(T::neg_infinity(), |a, &b| if b > a { b } else { a });
    for &v in rest {
        m = if v > m { v } else { m };
    }
    m
}

/// Σ a_i·b_i with lane accumulators.
#[inline(always)]
fn lane_dot<T: Elem>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().fold(T::zero(), |a, &b| a + b);
    for (&x, &y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Masked-out keys (additive mask at or below this) get probability 0 without an `exp`.
const MASKED: f64 = -1e8;

multiversioned! {
    /// One row of `softmax(scale·x + mask)`.
    fn softmax_row<T>(y: &mut [T], x: &[T], mask: &[T], scale: T) {
        let cut: T = num(MASKED);
        for ((y, &x), &m) in y.iter_mut().zip(x).zip(mask) {
            *y = if m <= cut { T::neg_infinity() } else { x * scale + m };
        }
        let mx = lane_max(y);
        let mut acc = [T::zero(); LANES];
        let mut chunks = y.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                c[i] = (c[i] - mx).exp_fast();
                acc[i] += c[i];
            }
        }
        let mut sum = acc.iter().fold(T::zero(), |a, &b| a + b);
        for v in chunks.into_remainder() {
            *v = (*v - mx).exp_fast();
            sum += *v;
        }
        let inv = T::one() / sum;
        y.iter_mut().for_each(|v| *v *= inv);
    }
}

multiversioned! {
    /// One row of `scale · p ⊙ (dp − Σ dp·p)`.
    fn softmax_bwd_row<T>(ds: &mut [T], p: &[T], dp: &[T], scale: T) {
        let dot = lane_dot(p, dp);
        for ((ds, &p), &g) in ds.iter_mut().zip(p).zip(dp) {
            *ds = scale * p * (g - dot);
        }
    }
}

multiversioned! {
    /// `log Σ exp(row)`, accumulated in f64 lanes: a vocabulary of 50k terms summed in f32
    /// would lose ~1e-4 of the log-prob.
    fn logsumexp<T>(row: &[T]) -> T {
        let m = lane_max(row);
        let mut acc = [0f64; LANES];
        let chunks = row.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += candle_core::WithDType::to_f64((c[i] - m).exp_fast());
            }
        }
        let mut sum: f64 = acc.iter().sum();
        for &v in rest {
            sum += candle_core::WithDType::to_f64((v - m).exp_fast());
        }
        m + num::<T>(sum.ln())
    }
}

multiversioned! {
    /// `d = -g·exp(row − lse)` (the target's `+g` is added by the caller).
    fn neg_softmax_row<T>(d: &mut [T], row: &[T], lse: T, g: T) {
        for (d, &x) in d.iter_mut().zip(row) {
            *d = -g * (x - lse).exp_fast();
        }
    }
}

multiversioned! {
    /// `y = silu(g)·u`.
    fn swiglu_chunk<T>(y: &mut [T], g: &[T], u: &[T]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g * sigmoid(g) * u;
        }
    }
}

multiversioned! {
    /// `du = dy·silu(g)`, `dg = dy·u·σ(g)·(1 + g·(1 − σ(g)))`.
    fn swiglu_bwd_chunk<T>(dg: &mut [T], du: &mut [T], g: &[T], u: &[T], dy: &[T]) {
        for i in 0..g.len() {
            let s = sigmoid(g[i]);
            du[i] = dy[i] * g[i] * s;
            dg[i] = dy[i] * u[i] * s * (T::one() + g[i] * (T::one() - s));
        }
    }
}

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

/// `impl CustomOp2`/`CustomOp3` for `$ty` named `$name`, whose `cpu_fwd` is the given
/// expression of the op (`op`) and the storages and layouts, plus any further items (`bwd`).
macro_rules! custom_op {
    (2, $ty:ty, $name:literal, |$op:ident, $s1:ident, $l1:ident, $s2:ident, $l2:ident| $fwd:expr $(, $($rest:tt)*)?) => {
        impl CustomOp2 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(&self, $s1: &CpuStorage, $l1: &Layout, $s2: &CpuStorage, $l2: &Layout) -> CResult<(CpuStorage, Shape)> {
                let $op = self;
                $fwd
            }

            $($($rest)*)?
        }
    };
    (3, $ty:ty, $name:literal, |$op:ident, $s1:ident, $l1:ident, $s2:ident, $l2:ident, $s3:ident, $l3:ident| $fwd:expr $(, $($rest:tt)*)?) => {
        impl CustomOp3 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            #[allow(clippy::too_many_arguments)]
            fn cpu_fwd(
                &self,
                $s1: &CpuStorage,
                $l1: &Layout,
                $s2: &CpuStorage,
                $l2: &Layout,
                $s3: &CpuStorage,
                $l3: &Layout,
            ) -> CResult<(CpuStorage, Shape)> {
                let $op = self;
                $fwd
            }

            $($($rest)*)?
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
    let ss: f64 = row.iter().map(|&x| (x * x).to_f64().unwrap_or(f64::NAN)).sum();
    num(1.0 / (ss / row.len() as f64 + eps).sqrt())
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

custom_op!(
    2,
    RmsNorm,
    "fused-rms-norm",
    |op, s1, l1, s2, l2| by_dtype!(s1, "fused-rms-norm", rms_fwd(s1, l1, s2, l2, op.eps)),
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let h = w.dim(0)?;
        let rows = x.elem_count() / h;
        let both = x.apply_op3_no_bwd(w, &dy.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = both.narrow(0, rows, 1)?.reshape(h)?;
        Ok((Some(dx), Some(dw)))
    }
);

custom_op!(
    3,
    RmsNormBwd,
    "fused-rms-norm-bwd",
    |op, s1, l1, s2, l2, s3, l3| by_dtype!(s1, "fused-rms-norm-bwd", rms_bwd(s1, l1, s2, l2, s3, l3, op.eps))
);

/// The gradients of [`rms_norm`]'s `x` and `w` for the output gradient `dy`, outside any graph.
pub(crate) fn rms_norm_grads(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    two(RmsNorm { eps }.bwd(x, w, dy, dy)?, "fused-rms-norm")
}

fn two(g: (Option<Tensor>, Option<Tensor>), op: &str) -> Result<(Tensor, Tensor)> {
    match g {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(crate::error::Error::msg(format!("{op}: backward gave no gradient"))),
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

custom_op!(
    3,
    Rope,
    "fused-rope",
    |op, s1, l1, s2, l2, s3, l3| by_dtype!(s1, "fused-rope", rope_fwd(s1, l1, s2, l2, s3, l3, op.transpose)),
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
);

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

/// Scores `[B, n, R, W]`, mask `[B, 1, M, W]` with `R` a multiple of `M`: score row `i` uses
/// mask row `i % M` (grouped-query heads stack `R / M` query heads' rows under one mask).
fn softmax_fwd<T: Elem>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    scale: f64,
) -> CResult<(CpuStorage, Shape)> {
    let op = "fused-masked-softmax";
    let (b, nh, r, w) = l1.shape().dims4()?;
    let (mb, one, m, mw) = l2.shape().dims4()?;
    if mb != b || one != 1 || mw != w || m == 0 || r % m != 0 {
        candle_core::bail!("{op}: mask {:?} does not fit scores {:?}", l2.dims(), l1.dims());
    }
    let (x, mask) = (slice::<T>(s1, l1, op)?, slice::<T>(s2, l2, op)?);
    let scale: T = num(scale);
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(r * w)
        .zip(x.par_chunks(r * w))
        .enumerate()
        .for_each(|(bh, (y, x))| {
            let mask = &mask[(bh / nh) * m * w..(bh / nh + 1) * m * w];
            for (i, (y, x)) in y.chunks_mut(w).zip(x.chunks(w)).enumerate() {
                softmax_row(y, x, &mask[(i % m) * w..(i % m + 1) * w], scale);
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
                softmax_bwd_row(ds, p, dp, scale);
            }
        });
    out(ds, l1.shape().clone())
}

custom_op!(
    2,
    MaskedSoftmax,
    "fused-masked-softmax",
    |op, s1, l1, s2, l2| by_dtype!(s1, "fused-masked-softmax", softmax_fwd(s1, l1, s2, l2, op.scale)),
    fn bwd(&self, _x: &Tensor, _mask: &Tensor, p: &Tensor, dp: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let ds = p.apply_op2_no_bwd(&dp.contiguous()?, &MaskedSoftmaxBwd { scale: self.scale })?;
        Ok((Some(ds), None))
    }
);

custom_op!(
    2,
    MaskedSoftmaxBwd,
    "fused-masked-softmax-bwd",
    |op, s1, l1, s2, l2| by_dtype!(s1, "fused-masked-softmax-bwd", softmax_bwd(s1, l1, s2, l2, op.scale))
);

/// `softmax(scale · scores + mask)` over the last dimension, fused.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(scores
        .contiguous()?
        .apply_op2(&mask.contiguous()?, MaskedSoftmax { scale })?)
}

// ---------------------------------------------------------------- attention

/// Causal self-attention of one block as a single graph node: rotary embedding, grouped-query
/// scores, masked softmax and the weighted sum of values, from the projected `q`, `k`, `v`
/// (`[B·L, heads·D]`) to `[B·L, H·D]`. Only the inputs are kept for the backward pass, which
/// recomputes the scores (as flash attention does), so no `[heads, L, L]` tensor outlives the
/// forward pass.
#[derive(Clone)]
pub struct Attention {
    /// `[B, 1, L, D]` rotary tables and `[B, 1, L, L]` additive mask (constants).
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
    pub batch: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// What the forward pass computes and the backward pass needs again.
struct AttentionParts {
    /// `[B, kvh, rep·L, D]`: rotated queries, grouped under their key/value head.
    q: Tensor,
    /// `[B, kvh, L, D]`: rotated keys and values.
    k: Tensor,
    v: Tensor,
    /// `[B, kvh, rep·L, L]` attention probabilities.
    p: Tensor,
}

impl Attention {
    fn rows(&self, t: &Tensor) -> CResult<usize> {
        Ok(t.dim(0)? / self.batch)
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// `[B·L, n·D]` to `[B, n, L, D]`.
    fn split(&self, x: &Tensor, n: usize) -> CResult<Tensor> {
        let l = self.rows(x)?;
        x.reshape((self.batch, l, n, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `[B, n, L, D]` to `[B·L, n·D]`.
    fn merge(&self, x: &Tensor, n: usize) -> CResult<Tensor> {
        let l = x.dim(2)?;
        x.transpose(1, 2)?.reshape((self.batch * l, n * self.head_dim))
    }

    fn rope(&self, x: &Tensor, transpose: bool) -> CResult<Tensor> {
        x.apply_op3_no_bwd(&self.cos, &self.sin, &Rope { transpose })
    }

    fn parts(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> CResult<AttentionParts> {
        let (b, kvh, d) = (self.batch, self.n_kv_heads, self.head_dim);
        let l = self.rows(q)?;
        let rep = self.n_heads / kvh;
        let q = self
            .rope(&self.split(q, self.n_heads)?, false)?
            .reshape((b, kvh, rep * l, d))?;
        let k = self.rope(&self.split(k, kvh)?, false)?;
        let v = self.split(v, kvh)?;
        let scores = q.matmul(&k.t()?)?;
        let p = scores.apply_op2_no_bwd(&self.mask, &MaskedSoftmax { scale: self.scale() })?;
        Ok(AttentionParts { q, k, v, p })
    }
}

/// A tensor holding a copy of a contiguous storage slice.
fn tensor_of<T: Elem>(s: &CpuStorage, l: &Layout) -> CResult<Tensor> {
    Tensor::from_slice(
        slice::<T>(s, l, "fused-attention")?,
        l.shape(),
        &candle_core::Device::Cpu,
    )
}

fn storage_of<T: Elem>(t: &Tensor) -> CResult<(CpuStorage, Shape)> {
    let v: Vec<T> = t.flatten_all()?.to_vec1()?;
    out(v, t.shape().clone())
}

/// [`tensor_of`] for an f32 or f64 storage: for CustomOps whose forward runs tensor code.
pub(crate) fn storage_to_tensor(s: &CpuStorage, l: &Layout, op: &str) -> CResult<Tensor> {
    by_dtype!(s, op, tensor_of(s, l))
}

/// [`storage_of`] for an f32 or f64 tensor: what such a CustomOp's forward returns.
pub(crate) fn tensor_to_storage(t: &Tensor, op: &str) -> CResult<(CpuStorage, Shape)> {
    match t.dtype() {
        candle_core::DType::F32 => storage_of::<f32>(t),
        candle_core::DType::F64 => storage_of::<f64>(t),
        d => candle_core::bail!("{op}: only f32 and f64 have a fused kernel, not {d:?}"),
    }
}

fn attention_fwd<T: Elem>(
    a: &Attention,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> CResult<(CpuStorage, Shape)> {
    let (q, k, v) = (
        tensor_of::<T>(s1, l1)?,
        tensor_of::<T>(s2, l2)?,
        tensor_of::<T>(s3, l3)?,
    );
    let parts = a.parts(&q, &k, &v)?;
    let o = parts.p.matmul(&parts.v)?; // [B, kvh, rep·L, D] = [B, H, L, D]
    let l = a.rows(&q)?;
    let o = o.reshape((a.batch, a.n_heads, l, a.head_dim))?;
    storage_of::<T>(&a.merge(&o, a.n_heads)?)
}

custom_op!(
    3,
    Attention,
    "fused-attention",
    |op, s1, l1, s2, l2, s3, l3| by_dtype!(s1, "fused-attention", attention_fwd(op, s1, l1, s2, l2, s3, l3)),
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        d_out: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, kvh, d) = (self.batch, self.n_heads, self.n_kv_heads, self.head_dim);
        let l = self.rows(q)?;
        let AttentionParts { q: qg, k: kr, v: v4, p } = self.parts(q, k, v)?;
        let d_o = self
            .split(&d_out.contiguous()?, h)?
            .reshape((b, kvh, (h / kvh) * l, d))?;
        // grouped heads share k and v, so these matmuls also sum over the group
        let dv = p.t()?.matmul(&d_o)?;
        let dp = d_o.matmul(&v4.t()?)?;
        let ds = p.apply_op2_no_bwd(&dp, &MaskedSoftmaxBwd { scale: self.scale() })?;
        let dq = ds.matmul(&kr)?.reshape((b, h, l, d))?;
        let dk = ds.t()?.matmul(&qg)?;
        let dq = self.merge(&self.rope(&dq, true)?, h)?;
        let dk = self.merge(&self.rope(&dk, true)?, kvh)?;
        let dv = self.merge(&dv, kvh)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
);

/// The gradients of [`attention`]'s `q, k, v` for the output gradient `d_out`, outside any
/// graph (for a hand-written backward).
pub(crate) fn attention_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    op: &Attention,
    d_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    match op.bwd(q, k, v, d_out, d_out)? {
        (Some(dq), Some(dk), Some(dv)) => Ok((dq, dk, dv)),
        _ => Err(crate::error::Error::msg("fused-attention: backward gave no gradient")),
    }
}

/// Fused attention over one block; see [`Attention`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, op: Attention) -> Result<Tensor> {
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

// ---------------------------------------------------------------- log-prob head

/// `log softmax(h · Wᵀ)[target]` for each row of `h` `[n, H]`, with the output projection
/// `W` `[V, H]`, as one graph node: logits are made a chunk of rows at a time and only the
/// picked log-prob is kept; the backward pass makes them again (the fused linear + cross-entropy
/// of Liger and others). No `[n, V]` tensor outlives either pass's chunk loop except the
/// gradient of the logits inside the backward pass.
pub struct TokenLogps {
    /// The projection, detached (the graph sees it as the op's second argument).
    pub w: Tensor,
    pub targets: Vec<u32>,
    /// Multiply bf16-rounded operands ([`super::matmul`]; f32 only).
    pub bf16: bool,
}

/// Rows of logits made at once.
const HEAD_CHUNK_ROWS: usize = 64;

/// Run `f` on the contiguous CPU data of `t`.
fn with_slice<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> CResult<R>) -> CResult<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cpu(c) => f(slice::<T>(c, l, "fused-token-logps")?),
        _ => candle_core::bail!("fused-token-logps: CPU tensors only"),
    }
}

/// `f(row, logits of the row, logsumexp of the row)` for every row of `h`.
fn for_each_logit_row<T: Elem>(h: &Tensor, w: &Tensor, bf16: bool, mut f: impl FnMut(usize, &[T], T)) -> CResult<()> {
    let (n, v) = (h.dim(0)?, w.dim(0)?);
    let wt = w.t()?;
    // the bf16 projection is packed once for all chunks
    let packed = match bf16 && T::DTYPE == candle_core::DType::F32 {
        true => Some(super::matmul::rhs_of(w, true)?),
        false => None,
    };
    for start in (0..n).step_by(HEAD_CHUNK_ROWS) {
        let c = HEAD_CHUNK_ROWS.min(n - start);
        let logits = match &packed {
            Some(p) => super::matmul::matmul_tensor(&h.narrow(0, start, c)?, false, p)?,
            None => h.narrow(0, start, c)?.matmul(&wt)?,
        };
        with_slice::<T, ()>(&logits, |l| {
            let lse: Vec<T> = l.par_chunks(v).map(logsumexp::<T>).collect();
            for (i, row) in l.chunks(v).enumerate() {
                f(start + i, row, lse[i]);
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn head_fwd<T: Elem>(op: &TokenLogps, s1: &CpuStorage, l1: &Layout) -> CResult<(CpuStorage, Shape)> {
    let h = tensor_of::<T>(s1, l1)?;
    let mut res = vec![T::zero(); h.dim(0)?];
    for_each_logit_row::<T>(&h, &op.w, op.bf16, |i, row, lse| {
        res[i] = row[op.targets[i] as usize] - lse
    })?;
    let n = res.len();
    out(res, Shape::from(n))
}

/// dlogits = g·(onehot(target) − softmax(logits)); dh = dlogits·W, dW = dlogitsᵀ·h.
fn head_bwd<T: Elem>(op: &TokenLogps, h: &Tensor, g: &Tensor) -> CResult<(Tensor, Tensor)> {
    let (n, v) = (h.dim(0)?, op.w.dim(0)?);
    let g: Vec<T> = g.to_dtype(T::DTYPE)?.to_vec1()?;
    let h = h.contiguous()?;
    let mut dl = vec![T::zero(); n * v];
    for_each_logit_row::<T>(&h, &op.w, op.bf16, |i, row, lse| {
        let d = &mut dl[i * v..(i + 1) * v];
        neg_softmax_row(d, row, lse, g[i]);
        d[op.targets[i] as usize] += g[i];
    })?;
    let dl = Tensor::from_vec(dl, (n, v), h.device())?;
    if op.bf16 && T::DTYPE == candle_core::DType::F32 {
        // the products of a linear layer's backward: dl·W and dlᵀ·h
        return super::matmul::linear_bwd(&h, &op.w, &dl, true).map_err(|e| candle_core::Error::Msg(e.to_string()));
    }
    Ok((dl.matmul(&op.w)?, dl.t()?.matmul(&h)?))
}

custom_op!(
    2,
    TokenLogps,
    "fused-token-logps",
    |op, s1, l1, _s2, _l2| by_dtype!(s1, "fused-token-logps", head_fwd(op, s1, l1)),
    fn bwd(&self, h: &Tensor, _w: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (dh, dw) = match h.dtype() {
            candle_core::DType::F32 => head_bwd::<f32>(self, h, g)?,
            candle_core::DType::F64 => head_bwd::<f64>(self, h, g)?,
            dt => candle_core::bail!("fused-token-logps: no kernel for {dt:?}"),
        };
        Ok((Some(dh), Some(dw)))
    }
);

/// `log softmax(h · Wᵀ)[targets]` per row of `h` `[n, H]`, fused; see [`TokenLogps`]. With
/// `bf16` the logits come from bf16-rounded operands ([`super::matmul`]).
pub fn token_logps(h: &Tensor, w: &Tensor, targets: &[u32], bf16: bool) -> Result<Tensor> {
    let op = TokenLogps {
        w: w.detach(),
        targets: targets.to_vec(),
        bf16,
    };
    Ok(h.contiguous()?.apply_op2(w, op)?)
}

// ---------------------------------------------------------------- SwiGLU

/// `silu(g) · u`.
struct SwiGlu;

/// `[2, n]`: dg then du, from g, u and dy.
struct SwiGluBwd;

const ELEMS_PER_TASK: usize = 1 << 15;

#[inline(always)]
fn sigmoid<T: Elem>(x: T) -> T {
    T::one() / (T::one() + (-x).exp_fast())
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
        .for_each(|(y, (g, u))| swiglu_chunk(y, g, u));
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
        .for_each(|((dg, du), ((g, u), dy))| swiglu_bwd_chunk(dg, du, g, u, dy));
    out(res, Shape::from((2, n)))
}

custom_op!(
    2,
    SwiGlu,
    "fused-swiglu",
    |_op, s1, l1, s2, l2| by_dtype!(s1, "fused-swiglu", swiglu_fwd(s1, l1, s2, l2)),
    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op3_no_bwd(u, &dy.contiguous()?, &SwiGluBwd)?;
        let dg = both.get(0)?.reshape(g.shape())?;
        let du = both.get(1)?.reshape(u.shape())?;
        Ok((Some(dg), Some(du)))
    }
);

custom_op!(
    3,
    SwiGluBwd,
    "fused-swiglu-bwd",
    |_op, s1, l1, s2, l2, s3, l3| by_dtype!(s1, "fused-swiglu-bwd", swiglu_bwd(s1, l1, s2, l2, s3, l3))
);

/// The gradients of [`swiglu`]'s `g` and `u` for the output gradient `dy`, outside any graph.
pub(crate) fn swiglu_grads(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    two(SwiGlu.bwd(g, u, dy, dy)?, "fused-swiglu")
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
        let (yf, gf) = run(Kernels::FUSED);
        let (yp, gp) = run(Kernels::PRIMITIVE);
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

    /// The polynomial exp against f64 exp over the range the kernels use.
    #[test]
    fn exp_f32_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let got = super::exp_f32(x as f32) as f64;
            let want = (x as f32 as f64).exp();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "max relative error {worst:e}");
        assert_eq!(super::exp_f32(-1e9), 0.0);
        assert_eq!(super::exp_f32(f32::NEG_INFINITY), 0.0);
    }

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

    /// Whole attention (rope, grouped-query scores, masked softmax, values) of the model's
    /// `Attention` block under both kernels, through a tiny model's first layer.
    #[test]
    fn fused_attention_matches_primitive() {
        use crate::model::AttentionInputs;
        use crate::testing::{tiny_model, TinySpec};
        for (dt, tol) in DTYPES {
            for kv_heads in [1, 2, 4] {
                let spec = TinySpec {
                    heads: 4,
                    kv_heads,
                    layers: 1,
                    ..TinySpec::default()
                };
                let m = tiny_model(&spec, dt, 9).unwrap().transformer;
                let cfg = m.cfg.clone();
                // two batch rows, the second left-padded by two
                let valid = vec![vec![true; 6], vec![false, false, true, true, true, true]];
                let attn = AttentionInputs::padded(&cfg, &valid, dt, &Device::Cpu).unwrap();
                let layer = m.layers[0].self_attn.clone();
                compare(dt, tol, &[&[2 * 6, cfg.hidden_size]], &[true], |k, x| {
                    layer.forward(&x[0], &attn, k).unwrap()
                });
            }
        }
    }

    /// The fused head against log-softmax on primitives, over more rows than one chunk, with
    /// gradients for both the hidden rows and the projection.
    #[test]
    fn fused_token_logps_matches_primitive() {
        use crate::model::transformer::logsumexp_last;
        for (dt, tol) in DTYPES {
            let n = super::HEAD_CHUNK_ROWS + 7;
            let targets: Vec<u32> = (0..n as u32).map(|i| (i * 13) % 50).collect();
            compare(dt, tol, &[&[n, 16], &[50, 16]], &[true, true], |k, x| {
                if k == Kernels::FUSED {
                    super::token_logps(&x[0], &x[1], &targets, false).unwrap()
                } else {
                    let logits = x[0].matmul(&x[1].t().unwrap()).unwrap();
                    let lse = logsumexp_last(&logits).unwrap().squeeze(1).unwrap();
                    let t = Tensor::new(targets.as_slice(), &Device::Cpu)
                        .unwrap()
                        .unsqueeze(1)
                        .unwrap();
                    (logits.gather(&t, 1).unwrap().squeeze(1).unwrap() - lse).unwrap()
                }
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
