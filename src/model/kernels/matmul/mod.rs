//! The matrix products of the linear layers and the log-prob head.
//!
//! [`linear`] is `x·Wᵀ` as one op whose backward writes `dW = dyᵀ·x` straight into `W`'s
//! `[out, in]` layout (candle's matmul backward leaves a transposed view, which the optimizer
//! would copy twice per step). In f32 the products go through the `gemm` crate as candle's do.
//!
//! With `bf16 = true` they are bf16 products with f32 accumulation: what PyTorch's CPU autocast
//! does to linear layers. Both operands are rounded to bf16 (round to nearest, ties to even),
//! their products are exact in f32, and the sums and the result stay f32. Weights, gradients
//! and optimizer state stay f32 (the "master weights"); only the matmuls' inputs are rounded,
//! in the forward pass and in backward (`dx = dy·W`, `dW = dyᵀ·x`).
//!
//! On CPUs with AMX (Intel Xeon 4th generation, "Sapphire Rapids", and later) the products run
//! on the tile unit: the operands are converted while they are packed into 16×32 bf16 tiles,
//! and a 32×32 block of the result is four `tdpbf16ps` accumulators. With AVX512-BF16 but no
//! AMX (AMD Zen 4/5) the same tiles are multiplied with `vdpbf16ps` ([`dpbf16`]). Elsewhere the
//! same numbers come from rounding the operands and running the f32 GEMM (the results differ
//! only in the order of the f32 sums); that path is correct but no faster than f32.
//!
//! [`matmul`] splits a product's 32×32 blocks evenly over the pool's threads;
//! [`matmul_serial`] runs one on the calling thread, for the small products of tasks that are
//! already parallel (attention's).

use super::cpu::CpuPath;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// `x` rounded to the nearest bf16 (ties to even), as bits.
#[inline(always)]
pub fn to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return 0x7fc0;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to the nearest bf16 and widened back.
pub fn round_to_bf16(x: f32) -> f32 {
    f32::from_bits((to_bf16_bits(x) as u32) << 16)
}

/// A strided f32 matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn check(&self) -> candle_core::Result<()> {
        if self.rows > 0 && self.cols > 0 && (self.rows - 1) * self.rs + (self.cols - 1) * self.cs >= self.data.len() {
            candle_core::bail!(
                "bf16 matmul: a {}x{} view does not fit its {} values",
                self.rows,
                self.cols,
                self.data.len()
            )
        }
        Ok(())
    }
}

/// Whether this CPU and kernel let this process use AMX bf16 tiles (asked once; on Linux the
/// process must request the tile state with `arch_prctl` first), whatever `PREFER_KERNELS` says.
pub(crate) fn amx_permitted() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(amx::enable)
}

/// Whether the bf16 products run on AMX tiles ([`CpuPath::Amx`]).
pub fn amx_available() -> bool {
    CpuPath::Amx.allows()
}

