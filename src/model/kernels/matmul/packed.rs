//! Weights packed once into bf16 tiles, for sampling from bf16 weights on CPUs with a fast bf16
//! product (`bf16_sampling`, `--bf16-weights`): AMX, or AVX512-BF16 on AMD
//! ([`CpuPath::fast_bf16`]).
//!
//! Decoding multiplies a few rows (one token per sequence) by every weight matrix at every
//! step, while the weights stay fixed for the whole generation. So each matrix `W` `[n, k]` is
//! rounded to bf16 and packed into the tile layout of [`super::Rhs::Tiles`] once
//! ([`PackedWeight::new_on`]), and each step only packs its few rows of activations (rounded to
//! bf16 too) and runs `tdpbf16ps` (AMX) or `vdpbf16ps` (AVX512-BF16, eight rows at a time, or
//! one, two or four for the last few, fetching the next column block meanwhile) over the
//! weight's tiles, in parallel over the weight's columns ([`packed_products`]). The sums are f32,
//! as in training's `bf16 = true` products.
//!
//! Each element of the result is the same sequence of tile products whatever rows come with it
//! (16-row and 32-row blocks sum alike, padding rows are zero), so batched sampling draws what
//! sampling prompt by prompt draws.

use super::linear::SharedOut;
use super::{amx, dpbf16, round_up, CpuPath, View};
use candle_core::Tensor;
use rayon::prelude::*;
use std::ptr::copy_nonoverlapping;

/// A weight `[n, k]` rounded to bf16 and packed for `x·Wᵀ` in AMX's tile layout: per 16 of its
/// rows (the product's columns), per 32 of k, 16 pairs along k × 16 rows; n and k zero-padded to
/// multiples of 32.
pub struct PackedWeight {
    tiles: Vec<u16>,
    n: usize,
    k: usize,
    nkb: usize,
    /// Multiplied on AMX tiles, else with `vdpbf16ps`.
    amx: bool,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight[{}, {}]", self.n, self.k)
    }
}

impl PackedWeight {
    /// Which kernel `path` (at most the CPU's) multiplies packed weights with: `Some(true)` AMX
    /// tiles, `Some(false)` `vdpbf16ps`, `None` neither (nothing is packed).
    pub fn kernel_of(path: CpuPath) -> Option<bool> {
        let path = path.min(CpuPath::detected());
        (path >= CpuPath::Avx512Bf16).then_some(path >= CpuPath::Amx)
    }

    /// Whether this weight is multiplied on AMX tiles (else with `vdpbf16ps`).
    pub fn on_amx(&self) -> bool {
        self.amx
    }

    /// `w` (a 2-D f32 or bf16 CPU tensor) packed for the kernel of `path` ([`Self::kernel_of`]);
    /// `None` below AVX512-BF16. Decoding asks with [`CpuPath::fast_bf16`]'s path
    /// (`Transformer::with_bf16_matrices`).
    pub fn new_on(path: CpuPath, w: &Tensor) -> crate::error::Result<Option<PackedWeight>> {
        let Some(amx) = Self::kernel_of(path) else {
            return Ok(None);
        };
        let (n, k) = w.dims2()?;
        let w = w.to_dtype(candle_core::DType::F32)?;
        let nkb = k.div_ceil(32).max(1);
        let np = round_up(n.max(1), 32);
        let tiles = super::with_f32(&w, |v| {
            // Wᵀ `[k, n]`: each of its columns (a row of W) contiguous along k
            let wt = View::row_major(v, n, k).t();
            // SAFETY: the packer writes all nkb · 512 values of each of the np / 16 chunks;
            // AVX512-BF16 and AMX imply AVX-512 F and BW (CpuPath::detect).
            Ok(unsafe {
                super::unfilled_u16(np * nkb * 32, |d| {
                    (0..np / 16)
                        .into_par_iter()
                        .for_each(|jb| amx::pack_rhs_columns(wt, jb * 16, nkb, d.at(jb * nkb * 512) as *mut u32))
                })
            })
        })?;
        Ok(Some(PackedWeight { tiles, n, k, nkb, amx }))
    }
}

