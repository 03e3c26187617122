//! What a model adds to candle's backward pass: `Transformer::backward` is `loss.backward()`
//! plus the gradients that these options route around candle's graph. Nothing here knows a
//! model family: a decoder layer comes in as a [`LayerCall`].
//!
//! **The decoder layers as one op** (`layers_op`), for a model that is being trained, with
//! either of two options:
//!
//! - *Gradient checkpointing*: the op's forward computes the layers outside the autograd graph,
//!   so only each layer's input is kept for backward; its backward recomputes each layer, last
//!   first. Activation memory drops from every layer's intermediates to one `[rows, H]` tensor
//!   per layer, at the cost of a second forward pass of the layers.
//! - *Per-layer graphs* (`layer_graphs`): the op's forward keeps each layer's activations until
//!   that layer's backward has run, so they are freed layer by layer during the backward pass
//!   instead of all at its end, while the gradients are being allocated.
//!
//! The layers are one op rather than one op each so that what a layer saved is freed right
//! after its backward: candle's graph would hold every op's input until the whole backward pass
//! ends, at the moment when all the parameter gradients exist too (the peak).
//!
//! Either way the layer's backward is written by hand where the fused kernels run on f32 rows
//! ([`LayerCall::backward_by_hand`]): the fused kernels' backward functions and the linear layers' products
//! in reverse order, with no autograd graph, hence none of its zero-filled gradient buffers.
//! Elsewhere (primitive ops, f64) the layer runs with a graph of its own and is backpropagated
//! through it.
//!
//! A CustomOp can only return gradients for its tensor arguments. The parameter gradients
//! therefore go into a [`GradSink`], and `Transformer::backward` moves them into the
//! `GradStore` that the optimizer reads.
//!
//! **Optimizer in backward** (`optimizer_in_backward`, [`GradSink::streams`]). The update of a
//! step needs the global gradient norm (clipping, the non-finite check) before it touches any
//! weight, so the gradients that would be the step's largest buffers are made twice. The first
//! backward pass keeps only their squared norms: each decoder layer's, as its backward ends
//! ([`GradSink`] reduces them), and the fused log-prob head's projection's, made a block of
//! vocabulary rows at a time ([`StreamedRows`]; the rows the embedding lookups add into are
//! kept, and when the projection is the tied embedding they are added there). With the norm
//! known, the second pass ([`LayerReplay`]) makes them again, a layer or a block at a time, and
//! hands each part to the optimizer as soon as it exists. Same values to the bit: the second
//! pass repeats the first one's products (the head's backward makes its logits and `dW` in the
//! same blocks whether or not it streams).
//!
//! **Sparse embedding gradients.** candle's backward of the embedding lookup materialises a
//! dense `[vocab, H]` zero tensor, adds the rows into it, and then adds that into the tied
//! output projection's gradient: ~4 passes over 113 MB for SmolLM2 to move a few hundred rows.
//! With this option, the lookup's output is a leaf variable of the graph. `Transformer::backward`
//! then adds its gradient rows into the embedding's gradient in place.

use crate::error::Result;
use crate::model::kernels::{storage_to_tensor, tensor_to_storage};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Which of the module's options a model uses (all off by default; the trainer turns
/// `sparse_embedding_grad` and `layer_graphs` on, and `gradient_checkpointing` from the config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackwardOptions {
    pub gradient_checkpointing: bool,
    pub sparse_embedding_grad: bool,
    /// Each decoder layer keeps its activations in a graph of its own, freed as soon as the
    /// layer's backward has run (instead of when the whole backward pass ends). Same numbers,
    /// no recomputation; ignored when `gradient_checkpointing` is on.
    pub layer_graphs: bool,
}

/// A lookup's leaf output and the token ids it gathered.
type Lookup = (TensorId, Vec<u32>);

