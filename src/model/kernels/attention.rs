use super::rope::rotate;
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
    /// Multiply bf16-rounded operands with f32 sums (`bf16 = true`, f32 only): the scores, the
    /// probabilities times the values, and the four products of the backward pass.
    pub bf16: bool,
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

/// A run of a block's query rows and the keys they attend, computed by one task: batch row
/// `b`, query rows `rows.0 .. rows.0 + rows.1`, keys the first `n_keys` of `keys` (ranges of
/// the row, in order; keys past them are masked for every one of these queries), additive
/// mask rows `mask` (`rows.1` rows of `stride` values, the first `n_keys` read).
struct Piece<'a, T> {
    b: usize,
    rows: (usize, usize),
    keys: &'a [(usize, usize)],
    n_keys: usize,
    mask: &'a [T],
    stride: usize,
}

impl<T> Piece<'_, T> {
    /// The keys' rows in the batch row, in order.
    fn key_rows(&self) -> impl Iterator<Item = usize> + '_ {
        self.keys.iter().flat_map(|&(s, n)| s..s + n).take(self.n_keys)
    }
}

/// Query rows per [`Piece`]: a run of 64 rows fills the products' register tiles, and each run
/// stops at the last key one of its rows may see (a causal block's first rows skip most of it).
const PIECE_ROWS: usize = 64;

/// The pieces of a block: per batch row (or per part of a split block), runs of
/// [`PIECE_ROWS`] query rows, each with the keys up to the last one any of its rows may see.
fn pieces<'a, T: Elem>(
    a: &'a Attention,
    l: usize,
    mask: &'a [T],
    part_masks: &'a [&'a [T]],
    whole: &'a [(usize, usize)],
) -> Vec<Piece<'a, T>> {
    let cut: T = num(MASKED);
    let mut out = Vec::new();
    let mut add = |b: usize, r0: usize, rl: usize, keys: &'a [(usize, usize)], mask: &'a [T]| {
        let stride = keys.iter().map(|k| k.1).sum::<usize>();
        for c0 in (0..rl).step_by(PIECE_ROWS) {
            let cn = PIECE_ROWS.min(rl - c0);
            let rows = &mask[c0 * stride..(c0 + cn) * stride];
            // one past the last key a row of the run may see (at least one: a row sees itself)
            let n_keys = rows
                .chunks(stride)
                .map(|m| m.iter().rposition(|&v| v > cut).map_or(1, |j| j + 1))
                .max()
                .unwrap_or(1);
            out.push(Piece {
                b,
                rows: (r0 + c0, cn),
                keys,
                n_keys,
                mask: rows,
                stride,
            });
        }
    };
    match &a.split {
        Some(parts) => {
            for (part, m) in parts.iter().zip(part_masks) {
                add(0, part.rows.0, part.rows.1, &part.keys, m);
            }
        }
        None => {
            for b in 0..a.batch {
                add(b, 0, l, whole, &mask[b * l * l..(b + 1) * l * l]);
            }
        }
    }
    out
}

/// `c = a·b`, single-threaded (the tasks are the parallelism): `[m, k]` by
/// `[k, n]` with each operand at `(row stride, column stride)`, `c` row-major at stride `ldc`.
/// With `bf16` (f32 only) the operands are rounded to bf16 and the sums are f32
/// ([`super::matmul::matmul_serial`]), as PyTorch's autocast runs attention.
///
/// # Safety
/// Every pointer must be valid for its strided matrix.
#[allow(clippy::too_many_arguments)]
unsafe fn product<T: Elem>(
    bf16: bool,
    (m, k, n): (usize, usize, usize),
    c: *mut T,
    ldc: usize,
    a: *const T,
    (ars, acs): (usize, usize),
    b: *const T,
    (brs, bcs): (usize, usize),
) -> CResult<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if bf16 && T::DTYPE == DType::F32 && k > 0 {
        use super::matmul::{matmul_serial, View};
        // SAFETY: T is f32; the caller's contract bounds each strided matrix.
        let view = |p: *const T, rows: usize, cols: usize, (rs, cs): (usize, usize)| unsafe {
            let len = (rows - 1) * rs + (cols - 1) * cs + 1;
            View {
                data: std::slice::from_raw_parts(p as *const f32, len),
                rows,
                cols,
                rs,
                cs,
            }
        };
        // SAFETY: as above; `c` is this task's alone.
        return unsafe {
            matmul_serial(
                view(a, m, k, (ars, acs)),
                view(b, k, n, (brs, bcs)),
                c as *mut f32,
                ldc,
                false,
            )
        };
    }
    // SAFETY: the caller's contract; with `read_dst` false gemm writes [m, n] without reading.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            false,
            a,
            acs as isize,
            ars as isize,
            b,
            bcs as isize,
            brs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
    Ok(())
}

