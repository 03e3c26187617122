use super::super::{Elem, LANES};
use super::CpuPath;
use super::*;

/// `x·Wᵀ` for `x` `[rows, in]` and `W` `[out, in]` (f32, contiguous, CPU); its backward
/// computes `dx = dy·W` and `dW = dyᵀ·x` (contiguous, in `W`'s layout). With `bf16` every
/// product multiplies bf16-rounded operands.
struct LinearOp {
    bf16: bool,
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
    let out = with_f32(a, |av| {
        with_f32(b, |bv| matmul_f32_new(view(av, ar, ac, ta), view(bv, br, bc, tb)))
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
        let y = match self.bf16 {
            true => matmul_new(x, &Rhs::new(wt)?)?,
            false => matmul_f32_new(x, wt)?,
        };
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // only the gradients of tracked operands (a frozen weight gets none)
        let dx = match x.track_op() {
            true => Some(product(dy, false, w, false, self.bf16)?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(product(dy, true, x, false, self.bf16)?),
            false => None,
        };
        Ok((dx, dw))
    }
}

/// The gradients `(dx, dW)` of [`linear`] for the output gradient `dy`, outside any graph.
pub fn linear_bwd(x: &Tensor, w: &Tensor, dy: &Tensor, bf16: bool) -> crate::error::Result<(Tensor, Tensor)> {
    Ok((product(dy, false, w, false, bf16)?, product(dy, true, x, false, bf16)?))
}

/// The input's gradient alone of `x·Wᵀ` for the output gradient `dy` (a frozen `W`): `dy·W`.
pub fn linear_bwd_input(w: &Tensor, dy: &Tensor, bf16: bool) -> crate::error::Result<Tensor> {
    Ok(product(dy, false, w, false, bf16)?)
}

/// `x·Wᵀ` as one op (see the module docs); `x` `[rows, in]`, `W` `[out, in]`, both f32 on the
/// CPU; bf16 products with `bf16`.
pub fn linear(x: &Tensor, w: &Tensor, bf16: bool) -> crate::error::Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, LinearOp { bf16 })?)
}

/// `x·y + a`, fused where the CPU has FMA (`fused`); without it a fused multiply-add is a
/// library call, an order of magnitude slower than the two operations.
#[inline(always)]
fn madd<T: Elem>(fused: bool, x: T, y: T, a: T) -> T {
    if fused {
        x.mul_add(y, a)
    } else {
        x * y + a
    }
}

/// Rows of `x` up to which [`few_rows`] applies.
pub const FEW_ROWS: usize = 32;

multiversioned! {
    /// `ys[r] = x_r · w_row` for each of the rows `x_r` of `xs` (`k` wide), summed exactly as
    /// [`dot_tiles`] sums each of its products (lane accumulators of fused multiply-adds, the
    /// lanes added in order, then the tail), so a row's result does not depend on how many
    /// rows came with it.
    fn dot_rows<T>(avx2: bool, fused: bool, ys: &mut [T], xs: &[T], w_row: &[T], k: usize) {
        for (r, y) in ys.iter_mut().enumerate() {
            let x = &xs[r * k..(r + 1) * k];
            let mut acc = [T::zero(); LANES];
            for (c, d) in w_row.chunks_exact(LANES).zip(x.chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] = madd(fused, d[l], c[l], acc[l]);
                }
            }
            let mut s = acc.iter().fold(T::zero(), |p, &q| p + q);
            for cc in k / LANES * LANES..k {
                s += x[cc] * w_row[cc];
            }
            *y = s;
        }
    }
}