/// Gradients that bypass candle's graph until `Transformer::backward` collects them:
/// parameter gradients of recomputed layers, and the embedding lookups to scatter. When it
/// [streams](Self::streams) (`optimizer_in_backward`), also what the first backward pass left
/// for the second: the squared norms of the gradients it dropped, and the passes to run again.
#[derive(Debug, Default)]
pub struct GradSink {
    params: Mutex<HashMap<TensorId, Tensor>>,
    /// Lookups since the last backward.
    lookups: Mutex<Vec<Lookup>>,
    /// `optimizer_in_backward` is on for the model of this sink: its layer op and its log-prob
    /// head measure their parameters' gradients instead of leaving them here.
    streams: std::sync::atomic::AtomicBool,
    /// `Σ g²` of each streamed parameter's dropped gradient.
    norms: Mutex<HashMap<TensorId, f64>>,
    /// The layers' backward to run again.
    replay: Mutex<Option<Replay>>,
    /// Matrices whose gradient is made again a block of rows at a time.
    rows: Mutex<Vec<StreamedRows>>,
}

/// Where the second pass of `optimizer_in_backward` hands a gradient over: the parameter, the
/// index of the first value given, the values (a whole gradient, or a run of rows, in order).
pub type HandOver<'a> = &'a mut dyn FnMut(TensorId, usize, &[f32]) -> Result<()>;

/// The second backward pass of the decoder layers (`optimizer_in_backward`): from the gradient
/// of the layers' output and each layer's input, kept by the first pass, it recomputes each
/// layer (last first) and hands its parameter gradients over as soon as that layer is done.
pub trait LayerReplay: Send + Sync {
    /// Run it; `done` receives each parameter's gradient (and may change the parameter: the
    /// layers below never read it).
    fn run(self: Box<Self>, sink: &GradSink, done: HandOver) -> Result<()>;
}

/// A [`LayerReplay`] held by the sink.
pub struct Replay(Box<dyn LayerReplay>);

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Replay")
    }
}

/// Makes the gradient of rows `start..start + out.len() / cols` of a matrix into `out`.
pub type RowBlock = Box<dyn Fn(usize, &mut [f32]) -> Result<()> + Send + Sync>;

/// A `[rows, cols]` matrix parameter (the output projection, an embedding) whose gradient
/// `optimizer_in_backward` never holds whole: the first pass measures it a block of rows at a
/// time, keeping only each row's `Σ g²` and the rows that other gradients add into (the
/// embedding lookups' tokens); the second makes each block again and hands it over.
pub struct StreamedRows {
    id: TensorId,
    rows: usize,
    cols: usize,
    /// The part of the gradient made by blocks (the projection's), or none (zeros: an
    /// embedding that only lookups reach).
    block: Option<RowBlock>,
    /// The kept rows' values: the block's, plus what was added since.
    kept: std::collections::BTreeMap<u32, Vec<f32>>,
    /// `Σ g²` of each row (a kept row's is redone when the norm is taken).
    row_sums: Vec<f64>,
}

impl std::fmt::Debug for StreamedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StreamedRows([{}, {}], {} kept)",
            self.rows,
            self.cols,
            self.kept.len()
        )
    }
}

impl StreamedRows {
    /// Rows per block: about a quarter of the matrix (so that small test models have several
    /// blocks), at most 4096 (`[4096, H]` f32 at a time), a multiple of 64.
    pub(crate) fn block_rows(rows: usize) -> usize {
        (rows / 4).div_ceil(64).clamp(1, 64) * 64
    }

    /// The first pass over a `[rows, cols]` matrix `id`: each row's `Σ g²` of what `block`
    /// makes (zeros without one), and the rows `keep` (ids past the matrix are ignored).
    pub fn measure(
        id: TensorId,
        rows: usize,
        cols: usize,
        block: Option<RowBlock>,
        keep: impl IntoIterator<Item = u32>,
    ) -> Result<Self> {
        let mut kept: std::collections::BTreeMap<u32, Vec<f32>> = keep
            .into_iter()
            .filter(|&t| (t as usize) < rows)
            .map(|t| (t, vec![0f32; cols]))
            .collect();
        let mut row_sums = vec![0f64; rows];
        if let Some(f) = &block {
            let per = Self::block_rows(rows);
            let mut buf = vec![0f32; per.min(rows) * cols];
            for start in (0..rows).step_by(per) {
                let r = per.min(rows - start);
                let b = &mut buf[..r * cols];
                f(start, b)?;
                row_sums[start..start + r].copy_from_slice(&crate::optim::row_sums_of_squares(b, cols));
                for (&t, row) in kept.range_mut(start as u32..(start + r) as u32) {
                    let at = (t as usize - start) * cols;
                    row.copy_from_slice(&b[at..at + cols]);
                }
            }
        }
        Ok(StreamedRows {
            id,
            rows,
            cols,
            block,
            kept,
            row_sums,
        })
    }

