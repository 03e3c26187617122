//! A frozen model (the live DPO reference) whose decoder layers stay in the checkpoint's own
//! precision: GGUF quantised blocks, or bf16/f16 safetensors. Each forward pass widens one
//! layer at a time and drops it after use, exactly as the loader widens them for the trained
//! model, so the reference computes the same numbers as a full-precision copy while holding
//! about a fifth (Q4_1) or half (bf16) of its layer weights. The embedding, final norm and
//! heads stay in the model's dtype.

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::kernels::{matmul, CpuPath};
use crate::model::llama::{Block, LayerStore};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;

/// One tensor as the checkpoint stores it.
pub enum Stored {
    /// A tensor widened with `to_dtype` on use (bf16/f16 → f32 is exact).
    Dense(Tensor),
    /// GGUF blocks, dequantised on use, with the Q/K rows un-permuted to HF's layout (heads).
    Quantized { q: QTensor, unpermute_heads: Option<usize> },
}

impl Stored {
    fn widen(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        match self {
            Stored::Dense(t) => Ok(t.to_dtype(dtype)?),
            Stored::Quantized { q, unpermute_heads } => {
                let mut t = q.dequantize(device)?;
                if let Some(h) = unpermute_heads {
                    t = unpermute_qk(&t, *h)?;
                }
                Ok(t.to_dtype(dtype)?)
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Stored::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Stored::Quantized { q, .. } => q.storage_size_in_bytes(),
        }
    }
}

/// The decoder layers of a frozen model, stored compactly and widened layer by layer.
pub struct CompactLayers {
    tensors: HashMap<String, Stored>,
    /// Each layer's tensor names, in [`Block::build`]'s order.
    names: Vec<Vec<String>>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for CompactLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CompactLayers({} layers, {} bytes)", self.names.len(), self.bytes())
    }
}

/// The names of layer `i`'s tensors, in [`Block::build`]'s order.
pub fn layer_tensor_names(cfg: &ModelConfig, i: usize) -> Result<Vec<String>> {
    let mut names = Vec::new();
    Block::build(cfg, i, &mut |name, _| {
        names.push(name);
        Ok(Tensor::zeros((), DType::F32, &Device::Cpu)?)
    })?;
    Ok(names)
}

impl CompactLayers {
    /// Layers from `tensors` (every layer tensor of `cfg` by its HF name), widened to `dtype`.
    pub fn new(cfg: &ModelConfig, tensors: HashMap<String, Stored>, dtype: DType, device: &Device) -> Result<Self> {
        let names = (0..cfg.num_hidden_layers)
            .map(|i| layer_tensor_names(cfg, i))
            .collect::<Result<Vec<_>>>()?;
        if let Some(missing) = names.iter().flatten().find(|n| !tensors.contains_key(*n)) {
            return Err(Error::msg(format!("compact layers: tensor `{missing}` is missing")));
        }
        Ok(CompactLayers {
            tensors,
            names,
            dtype,
            device: device.clone(),
        })
    }

    /// Layer `i` in the model's dtype (its tensors are widened in parallel).
    pub fn layer(&self, cfg: &ModelConfig, i: usize) -> Result<Block> {
        let widened: HashMap<&str, Tensor> = self.names[i]
            .par_iter()
            .map(|n| Ok((n.as_str(), self.tensors[n].widen(self.dtype, &self.device)?)))
            .collect::<Result<_>>()?;
        Block::build(cfg, i, &mut |name, _| {
            widened
                .get(name.as_str())
                .cloned()
                .ok_or_else(|| Error::msg(format!("compact layers: no tensor `{name}`")))
        })
    }

    /// Bytes held by the stored tensors.
    pub fn bytes(&self) -> usize {
        self.tensors.values().map(Stored::bytes).sum()
    }