multiversioned! {
    /// `yt[j·m + r] = x_r · w_j` for every row `w_j` of `w` and `x_r` of `xs` (`k` wide, `m ≥ 4`
    /// rows): tiles of 2 rows of `w` by 4 rows of `x`, eight independent accumulators of
    /// fused multiply-adds, so each load of a `w` chunk feeds four products and no addition
    /// waits on the one before (a lone dot product is bound by its adds' latency).
    fn dot_tiles<T>(avx2: bool, fused: bool, yt: &mut [T], xs: &[T], w: &[T], m: usize, k: usize) {
        let wn = w.len() / k;
        let full = k / LANES * LANES;
        let mut j = 0;
        while j < wn {
            let jn = (wn - j).min(2);
            let mut r = 0;
            while r < m {
                let rn = (m - r).min(4);
                // a short tile repeats its last row; the repeats are computed and dropped
                let wr = [j * k, (j + jn - 1) * k];
                let xr = [r * k, (r + 1).min(r + rn - 1) * k, (r + 2).min(r + rn - 1) * k, (r + rn - 1) * k];
                let (w0, w1) = (&w[wr[0]..wr[0] + k], &w[wr[1]..wr[1] + k]);
                let x = [
                    &xs[xr[0]..xr[0] + k],
                    &xs[xr[1]..xr[1] + k],
                    &xs[xr[2]..xr[2] + k],
                    &xs[xr[3]..xr[3] + k],
                ];
                // eight accumulators as locals (an array of them spills to the stack)
                let z = [T::zero(); LANES];
                let (mut a0, mut a1, mut a2, mut a3, mut b0, mut b1, mut b2, mut b3) = (z, z, z, z, z, z, z, z);
                let chunks = w0
                    .chunks_exact(LANES)
                    .zip(w1.chunks_exact(LANES))
                    .zip(x[0].chunks_exact(LANES))
                    .zip(x[1].chunks_exact(LANES))
                    .zip(x[2].chunks_exact(LANES))
                    .zip(x[3].chunks_exact(LANES));
                for (((((c0, c1), d0), d1), d2), d3) in chunks {
                    for l in 0..LANES {
                        a0[l] = madd(fused, d0[l], c0[l], a0[l]);
                        a1[l] = madd(fused, d1[l], c0[l], a1[l]);
                        a2[l] = madd(fused, d2[l], c0[l], a2[l]);
                        a3[l] = madd(fused, d3[l], c0[l], a3[l]);
                        b0[l] = madd(fused, d0[l], c1[l], b0[l]);
                        b1[l] = madd(fused, d1[l], c1[l], b1[l]);
                        b2[l] = madd(fused, d2[l], c1[l], b2[l]);
                        b3[l] = madd(fused, d3[l], c1[l], b3[l]);
                    }
                }
                let acc = [[a0, a1, a2, a3], [b0, b1, b2, b3]];
                for a in 0..jn {
                    for b in 0..rn {
                        let mut s = acc[a][b].iter().fold(T::zero(), |p, &q| p + q);
                        for cc in full..k {
                            s += xs[xr[b] + cc] * w[wr[a] + cc];
                        }
                        yt[(j + a) * m + r + b] = s;
                    }
                }
                r += 4;
            }
            j += 2;
        }
    }
}