/// A `*mut T` that parallel tasks write through, each to its own elements.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: the tasks write disjoint elements (each piece its own rows of its own head).
unsafe impl<T> Sync for Shared<T> {}
unsafe impl<T> Send for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so that a closure captures the `Shared`, not its field).
    fn ptr(self) -> *mut T {
        self.0
    }
}

/// What one (head, piece) task computes first in both passes: rotated queries `[rows, D]`,
/// rotated keys and values `[n_keys, D]`, and the probabilities `[rows, n_keys]`.
struct Probabilities<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    p: Vec<T>,
}

/// The inputs of one block's attention as slices: `q` `[B·L, H·D]`, `k`, `v` `[B·L, kvh·D]`,
/// `cos`, `sin` `[B, 1, L, D]`.
struct Block<'a, T> {
    a: &'a Attention,
    l: usize,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    cos: &'a [T],
    sin: &'a [T],
}

impl<T: Elem> Block<'_, T> {
    /// Head `h`'s rotated queries `[rows, D]` of the piece's rows.
    fn rotated_queries(&self, h: usize, pc: &Piece<T>) -> Vec<T> {
        let (d, hd) = (self.a.head_dim, self.a.n_heads * self.a.head_dim);
        let mut q = vec![T::zero(); pc.rows.1 * d];
        for (i, y) in q.chunks_mut(d).enumerate() {
            let r = pc.b * self.l + pc.rows.0 + i;
            rotate(
                y,
                &self.q[r * hd + h * d..][..d],
                &self.cos[r * d..][..d],
                &self.sin[r * d..][..d],
                false,
            );
        }
        q
    }

    /// Key/value head `g`'s rotated keys and its values `[keys, D]` at the positions `keys` of
    /// batch row `b`.
    fn rotated_keys_and_values(&self, g: usize, b: usize, keys: impl Iterator<Item = usize>) -> (Vec<T>, Vec<T>) {
        let (d, kd) = (self.a.head_dim, self.a.n_kv_heads * self.a.head_dim);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        let mut y = vec![T::zero(); d];
        for t in keys {
            let r = b * self.l + t;
            rotate(
                &mut y,
                &self.k[r * kd + g * d..][..d],
                &self.cos[r * d..][..d],
                &self.sin[r * d..][..d],
                false,
            );
            k.extend_from_slice(&y);
            v.extend_from_slice(&self.v[r * kd + g * d..][..d]);
        }
        (k, v)
    }

    /// The probabilities `[rows, n_keys]` of the piece's `scores` under its mask.
    fn softmax_rows(&self, pc: &Piece<T>, scores: &[T]) -> Vec<T> {
        let nk = pc.n_keys;
        let mut p = vec![T::zero(); scores.len()];
        let scale: T = num(self.a.scale());
        for (i, (y, x)) in p.chunks_mut(nk).zip(scores.chunks(nk)).enumerate() {
            softmax_row(y, x, &pc.mask[i * pc.stride..][..nk], scale);
        }
        p
    }

    fn probabilities(&self, h: usize, pc: &Piece<T>) -> CResult<Probabilities<T>> {
        let a = self.a;
        let d = a.head_dim;
        let (rl, nk) = (pc.rows.1, pc.n_keys);
        let q = self.rotated_queries(h, pc);
        let (k, v) = self.rotated_keys_and_values(h / (a.n_heads / a.n_kv_heads), pc.b, pc.key_rows());
        let mut scores = vec![T::zero(); rl * nk];
        // SAFETY: q is [rl, d], k [nk, d] (read as kᵀ), scores [rl, nk].
        unsafe {
            product(
                a.bf16,
                (rl, d, nk),
                scores.as_mut_ptr(),
                nk,
                q.as_ptr(),
                (d, 1),
                k.as_ptr(),
                (1, d),
            )?
        };
        let p = self.softmax_rows(pc, &scores);
        Ok(Probabilities { q, k, v, p })
    }

    /// The output `[B·L, H·D]`.
    fn forward(&self, pieces: &[Piece<T>]) -> CResult<Vec<T>> {
        if self.a.bf16 && T::DTYPE == DType::F32 {
            return self.forward_bf16(pieces);
        }
        let a = self.a;
        let (d, hd) = (a.head_dim, a.n_heads * a.head_dim);
        let mut out = vec![T::zero(); a.batch * self.l * hd];
        let o = Shared(out.as_mut_ptr());
        (0..a.n_heads * pieces.len()).into_par_iter().try_for_each(|t| {
            let (h, pc) = (t % a.n_heads, &pieces[t / a.n_heads]);
            let pr = self.probabilities(h, pc)?;
            let (r0, rl) = pc.rows;
            // SAFETY: p [rl, nk], v [nk, d]; the output rows r0.. of head h (columns h·d..)
            // are this task's alone.
            unsafe {
                product(
                    a.bf16,
                    (rl, pc.n_keys, d),
                    o.ptr().add((pc.b * self.l + r0) * hd + h * d),
                    hd,
                    pr.p.as_ptr(),
                    (pc.n_keys, 1),
                    pr.v.as_ptr(),
                    (d, 1),
                )
            }
        })?;
        Ok(out)
    }

    /// [`Self::forward`] with bf16 products (f32 only): each key/value head's rotated keys and
    /// values are packed once per set of keys, for all the heads of its group and all the runs
    /// of rows that attend them (each run multiplies the leading part it may see). Packing them
    /// per task cost more than the products.
    fn forward_bf16(&self, pieces: &[Piece<T>]) -> CResult<Vec<T>> {
        use super::matmul::{matmul_corner_serial, Rhs, View};
        let a = self.a;
        let (d, hd) = (a.head_dim, a.n_heads * a.head_dim);
        // the distinct key sets (a part's runs of rows share theirs), and each piece's
        let mut sets: Vec<(usize, &[(usize, usize)])> = Vec::new();
        let set_of: Vec<usize> = pieces
            .iter()
            .map(|pc| {
                let same = |s: &(usize, &[(usize, usize)])| s.0 == pc.b && std::ptr::eq(s.1, pc.keys);
                sets.iter().position(same).unwrap_or_else(|| {
                    sets.push((pc.b, pc.keys));
                    sets.len() - 1
                })
            })
            .collect();
        // per (set, kv head): Kᵀ `[D, keys]` and V `[keys, D]`, packed
        let packed: Vec<(Rhs, Rhs)> = (0..sets.len() * a.n_kv_heads)
            .into_par_iter()
            .map(|i| {
                let ((b, keys), g) = (sets[i / a.n_kv_heads], i % a.n_kv_heads);
                let (k, v) = self.rotated_keys_and_values(g, b, keys.iter().flat_map(|&(s, n)| s..s + n));
                let n = k.len() / d;
                Ok((
                    Rhs::serial(View::row_major(f32s(&k), n, d).t())?,
                    Rhs::serial(View::row_major(f32s(&v), n, d))?,
                ))
            })
            .collect::<CResult<_>>()?;
        let mut out = vec![T::zero(); a.batch * self.l * hd];
        let o = Shared(out.as_mut_ptr() as *mut f32);
        (0..a.n_heads * pieces.len()).into_par_iter().try_for_each(|t| {
            let (h, i) = (t % a.n_heads, t / a.n_heads);
            let pc = &pieces[i];
            let (kt, v) = &packed[set_of[i] * a.n_kv_heads + h / (a.n_heads / a.n_kv_heads)];
            let ((r0, rl), nk) = (pc.rows, pc.n_keys);
            let q = self.rotated_queries(h, pc);
            let mut scores = vec![T::zero(); rl * nk];
            // SAFETY: scores is [rl, nk] (f32: T is), this task's own.
            unsafe {
                let dst = scores.as_mut_ptr() as *mut f32;
                matmul_corner_serial(View::row_major(f32s(&q), rl, d), kt, nk, dst, nk)?
            };
            let p = self.softmax_rows(pc, &scores);
            // SAFETY: the output rows r0.. of head h (columns h·d.., stride hd) are this task's.
            unsafe {
                let dst = o.ptr().add((pc.b * self.l + r0) * hd + h * d);
                matmul_corner_serial(View::row_major(f32s(&p), rl, nk), v, d, dst, hd)
            }
        })?;
        Ok(out)
    }

    /// The gradients of `q`, `k`, `v` (their layouts) for the output gradient `d_out`.
    fn backward(&self, pieces: &[Piece<T>], d_out: &[T]) -> CResult<[Vec<T>; 3]> {
        let a = self.a;
        let (d, hd, kd) = (a.head_dim, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim);
        let rows = a.batch * self.l;
        let mut dq = vec![T::zero(); rows * hd];
        let dqp = Shared(dq.as_mut_ptr());
        let (scale, bf16): (T, bool) = (num(a.scale()), a.bf16);
        // per task: the rotated keys' and the values' gradients of its keys, added below
        let partial: Vec<(Vec<T>, Vec<T>)> = (0..a.n_heads * pieces.len())
            .into_par_iter()
            .map(|t| {
                let (h, pc) = (t % a.n_heads, &pieces[t / a.n_heads]);
                let Probabilities { q, k, v, p } = self.probabilities(h, pc)?;
                let ((r0, rl), nk) = (pc.rows, pc.n_keys);
                let first = (pc.b * self.l + r0) * hd + h * d;
                let d_o = d_out[first..].as_ptr();
                let (mut dk, mut dv, mut ds) = (
                    vec![T::zero(); nk * d],
                    vec![T::zero(); nk * d],
                    vec![T::zero(); rl * nk],
                );
                let mut dqr = vec![T::zero(); rl * d];
                // SAFETY: every operand lies in its buffer: p, dp, ds [rl, nk]; q, dqr [rl, d];
                // k, v, dk, dv [nk, d]; d_out's rows r0.. of head h at stride hd.
                unsafe {
                    // dV = Pᵀ·dO, dP = dO·Vᵀ
                    product(bf16, (nk, rl, d), dv.as_mut_ptr(), d, p.as_ptr(), (1, nk), d_o, (hd, 1))?;
                    product(bf16, (rl, d, nk), ds.as_mut_ptr(), nk, d_o, (hd, 1), v.as_ptr(), (1, d))?;
                }
                for (g, pr) in ds.chunks_mut(nk).zip(p.chunks(nk)) {
                    let dp = g.to_vec();
                    softmax_bwd_row(g, pr, &dp, scale);
                }
                // SAFETY: as above.
                unsafe {
                    // dQ = dS·K, dK = dSᵀ·Q (rotated)
                    product(
                        bf16,
                        (rl, nk, d),
                        dqr.as_mut_ptr(),
                        d,
                        ds.as_ptr(),
                        (nk, 1),
                        k.as_ptr(),
                        (d, 1),
                    )?;
                    product(
                        bf16,
                        (nk, rl, d),
                        dk.as_mut_ptr(),
                        d,
                        ds.as_ptr(),
                        (1, nk),
                        q.as_ptr(),
                        (d, 1),
                    )?;
                }
                for (i, g) in dqr.chunks(d).enumerate() {
                    let t = pc.b * self.l + r0 + i;
                    let (c, s) = (&self.cos[t * d..][..d], &self.sin[t * d..][..d]);
                    // SAFETY: row t of head h is this task's alone.
                    let y = unsafe { std::slice::from_raw_parts_mut(dqp.ptr().add(t * hd + h * d), d) };
                    rotate(y, g, c, s, true);
                }
                Ok((dk, dv))
            })
            .collect::<CResult<_>>()?;
        // each key/value head adds its tasks' gradients in task order (the same sums whatever
        // the threads), then the keys' rotation is undone
        let rep = a.n_heads / a.n_kv_heads;
        let per_head: Vec<(Vec<T>, Vec<T>)> = (0..a.n_kv_heads)
            .into_par_iter()
            .map(|g| {
                let (mut dk, mut dv) = (vec![T::zero(); rows * d], vec![T::zero(); rows * d]);
                for (t, (pk, pv)) in partial.iter().enumerate() {
                    let (h, pc) = (t % a.n_heads, &pieces[t / a.n_heads]);
                    if h / rep != g {
                        continue;
                    }
                    for ((kr, gk), gv) in pc.key_rows().zip(pk.chunks(d)).zip(pv.chunks(d)) {
                        let r = pc.b * self.l + kr;
                        dk[r * d..][..d].iter_mut().zip(gk).for_each(|(x, y)| *x += *y);
                        dv[r * d..][..d].iter_mut().zip(gv).for_each(|(x, y)| *x += *y);
                    }
                }
                (dk, dv)
            })
            .collect();
        let (mut dk, mut dv) = (vec![T::zero(); rows * kd], vec![T::zero(); rows * kd]);
        for (g, (gk, gv)) in per_head.iter().enumerate() {
            for r in 0..rows {
                let (c, s) = (&self.cos[r * d..][..d], &self.sin[r * d..][..d]);
                rotate(&mut dk[r * kd + g * d..][..d], &gk[r * d..][..d], c, s, true);
                dv[r * kd + g * d..][..d].copy_from_slice(&gv[r * d..][..d]);
            }
        }
        Ok([dq, dk, dv])
    }
}

