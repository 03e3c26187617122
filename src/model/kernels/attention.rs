use super::rope::Rope;
use super::*;

// ---------------------------------------------------------------- attention softmax

/// `softmax(scale · scores + mask)` over the last dimension; scores `[B, h, L, L]`, mask
/// `[B, 1, L, L]` (additive, no gradient).
struct MaskedSoftmax {
    scale: f64,
}

/// dS = scale · P ⊙ (dP − Σ_j dP_j P_j), from P and dP.
struct MaskedSoftmaxBwd {
    scale: f64,
}

/// Scores `[B, n, R, W]`, mask `[B, 1, M, W]` with `R` a multiple of `M`: score row `i` uses
/// mask row `i % M` (grouped-query heads stack `R / M` query heads' rows under one mask).
fn softmax_fwd<T: Elem>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    scale: f64,
) -> CResult<(CpuStorage, Shape)> {
    let op = "fused-masked-softmax";
    let (b, nh, r, w) = l1.shape().dims4()?;
    let (mb, one, m, mw) = l2.shape().dims4()?;
    if mb != b || one != 1 || mw != w || m == 0 || r % m != 0 {
        candle_core::bail!("{op}: mask {:?} does not fit scores {:?}", l2.dims(), l1.dims());
    }
    let (x, mask) = (slice::<T>(s1, l1, op)?, slice::<T>(s2, l2, op)?);
    let scale: T = num(scale);
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(r * w)
        .zip(x.par_chunks(r * w))
        .enumerate()
        .for_each(|(bh, (y, x))| {
            let mask = &mask[(bh / nh) * m * w..(bh / nh + 1) * m * w];
            for (i, (y, x)) in y.chunks_mut(w).zip(x.chunks(w)).enumerate() {
                softmax_row(y, x, &mask[(i % m) * w..(i % m + 1) * w], scale);
            }
        });
    out(y, l1.shape().clone())
}

fn softmax_bwd<T: Elem>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    scale: f64,
) -> CResult<(CpuStorage, Shape)> {
    let op = "fused-masked-softmax-bwd";
    let w = l1.dims()[l1.dims().len() - 1];
    let (p, dp) = (slice::<T>(s1, l1, op)?, slice::<T>(s2, l2, op)?);
    let scale: T = num(scale);
    let mut ds = vec![T::zero(); p.len()];
    let chunk = rows_per_task(p.len() / w, w) * w;
    ds.par_chunks_mut(chunk)
        .zip(p.par_chunks(chunk).zip(dp.par_chunks(chunk)))
        .for_each(|(ds, (p, dp))| {
            for ((ds, p), dp) in ds.chunks_mut(w).zip(p.chunks(w)).zip(dp.chunks(w)) {
                softmax_bwd_row(ds, p, dp, scale);
            }
        });
    out(ds, l1.shape().clone())
}

custom_op!(
    2,
    MaskedSoftmax,
    "fused-masked-softmax",
    |op, s1, l1, s2, l2| by_dtype!(s1, "fused-masked-softmax", softmax_fwd(s1, l1, s2, l2, op.scale)),
    fn bwd(&self, _x: &Tensor, _mask: &Tensor, p: &Tensor, dp: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let ds = p.apply_op2_no_bwd(&dp.contiguous()?, &MaskedSoftmaxBwd { scale: self.scale })?;
        Ok((Some(ds), None))
    }
);

custom_op!(
    2,
    MaskedSoftmaxBwd,
    "fused-masked-softmax-bwd",
    |op, s1, l1, s2, l2| by_dtype!(s1, "fused-masked-softmax-bwd", softmax_bwd(s1, l1, s2, l2, op.scale))
);

/// `softmax(scale · scores + mask)` over the last dimension, fused.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(scores
        .contiguous()?
        .apply_op2(&mask.contiguous()?, MaskedSoftmax { scale })?)
}

// ---------------------------------------------------------------- attention

