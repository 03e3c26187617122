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
//! and a 32×32 block of the result is four `tdpbf16ps` accumulators. Elsewhere the same numbers
//! come from rounding the operands and running the f32 GEMM (the results differ only in the
//! order of the f32 sums); that path is correct but no faster than f32.

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
/// process must request the tile state with `arch_prctl` first).
pub fn amx_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(amx::enable)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use std::arch::asm;

    /// CPUID leaf 7 (AMX-TILE and AMX-BF16), then the kernel's permission for tile data.
    pub fn enable() -> bool {
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
        // the packing code uses AVX-512 (every AMX CPU has it)
        let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
        if !(amx_bf16 && amx_tile && avx512) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only changes this process's permissions.
        let ret = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        ret == 0
    }

    /// The tile configuration: eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Configures the tiles of the calling thread for [`kernel_32x32`], and releases them when
    /// dropped.
    pub struct Tiles(());

    impl Tiles {
        /// # Safety
        /// AMX must be available ([`super::amx_available`]).
        pub unsafe fn configure() -> Tiles {
            let mut cfg = TileConfig {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                colsb: [0; 16],
                rows: [0; 16],
            };
            for t in 0..8 {
                cfg.colsb[t] = 64;
                cfg.rows[t] = 16;
            }
            asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
            Tiles(())
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: the tiles were configured by this thread in `configure`.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// `out[32×32] = A·B` over `nkb` blocks of 32 along k: `a0`/`a1` are the packed 16-row
    /// tiles of the block's two row halves, `b0`/`b1` those of its two column halves (each
    /// `nkb` consecutive 1 KiB tiles); `out` is row-major with 32 f32 per row.
    ///
    /// # Safety
    /// The tiles must be configured ([`Tiles::configure`]) and the pointers valid for
    /// `nkb` tiles (and 32×32 f32 for `out`); `nkb > 0`.
    #[inline(always)]
    pub unsafe fn kernel_32x32(
        a0: *const u16,
        a1: *const u16,
        b0: *const u16,
        b1: *const u16,
        nkb: usize,
        out: *mut f32,
    ) {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {n}",
            "jnz 2b",
            "tilestored [{c} + {cs}*1], tmm0",
            "add {c}, 64",
            "tilestored [{c} + {cs}*1], tmm1",
            "add {c}, 1984",
            "tilestored [{c} + {cs}*1], tmm2",
            "add {c}, 64",
            "tilestored [{c} + {cs}*1], tmm3",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            n = inout(reg) nkb => _,
            c = inout(reg) out => _,
            s = in(reg) 64usize,
            cs = in(reg) 128usize,
            options(nostack),
        );
    }
    use super::View;
    use std::arch::x86_64::*;

    /// Up to 16 floats from `p` (the rest zero) with the bf16 rounding increment added: the
    /// upper 16 bits of each lane are the value rounded to bf16 (ties to even); NaN becomes a
    /// quiet NaN. The same rounding as [`super::to_bf16_bits`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn rounded16(p: *const f32, n: usize) -> __m512i {
        let mask: __mmask16 = if n >= 16 { 0xffff } else { (1u32 << n) as u16 - 1 };
        let b = _mm512_maskz_loadu_epi32(mask, p as *const i32);
        let lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
        let r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        let abs = _mm512_and_si512(b, _mm512_set1_epi32(0x7fff_ffff));
        let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
        _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0_0000))
    }

    /// Packs columns `j0..j0 + 16` of `b` into `nkb` tiles of 16 × 16 pair words (the bf16 of
    /// rows 2p and 2p + 1 of a column in one word, the even row in the low half).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_rhs_columns(b: View, j0: usize, nkb: usize, words: &mut [u32]) {
        let (k, n) = (b.rows, b.cols);
        let jn = 16.min(n.saturating_sub(j0));
        if jn == 0 {
            return; // padding columns stay zero
        }
        let hi_mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
        for kb in 0..nkb {
            let tile = &mut words[kb * 256..(kb + 1) * 256];
            let kn = 32.min(k - (kb * 32).min(k));
            if b.rs == 1 {
                // columns contiguous along k (a transposed row-major weight): adjacent floats
                // make a pair, so the column's bf16 values in order are its pair words
                let mut cols = [[0u32; 16]; 16];
                for (c, col) in cols.iter_mut().enumerate().take(jn) {
                    let src = b.data[(j0 + c) * b.cs + kb * 32..][..kn].as_ptr();
                    for half in 0..2 {
                        let n = kn.saturating_sub(half * 16).min(16);
                        let r = rounded16(src.add(half * 16), n);
                        let w = _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
                        _mm256_storeu_si256(col[half * 8..].as_mut_ptr() as *mut __m256i, w);
                    }
                }
                for p in 0..16 {
                    for c in 0..16 {
                        tile[p * 16 + c] = cols[c][p];
                    }
                }
            } else if b.cs == 1 {
                for p in 0..kn.div_ceil(2) {
                    let r0 = (kb * 32 + 2 * p) * b.rs + j0;
                    let lo = rounded16(b.data[r0..][..jn].as_ptr(), jn);
                    let hi = if 2 * p + 1 < kn {
                        rounded16(b.data[r0 + b.rs..][..jn].as_ptr(), jn)
                    } else {
                        _mm512_setzero_si512()
                    };
                    let w = _mm512_or_si512(_mm512_and_si512(hi, hi_mask), _mm512_srli_epi32(lo, 16));
                    _mm512_storeu_si512(tile[p * 16..].as_mut_ptr() as *mut __m512i, w);
                }
            } else {
                for p in 0..kn.div_ceil(2) {
                    for c in 0..jn {
                        let at = |kk: usize| b.data[kk * b.rs + (j0 + c) * b.cs];
                        let hi = if 2 * p + 1 < kn {
                            super::to_bf16_bits(at(kb * 32 + 2 * p + 1))
                        } else {
                            0
                        };
                        tile[p * 16 + c] = ((hi as u32) << 16) | super::to_bf16_bits(at(kb * 32 + 2 * p)) as u32;
                    }
                }
            }
        }
    }

    /// Packs rows `i0..i0 + 16` of `a` into `nkb` tiles of 16 rows × 32 bf16.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn pack_lhs_rows(a: View, i0: usize, nkb: usize, chunk: &mut [u16]) {
        let (m, k) = (a.rows, a.cols);
        let rows = 16.min(m.saturating_sub(i0));
        if rows == 0 {
            return; // padding rows stay zero
        }
        for kb in 0..nkb {
            let tile = &mut chunk[kb * 512..(kb + 1) * 512];
            let kn = 32.min(k - (kb * 32).min(k));
            if a.cs == 1 {
                for r in 0..rows {
                    let src = a.data[(i0 + r) * a.rs + kb * 32..][..kn].as_ptr();
                    for half in 0..2 {
                        let n = kn.saturating_sub(half * 16).min(16);
                        let w = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded16(src.add(half * 16), n), 16));
                        _mm256_storeu_si256(tile[r * 32 + half * 16..].as_mut_ptr() as *mut __m256i, w);
                    }
                }
            } else if a.rs == 1 {
                // a transposed row-major matrix: the tile's 16 rows are contiguous for each k
                let mut tmp = [[0u16; 16]; 32];
                for (c, t) in tmp.iter_mut().enumerate().take(kn) {
                    let src = a.data[(kb * 32 + c) * a.cs + i0..][..rows].as_ptr();
                    let w = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded16(src, rows), 16));
                    _mm256_storeu_si256(t.as_mut_ptr() as *mut __m256i, w);
                }
                for r in 0..rows {
                    for c in 0..32 {
                        tile[r * 32 + c] = tmp[c][r];
                    }
                }
            } else {
                for r in 0..rows {
                    for c in 0..kn {
                        tile[r * 32 + c] = super::to_bf16_bits(a.data[(i0 + r) * a.rs + (kb * 32 + c) * a.cs]);
                    }
                }
            }
        }
    }
}

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
    pub unsafe fn pack_rhs_columns(_: super::View, _: usize, _: usize, _: &mut [u32]) {
        unreachable!("AMX is x86_64 Linux only")
    }
    pub unsafe fn pack_lhs_rows(_: super::View, _: usize, _: usize, _: &mut [u16]) {
        unreachable!("AMX is x86_64 Linux only")
    }
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// `v` rounded to bf16 (and widened back), row-major.
fn rounded(v: View) -> Vec<f32> {
    let mut data = vec![0f32; v.rows * v.cols];
    data.par_chunks_mut(v.cols.max(1)).enumerate().for_each(|(i, row)| {
        for (j, d) in row.iter_mut().enumerate() {
            *d = round_to_bf16(v.data[i * v.rs + j * v.cs]);
        }
    });
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

impl Rhs {
    pub fn new(b: View) -> candle_core::Result<Rhs> {
        Self::prepare(b, amx_available())
    }

    fn prepare(b: View, tiles: bool) -> candle_core::Result<Rhs> {
        b.check()?;
        let (k, n) = (b.rows, b.cols);
        if !tiles {
            return Ok(Rhs::Rounded { data: rounded(b), k, n });
        }
        let nkb = k.div_ceil(32).max(1);
        let np = round_up(n.max(1), 32);
        let mut data = vec![0u16; np * nkb * 32];
        // one chunk per 16 columns: nkb tiles of [16 row pairs][16 columns] u32 words, each
        // word the bf16 pair (row 2p, row 2p + 1) of one column
        data.par_chunks_mut(nkb * 512).enumerate().for_each(|(jb, chunk)| {
            let words: &mut [u32] = bytemuck_u32(chunk);
            // SAFETY: tiles are only prepared when AMX (hence AVX-512) is available.
            unsafe { amx::pack_rhs_columns(b, jb * 16, nkb, words) };
        });
        Ok(Rhs::Tiles { data, k, n, nkb })
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

/// Views a `u16` buffer of even length, 4-byte aligned, as `u32` words.
fn bytemuck_u32(v: &mut [u16]) -> &mut [u32] {
    assert!(v.len().is_multiple_of(2) && (v.as_ptr() as usize).is_multiple_of(4));
    // SAFETY: length and alignment checked; every bit pattern is a valid u32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u32, v.len() / 2) }
}

/// Packs `a` `[m, k]` into 16-row tiles: per 16 rows, per 32 of k, 16 rows × 32 bf16; m padded
/// to a multiple of 32 and k to one of 32, with zeros.
fn pack_lhs(a: View, nkb: usize) -> Vec<u16> {
    let mp = round_up(a.rows.max(1), 32);
    let mut data = vec![0u16; mp * nkb * 32];
    data.par_chunks_mut(nkb * 512).enumerate().for_each(|(ib, chunk)| {
        // SAFETY: tiles are only packed when AMX (hence AVX-512) is available.
        unsafe { amx::pack_lhs_rows(a, ib * 16, nkb, chunk) }
    });
    data
}

/// `c = a·b` (or `c += a·b` with `accumulate`) with bf16 operands and f32 sums; `c` is
/// row-major `[a.rows, b.n]` with `ldc` values per row.
pub fn matmul(a: View, b: &Rhs, c: &mut [f32], ldc: usize, accumulate: bool) -> candle_core::Result<()> {
    a.check()?;
    let (m, n) = (a.rows, b.n());
    if a.cols != b.k() {
        candle_core::bail!("bf16 matmul: [{m}, {}] times [{}, {n}]", a.cols, b.k())
    }
    if ldc < n || c.len() < m * ldc {
        candle_core::bail!(
            "bf16 matmul: output of {} values for [{m}, {n}] with row stride {ldc}",
            c.len()
        )
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    match b {
        Rhs::Rounded { data, k, n } => {
            let (k, n) = (*k, *n);
            let lhs = rounded(a);
            matmul_f32(
                View::row_major(&lhs, m, k),
                View::row_major(data, k, n),
                c,
                ldc,
                accumulate,
            )
        }
        Rhs::Tiles { data: bt, nkb, .. } => {
            let nkb = *nkb;
            let at = pack_lhs(a, nkb);
            let (mblocks, nblocks) = (m.div_ceil(32), n.div_ceil(32));
            let per = mblocks.div_ceil(rayon::current_num_threads().max(1));
            let tile = nkb * 512; // u16 per 16-row (or 16-column) block
            c[..m * ldc]
                .par_chunks_mut(per * 32 * ldc)
                .enumerate()
                .for_each(|(t, cc)| {
                    let mut out = [0f32; 32 * 32];
                    // SAFETY: this Rhs holds tiles only when AMX is available; pointers stay
                    // inside `at`, `bt` (32-padded) and `out`.
                    let _tiles = unsafe { amx::Tiles::configure() };
                    for nb in 0..nblocks {
                        let b0 = bt[2 * nb * tile..].as_ptr();
                        let b1 = bt[(2 * nb + 1) * tile..].as_ptr();
                        let jn = 32.min(n - nb * 32);
                        for mb in t * per..((t + 1) * per).min(mblocks) {
                            let a0 = at[2 * mb * tile..].as_ptr();
                            let a1 = at[(2 * mb + 1) * tile..].as_ptr();
                            unsafe { amx::kernel_32x32(a0, a1, b0, b1, nkb, out.as_mut_ptr()) };
                            let i0 = mb * 32 - t * per * 32;
                            let rows = 32.min(m - mb * 32);
                            for r in 0..rows {
                                let dst = &mut cc[(i0 + r) * ldc + nb * 32..][..jn];
                                let src = &out[r * 32..][..jn];
                                if accumulate {
                                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                                } else {
                                    dst.copy_from_slice(src);
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
    let mut out = vec![0f32; m * n];
    with_f32(a, |v| {
        let view = View::row_major(v, r, c);
        matmul(if transpose { view.t() } else { view }, b, &mut out, n, false)
    })?;
    Tensor::from_vec(out, (m, n), a.device())
}

/// `c = a·b` (or `c += a·b`) in f32 through the `gemm` crate, for strided views; `c` is
/// row-major with `ldc` values per row.
pub fn matmul_f32(a: View, b: View, c: &mut [f32], ldc: usize, accumulate: bool) -> candle_core::Result<()> {
    a.check()?;
    b.check()?;
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        candle_core::bail!("matmul: [{m}, {k}] times [{}, {n}]", b.rows)
    }
    if ldc < n || c.len() < m * ldc {
        candle_core::bail!(
            "matmul: output of {} values for [{m}, {n}] with row stride {ldc}",
            c.len()
        )
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|r| r[..n].fill(0.0));
        }
        return Ok(());
    }
    // SAFETY: the views were checked to lie inside their slices, and `c` holds [m, ldc].
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
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
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
    Ok(())
}

/// `x·Wᵀ` for `x` `[rows, in]` and `W` `[out, in]` (f32, contiguous, CPU); its backward
/// computes `dx = dy·W` and `dW = dyᵀ·x` (contiguous, in `W`'s layout). With `bf16` every
/// product multiplies bf16-rounded operands.
struct LinearOp {
    bf16: bool,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("linear: {what} must be a contiguous f32 CPU tensor"),
    }
}

/// `a·b` for 2-D f32 tensors, `a` transposed with `ta`, `b` with `tb`, as a new `[m, n]` tensor.
fn product(a: &Tensor, ta: bool, b: &Tensor, tb: bool, bf16: bool) -> candle_core::Result<Tensor> {
    if bf16 {
        return matmul_tensor(a, ta, &rhs_of(b, tb)?);
    }
    let ((ar, ac), (br, bc)) = (a.dims2()?, b.dims2()?);
    fn view(v: &[f32], r: usize, c: usize, t: bool) -> View<'_> {
        let m = View::row_major(v, r, c);
        if t {
            m.t()
        } else {
            m
        }
    }
    let (m, n) = (if ta { ac } else { ar }, if tb { br } else { bc });
    let mut out = vec![0f32; m * n];
    with_f32(a, |av| {
        with_f32(b, |bv| {
            matmul_f32(view(av, ar, ac, ta), view(bv, br, bc, tb), &mut out, n, false)
        })
    })?;
    Tensor::from_vec(out, (m, n), a.device())
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        if self.bf16 {
            "linear-bf16"
        } else {
            "linear"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inp) = l1.shape().dims2()?;
        let (out, inp2) = l2.shape().dims2()?;
        if inp != inp2 {
            candle_core::bail!("linear: input [{rows}, {inp}] with weight [{out}, {inp2}]")
        }
        let (x, w) = (f32_slice(s1, l1, "the input")?, f32_slice(s2, l2, "the weight")?);
        let (x, wt) = (View::row_major(x, rows, inp), View::row_major(w, out, inp).t());
        let mut y = vec![0f32; rows * out];
        if self.bf16 {
            matmul(x, &Rhs::new(wt)?, &mut y, out, false)?;
        } else {
            matmul_f32(x, wt, &mut y, out, false)?;
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = product(dy, false, w, false, self.bf16)?;
        let dw = product(dy, true, x, false, self.bf16)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The gradients `(dx, dW)` of [`linear`] for the output gradient `dy`, outside any graph.
pub(crate) fn linear_bwd(x: &Tensor, w: &Tensor, dy: &Tensor, bf16: bool) -> crate::error::Result<(Tensor, Tensor)> {
    Ok((product(dy, false, w, false, bf16)?, product(dy, true, x, false, bf16)?))
}

/// `x·Wᵀ` as one op (see the module docs); `x` `[rows, in]`, `W` `[out, in]`, both f32 on the
/// CPU; bf16 products with `bf16`.
pub fn linear(x: &Tensor, w: &Tensor, bf16: bool) -> crate::error::Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, LinearOp { bf16 })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1)
        assert_eq!(round_to_bf16(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6
        assert_eq!(round_to_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert_eq!(round_to_bf16(1.0 + 1.0 / 256.0 + 1e-6), 1.0 + 1.0 / 128.0);
        assert_eq!(round_to_bf16(-2.5), -2.5);
        assert!(round_to_bf16(f32::NAN).is_nan());
        assert_eq!(round_to_bf16(f32::INFINITY), f32::INFINITY);
        // the same rounding as the `half` crate (which candle's bf16 conversion uses)
        let xs: Vec<f32> = lcg(7, 1000).iter().map(|v| v * 1e3).collect();
        let dev = candle_core::Device::Cpu;
        let theirs: Vec<f32> = Tensor::new(xs.as_slice(), &dev)
            .and_then(|t| {
                t.to_dtype(candle_core::DType::BF16)?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()
            })
            .unwrap();
        for (x, t) in xs.iter().zip(theirs) {
            assert_eq!(round_to_bf16(*x), t, "{x}");
        }
    }

    /// Both paths (tiles when AMX is here, and the rounded f32 GEMM) against an f64 sum of the
    /// rounded operands' products, for shapes that are not multiples of the tiles and for
    /// transposed (strided) operands.
    #[test]
    fn bf16_matmul_matches_an_f64_sum_of_rounded_products() {
        let paths: Vec<bool> = if amx_available() {
            vec![true, false]
        } else {
            vec![false]
        };
        if !amx_available() {
            eprintln!("AMX is not available here: testing the rounded-f32 path only");
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 45),
            (64, 96, 40),
            (70, 576, 33),
            (33, 64, 130),
            (130, 1536, 100),
            (40, 3000, 20),
        ] {
            let a = lcg(m as u64 * 31 + k as u64, m * k);
            let b = lcg(n as u64 * 17 + 3, k * n);
            for &(at, bt) in &[(false, false), (true, false), (false, true), (true, true)] {
                // a stored as [k, m] when transposed, b as [n, k]
                let av = if at {
                    View::row_major(&a, k, m).t()
                } else {
                    View::row_major(&a, m, k)
                };
                let bv = if bt {
                    View::row_major(&b, n, k).t()
                } else {
                    View::row_major(&b, k, n)
                };
                let at_ = |i: usize, j: usize| round_to_bf16(av.data[i * av.rs + j * av.cs]) as f64;
                let bt_ = |i: usize, j: usize| round_to_bf16(bv.data[i * bv.rs + j * bv.cs]) as f64;
                for &tiles in &paths {
                    let rhs = Rhs::prepare(bv, tiles).unwrap();
                    let ldc = n + 3;
                    let init = lcg(99, m * ldc);
                    for accumulate in [false, true] {
                        let mut c = init.clone();
                        matmul(av, &rhs, &mut c, ldc, accumulate).unwrap();
                        for i in 0..m {
                            for j in 0..n {
                                let (mut want, mut scale) = (0f64, 0f64);
                                for p in 0..k {
                                    want += at_(i, p) * bt_(p, j);
                                    scale += (at_(i, p) * bt_(p, j)).abs();
                                }
                                if accumulate {
                                    want += init[i * ldc + j] as f64;
                                    scale += (init[i * ldc + j] as f64).abs();
                                }
                                let got = c[i * ldc + j] as f64;
                                assert!(
                                    (got - want).abs() <= 2e-6 * scale + 1e-30,
                                    "tiles {tiles} ({m},{k},{n}) at {at} bt {bt} acc {accumulate} [{i},{j}]: {got} vs {want}"
                                );
                            }
                            // the padding between rows is left alone
                            for j in n..ldc {
                                assert_eq!(c[i * ldc + j], init[i * ldc + j]);
                            }
                        }
                    }
                }
            }
        }
    }

    /// [`linear`] on seeded `[37, 70]` inputs and `[45, 70]` weights: the op's output, its
    /// input and weight gradients for the output gradient `g`, and the f64 values of the
    /// same products (`y = xWᵀ`, `dx = gW`, `dW = gᵀx`) with every operand first passed
    /// through bf16 rounding when `bf16`. Returns the output, the max |diff| of y, dx and dW,
    /// whether dW is contiguous, and the plain f32 product.
    fn linear_against_f64(bf16: bool, seed: u64) -> (Tensor, [f64; 3], bool, Tensor) {
        use candle_core::{DType, Device, Var};
        let dev = Device::Cpu;
        let (rows, inp, out) = (37, 70, 45);
        let x = Var::from_vec(lcg(seed, rows * inp), (rows, inp), &dev).unwrap();
        let w = Var::from_vec(lcg(seed + 1, out * inp), (out, inp), &dev).unwrap();
        let g = Tensor::from_vec(lcg(seed + 2, rows * out), (rows, out), &dev).unwrap();
        let y = linear(x.as_tensor(), w.as_tensor(), bf16).unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let prep = |t: &Tensor| {
            let t = if bf16 {
                t.to_dtype(DType::BF16).unwrap()
            } else {
                t.clone()
            };
            t.to_dtype(DType::F64).unwrap()
        };
        let (x64, w64, g64) = (prep(x.as_tensor()), prep(w.as_tensor()), prep(&g));
        let dw = grads.get(w.as_tensor()).unwrap();
        let diff = |got: &Tensor, want: Tensor| -> f64 {
            let d = (got.to_dtype(DType::F64).unwrap() - want).unwrap();
            d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let diffs = [
            diff(&y, x64.matmul(&w64.t().unwrap()).unwrap()),
            diff(grads.get(x.as_tensor()).unwrap(), g64.matmul(&w64).unwrap()),
            diff(dw, g64.t().unwrap().matmul(&x64).unwrap()),
        ];
        let y32 = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        (y, diffs, dw.is_contiguous(), y32)
    }

    /// In f32: the op's value and both gradients against candle's matmul in f64, and `dW`
    /// comes out contiguous in `W`'s layout.
    #[test]
    fn linear_f32_value_and_gradients_match_f64() {
        let (_, diffs, contiguous, _) = linear_against_f64(false, 4);
        assert!(contiguous);
        for (d, what) in diffs.iter().zip(["y", "dx", "dW"]) {
            assert!(*d < 1e-5, "{what}: max |diff| {d}");
        }
    }

    /// The op's value and both gradients against candle's f32 ops on bf16-rounded operands.
    #[test]
    fn linear_bf16_value_and_gradients_match_rounded_f32() {
        let (y, diffs, _, y32) = linear_against_f64(true, 1);
        for (d, what) in diffs.iter().zip(["y", "dx", "dW"]) {
            assert!(*d < 2e-5, "{what}: max |diff| {d}");
        }
        // and it is not simply the f32 product: rounding changes the result measurably
        let diff = (&y - &y32)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff > 1e-4, "bf16 result equals the f32 one ({diff})");
    }
}
