//! Attention of new tokens over a key/value cache, for decoding (`model::llama::decode`): the
//! query heads that share one kv head, against that head's keys and values, which may lie in
//! several parts (a prompt's, shared by its samples, then the sample's own), in f32.
//!
//! Decoding computes a handful of these per sequence, layer and step, each a few thousand
//! multiply-adds: as tensor ops each would cost more in dispatch and copies (reshapes,
//! concatenations, a matmul per part) than in arithmetic, so it is one plain loop over the
//! cache instead, compiled three times (baseline, AVX2 + FMA, AVX-512) and chosen at run time
//! by [`CpuPath`].
//!
//! The layout serves the two things decoding does to a cache:
//! - **Appending** one position per step. Keys go to a short row-major tail (16 positions at
//!   most) and values to row-major rows, so an append writes a few contiguous cache lines. A
//!   key layout transposed over the whole cache wrote one line per coordinate at every step,
//!   each missing the cache (between two steps of one sequence every other sequence and layer
//!   is read).
//! - **Reading** it once per step for all the query heads of a kv head together (3 for
//!   SmolLM2, 4 to 7 for Llama, Mistral and Qwen2): each key and value is loaded once and used
//!   for every one of them. A full tail of 16 keys is transposed into a block (`[d][16]`), so a
//!   query's 16 scores are sums of whole vectors, without a horizontal sum per key.
//!
//! A query's scores and output are summed in the same order whatever queries and rows come
//! with it, so batched sampling draws what sampling prompt by prompt draws.

use super::cpu::CpuPath;

/// RoPE in the HF layout on one head's `x` (`d` values) at one position: `x·cos +
/// rotate_half(x)·sin` with `rotate_half([a, b]) = [-b, a]`, `cos` and `sin` that position's
/// `d` values (each half repeating the frequencies), as [`super::primitive::apply_rope`].
pub fn rope_head(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let h = x.len() / 2;
    for j in 0..h {
        let (a, b) = (x[j], x[j + h]);
        x[j] = a * cos[j] + -b * sin[j];
        x[j + h] = b * cos[j + h] + a * sin[j + h];
    }
}

/// Positions per block of transposed keys (one AVX-512 register of scores).
const BLOCK: usize = 16;

/// Query heads scored at once: their accumulators stay in registers.
const QUERIES: usize = 4;

/// One kv head's cached keys and values of one sequence part. Keys of whole blocks are
/// transposed (`blocks[(b·d + c)·BLOCK + j]` is coordinate c of position `b·BLOCK + j`), the
/// ones after them row-major in `tail`; values row-major `[len, d]`.
#[derive(Clone, Debug, Default)]
pub struct HeadCache {
    blocks: Vec<f32>,
    tail: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    d: usize,
}

