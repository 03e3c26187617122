//! Incremental decoding with a key/value cache, for sampling: a prompt is computed once
//! ([`Transformer::prefill`]) and its keys and values are shared by every sample drawn from it;
//! each decoding step ([`Transformer::decode`]) computes one new token per sample, attending to
//! the prompt's cache and the sample's own. No padding: each prompt is its own group, and the
//! samples of a group always have the same length.
//!
//! This is the inference twin of the training forward (`Block::forward`): the same weights,
//! norms, projections and SwiGLU kernels, with attention over cached keys instead of the fused
//! training op. Tests check its logits against a full forward at every step.
//!
//! The cache is f32 whatever the model's dtype, kept per kv head and grown in place
//! ([`HeadCache`]); the attention of each new row is one loop over it for all the query heads
//! of a kv head (`kernels::cached_attention`), all groups' rows in one parallel pass. A copy made by
//! [`Transformer::with_bf16_matrices`] on a CPU with AMX or AMD's AVX512-BF16 carries its weight
//! matrices packed into tiles ([`DecodeTiles`]), and its products are bf16 products with f32 sums.

use super::{Block, Linear, Transformer};
use crate::error::{Error, Result};
use crate::model::kernels::cached_attention::HeadCache;
use crate::model::kernels::matmul::packed::{packed_products, PackedWeight};
use crate::model::kernels::matmul::{few_rows, few_rows_many};
use crate::model::kernels::{CpuPath, Kernels};
use candle_core::{DType, Tensor};

/// One decoder layer's projections packed into bf16 tiles ([`PackedWeight`]).
#[derive(Debug)]
struct LayerTiles {
    qkv: [PackedWeight; 3],
    o: PackedWeight,
    gate_up: [PackedWeight; 2],
    down: PackedWeight,
}

/// A model's weight matrices packed once into bf16 tiles for decoding
/// ([`Transformer::with_bf16_matrices`] on CPUs with AMX or AMD's AVX512-BF16): every layer's projections and the
/// output head. The products round the activations to bf16 too, as training's `bf16 = true`
/// does. Valid only for the weights they were packed from: a model that trains never has them.
#[derive(Debug)]
pub struct DecodeTiles {
    layers: Vec<LayerTiles>,
    head: PackedWeight,
}

impl DecodeTiles {
    /// Whether these tiles are multiplied by the kernel `path` (at most the CPU's) chooses.
    pub(crate) fn packed_for(&self, path: CpuPath) -> bool {
        PackedWeight::kernel_of(path) == Some(self.head.on_amx())
    }

    /// `t`'s matrices packed, where `path` (at most the CPU's) allows AVX512-BF16 or AMX; else
    /// `None`.
    pub(crate) fn new(t: &Transformer, path: CpuPath) -> Result<Option<DecodeTiles>> {
        let pack = |w: &Tensor| PackedWeight::new_on(path, w);
        let Some(head) = pack(t.output_weight())? else {
            return Ok(None);
        };
        let mut layers = Vec::new();
        for i in 0..t.cfg.num_hidden_layers {
            let b = t.layer(i)?;
            let (at, m) = (&b.self_attn, &b.mlp);
            let packed = |l: &Linear| -> Result<PackedWeight> {
                pack(&l.weight)?.ok_or_else(|| Error::msg("the bf16 tile kernel became unavailable while packing"))
            };
            layers.push(LayerTiles {
                qkv: [packed(&at.q_proj)?, packed(&at.k_proj)?, packed(&at.v_proj)?],
                o: packed(&at.o_proj)?,
                gate_up: [packed(&m.gate_proj)?, packed(&m.up_proj)?],
                down: packed(&m.down_proj)?,
            });
        }
        Ok(Some(DecodeTiles { layers, head }))
    }
}

/// Keys (after RoPE) and values of some positions of one sequence: one [`HeadCache`] per kv
/// head.
#[derive(Clone, Debug)]
struct Kv {
    heads: Vec<HeadCache>,
}

impl Kv {
    fn new(kv_heads: usize, head_dim: usize) -> Kv {
        Kv {
            heads: vec![HeadCache::new(head_dim); kv_heads],
        }
    }
}

/// One layer's cache of a group.
#[derive(Clone, Debug)]
struct LayerKv {
    /// The prompt's, shared by the group's samples (`None` before the prompt is computed).
    shared: Option<std::sync::Arc<Kv>>,
    /// Each sample's own: the tokens it generated.
    own: Vec<Kv>,
}

/// Tokens per sample that [`GroupCache::reserve`] makes room for at most.
pub const RESERVE_MAX: usize = 1024;

/// The key/value cache of a group: one prompt and the samples drawn from it. Keys and values
/// are kept in f32 whatever the model's dtype, and grow in place as tokens are decoded.
#[derive(Clone, Debug)]
pub struct GroupCache {
    layers: Vec<LayerKv>,
    /// Tokens of the prompt (shared) and of each sample (own).
    shared_len: usize,
    own_len: usize,
    samples: usize,
}

