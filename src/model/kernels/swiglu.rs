use super::*;

// ---------------------------------------------------------------- SwiGLU

/// `silu(g) · u`.
struct SwiGlu;

/// `[2, n]`: dg then du, from g, u and dy.
struct SwiGluBwd;

const ELEMS_PER_TASK: usize = 1 << 15;

fn swiglu_fwd<T: Elem>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
    let op = "fused-swiglu";
    if l1.dims() != l2.dims() {
        candle_core::bail!("{op}: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
    }
    let (g, u) = (slice::<T>(s1, l1, op)?, slice::<T>(s2, l2, op)?);
    let c = ELEMS_PER_TASK;
    let mut y = vec![T::zero(); g.len()];
    y.par_chunks_mut(c)
        .zip(g.par_chunks(c).zip(u.par_chunks(c)))
        .for_each(|(y, (g, u))| swiglu_chunk(y, g, u));
    out(y, l1.shape().clone())
}

/// d silu(g)/dg = σ(g)·(1 + g·(1 − σ(g)))
#[allow(clippy::too_many_arguments)]
fn swiglu_bwd<T: Elem>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> CResult<(CpuStorage, Shape)> {
    let op = "fused-swiglu-bwd";
    let (g, u, dy) = (
        slice::<T>(s1, l1, op)?,
        slice::<T>(s2, l2, op)?,
        slice::<T>(s3, l3, op)?,
    );
    let n = g.len();
    let c = ELEMS_PER_TASK;
    let mut res = vec![T::zero(); 2 * n];
    let (dg, du) = res.split_at_mut(n);
    dg.par_chunks_mut(c)
        .zip(du.par_chunks_mut(c))
        .zip(g.par_chunks(c).zip(u.par_chunks(c)).zip(dy.par_chunks(c)))
        .for_each(|((dg, du), ((g, u), dy))| swiglu_bwd_chunk(dg, du, g, u, dy));
    out(res, Shape::from((2, n)))
}

custom_op!(
    2,
    SwiGlu,
    "fused-swiglu",
    |_op, s1, l1, s2, l2| by_dtype!(s1, "fused-swiglu", swiglu_fwd(s1, l1, s2, l2)),
    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op3_no_bwd(u, &dy.contiguous()?, &SwiGluBwd)?;
        let dg = both.get(0)?.reshape(g.shape())?;
        let du = both.get(1)?.reshape(u.shape())?;
        Ok((Some(dg), Some(du)))
    }
);

custom_op!(
    3,
    SwiGluBwd,
    "fused-swiglu-bwd",
    |_op, s1, l1, s2, l2, s3, l3| by_dtype!(s1, "fused-swiglu-bwd", swiglu_bwd(s1, l1, s2, l2, s3, l3))
);

/// The gradients of [`swiglu`](fn@swiglu)'s `g` and `u` for the output gradient `dy`, outside any graph.
pub fn swiglu_grads(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    two(SwiGlu.bwd(g, u, dy, dy)?, "fused-swiglu")
}

/// `silu(g) · u`, fused.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok(g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)?)
}
