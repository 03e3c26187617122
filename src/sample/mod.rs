//! Sampling completions from a model: each prompt is computed once and its cache shared by its
//! `num_generations` samples ([`crate::model::llama::decode`]), every sample draws from its own
//! seeded generator (so a run, batched or not, resumed or not, draws the same tokens), and the
//! log-prob of every chosen token at the sampling temperature comes back with it.
//!
//! The logits processors run in Hugging Face `generate`'s order: repetition penalty,
//! temperature, top-k, top-p, min-p; `temperature = 0` is greedy. The reported log-prob of a
//! token is `log softmax(logits / T)` of the model's own logits (no penalty, no truncation): the
//! quantity a trainer recomputes for the same token, so the two can be compared.

use crate::error::{Error, Result};
use crate::model::Transformer;
use crate::util::Rng;
use candle_core::Tensor;
use rayon::prelude::*;

/// How tokens are drawn (TRL's / transformers' names and defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = none).
    pub min_p: f64,
    /// Divide positive logits (multiply negative ones) of tokens already in the prompt or the
    /// completion by this (1 = none), as transformers does.
    pub repetition_penalty: f64,
    /// Tokens generated at most per completion.
    pub max_completion_length: usize,
    /// Tokens that end a completion (included in it, like EOS in training data).
    pub stop_tokens: Vec<u32>,
    /// Decode in bf16 ([`Transformer::with_bf16_matrices`]): the weight matrices read as bf16
    /// (half the bytes per token), on AMX or AMD's AVX512-BF16 with bf16 activations too; samples the bf16 model.
    pub bf16_weights: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            max_completion_length: 256,
            stop_tokens: Vec::new(),
            bf16_weights: false,
        }
    }
}

/// Why a completion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token (EOS) or a stop string.
    Stop,
    /// `max_completion_length` tokens.
    Length,
}

/// One sampled completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub prompt_index: usize,
    /// Which of the prompt's `num_generations` samples.
    pub sample_index: usize,
    pub ids: Vec<u32>,
    /// `log softmax(logits / T)` of each chosen token (T = 1 when greedy).
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// The generator of sample `sample` of prompt `prompt` in a run seeded with `seed`.
pub fn sample_rng(seed: u64, prompt: usize, sample: usize) -> Rng {
    let mut h = crate::util::Fnv64::default();
    for x in [seed, prompt as u64, sample as u64] {
        h.update(&x.to_le_bytes());
    }
    Rng::new(h.finish())
}

/// `log softmax(logits / t)[token]` in f64.
fn logprob_at(logits: &[f32], t: f64, token: usize) -> f64 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = logits.iter().map(|&x| ((x as f64 - m) / t).exp()).sum::<f64>().ln();
    (logits[token] as f64 - m) / t - lse
}

/// transformers' repetition penalty: once per distinct token of `history`, however often it
/// occurred (its gather/scatter), positive logits divided by `penalty`, negative ones multiplied.
fn penalise<T: num_traits::Float>(z: &mut [T], history: &[u32], penalty: f64) {
    let penalty = T::from(penalty).unwrap_or_else(T::one);
    let mut seen = vec![false; z.len()];
    for &t in history {
        if let (Some(x), Some(s)) = (z.get_mut(t as usize), seen.get_mut(t as usize)) {
            if !*s {
                *s = true;
                *x = if *x > T::zero() { *x / penalty } else { *x * penalty };
            }
        }
    }
}

/// Tokens per block of the uncut draw's sums: the draw finds the block, then the token in it.
const DRAW_BLOCK: usize = 256;

