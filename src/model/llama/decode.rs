//! Incremental decoding with a key/value cache, for sampling: a prompt is computed once
//! ([`Transformer::prefill`]) and its keys and values are shared by every sample drawn from it;
//! each decoding step ([`Transformer::decode`]) computes one new token per sample, attending to
//! the prompt's cache and the sample's own. No padding: each prompt is its own group, and the
//! samples of a group always have the same length.
//!
//! This is the inference twin of the training forward (`Block::forward`): the same weights,
//! norms, projections and SwiGLU kernels, with attention over cached keys instead of the fused
//! training op. Tests check its logits against a full forward at every step.

use super::{Block, Linear, Transformer};
use crate::error::{Error, Result};
use crate::model::kernels::matmul::{few_rows, few_rows_many};
use crate::model::kernels::primitive::{apply_rope, softmax_last};
use crate::model::kernels::Kernels;
use candle_core::{DType, Tensor};

/// One layer's cached keys (after RoPE) and values.
#[derive(Clone, Debug)]
struct LayerKv {
    /// The prompt's, shared by the group's samples: `[kv_heads, prompt, head_dim]`.
    shared: Option<(Tensor, Tensor)>,
    /// Each sample's own: `[samples, kv_heads, generated, head_dim]`.
    own: Option<(Tensor, Tensor)>,
}

/// The key/value cache of a group: one prompt and the samples drawn from it.
#[derive(Clone, Debug)]
pub struct GroupCache {
    layers: Vec<LayerKv>,
    /// Tokens of the prompt (shared) and of each sample (own).
    shared_len: usize,
    own_len: usize,
    samples: usize,
}