/// The fast bf16 kernel of this CPU ([`CpuPath::fast_bf16`]) in words, or `None`.
pub fn bf16_kernel() -> Option<&'static str> {
    match CpuPath::fast_bf16()? {
        CpuPath::Amx => Some("AMX tiles (tdpbf16ps)"),
        _ => Some("AVX512-BF16 (vdpbf16ps)"),
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod amx {
    pub fn enable() -> bool {
        false
    }
    pub struct Tiles(());
    impl Tiles {
        pub unsafe fn configure() -> Tiles {
            unreachable!("AMX is x86_64 Linux only")
        }
    }
    pub unsafe fn kernel_32x32(_: *const u16, _: *const u16, _: *const u16, _: *const u16, _: usize, _: *mut f32) {
        unreachable!("AMX is x86_64 Linux only")
    }
    pub unsafe fn kernel_16x32(_: *const u16, _: *const u16, _: *const u16, _: usize, _: *mut f32) {
        unreachable!("AMX is x86_64 Linux only")
    }
    pub unsafe fn pack_rhs_columns(_: super::View, _: usize, _: usize, _: *mut u32) {
        unreachable!("AMX is x86_64 Linux only")
    }
    pub unsafe fn pack_lhs_rows(_: super::View, _: usize, _: usize, _: *mut u16) {
        unreachable!("AMX is x86_64 Linux only")
    }
}

#[cfg(target_arch = "x86_64")]
mod dpbf16;

#[cfg(not(target_arch = "x86_64"))]
mod dpbf16 {
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel_32x32(
        _: *const u16,
        _: *const u16,
        _: *const u16,
        _: *const u16,
        _: usize,
        _: *mut f32,
        _: usize,
        _: bool,
    ) {
        unreachable!("AVX512-BF16 is x86_64 only")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel_rows_x32<const R: usize>(
        _: *const u16,
        _: usize,
        _: *const u16,
        _: *const u16,
        _: usize,
        _: *mut f32,
        _: usize,
        _: bool,
        _: *const u16,
    ) {
        unreachable!("AVX512-BF16 is x86_64 only")
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("linear: {what} must be a contiguous f32 CPU tensor"),
    }
}

mod linear;
pub mod packed;
pub use linear::{few_rows, few_rows_many, linear, linear_bwd, linear_bwd_input, FEW_ROWS};
#[cfg(test)]
#[cfg(test)]
use linear::{few_rows_many_on, few_rows_on};

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// `f(i)` for `i` in `0..n`: in parallel on the pool, or on this thread alone (a product that
/// is one of many parallel tasks, such as attention's).
fn for_each_index(n: usize, parallel: bool, f: impl Fn(usize) + Send + Sync) {
    match parallel {
        true => (0..n).into_par_iter().for_each(f),
        false => (0..n).for_each(f),
    }
}

/// `v` rounded to bf16 (and widened back), row-major.
fn rounded(v: View, parallel: bool) -> Vec<f32> {
    let mut data = vec![0f32; v.rows * v.cols];
    let round_row = |(i, row): (usize, &mut [f32])| {
        for (j, d) in row.iter_mut().enumerate() {
            *d = round_to_bf16(v.data[i * v.rs + j * v.cs]);
        }
    };
    match parallel {
        true => data.par_chunks_mut(v.cols.max(1)).enumerate().for_each(round_row),
        false => data.chunks_mut(v.cols.max(1)).enumerate().for_each(round_row),
    }
    data
}

/// The right-hand operand `[k, n]` of a bf16 product, prepared once so that it can be used
/// for several left-hand operands (the log-prob head multiplies its weight chunk by chunk).
pub enum Rhs {
    /// Tiles for AMX: per 16 columns, per 32 rows of k, 16 row pairs × 16 columns × 2
    /// (`tdpbf16ps`'s pairs along k), k and n zero-padded to multiples of 32.
    Tiles {
        data: Vec<u16>,
        k: usize,
        n: usize,
        nkb: usize,
    },
    /// Rounded to bf16 and widened back, row-major `[k, n]`, for the f32 GEMM.
    Rounded { data: Vec<f32>, k: usize, n: usize },
}

impl std::fmt::Debug for Rhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Rhs::Tiles { .. } => "bf16 tiles",
            Rhs::Rounded { .. } => "rounded f32",
        };
        write!(f, "Rhs[{}, {}] ({kind})", self.k(), self.n())
    }
}

impl Rhs {
    pub fn new(b: View) -> candle_core::Result<Rhs> {
        Self::prepare(b, CpuPath::Avx512Bf16.allows(), true)
    }

    /// [`Self::new`] on the calling thread alone.
    pub fn serial(b: View) -> candle_core::Result<Rhs> {
        Self::prepare(b, CpuPath::Avx512Bf16.allows(), false)
    }

