//! The reference implementations on candle primitive ops (differentiable by candle's autograd):
//! what the fused kernels are tested against, and what runs where no kernel applies.

use crate::error::Result;
use candle_core::{Tensor, D};

/// `x / sqrt(mean(x^2) + eps) * w`, on primitives (differentiable in x and w).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// Softmax over the last dimension on primitives. The max is a constant shift (detached): the
/// result and its gradient do not depend on it.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// `log(sum(exp(x)))` over the last dimension, keeping it, on primitives.
pub fn logsumexp_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    Ok((x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?)
}

/// RoPE in the HF layout: `x * cos + rotate_half(x) * sin`, `rotate_half([a, b]) = [-b, a]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

/// `x` with its values rounded to bf16 (`values`) and/or its gradient rounded to bf16 in the
/// backward pass (`gradient`), f32 only: what a bf16 product does to its operands (`values`)
/// and to the gradient of its result (`gradient`, which both backward products read rounded).
/// The reference attention with `bf16 = true` builds its products from these.
struct Bf16Round {
    values: bool,
    gradient: bool,
}

impl candle_core::CustomOp1 for Bf16Round {
    fn name(&self) -> &'static str {
        "bf16-round"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use super::matmul::round_to_bf16;
        let v = match (s, l.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("bf16-round: a contiguous f32 CPU tensor"),
        };
        let out: Vec<f32> = match self.values {
            true => v.iter().map(|&x| round_to_bf16(x)).collect(),
            false => v.to_vec(),
        };
        Ok((candle_core::CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(match self.gradient {
            true => g.contiguous()?.apply_op1_no_bwd(&Bf16Round {
                values: true,
                gradient: false,
            })?,
            false => g.clone(),
        }))
    }
}

/// An operand of a bf16 product: its values rounded to bf16, its gradient passed through.
pub fn bf16_operand(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Bf16Round {
        values: true,
        gradient: false,
    })?)
}

/// A bf16 product's result: unchanged, but its gradient rounded to bf16 (the backward products
/// multiply the rounded gradient).
pub fn bf16_result(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Bf16Round {
        values: false,
        gradient: true,
    })?)
}
