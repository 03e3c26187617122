//! The decoder-only transformer of the Llama family (Llama / SmolLM2 / Mistral / Qwen2: GQA,
//! RoPE, RMSNorm, SwiGLU, tied embeddings, q/k/v bias), written so that every op on the training
//! path has a backward (candle's fused `softmax_last_dim`, `rms_norm` and `rope*` kernels
//! silently drop gradients; none of them is used here).
//!
//! Weight names are exactly the Hugging Face ones (`model.layers.{i}.self_attn.q_proj.weight`),
//! and the model is built by one walk ([`Transformer::build`]) that asks a closure for each
//! named tensor, so loading, saving, casting and making trainable variables share one code path.
//! A decoder layer lives in [`layer`]; the graph-level backward options in [`crate::model::autograd`].

pub mod decode;
pub mod layer;

pub use decode::GroupCache;
pub use layer::{Attention, Block, Linear, Mlp};

use crate::error::{Error, Result};
use crate::model::autograd::{layers_op, BackwardOptions, GradSink};
use crate::model::config::ModelConfig;
use crate::model::inputs::AttentionInputs;
use crate::model::kernels::{matmul, Kernels};
use crate::model::lora::{Adapters, DropoutClock};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

/// Decoder layers kept outside a model's parameters and handed out one widened layer at a time:
/// a frozen model's layers in their stored precision (`model::load::compact`).
pub trait LayerStore: std::fmt::Debug + Send + Sync {
    /// Layer `i`, widened to the model's dtype.
    fn layer(&self, cfg: &ModelConfig, i: usize) -> Result<Block>;
    /// Bytes the layers take as stored.
    fn bytes(&self) -> usize;
    /// Bytes they would take widened.
    fn widened_bytes(&self) -> usize;
    /// Whether [`Self::layer`] gives the layers' weights themselves. A store that keeps only
    /// the operands of bf16 products ([`crate::model::load::compact::PackedLayers`]) gives
    /// placeholders: its model runs forward passes, and cannot be merged, widened or saved.
    fn holds_weights(&self) -> bool {
        true
    }
}

#[derive(Clone, Debug)]
pub struct Transformer {
    pub cfg: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    /// `None` when the output projection is tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
    /// The reward head `[1, H]` of a reward model.
    pub score: Option<Tensor>,
    /// Every parameter with its HF name, in a fixed order (the walk order of [`Self::build`]).
    params: Vec<(String, Tensor)>,
    /// Fused or primitive kernels (the same values; fused is faster and uses less memory).
    pub kernels: Kernels,
    /// What [`Transformer::backward`] adds to candle's backward (see [`crate::model::autograd`]):
    /// gradient checkpointing and sparse embedding gradients, both off by default.
    pub backward_options: BackwardOptions,
    /// Where those leave gradients for [`Transformer::backward`].
    pub(crate) sink: std::sync::Arc<GradSink>,
    /// A frozen model's decoder layers kept in the checkpoint's own precision and widened one
    /// layer at a time in forward (`layers` is then empty); see [`LayerStore`].
    pub(crate) compact: Option<std::sync::Arc<dyn LayerStore>>,
    /// LoRA adapters on the (frozen) layers, attached to each layer as it is used.
    pub(crate) adapters: Option<std::sync::Arc<Adapters>>,
    /// Which training forward pass the adapters' dropout is in (shared by clones).
    pub(crate) dropout_clock: std::sync::Arc<DropoutClock>,
    /// The weight matrices packed for decoding in bf16 tiles ([`Self::with_bf16_matrices`]): only on
    /// a copy made for one generation, never on a model whose weights change.
    pub(crate) decode_tiles: Option<std::sync::Arc<decode::DecodeTiles>>,
}

impl Transformer {
    /// Whether decoding runs on weights packed into bf16 tiles ([`Self::with_bf16_matrices`]).
    pub fn decodes_from_tiles(&self) -> bool {
        self.decode_tiles.is_some()
    }
}

impl Transformer {
    /// Build the model by asking `get(name, shape)` for each parameter, in a fixed order.
    pub fn build(cfg: &ModelConfig, get: impl FnMut(&str, &[usize]) -> Result<Tensor>) -> Result<Self> {
        Self::build_parts(cfg, get, true)
    }

