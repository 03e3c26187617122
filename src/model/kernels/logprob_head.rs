use super::*;

// ---------------------------------------------------------------- log-prob head

/// `log softmax(h · Wᵀ)[target]` for each row of `h` `[n, H]`, with the output projection
/// `W` `[V, H]`, as one graph node: logits are made a chunk of rows at a time and only the
/// picked log-prob is kept; the backward pass makes them again (the fused linear + cross-entropy
/// of Liger and others). No `[n, V]` tensor outlives either pass's chunk loop except the
/// gradient of the logits inside the backward pass.
pub struct TokenLogps {
    /// The projection, detached (the graph sees it as the op's second argument).
    pub w: Tensor,
    pub targets: Vec<u32>,
    /// Multiply bf16-rounded operands ([`super::matmul`]; f32 only).
    pub bf16: bool,
    /// When set, the forward pass also leaves each row's entropy `−Σ_v p_v log p_v` here
    /// (no gradient): computed from the logits it makes anyway, so it costs one more pass over
    /// each row in cache instead of a second projection.
    pub entropies: Option<std::sync::Arc<std::sync::Mutex<Vec<f64>>>>,
    /// When set (with `entropies`), the forward pass also leaves each row's largest log-prob
    /// `max_v logit_v − logsumexp` here: the target is the top-1 token where its log-prob
    /// equals it (SFT's `mean_token_accuracy`).
    pub top_logps: Option<std::sync::Arc<std::sync::Mutex<Vec<f64>>>>,
    /// When set, the projection's gradient goes here (added under the weight's id) instead of
    /// to candle's store, which would first add it to a zero tensor of its size: two more
    /// `[V, H]` buffers at the peak of a step (226 MB for SmolLM2's tied embedding). The model
    /// sets it where its own backward collects the sink.
    pub sink: Option<std::sync::Arc<crate::model::autograd::GradSink>>,
}

/// `−Σ_v softmax(row)_v · log softmax(row)_v = lse − Σ_v softmax(row)_v · row_v`.
fn row_entropy<T: Elem>(row: &[T], lse: T) -> f64 {
    let lse64 = candle_core::WithDType::to_f64(lse);
    let mut mean = 0f64;
    for &z in row {
        let p = candle_core::WithDType::to_f64((z - lse).exp_fast());
        mean += p * candle_core::WithDType::to_f64(z);
    }
    lse64 - mean
}

/// Rows of logits made at once.
pub(super) const HEAD_CHUNK_ROWS: usize = 64;

/// Run `f` on the contiguous CPU data of `t`.
fn with_slice<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> CResult<R>) -> CResult<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cpu(c) => f(slice::<T>(c, l, "fused-token-logps")?),
        _ => candle_core::bail!("fused-token-logps: CPU tensors only"),
    }
}

/// `f(first row, logits of the chunk's rows, their logsumexps)` for every chunk of at most
/// `chunk_rows` rows of `h`, in order; with `entropies` (and `tops`), each row's entropy (and
/// largest log-prob) is pushed there too (computed in parallel with the logsumexps).
fn for_each_logit_chunk<T: Elem>(
    h: &Tensor,
    w: &Tensor,
    bf16: bool,
    chunk_rows: usize,
    mut entropies: Option<&mut Vec<f64>>,
    mut tops: Option<&mut Vec<f64>>,
    mut f: impl FnMut(usize, &[T], &[T]) -> CResult<()>,
) -> CResult<()> {
    let (n, v) = (h.dim(0)?, w.dim(0)?);
    let wt = w.t()?;
    // the bf16 projection is packed once for all chunks
    let packed = match bf16 && T::DTYPE == candle_core::DType::F32 {
        true => Some(super::matmul::rhs_of(w, true)?),
        false => None,
    };
    for start in (0..n).step_by(chunk_rows.max(1)) {
        let c = chunk_rows.min(n - start);
        let logits = match &packed {
            Some(p) => super::matmul::matmul_tensor(&h.narrow(0, start, c)?, false, p)?,
            None => h.narrow(0, start, c)?.matmul(&wt)?,
        };
        with_slice::<T, ()>(&logits, |l| {
            let lse: Vec<T> = l.par_chunks(v).map(logsumexp::<T>).collect();
            if let Some(e) = entropies.as_deref_mut() {
                let rows: Vec<f64> = l
                    .par_chunks(v)
                    .zip(lse.par_iter())
                    .map(|(row, &m)| row_entropy(row, m))
                    .collect();
                e.extend(rows);
            }
            if let Some(t) = tops.as_deref_mut() {
                let rows: Vec<f64> = l
                    .par_chunks(v)
                    .zip(lse.par_iter())
                    .map(|(row, &m)| {
                        let top = row.iter().fold(T::neg_infinity(), |a, &b| if b > a { b } else { a });
                        candle_core::WithDType::to_f64(top - m)
                    })
                    .collect();
                t.extend(rows);
            }
            f(start, l, &lse)
        })?;
    }
    Ok(())
}