/// Causal self-attention of one block as a single graph node: rotary embedding, grouped-query
/// scores, masked softmax and the weighted sum of values, from the projected `q`, `k`, `v`
/// (`[B·L, heads·D]`) to `[B·L, H·D]`. Only the inputs are kept for the backward pass, which
/// recomputes the scores (as flash attention does), so no `[heads, L, L]` tensor outlives the
/// forward pass.
#[derive(Clone)]
pub struct Attention {
    /// `[B, 1, L, D]` rotary tables and `[B, 1, L, L]` additive mask (constants).
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
    pub batch: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// When set (one row, `B = 1`), the block's attention as independent dense parts that
    /// cover its rows in order; `mask` is then not read. See [`AttentionPart`].
    pub split: Option<std::sync::Arc<Vec<AttentionPart>>>,
}

/// One dense piece of a block's attention: the queries of rows `rows.0 .. rows.0 + rows.1`
/// (a range of the block) attend the keys of `keys` (ranges of the block, in order, no query
/// row attending a key outside them) under the additive `mask` `[1, 1, rows.1, Σ key lengths]`.
///
/// A prompt shared by several responses is a block of `prompt, response 1, …, response n` in
/// which each response sees the prompt and itself only; split into the prompt's part and one
/// part per response (keys: prompt + that response), the scores cover
/// `P² + Σ r_k (P + r_k)` pairs instead of `(P + Σ r_k)²` (GRPO's 8 responses of 100 tokens
/// under a 100-token prompt: 5× fewer).
#[derive(Clone, Debug)]
pub struct AttentionPart {
    pub rows: (usize, usize),
    pub keys: Vec<(usize, usize)>,
    pub mask: Tensor,
}

/// What each part of a split block computes in the forward pass and its backward pass needs.
struct SplitParts {
    /// `[1, kvh, rep, L, D]`: rotated queries, grouped under their key/value head.
    q: Tensor,
    /// Per part: its queries `[1, kvh, rep·rows, D]`, keys and values `[1, kvh, keys, D]`
    /// (rotated keys), probabilities `[1, kvh, rep·rows, keys]`.
    parts: Vec<[Tensor; 4]>,
}

/// What the forward pass computes and the backward pass needs again.
struct AttentionParts {
    /// `[B, kvh, rep·L, D]`: rotated queries, grouped under their key/value head.
    q: Tensor,
    /// `[B, kvh, L, D]`: rotated keys and values.
    k: Tensor,
    v: Tensor,
    /// `[B, kvh, rep·L, L]` attention probabilities.
    p: Tensor,
}