    /// [`Self::build`]; without the decoder layers when `with_layers` is false (their tensors
    /// are then not asked for: a model whose layers are in a [`LayerStore`]).
    pub(crate) fn build_parts(
        cfg: &ModelConfig,
        mut get: impl FnMut(&str, &[usize]) -> Result<Tensor>,
        with_layers: bool,
    ) -> Result<Self> {
        let mut params = Vec::new();
        let mut take = |name: String, shape: &[usize]| -> Result<Tensor> {
            let t = get(&name, shape)?;
            if t.dims() != shape {
                return Err(Error::msg(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?} from config.json",
                    t.dims()
                )));
            }
            params.push((name, t.clone()));
            Ok(t)
        };
        let hs = cfg.hidden_size;
        let embed_tokens = take("model.embed_tokens.weight".into(), &[cfg.vocab_size, hs])?;
        // grown layer by layer, not sized by the config: a layer count the file does not back
        // (a corrupt header) fails at the first missing tensor instead of allocating for it
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            if with_layers {
                layers.push(Block::build(cfg, i, &mut take)?);
            }
        }
        let norm = take("model.norm.weight".into(), &[hs])?;
        let (lm_head, score) = if cfg.reward_head {
            (None, Some(take("score.weight".into(), &[cfg.num_labels.max(1), hs])?))
        } else if cfg.tie_word_embeddings {
            (None, None)
        } else {
            (Some(take("lm_head.weight".into(), &[cfg.vocab_size, hs])?), None)
        };
        Ok(Transformer {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            score,
            params,
            kernels: Kernels::default(),
            backward_options: Default::default(),
            sink: Default::default(),
            compact: None,
            adapters: None,
            dropout_clock: Default::default(),
            decode_tiles: None,
        })
    }

    /// A frozen copy for `bf16 = true` on a CPU with a fast bf16 product (a live reference):
    /// the decoder layers' projections packed once into bf16 tiles
    /// ([`crate::model::load::compact::PackedLayers`]), every other tensor copied. Its forward
    /// passes give the f32 copy's `bf16 = true` numbers bit for bit, from half the layers' bytes
    /// and without packing them at every pass. `None` where that does not apply: no fast bf16
    /// product, an f32 model with dense layers and no adapters only.
    pub fn frozen_packed_copy(&self) -> Result<Option<Self>> {
        if self.compact.is_some() || self.adapters.is_some() || self.dtype() != DType::F32 || !self.device().is_cpu() {
            return Ok(None);
        }
        let Some(packed) = crate::model::load::compact::PackedLayers::new(&self.layers)? else {
            return Ok(None);
        };
        let mut rest = self.params.iter().filter(|(n, _)| !n.starts_with("model.layers."));
        let mut m = Self::build_parts(
            &self.cfg,
            |name, _| {
                let (n, t) = rest.next().ok_or_else(|| Error::msg("parameter walk mismatch"))?;
                debug_assert_eq!(n, name);
                Ok(t.detach().copy()?)
            },
            false,
        )?;
        m.compact = Some(std::sync::Arc::new(packed));
        m.kernels = self.kernels;
        Ok(Some(m))
    }

    /// The same model reading the same storage outside any autograd graph (cheap: no copy), for
    /// inference on a model that is being trained (sampling, scoring).
    pub fn detached(&self) -> Result<Self> {
        let mut m = self.map(|_, t| Ok(t.detach()))?;
        if let Some(a) = &self.adapters {
            m.adapters = Some(std::sync::Arc::new(a.map(|_, t| Ok(t.detach()))?));
        }
        // the same values: tiles packed from them still hold
        m.decode_tiles = self.decode_tiles.clone();
        Ok(m)
    }

    /// Decoder layer `i`: the model's own, or widened from its layer store, with its adapters
    /// (no dropout).
    pub(crate) fn layer(&self, i: usize) -> Result<std::borrow::Cow<'_, Block>> {
        self.layer_for(i, None)
    }

    /// Decoder layer `i` with its adapters' dropout keyed from `forward_key`.
    fn layer_for(&self, i: usize, forward_key: Option<u64>) -> Result<std::borrow::Cow<'_, Block>> {
        let blk = match &self.compact {
            Some(c) => std::borrow::Cow::Owned(c.layer(&self.cfg, i)?),
            None => std::borrow::Cow::Borrowed(&self.layers[i]),
        };
        Ok(match &self.adapters {
            Some(a) => std::borrow::Cow::Owned(blk.into_owned().with_adapters(a.layer(i, forward_key))),
            None => blk,
        })
    }

    /// The LoRA adapters, if the model has them.
    pub fn adapters(&self) -> Option<&Adapters> {
        self.adapters.as_deref()
    }

    /// The same model with `adapters` on its layers (their shapes are checked).
    pub fn with_adapters(&self, adapters: Adapters) -> Result<Self> {
        if adapters.layers.len() != self.cfg.num_hidden_layers {
            return Err(Error::msg(format!(
                "the adapter has {} layers, the model {}",
                adapters.layers.len(),
                self.cfg.num_hidden_layers
            )));
        }
        let mut m = self.clone();
        m.adapters = Some(std::sync::Arc::new(adapters));
        Ok(m)
    }

    /// The base model: the same weights (shared, not copied) with the adapters off and every
    /// tensor detached. A LoRA run's reference.
    pub fn without_adapters(&self) -> Result<Self> {
        let mut m = self.map(|_, t| Ok(t.detach()))?;
        m.adapters = None;
        Ok(m)
    }

    /// The adapters merged into the weights (`W + s·B·A` of each adapted module): a dense model
    /// without adapters and with every layer widened, detached.
    pub fn merged(&self) -> Result<Self> {
        if self.compact.as_ref().is_some_and(|c| !c.holds_weights()) {
            return Err(Error::msg(
                "this model's layers are held only packed for bf16 products (a frozen reference): \
                 they cannot be merged or widened",
            ));
        }
        let base = self.without_adapters()?;
        let mut current: Option<(usize, Block)> = None;
        let mut m = Self::build(&self.cfg, |name, _| {
            let Some(rest) = name.strip_prefix("model.layers.") else {
                return base
                    .params
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t.clone())
                    .ok_or_else(|| Error::msg(format!("merge: no tensor `{name}`")));
            };
            let (i, path) = rest
                .split_once('.')
                .and_then(|(i, p)| Some((i.parse::<usize>().ok()?, p)))
                .ok_or_else(|| Error::msg(format!("merge: unexpected tensor name `{name}`")))?;
            if current.as_ref().is_none_or(|(c, _)| *c != i) {
                current = Some((i, base.layer(i)?.into_owned()));
            }
            let blk = &current.as_ref().expect("set above").1;
            let w = blk
                .get(path)
                .ok_or_else(|| Error::msg(format!("merge: no tensor `{name}`")))?;
            let adapted = self.adapters.as_ref().and_then(|a| {
                let k = crate::model::lora::Module::ALL
                    .iter()
                    .position(|m| format!("{}.weight", m.path()) == path)?;
                let (la, lb) = a.layers[i][k].as_ref()?;
                Some((la.detach(), lb.detach(), a.spec.scale()))
            });
            match adapted {
                Some((la, lb, s)) => crate::model::lora::merged_weight(w, &la, &lb, s),
                None => Ok(w.clone()),
            }
        })?;
        m.kernels = self.kernels;
        Ok(m)
    }

    /// This model with its stored layers widened once (adapters kept, unmerged: the same
    /// numbers as layer-by-layer widening): what the sampler decodes from, since widening at
    /// every token would repeat the whole dequantisation per token. The model itself when its
    /// layers are held already.
    pub fn widened(&self) -> Result<Self> {
        if self.compact.is_none() {
            return Ok(self.clone());
        }
        let mut m = self.without_adapters()?.merged()?;
        m.adapters = self.adapters.clone();
        m.dropout_clock = self.dropout_clock.clone();
        m.backward_options = self.backward_options;
        Ok(m)
    }

    /// A copy for sampling whose weight matrices are bf16: the decoder layers' projections and
    /// the output head (a separate copy when tied; the embedding and the norms stay as they
    /// are), adapters and a compact base merged in first.
    ///
    /// On CPUs with a fast bf16 product (AMX, or AVX512-BF16 on AMD:
    /// [`crate::model::kernels::CpuPath::fast_bf16`]) the matrices are packed once into bf16
    /// tiles ([`decode::DecodeTiles`]) and decoding multiplies bf16-rounded activations by them
    /// with f32 sums: the products of training's `bf16 = true`. Elsewhere decoding multiplies f32
    /// activations by bf16 copies of the weights widened on the fly
    /// ([`crate::model::kernels::matmul::few_rows`]): the f32 model with its matrices rounded to
    /// bf16, from half the bytes per token.
    pub fn with_bf16_matrices(&self) -> Result<Self> {
        use crate::model::kernels::CpuPath;
        // below the fast paths, a path that packs nothing
        let path = CpuPath::fast_bf16().unwrap_or(CpuPath::active().min(CpuPath::Avx512));
        self.with_bf16_matrices_on(path)
    }

    /// [`Self::with_bf16_matrices`] with the kernels of `path` (at most the CPU's): tiles where
    /// it allows AVX512-BF16 (`vdpbf16ps`) or AMX. Tests use it to run every kind on one machine.
    pub fn with_bf16_matrices_on(&self, path: crate::model::kernels::CpuPath) -> Result<Self> {
        if self.decode_tiles.as_ref().is_some_and(|t| t.packed_for(path)) {
            return Ok(self.clone());
        }
        let base = match self.adapters.is_some() || self.compact.is_some() {
            true => self.merged()?,
            false => self.clone(),
        };
        if let Some(tiles) = decode::DecodeTiles::new(&base, path)? {
            let mut m = base;
            m.decode_tiles = Some(std::sync::Arc::new(tiles));
            (m.kernels.bf16, m.kernels.bf16_attention) = (false, false);
            return Ok(m);
        }
        let head = base.output_weight().to_dtype(DType::BF16)?;
        let mut m = base.map(
            |name, t| match name.starts_with("model.layers.") && name.ends_with("_proj.weight") {
                true => Ok(t.to_dtype(DType::BF16)?),
                false => Ok(t.clone()),
            },
        )?;
        m.lm_head = Some(head);
        // f32 activations against the bf16 weights, not bf16 products
        (m.kernels.bf16, m.kernels.bf16_attention) = (false, false);
        Ok(m)
    }

    /// Set (or with `None` clear) the training step the adapters' dropout masks are drawn for.
    pub fn set_dropout_step(&self, step: Option<usize>) {
        self.dropout_clock.set_step(step);
    }

    /// The decoder layers kept compact, if this is such a frozen model.
    pub fn compact_layers(&self) -> Option<&dyn LayerStore> {
        self.compact.as_deref()
    }

    /// Every parameter with its HF name (without the layers of a compact model).
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// A new model whose every parameter is `f(name, tensor)`, with the same kernels.
    pub fn map(&self, mut f: impl FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Self> {
        let mut it = self.params.iter();
        let mut m = Self::build_parts(
            &self.cfg,
            |name, _| {
                let (n, t) = it.next().ok_or_else(|| Error::msg("parameter walk mismatch"))?;
                debug_assert_eq!(n, name);
                f(name, t)
            },
            self.compact.is_none(),
        )?;
        m.compact = self.compact.clone();
        m.adapters = self.adapters.clone();
        m.dropout_clock = self.dropout_clock.clone();
        m.kernels = self.kernels;
        m.backward_options = self.backward_options;
        Ok(m)
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The output projection `[vocab, hidden]` (the embedding matrix when tied).
    pub fn output_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Final hidden states `[B, T, H]` (after the last RMSNorm) for `input_ids` `[B, T]`.
    pub fn hidden_states(&self, input_ids: &Tensor, a: &AttentionInputs) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let eps = self.cfg.rms_norm_eps;
        // the layers work on `[B·T, H]` rows: no reshapes around every projection
        let mut x = self.embed(&input_ids.flatten_all()?)?;
        let k = self.kernels;
        // trained adapters on a frozen base: the embedding is not trained, so the first layer's
        // input becomes a leaf of the graph (its layer op must be tracked), and this forward
        // pass draws its dropout masks
        let training_adapters = self.adapters.as_ref().filter(|a| a.trainable());
        if training_adapters.is_some() && !x.track_op() {
            x = candle_core::Var::from_tensor(&x)?.as_tensor().clone();
        }
        let key = training_adapters.and_then(|a| self.dropout_clock.next_key(a.seed));
        let opts = self.backward_options;
        if (opts.gradient_checkpointing || opts.layer_graphs) && x.track_op() {
            // the layers as one op: keep only each layer's input and recompute it in backward
            // (checkpointing), or keep each layer's activations until its backward
            let mut calls = Vec::with_capacity(self.cfg.num_hidden_layers);
            for i in 0..self.cfg.num_hidden_layers {
                let layer = match (&self.compact, &self.adapters) {
                    // a stored base is widened only while the op uses it
                    (Some(store), Some(a)) => layer::LayerSource::Stored {
                        store: store.clone(),
                        cfg: Box::new(self.cfg.clone()),
                        index: i,
                        loras: a.layer(i, key),
                    },
                    _ => layer::LayerSource::Held(self.layer_for(i, key)?.into_owned()),
                };
                calls.push(layer::BlockCall {
                    detached: layer.detached(),
                    layer,
                    attn: a.clone(),
                    kernels: k,
                    eps,
                });
            }
            x = layers_op(calls, &x, &self.sink, !opts.gradient_checkpointing)?;
        } else {
            for i in 0..self.cfg.num_hidden_layers {
                x = self.layer_for(i, key)?.forward(&x, a, k, eps)?;
            }
        }
        Ok(k.rms_norm(&x, &self.norm, eps)?.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Scalar rewards `[S]` of a right-padded batch: the reward head on the hidden state of each
    /// row's last token that is not `pad_id` (transformers' rule for sequence classification;
    /// a row of only pad tokens uses its last real position).
    pub fn rewards(&self, seqs: &[Vec<u32>], pad_id: u32) -> Result<Tensor> {
        let m = self.reward_matrix(seqs, pad_id)?;
        if self.cfg.reward_variance {
            // a Gaussian head's reward is its mean
            return Ok(m.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?);
        }
        if m.dim(1)? != 1 {
            return Err(Error::msg(format!(
                "this reward model has {} heads (one per preference cluster); choose one per sequence",
                m.dim(1)?
            )));
        }
        Ok(m.squeeze(1)?)
    }

    /// Rewards of every head: `[S, K]`.
    pub fn reward_matrix(&self, seqs: &[Vec<u32>], pad_id: u32) -> Result<Tensor> {
        let score = self
            .score
            .as_ref()
            .ok_or_else(|| Error::msg("this model has no reward head (score.weight)"))?;
        Ok(self.last_hidden(seqs, pad_id)?.matmul(&score.t()?)?)
    }

    /// The final hidden state `[S, H]` (after the last norm) of each right-padded sequence's
    /// last token that is not `pad_id` (a row of only pad tokens uses its last real position):
    /// what a sequence-classification head reads, and PAL's item embedding.
    pub fn last_hidden(&self, seqs: &[Vec<u32>], pad_id: u32) -> Result<Tensor> {
        let batch = crate::batch::collate_plain(seqs, pad_id);
        let (b, t) = (batch.rows, batch.cols);
        let dev = self.device();
        let rows: Vec<u32> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let last = s
                    .iter()
                    .rposition(|&x| x != pad_id)
                    .unwrap_or(s.len().saturating_sub(1));
                (i * t + last) as u32
            })
            .collect();
        let input = Tensor::from_slice(&batch.ids, (b, t), dev)?;
        let attn = AttentionInputs::for_batch(&self.cfg, &batch, self.dtype(), dev)?;
        let hidden = self
            .hidden_states(&input, &attn)?
            .reshape((b * t, self.cfg.hidden_size))?;
        Ok(hidden.index_select(&Tensor::new(rows, dev)?, 0)?)
    }

    /// Logits `[N, V]` for hidden rows `[N, H]` (bf16 products with `kernels.bf16`).
    pub fn logits(&self, hidden_rows: &Tensor) -> Result<Tensor> {
        if self.kernels.bf16_for(hidden_rows) {
            return matmul::linear(hidden_rows, self.output_weight(), true);
        }
        Ok(hidden_rows.matmul(&self.output_weight().t()?)?)
    }
}