impl GroupCache {
    /// Room for `positions` more tokens per sample (the most a generation will decode), so
    /// that the samples' caches grow in place; at most [`RESERVE_MAX`] (past that, growing by
    /// doubling costs little, and a huge `max_completion_length` reserves nothing absurd).
    pub fn reserve(&mut self, positions: usize) {
        let positions = positions.min(RESERVE_MAX);
        for layer in &mut self.layers {
            for kv in &mut layer.own {
                for head in &mut kv.heads {
                    head.reserve(positions);
                }
            }
        }
    }

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
    /// what they have cached so far becomes their shared prefix, held once for all of them.
    pub fn fork(&self, samples: usize) -> Result<GroupCache> {
        if self.samples != 1 {
            return Err(Error::msg("only a single sequence's cache can be forked into samples"));
        }
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let own = &l.own[0];
                let shared = Kv {
                    heads: match &l.shared {
                        Some(s) => s.heads.iter().zip(&own.heads).map(|(s, o)| s.joined(o)).collect(),
                        None => own.heads.clone(),
                    },
                };
                let d = own.heads.first().map_or(0, |h| h.d());
                LayerKv {
                    own: vec![Kv::new(shared.heads.len(), d); samples],
                    shared: Some(std::sync::Arc::new(shared)),
                }
            })
            .collect();
        Ok(GroupCache {
            layers,
            shared_len: self.len(),
            own_len: 0,
            samples,
        })
    }
}