fn head_fwd<T: Elem>(op: &TokenLogps, s1: &CpuStorage, l1: &Layout) -> CResult<(CpuStorage, Shape)> {
    let h = tensor_of::<T>(s1, l1)?;
    let mut res = vec![T::zero(); h.dim(0)?];
    let mut ent = Vec::new();
    let mut tops = Vec::new();
    let want = op.entropies.is_some();
    let want_top = op.top_logps.is_some();
    let v = op.w.dim(0)?;
    for_each_logit_chunk::<T>(
        &h,
        &op.w,
        op.bf16,
        HEAD_CHUNK_ROWS,
        want.then_some(&mut ent),
        want_top.then_some(&mut tops),
        |start, logits, lse| {
            for (i, (row, &m)) in logits.chunks(v).zip(lse).enumerate() {
                res[start + i] = row[op.targets[start + i] as usize] - m;
            }
            Ok(())
        },
    )?;
    let poisoned = |_| candle_core::Error::Msg("fused-token-logps: poisoned buffer".into());
    if let Some(e) = &op.entropies {
        *e.lock().map_err(poisoned)? = ent;
    }
    if let Some(t) = &op.top_logps {
        *t.lock().map_err(poisoned)? = tops;
    }
    let n = res.len();
    out(res, Shape::from(n))
}

/// Logit values the backward pass holds at once (`[rows, V]` of its logits' gradient): 64 MiB
/// of f32, 341 rows of SmolLM2's 49152-token vocabulary (a unit test's budget is one chunk of
/// [`HEAD_CHUNK_ROWS`], so that several chunks are tested).
const HEAD_BWD_VALUES: usize = if cfg!(test) { 1 } else { 1 << 24 };

/// dlogits = g·(onehot(target) − softmax(logits)); dh = dlogits·W, dW = dlogitsᵀ·h.
/// `dh`, and `dW` when `want_dw` (a frozen head, e.g. under LoRA, gets none: candle would
/// otherwise add a `[V, H]` gradient of an untracked weight into its store).
///
/// In f32 the logits' gradient is made a chunk of rows at a time ([`HEAD_BWD_VALUES`]), each
/// chunk's products written into `dh`'s rows and added into `dW` in place: GRPO's 3264
/// completion tokens would otherwise hold a 642 MB `[rows, V]` gradient at the peak of the step.
fn head_bwd<T: Elem>(op: &TokenLogps, h: &Tensor, g: &Tensor, want_dw: bool) -> CResult<(Tensor, Option<Tensor>)> {
    let h = h.contiguous()?;
    if T::DTYPE == candle_core::DType::F32 {
        return head_bwd_f32(op, &h, g, want_dw);
    }
    let (n, v) = (h.dim(0)?, op.w.dim(0)?);
    let g: Vec<T> = g.to_dtype(T::DTYPE)?.to_vec1()?;
    let mut dl = vec![T::zero(); n * v];
    for_each_logit_chunk::<T>(&h, &op.w, false, HEAD_CHUNK_ROWS, None, None, |start, logits, lse| {
        let rows = dl[start * v..(start + lse.len()) * v].chunks_mut(v);
        for (i, ((d, row), &m)) in rows.zip(logits.chunks(v)).zip(lse).enumerate() {
            let r = start + i;
            neg_softmax_row(d, row, m, g[r]);
            d[op.targets[r] as usize] += g[r];
        }
        Ok(())
    })?;
    let dl = Tensor::from_vec(dl, (n, v), h.device())?;
    let dw = match want_dw {
        true => Some(dl.t()?.matmul(&h)?),
        false => None,
    };
    Ok((dl.matmul(&op.w)?, dw))
}

/// [`head_bwd`] in f32: chunked, bf16 products with `op.bf16`. Each chunk's logits are made
/// in the gradient's own buffer and turned into their gradient in place, so the pass holds one
/// `[rows, V]` buffer, not two (the peak of a DPO step is here: 64 MiB of SmolLM2's).
fn head_bwd_f32(op: &TokenLogps, h: &Tensor, g: &Tensor, want_dw: bool) -> CResult<(Tensor, Option<Tensor>)> {
    let g: Vec<f32> = g.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    head_bwd_f32_with(op, h, &g, want_dw, None, bwd_chunk_rows(op.w.dim(0)?))
}