/// `x` as f32 values; only for `T` = f32 (the bf16 paths check `T::DTYPE` first).
fn f32s<T: Elem>(x: &[T]) -> &[f32] {
    assert_eq!(
        T::DTYPE,
        DType::F32,
        "fused-attention: bf16 products of f32 values only"
    );
    // SAFETY: T is f32 (asserted): the same values.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) }
}

/// Runs `f` on the values of contiguous f32/f64 CPU tensors of type `T`.
fn with_slices<T: Elem, R>(ts: &[&Tensor], f: impl FnOnce(&[&[T]]) -> CResult<R>) -> CResult<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(st, l)| match &**st {
            candle_core::Storage::Cpu(s) => slice::<T>(s, l, "fused-attention"),
            _ => candle_core::bail!("fused-attention: CPU tensors only"),
        })
        .collect::<CResult<Vec<_>>>()?;
    f(&slices)
}

impl Attention {
    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// Runs `f` on the block's slices and pieces: `q`, `k`, `v` as given, the op's tables and
    /// masks from its tensors.
    fn on_block<T: Elem, R>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        f: impl FnOnce(&Block<T>, &[Piece<T>]) -> CResult<R>,
    ) -> CResult<R> {
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        if kvh == 0 || h % kvh != 0 || d % 2 != 0 || self.batch == 0 {
            candle_core::bail!("fused-attention: {h} heads over {kvh} key/value heads of {d}")
        }
        let l = q.len() / (self.batch * h * d);
        if q.len() != self.batch * l * h * d || k.len() != self.batch * l * kvh * d || v.len() != k.len() {
            candle_core::bail!(
                "fused-attention: q, k, v of {}, {}, {} values for {} rows of {h}, {kvh} heads of {d}",
                q.len(),
                k.len(),
                v.len(),
                self.batch
            )
        }
        if self.split.is_some() && self.batch != 1 {
            candle_core::bail!(
                "fused-attention: a block split into parts must be one row, not {}",
                self.batch
            );
        }
        let split: &[AttentionPart] = self.split.as_deref().map_or(&[], |v| v.as_slice());
        let mut tensors = vec![&self.cos, &self.sin, &self.mask];
        tensors.extend(split.iter().map(|p| &p.mask));
        with_slices::<T, R>(&tensors, |s| {
            let table = self.batch * l * d;
            if s[0].len() != table || s[1].len() != table {
                candle_core::bail!("fused-attention: rotary tables of {} values for {table}", s[0].len())
            }
            for (p, m) in split.iter().zip(&s[3..]) {
                let n = p.keys.iter().map(|k| k.1).sum::<usize>();
                if p.rows.0 + p.rows.1 > l || p.keys.iter().any(|k| k.0 + k.1 > l) || m.len() != p.rows.1 * n {
                    candle_core::bail!("fused-attention: a part {:?} does not fit {l} rows", p.rows)
                }
            }
            if split.is_empty() && s[2].len() != self.batch * l * l {
                candle_core::bail!(
                    "fused-attention: a mask of {} values for {} rows of {l}",
                    s[2].len(),
                    self.batch
                )
            }
            let whole = [(0, l)];
            let pieces = pieces(self, l, s[2], &s[3..], &whole);
            let block = Block {
                a: self,
                l,
                q,
                k,
                v,
                cos: s[0],
                sin: s[1],
            };
            f(&block, &pieces)
        })
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
    let op = "fused-attention";
    let (q, k, v) = (
        slice::<T>(s1, l1, op)?,
        slice::<T>(s2, l2, op)?,
        slice::<T>(s3, l3, op)?,
    );
    let y = a.on_block(q, k, v, |b, pieces| b.forward(pieces))?;
    out(y, l1.shape().clone())
}

fn attention_bwd<T: Elem>(
    a: &Attention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_out: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (q, k, v, d_out) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, d_out.contiguous()?);
    let [dq, dk, dv] = with_slices::<T, _>(&[&q, &k, &v, &d_out], |s| {
        if s[3].len() != s[0].len() {
            candle_core::bail!(
                "fused-attention: an output gradient of {} values for {}",
                s[3].len(),
                s[0].len()
            )
        }
        a.on_block(s[0], s[1], s[2], |b, pieces| b.backward(pieces, s[3]))
    })?;
    let dev = q.device();
    Ok((
        Some(Tensor::from_vec(dq, q.shape(), dev)?),
        Some(Tensor::from_vec(dk, k.shape(), dev)?),
        Some(Tensor::from_vec(dv, v.shape(), dev)?),
    ))
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
        match q.dtype() {
            DType::F32 => attention_bwd::<f32>(self, q, k, v, d_out),
            DType::F64 => attention_bwd::<f64>(self, q, k, v, d_out),
            d => candle_core::bail!("fused-attention: only f32 and f64 have a fused kernel, not {d:?}"),
        }
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