impl GroupCache {
    /// The number of samples of the group.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Tokens cached per sample (prompt and generated).
    pub fn len(&self) -> usize {
        self.shared_len + self.own_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `samples` samples that share this cache (a prompt's, after [`Transformer::prefill`]):
    /// what they have cached so far becomes their shared prefix. Cheap: tensors are shared.
    pub fn fork(&self, samples: usize) -> Result<GroupCache> {
        if self.samples != 1 {
            return Err(Error::msg("only a single sequence's cache can be forked into samples"));
        }
        let layers = self
            .layers
            .iter()
            .map(|l| -> Result<LayerKv> {
                let own = match &l.own {
                    Some((k, v)) => Some((k.squeeze(0)?, v.squeeze(0)?)),
                    None => None,
                };
                let shared = match (&l.shared, own) {
                    (Some((sk, sv)), Some((k, v))) => Some((Tensor::cat(&[sk, &k], 1)?, Tensor::cat(&[sv, &v], 1)?)),
                    (s, o) => s.clone().or(o),
                };
                Ok(LayerKv { shared, own: None })
            })
            .collect::<Result<_>>()?;
        Ok(GroupCache {
            layers,
            shared_len: self.len(),
            own_len: 0,
            samples,
        })
    }
}

/// Cos and sin `[n, head_dim]` of rotary positions `start..start + n`, as the training forward
/// computes them (f64, then the model's dtype).
fn rope_rows(t: &Transformer, start: usize, n: usize) -> Result<(Tensor, Tensor)> {
    let inv = t.cfg.rope_inv_freq();
    let d = t.cfg.head_dim;
    let (mut cos, mut sin) = (Vec::with_capacity(n * d), Vec::with_capacity(n * d));
    for p in start..start + n {
        for _half in 0..2 {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let mk = |v: Vec<f64>| -> Result<Tensor> { Ok(Tensor::from_vec(v, (n, d), t.device())?.to_dtype(t.dtype())?) };
    Ok((mk(cos)?, mk(sin)?))
}

/// `q · kᵀ` of `q` `[G, kvh, R, d]` against a key tensor shared by the group `[kvh, t, d]`.
fn shared_scores(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    let (g, kvh, r, d) = q.dims4()?;
    let q = q.transpose(0, 1)?.reshape((kvh, g * r, d))?;
    let s = q.matmul(&k.t()?)?; // [kvh, G·R, t]
    let t = s.dim(2)?;
    Ok(s.reshape((kvh, g, r, t))?.transpose(0, 1)?)
}

/// `p · v` of probabilities `[G, kvh, R, t]` against values shared by the group `[kvh, t, d]`.
fn shared_values(p: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (g, kvh, r, t) = p.dims4()?;
    let p = p.transpose(0, 1)?.contiguous()?.reshape((kvh, g * r, t))?;
    let o = p.matmul(v)?; // [kvh, G·R, d]
    let d = o.dim(2)?;
    Ok(o.reshape((kvh, g, r, d))?.transpose(0, 1)?)
}

/// `l(x)` while decoding: the few-rows product where it applies (f32, or f32 rows against a bf16
/// copy of the weights), else the layer's own (a bf16 copy widened first).
fn lin(l: &Linear, x: &Tensor, k: Kernels) -> Result<Tensor> {
    Ok(lin_many(&[l], x, k)?.remove(0))
}

/// [`lin`] of several layers on the same `x` (q, k and v; gate and up): their few-rows products
/// in one parallel pass where they apply, each the same as alone.
fn lin_many(ls: &[&Linear], x: &Tensor, k: Kernels) -> Result<Vec<Tensor>> {
    let copy = ls.iter().any(|l| l.weight.dtype() != x.dtype());
    let fast = match k.bf16_for(x) && !copy {
        true => None,
        false => few_rows_many(x, &ls.iter().map(|l| &l.weight).collect::<Vec<_>>())?,
    };
    let Some(ys) = fast else {
        return ls
            .iter()
            .map(|l| match l.weight.dtype() != x.dtype() {
                true => Linear {
                    weight: l.weight.to_dtype(x.dtype())?,
                    ..(*l).clone()
                }
                .forward(x, k),
                false => l.forward(x, k),
            })
            .collect();
    };
    ls.iter()
        .zip(ys)
        .map(|(l, y)| {
            let y = match &l.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            Ok(match &l.lora {
                Some(lora) => (y + lora.delta(x, k)?)?,
                None => y,
            })
        })
        .collect()
}

/// One group's part of a decoding step through a layer: its cache, samples, new tokens per
/// sample, and the rotary tables of their positions.
struct GroupStep<'a> {
    kv: &'a mut LayerKv,
    g: usize,
    n: usize,
    rope: &'a (Tensor, Tensor),
}

impl Block {
    /// This layer on `x`: the new rows of every group, group after group (`G·n` rows each: n
    /// new tokens for each of the group's G samples), each attending to its own group's cache
    /// and causally to its other new tokens; their keys and values are appended to the
    /// samples' own cache. The projections and the MLP run on all groups' rows at once (one
    /// pass over the weights per step), the attention group by group.
    fn decode(&self, x: &Tensor, groups: &mut [GroupStep], t: &Transformer) -> Result<Tensor> {
        let (k, eps) = (t.kernels, t.cfg.rms_norm_eps);
        let at = &self.self_attn;
        let n1 = k.rms_norm(x, &self.input_layernorm, eps)?;
        let mut qkv = lin_many(&[&at.q_proj, &at.k_proj, &at.v_proj], &n1, k)?.into_iter();
        let (q, kn, vn) = match (qkv.next(), qkv.next(), qkv.next()) {
            (Some(q), Some(kn), Some(vn)) => (q, kn, vn),
            _ => return Err(Error::msg("decode: q, k and v expected")),
        };
        let mut outs = Vec::with_capacity(groups.len());
        let mut row = 0;
        for gs in groups.iter_mut() {
            let rows = gs.g * gs.n;
            let part = |z: &Tensor| z.narrow(0, row, rows);
            outs.push(self.attend_group(&part(&q)?, &part(&kn)?, &part(&vn)?, gs)?);
            row += rows;
        }
        let out = if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 0)?
        };
        let hdn = (x + lin(&at.o_proj, &out, k)?)?;
        let n2 = k.rms_norm(&hdn, &self.post_attention_layernorm, eps)?;
        let m = &self.mlp;
        let gu = lin_many(&[&m.gate_proj, &m.up_proj], &n2, k)?;
        let s = k.swiglu(&gu[0], &gu[1])?;
        Ok((&hdn + lin(&m.down_proj, &s, k)?)?)
    }

    /// The attention of one group's new rows (projected `q`, `k`, `v`, `[G·n, heads·D]`).
    fn attend_group(&self, q: &Tensor, kn: &Tensor, vn: &Tensor, gs: &mut GroupStep) -> Result<Tensor> {
        let at = &self.self_attn;
        let (h, kvh, d) = (at.n_heads, at.n_kv_heads, at.head_dim);
        let (g, n) = (gs.g, gs.n);
        let rep = h / kvh;
        let kv = &mut *gs.kv;
        // q: [G, kvh, rep·n, d], rows ordered (rep, n) within a kv head, as repeat_kv groups heads
        let q = q
            .reshape((g, n, kvh, rep, d))?
            .permute((0, 2, 3, 1, 4))?
            .contiguous()?
            .reshape((g, kvh, rep * n, d))?;
        let (cos, sin) = gs.rope;
        let q = apply_rope(&q, &cos.repeat((rep, 1))?, &sin.repeat((rep, 1))?)?;
        let kn = apply_rope(&kn.reshape((g, n, kvh, d))?.transpose(1, 2)?.contiguous()?, cos, sin)?;
        let vn = vn.reshape((g, n, kvh, d))?.transpose(1, 2)?.contiguous()?;
        let (own_k, own_v) = match kv.own.take() {
            Some((ok, ov)) => (Tensor::cat(&[&ok, &kn], 2)?, Tensor::cat(&[&ov, &vn], 2)?),
            None => (kn, vn),
        };
        let own_scores = q.matmul(&own_k.t()?)?; // [G, kvh, rep·n, t_own]
        let t_own = own_k.dim(2)?;
        let scores = match &kv.shared {
            Some((sk, _)) => Tensor::cat(&[&shared_scores(&q, sk)?, &own_scores], 3)?,
            None => own_scores,
        };
        let scores = (scores * (1.0 / (d as f64).sqrt()))?;
        let scores = if n > 1 {
            // new token i sees the own cache up to its own position
            let total = scores.dim(3)?;
            let before = total - n;
            let mask: Vec<f32> = (0..rep * n)
                .flat_map(|r| (0..total).map(move |j| if j < before || j - before <= r % n { 0.0 } else { -1e9 }))
                .collect();
            let mask = Tensor::from_vec(mask, (rep * n, total), q.device())?.to_dtype(scores.dtype())?;
            scores.broadcast_add(&mask)?
        } else {
            scores
        };
        let probs = softmax_last(&scores)?;
        let total = probs.dim(3)?;
        let own_probs = probs.narrow(3, total - t_own, t_own)?.contiguous()?;
        let mut out = own_probs.matmul(&own_v)?; // [G, kvh, rep·n, d]
        if let Some((_, sv)) = &kv.shared {
            out = (out + shared_values(&probs.narrow(3, 0, total - t_own)?, sv)?)?;
        }
        kv.own = Some((own_k, own_v));
        Ok(out
            .reshape((g, kvh, rep, n, d))?
            .permute((0, 3, 1, 2, 4))?
            .contiguous()?
            .reshape((g * n, h * d))?)
    }
}

impl Transformer {
    /// Compute `prompt` once: the logits `[V]` that predict its next token, and its cache (one
    /// sequence; [`GroupCache::fork`] shares it between samples). No autograd graph.
    pub fn prefill(&self, prompt: &[u32]) -> Result<(Tensor, GroupCache)> {
        if prompt.is_empty() {
            return Err(Error::msg("prefill: an empty prompt has nothing to predict from"));
        }
        let mut cache = GroupCache {
            layers: vec![
                LayerKv {
                    shared: None,
                    own: None
                };
                self.cfg.num_hidden_layers
            ],
            shared_len: 0,
            own_len: 0,
            samples: 1,
        };
        let logits = self
            .decode_rows(std::slice::from_mut(&mut cache), prompt, prompt.len())?
            .remove(0);
        Ok((logits.squeeze(0)?, cache))
    }