/// Rows of `h` per chunk of [`head_bwd_f32`] for a vocabulary of `v`.
fn bwd_chunk_rows(v: usize) -> usize {
    (HEAD_BWD_VALUES / v.max(1)).max(HEAD_CHUNK_ROWS)
}

/// [`head_bwd_f32`] for the upstream gradient `g`, `chunk_rows` rows at a time, leaving each
/// row's logsumexp in `lse` when given. Without `dW`, the chunks change no value (each row of
/// `dh` is its own product); with it they set the order of `dW`'s sums.
fn head_bwd_f32_with(
    op: &TokenLogps,
    h: &Tensor,
    g: &[f32],
    want_dw: bool,
    mut lse_out: Option<&mut Vec<f32>>,
    chunk_rows: usize,
) -> CResult<(Tensor, Option<Tensor>)> {
    use super::matmul::{matmul, matmul_f32, rhs_of, with_f32, View};
    let ((n, hd), v) = (h.dims2()?, op.w.dim(0)?);
    if let Some(l) = lse_out.as_deref_mut() {
        l.resize(n, 0.0);
    }
    let chunk_rows = chunk_rows.max(1);
    let mut dl = vec![0f32; chunk_rows.min(n) * v];
    let mut dh = vec![0f32; n * hd];
    let mut dw = vec![0f32; if want_dw { v * hd } else { 0 }];
    let blocks = vocab_blocks(v);
    // with bf16, W `[V, H]` rounded and packed once for every chunk: transposed for the logits
    // h·Wᵀ (a block of rows at a time), as it is for dl·W
    let (wt_rhs, w_rhs) = match op.bf16 {
        true => (
            blocks
                .iter()
                .map(|&(s, vb)| rhs_of(&op.w.narrow(0, s, vb)?, true))
                .collect::<CResult<Vec<_>>>()?,
            Some(rhs_of(&op.w, false)?),
        ),
        false => (Vec::new(), None),
    };
    with_f32(&op.w, |wv| {
        with_f32(h, |hv| {
            let w = View::row_major(wv, v, hd);
            for start in (0..n).step_by(chunk_rows) {
                let c = chunk_rows.min(n - start);
                let d = &mut dl[..c * v];
                let h_rows = View::row_major(&hv[start * hd..(start + c) * hd], c, hd);
                for (b, &(s, vb)) in blocks.iter().enumerate() {
                    match wt_rhs.get(b) {
                        Some(wt) => matmul(h_rows, wt, &mut d[s..], v, false)?,
                        None => matmul_f32(h_rows, block_of(wv, s, vb, hd).t(), &mut d[s..], v, false)?,
                    }
                }
                let mut lses = vec![0f32; c];
                d.par_chunks_mut(v)
                    .zip(lses.par_iter_mut())
                    .enumerate()
                    .for_each(|(i, (d, l))| {
                        let r = start + i;
                        let lse = logsumexp(d);
                        neg_softmax_in_place(d, lse, g[r]);
                        d[op.targets[r] as usize] += g[r];
                        *l = lse;
                    });
                if let Some(l) = lse_out.as_deref_mut() {
                    l[start..start + c].copy_from_slice(&lses);
                }
                let dh_rows = &mut dh[start * hd..(start + c) * hd];
                match &w_rhs {
                    Some(w) => matmul(View::row_major(d, c, v), w, dh_rows, hd, false)?,
                    None => matmul_f32(View::row_major(d, c, v), w, dh_rows, hd, false)?,
                }
                if want_dw {
                    let h_rhs = match op.bf16 {
                        true => Some(rhs_of(&h.narrow(0, start, c)?, false)?),
                        false => None,
                    };
                    for &(s, vb) in &blocks {
                        let db = View {
                            data: &d[s..],
                            rows: c,
                            cols: vb,
                            rs: v,
                            cs: 1,
                        };
                        let out = &mut dw[s * hd..(s + vb) * hd];
                        match &h_rhs {
                            Some(hr) => matmul(db.t(), hr, out, hd, start > 0)?,
                            None => matmul_f32(db.t(), h_rows, out, hd, start > 0)?,
                        }
                    }
                }
            }
            Ok(())
        })
    })?;
    let dev = h.device();
    let dw = match want_dw {
        true => Some(Tensor::from_vec(dw, (v, hd), dev)?),
        false => None,
    };
    Ok((Tensor::from_vec(dh, (n, hd), dev)?, dw))
}

