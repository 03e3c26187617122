//! The AVX512-BF16 block kernel: the 32×32 blocks of [`super::amx::kernel_32x32`] computed
//! with `vdpbf16ps` (16 lanes, each adding the products of two bf16 pairs to an f32 sum) on the
//! same packed tiles, for CPUs with AVX512-BF16 but no AMX (AMD Zen 4/5, Intel Cooper Lake).
//!
//! A tile of the left operand holds 16 rows × 32 bf16, so a row's pair `p` (its values at `k`
//! = 2p and 2p + 1) is one 32-bit word; a tile of the right operand holds 16 pair rows of 16
//! columns, one 64-byte vector per pair. Each step broadcasts a row's pair word and multiplies
//! it into both column halves; eight rows at a time keep 16 accumulators in registers.

use std::arch::x86_64::*;

/// `out[32×32] = A·B` over `nkb` blocks of 32 along k, the operands as for AMX: `a0`/`a1`
/// are the packed 16-row tiles of the block's two row halves, `b0`/`b1` those of its two column
/// halves (each `nkb` consecutive 1 KiB tiles); `out` is row-major with `ldo` f32 per row
/// (a block buffer's 32, or the product's own rows: no copy out of a block buffer), and with
/// `accumulate` each sum is added to the value there (one f32 addition, as adding the block
/// afterwards would).
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; the pointers valid for `nkb` tiles (and 32 rows of
/// 32 f32 at stride `ldo` for `out`, initialised where `accumulate`).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn kernel_32x32(
    a0: *const u16,
    a1: *const u16,
    b0: *const u16,
    b1: *const u16,
    nkb: usize,
    out: *mut f32,
    ldo: usize,
    accumulate: bool,
) {
    for eighth in 0..4 {
        let a = if eighth < 2 { a0 } else { a1 };
        let o = out.add(eighth * 8 * ldo);
        kernel_rows_x32::<8>(a, (eighth % 2) * 8, b0, b1, nkb, o, ldo, accumulate, std::ptr::null());
    }
}

/// `out[R×32]`: rows `r0..r0 + R` (`r0` 0 or 8; `R` 1, 2, 4 or 8) of the 16-row tiles at `a`
/// times the two column halves, each row summed exactly as [`kernel_32x32`] sums it (which is
/// four of these with `R` = 8), so a row's result does not depend on the rows packed beside it:
/// decoding a few rows uses it alone, and a step with fewer rows than eight multiplies no
/// padding rows (one sequence: an eighth of the work). With `ahead` non-null, the `2·nkb` KiB
/// from `ahead` (the next column block's two tiles) are fetched into L2 meanwhile, two lines per
/// step: decoding one sequence is bound by reading the weights, and the hardware prefetcher
/// alone leaves the loop waiting.
///
/// `out` and `accumulate` as for [`kernel_32x32`].
///
/// # Safety
/// As for [`kernel_32x32`]; `out` valid for `R` rows of 32 f32 at stride `ldo`, `ahead` null
/// or valid for `2·nkb` KiB.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn kernel_rows_x32<const R: usize>(
    a: *const u16,
    r0: usize,
    b0: *const u16,
    b1: *const u16,
    nkb: usize,
    out: *mut f32,
    ldo: usize,
    accumulate: bool,
    ahead: *const u16,
) {
    let (a, b0, b1) = (a as *const u32, b0 as *const u32, b1 as *const u32);
    let ahead = ahead as *const i8;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for kb in 0..nkb {
        let (at, bt0, bt1) = (a.add(kb * 256 + r0 * 16), b0.add(kb * 256), b1.add(kb * 256));
        for p in 0..16 {
            if !ahead.is_null() {
                let line = (kb * 16 + p) * 128;
                _mm_prefetch::<_MM_HINT_T1>(ahead.add(line));
                _mm_prefetch::<_MM_HINT_T1>(ahead.add(line + 64));
            }
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bt0.add(p * 16) as *const __m512i));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bt1.add(p * 16) as *const __m512i));
            for (r, row) in acc.iter_mut().enumerate() {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*at.add(r * 16 + p) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], x, w0);
                row[1] = _mm512_dpbf16_ps(row[1], x, w1);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let o = out.add(r * ldo);
        let (mut lo, mut hi) = (row[0], row[1]);
        if accumulate {
            lo = _mm512_add_ps(_mm512_loadu_ps(o), lo);
            hi = _mm512_add_ps(_mm512_loadu_ps(o.add(16)), hi);
        }
        _mm512_storeu_ps(o, lo);
        _mm512_storeu_ps(o.add(16), hi);
    }
}