    /// `row[ids[r]] += src[r]` for each row r of `src` `[N, cols]`, in order (what
    /// [`ScatterAddRows`] does to a whole gradient).
    fn add_rows(&mut self, ids: &[u32], src: &[f32]) -> Result<()> {
        if src.len() != ids.len() * self.cols {
            return Err(crate::error::Error::msg(
                "streamed rows: a lookup's rows do not match its ids",
            ));
        }
        for (r, t) in ids.iter().enumerate() {
            let Some(row) = self.kept.get_mut(t) else {
                return Err(crate::error::Error::msg(format!(
                    "streamed rows: token {t} was looked up but its row was not kept"
                )));
            };
            for (d, &s) in row.iter_mut().zip(&src[r * self.cols..(r + 1) * self.cols]) {
                *d += s;
            }
        }
        Ok(())
    }

    /// `Σ g²` of the whole gradient, once everything is added: the rows' sums in row order (as
    /// [`crate::optim::squared_norm`] adds them).
    fn squared_norm(&mut self) -> f64 {
        for (&t, row) in &self.kept {
            self.row_sums[t as usize] = crate::optim::row_sums_of_squares(row, self.cols)[0];
        }
        self.row_sums.iter().sum()
    }
}

impl LayerReplay for StreamedRows {
    fn run(self: Box<Self>, _sink: &GradSink, done: HandOver) -> Result<()> {
        let per = Self::block_rows(self.rows);
        let mut buf = vec![0f32; per.min(self.rows) * self.cols];
        for start in (0..self.rows).step_by(per) {
            let r = per.min(self.rows - start);
            let b = &mut buf[..r * self.cols];
            match &self.block {
                Some(f) => f(start, b)?,
                None => b.fill(0.0),
            }
            for (&t, row) in self.kept.range(start as u32..(start + r) as u32) {
                let at = (t as usize - start) * self.cols;
                b[at..at + self.cols].copy_from_slice(row);
            }
            done(self.id, start * self.cols, b)?;
        }
        Ok(())
    }
}

impl GradSink {
    /// Add `grad` to the gradient held for the tensor `id`.
    pub fn add(&self, id: TensorId, grad: Tensor) -> candle_core::Result<()> {
        let mut map = self
            .params
            .lock()
            .map_err(|_| candle_core::Error::Msg("gradient sink poisoned".into()))?;
        let sum = match map.remove(&id) {
            Some(g) => (g + grad)?,
            None => grad,
        };
        map.insert(id, sum);
        Ok(())
    }

    /// Replace the gradients held for `params` by their squared norms (the first pass of
    /// `optimizer_in_backward`, after a layer's backward). A parameter measured twice means the
    /// layers were backpropagated twice in one pass, which streaming cannot sum: an error.
    fn reduce_to_norms(&self, params: &[&Tensor]) -> Result<()> {
        let mut held = self.params.lock().map_err(poisoned)?;
        let mut norms = self.norms.lock().map_err(poisoned)?;
        for p in params {
            let Some(g) = held.remove(&p.id()) else { continue };
            if norms.insert(p.id(), crate::optim::squared_norm(&g)?).is_some() {
                return Err(twice());
            }
        }
        Ok(())
    }