/// The AVX-512 twins of [`dot_rows`] and [`dot_tiles`]: sixteen lanes, and tiles of 6 rows of
/// `w` by 4 rows of `x` (24 accumulators), each product summed the same way by both.
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    /// A weight element the row kernel reads: f32 as it is, or bf16 (its bits as `u16`) widened
    /// in registers as it is loaded (a bf16 is the top half of an f32, so the sums are those of
    /// the widened weights, bit for bit, from half the bytes).
    pub trait Weight: Copy {
        /// Sixteen weights from `p`, as f32 lanes.
        ///
        /// # Safety
        /// Sixteen elements must be readable at `p`, and the CPU must have AVX-512 F.
        unsafe fn load16(p: *const Self) -> __m512;
        fn widen(self) -> f32;
    }

    impl Weight for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        fn widen(self) -> f32 {
            self
        }
    }

    impl Weight for u16 {
        #[inline(always)]
        unsafe fn load16(p: *const u16) -> __m512 {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
        #[inline(always)]
        fn widen(self) -> f32 {
            f32::from_bits((self as u32) << 16)
        }
    }

    /// The sixteen lanes of `acc` added (a fixed tree of halves), then the tail of the dot
    /// product past the last full chunk.
    #[inline(always)]
    unsafe fn finish<W: Weight>(acc: __m512, x: &[f32], w: &[W], full: usize) -> f32 {
        tail(sum_lanes(acc), x, w, full)
    }

    /// `s` plus the products of `x` and `w` past `full`, in order.
    #[inline(always)]
    fn tail<W: Weight>(mut s: f32, x: &[f32], w: &[W], full: usize) -> f32 {
        for c in full..x.len() {
            s += x[c] * w[c].widen();
        }
        s
    }

    /// The sum of `v`'s sixteen lanes by halves: lane i plus lane i + 8, then i and i + 4, i and
    /// i + 2, and the last two ([`sum16`] makes the same pairs for sixteen vectors at once).
    #[inline(always)]
    unsafe fn sum_lanes(v: __m512) -> f32 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let s8 = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
    }

    /// [`sum_lanes`] of sixteen vectors, with the same pairs, in a quarter of the instructions:
    /// lane `4q + i` of the result is the sum of `v[4i + q]`.
    #[inline(always)]
    unsafe fn sum16(v: &[__m512; 16]) -> __m512 {
        // each vector's halves: two vectors' eight sums per register
        let w: [__m512; 8] = std::array::from_fn(|p| {
            let (a, b) = (v[2 * p], v[2 * p + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b))
        });
        // their quarters: four vectors' four sums per register, one per 128-bit lane
        let u: [__m512; 4] = std::array::from_fn(|p| {
            let (a, b) = (w[2 * p], w[2 * p + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
        });
        // within each 128-bit lane: elements i and i + 2, then the two left
        let t0 = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(u[0], u[1]),
            _mm512_shuffle_ps::<0xEE>(u[0], u[1]),
        );
        let t1 = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(u[2], u[3]),
            _mm512_shuffle_ps::<0xEE>(u[2], u[3]),
        );
        _mm512_add_ps(_mm512_shuffle_ps::<0x88>(t0, t1), _mm512_shuffle_ps::<0xDD>(t0, t1))
    }

    /// `ys[j·m + r] = x_r · w_j` for every row of `xs` (see [`super::dot_rows`]), four rows of
    /// `w` at a time (four independent sums, so no addition waits on the one before); `w` in
    /// f32, or in bf16 widened as it is loaded ([`Weight`]: decoding one sequence is bound by
    /// the bytes of `w`). The rows 16 ahead are fetched into L2 while these are multiplied:
    /// batch-1 decoding from f32 weights went from 43–47 to 61–63 tokens/s on an AMD EPYC, its
    /// read-bandwidth bound (the hardware prefetcher alone leaves the loop waiting on memory).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_rows<W: Weight>(ys: &mut [f32], xs: &[f32], w: &[W], m: usize, k: usize) {
        let (full, wn) = (k / 16 * 16, w.len() / k);
        for r in 0..m {
            let x = &xs[r * k..(r + 1) * k];
            for j in (0..wn).step_by(4) {
                let jn = (wn - j).min(4);
                let wr: [usize; 4] = std::array::from_fn(|a| (j + a.min(jn - 1)) * k);
                let mut acc = [_mm512_setzero_ps(); 4];
                // the rows 16 ahead, fetched into L2 on the first row's pass (one line per row
                // and iteration; a bf16 `w` fetches each line twice)
                let ahead: [usize; 4] = std::array::from_fn(|a| (j + 16 + a).min(wn - 1) * k);
                let mut c = 0;
                while c < full {
                    if r == 0 {
                        for &o in &ahead {
                            _mm_prefetch::<_MM_HINT_T1>(w.as_ptr().add(o + c) as *const i8);
                        }
                    }
                    let xv = _mm512_loadu_ps(x.as_ptr().add(c));
                    for a in 0..4 {
                        acc[a] = _mm512_fmadd_ps(xv, W::load16(w.as_ptr().add(wr[a] + c)), acc[a]);
                    }
                    c += 16;
                }
                for (a, &acc) in acc.iter().enumerate().take(jn) {
                    ys[(j + a) * m + r] = finish(acc, x, &w[wr[a]..wr[a] + k], full);
                }
            }
        }
    }

    /// `yt[j·m + r] = x_r · w_j` in tiles of 6 rows of `w` by 4 rows of `x` (see
    /// [`super::dot_tiles`]): 24 accumulators, and ten loads for every 24 fused multiply-adds.
    /// While a tile column is multiplied, the next column's rows of `w` are fetched into L2 a
    /// few lines per iteration, spread over the whole column's work: without it the loop
    /// waits on memory for every new row of `w` (8 rows of `x` by the output projection on one
    /// core of an AMD EPYC: 38 → 68 GFLOP/s). Fetching into L1 instead gained less: `x`
    /// streams through L1 for every tile column.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_tiles(yt: &mut [f32], xs: &[f32], w: &[f32], m: usize, k: usize) {
        const WR: usize = 6;
        const XR: usize = 4;
        const N: usize = WR * XR;
        let wn = w.len() / k;
        let full = k / 16 * 16;
        for j in (0..wn).step_by(WR) {
            let jn = (wn - j).min(WR);
            // the next tile column's lines of `w`, and how many to fetch per iteration
            let next_lines = ((wn - j - jn).min(WR) * k).div_ceil(16);
            let next = w.as_ptr().add((j + jn) * k);
            let per_iteration = next_lines.div_ceil((m.div_ceil(XR) * (full / 16)).max(1));
            let mut line = 0;
            for r in (0..m).step_by(XR) {
                let rn = (m - r).min(XR);
                // a short tile repeats its last row; the repeats are computed and dropped
                let wr: [usize; WR] = std::array::from_fn(|a| (j + a.min(jn - 1)) * k);
                let xr: [usize; XR] = std::array::from_fn(|b| (r + b.min(rn - 1)) * k);
                let mut acc = [[_mm512_setzero_ps(); XR]; WR];
                let mut c = 0;
                while c < full {
                    for _ in 0..per_iteration {
                        if line < next_lines {
                            _mm_prefetch::<_MM_HINT_T1>(next.add(line * 16) as *const i8);
                            line += 1;
                        }
                    }
                    let xv: [__m512; XR] = std::array::from_fn(|b| _mm512_loadu_ps(xs.as_ptr().add(xr[b] + c)));
                    for a in 0..WR {
                        let wv = _mm512_loadu_ps(w.as_ptr().add(wr[a] + c));
                        for b in 0..XR {
                            acc[a][b] = _mm512_fmadd_ps(xv[b], wv, acc[a][b]);
                        }
                    }
                    c += 16;
                }
                // the tile's sums sixteen at a time (the pairs of `sum_lanes`, bit for bit);
                // the second sixteen repeat the last accumulator past the 24th
                for i0 in (0..N).step_by(16) {
                    let flat: [__m512; 16] = std::array::from_fn(|t| {
                        let i = (i0 + t).min(N - 1);
                        acc[i / XR][i % XR]
                    });
                    let mut sums = [0f32; 16];
                    _mm512_storeu_ps(sums.as_mut_ptr(), sum16(&flat));
                    for t in 0..16.min(N - i0) {
                        let (a, b) = ((i0 + t) / XR, (i0 + t) % XR);
                        if a < jn && b < rn {
                            let s = sums[(t % 4) * 4 + t / 4];
                            yt[(j + a) * m + r + b] = match full < k {
                                true => tail(s, &xs[xr[b]..xr[b] + k], &w[wr[a]..wr[a] + k], full),
                                false => s,
                            };
                        }
                    }
                }
            }
        }
    }
}

