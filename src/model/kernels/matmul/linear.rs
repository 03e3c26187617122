use super::super::{has_avx2_fma, Elem, LANES};
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
pub fn linear_bwd(x: &Tensor, w: &Tensor, dy: &Tensor, bf16: bool) -> crate::error::Result<(Tensor, Tensor)> {
    Ok((product(dy, false, w, false, bf16)?, product(dy, true, x, false, bf16)?))
}

/// `x·Wᵀ` as one op (see the module docs); `x` `[rows, in]`, `W` `[out, in]`, both f32 on the
/// CPU; bf16 products with `bf16`.
pub fn linear(x: &Tensor, w: &Tensor, bf16: bool) -> crate::error::Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, LinearOp { bf16 })?)
}

/// Rows of `x` up to which [`few_rows`] applies.
pub const FEW_ROWS: usize = 32;

multiversioned! {
    /// `ys[r] = x_r · w_row` for each of the rows `x_r` of `xs` (`k` wide), summed exactly as
    /// [`dot_tiles`] sums each of its products (lane accumulators of fused multiply-adds, the
    /// lanes added in order, then the tail), so a row's result does not depend on how many
    /// rows came with it.
    fn dot_rows<T>(ys: &mut [T], xs: &[T], w_row: &[T], k: usize) {
        for (r, y) in ys.iter_mut().enumerate() {
            let x = &xs[r * k..(r + 1) * k];
            let mut acc = [T::zero(); LANES];
            for (c, d) in w_row.chunks_exact(LANES).zip(x.chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] = d[l].mul_add(c[l], acc[l]);
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
    fn dot_tiles<T>(yt: &mut [T], xs: &[T], w: &[T], m: usize, k: usize) {
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
                        a0[l] = d0[l].mul_add(c0[l], a0[l]);
                        a1[l] = d1[l].mul_add(c0[l], a1[l]);
                        a2[l] = d2[l].mul_add(c0[l], a2[l]);
                        a3[l] = d3[l].mul_add(c0[l], a3[l]);
                        b0[l] = d0[l].mul_add(c1[l], b0[l]);
                        b1[l] = d1[l].mul_add(c1[l], b1[l]);
                        b2[l] = d2[l].mul_add(c1[l], b2[l]);
                        b3[l] = d3[l].mul_add(c1[l], b3[l]);
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

/// `x·Wᵀ` for an `x` of at most [`FEW_ROWS`] rows (decoding a token per sequence): one pass
/// over `W` in parallel over its rows, each dotted with every row of `x`. `gemm` packs `W` on
/// every call, which costs more than the product itself at a few rows. `None` where it does
/// not apply (more rows, not f32, not contiguous); the training path never calls it.
pub fn few_rows(x: &Tensor, w: &Tensor) -> crate::error::Result<Option<Tensor>> {
    let (Ok((m, k)), Ok((n, k2))) = (x.dims2(), w.dims2()) else {
        return Ok(None);
    };
    if m > FEW_ROWS || k != k2 || x.dtype() != candle_core::DType::F32 || w.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let out = with_f32(&x, |xs| {
        with_f32(w, |ws| {
            const PER_TASK: usize = 64;
            let mut yt = vec![0f32; n * m];
            yt.par_chunks_mut(m * PER_TASK).enumerate().for_each(|(c, out)| {
                if m >= 4 {
                    let rows = out.len() / m;
                    let o = c * PER_TASK;
                    dot_tiles(out, xs, &ws[o * k..(o + rows) * k], m, k);
                    return;
                }
                for (j, ys) in out.chunks_mut(m).enumerate() {
                    let o = c * PER_TASK + j;
                    dot_rows(ys, xs, &ws[o * k..(o + 1) * k], k);
                }
            });
            let mut y = vec![0f32; m * n];
            for (o, col) in yt.chunks(m).enumerate() {
                for (r, &v) in col.iter().enumerate() {
                    y[r * n + o] = v;
                }
            }
            Tensor::from_vec(y, (m, n), &candle_core::Device::Cpu)
        })
    })?;
    Ok(Some(out))
}
