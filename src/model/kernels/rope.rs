use super::*;

// ---------------------------------------------------------------- RoPE

/// `x·cos + rotate_half(x)·sin` (`transpose`: its adjoint, for the backward pass).
pub(super) struct Rope {
    pub(super) transpose: bool,
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
                rotate(&mut y[t * d..(t + 1) * d], &x[t * d..(t + 1) * d], c, s, transpose);
            }
        });
    out(y, l1.shape().clone())
}

/// `y = x·cos + rotate_half(x)·sin` of one head's row of `D` values (`inverse`: the adjoint,
/// for the backward pass).
#[inline]
pub(super) fn rotate<T: Elem>(y: &mut [T], x: &[T], c: &[T], s: &[T], inverse: bool) {
    let half = x.len() / 2;
    for j in 0..half {
        let (x1, x2) = (x[j], x[j + half]);
        if inverse {
            y[j] = x1 * c[j] + x2 * s[j + half];
            y[j + half] = x2 * c[j + half] - x1 * s[j];
        } else {
            y[j] = x1 * c[j] - x2 * s[j];
            y[j + half] = x2 * c[j + half] + x1 * s[j + half];
        }
    }
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
