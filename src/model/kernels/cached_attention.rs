//! Attention of one new token over a key/value cache, for decoding (`model::llama::decode`):
//! one query head against the keys and values of its kv head, which may lie in several parts
//! (a prompt's, shared by its samples, then the sample's own), in f32.
//!
//! Decoding computes a handful of these per sequence, layer and step, each a few thousand
//! multiply-adds: as tensor ops each would cost more in dispatch and copies (reshapes,
//! concatenations, a matmul per part) than in arithmetic, so it is one plain loop over the
//! cache instead, compiled for AVX2 where the CPU has it.

use super::*;

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

/// One kv head's cached keys and values of one sequence part: keys transposed (`kt[c·cap + j]`
/// is coordinate c of key j, so that a query's scores are sums of whole rows, without a
/// horizontal sum per key), values row-major `[len, d]`.
#[derive(Clone, Debug, Default)]
pub struct HeadCache {
    kt: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    cap: usize,
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

    /// Appends one position's key (after RoPE) and value.
    pub fn push(&mut self, k: &[f32], v: &[f32]) {
        let d = self.d;
        if self.len == self.cap {
            let cap = (2 * self.cap).max(16);
            let mut kt = vec![0f32; d * cap];
            for c in 0..d {
                kt[c * cap..c * cap + self.len].copy_from_slice(&self.kt[c * self.cap..c * self.cap + self.len]);
            }
            self.kt = kt;
            self.cap = cap;
        }
        for (c, &x) in k.iter().enumerate() {
            self.kt[c * self.cap + self.len] = x;
        }
        self.v.extend_from_slice(v);
        self.len += 1;
    }

    /// `self` followed by `other`, as one part.
    pub fn joined(&self, other: &HeadCache) -> HeadCache {
        let mut out = HeadCache::new(self.d);
        for part in [self, other] {
            for j in 0..part.len {
                let k: Vec<f32> = (0..part.d).map(|c| part.kt[c * part.cap + j]).collect();
                out.push(&k, &part.v[j * part.d..(j + 1) * part.d]);
            }
        }
        out
    }
}

multiversioned! {
    /// `s[j] = Σ_c q[c] · kt[c·cap + j]` for `j < s.len()`: a query against transposed keys,
    /// 32 keys at a time summed in registers over the whole of `q`.
    fn dots_t<T>(q: &[T], kt: &[T], cap: usize, s: &mut [T]) {
        const B: usize = 32;
        let n = s.len();
        let mut j0 = 0;
        while j0 + B <= n {
            let mut acc = [T::zero(); B];
            for (c, &qc) in q.iter().enumerate() {
                for (a, &k) in acc.iter_mut().zip(&kt[c * cap + j0..c * cap + j0 + B]) {
                    *a += qc * k;
                }
            }
            s[j0..j0 + B].copy_from_slice(&acc);
            j0 += B;
        }
        s[j0..].fill(T::zero());
        for (c, &qc) in q.iter().enumerate() {
            for (sj, &k) in s[j0..].iter_mut().zip(&kt[c * cap + j0..c * cap + n]) {
                *sj += qc * k;
            }
        }
    }
}

multiversioned! {
    /// `out[c] += Σ_j p_j · v[j·d + c]`, 64 columns at a time in registers.
    fn weighted_rows<T>(p: &[T], v: &[T], out: &mut [T]) {
        let d = out.len();
        let mut c0 = 0;
        while c0 + 64 <= d {
            let mut acc = [T::zero(); 64];
            for (&pj, vj) in p.iter().zip(v.chunks_exact(d)) {
                for (a, &x) in acc.iter_mut().zip(&vj[c0..c0 + 64]) {
                    *a += pj * x;
                }
            }
            for (o, a) in out[c0..c0 + 64].iter_mut().zip(acc) {
                *o += a;
            }
            c0 += 64;
        }
        for (&pj, vj) in p.iter().zip(v.chunks_exact(d)) {
            for (o, &x) in out[c0..].iter_mut().zip(&vj[c0..]) {
                *o += pj * x;
            }
        }
    }
}

multiversioned! {
    /// `p = exp(s − max s) / Σ exp(s − max s)` in place, `s` first multiplied by `scale`.
    fn softmax_in_place<T>(s: &mut [T], scale: T) {
        let mut m = T::neg_infinity();
        for x in s.iter_mut() {
            *x *= scale;
            // a select, not `max` (whose NaN rule keeps the loop scalar)
            m = if *x > m { *x } else { m };
        }
        let mut sum = T::zero();
        for x in s.iter_mut() {
            *x = (*x - m).exp_fast();
            sum += *x;
        }
        let inv = T::one() / sum;
        for x in s.iter_mut() {
            *x *= inv;
        }
    }
}

/// `out = softmax(scale · q·Kᵀ) · V` for one query head `q` (`d` values) over the first
/// `seen[i]` positions of each part `parts[i]`, taken in order as one sequence; `scores` is
/// scratch space.
pub fn attend(q: &[f32], parts: &[(&HeadCache, usize)], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    let total: usize = parts.iter().map(|p| p.1).sum();
    scores.clear();
    scores.resize(total, 0.0);
    let mut at = 0;
    for &(part, n) in parts {
        dots_t(q, &part.kt, part.cap, &mut scores[at..at + n]);
        at += n;
    }
    softmax_in_place(&mut scores[..], scale);
    out.fill(0.0);
    let mut at = 0;
    for &(part, n) in parts {
        weighted_rows(&scores[at..at + n], &part.v[..n * part.d], out);
        at += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the formula in f64 on seeded values, over a cache split in two parts at every
    /// point (the split must not matter), grown past its capacity, with a position past the
    /// ones seen, and head sizes past the 64 columns kept in registers.
    #[test]
    fn attend_is_softmax_weighted_values_whatever_the_split() {
        // a seeded LCG, uniform in [-2, 2)
        let mut state = 3u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f64 / (1u64 << 24) as f64) * 4.0 - 2.0
        };
        for d in [8usize, 13, 64, 80] {
            let t = 40;
            let q: Vec<f32> = (0..d).map(|_| next() as f32).collect();
            let k: Vec<f32> = (0..t * d).map(|_| next() as f32).collect();
            let v: Vec<f32> = (0..t * d).map(|_| next() as f32).collect();
            let scale = 1.0 / (d as f64).sqrt();
            let s: Vec<f64> = (0..t)
                .map(|j| (0..d).map(|c| q[c] as f64 * k[j * d + c] as f64).sum::<f64>() * scale)
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            let want: Vec<f64> = (0..d)
                .map(|c| (0..t).map(|j| (s[j] - m).exp() / z * v[j * d + c] as f64).sum())
                .collect();
            for split in 0..=t {
                let (mut a, mut b) = (HeadCache::new(d), HeadCache::new(d));
                for j in 0..t {
                    let part = if j < split { &mut a } else { &mut b };
                    part.push(&k[j * d..(j + 1) * d], &v[j * d..(j + 1) * d]);
                }
                // one more position in the second part, not seen
                b.push(&q, &q);
                let mut out = vec![0f32; d];
                attend(
                    &q,
                    &[(&a, a.len()), (&b, b.len() - 1)],
                    scale as f32,
                    &mut Vec::new(),
                    &mut out,
                );
                assert_eq!(a.joined(&b).len(), t + 1);
                for (a, b) in out.iter().zip(&want) {
                    assert!((*a as f64 - b).abs() < 1e-5, "d {d} split {split}: {a} vs {b}");
                }
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