    fn prepare(b: View, tiles: bool, parallel: bool) -> candle_core::Result<Rhs> {
        b.check()?;
        let (k, n) = (b.rows, b.cols);
        if !tiles {
            return Ok(Rhs::Rounded {
                data: rounded(b, parallel),
                k,
                n,
            });
        }
        let nkb = k.div_ceil(32).max(1);
        let np = round_up(n.max(1), 32);
        // one chunk per 16 columns: nkb tiles of [16 row pairs][16 columns] u32 words, each
        // word the bf16 pair (row 2p, row 2p + 1) of one column
        // SAFETY: the packer writes all nkb · 512 values of each of the np / 16 chunks; tiles
        // are only prepared on the AVX512-BF16 or AMX paths (hence AVX-512).
        let data = unsafe {
            unfilled_u16(np * nkb * 32, |d| {
                for_each_index(np / 16, parallel, |jb| {
                    amx::pack_rhs_columns(b, jb * 16, nkb, d.at(jb * nkb * 512) as *mut u32)
                })
            })
        };
        Ok(Rhs::Tiles { data, k, n, nkb })
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        match self {
            Rhs::Tiles { data, .. } => data.len() * 2,
            Rhs::Rounded { data, .. } => data.len() * 4,
        }
    }

    fn k(&self) -> usize {
        match self {
            Rhs::Tiles { k, .. } | Rhs::Rounded { k, .. } => *k,
        }
    }

    fn n(&self) -> usize {
        match self {
            Rhs::Tiles { n, .. } | Rhs::Rounded { n, .. } => *n,
        }
    }
}

/// Packs `a` `[m, k]` into 16-row tiles: per 16 rows, per 32 of k, 16 rows × 32 bf16; m padded
/// to a multiple of 32 and k to one of 32, with zeros.
fn pack_lhs(a: View, nkb: usize, parallel: bool) -> Vec<u16> {
    let mp = round_up(a.rows.max(1), 32);
    // SAFETY: the packer writes all nkb · 512 values of each of the mp / 16 chunks; tiles are
    // only packed on the AVX512-BF16 or AMX paths (hence AVX-512).
    unsafe {
        unfilled_u16(mp * nkb * 32, |d| {
            for_each_index(mp / 16, parallel, |ib| {
                amx::pack_lhs_rows(a, ib * 16, nkb, d.at(ib * nkb * 512))
            })
        })
    }
}

/// A `*mut u16` that parallel tasks write through, each to its own values.
#[derive(Clone, Copy)]
struct SharedU16(*mut u16);

// SAFETY: the tasks write disjoint values (each packer call its own chunk).
unsafe impl Sync for SharedU16 {}
unsafe impl Send for SharedU16 {}

impl SharedU16 {
    /// # Safety
    /// `i` must lie in the buffer.
    unsafe fn at(self, i: usize) -> *mut u16 {
        unsafe { self.0.add(i) }
    }
}

/// A buffer of `len` u16 that `write` fills, every value, through the pointer it is given (the
/// packers write whole tiles, their padding included): not zero-filled first, which on a bf16
/// training step was ~1 GB of `memset`. In unit tests it holds 0xffff (a bf16 NaN) first, so
/// that a packer leaving a value unwritten fails them.
///
/// # Safety
/// `write` must initialise all `len` values.
unsafe fn unfilled_u16(len: usize, write: impl FnOnce(SharedU16)) -> Vec<u16> {
    let mut v: Vec<u16> = Vec::with_capacity(len);
    #[cfg(test)]
    v.spare_capacity_mut().fill(std::mem::MaybeUninit::new(0xffff));
    write(SharedU16(v.spare_capacity_mut().as_mut_ptr() as *mut u16));
    // SAFETY: the caller's contract: `write` initialised the first `len` values.
    unsafe { v.set_len(len) };
    v
}

/// `c = a·b` (or `c += a·b` with `accumulate`) with bf16 operands and f32 sums; `c` is
/// row-major `[a.rows, b.n]` with `ldc` values per row.
pub fn matmul(a: View, b: &Rhs, c: &mut [f32], ldc: usize, accumulate: bool) -> candle_core::Result<()> {
    check_out("bf16 matmul", a.rows, b.n(), c.len(), ldc)?;
    // SAFETY: `c` holds [a.rows, n] at stride ldc (checked), initialised.
    unsafe { matmul_on(CpuPath::active(), a, b, c.as_mut_ptr(), ldc, accumulate, true) }
}