/// `x·Wᵀ` for each packed weight `W` of `ws` (all with `k` columns, like `x` `[m, k]`, f32),
/// in one parallel pass over the weights' columns (a layer's q, k and v; its gate and up). The
/// rows of `x` are rounded to bf16 and packed once for all of them.
pub fn packed_products(x: &Tensor, ws: &[&PackedWeight]) -> crate::error::Result<Vec<Tensor>> {
    let (m, k) = x.dims2()?;
    if let Some(w) = ws.iter().find(|w| w.k != k) {
        return Err(crate::error::Error::msg(format!(
            "packed product: x has {k} columns, the weight [{}, {}]",
            w.n, w.k
        )));
    }
    let Some(nkb) = ws.first().map(|w| w.nkb) else {
        return Ok(Vec::new());
    };
    // the rows in 16-row tiles: one tile for up to 16 rows, else whole 32-row blocks
    let mp = if m <= 16 { 16 } else { round_up(m, 32) };
    let tile = nkb * 512; // u16 per 16-row (or 16-column) block
    let x = x.to_dtype(candle_core::DType::F32)?;
    let at = super::with_f32(&x, |xs| {
        let view = View::row_major(xs, m, k);
        // SAFETY: the packer writes all `tile` values of each of the mp / 16 chunks; packed
        // weights exist only on the AVX512-BF16 and AMX paths (AVX-512 F, BW).
        Ok(unsafe {
            super::unfilled_u16(mp / 16 * tile, |d| {
                (0..mp / 16).for_each(|ib| amx::pack_lhs_rows(view, ib * 16, nkb, d.at(ib * tile)))
            })
        })
    })?;
    // about four tasks per thread over all the weights' 32-column blocks
    let blocks: Vec<usize> = ws.iter().map(|w| w.n.div_ceil(32)).collect();
    let per_task = blocks
        .iter()
        .sum::<usize>()
        .div_ceil(4 * rayon::current_num_threads().max(1))
        .max(1);
    let jobs: Vec<(usize, usize, usize)> = blocks
        .iter()
        .enumerate()
        .flat_map(|(i, &nb)| (0..nb).step_by(per_task).map(move |b0| (i, b0, per_task.min(nb - b0))))
        .collect();
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.n]).collect();
    let outs: Vec<SharedOut> = ys.iter_mut().map(|y| SharedOut(y.as_mut_ptr())).collect();
    jobs.into_par_iter().for_each(|(i, first, count)| {
        let (w, n) = (ws[i], ws[i].n);
        let mut out = [0f32; 32 * 32];
        // SAFETY: an AMX weight exists only where AMX is enabled.
        let _tiles = w.amx.then(|| unsafe { amx::Tiles::configure() });
        for nb in first..first + count {
            let b0 = w.tiles[2 * nb * tile..].as_ptr();
            let b1 = w.tiles[(2 * nb + 1) * tile..].as_ptr();
            let jn = 32.min(n - nb * 32);
            if !w.amx {
                // the next column block's tiles, fetched while this block's first rows are
                // multiplied
                let ahead = match nb + 1 < first + count {
                    true => w.tiles[2 * (nb + 1) * tile..].as_ptr(),
                    false => std::ptr::null(),
                };
                // eight rows at a time, the last few in a kernel of 1, 2 or 4 rows
                for e in 0..m.div_ceil(8) {
                    let (a, r0, o) = (at[e / 2 * tile..].as_ptr(), e % 2 * 8, out.as_mut_ptr());
                    let ahead = if e == 0 { ahead } else { std::ptr::null() };
                    // SAFETY: AVX512-BF16 (the weight was packed for it); `at` holds mp ≥ 8e + 8
                    // rows in 16-row tiles, `w.tiles` 32-padded columns, nkb tiles each, and
                    // the block after `nb` when `ahead` is not null.
                    unsafe {
                        match m - e * 8 {
                            1 => dpbf16::kernel_rows_x32::<1>(a, r0, b0, b1, nkb, o, 32, false, ahead),
                            2 => dpbf16::kernel_rows_x32::<2>(a, r0, b0, b1, nkb, o, 32, false, ahead),
                            3 | 4 => dpbf16::kernel_rows_x32::<4>(a, r0, b0, b1, nkb, o, 32, false, ahead),
                            _ => dpbf16::kernel_rows_x32::<8>(a, r0, b0, b1, nkb, o, 32, false, ahead),
                        }
                    };
                    for r in 0..8.min(m - e * 8) {
                        // SAFETY: each task writes only its own columns of weight i's [m, n]
                        // buffer, which outlives the parallel loop.
                        unsafe {
                            copy_nonoverlapping(out[r * 32..].as_ptr(), outs[i].at((e * 8 + r) * n + nb * 32), jn)
                        };
                    }
                }
                continue;
            }
            for mb in 0..mp.div_ceil(32) {
                // SAFETY: the tiles are configured; `at` holds mp rows and `w.tiles` 32-padded
                // columns, nkb tiles each; `out` holds 32×32.
                unsafe {
                    match mp {
                        16 => amx::kernel_16x32(at.as_ptr(), b0, b1, nkb, out.as_mut_ptr()),
                        _ => amx::kernel_32x32(
                            at[2 * mb * tile..].as_ptr(),
                            at[(2 * mb + 1) * tile..].as_ptr(),
                            b0,
                            b1,
                            nkb,
                            out.as_mut_ptr(),
                        ),
                    }
                }
                for r in 0..32.min(m - mb * 32) {
                    // SAFETY: each task writes only its own columns of weight i's [m, n] buffer,
                    // which outlives the parallel loop.
                    unsafe { copy_nonoverlapping(out[r * 32..].as_ptr(), outs[i].at((mb * 32 + r) * n + nb * 32), jn) };
                }
            }
        }
    });
    Ok(ys
        .into_iter()
        .zip(ws)
        .map(|(y, w)| Tensor::from_vec(y, (m, w.n), &candle_core::Device::Cpu))
        .collect::<candle_core::Result<_>>()?)
}