/// The draw without a cut (TRL's defaults), as torch's softmax and multinomial take it: in f32,
/// `logits / T` and their exponentials after the maximum (the vectorised `exp_f32`, within 2 ulp),
/// summed in f64 per block of [`DRAW_BLOCK`] tokens; then the token at `u · total` of the
/// cumulative weights in vocabulary order. The log-prob is `(x − max) − ln total` from the same
/// sums (without a repetition penalty, which the weights carry and the log-prob does not).
fn uncut_draw(logits: &[f32], history: &[u32], p: &SamplingParams, rng: &mut Rng) -> (u32, f32) {
    let t = p.temperature as f32;
    let mut w: Vec<f32> = logits.to_vec();
    if p.repetition_penalty != 1.0 {
        penalise(&mut w, history, p.repetition_penalty);
    }
    for x in w.iter_mut() {
        *x /= t;
    }
    let (m, sums) = exp_weights(&mut w);
    let total: f64 = sums.iter().sum();
    let mut u = rng.uniform() * total;
    // the last token with a weight in `w[from..to]`: where rounding leaves `u` past the last one
    let last = |from: usize, to: usize| from + w[from..to].iter().rposition(|&x| x > 0.0).unwrap_or(0);
    let mut token = None;
    for (b, &s) in sums.iter().enumerate() {
        if u < s {
            let block = &w[b * DRAW_BLOCK..((b + 1) * DRAW_BLOCK).min(w.len())];
            let mut at = None;
            for (i, &x) in block.iter().enumerate() {
                if u < x as f64 {
                    at = Some(b * DRAW_BLOCK + i);
                    break;
                }
                u -= x as f64;
            }
            token = Some(at.unwrap_or_else(|| last(b * DRAW_BLOCK, b * DRAW_BLOCK + block.len())));
            break;
        }
        u -= s;
    }
    let token = token.unwrap_or_else(|| last(0, w.len()));
    let logprob = match p.repetition_penalty == 1.0 {
        true => (logits[token] / t - m) as f64 - total.ln(),
        false => logprob_at(logits, p.temperature, token),
    };
    (token as u32, logprob as f32)
}

/// `x ← exp(x − max x)` in place, returning the maximum and the weights' sums per block of
/// [`DRAW_BLOCK`] in f64 (sixteen running sums per block, added in one order on every CPU path,
/// so every path draws the same tokens).
fn exp_weights(x: &mut [f32]) -> (f32, Vec<f64>) {
    #[inline(always)]
    fn imp(x: &mut [f32]) -> (f32, Vec<f64>) {
        let mut mx = [f32::NEG_INFINITY; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for (m, &v) in mx.iter_mut().zip(c) {
                *m = m.max(v);
            }
        }
        let mut m = f32::NEG_INFINITY;
        for &v in chunks.remainder().iter().chain(&mx) {
            m = m.max(v);
        }
        // plain loops: a closure would be compiled without the caller's target features
        let mut sums = Vec::with_capacity(x.len().div_ceil(DRAW_BLOCK));
        for block in x.chunks_mut(DRAW_BLOCK) {
            let mut acc = [0f64; 16];
            let mut chunks = block.chunks_exact_mut(16);
            for c in &mut chunks {
                for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                    *v = crate::model::kernels::exp_f32(*v - m);
                    *a += *v as f64;
                }
            }
            for (a, v) in acc.iter_mut().zip(chunks.into_remainder()) {
                *v = crate::model::kernels::exp_f32(*v - m);
                *a += *v as f64;
            }
            let mut sum = 0.0;
            for a in acc {
                sum += a;
            }
            sums.push(sum);
        }
        (m, sums)
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn v4(x: &mut [f32]) -> (f32, Vec<f64>) {
            imp(x)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v3(x: &mut [f32]) -> (f32, Vec<f64>) {
            imp(x)
        }
        use crate::model::kernels::CpuPath;
        if CpuPath::Avx512.allows() {
            // SAFETY: the CPU has AVX-512 F, AVX2 and FMA.
            return unsafe { v4(x) };
        }
        if CpuPath::Avx2.allows() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { v3(x) };
        }
    }
    imp(x)
}