/// `c = a·b` (or `c += a·b`) with bf16 operands and f32 sums, as [`matmul`], but on the calling
/// thread alone: for the small products of tasks that already run in parallel (attention's,
/// per head and run of rows). `c` is row-major with `ldc` values per row.
///
/// # Safety
/// `c` must hold `[a.rows, b.cols]` at row stride `ldc ≥ b.cols`, initialised where
/// `accumulate`, and no other thread may touch it meanwhile.
pub unsafe fn matmul_serial(a: View, b: View, c: *mut f32, ldc: usize, accumulate: bool) -> candle_core::Result<()> {
    let rhs = Rhs::serial(b)?;
    // SAFETY: the caller's contract.
    unsafe { matmul_on(CpuPath::active(), a, &rhs, c, ldc, accumulate, false) }
}

/// `a` times the corner `[a.cols, n]` of the prepared `b` ([`Rhs::serial`]), on the calling
/// thread alone, into `c` (row-major, `ldc` per row): [`matmul_serial`] for several products
/// over leading parts of one operand.
///
/// # Safety
/// As [`matmul_serial`], for `[a.rows, n]`.
pub unsafe fn matmul_corner_serial(a: View, b: &Rhs, n: usize, c: *mut f32, ldc: usize) -> candle_core::Result<()> {
    // SAFETY: the caller's contract.
    unsafe { matmul_corner_on(CpuPath::active(), a, b, n, c, ldc, false, false) }
}

/// `a·b` with bf16 operands and f32 sums as a new row-major `[a.rows, b.n]` buffer, which the
/// product writes whole: it is not zero-filled first (zero-filling the outputs of a training
/// step's products, ~1 GB on SmolLM2's DPO step, was a few percent of the step).
pub fn matmul_new(a: View, b: &Rhs) -> candle_core::Result<Vec<f32>> {
    let n = b.n();
    // SAFETY: matmul_on with `accumulate` false writes every value of `[a.rows, n]`.
    unsafe { unfilled(a.rows * n, |c| matmul_on(CpuPath::active(), a, b, c, n, false, true)) }
}

/// A buffer of `len` f32 that `write` fills, every value, through the pointer it is given.
///
/// # Safety
/// `write` must initialise all `len` values when it returns `Ok`.
unsafe fn unfilled(
    len: usize,
    write: impl FnOnce(*mut f32) -> candle_core::Result<()>,
) -> candle_core::Result<Vec<f32>> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    write(v.spare_capacity_mut().as_mut_ptr() as *mut f32)?;
    // SAFETY: the caller's contract: `write` initialised the first `len` values.
    unsafe { v.set_len(len) };
    Ok(v)
}

/// That an output of `len` values holds `[m, n]` with `ldc` values per row (`(m − 1)·ldc + n`
/// values: the last row need not be whole, so a block of columns of a wider matrix is an output).
fn check_out(what: &str, m: usize, n: usize, len: usize, ldc: usize) -> candle_core::Result<()> {
    if ldc < n || (m > 0 && len < (m - 1) * ldc + n) {
        candle_core::bail!("{what}: output of {len} values for [{m}, {n}] with row stride {ldc}")
    }
    Ok(())
}

/// [`matmul`] with tiles multiplied by the kernel of `path`: AMX's `tdpbf16ps` on
/// [`CpuPath::Amx`], AVX512-BF16's `vdpbf16ps` below it (the same tiles, the same 32×32 blocks).
/// Without `accumulate`, every value of `c`'s `[m, n]` is written and none is read. With
/// `parallel` false it runs on the calling thread alone.
///
/// # Safety
/// `c` must hold `[a.rows, b.n]` at row stride `ldc ≥ b.n` ([`check_out`]), initialised where
/// `accumulate`.
unsafe fn matmul_on(
    path: CpuPath,
    a: View,
    b: &Rhs,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) -> candle_core::Result<()> {
    if a.cols != b.k() {
        candle_core::bail!("bf16 matmul: [{}, {}] times [{}, {}]", a.rows, a.cols, b.k(), b.n())
    }
    // SAFETY: the caller's contract.
    unsafe { matmul_corner_on(path, a, b, b.n(), c, ldc, accumulate, parallel) }
}