    /// Whether `optimizer_in_backward` is on for the model of this sink (the one place that
    /// says so).
    pub fn streams(&self) -> bool {
        self.streams.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turn streaming on or off (the model's `set_optimizer_in_backward`).
    pub fn set_streams(&self, on: bool) {
        self.streams.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every token id the lookups since the last backward gathered.
    pub fn lookup_ids(&self) -> Result<std::collections::BTreeSet<u32>> {
        let lookups = self.lookups.lock().map_err(poisoned)?;
        Ok(lookups.iter().flat_map(|(_, ids)| ids.iter().copied()).collect())
    }

    /// Hold a matrix's streamed gradient (one per matrix per step).
    pub fn add_rows(&self, rows: StreamedRows) -> Result<()> {
        let mut held = self.rows.lock().map_err(poisoned)?;
        if held.iter().any(|r| r.id == rows.id) {
            return Err(twice());
        }
        held.push(rows);
        Ok(())
    }

    /// Take the gradients held for `params`.
    fn take(&self, params: &[&Tensor]) -> Result<Vec<(TensorId, Tensor)>> {
        let mut held = self.params.lock().map_err(poisoned)?;
        Ok(params
            .iter()
            .filter_map(|p| held.remove(&p.id()).map(|g| (p.id(), g)))
            .collect())
    }

    /// The squared norms of the gradients the first pass dropped (and forget them).
    pub fn take_norms(&self) -> Result<HashMap<TensorId, f64>> {
        Ok(std::mem::take(&mut *self.norms.lock().map_err(poisoned)?))
    }

    /// The second passes the first one left: the layers' and the streamed matrices' (and
    /// forget them).
    pub fn take_replays(&self) -> Result<Vec<Box<dyn LayerReplay>>> {
        let mut all: Vec<Box<dyn LayerReplay>> = Vec::new();
        if let Some(r) = self.replay.lock().map_err(poisoned)?.take() {
            all.push(r.0);
        }
        for r in std::mem::take(&mut *self.rows.lock().map_err(poisoned)?) {
            all.push(Box::new(r));
        }
        Ok(all)
    }

    fn set_replay(&self, r: Box<dyn LayerReplay>) -> Result<()> {
        let mut slot = self.replay.lock().map_err(poisoned)?;
        if slot.is_some() {
            return Err(twice());
        }
        *slot = Some(Replay(r));
        Ok(())
    }

    /// The embedding rows `[N, H]` of `ids` `[N]` from `table` `[V, H]`, as a leaf variable whose
    /// lookup is recorded for [`Self::collect`] (sparse embedding gradients).
    pub fn lookup(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let rows = Var::from_tensor(&table.detach().index_select(ids, 0)?)?;
        let ids: Vec<u32> = ids.to_vec1()?;
        self.lookups
            .lock()
            .map_err(poisoned)?
            .push((rows.as_tensor().id(), ids));
        Ok(rows.as_tensor().clone())
    }

    /// Move what this sink holds into `grads`: the gradients of `params` that layer ops left
    /// here, and the recorded lookups' row gradients scattered into `embedding`'s gradient.
    /// Lookups of forward passes that were never backpropagated are dropped.
    pub fn collect<'a>(
        &self,
        grads: &mut GradStore,
        params: impl IntoIterator<Item = &'a Tensor>,
        embedding: &Tensor,
    ) -> Result<()> {
        let mut held = self.params.lock().map_err(poisoned)?;
        for p in params {
            if let Some(g) = held.remove(&p.id()) {
                let g = match grads.get(p) {
                    Some(other) => (other + g)?,
                    None => g,
                };
                grads.insert(p, g);
            }
        }
        drop(held);
        let lookups = std::mem::take(&mut *self.lookups.lock().map_err(poisoned)?);
        let mut streamed = self.rows.lock().map_err(poisoned)?;
        // streaming, an embedding that only its lookups reach is streamed too (its whole
        // gradient would be a `[V, H]` buffer of zeros but for those rows)
        let reached = lookups.iter().any(|(id, _)| grads.get_id(*id).is_some());
        if self.streams()
            && reached
            && embedding.is_variable()
            && embedding.dtype() == candle_core::DType::F32
            && grads.get(embedding).is_none()
            && !streamed.iter().any(|r| r.id == embedding.id())
        {
            let (v, h) = embedding.dims2()?;
            let ids = lookups.iter().flat_map(|(_, ids)| ids.iter().copied());
            streamed.push(StreamedRows::measure(embedding.id(), v, h, None, ids)?);
        }
        for (id, ids) in lookups {
            let Some(rows) = grads.get_id(id).cloned() else {
                continue;
            };
            if let Some(s) = streamed.iter_mut().find(|r| r.id == embedding.id()) {
                let rows: Vec<f32> = rows.flatten_all()?.to_vec1()?;
                s.add_rows(&ids, &rows)?;
                continue;
            }
            let dw = match grads.remove(embedding) {
                Some(g) => g.contiguous()?,
                None => embedding.zeros_like()?,
            };
            dw.inplace_op2(&rows.contiguous()?, &ScatterAddRows(&ids))?;
            grads.insert(embedding, dw);
        }
        // the streamed matrices are complete: their norms join the layers'
        let mut norms = self.norms.lock().map_err(poisoned)?;
        for s in streamed.iter_mut() {
            if norms.insert(s.id, s.squared_norm()).is_some() {
                return Err(twice());
            }
        }
        Ok(())
    }
}

/// A decoder layer as [`layers_op`] runs it: its forward with an autograd graph through its
/// parameters, the same forward outside any graph, optionally keeping what its hand-written
/// backward reads, and that backward (parameter gradients into a [`GradSink`]).
pub trait LayerCall: Send + Sync + 'static {
    /// The activations [`Self::backward_by_hand`] reads.
    type Kept: Send + Sync;
    /// The forward with a graph through the parameters (the input is a fresh variable).
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The forward without any graph.
    fn forward_untracked(&self, x: &Tensor) -> Result<Tensor>;
    /// The forward without any graph, keeping the activations; `None` where the hand-written
    /// backward does not apply (the layer then runs with a graph of its own).
    fn forward_keeping(&self, x: &Tensor) -> Result<Option<(Tensor, Self::Kept)>>;
    /// The input gradient for the output gradient `dy`; parameter gradients go to `sink`.
    fn backward_by_hand(&self, kept: &Self::Kept, dy: &Tensor, sink: &GradSink) -> Result<Tensor>;
    /// The parameters (their ids receive the gradients).
    fn params(&self) -> Vec<&Tensor>;
    /// Gradient checkpointing's backward: the layer recomputed from its input `x`, keeping its
    /// activations, then [`Self::backward_by_hand`]; `None` where that does not apply. A layer
    /// that must fetch its weights (widen them from storage) does so once for both.
    fn recompute_backward(&self, x: &Tensor, dy: &Tensor, sink: &GradSink) -> Result<Option<Tensor>> {
        match self.forward_keeping(x)? {
            Some((_, kept)) => Ok(Some(self.backward_by_hand(&kept, dy, sink)?)),
            None => Ok(None),
        }
    }
}

/// The decoder layers as one op of the model's graph; see the module docs.
struct CheckpointedLayers<L: LayerCall> {
    calls: Arc<Vec<L>>,
    sink: Arc<GradSink>,
    /// Keep each layer's activations (or graph) for backward (layer graphs), or only its input
    /// (checkpointing).
    keep: bool,
    /// Its sink [streams](GradSink::streams) (when the op was made).
    stream: bool,
    /// What the forward saved for each layer's backward, until backward takes it. Layer 0's
    /// input is the op's argument, which candle's graph holds anyway.
    saved: Mutex<Vec<Saved<L::Kept>>>,
    /// With `stream`: the input of each layer after the first, for the second backward pass.
    inputs: Mutex<Vec<Tensor>>,
}

/// What a layer op's forward saves for its backward.
enum Saved<A> {
    /// Nothing beyond the layer's input (checkpointing: the layer is recomputed).
    Input(Option<Tensor>),
    /// The input variable and the output, with the layer's own autograd graph.
    Graph(Var, Tensor),
    /// The activations of the hand-written backward.
    Activations(A),
}

fn msg(e: crate::error::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// What [`run_layers`] returns: the output, what each layer saved, the inputs it kept.
type LayersRun<A> = (Tensor, Vec<Saved<A>>, Vec<Tensor>);

/// The layers' forward from `x` (outside any graph), with what each layer's backward needs, and
/// (with `inputs`) each layer's input after the first.
fn run_layers<L: LayerCall>(
    calls: &[L],
    mut x: Tensor,
    keep: bool,
    inputs: bool,
) -> candle_core::Result<LayersRun<L::Kept>> {
    let mut saved = Vec::with_capacity(calls.len());
    let mut kept_inputs = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        if inputs && i > 0 {
            kept_inputs.push(x.clone());
        }
        let (y, kept) = match keep {
            false => {
                let y = call.forward_untracked(&x).map_err(msg)?;
                (y, Saved::Input((i > 0).then_some(x)))
            }
            true => match call.forward_keeping(&x).map_err(msg)? {
                Some((y, acts)) => (y, Saved::Activations(acts)),
                None => {
                    let x = Var::from_tensor(&x)?;
                    let y = call.forward(x.as_tensor()).map_err(msg)?;
                    (y.clone(), Saved::Graph(x, y))
                }
            },
        };
        saved.push(kept);
        x = y;
    }
    Ok((x, saved, kept_inputs))
}

/// One layer's backward: its input gradient for the output gradient `dy`, from what its forward
/// saved (freed when this returns), parameter gradients into `sink`; `arg` is the layer's input
/// when it was not saved.
fn layer_bwd<L: LayerCall>(
    call: &L,
    saved: Saved<L::Kept>,
    arg: &Tensor,
    dy: &Tensor,
    sink: &GradSink,
) -> candle_core::Result<Tensor> {
    let (x, y) = match saved {
        Saved::Activations(acts) => return call.backward_by_hand(&acts, dy, sink).map_err(msg),
        Saved::Graph(x, y) => (x, y),
        Saved::Input(input) => {
            let x = input.unwrap_or_else(|| arg.detach());
            if let Some(dx) = call.recompute_backward(&x, dy, sink).map_err(msg)? {
                return Ok(dx);
            }
            let x = Var::from_tensor(&x)?;
            let y = call.forward(x.as_tensor()).map_err(msg)?;
            (x, y)
        }
    };
    // d/dy Σ y·g = g: backpropagating this gives the layer's vector-Jacobian products
    let grads = (y * dy.detach())?.sum_all()?.backward()?;
    for p in call.params() {
        if let Some(g) = grads.get(p) {
            sink.add(p.id(), g.clone())?;
        }
    }
    grads
        .get(x.as_tensor())
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg("a decoder layer's input received no gradient".into()))
}