/// Cos and sin `[n, head_dim]` (row-major) of rotary positions `start..start + n`, as the
/// training forward computes them (f64, then f32).
fn rope_rows(t: &Transformer, start: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let inv = t.cfg.rope_inv_freq();
    let d = t.cfg.head_dim;
    let (mut cos, mut sin) = (Vec::with_capacity(n * d), Vec::with_capacity(n * d));
    for p in start..start + n {
        for _half in 0..2 {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
    }
    (cos, sin)
}

/// `l(x)` while decoding: with `packed`, the product with the layer's weights in bf16 tiles; else
/// the few-rows product where it applies (f32, or f32 rows against a bf16 copy of the weights),
/// else the layer's own (a bf16 copy widened first).
fn lin(l: &Linear, packed: Option<&PackedWeight>, x: &Tensor, k: Kernels) -> Result<Tensor> {
    Ok(lin_many(&[l], packed.map(|p| vec![p]), x, k)?.remove(0))
}

/// [`lin`] of several layers on the same `x` (q, k and v; gate and up): their few-rows products
/// in one parallel pass where they apply, each the same as alone. With `packed` (the layers'
/// weights in bf16 tiles), their packed products.
fn lin_many(ls: &[&Linear], packed: Option<Vec<&PackedWeight>>, x: &Tensor, k: Kernels) -> Result<Vec<Tensor>> {
    let copy = ls.iter().any(|l| l.weight.dtype() != x.dtype());
    let fast = match (packed, k.bf16_for(x) && !copy) {
        (Some(p), _) => Some(packed_products(x, &p)?),
        (None, true) => None,
        // layers packed for bf16 products multiply through their own forward
        (None, false) if ls.iter().any(|l| l.packed.is_some()) => None,
        (None, false) => few_rows_many(x, &ls.iter().map(|l| &l.weight).collect::<Vec<_>>())?,
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
    rope: &'a (Vec<f32>, Vec<f32>),
}

impl Block {
    /// This layer on `x`: the new rows of every group, group after group (`G·n` rows each: n
    /// new tokens for each of the group's G samples), each attending to its own group's cache
    /// and causally to its other new tokens; their keys and values are appended to the
    /// samples' own cache. The projections and the MLP run on all groups' rows at once (one
    /// pass over the weights per step), the attention group by group.
    fn decode(
        &self,
        x: &Tensor,
        groups: &mut [GroupStep],
        t: &Transformer,
        tiles: Option<&LayerTiles>,
    ) -> Result<Tensor> {
        let (k, eps) = (t.kernels, t.cfg.rms_norm_eps);
        let at = &self.self_attn;
        let n1 = k.rms_norm(x, &self.input_layernorm, eps)?;
        let qkv_tiles = tiles.map(|l| l.qkv.iter().collect());
        let mut qkv = lin_many(&[&at.q_proj, &at.k_proj, &at.v_proj], qkv_tiles, &n1, k)?.into_iter();
        let (q, kn, vn) = match (qkv.next(), qkv.next(), qkv.next()) {
            (Some(q), Some(kn), Some(vn)) => (q, kn, vn),
            _ => return Err(Error::msg("decode: q, k and v expected")),
        };
        let out = self.attend(&q, &kn, &vn, groups)?.to_dtype(x.dtype())?;
        let hdn = (x + lin(&at.o_proj, tiles.map(|l| &l.o), &out, k)?)?;
        let n2 = k.rms_norm(&hdn, &self.post_attention_layernorm, eps)?;
        let m = &self.mlp;
        let gu_tiles = tiles.map(|l| l.gate_up.iter().collect());
        let gu = lin_many(&[&m.gate_proj, &m.up_proj], gu_tiles, &n2, k)?;
        let s = k.swiglu(&gu[0], &gu[1])?;
        Ok((&hdn + lin(&m.down_proj, tiles.map(|l| &l.down), &s, k)?)?)
    }

    /// The attention of every group's new rows (projected `q` `[rows, heads·D]`, `k` and `v`
    /// `[rows, kv_heads·D]`, group after group), in f32: RoPE on the new keys, appended with the
    /// values to their samples' caches (in parallel over samples); then RoPE on the new queries,
    /// and the query heads of each kv head over its group's shared cache and its sample's own
    /// up to its position (in parallel over rows and kv heads).
    fn attend(&self, q: &Tensor, kn: &Tensor, vn: &Tensor, groups: &mut [GroupStep]) -> Result<Tensor> {
        use crate::model::kernels::cached_attention::{attend, rope_head};
        use rayon::prelude::*;
        let at = &self.self_attn;
        let (h, kvh, d) = (at.n_heads, at.n_kv_heads, at.head_dim);
        let rep = h / kvh;
        let dev = q.device().clone();
        let f32s = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
        let (q, kn, vn) = (f32s(q)?, f32s(kn)?, f32s(vn)?);
        // each group's first row; each sample's cache with its first row, new rows and rotations
        let mut first = Vec::with_capacity(groups.len());
        let mut samples = Vec::new();
        let mut row = 0;
        for gs in groups.iter_mut() {
            first.push(row);
            let (n, rope) = (gs.n, gs.rope);
            for (s, own) in gs.kv.own.iter_mut().enumerate() {
                samples.push((own, row + s * n, n, rope));
            }
            row += gs.g * gs.n;
        }
        let rows = row;
        samples.into_par_iter().for_each_init(
            || vec![0f32; d],
            |key, (own, r0, n, (cos, sin))| {
                for i in 0..n {
                    for (kh, head) in own.heads.iter_mut().enumerate() {
                        let at = (r0 + i) * kvh * d + kh * d;
                        key.copy_from_slice(&kn[at..at + d]);
                        rope_head(key, &cos[i * d..(i + 1) * d], &sin[i * d..(i + 1) * d]);
                        head.push(key, &vn[at..at + d]);
                    }
                }
            },
        );
        let groups: Vec<&GroupStep> = groups.iter().collect();
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let mut out = vec![0f32; rows * h * d];
        // each row and kv head: the row's query heads of that kv head (adjacent, as HF's
        // repeat_kv pairs them) after RoPE, over what the row sees
        out.par_chunks_mut(rep * d).enumerate().for_each_init(
            || (Vec::new(), vec![0f32; rep * d]),
            |(scores, qs), (task, o)| {
                let (r, kh) = (task / kvh, task % kvh);
                let gi = first.partition_point(|&f| f <= r) - 1;
                let gs = groups[gi];
                let (s, i) = ((r - first[gi]) / gs.n, (r - first[gi]) % gs.n);
                let (cos, sin) = (&gs.rope.0[i * d..(i + 1) * d], &gs.rope.1[i * d..(i + 1) * d]);
                qs.copy_from_slice(&q[(r * h + kh * rep) * d..(r * h + (kh + 1) * rep) * d]);
                for qh in qs.chunks_exact_mut(d) {
                    rope_head(qh, cos, sin);
                }
                // this row sees its sample's own cache up to its own position
                let own = &gs.kv.own[s].heads[kh];
                let mine = (own, own.len() - gs.n + i + 1);
                match &gs.kv.shared {
                    Some(sh) => attend(qs, &[(&sh.heads[kh], sh.heads[kh].len()), mine], scale, scores, o),
                    None => attend(qs, &[mine], scale, scores, o),
                }
            },
        );
        Ok(Tensor::from_vec(out, (rows, h * d), &dev)?)
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
                    own: vec![Kv::new(self.cfg.num_key_value_heads, self.cfg.head_dim)],
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
        let ropes: Vec<(Vec<f32>, Vec<f32>)> = caches.iter().map(|c| rope_rows(self, c.len(), n)).collect();
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
            let tiles = self.decode_tiles.as_ref().map(|d| &d.layers[i]);
            x = blk.decode(&x, &mut steps, self, tiles)?;
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
        let logits = match (&self.decode_tiles, self.kernels.bf16_for(&x)) {
            (Some(d), _) => Some(packed_products(&x, &[&d.head])?.remove(0)),
            (None, false) => few_rows(&x, self.output_weight())?,
            (None, true) => None,
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