/// The blocks of vocabulary rows (`(first row, rows)`) in which the backward pass makes the
/// logits and W's gradient: one product per block, so that a block made alone (the second pass
/// of `optimizer_in_backward`, [`HeadGrad::block`]) has the same values, to the bit, as the same
/// block of a whole pass. The blocks of [`crate::model::autograd::StreamedRows`].
fn vocab_blocks(v: usize) -> Vec<(usize, usize)> {
    let per = crate::model::autograd::StreamedRows::block_rows(v);
    (0..v).step_by(per.max(1)).map(|s| (s, per.min(v - s))).collect()
}

/// Rows `s..s + vb` of the row-major `[V, hd]` matrix `w`.
fn block_of(w: &[f32], s: usize, vb: usize, hd: usize) -> super::matmul::View<'_> {
    super::matmul::View::row_major(&w[s * hd..(s + vb) * hd], vb, hd)
}

/// What the second backward pass of `optimizer_in_backward` needs to make the projection's
/// gradient again, a block of vocabulary rows at a time: the op, its input rows, the upstream
/// gradient and each row's logsumexp from the first pass.
struct HeadGrad {
    op: TokenLogps,
    h: Tensor,
    g: Vec<f32>,
    lse: Vec<f32>,
}

impl HeadGrad {
    /// The gradient of W's rows `start..start + out.len() / H` into `out`, bit for bit what
    /// [`head_bwd_f32`] adds into those rows of `dW`: the same chunks of rows of `h`, the same
    /// products restricted to the block's columns of the logits.
    fn block(&self, start: usize, out: &mut [f32]) -> CResult<()> {
        use super::matmul::{matmul, matmul_f32, rhs_of, with_f32, View};
        let ((n, hd), v) = (self.h.dims2()?, self.op.w.dim(0)?);
        let vb = out.len() / hd.max(1);
        if vb * hd != out.len() || start + vb > v {
            candle_core::bail!(
                "fused-token-logps: a block of {} values at row {start} of [{v}, {hd}]",
                out.len()
            )
        }
        if !vocab_blocks(v).contains(&(start, vb)) {
            candle_core::bail!(
                "fused-token-logps: rows {start}..{} are not one of the backward pass's blocks",
                start + vb
            )
        }
        let chunk_rows = bwd_chunk_rows(v);
        let wb = self.op.w.narrow(0, start, vb)?;
        let wt_rhs = match self.op.bf16 {
            true => Some(rhs_of(&wb, true)?),
            false => None,
        };
        let mut dl = vec![0f32; chunk_rows.min(n) * vb];
        with_f32(&wb, |wv| {
            with_f32(&self.h, |hv| {
                let w = block_of(wv, 0, vb, hd);
                for first in (0..n).step_by(chunk_rows) {
                    let c = chunk_rows.min(n - first);
                    let d = &mut dl[..c * vb];
                    let h_rows = View::row_major(&hv[first * hd..(first + c) * hd], c, hd);
                    match &wt_rhs {
                        Some(wt) => matmul(h_rows, wt, d, vb, false)?,
                        None => matmul_f32(h_rows, w.t(), d, vb, false)?,
                    }
                    d.par_chunks_mut(vb).enumerate().for_each(|(i, d)| {
                        let r = first + i;
                        neg_softmax_in_place(d, self.lse[r], self.g[r]);
                        let t = self.op.targets[r] as usize;
                        if (start..start + vb).contains(&t) {
                            d[t - start] += self.g[r];
                        }
                    });
                    let d = View::row_major(d, c, vb);
                    match self.op.bf16 {
                        true => matmul(d.t(), &rhs_of(&self.h.narrow(0, first, c)?, false)?, out, hd, first > 0)?,
                        false => matmul_f32(d.t(), h_rows, out, hd, first > 0)?,
                    }
                }
                if n == 0 {
                    out.fill(0.0);
                }
                Ok(())
            })
        })
    }
}