impl Transformer {
    /// Turn layer-by-layer gradient checkpointing on or off (see the module docs).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.backward_options.gradient_checkpointing = on;
    }

    /// Turn per-layer graphs on or off ([`BackwardOptions::layer_graphs`]).
    pub fn set_layer_graphs(&mut self, on: bool) {
        self.backward_options.layer_graphs = on;
    }

    /// Turn `optimizer_in_backward` on or off (see [`crate::model::autograd`]): after
    /// [`Self::backward`], [`Self::streamed_norms`] and [`Self::backward_again`].
    pub fn set_optimizer_in_backward(&mut self, on: bool) {
        self.sink.set_streams(on);
    }

    /// With `optimizer_in_backward`, after [`Self::backward`]: the squared norm of each gradient
    /// that backward did not keep (the decoder layers', the fused log-prob head's projection,
    /// an embedding that only lookups reach).
    pub fn streamed_norms(&self) -> Result<std::collections::HashMap<candle_core::TensorId, f64>> {
        self.sink.take_norms()
    }

    /// With `optimizer_in_backward`, after [`Self::backward`]: the gradients it did not keep,
    /// made again (the decoder layers' backward, last layer first; the projection a block of
    /// rows at a time) and handed to `done` as soon as each part exists (`done` may update that
    /// part of the parameter in place: nothing later reads it). Without `done` (`None`), forget
    /// that second pass (a step that is not applied).
    pub fn backward_again(&self, done: Option<crate::model::autograd::HandOver>) -> Result<()> {
        let replays = self.sink.take_replays()?;
        let Some(done) = done else { return Ok(()) };
        if replays.is_empty() {
            return Err(crate::error::Error::msg(
                "optimizer_in_backward: no second backward pass to run (the policy was not backpropagated)",
            ));
        }
        for r in replays {
            r.run(&self.sink, &mut *done)?;
        }
        Ok(())
    }

    /// Turn sparse embedding gradients on or off (see the module docs).
    pub fn set_sparse_embedding_grad(&mut self, on: bool) {
        self.backward_options.sparse_embedding_grad = on;
    }

    /// The embedding rows `[N, H]` of `ids` `[N]`; a leaf variable whose lookup is recorded for
    /// [`Self::backward`] when sparse embedding gradients are on and the model is trained.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        if !(self.backward_options.sparse_embedding_grad && self.embed_tokens.is_variable()) {
            return Ok(self.embed_tokens.index_select(ids, 0)?);
        }
        self.sink.lookup(&self.embed_tokens, ids)
    }

    /// Where the fused log-prob head leaves its projection's gradient: this model's sink when
    /// [`Self::backward`] collects the embedding's gradient there (sparse embedding gradients on,
    /// the projection trained), else candle's store.
    pub(crate) fn head_grad_sink(&self) -> Option<std::sync::Arc<GradSink>> {
        (self.backward_options.sparse_embedding_grad && self.output_weight().is_variable()).then(|| self.sink.clone())
    }

    /// `loss.backward()`, plus the gradients that [`BackwardOptions`] route around candle's
    /// graph: use this, not `Tensor::backward`, for a loss that depends on a model with either
    /// option on. Lookups recorded by forward passes that were never backpropagated (e.g.
    /// evaluation) are dropped here.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let adapters = self.adapters.as_ref().map(|a| a.named()).unwrap_or_default();
        let params = self
            .params
            .iter()
            .map(|(_, p)| p)
            .chain(adapters.iter().map(|(_, t)| *t));
        self.sink.collect(&mut grads, params, &self.embed_tokens)?;
        Ok(grads)
    }
}