    /// One step for every sample of a group: `tokens[s]` is sample s's newest token. Returns
    /// the logits `[samples, V]` that predict each sample's next token.
    pub fn decode(&self, cache: &mut GroupCache, tokens: &[u32]) -> Result<Tensor> {
        Ok(self.decode_many(std::slice::from_mut(cache), &[tokens])?.remove(0))
    }

    /// [`Self::decode`] for several groups at once (different prompts, each with its samples):
    /// one pass over the weights for all of them. `tokens[i]` are group i's newest tokens.
    pub fn decode_many(&self, caches: &mut [GroupCache], tokens: &[&[u32]]) -> Result<Vec<Tensor>> {
        for (c, t) in caches.iter().zip(tokens) {
            if t.len() != c.samples {
                return Err(Error::msg(format!(
                    "decode: {} tokens for a group of {} samples",
                    t.len(),
                    c.samples
                )));
            }
        }
        let ids: Vec<u32> = tokens.iter().flat_map(|t| t.iter().copied()).collect();
        self.decode_rows(caches, &ids, 1)
    }

    /// `n` new tokens per sample of every group (`ids`: group after group, sample after
    /// sample), through every layer; each group's logits of its samples' last new tokens,
    /// `[samples, V]`.
    fn decode_rows(&self, caches: &mut [GroupCache], ids: &[u32], n: usize) -> Result<Vec<Tensor>> {
        let ropes: Vec<(Tensor, Tensor)> = caches
            .iter()
            .map(|c| rope_rows(self, c.len(), n))
            .collect::<Result<_>>()?;
        let mut x = self
            .embed_tokens
            .index_select(&Tensor::new(ids, self.device())?, 0)?
            .detach();
        for i in 0..self.cfg.num_hidden_layers {
            let blk = self.layer(i)?;
            let mut steps: Vec<GroupStep> = caches
                .iter_mut()
                .zip(&ropes)
                .map(|(c, rope)| GroupStep {
                    g: c.samples,
                    n,
                    rope,
                    kv: &mut c.layers[i],
                })
                .collect();
            x = blk.decode(&x, &mut steps, self)?;
        }
        // each sample's last new row
        let mut last = Vec::new();
        let mut row = 0;
        for c in caches.iter_mut() {
            c.own_len += n;
            last.extend((0..c.samples).map(|s| (row + s * n + n - 1) as u32));
            row += c.samples * n;
        }
        let x = x.index_select(&Tensor::new(last, self.device())?, 0)?;
        let x = self.kernels.rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?;
        let logits = match self.kernels.bf16_for(&x) {
            false => few_rows(&x, self.output_weight())?,
            true => None,
        };
        let logits = match logits {
            Some(l) => l,
            None if self.output_weight().dtype() != x.dtype() => {
                x.matmul(&self.output_weight().to_dtype(x.dtype())?.t()?)?
            }
            None => self.logits(&x)?,
        };
        let logits = logits.to_dtype(DType::F32)?.detach();
        let mut out = Vec::with_capacity(caches.len());
        let mut row = 0;
        for c in caches.iter() {
            out.push(logits.narrow(0, row, c.samples)?);
            row += c.samples;
        }
        Ok(out)
    }
}