fn locked<T>(m: &Mutex<T>) -> candle_core::Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| candle_core::Error::Msg("layer op poisoned".into()))
}

impl<L: LayerCall> CustomOp1 for CheckpointedLayers<L> {
    fn name(&self) -> &'static str {
        "checkpointed-layers"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = storage_to_tensor(s, l, self.name())?;
        let (y, saved, inputs) = run_layers(&self.calls, x, self.keep, self.stream)?;
        *locked(&self.saved)? = saved;
        *locked(&self.inputs)? = inputs;
        tensor_to_storage(&y, self.name())
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let mut saved = std::mem::take(&mut *locked(&self.saved)?);
        if saved.len() != self.calls.len() {
            // a second backward pass through this graph: the layers are recomputed
            saved = run_layers(&self.calls, arg.detach(), false, false)?.1;
        }
        // the last layer first; each layer's saved input or activations are freed after its
        // backward, so the gradients that accumulate replace them
        let mut dy = grad_res.clone();
        for (call, kept) in self.calls.iter().zip(saved.drain(..)).rev() {
            dy = layer_bwd(call, kept, arg, &dy, &self.sink)?;
            if self.stream {
                self.sink.reduce_to_norms(&call.params()).map_err(msg)?;
            }
        }
        if self.stream {
            let inputs = std::mem::take(&mut *locked(&self.inputs)?);
            if inputs.len() + 1 != self.calls.len() {
                candle_core::bail!("optimizer_in_backward: the layer op's inputs were not kept (a second backward pass through one graph)")
            }
            let replay = SecondPass {
                calls: self.calls.clone(),
                first_input: arg.detach(),
                inputs,
                dy: grad_res.detach(),
            };
            self.sink.set_replay(Box::new(replay)).map_err(msg)?;
        }
        Ok(Some(dy))
    }
}