impl HeadCache {
    pub fn new(d: usize) -> HeadCache {
        HeadCache {
            d,
            ..Default::default()
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The head size.
    pub fn d(&self) -> usize {
        self.d
    }

    /// Room for `positions` more positions without moving what is cached (a cache that grows
    /// by doubling copies itself again and again, each copy into memory not yet touched).
    pub fn reserve(&mut self, positions: usize) {
        let d = self.d;
        self.v.reserve(positions * d);
        self.tail.reserve(BLOCK * d);
        let blocks = (self.len + positions) / BLOCK * BLOCK * d;
        self.blocks.reserve(blocks.saturating_sub(self.blocks.len()));
    }

    /// Positions held in whole (transposed) blocks.
    fn in_blocks(&self) -> usize {
        self.len - self.tail.len() / self.d.max(1)
    }

    /// Appends one position's key (after RoPE) and value.
    pub fn push(&mut self, k: &[f32], v: &[f32]) {
        let d = self.d;
        self.tail.extend_from_slice(&k[..d]);
        self.v.extend_from_slice(&v[..d]);
        self.len += 1;
        if d > 0 && self.tail.len() == BLOCK * d {
            let at = self.blocks.len();
            self.blocks.resize(at + BLOCK * d, 0.0);
            for (j, key) in self.tail.chunks_exact(d).enumerate() {
                for (c, &x) in key.iter().enumerate() {
                    self.blocks[at + c * BLOCK + j] = x;
                }
            }
            self.tail.clear();
        }
    }

    /// The key of position `j`.
    fn key(&self, j: usize) -> Vec<f32> {
        let d = self.d;
        match j.checked_sub(self.in_blocks()) {
            Some(t) => self.tail[t * d..(t + 1) * d].to_vec(),
            None => {
                let (b, i) = (j / BLOCK, j % BLOCK);
                (0..d).map(|c| self.blocks[(b * d + c) * BLOCK + i]).collect()
            }
        }
    }

    /// `self` followed by `other`, as one part.
    pub fn joined(&self, other: &HeadCache) -> HeadCache {
        let mut out = HeadCache::new(self.d);
        for part in [self, other] {
            for j in 0..part.len {
                out.push(&part.key(j), &part.v[j * part.d..(j + 1) * part.d]);
            }
        }
        out
    }
}

/// `x·y + a`, fused where the path has FMA (a fused multiply-add without it is a library
/// call, far slower than the two operations).
#[inline(always)]
fn madd(fused: bool, x: f32, y: f32, a: f32) -> f32 {
    if fused {
        x.mul_add(y, a)
    } else {
        x * y + a
    }
}

/// Scores of the `Q` queries `q` (`Q` rows of `d`) against the first `n` positions of the key
/// blocks `blocks`: `s[i·stride + j]`. Two blocks at a time, so that `2·Q` sums are in flight.
#[inline(always)]
fn block_scores<const Q: usize>(
    fused: bool,
    q: &[f32],
    d: usize,
    blocks: &[f32],
    n: usize,
    s: &mut [f32],
    stride: usize,
) {
    let nb = n.div_ceil(BLOCK);
    let mut b = 0;
    while b < nb {
        let pair = b + 1 < nb;
        let k0 = blocks[b * d * BLOCK..(b + 1) * d * BLOCK].as_chunks::<BLOCK>().0;
        // a lone last block is scored twice, the copy dropped
        let k1 = match pair {
            true => blocks[(b + 1) * d * BLOCK..(b + 2) * d * BLOCK].as_chunks::<BLOCK>().0,
            false => k0,
        };
        let mut acc = [[[0f32; BLOCK]; 2]; Q];
        for (c, (x0, x1)) in k0.iter().zip(k1).enumerate() {
            for (i, acc) in acc.iter_mut().enumerate() {
                let qc = q[i * d + c];
                for l in 0..BLOCK {
                    acc[0][l] = madd(fused, qc, x0[l], acc[0][l]);
                    acc[1][l] = madd(fused, qc, x1[l], acc[1][l]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (h, acc) in acc.iter().enumerate().take(1 + pair as usize) {
                let j0 = (b + h) * BLOCK;
                let m = BLOCK.min(n - j0);
                s[i * stride + j0..i * stride + j0 + m].copy_from_slice(&acc[..m]);
            }
        }
        b += 1 + pair as usize;
    }
}

/// `a·b` in lanes of 16 (summed in order), then the rest.
#[inline(always)]
fn dot(fused: bool, a: &[f32], b: &[f32]) -> f32 {
    let (ac, ar) = a.as_chunks::<BLOCK>();
    let (bc, br) = b.as_chunks::<BLOCK>();
    let mut acc = [0f32; BLOCK];
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..BLOCK {
            acc[l] = madd(fused, x[l], y[l], acc[l]);
        }
    }
    let mut sum = acc.iter().fold(0.0, |s, &x| s + x);
    for (&x, &y) in ar.iter().zip(br) {
        sum = madd(fused, x, y, sum);
    }
    sum
}

/// Scores of the `Q` queries `q` against the first `n` row-major keys of `keys`.
#[inline(always)]
fn row_scores<const Q: usize>(fused: bool, q: &[f32], d: usize, keys: &[f32], n: usize, s: &mut [f32], stride: usize) {
    for (j, key) in keys.chunks_exact(d).take(n).enumerate() {
        for i in 0..Q {
            s[i * stride + j] = dot(fused, &q[i * d..(i + 1) * d], key);
        }
    }
}

/// `p = exp(s − max s) / Σ exp(s − max s)` in place, `s` first multiplied by `scale`.
#[inline(always)]
fn softmax_in_place(s: &mut [f32], scale: f32) {
    let mut m = f32::NEG_INFINITY;
    for x in s.iter_mut() {
        *x *= scale;
        // a select, not `max` (whose NaN rule keeps the loop scalar)
        m = if *x > m { *x } else { m };
    }
    let mut sum = 0.0;
    for x in s.iter_mut() {
        *x = super::exp_f32(*x - m);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in s.iter_mut() {
        *x *= inv;
    }
}

/// Columns of the outputs summed at once in registers.
const COLUMNS: usize = 64;

/// `out[i·d + c] += Σ_j p[i·stride + j] · v[j·d + c]` for the `Q` outputs, over the `n` value
/// rows of `v`: each value row is loaded once for all of them.
#[inline(always)]
fn weighted_rows<const Q: usize>(
    fused: bool,
    p: &[f32],
    stride: usize,
    v: &[f32],
    n: usize,
    d: usize,
    out: &mut [f32],
) {
    let mut c0 = 0;
    while c0 + COLUMNS <= d {
        let mut acc = [[0f32; COLUMNS]; Q];
        for j in 0..n {
            let Some(vj) = v[j * d + c0..].first_chunk::<COLUMNS>() else {
                break;
            };
            for (i, acc) in acc.iter_mut().enumerate() {
                let pj = p[i * stride + j];
                for l in 0..COLUMNS {
                    acc[l] = madd(fused, pj, vj[l], acc[l]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (o, a) in out[i * d + c0..i * d + c0 + COLUMNS].iter_mut().zip(acc) {
                *o += a;
            }
        }
        c0 += COLUMNS;
    }
    for i in 0..Q {
        for (j, vj) in v.chunks_exact(d).take(n).enumerate() {
            let pj = p[i * stride + j];
            for (o, &x) in out[i * d + c0..(i + 1) * d].iter_mut().zip(&vj[c0..]) {
                *o = madd(fused, pj, x, *o);
            }
        }
    }
}

/// The kernels that run one [`attend`]: the generic loops (fused multiply-adds or not), or
/// the AVX-512 ones.
#[derive(Clone, Copy)]
enum Loops {
    Plain {
        fused: bool,
    },
    #[cfg(target_arch = "x86_64")]
    Wide,
}

/// [`attend`] for `Q` queries.
///
/// # Safety
/// With [`Loops::Wide`] the CPU must have AVX-512 F.
#[inline(always)]
unsafe fn attend_queries<const Q: usize>(
    loops: Loops,
    q: &[f32],
    parts: &[(&HeadCache, usize)],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = out.len() / Q;
    let total: usize = parts.iter().map(|p| p.1).sum();
    scores.clear();
    scores.resize(Q * total, 0.0);
    let mut at = 0;
    for &(part, n) in parts {
        let whole = part.in_blocks().min(n);
        let (s, tail) = (&mut scores[at..], n - whole);
        match loops {
            Loops::Plain { fused } => {
                block_scores::<Q>(fused, q, d, &part.blocks, whole, s, total);
                row_scores::<Q>(fused, q, d, &part.tail, tail, &mut s[whole..], total);
            }
            #[cfg(target_arch = "x86_64")]
            Loops::Wide => {
                wide::block_scores::<Q>(q, d, &part.blocks, whole, s, total);
                wide::row_scores::<Q>(q, d, &part.tail, tail, &mut s[whole..], total);
            }
        }
        at += n;
    }
    for s in scores.chunks_exact_mut(total.max(1)) {
        match loops {
            Loops::Plain { .. } => softmax_in_place(s, scale),
            #[cfg(target_arch = "x86_64")]
            Loops::Wide => wide::softmax_in_place(s, scale),
        }
    }
    out.fill(0.0);
    let mut at = 0;
    for &(part, n) in parts {
        let (p, v) = (&scores[at..], &part.v[..n * d]);
        match loops {
            Loops::Plain { fused } => weighted_rows::<Q>(fused, p, total, v, n, d, out),
            #[cfg(target_arch = "x86_64")]
            Loops::Wide => wide::weighted_rows::<Q>(p, total, v, n, d, out),
        }
        at += n;
    }
}

/// [`attend`], [`QUERIES`] queries at a time.
///
/// # Safety
/// With [`Loops::Wide`] the CPU must have AVX-512 F.
#[inline(always)]
unsafe fn attend_imp(
    loops: Loops,
    q: &[f32],
    parts: &[(&HeadCache, usize)],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let Some(d) = parts.first().map(|p| p.0.d).filter(|&d| d > 0) else {
        return;
    };
    for (q, out) in q.chunks(QUERIES * d).zip(out.chunks_mut(QUERIES * d)) {
        match q.len() / d {
            1 => attend_queries::<1>(loops, q, parts, scale, scores, out),
            2 => attend_queries::<2>(loops, q, parts, scale, scores, out),
            3 => attend_queries::<3>(loops, q, parts, scale, scores, out),
            _ => attend_queries::<QUERIES>(loops, q, parts, scale, scores, out),
        }
    }
}

/// `out_i = softmax(scale · q_i·Kᵀ) · V` for each query head `q_i` of `q` (rows of `d`, all of
/// one kv head) over the first `seen` positions of each part `(cache, seen)` of `parts`, taken
/// in order as one sequence; `scores` is scratch space.
pub fn attend(q: &[f32], parts: &[(&HeadCache, usize)], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_on(CpuPath::active(), q, parts, scale, scores, out)
}

/// [`attend`] with the kernels of `path` (at most the CPU's): the generic loops on the
/// baseline, the same compiled for AVX2 + FMA, the AVX-512 ones. The sums are fused
/// multiply-adds from AVX2 on and are added in another order on AVX-512, so the three differ
/// in the last bits.
pub fn attend_on(
    path: CpuPath,
    q: &[f32],
    parts: &[(&HeadCache, usize)],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn v4(q: &[f32], parts: &[(&HeadCache, usize)], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
            attend_imp(Loops::Wide, q, parts, scale, scores, out)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v3(q: &[f32], parts: &[(&HeadCache, usize)], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
            attend_imp(Loops::Plain { fused: true }, q, parts, scale, scores, out)
        }
        let path = path.min(CpuPath::detected());
        if path >= CpuPath::Avx512 {
            // SAFETY: the CPU has AVX-512 F (and so AVX2 and FMA): the path is at most the detected one.
            return unsafe { v4(q, parts, scale, scores, out) };
        }
        if path >= CpuPath::Avx2 {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { v3(q, parts, scale, scores, out) };
        }
    }
    let _ = path;
    // SAFETY: the plain loops need nothing of the CPU.
    unsafe { attend_imp(Loops::Plain { fused: false }, q, parts, scale, scores, out) }
}

/// The AVX-512 loops of [`attend`]: the same sums as the generic ones, written with the
/// registers explicit (the compiler kept some of the generic ones' accumulators in memory).
#[cfg(target_arch = "x86_64")]
mod wide {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// The first `n` lanes (at most 16).
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n.min(16)) - 1) as __mmask16
    }

    /// [`super::block_scores`]: two blocks at a time, then a last one alone.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `blocks` holds `n.div_ceil(BLOCK)` blocks of `d`·BLOCK,
    /// `q` Q rows of `d`, `s` reaches `(Q - 1)·stride + n`.
    #[inline(always)]
    pub unsafe fn block_scores<const Q: usize>(
        q: &[f32],
        d: usize,
        blocks: &[f32],
        n: usize,
        s: &mut [f32],
        stride: usize,
    ) {
        let nb = n.div_ceil(BLOCK);
        assert!(blocks.len() >= nb * d * BLOCK && q.len() >= Q * d && (Q == 0 || s.len() >= (Q - 1) * stride + n));
        let (qp, sp) = (q.as_ptr(), s.as_mut_ptr());
        let store = |acc: __m512, i: usize, j0: usize| {
            _mm512_mask_storeu_ps(sp.add(i * stride + j0), lanes(n - j0), acc);
        };
        let mut b = 0;
        while b + 2 <= nb {
            let (k0, k1) = (
                blocks.as_ptr().add(b * d * BLOCK),
                blocks.as_ptr().add((b + 1) * d * BLOCK),
            );
            let mut a0 = [_mm512_setzero_ps(); Q];
            let mut a1 = [_mm512_setzero_ps(); Q];
            for c in 0..d {
                let (x0, x1) = (_mm512_loadu_ps(k0.add(c * BLOCK)), _mm512_loadu_ps(k1.add(c * BLOCK)));
                for i in 0..Q {
                    let qc = _mm512_set1_ps(*qp.add(i * d + c));
                    a0[i] = _mm512_fmadd_ps(qc, x0, a0[i]);
                    a1[i] = _mm512_fmadd_ps(qc, x1, a1[i]);
                }
            }
            for i in 0..Q {
                store(a0[i], i, b * BLOCK);
                store(a1[i], i, (b + 1) * BLOCK);
            }
            b += 2;
        }
        if b < nb {
            let k0 = blocks.as_ptr().add(b * d * BLOCK);
            let mut a0 = [_mm512_setzero_ps(); Q];
            for c in 0..d {
                let x0 = _mm512_loadu_ps(k0.add(c * BLOCK));
                for (i, a) in a0.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(i * d + c)), x0, *a);
                }
            }
            for (i, &a) in a0.iter().enumerate() {
                store(a, i, b * BLOCK);
            }
        }
    }

    /// [`super::row_scores`]: each key loaded once for the Q queries, 16 coordinates at a time
    /// (the last ones masked), the lanes added by `_mm512_reduce_add_ps`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `keys` holds `n` rows of `d`, `q` Q rows, `s` reaches
    /// `(Q - 1)·stride + n`.
    #[inline(always)]
    pub unsafe fn row_scores<const Q: usize>(
        q: &[f32],
        d: usize,
        keys: &[f32],
        n: usize,
        s: &mut [f32],
        stride: usize,
    ) {
        assert!(keys.len() >= n * d && q.len() >= Q * d && (Q == 0 || n == 0 || s.len() >= (Q - 1) * stride + n));
        let qp = q.as_ptr();
        for j in 0..n {
            let k = keys.as_ptr().add(j * d);
            let mut acc = [_mm512_setzero_ps(); Q];
            for c in (0..d).step_by(16) {
                let m = lanes(d - c);
                let x = _mm512_maskz_loadu_ps(m, k.add(c));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qp.add(i * d + c)), x, *a);
                }
            }
            for (i, &a) in acc.iter().enumerate() {
                s[i * stride + j] = _mm512_reduce_add_ps(a);
            }
        }
    }

    /// [`super::weighted_rows`]: 64 columns at a time in four registers per output, then 16
    /// (the last ones masked); each value row loaded once for the Q outputs.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `v` holds `n` rows of `d`, `out` Q rows, `p` reaches
    /// `(Q - 1)·stride + n`.
    #[inline(always)]
    pub unsafe fn weighted_rows<const Q: usize>(
        p: &[f32],
        stride: usize,
        v: &[f32],
        n: usize,
        d: usize,
        out: &mut [f32],
    ) {
        assert!(v.len() >= n * d && out.len() >= Q * d && (Q == 0 || n == 0 || p.len() >= (Q - 1) * stride + n));
        let (pp, op) = (p.as_ptr(), out.as_mut_ptr());
        let mut c0 = 0;
        while c0 + 64 <= d {
            let mut acc = [[_mm512_setzero_ps(); 4]; Q];
            for j in 0..n {
                let row = v.as_ptr().add(j * d + c0);
                let x: [__m512; 4] = std::array::from_fn(|t| _mm512_loadu_ps(row.add(16 * t)));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let pj = _mm512_set1_ps(*pp.add(i * stride + j));
                    for t in 0..4 {
                        acc[t] = _mm512_fmadd_ps(pj, x[t], acc[t]);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                for (t, &a) in acc.iter().enumerate() {
                    let o = op.add(i * d + c0 + 16 * t);
                    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), a));
                }
            }
            c0 += 64;
        }
        while c0 < d {
            let m = lanes(d - c0);
            let mut acc = [_mm512_setzero_ps(); Q];
            for j in 0..n {
                let x = _mm512_maskz_loadu_ps(m, v.as_ptr().add(j * d + c0));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*pp.add(i * stride + j)), x, *a);
                }
            }
            for (i, &a) in acc.iter().enumerate() {
                let o = op.add(i * d + c0);
                _mm512_mask_storeu_ps(o, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, o), a));
            }
            c0 += 16;
        }
    }

    /// [`super::super::exp_f32`] on 16 lanes, operation for operation (unfused, as the scalar
    /// one is compiled), so each lane is bit for bit the scalar result.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F.
    #[inline(always)]
    pub(super) unsafe fn exp16(x: __m512) -> __m512 {
        let set = _mm512_set1_ps;
        let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, set(-87.0));
        let x = _mm512_min_ps(_mm512_max_ps(x, set(-87.0)), set(88.0));
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_add_ps(
            _mm512_mul_ps(x, set(std::f32::consts::LOG2_E)),
            set(0.5),
        ));
        let r = _mm512_add_ps(
            _mm512_sub_ps(x, _mm512_mul_ps(k, set(0.693_359_4))),
            _mm512_mul_ps(k, set(2.121_944_4e-4)),
        );
        let mut p = set(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm512_add_ps(_mm512_mul_ps(p, r), set(c));
        }
        let y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), set(1.0));
        let two_k = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvttps_epi32(k),
            _mm512_set1_epi32(127),
        )));
        _mm512_maskz_mov_ps(!underflow, _mm512_mul_ps(y, two_k))
    }

    /// [`super::softmax_in_place`] 16 lanes at a time (the last ones masked).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F.
    #[inline(always)]
    pub unsafe fn softmax_in_place(s: &mut [f32], scale: f32) {
        let (n, sp) = (s.len(), s.as_mut_ptr());
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in (0..n).step_by(16) {
            let m = lanes(n - j);
            let x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sp.add(j)), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(sp.add(j), m, x);
            mx = _mm512_mask_max_ps(mx, m, mx, x);
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let mut sum = _mm512_setzero_ps();
        for j in (0..n).step_by(16) {
            let m = lanes(n - j);
            let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sp.add(j)), mx));
            _mm512_mask_storeu_ps(sp.add(j), m, e);
            sum = _mm512_mask_add_ps(sum, m, sum, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for j in (0..n).step_by(16) {
            let m = lanes(n - j);
            _mm512_mask_storeu_ps(sp.add(j), m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sp.add(j)), inv));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the formula in f64 on seeded values, on every kernel path the CPU has: up to 7
    /// query heads of one kv head (scored four at a time, then three), over a cache split in
    /// two parts at every point (the split must not matter; each part has whole blocks and a
    /// tail, or only a tail), with a position past the ones seen, head sizes past the columns
    /// kept in registers and not a multiple of 16. Each query's output is also bit for bit
    /// what it gives alone (batched sampling draws what one-by-one sampling draws).
    #[test]
    fn attend_is_softmax_weighted_values_whatever_the_split_and_the_path() {
        // a seeded LCG, uniform in [-2, 2)
        let mut state = 3u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f64 / (1u64 << 24) as f64) * 4.0 - 2.0
        };
        let mut paths_run = Vec::new();
        for path in CpuPath::supported().into_iter().filter(|p| *p <= CpuPath::Avx512) {
            paths_run.push(path.name());
            for (d, t, nq) in [(8usize, 40usize, 1usize), (13, 37, 2), (64, 40, 3), (80, 35, 7)] {
                let q: Vec<f32> = (0..nq * d).map(|_| next() as f32).collect();
                let k: Vec<f32> = (0..t * d).map(|_| next() as f32).collect();
                let v: Vec<f32> = (0..t * d).map(|_| next() as f32).collect();
                let scale = 1.0 / (d as f64).sqrt();
                let want: Vec<Vec<f64>> = (0..nq)
                    .map(|i| {
                        let qi = &q[i * d..(i + 1) * d];
                        let s: Vec<f64> = (0..t)
                            .map(|j| (0..d).map(|c| qi[c] as f64 * k[j * d + c] as f64).sum::<f64>() * scale)
                            .collect();
                        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                        (0..d)
                            .map(|c| (0..t).map(|j| (s[j] - m).exp() / z * v[j * d + c] as f64).sum())
                            .collect()
                    })
                    .collect();
                for split in 0..=t {
                    let (mut a, mut b) = (HeadCache::new(d), HeadCache::new(d));
                    for j in 0..t {
                        let part = if j < split { &mut a } else { &mut b };
                        part.push(&k[j * d..(j + 1) * d], &v[j * d..(j + 1) * d]);
                    }
                    // one more position in the second part, not seen
                    b.push(&q[..d], &q[..d]);
                    let parts = [(&a, a.len()), (&b, b.len() - 1)];
                    let mut out = vec![0f32; nq * d];
                    attend_on(path, &q, &parts, scale as f32, &mut Vec::new(), &mut out);
                    for (i, want) in want.iter().enumerate() {
                        for (c, w) in want.iter().enumerate() {
                            let got = out[i * d + c] as f64;
                            assert!(
                                (got - w).abs() < 1e-5,
                                "{} d {d} split {split} query {i} [{c}]: {got} vs {w}",
                                path.name()
                            );
                        }
                        let mut alone = vec![0f32; d];
                        attend_on(
                            path,
                            &q[i * d..(i + 1) * d],
                            &parts,
                            scale as f32,
                            &mut Vec::new(),
                            &mut alone,
                        );
                        assert_eq!(alone, out[i * d..(i + 1) * d], "{} d {d} query {i} alone", path.name());
                    }
                    let joined = a.joined(&b);
                    assert_eq!(joined.len(), t + 1);
                    for j in 0..=t {
                        let key = if j < t { &k[j * d..(j + 1) * d] } else { &q[..d] };
                        assert_eq!(joined.key(j), key, "d {d} split {split}: key {j} of the joined cache");
                    }
                }
            }
        }
        eprintln!("cached attention: kernel paths run: {}", paths_run.join(", "));
        assert!(paths_run.contains(&"portable"));
    }

    /// The AVX-512 exponential is the scalar one, bit for bit, from underflow to saturation.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn wide_exp_is_the_scalar_exp_bit_for_bit() {
        use std::arch::x86_64::*;
        if CpuPath::detected() < CpuPath::Avx512 {
            eprintln!("no AVX-512 here: the wide exponential was not run");
            return;
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn exp(x: &[f32; 16]) -> [f32; 16] {
            let mut y = [0f32; 16];
            _mm512_storeu_ps(y.as_mut_ptr(), wide::exp16(_mm512_loadu_ps(x.as_ptr())));
            y
        }
        for i in 0..20_000 {
            let x: [f32; 16] = std::array::from_fn(|l| -100.0 + (i * 16 + l) as f32 * (200.0 / 320_000.0));
            // SAFETY: the CPU has AVX-512 F (checked above).
            let y = unsafe { exp(&x) };
            for (x, y) in x.iter().zip(y) {
                assert_eq!(y.to_bits(), super::super::exp_f32(*x).to_bits(), "exp({x})");
            }
        }
    }

    #[test]
    fn rope_head_rotates_each_pair_by_its_angle() {
        // d = 4: pairs (x0, x2) and (x1, x3), angles a0 and a1
        let (a0, a1) = (0.3f64, -1.1f64);
        let cos = [a0.cos(), a1.cos(), a0.cos(), a1.cos()].map(|x| x as f32);
        let sin = [a0.sin(), a1.sin(), a0.sin(), a1.sin()].map(|x| x as f32);
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        rope_head(&mut x, &cos, &sin);
        let rot = |a: f64, u: f64, w: f64| (u * a.cos() - w * a.sin(), w * a.cos() + u * a.sin());
        let (p0, p2) = rot(a0, 1.0, 3.0);
        let (p1, p3) = rot(a1, 2.0, 4.0);
        for (got, want) in x.iter().zip([p0, p1, p2, p3]) {
            assert!((*got as f64 - want).abs() < 1e-6, "{x:?}");
        }
    }
}