impl Attention {
    fn rows(&self, t: &Tensor) -> CResult<usize> {
        Ok(t.dim(0)? / self.batch)
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// `[B·L, n·D]` to `[B, n, L, D]`.
    fn split(&self, x: &Tensor, n: usize) -> CResult<Tensor> {
        let l = self.rows(x)?;
        x.reshape((self.batch, l, n, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `[B, n, L, D]` to `[B·L, n·D]`.
    fn merge(&self, x: &Tensor, n: usize) -> CResult<Tensor> {
        let l = x.dim(2)?;
        x.transpose(1, 2)?.reshape((self.batch * l, n * self.head_dim))
    }

    fn rope(&self, x: &Tensor, transpose: bool) -> CResult<Tensor> {
        x.apply_op3_no_bwd(&self.cos, &self.sin, &Rope { transpose })
    }

    fn parts(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> CResult<AttentionParts> {
        let (b, kvh, d) = (self.batch, self.n_kv_heads, self.head_dim);
        let l = self.rows(q)?;
        let rep = self.n_heads / kvh;
        let q = self
            .rope(&self.split(q, self.n_heads)?, false)?
            .reshape((b, kvh, rep * l, d))?;
        let k = self.rope(&self.split(k, kvh)?, false)?;
        let v = self.split(v, kvh)?;
        let scores = q.matmul(&k.t()?)?;
        let p = scores.apply_op2_no_bwd(&self.mask, &MaskedSoftmax { scale: self.scale() })?;
        Ok(AttentionParts { q, k, v, p })
    }

    /// The key rows `ranges` of `[1, kvh, L, D]` rows, concatenated.
    fn key_rows(t: &Tensor, ranges: &[(usize, usize)]) -> CResult<Tensor> {
        let pieces = ranges
            .iter()
            .map(|&(s, n)| t.narrow(2, s, n))
            .collect::<CResult<Vec<_>>>()?;
        match pieces.len() {
            1 => pieces[0].contiguous(),
            _ => Tensor::cat(&pieces, 2),
        }
    }

    /// [`Self::parts`] for a block split into `parts` (one row).
    fn split_parts(&self, q: &Tensor, k: &Tensor, v: &Tensor, parts: &[AttentionPart]) -> CResult<SplitParts> {
        let (kvh, d) = (self.n_kv_heads, self.head_dim);
        if self.batch != 1 {
            candle_core::bail!(
                "fused-attention: a block split into parts must be one row, not {}",
                self.batch
            );
        }
        let l = self.rows(q)?;
        let rep = self.n_heads / kvh;
        let q = self
            .rope(&self.split(q, self.n_heads)?, false)?
            .reshape((1, kvh, rep, l, d))?;
        let k = self.rope(&self.split(k, kvh)?, false)?;
        let v = self.split(v, kvh)?;
        let scale = self.scale();
        let parts = parts
            .iter()
            .map(|part| {
                let (r0, rl) = part.rows;
                let qi = q.narrow(3, r0, rl)?.reshape((1, kvh, rep * rl, d))?;
                let (ki, vi) = (Self::key_rows(&k, &part.keys)?, Self::key_rows(&v, &part.keys)?);
                let p = qi
                    .matmul(&ki.t()?)?
                    .apply_op2_no_bwd(&part.mask, &MaskedSoftmax { scale })?;
                Ok([qi, ki, vi, p])
            })
            .collect::<CResult<Vec<_>>>()?;
        Ok(SplitParts { q, parts })
    }

    /// The output `[1, H, L, D]` of a block split into `parts`.
    fn split_forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, parts: &[AttentionPart]) -> CResult<Tensor> {
        let (h, d) = (self.n_heads, self.head_dim);
        let sp = self.split_parts(q, k, v, parts)?;
        let outs = sp
            .parts
            .iter()
            .zip(parts)
            .map(|([_, _, vi, p], part)| p.matmul(vi)?.reshape((1, h, part.rows.1, d)))
            .collect::<CResult<Vec<_>>>()?;
        Tensor::cat(&outs, 2)
    }

    /// The gradients of `q, k, v` (`[1, heads, L, D]`, before the inverse rotation) of a block
    /// split into `parts`: each part's key and value gradients are added into the rows they
    /// came from (a prompt's keys collect those of every response that attends them).
    fn split_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        parts: &[AttentionPart],
        d_out: &Tensor,
    ) -> CResult<(Tensor, Tensor, Tensor)> {
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (l, rep) = (self.rows(q)?, h / kvh);
        let sp = self.split_parts(q, k, v, parts)?;
        let d_o = self.split(&d_out.contiguous()?, h)?.reshape((1, kvh, rep, l, d))?;
        let mut dk = Tensor::zeros((1, kvh, l, d), sp.q.dtype(), sp.q.device())?;
        let mut dv = dk.clone();
        let mut dqs = Vec::with_capacity(parts.len());
        for ([qi, ki, vi, p], part) in sp.parts.iter().zip(parts) {
            let (r0, rl) = part.rows;
            let d_oi = d_o.narrow(3, r0, rl)?.reshape((1, kvh, rep * rl, d))?;
            let dvi = p.t()?.matmul(&d_oi)?;
            let dp = d_oi.matmul(&vi.t()?)?;
            let ds = p.apply_op2_no_bwd(&dp, &MaskedSoftmaxBwd { scale: self.scale() })?;
            dqs.push(ds.matmul(ki)?.reshape((1, kvh, rep, rl, d))?);
            let dki = ds.t()?.matmul(qi)?;
            let rows: Vec<u32> = part
                .keys
                .iter()
                .flat_map(|&(s, n)| (s as u32)..(s + n) as u32)
                .collect();
            let rows = Tensor::from_vec(rows, part.keys.iter().map(|r| r.1).sum::<usize>(), sp.q.device())?;
            dk = dk.index_add(&rows, &dki, 2)?;
            dv = dv.index_add(&rows, &dvi, 2)?;
        }
        let dq = Tensor::cat(&dqs, 3)?.reshape((1, h, l, d))?;
        Ok((dq, dk, dv))
    }
}

fn attention_fwd<T: Elem>(
    a: &Attention,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> CResult<(CpuStorage, Shape)> {
    let (q, k, v) = (
        tensor_of::<T>(s1, l1)?,
        tensor_of::<T>(s2, l2)?,
        tensor_of::<T>(s3, l3)?,
    );
    let l = a.rows(&q)?;
    let o = match &a.split {
        Some(parts) => a.split_forward(&q, &k, &v, parts)?,
        None => {
            let parts = a.parts(&q, &k, &v)?;
            // [B, kvh, rep·L, D] = [B, H, L, D]
            parts.p.matmul(&parts.v)?.reshape((a.batch, a.n_heads, l, a.head_dim))?
        }
    };
    storage_of::<T>(&a.merge(&o, a.n_heads)?)
}

custom_op!(
    3,
    Attention,
    "fused-attention",
    |op, s1, l1, s2, l2, s3, l3| by_dtype!(s1, "fused-attention", attention_fwd(op, s1, l1, s2, l2, s3, l3)),
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        d_out: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, kvh, d) = (self.batch, self.n_heads, self.n_kv_heads, self.head_dim);
        if let Some(parts) = &self.split {
            let (dq, dk, dv) = self.split_backward(q, k, v, parts, d_out)?;
            let dq = self.merge(&self.rope(&dq, true)?, h)?;
            let dk = self.merge(&self.rope(&dk, true)?, kvh)?;
            return Ok((Some(dq), Some(dk), Some(self.merge(&dv, kvh)?)));
        }
        let l = self.rows(q)?;
        let AttentionParts { q: qg, k: kr, v: v4, p } = self.parts(q, k, v)?;
        let d_o = self
            .split(&d_out.contiguous()?, h)?
            .reshape((b, kvh, (h / kvh) * l, d))?;
        // grouped heads share k and v, so these matmuls also sum over the group
        let dv = p.t()?.matmul(&d_o)?;
        let dp = d_o.matmul(&v4.t()?)?;
        let ds = p.apply_op2_no_bwd(&dp, &MaskedSoftmaxBwd { scale: self.scale() })?;
        let dq = ds.matmul(&kr)?.reshape((b, h, l, d))?;
        let dk = ds.t()?.matmul(&qg)?;
        let dq = self.merge(&self.rope(&dq, true)?, h)?;
        let dk = self.merge(&self.rope(&dk, true)?, kvh)?;
        let dv = self.merge(&dv, kvh)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
);

/// The gradients of [`attention`](fn@attention)'s `q, k, v` for the output gradient `d_out`, outside any
/// graph (for a hand-written backward).
pub fn attention_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    op: &Attention,
    d_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    match op.bwd(q, k, v, d_out, d_out)? {
        (Some(dq), Some(dk), Some(dv)) => Ok((dq, dk, dv)),
        _ => Err(crate::error::Error::msg("fused-attention: backward gave no gradient")),
    }
}

/// Fused attention over one block; see [`Attention`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, op: Attention) -> Result<Tensor> {
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}