/// Draw the next token from one row of logits, given the tokens so far (prompt and completion,
/// for the repetition penalty). Returns the token and its log-prob at the sampling temperature.
pub fn sample_token(logits: &[f32], history: &[u32], p: &SamplingParams, rng: &mut Rng) -> (u32, f32) {
    let greedy = p.temperature <= 0.0;
    let report_t = if greedy { 1.0 } else { p.temperature };
    if !greedy && p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
        return uncut_draw(logits, history, p, rng);
    }
    let mut z: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    if p.repetition_penalty != 1.0 {
        penalise(&mut z, history, p.repetition_penalty);
    }
    if greedy {
        let best = (0..z.len())
            .max_by(|&a, &b| z[a].total_cmp(&z[b]).then(b.cmp(&a)))
            .unwrap_or(0);
        return (best as u32, logprob_at(logits, report_t, best) as f32);
    }
    for x in z.iter_mut() {
        *x /= p.temperature;
    }
    // candidates, most likely first where a cut needs an order
    let mut keep: Vec<usize> = (0..z.len()).collect();
    if p.top_k > 0 && p.top_k < keep.len() {
        keep.select_nth_unstable_by(p.top_k - 1, |&a, &b| z[b].total_cmp(&z[a]));
        keep.truncate(p.top_k);
    }
    let m = keep.iter().map(|&i| z[i]).fold(f64::NEG_INFINITY, f64::max);
    let mut w: Vec<(usize, f64)> = keep.iter().map(|&i| (i, (z[i] - m).exp())).collect();
    if p.top_p < 1.0 {
        w.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = w.iter().map(|x| x.1).sum();
        let mut acc = 0.0;
        let mut n = 0;
        for (_, x) in &w {
            acc += x / total;
            n += 1;
            if acc >= p.top_p {
                break;
            }
        }
        w.truncate(n.max(1));
    }
    if p.min_p > 0.0 {
        // the most likely token has weight 1 after the shift by the maximum
        w.retain(|x| x.1 >= p.min_p);
    }
    let total: f64 = w.iter().map(|x| x.1).sum();
    let mut u = rng.uniform() * total;
    let mut token = w.last().map(|x| x.0).unwrap_or(0);
    for &(i, x) in &w {
        if u < x {
            token = i;
            break;
        }
        u -= x;
    }
    (token as u32, logprob_at(logits, report_t, token) as f32)
}

/// One prompt's samples while they are drawn.
struct Group {
    /// One cache per model of the mixture; `None` while lent to a decoding step.
    caches: Vec<Option<crate::model::llama::GroupCache>>,
    /// Each sample's logits for its next token.
    rows: Vec<Vec<f32>>,
    rngs: Vec<Rng>,
    history: Vec<Vec<u32>>,
    done: Vec<Option<FinishReason>>,
    comps: Vec<Completion>,
}

/// `num_generations` completions of every prompt: prompt after prompt, sample after sample.
/// Each prompt is computed once; then every step draws one token for each running sample and
/// computes the next logits of all running prompts' samples in one pass (finished prompts drop
/// out). `stop(completion ids)` may end a completion early (stop strings); `progress(tokens)`
/// is told how many tokens each step drew.
pub fn sample(
    model: &Transformer,
    prompts: &[Vec<u32>],
    num_generations: usize,
    params: &SamplingParams,
    seed: u64,
    stop: &(dyn Fn(&[u32]) -> bool + Sync),
    progress: &mut (dyn FnMut(usize) + Send),
) -> Result<Vec<Completion>> {
    sample_mixture(&[(model, 1.0)], prompts, num_generations, params, seed, stop, progress)
}

