//! The model's kernels, one file each: RMSNorm ([`norm`]), RoPE ([`rope`](mod@rope)), the attention of a
//! block ([`attention`](mod@attention)), SwiGLU ([`swiglu`](mod@swiglu)), the log-prob head ([`logprob_head`]), the matrix
//! products with their bf16/AMX path ([`matmul`]), and the primitive-op reference versions
//! ([`primitive`]). [`Kernels`] chooses between fused and primitive per call.
//!
//! The fused ones are CPU kernels with their backward passes, as candle custom ops.
//!
//! Written on primitives, each of these is 5–9 graph nodes, and candle's backward allocates a
//! zero gradient and adds into it for every node; fused, each is one node whose backward is
//! one pass. The primitive versions in [`primitive`] remain the reference: tests
//! check values and gradients of each fused op against them in f64 and f32.
//!
//! The kernels run on contiguous CPU tensors in f32 or f64; anything else (another device or
//! dtype) goes through the primitive version, so a model never fails for lack of a kernel.

use crate::error::Result;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
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
    // 2^k from k's bits after adding 1.5·2^23 (k is an integer in [-127, 128] here): exact, and
    // unlike `k as i32` (which saturates) it vectorises
    let ki = (k + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
    let y = (p * r * r + r + 1.0) * f32::from_bits(((ki + 127) as u32) << 23);
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
    *YES.get_or_init(|| cpu::CpuPath::Avx2.allows())
}

/// A generic row kernel compiled twice, for the baseline target and for AVX2 + FMA, the
/// latter chosen at run time (the crate is built for the baseline, so the element-wise loops
/// would otherwise not use the wide registers).
///
/// Written `fn name<T>(avx2: bool, ...)`, the caller chooses: the AVX2 version when `avx2` and
/// the CPU has it, else the baseline one (kernels whose tests try every path).
macro_rules! multiversioned {
    // the body both forms share: the two compilations, and the AVX2 one where `$avx2` holds
    (@body ($($avx2:tt)*) ($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {{
        #[inline(always)]
        fn imp<T: Elem>($($arg: $ty),*) $(-> $ret)? $body
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v3<T: Elem>($($arg: $ty),*) $(-> $ret)? {
                imp::<T>($($arg),*)
            }
            if $($avx2)* {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                return unsafe { v3::<T>($($arg),*) };
            }
        }
        imp::<T>($($arg),*)
    }};
    ($(#[$m:meta])* fn $name:ident<T>(avx2: bool, $($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        fn $name<T: Elem>(avx2: bool, $($arg: $ty),*) $(-> $ret)? {
            let _ = avx2;
            multiversioned!(@body (avx2 && $crate::model::kernels::CpuPath::detected() >= $crate::model::kernels::CpuPath::Avx2) ($($arg: $ty),*) $(-> $ret)? $body)
        }
    };
    ($(#[$m:meta])* fn $name:ident<T>($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        fn $name<T: Elem>($($arg: $ty),*) $(-> $ret)? {
            multiversioned!(@body (has_avx2_fma()) ($($arg: $ty),*) $(-> $ret)? $body)
        }
    };
}

#[inline(always)]
fn sigmoid<T: Elem>(x: T) -> T {
    T::one() / (T::one() + (-x).exp_fast())
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
    /// [`neg_softmax_row`] in place: the logits of `d` become `-g·exp(logit − lse)`.
    fn neg_softmax_in_place<T>(d: &mut [T], lse: T, g: T) {
        for d in d.iter_mut() {
            *d = -g * (*d - lse).exp_fast();
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

fn two(g: (Option<Tensor>, Option<Tensor>), op: &str) -> Result<(Tensor, Tensor)> {
    match g {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(crate::error::Error::msg(format!("{op}: backward gave no gradient"))),
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

pub mod attention;
pub mod cached_attention;
pub mod cpu;
pub mod logprob_head;
pub mod matmul;
pub mod norm;
pub mod primitive;
pub mod rope;
pub mod swiglu;
#[cfg(test)]
mod tests;

pub use attention::{attention, attention_grads, masked_softmax, Attention, AttentionPart};
pub use cpu::CpuPath;
pub use logprob_head::{
    token_logps, token_logps_entropy, token_logps_into, token_logps_stats, token_logps_stats_into, TokenLogps,
};
pub use norm::{rms_norm, rms_norm_grads};
pub use rope::rope;
pub use swiglu::{swiglu, swiglu_grads};

/// Which implementation of RMSNorm, RoPE, attention softmax and SwiGLU a model runs, and in
/// which precision its matmuls multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    /// Fused CPU kernels with their own backward (this module) where the tensor is an f32
    /// or f64 CPU tensor; primitive ops elsewhere. `false`: candle primitive ops only (the
    /// reference implementation).
    pub fused: bool,
    /// The linear layers and the log-prob head multiply bf16-rounded operands with f32 sums
    /// ([`matmul`], `bf16 = true`), where the tensors are f32 CPU tensors.
    pub bf16: bool,
    /// With `bf16`, attention's products too (scores, probabilities times values, and their
    /// backward), as PyTorch's autocast runs them; `bf16 = true` sets both. Without it
    /// attention stays f32 (decoding from bf16 weights, whose cached attention is f32).
    pub bf16_attention: bool,
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
        bf16_attention: false,
    };
    /// Primitive ops, f32 matmuls.
    pub const PRIMITIVE: Kernels = Kernels {
        fused: false,
        bf16: false,
        bf16_attention: false,
    };

    /// `bf16 = true`'s kernels: every product in bf16 (linear layers, head, attention), fused
    /// or not.
    pub const fn bf16(fused: bool) -> Kernels {
        Kernels {
            fused,
            bf16: true,
            bf16_attention: true,
        }
    }

    pub(crate) fn fused_for(self, x: &Tensor) -> bool {
        self.fused && supported(x)
    }

    /// Whether a matmul with the activation `x` runs in bf16.
    pub fn bf16_for(self, x: &Tensor) -> bool {
        self.bf16 && x.dtype() == DType::F32 && x.device().is_cpu()
    }

    /// Whether attention's products with the activation `x` run in bf16.
    pub fn bf16_attention_for(self, x: &Tensor) -> bool {
        self.bf16_attention && self.bf16_for(x)
    }

    pub fn rms_norm(self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        if self.fused_for(x) {
            norm::rms_norm(x, w, eps)
        } else {
            primitive::rms_norm(x, w, eps)
        }
    }

    pub fn rope(self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.fused_for(x) {
            rope::rope(x, cos, sin)
        } else {
            primitive::apply_rope(x, cos, sin)
        }
    }

    /// `softmax(scale · scores + mask)` over the last dimension.
    pub fn masked_softmax(self, scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
        if self.fused_for(scores) {
            attention::masked_softmax(scores, mask, scale)
        } else {
            primitive::softmax_last(&(scores * scale)?.broadcast_add(mask)?)
        }
    }

    /// `silu(g) · u`.
    pub fn swiglu(self, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        if self.fused_for(g) {
            swiglu::swiglu(g, u)
        } else {
            Ok((g.silu()? * u)?)
        }
    }
}
