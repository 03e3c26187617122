//! The AMX tile kernel (`tdpbf16ps` through inline asm), tile configuration and packing.

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
pub unsafe fn kernel_32x32(a0: *const u16, a1: *const u16, b0: *const u16, b1: *const u16, nkb: usize, out: *mut f32) {
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

/// Transposes 16 × 16 32-bit words held in 16 registers (register i, lane j → register j,
/// lane i): pairs of words and of double words within 128-bit lanes, then the 128-bit lanes
/// across each four registers.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [__m512i; 16]) {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // s[4g + q]: lane l holds word 4l + q of rows 4g..4g + 4
    let mut s = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        s[4 * g] = _mm512_unpacklo_epi64(a, c);
        s[4 * g + 1] = _mm512_unpackhi_epi64(a, c);
        s[4 * g + 2] = _mm512_unpacklo_epi64(b, d);
        s[4 * g + 3] = _mm512_unpackhi_epi64(b, d);
    }
    for q in 0..4 {
        let (a, b, c, d) = (s[q], s[4 + q], s[8 + q], s[12 + q]);
        let u0 = _mm512_shuffle_i32x4::<0x44>(a, b);
        let u1 = _mm512_shuffle_i32x4::<0xEE>(a, b);
        let u2 = _mm512_shuffle_i32x4::<0x44>(c, d);
        let u3 = _mm512_shuffle_i32x4::<0xEE>(c, d);
        r[q] = _mm512_shuffle_i32x4::<0x88>(u0, u2);
        r[4 + q] = _mm512_shuffle_i32x4::<0xDD>(u0, u2);
        r[8 + q] = _mm512_shuffle_i32x4::<0x88>(u1, u3);
        r[12 + q] = _mm512_shuffle_i32x4::<0xDD>(u1, u3);
    }
}

/// Packs columns `j0..j0 + 16` of `b` into `nkb` tiles of 16 × 16 pair words (the bf16 of
/// rows 2p and 2p + 1 of a column in one word, the even row in the low half). Every one of the
/// `nkb · 256` words is written (padding with zeros), so `words` need not be initialised.
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `words` must be valid for `nkb · 256` writes.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn pack_rhs_columns(b: View, j0: usize, nkb: usize, words: *mut u32) {
    let (k, n) = (b.rows, b.cols);
    let jn = 16.min(n.saturating_sub(j0));
    // whole tiles along k of a weight's transpose (columns contiguous), or of a row-major
    // operand, are written whole below; anything else is zeroed first for its padding
    if jn < 16 || !k.is_multiple_of(32) && b.rs != 1 || b.rs != 1 && b.cs != 1 {
        std::ptr::write_bytes(words, 0, nkb * 256);
    }
    if jn == 0 {
        return; // padding columns are zero
    }
    let hi_mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
    for kb in 0..nkb {
        let tile = words.add(kb * 256);
        let kn = 32.min(k - (kb * 32).min(k));
        if b.rs == 1 {
            // columns contiguous along k (a transposed row-major weight): adjacent floats
            // make a pair, so the column's bf16 values in order are its pair words
            // column c's 16 pair words in register c, then transposed in registers
            let mut cols = [_mm512_setzero_si512(); 16];
            for (c, col) in cols.iter_mut().enumerate().take(jn) {
                let src = b.data[(j0 + c) * b.cs + kb * 32..][..kn].as_ptr();
                let lo = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded16(src, kn.min(16)), 16));
                // (with kn ≤ 16 nothing is loaded from past the column's end)
                let hi = _mm512_cvtepi32_epi16(_mm512_srli_epi32(
                    rounded16(src.wrapping_add(16), kn.saturating_sub(16)),
                    16,
                ));
                *col = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            }
            transpose16(&mut cols);
            for (p, row) in cols.iter().enumerate() {
                _mm512_storeu_si512(tile.add(p * 16) as *mut __m512i, *row);
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
                _mm512_storeu_si512(tile.add(p * 16) as *mut __m512i, w);
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
                    tile.add(p * 16 + c)
                        .write_unaligned(((hi as u32) << 16) | super::to_bf16_bits(at(kb * 32 + 2 * p)) as u32);
                }
            }
        }
    }
}