/// [`sample`] from the geometric mixture of several models: the next token is drawn from
/// `log softmax(Σ_m w_m · logits_m)` (Nash-MD's `softmax(α·ref_logits + (1−α)·policy_logits)`
/// with `[(policy, 1 − α), (reference, α)]`), every model keeping its own KV cache, so each
/// step costs one cached decoding step per model instead of TRL's full recompute. With one
/// model of weight 1 the rows are its raw logits (plain sampling).
pub fn sample_mixture(
    models: &[(&Transformer, f64)],
    prompts: &[Vec<u32>],
    num_generations: usize,
    params: &SamplingParams,
    seed: u64,
    stop: &(dyn Fn(&[u32]) -> bool + Sync),
    progress: &mut (dyn FnMut(usize) + Send),
) -> Result<Vec<Completion>> {
    // on a worker of the thread pool, the others kept awake: each decoding step runs a few
    // hundred parallel regions, and one started from outside the pool waits for the pool to
    // wake it when it ends (75 µs a region measured on a 2-vCPU Xeon, against 13 µs for a whole
    // small product inside it); a worker asleep between two regions must be woken too
    crate::util::with_workers_awake(|| -> Result<Vec<Completion>> {
        if models.is_empty() {
            return Err(Error::msg("sampling needs a model"));
        }
        let weights: Vec<f64> = models.iter().map(|m| m.1).collect();
        // layers kept compact (a quantised LoRA base, a compact reference) are widened once for
        // the whole generation, not at every token
        let models: Vec<Transformer> = models
            .iter()
            .map(|(m, _)| match params.bf16_weights {
                true => m.detached()?.with_bf16_matrices(),
                false => m.detached()?.widened(),
            })
            .collect::<Result<_>>()?;
        let g = num_generations;
        let max = models
            .iter()
            .map(|m| m.cfg.max_position_embeddings)
            .filter(|&m| m > 0)
            .min()
            .unwrap_or(0);
        let mut groups = Vec::with_capacity(prompts.len());
        for (pi, prompt) in prompts.iter().enumerate() {
            if prompt.is_empty() {
                return Err(Error::msg(format!("prompt {pi} is empty: nothing to sample from")));
            }
            if max > 0 && prompt.len() + params.max_completion_length > max {
                return Err(Error::msg(format!(
                    "prompt {pi}: {} tokens + max_completion_length {} exceed the model's context of {max}",
                    prompt.len(),
                    params.max_completion_length
                )));
            }
            let comps: Vec<Completion> = (0..g)
                .map(|s| Completion {
                    prompt_index: pi,
                    sample_index: s,
                    ids: Vec::new(),
                    logprobs: Vec::new(),
                    finish_reason: FinishReason::Length,
                })
                .collect();
            if params.max_completion_length == 0 {
                groups.push(Group {
                    caches: vec![],
                    rows: vec![],
                    rngs: vec![],
                    history: vec![],
                    done: vec![Some(FinishReason::Length); g],
                    comps,
                });
                continue;
            }
            let (mut firsts, mut caches) = (Vec::new(), Vec::new());
            for m in &models {
                let (first, cache) = m.prefill(prompt)?;
                firsts.push(first.to_vec1::<f32>()?);
                let mut cache = cache.fork(g)?;
                cache.reserve(params.max_completion_length);
                caches.push(Some(cache));
            }
            let first = mix_rows(&firsts.iter().map(Vec::as_slice).collect::<Vec<_>>(), &weights);
            groups.push(Group {
                caches,
                rows: vec![first; g],
                rngs: (0..g).map(|s| sample_rng(seed, pi, s)).collect(),
                history: vec![prompt.to_vec(); g],
                done: vec![None; g],
                comps,
            });
        }
        for step in 0..params.max_completion_length {
            let (mut running, mut next_tokens) = (Vec::new(), Vec::new());
            let mut fresh = 0;
            // every running group's samples draw in parallel (each from its own RNG)
            let draws: Vec<Vec<(u32, f32)>> = groups
                .par_iter_mut()
                .map(|grp| match grp.done.iter().all(Option::is_some) {
                    true => Vec::new(),
                    false => grp
                        .rows
                        .par_iter()
                        .zip(grp.history.par_iter())
                        .zip(grp.rngs.par_iter_mut())
                        .map(|((row, history), rng)| sample_token(row, history, params, rng))
                        .collect(),
                })
                .collect();
            for ((gi, grp), draws) in groups.iter_mut().enumerate().zip(draws) {
                if grp.done.iter().all(Option::is_some) {
                    continue;
                }
                let mut next = Vec::with_capacity(g);
                for (s, (tok, lp)) in draws.into_iter().enumerate() {
                    next.push(tok);
                    if grp.done[s].is_some() {
                        continue;
                    }
                    fresh += 1;
                    let c = &mut grp.comps[s];
                    c.ids.push(tok);
                    c.logprobs.push(lp);
                    grp.history[s].push(tok);
                    if params.stop_tokens.contains(&tok) || stop(&c.ids) {
                        grp.done[s] = Some(FinishReason::Stop);
                    } else if c.ids.len() == params.max_completion_length {
                        grp.done[s] = Some(FinishReason::Length);
                    }
                }
                if !grp.done.iter().all(Option::is_some) {
                    running.push(gi);
                    next_tokens.push(next);
                }
            }
            progress(fresh);
            if running.is_empty() || step + 1 == params.max_completion_length {
                break;
            }
            // a finished sample's later tokens are computed with its group and dropped
            let refs: Vec<&[u32]> = next_tokens.iter().map(Vec::as_slice).collect();
            // per model, per running group: the next logits [g][V]
            let mut per_model: Vec<Vec<Vec<Vec<f32>>>> = Vec::with_capacity(models.len());
            for (mi, m) in models.iter().enumerate() {
                let mut caches: Vec<_> = running
                    .iter()
                    .map(|&gi| groups[gi].caches[mi].take().expect("a running group has its caches"))
                    .collect();
                let logits = m.decode_many(&mut caches, &refs)?;
                let mut rows = Vec::with_capacity(running.len());
                for ((&gi, cache), l) in running.iter().zip(caches).zip(logits) {
                    groups[gi].caches[mi] = Some(cache);
                    rows.push(l.to_vec2::<f32>()?);
                }
                per_model.push(rows);
            }
            for (k, &gi) in running.iter().enumerate() {
                groups[gi].rows = match per_model.len() {
                    1 => std::mem::take(&mut per_model[0][k]),
                    _ => (0..g)
                        .map(|s| {
                            let rows: Vec<&[f32]> = per_model.iter().map(|m| m[k][s].as_slice()).collect();
                            mix_rows(&rows, &weights)
                        })
                        .collect(),
                };
            }
        }
        Ok(groups
            .into_iter()
            .flat_map(|grp| {
                grp.comps.into_iter().zip(grp.done).map(|(mut c, d)| {
                    c.finish_reason = d.unwrap_or(FinishReason::Length);
                    c
                })
            })
            .collect())
    })
}