/// The bits of bf16 values (`half::bf16` is a transparent `u16`).
fn bytemuck_u16(v: &[half::bf16]) -> &[u16] {
    // SAFETY: bf16 is #[repr(transparent)] over u16: same size, alignment and validity.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u16>(), v.len()) }
}

/// The output of [`few_rows`], written by its tasks, each to its own columns.
pub(super) struct SharedOut(pub(super) *mut f32);

// SAFETY: the tasks write disjoint elements (see `few_rows_on`).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `i` must lie in the buffer, and no other task may touch element `i`.
    pub(super) unsafe fn at(&self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// `yt[j·m + r] = x_r · w_j` for this task's rows `w` of the weight, with the kernels of `path`.
fn few_rows_task(path: CpuPath, yt: &mut [f32], xs: &[f32], w: &[f32], m: usize, k: usize) {
    #[cfg(target_arch = "x86_64")]
    if path >= CpuPath::Avx512 {
        // SAFETY: AVX-512 F is present (the path is at most the detected one).
        unsafe {
            match m >= 4 {
                true => wide::dot_tiles(yt, xs, w, m, k),
                false => wide::dot_rows(yt, xs, w, m, k),
            }
        }
        return;
    }
    let avx2 = path >= CpuPath::Avx2;
    if m >= 4 {
        dot_tiles(avx2, avx2, yt, xs, w, m, k);
        return;
    }
    for (ys, w_row) in yt.chunks_mut(m).zip(w.chunks_exact(k)) {
        dot_rows(avx2, avx2, ys, xs, w_row, k);
    }
}

/// `x·Wᵀ` for an `x` of at most [`FEW_ROWS`] rows (decoding a token per sequence): one pass
/// over `W` in parallel over its rows, each dotted with every row of `x`. `gemm` packs `W` on
/// every call, which costs more than the product itself at a few rows. `None` where it does
/// not apply (more rows, not f32, not contiguous); the training path never calls it.
///
/// Each result is summed the same way whatever the number of rows (row by row below 4 rows,
/// in tiles above), so batched sampling draws what sampling prompt by prompt draws. The sums
/// depend on the CPU path (eight lanes portable and on AVX2, sixteen on AVX-512).
pub fn few_rows(x: &Tensor, w: &Tensor) -> crate::error::Result<Option<Tensor>> {
    few_rows_on(CpuPath::active(), x, w)
}

/// Rows of `x` up to which [`few_rows`] takes a bf16 `w` (decoding from bf16 copies of the
/// weights): above [`FEW_ROWS`] too, since widening `w` for `gemm` would cost more.
pub const FEW_ROWS_BF16: usize = 4096;

/// Rows of bf16 `w` widened at a time by a task (then multiplied by the f32 kernels).
const BF16_BLOCK: usize = 16;

/// [`few_rows`] with the kernels of `path` (at most the CPU's).
pub(crate) fn few_rows_on(path: CpuPath, x: &Tensor, w: &Tensor) -> crate::error::Result<Option<Tensor>> {
    Ok(few_rows_many_on(path, x, &[w])?.map(|mut v| v.remove(0)))
}

/// [`few_rows`] of one `x` against several weights at once (a layer's q, k and v; its gate and
/// up), in one parallel pass: decoding one token makes hundreds of these products, and each
/// parallel region costs its threads a wake-up. Each result is what [`few_rows`] gives alone.
/// `None` where [`few_rows`] would not apply to every weight (or their dtypes differ).
pub fn few_rows_many(x: &Tensor, ws: &[&Tensor]) -> crate::error::Result<Option<Vec<Tensor>>> {
    few_rows_many_on(CpuPath::active(), x, ws)
}

/// A weight's values, as a task reads them.
enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

pub(crate) fn few_rows_many_on(path: CpuPath, x: &Tensor, ws: &[&Tensor]) -> crate::error::Result<Option<Vec<Tensor>>> {
    use candle_core::{CpuStorage, DType, Storage};
    let Ok((m, k)) = x.dims2() else { return Ok(None) };
    let Some(dtype) = ws.first().map(|w| w.dtype()) else {
        return Ok(None);
    };
    let cap = match dtype {
        DType::F32 => FEW_ROWS,
        DType::BF16 => FEW_ROWS_BF16,
        _ => return Ok(None),
    };
    let mut dims = Vec::with_capacity(ws.len());
    for w in ws {
        match w.dims2() {
            Ok((n, k2)) if k2 == k && w.dtype() == dtype => dims.push(n),
            _ => return Ok(None),
        }
    }
    if m > cap || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let path = path.min(CpuPath::detected());
    let x = x.contiguous()?;
    let ws: Vec<Tensor> = ws.iter().map(|w| w.contiguous()).collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ws.len());
    for (st, l) in &guards {
        let Some((a, b)) = l.contiguous_offsets() else {
            return Ok(None);
        };
        slices.push(match &**st {
            Storage::Cpu(CpuStorage::F32(v)) => Weights::F32(&v[a..b]),
            Storage::Cpu(CpuStorage::BF16(v)) => Weights::Bf16(&v[a..b]),
            _ => return Ok(None),
        });
    }
    let outs = with_f32(&x, |xs| {
        // about four tasks per thread over all the weights' rows, whole tiles of rows each
        let total: usize = dims.iter().sum();
        let per_task = total
            .div_ceil(4 * rayon::current_num_threads().max(1))
            .next_multiple_of(BF16_BLOCK)
            .max(BF16_BLOCK);
        let jobs: Vec<(usize, usize, usize)> = dims
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| (0..n).step_by(per_task).map(move |j0| (i, j0, per_task.min(n - j0))))
            .collect();
        let mut ys: Vec<Vec<f32>> = dims.iter().map(|&n| vec![0f32; m * n]).collect();
        let outs: Vec<SharedOut> = ys.iter_mut().map(|y| SharedOut(y.as_mut_ptr())).collect();
        jobs.into_par_iter().for_each(|(i, j0, rows)| {
            let n = dims[i];
            // this task's columns of y, transposed: yt[j·m + r] = y[r][j0 + j]
            let mut yt = vec![0f32; rows * m];
            match &slices[i] {
                Weights::F32(w) => few_rows_task(path, &mut yt, xs, &w[j0 * k..(j0 + rows) * k], m, k),
                Weights::Bf16(w) => few_rows_task_bf16(path, &mut yt, xs, &w[j0 * k..(j0 + rows) * k], m, k),
            }
            for (j, col) in yt.chunks_exact(m).enumerate() {
                for (r, &v) in col.iter().enumerate() {
                    // SAFETY: each task writes only its own columns j0..j0 + rows of weight i's
                    // [m, n] buffer, which outlives the parallel loop.
                    unsafe { *outs[i].at(r * n + j0 + j) = v };
                }
            }
        });
        Ok(ys)
    })?;
    Ok(Some(
        outs.into_iter()
            .zip(&dims)
            .map(|(y, &n)| Tensor::from_vec(y, (m, n), &candle_core::Device::Cpu))
            .collect::<candle_core::Result<_>>()?,
    ))
}

/// [`few_rows_task`] with `w` in bf16: widened in registers row by row for a few rows of `x`
/// on AVX-512, else in blocks of [`BF16_BLOCK`] rows into an f32 buffer; either way the sums of
/// `w` widened first (a bf16 is the top half of an f32), bit for bit, from half the bytes.
fn few_rows_task_bf16(path: CpuPath, yt: &mut [f32], xs: &[f32], w: &[half::bf16], m: usize, k: usize) {
    #[cfg(target_arch = "x86_64")]
    if m < 4 && path >= CpuPath::Avx512 {
        // SAFETY: AVX-512 F is present (the path is at most the detected one).
        unsafe { wide::dot_rows(yt, xs, bytemuck_u16(w), m, k) };
        return;
    }
    let mut wide = vec![0f32; BF16_BLOCK * k];
    for (b, rows) in w.chunks(BF16_BLOCK * k).enumerate() {
        let br = rows.len() / k;
        for (d, s) in wide.iter_mut().zip(rows) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
        few_rows_task(
            path,
            &mut yt[b * BF16_BLOCK * m..(b * BF16_BLOCK + br) * m],
            xs,
            &wide[..br * k],
            m,
            k,
        );
    }
}