/// Packs rows `i0..i0 + 16` of `a` into `nkb` tiles of 16 rows × 32 bf16. Every one of the
/// `nkb · 512` values is written (padding with zeros), so `chunk` need not be initialised.
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `chunk` must be valid for `nkb · 512` writes.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn pack_lhs_rows(a: View, i0: usize, nkb: usize, chunk: *mut u16) {
    let (m, k) = (a.rows, a.cols);
    let rows = 16.min(m.saturating_sub(i0));
    // 16 rows of a row-major operand, or of a transposed one, are written whole below
    // (the values past k as zeros); anything else is zeroed first for its padding
    if rows < 16 || a.cs != 1 && a.rs != 1 {
        std::ptr::write_bytes(chunk, 0, nkb * 512);
    }
    if rows == 0 {
        return; // padding rows are zero
    }
    for kb in 0..nkb {
        let tile = chunk.add(kb * 512);
        let kn = 32.min(k - (kb * 32).min(k));
        if a.cs == 1 {
            for r in 0..rows {
                let src = a.data[(i0 + r) * a.rs + kb * 32..][..kn].as_ptr();
                for half in 0..2 {
                    let n = kn.saturating_sub(half * 16).min(16);
                    let w = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded16(src.add(half * 16), n), 16));
                    _mm256_storeu_si256(tile.add(r * 32 + half * 16) as *mut __m256i, w);
                }
            }
        } else if a.rs == 1 {
            // a transposed row-major matrix: the tile's 16 rows are contiguous for each k
            // register q holds the 16 rows' pair words of k = 2q, 2q + 1 (even k in the low
            // half, as a row-major tile stores them); transposed, register r is row r's tile row
            let hi_mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
            let mut pairs = [_mm512_setzero_si512(); 16];
            for (q, pair) in pairs.iter_mut().enumerate().take(kn.div_ceil(2)) {
                let at = |c: usize| a.data[(kb * 32 + c) * a.cs + i0..][..rows].as_ptr();
                let lo = _mm512_srli_epi32(rounded16(at(2 * q), rows), 16);
                let hi = match 2 * q + 1 < kn {
                    true => _mm512_and_si512(rounded16(at(2 * q + 1), rows), hi_mask),
                    false => _mm512_setzero_si512(),
                };
                *pair = _mm512_or_si512(lo, hi);
            }
            transpose16(&mut pairs);
            for (r, row) in pairs.iter().enumerate().take(rows) {
                _mm512_storeu_si512(tile.add(r * 32) as *mut __m512i, *row);
            }
        } else {
            for r in 0..rows {
                for c in 0..kn {
                    *tile.add(r * 32 + c) = super::to_bf16_bits(a.data[(i0 + r) * a.rs + (kb * 32 + c) * a.cs]);
                }
            }
        }
    }
}

/// `out[16×32] = A·B` for one 16-row tile of A (`a0`, `nkb` consecutive tiles) and the two
/// column halves `b0`/`b1`: the upper half of [`kernel_32x32`], for decoding a few rows. Each
/// element is summed exactly as there, so a row's result does not depend on the rows beside it.
///
/// # Safety
/// As for [`kernel_32x32`]; `out` valid for 16×32 f32.
#[inline(always)]
pub unsafe fn kernel_16x32(a0: *const u16, b0: *const u16, b1: *const u16, nkb: usize, out: *mut f32) {
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "2:",
        "tileloadd tmm4, [{a0} + {s}*1]",
        "tileloadd tmm6, [{b0} + {s}*1]",
        "tileloadd tmm7, [{b1} + {s}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "add {a0}, 1024",
        "add {b0}, 1024",
        "add {b1}, 1024",
        "dec {n}",
        "jnz 2b",
        "tilestored [{c} + {cs}*1], tmm0",
        "add {c}, 64",
        "tilestored [{c} + {cs}*1], tmm1",
        a0 = inout(reg) a0 => _,
        b0 = inout(reg) b0 => _,
        b1 = inout(reg) b1 => _,
        n = inout(reg) nkb => _,
        c = inout(reg) out => _,
        s = in(reg) 64usize,
        cs = in(reg) 128usize,
        options(nostack),
    );
}