/// `a·b'` where `b'` is the corner `[a.cols, n]` of `b` (its first `a.cols ≤ k` rows and first
/// `n` columns), as [`matmul_on`]: one packed operand serves products over leading parts of it
/// (attention's keys up to the last one a run of queries may see).
///
/// # Safety
/// As [`matmul_on`], for `[a.rows, n]`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_corner_on(
    path: CpuPath,
    a: View,
    b: &Rhs,
    n: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) -> candle_core::Result<()> {
    a.check()?;
    let m = a.rows;
    if a.cols > b.k() || n > b.n() {
        candle_core::bail!("bf16 matmul: [{m}, {}] times [{}, {n}] of {:?}", a.cols, a.cols, b)
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    match b {
        Rhs::Rounded { data, n: bn, .. } => {
            let k = a.cols;
            let lhs = rounded(a, parallel);
            // the corner of the row-major [k, bn] operand
            let corner = View {
                data,
                rows: k,
                cols: n,
                rs: *bn,
                cs: 1,
            };
            // SAFETY: the caller's contract on `c`.
            unsafe { matmul_f32_raw(View::row_major(&lhs, m, k), corner, c, ldc, accumulate, parallel) }
        }
        Rhs::Tiles {
            data: bt, nkb: b_nkb, ..
        } => {
            // a's columns past a.cols are packed as zeros, so b's rows there add nothing
            let nkb = a.cols.div_ceil(32).max(1);
            let b_tile = *b_nkb * 512; // u16 per 16-column chunk of b
            let at = pack_lhs(a, nkb, parallel);
            let (mblocks, nblocks) = (m.div_ceil(32), n.div_ceil(32));
            // each task takes an equal run of the 32×32 blocks in column-major order (a column
            // block's two B tiles stay in cache while the A tiles pass): splitting the rows
            // alone left one of two threads idle for a ninth of a product of 9 row blocks
            let blocks = mblocks * nblocks;
            let tasks = if parallel {
                rayon::current_num_threads().clamp(1, blocks)
            } else {
                1
            };
            let tile = nkb * 512; // u16 per 16-row block of a
            let out = linear::SharedOut(c);
            for_each_index(tasks, parallel, |t| {
                let mut blk = [0f32; 32 * 32];
                let on_amx = path >= CpuPath::Amx;
                // SAFETY: AMX is checked; pointers stay inside `at`, `bt` (32-padded) and `blk`.
                let _tiles = on_amx.then(|| unsafe { amx::Tiles::configure() });
                for b in t * blocks / tasks..(t + 1) * blocks / tasks {
                    let (nb, mb) = (b / mblocks, b % mblocks);
                    let b0 = bt[2 * nb * b_tile..].as_ptr();
                    let b1 = bt[(2 * nb + 1) * b_tile..].as_ptr();
                    let jn = 32.min(n - nb * 32);
                    let a0 = at[2 * mb * tile..].as_ptr();
                    let a1 = at[(2 * mb + 1) * tile..].as_ptr();
                    let rows = 32.min(m - mb * 32);
                    if !on_amx && rows == 32 && jn == 32 {
                        // a whole block: vdpbf16ps's sums go straight to (or onto) `c`
                        // SAFETY: AVX512-BF16 (tiles without AMX); rows mb·32.. + 32 ≤ m and
                        // columns nb·32.. + 32 ≤ n ≤ ldc lie inside `c`, and only this task
                        // writes block (mb, nb).
                        unsafe {
                            let dst = out.at(mb * 32 * ldc + nb * 32);
                            dpbf16::kernel_32x32(a0, a1, b0, b1, nkb, dst, ldc, accumulate)
                        };
                        continue;
                    }
                    // SAFETY: tiles exist only on the AVX512-BF16 or AMX paths.
                    unsafe {
                        match on_amx {
                            true => amx::kernel_32x32(a0, a1, b0, b1, nkb, blk.as_mut_ptr()),
                            false => dpbf16::kernel_32x32(a0, a1, b0, b1, nkb, blk.as_mut_ptr(), 32, false),
                        }
                    };
                    for r in 0..rows {
                        let src = &blk[r * 32..][..jn];
                        // SAFETY: row mb·32 + r < m, columns nb·32.. + jn ≤ n ≤ ldc: inside
                        // `c`; only the task of block (mb, nb) writes it.
                        unsafe {
                            let dst = out.at((mb * 32 + r) * ldc + nb * 32);
                            match accumulate {
                                true => src.iter().enumerate().for_each(|(j, s)| *dst.add(j) += s),
                                false => std::ptr::copy_nonoverlapping(src.as_ptr(), dst, jn),
                            }
                        }
                    }
                }
            });
            Ok(())
        }
    }
}

/// Runs `f` on the f32 values of a CPU tensor (contiguous; copied first if it is not).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cpu(s) => f(f32_slice(s, l, "an operand")?),
        _ => candle_core::bail!("bf16 matmul: CPU tensors only"),
    }
}