/// `log softmax(Σ_m w_m · rows_m)`, or the one row as it is.
fn mix_rows(rows: &[&[f32]], weights: &[f64]) -> Vec<f32> {
    if rows.len() == 1 {
        return rows[0].to_vec();
    }
    let v = rows[0].len();
    let z: Vec<f64> = (0..v)
        .map(|i| rows.iter().zip(weights).map(|(r, w)| w * r[i] as f64).sum())
        .collect();
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    z.iter().map(|x| (x - lse) as f32).collect()
}

/// The logits `[V]` that follow `ids` by a full forward pass (no cache): the reference the
/// cached decoding is tested against.
pub fn full_forward_logits(model: &Transformer, ids: &[u32]) -> Result<Tensor> {
    let dev = model.device();
    let t = ids.len();
    let input = Tensor::new(ids, dev)?.unsqueeze(0)?;
    let attn = crate::model::AttentionInputs::padded(&model.cfg, &[vec![true; t]], model.dtype(), dev)?;
    let hidden = model.hidden_states(&input, &attn)?;
    let last = hidden.narrow(1, t - 1, 1)?.reshape((1, model.cfg.hidden_size))?;
    Ok(model.logits(&last)?.squeeze(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frequencies of `n` draws from `logits` under `p`.
    fn freqs(logits: &[f32], history: &[u32], p: &SamplingParams, n: usize) -> Vec<f64> {
        let mut rng = Rng::new(5);
        let mut c = vec![0.0; logits.len()];
        for _ in 0..n {
            c[sample_token(logits, history, p, &mut rng).0 as usize] += 1.0 / n as f64;
        }
        c
    }

    fn softmax(z: &[f64]) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn close(got: &[f64], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 0.015, "{got:?} vs {want:?}");
        }
    }

    /// Without a cut, the draw takes a shortcut (f32 weights summed per block, the block found
    /// first, the log-prob from the sums); a top-k of the whole vocabulary goes the general way
    /// (f64 weights, one scan) over the same tokens in the same order: the same token for every
    /// seed, and the same log-prob, which is log softmax(logits / T) of the unpenalised logits,
    /// with a repetition penalty too. 1000 tokens: three whole blocks and a part.
    #[test]
    fn the_uncut_draw_equals_the_general_one() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919 % 113) as f32 / 17.0) - 3.0).collect();
        for (temperature, repetition_penalty) in [(0.7, 1.0), (1.0, 1.0), (1.3, 1.0), (0.7, 1.2)] {
            let fast = SamplingParams {
                temperature,
                repetition_penalty,
                ..SamplingParams::default()
            };
            let general = SamplingParams {
                top_k: logits.len(),
                ..fast.clone()
            };
            let history = [3u32, 40, 41, 250, 700];
            let mut distinct = std::collections::BTreeSet::new();
            for seed in 0..500 {
                let (mut a, mut b) = (Rng::new(seed), Rng::new(seed));
                let x = sample_token(&logits, &history, &fast, &mut a);
                let y = sample_token(&logits, &history, &general, &mut b);
                assert_eq!(x.0, y.0, "T {temperature} seed {seed}");
                let z: Vec<f64> = logits.iter().map(|&l| l as f64 / temperature).collect();
                let want = softmax(&z)[x.0 as usize].ln();
                for lp in [x.1, y.1] {
                    assert!(
                        (lp as f64 - want).abs() < 1e-6,
                        "T {temperature} seed {seed}: {lp} vs {want}"
                    );
                }
                distinct.insert(x.0);
            }
            assert!(
                distinct.len() > 100 && distinct.iter().any(|&t| t >= 768),
                "{distinct:?}"
            );
        }
    }

    #[test]
    fn processors_cut_and_reweight_as_transformers_does() {
        let logits = [2.0f32, 1.0, 0.5, -1.0];
        let n = 40_000;
        let base = SamplingParams::default();
        // top-k 2: renormalised over the two best
        let p = SamplingParams {
            top_k: 2,
            ..base.clone()
        };
        let w = softmax(&[2.0, 1.0]);
        close(&freqs(&logits, &[], &p, n), &[w[0], w[1], 0.0, 0.0]);
        // top-p 0.8: softmax = .590, .217, .132, .029 -> the first two reach 0.807
        let p = SamplingParams {
            top_p: 0.8,
            ..base.clone()
        };
        close(&freqs(&logits, &[], &p, n), &[w[0], w[1], 0.0, 0.0]);
        // min-p 0.2: tokens at least 0.2 × the best's probability: e^{-1} and e^{-1.5} stay
        let p = SamplingParams {
            min_p: 0.2,
            ..base.clone()
        };
        let w3 = softmax(&[2.0, 1.0, 0.5]);
        close(&freqs(&logits, &[], &p, n), &[w3[0], w3[1], w3[2], 0.0]);
        // repetition penalty 2 on tokens 0 and 3: 2 -> 1, -1 -> -2
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..base.clone()
        };
        close(&freqs(&logits, &[0, 3, 3], &p, n), &softmax(&[1.0, 1.0, 0.5, -2.0]));
        // temperature 0.5 doubles the logits; greedy takes the best, ties to the lower id
        let p = SamplingParams {
            temperature: 0.5,
            ..base.clone()
        };
        close(&freqs(&logits, &[], &p, n), &softmax(&[4.0, 2.0, 1.0, -2.0]));
        let p = SamplingParams {
            temperature: 0.0,
            ..base
        };
        let (t, lp) = sample_token(&[1.0, 3.0, 3.0], &[], &p, &mut Rng::new(1));
        assert_eq!(t, 1);
        assert!((lp as f64 - softmax(&[1.0, 3.0, 3.0])[1].ln()).abs() < 1e-6);
    }
}