    /// Bytes the same layers take widened to the model's dtype.
    pub fn widened_bytes(&self) -> usize {
        let elems: usize = self
            .tensors
            .values()
            .map(|s| match s {
                Stored::Dense(t) => t.elem_count(),
                Stored::Quantized { q, .. } => q.shape().elem_count(),
            })
            .sum();
        elems * self.dtype.size_in_bytes()
    }
}

/// The decoder layers of a frozen model for `bf16 = true` on a CPU with a fast bf16 product
/// (AVX512-BF16 or AMX): each projection's `Wᵀ` rounded to bf16 and packed once into the tiles
/// the bf16 products multiply by ([`matmul::Rhs`]), the norms (and biases) copied as they are. The
/// products are those of the same layers held in f32, bit for bit (the same tiles, made once
/// instead of at every forward pass), from half the bytes; the layers' f32 weights are not
/// kept, so [`Self::layer`] gives placeholders for them ([`LayerStore::holds_weights`]).
pub struct PackedLayers {
    blocks: Vec<Block>,
}

impl std::fmt::Debug for PackedLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedLayers({} layers, {} bytes)", self.blocks.len(), self.bytes())
    }
}

impl PackedLayers {
    /// `layers` (f32, dense) packed; `None` where the CPU has no fast bf16 product (the tiles
    /// would be f32 copies, no smaller than the weights).
    pub fn new(layers: &[Block]) -> Result<Option<Self>> {
        if !CpuPath::Avx512Bf16.allows() {
            return Ok(None);
        }
        let blocks = layers
            .iter()
            .map(|b| {
                // norms and biases copied: the layers they come from may be trained in place
                let mut b = b.map_tensors(|t| t.detach());
                b.input_layernorm = b.input_layernorm.copy()?;
                b.post_attention_layernorm = b.post_attention_layernorm.copy()?;
                for l in b.linears_mut() {
                    l.bias = l.bias.as_ref().map(|t| t.copy()).transpose()?;
                    let (n, k) = l.weight.dims2()?;
                    let rhs = matmul::with_f32(&l.weight, |w| matmul::Rhs::new(matmul::View::row_major(w, n, k).t()))?;
                    l.packed = Some(std::sync::Arc::new(rhs));
                    // a placeholder of the weight's shape (one value): NaN, so that a product
                    // that ever read it instead of the tiles would show
                    l.weight = Tensor::new(f32::NAN, l.weight.device())?.broadcast_as((n, k))?;
                }
                Ok(b)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(PackedLayers { blocks }))
    }

    fn bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| {
                let norms = 2 * b.input_layernorm.elem_count() * 4;
                let lin: usize = crate::model::lora::Module::ALL
                    .iter()
                    .map(|&m| b.linear(m))
                    .map(|l| {
                        l.packed.as_ref().map_or(0, |r| r.bytes()) + l.bias.as_ref().map_or(0, |t| t.elem_count() * 4)
                    })
                    .sum();
                norms + lin
            })
            .sum()
    }
}

impl LayerStore for PackedLayers {
    fn layer(&self, _cfg: &ModelConfig, i: usize) -> Result<Block> {
        self.blocks
            .get(i)
            .cloned()
            .ok_or_else(|| Error::msg(format!("packed layers: no layer {i}")))
    }
    fn bytes(&self) -> usize {
        PackedLayers::bytes(self)
    }
    fn widened_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.tensors().iter().map(|t| t.elem_count() * 4).sum::<usize>())
            .sum()
    }
    fn holds_weights(&self) -> bool {
        false
    }
}

/// Undo llama.cpp's permutation of Q/K rows: the converter did
/// `W.reshape(h, 2, rows/h/2, cols).swap(1, 2)`; this applies the inverse.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

impl LayerStore for CompactLayers {
    fn layer(&self, cfg: &ModelConfig, i: usize) -> Result<Block> {
        CompactLayers::layer(self, cfg, i)
    }
    fn bytes(&self) -> usize {
        CompactLayers::bytes(self)
    }
    fn widened_bytes(&self) -> usize {
        CompactLayers::widened_bytes(self)
    }
}