/// The [`LayerReplay`] of a layer op.
struct SecondPass<L: LayerCall> {
    calls: Arc<Vec<L>>,
    first_input: Tensor,
    /// The input of each layer after the first.
    inputs: Vec<Tensor>,
    /// The gradient of the last layer's output.
    dy: Tensor,
}

impl<L: LayerCall> LayerReplay for SecondPass<L> {
    fn run(self: Box<Self>, sink: &GradSink, done: HandOver) -> Result<()> {
        let SecondPass {
            calls,
            first_input,
            mut inputs,
            mut dy,
        } = *self;
        for call in calls.iter().rev() {
            // each input is dropped once its layer has run
            let x = inputs.pop().unwrap_or_else(|| first_input.clone());
            dy = layer_bwd(call, Saved::Input(Some(x)), &first_input, &dy, sink)?;
            for (id, g) in sink.take(&call.params())? {
                crate::optim::with_f32(&g, |g| done(id, 0, g))??;
            }
        }
        Ok(())
    }
}

/// The decoder layers `calls`, in order, as one op whose parameter gradients go to `sink`:
/// recomputed in backward from each layer's input (`keep = false`, gradient checkpointing) or
/// kept until the layer's backward (`keep = true`, [`BackwardOptions::layer_graphs`]). Either
/// way each layer's saved tensors are freed as soon as its backward has run; in candle's graph
/// the stack is one node, so the layers' inputs are not held there until the whole backward
/// pass ends. When the sink [streams](GradSink::streams) the backward leaves squared norms and
/// a second pass there instead of the parameter gradients.
pub fn layers_op<L: LayerCall>(calls: Vec<L>, x: &Tensor, sink: &Arc<GradSink>, keep: bool) -> Result<Tensor> {
    let op = CheckpointedLayers {
        calls: Arc::new(calls),
        sink: sink.clone(),
        keep,
        stream: sink.streams(),
        saved: Mutex::new(Vec::new()),
        inputs: Mutex::new(Vec::new()),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// `dst[ids[r]] += src[r]` for every row r of `src` `[N, H]` into `dst` `[V, H]`, in place.
struct ScatterAddRows<'a>(&'a [u32]);

impl candle_core::InplaceOp2 for ScatterAddRows<'_> {
    fn name(&self) -> &'static str {
        "scatter-add-rows"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout) -> candle_core::Result<()> {
        fn go<T: Copy + std::ops::AddAssign>(dst: &mut [T], src: &[T], ids: &[u32], h: usize) {
            for (r, &t) in ids.iter().enumerate() {
                let row = &src[r * h..(r + 1) * h];
                for (d, &s) in dst[t as usize * h..(t as usize + 1) * h].iter_mut().zip(row) {
                    *d += s;
                }
            }
        }
        let (Some((d0, d1)), Some((s0, s1))) = (dl.contiguous_offsets(), sl.contiguous_offsets()) else {
            candle_core::bail!("scatter-add-rows: both tensors must be contiguous")
        };
        let h = dl.dims()[1];
        if sl.dims() != [self.0.len(), h] || self.0.iter().any(|&t| (t as usize + 1) * h > d1 - d0) {
            candle_core::bail!(
                "scatter-add-rows: shapes {:?} and {:?} do not match the ids",
                dl.dims(),
                sl.dims()
            )
        }
        match (dst, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => go(&mut d[d0..d1], &s[s0..s1], self.0, h),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => go(&mut d[d0..d1], &s[s0..s1], self.0, h),
            _ => candle_core::bail!("scatter-add-rows: only f32 and f64, of one dtype"),
        }
        Ok(())
    }
}

fn twice() -> crate::error::Error {
    crate::error::Error::msg(
        "optimizer_in_backward: the decoder layers were backpropagated twice before the optimizer step (the \
         algorithm runs more than one forward pass of the policy per step); turn optimizer_in_backward off",
    )
}

fn poisoned<T>(_: T) -> crate::error::Error {
    crate::error::Error::msg("gradient sink poisoned")
}