/// The backward pass of the op under `optimizer_in_backward` (its sink streams): `dh` as
/// always, and the projection's gradient measured a block of rows at a time and left in the
/// sink as a [`StreamedRows`], never held whole.
fn head_bwd_streamed(
    op: &TokenLogps,
    sink: &crate::model::autograd::GradSink,
    h: &Tensor,
    w: &Tensor,
    g: &Tensor,
) -> CResult<Tensor> {
    use crate::model::autograd::StreamedRows;
    let h = h.contiguous()?;
    let g: Vec<f32> = g.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    let mut lse = Vec::new();
    // this pass makes no dW, so its logits are the largest buffer at this point of the step:
    // a quarter of the usual chunk (each row's values do not depend on the chunks)
    let chunk_rows = (HEAD_BWD_VALUES / 4 / op.w.dim(0)?.max(1)).max(HEAD_CHUNK_ROWS);
    let (dh, _) = head_bwd_f32_with(op, &h, &g, false, Some(&mut lse), chunk_rows)?;
    let grad = HeadGrad {
        op: TokenLogps {
            w: op.w.clone(),
            targets: op.targets.clone(),
            bf16: op.bf16,
            entropies: None,
            top_logps: None,
            sink: None,
        },
        h,
        g,
        lse,
    };
    let (v, hd) = op.w.dims2()?;
    let block = move |start: usize, out: &mut [f32]| grad.block(start, out).map_err(crate::error::Error::from);
    let rows =
        StreamedRows::measure(w.id(), v, hd, Some(Box::new(block)), sink.lookup_ids().map_err(msg)?).map_err(msg)?;
    sink.add_rows(rows).map_err(msg)?;
    Ok(dh)
}

fn msg(e: crate::error::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

custom_op!(
    2,
    TokenLogps,
    "fused-token-logps",
    |op, s1, l1, _s2, _l2| by_dtype!(s1, "fused-token-logps", head_fwd(op, s1, l1)),
    fn bwd(&self, h: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let want_dw = w.track_op();
        if let Some(sink) = self
            .sink
            .as_ref()
            .filter(|s| s.streams() && want_dw && h.dtype() == candle_core::DType::F32)
        {
            return Ok((Some(head_bwd_streamed(self, sink, h, w, g)?), None));
        }
        let (dh, dw) = match h.dtype() {
            candle_core::DType::F32 => head_bwd::<f32>(self, h, g, want_dw)?,
            candle_core::DType::F64 => head_bwd::<f64>(self, h, g, want_dw)?,
            dt => candle_core::bail!("fused-token-logps: no kernel for {dt:?}"),
        };
        match (&self.sink, dw) {
            (Some(sink), Some(dw)) => {
                sink.add(w.id(), dw)?;
                Ok((Some(dh), None))
            }
            (_, dw) => Ok((Some(dh), dw)),
        }
    }
);

/// `log softmax(h · Wᵀ)[targets]` per row of `h` `[n, H]`, fused; see [`TokenLogps`]. With
/// `bf16` the logits come from bf16-rounded operands ([`super::matmul`]).
pub fn token_logps(h: &Tensor, w: &Tensor, targets: &[u32], bf16: bool) -> Result<Tensor> {
    token_logps_into(h, w, targets, bf16, None)
}

/// [`token_logps`] whose projection gradient goes to `sink` when one is given (see
/// [`TokenLogps::sink`]).
pub fn token_logps_into(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    bf16: bool,
    sink: Option<std::sync::Arc<crate::model::autograd::GradSink>>,
) -> Result<Tensor> {
    let op = TokenLogps {
        w: w.detach(),
        targets: targets.to_vec(),
        bf16,
        entropies: None,
        top_logps: None,
        sink,
    };
    Ok(h.contiguous()?.apply_op2(w, op)?)
}

/// [`token_logps`] with each row's entropy (no gradient), from the same pass over the logits.
pub fn token_logps_entropy(h: &Tensor, w: &Tensor, targets: &[u32], bf16: bool) -> Result<(Tensor, Vec<f64>)> {
    let (lp, e, _) = token_logps_stats(h, w, targets, bf16)?;
    Ok((lp, e))
}

/// [`token_logps`] with each row's entropy and largest log-prob (no gradient), from the same
/// pass over the logits.
pub fn token_logps_stats(h: &Tensor, w: &Tensor, targets: &[u32], bf16: bool) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
    token_logps_stats_into(h, w, targets, bf16, None)
}

/// [`token_logps_stats`] whose projection gradient goes to `sink` when one is given.
pub fn token_logps_stats_into(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    bf16: bool,
    sink: Option<std::sync::Arc<crate::model::autograd::GradSink>>,
) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let tops = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let op = TokenLogps {
        w: w.detach(),
        targets: targets.to_vec(),
        bf16,
        entropies: Some(buf.clone()),
        top_logps: Some(tops.clone()),
        sink,
    };
    let lp = h.contiguous()?.apply_op2(w, op)?;
    let take = |b: &std::sync::Mutex<Vec<f64>>| -> Result<Vec<f64>> {
        Ok(std::mem::take(
            &mut *b
                .lock()
                .map_err(|_| crate::error::Error::msg("entropy buffer poisoned"))?,
        ))
    };
    Ok((lp, take(&buf)?, take(&tops)?))
}