/// [`Rhs`] of a 2-D f32 tensor `[k, n]`, or of its transpose with `transpose`.
pub fn rhs_of(t: &Tensor, transpose: bool) -> candle_core::Result<Rhs> {
    let (r, c) = t.dims2()?;
    with_f32(t, |v| {
        let view = View::row_major(v, r, c);
        Rhs::new(if transpose { view.t() } else { view })
    })
}

/// `a·b` for a 2-D f32 tensor `a` `[m, k]` (or `aᵀ` with `transpose`), as a new `[m, n]` tensor.
pub fn matmul_tensor(a: &Tensor, transpose: bool, b: &Rhs) -> candle_core::Result<Tensor> {
    let (r, c) = a.dims2()?;
    let m = if transpose { c } else { r };
    let n = b.n();
    let out = with_f32(a, |v| {
        let view = View::row_major(v, r, c);
        matmul_new(if transpose { view.t() } else { view }, b)
    })?;
    Tensor::from_vec(out, (m, n), a.device())
}

/// `c = a·b` (or `c += a·b`) in f32 through the `gemm` crate, for strided views; `c` is
/// row-major with `ldc` values per row.
pub fn matmul_f32(a: View, b: View, c: &mut [f32], ldc: usize, accumulate: bool) -> candle_core::Result<()> {
    check_out("matmul", a.rows, b.cols, c.len(), ldc)?;
    // SAFETY: `c` holds [a.rows, n] at stride ldc (checked), initialised.
    unsafe { matmul_f32_raw(a, b, c.as_mut_ptr(), ldc, accumulate, true) }
}

/// `a·b` in f32 as a new row-major `[a.rows, b.cols]` buffer that the product writes whole (not
/// zero-filled first; see [`matmul_new`]).
pub fn matmul_f32_new(a: View, b: View) -> candle_core::Result<Vec<f32>> {
    let n = b.cols;
    // SAFETY: matmul_f32_raw with `accumulate` false writes every value of `[a.rows, n]`.
    unsafe { unfilled(a.rows * n, |c| matmul_f32_raw(a, b, c, n, false, true)) }
}

/// [`matmul_f32`] through a pointer: without `accumulate`, every value of `c`'s `[m, n]` is
/// written and none is read.
///
/// # Safety
/// `c` must hold `[a.rows, b.cols]` at row stride `ldc ≥ b.cols` ([`check_out`]), initialised
/// where `accumulate`.
unsafe fn matmul_f32_raw(
    a: View,
    b: View,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) -> candle_core::Result<()> {
    a.check()?;
    b.check()?;
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        candle_core::bail!("matmul: [{m}, {k}] times [{}, {n}]", b.rows)
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            // SAFETY: rows of n values inside `c` (the caller's contract).
            (0..m).for_each(|i| unsafe { std::ptr::write_bytes(c.add(i * ldc), 0, n) });
        }
        return Ok(());
    }
    // SAFETY: the views were checked to lie inside their slices, and `c` holds [m, n] at stride ldc; gemm
    // with `read_dst` false writes every value of [m, n] without reading it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            match parallel {
                true => gemm::Parallelism::Rayon(rayon::current_num_threads()),
                false => gemm::Parallelism::None,
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
