use super::*;

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
        // a copy: a view would keep the whole [rows + 1, H] buffer alive for as long as the
        // optimizer holds this gradient (2 norms × 30 layers × rows × H on SmolLM2)
        let dw = both.narrow(0, rows, 1)?.reshape(h)?.force_contiguous()?;
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
pub fn rms_norm_grads(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    two(RmsNorm { eps }.bwd(x, w, dy, dy)?, "fused-rms-norm")
}

/// `x / sqrt(mean(x²) + eps) * w` over the last dimension, fused.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })?)
}
