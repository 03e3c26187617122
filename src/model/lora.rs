//! LoRA adapters in PEFT's format: a frozen base model plus, on each adapted linear layer
//! `y = x·Wᵀ`, a trainable low-rank update `y += s · dropout(x)·Aᵀ·Bᵀ` with `A` `[r, in]`,
//! `B` `[out, r]` and `s = lora_alpha / r` (`lora_alpha / √r` with rsLoRA).
//!
//! - Initialisation is PEFT's: `A` Kaiming-uniform (`a = √5`: uniform in ±1/√in), `B` zero,
//!   so the adapted model starts exactly at the base.
//! - The base's layers may stay in their stored precision (GGUF blocks, bf16 safetensors) and
//!   are widened one layer at a time, forward and backward; no gradient is computed for them.
//! - Dropout (PEFT's `lora_dropout`, on the adapter's input only) draws its mask from a hash
//!   of (seed, step, forward pass, layer, module, element), so a layer recomputed by gradient
//!   checkpointing, a resumed run and an uninterrupted one see the same masks.
//! - On disk: `adapter_config.json` and `adapter_model.safetensors` with PEFT's tensor names
//!   (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, modules to save as
//!   `base_model.model.score.weight`), which `peft.PeftModel.from_pretrained` loads.

use crate::error::{Error, Result};
use crate::model::autograd::GradSink;
use crate::model::config::ModelConfig;
use crate::model::kernels::{matmul, Kernels};
use crate::util::{read_to_string, write_atomic};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix PEFT gives every tensor of a `PeftModel` wrapping a transformers model.
const PEFT_PREFIX: &str = "base_model.model.";

/// A linear layer of a decoder layer that LoRA can adapt, by PEFT's module name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Module {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Module::QProj,
        Module::KProj,
        Module::VProj,
        Module::OProj,
        Module::GateProj,
        Module::UpProj,
        Module::DownProj,
    ];

    /// PEFT's (and transformers') module name: `q_proj`, ...
    pub fn name(self) -> &'static str {
        match self {
            Module::QProj => "q_proj",
            Module::KProj => "k_proj",
            Module::VProj => "v_proj",
            Module::OProj => "o_proj",
            Module::GateProj => "gate_proj",
            Module::UpProj => "up_proj",
            Module::DownProj => "down_proj",
        }
    }

    /// The module's path inside a decoder layer (`self_attn.q_proj`).
    pub fn path(self) -> String {
        let parent = match self {
            Module::QProj | Module::KProj | Module::VProj | Module::OProj => "self_attn",
            _ => "mlp",
        };
        format!("{parent}.{}", self.name())
    }

    fn index(self) -> usize {
        Module::ALL.iter().position(|&m| m == self).expect("listed")
    }

    /// `(out, in)` of the module's weight in a model of `cfg`.
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        let (hs, q, kv, is) = (
            cfg.hidden_size,
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
            cfg.intermediate_size,
        );
        match self {
            Module::QProj => (q, hs),
            Module::KProj | Module::VProj => (kv, hs),
            Module::OProj => (hs, q),
            Module::GateProj | Module::UpProj => (is, hs),
            Module::DownProj => (hs, is),
        }
    }

    /// The modules named by `names`: PEFT's module names, or `all-linear` (every linear layer
    /// of the decoder layers; the output head is never adapted). `None` gives PEFT's default
    /// for the Llama family, `q_proj` and `v_proj`.
    pub fn parse_targets(names: Option<&[String]>) -> Result<Vec<Module>> {
        let Some(names) = names else {
            return Ok(vec![Module::QProj, Module::VProj]);
        };
        let mut out = Vec::new();
        for n in names {
            if n == "all-linear" || n == "all_linear" {
                return Ok(Module::ALL.to_vec());
            }
            let m = Module::ALL.iter().find(|m| m.name() == n).ok_or_else(|| {
                let known: Vec<&str> = Module::ALL.iter().map(|m| m.name()).collect();
                Error::Config(format!(
                    "lora_target_modules: `{n}` is not a linear layer of this model family; use any of {} or \"all-linear\"",
                    known.join(", ")
                ))
            })?;
            if !out.contains(m) {
                out.push(*m);
            }
        }
        if out.is_empty() {
            return Err(Error::Config(
                "lora_target_modules is empty: name at least one module".into(),
            ));
        }
        out.sort();
        Ok(out)
    }
}

/// What an adapter is: PEFT's `LoraConfig` fields prefer reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Module>,
    pub use_rslora: bool,
    /// Base-model parameters trained fully and saved with the adapter (`score` of a reward
    /// model), by module name.
    pub modules_to_save: Vec<String>,
    /// The base model as the run named it (`base_model_name_or_path`).
    pub base: String,
    /// `CAUSAL_LM`, or `SEQ_CLS` for a reward model.
    pub task_type: String,
}

impl LoraSpec {
    /// `s` of `y += s · B·A·x`: `lora_alpha / r`, or `lora_alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether the base parameter `name` (`score.weight`) is one of the modules to save.
    pub fn saves(&self, name: &str) -> bool {
        let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
        self.modules_to_save
            .iter()
            .any(|m| module == m || module.ends_with(&format!(".{m}")))
    }
}

/// Dropout on an adapter's input: probability `p`, mask drawn from `key`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub key: u64,
}

/// SplitMix64's finaliser: a 64-bit hash good enough to draw dropout masks from.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of one draw from several integers (seed, step, forward pass, layer, module).
pub fn dropout_key(parts: &[u64]) -> u64 {
    parts.iter().fold(0x005E_ED0F_D80F_u64, |h, &p| {
        mix64(h ^ p.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    })
}

impl Dropout {
    /// The mask `[rows, cols]`: 0 where dropped, `1/(1−p)` where kept (as `torch.nn.Dropout`).
    pub fn mask(&self, rows: usize, cols: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        use rayon::prelude::*;
        let keep = 1.0 / (1.0 - self.p);
        // keep element i when its hash's top 24 bits, as a fraction, are ≥ p
        let threshold = (self.p * (1u64 << 24) as f64).round() as u64;
        let mut v = vec![0f32; rows * cols];
        v.par_chunks_mut(cols.max(1)).enumerate().for_each(|(r, row)| {
            let base = self.key ^ ((r as u64) << 32);
            for (c, x) in row.iter_mut().enumerate() {
                let h = mix64(base.wrapping_add((c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
                *x = if (h >> 40) >= threshold { keep as f32 } else { 0.0 };
            }
        });
        Ok(Tensor::from_vec(v, (rows, cols), device)?.to_dtype(dtype)?)
    }
}

/// One adapted linear layer's pair: `y += scale · dropout(x)·Aᵀ·Bᵀ`.
#[derive(Clone, Debug)]
pub struct Lora {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    pub scale: f64,
    /// Dropout of this forward pass (training only).
    pub dropout: Option<Dropout>,
}

impl Lora {
    /// The adapter's input: `x`, or `x` times the dropout mask (with the mask).
    fn input(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match self.dropout {
            Some(d) if d.p > 0.0 => {
                let (rows, cols) = x.dims2()?;
                let m = d.mask(rows, cols, x.dtype(), x.device())?;
                Ok(((x * &m)?, Some(m)))
            }
            _ => Ok((x.clone(), None)),
        }
    }

    /// `scale · dropout(x)·Aᵀ·Bᵀ` for rows `x` `[rows, in]`.
    pub fn delta(&self, x: &Tensor, k: Kernels) -> Result<Tensor> {
        let (xd, _) = self.input(x)?;
        let lin = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
            if k.bf16_for(x) || k.fused_for(x) && x.dtype() == DType::F32 {
                matmul::linear(x, w, k.bf16_for(x))
            } else {
                Ok(x.matmul(&w.t()?)?)
            }
        };
        Ok((lin(&lin(&xd, &self.a)?, &self.b)? * self.scale)?)
    }

    /// The hand-written backward of [`Self::delta`] for its output gradient `dy`: `x`'s
    /// gradient; `A`'s and `B`'s go to `sink`.
    pub fn backward(&self, x: &Tensor, dy: &Tensor, sink: &GradSink) -> Result<Tensor> {
        // outside any graph: `A` and `B` are variables, and a product with them would record
        // its inputs (every layer's activations, kept alive by the sink until the step's end)
        let (a, b, dy) = (self.a.detach(), self.b.detach(), dy.detach());
        let (xd, mask) = self.input(&x.detach())?;
        let t = xd.matmul(&a.t()?)?; // [rows, r]
        let dys = (dy * self.scale)?;
        sink.add(self.b.id(), dys.t()?.matmul(&t)?)?;
        let dt = dys.matmul(&b)?; // [rows, r]
        sink.add(self.a.id(), dt.t()?.matmul(&xd)?)?;
        let dx = dt.matmul(&a)?;
        Ok(match mask {
            Some(m) => (dx * m)?,
            None => dx,
        })
    }

    pub(crate) fn tensors(&self) -> [&Tensor; 2] {
        [&self.a, &self.b]
    }
}

/// The adapters of a whole model: per decoder layer, `(A, B)` of each adapted module.
#[derive(Clone, Debug)]
pub struct Adapters {
    pub spec: LoraSpec,
    /// `layers[i][m]`: layer i's pair of module `Module::ALL[m]`, if adapted.
    pub layers: Vec<[Option<(Tensor, Tensor)>; 7]>,
    /// Seeds the dropout masks.
    pub seed: u64,
}

/// Which training forward pass a model's adapters are in, for their dropout masks: the trainer
/// sets the step before a step's micro-batches and clears it after; each forward pass of the
/// step takes the next number.
#[derive(Debug, Default)]
pub struct DropoutClock {
    /// `step + 1`, or 0 outside training steps (no dropout).
    step: AtomicU64,
    forwards: AtomicU64,
}

impl DropoutClock {
    pub fn set_step(&self, step: Option<usize>) {
        self.step.store(step.map_or(0, |s| s as u64 + 1), Ordering::SeqCst);
        self.forwards.store(0, Ordering::SeqCst);
    }

    /// The key of the next forward pass, or `None` outside a training step.
    pub fn next_key(&self, seed: u64) -> Option<u64> {
        let step = self.step.load(Ordering::SeqCst);
        (step > 0).then(|| dropout_key(&[seed, step, self.forwards.fetch_add(1, Ordering::SeqCst)]))
    }
}

/// PEFT's name of layer `i`'s `A` (`lora_A`) or `B` (`lora_B`) of `m`.
pub fn tensor_name(i: usize, m: Module, which: &str) -> String {
    format!("{PEFT_PREFIX}model.layers.{i}.{}.{which}.weight", m.path())
}

impl Adapters {
    /// Fresh adapters as PEFT initialises them (`A` uniform in ±1/√in from `seed`, `B` zero).
    pub fn init(cfg: &ModelConfig, spec: LoraSpec, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        if spec.r == 0 {
            return Err(Error::Config("lora_r must be ≥ 1".into()));
        }
        let mut rng = crate::util::Rng::new(seed ^ 0x10BA_u64);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            let mut row: [Option<(Tensor, Tensor)>; 7] = Default::default();
            for &m in &spec.targets {
                let (out, inp) = m.shape(cfg);
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..spec.r * inp)
                    .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, (spec.r, inp), device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((out, spec.r), dtype, device)?;
                row[m.index()] = Some((a, b));
            }
            layers.push(row);
        }
        Ok(Adapters { spec, layers, seed })
    }

    /// Every adapter tensor with its PEFT name, in a fixed order (layer, module, A then B).
    pub fn named(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (i, row) in self.layers.iter().enumerate() {
            for (&m, pair) in Module::ALL.iter().zip(row) {
                if let Some((a, b)) = pair {
                    out.push((tensor_name(i, m, "lora_A"), a));
                    out.push((tensor_name(i, m, "lora_B"), b));
                }
            }
        }
        out
    }

    /// The same adapters with every tensor replaced by `f(name, tensor)`.
    pub fn map(&self, mut f: impl FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Adapters> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, row) in self.layers.iter().enumerate() {
            let mut new: [Option<(Tensor, Tensor)>; 7] = Default::default();
            for (k, (&m, pair)) in Module::ALL.iter().zip(row).enumerate() {
                if let Some((a, b)) = pair {
                    new[k] = Some((f(&tensor_name(i, m, "lora_A"), a)?, f(&tensor_name(i, m, "lora_B"), b)?));
                }
            }
            layers.push(new);
        }
        Ok(Adapters {
            spec: self.spec.clone(),
            layers,
            seed: self.seed,
        })
    }

    /// Layer `i`'s adapters as [`Lora`]s, each module's dropout keyed from `forward_key`.
    pub fn layer(&self, i: usize, forward_key: Option<u64>) -> [Option<Lora>; 7] {
        let mut out: [Option<Lora>; 7] = Default::default();
        for (k, pair) in self.layers[i].iter().enumerate() {
            if let Some((a, b)) = pair {
                out[k] = Some(Lora {
                    a: a.clone(),
                    b: b.clone(),
                    scale: self.spec.scale(),
                    dropout: forward_key.filter(|_| self.spec.dropout > 0.0).map(|key| Dropout {
                        p: self.spec.dropout,
                        key: dropout_key(&[key, i as u64, k as u64]),
                    }),
                });
            }
        }
        out
    }

    /// Whether the adapters are being trained (their tensors are variables).
    pub fn trainable(&self) -> bool {
        self.named().first().is_some_and(|(_, t)| t.is_variable())
    }

    /// Number of adapter parameters.
    pub fn parameter_count(&self) -> usize {
        self.named().iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// `adapter_config.json` as PEFT writes it.
    pub fn config_json(&self) -> Value {
        let s = &self.spec;
        let targets: Vec<&str> = s.targets.iter().map(|m| m.name()).collect();
        json!({
            "peft_type": "LORA",
            "task_type": s.task_type,
            "base_model_name_or_path": s.base,
            "r": s.r,
            "lora_alpha": s.alpha,
            "lora_dropout": s.dropout,
            "target_modules": targets,
            "use_rslora": s.use_rslora,
            "modules_to_save": if s.modules_to_save.is_empty() { Value::Null } else { json!(s.modules_to_save) },
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_dora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        })
    }

    /// Write `adapter_config.json` and `adapter_model.safetensors` (f32) into `dir`, with
    /// `saved` (the modules to save: `score.weight`, ...) under PEFT's names.
    pub fn save(&self, dir: &Path, saved: &[(String, Tensor)]) -> Result<()> {
        crate::util::create_dir_all(dir)?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (name, t) in self.named() {
            tensors.push((name, t.detach().to_dtype(DType::F32)?));
        }
        for (name, t) in saved {
            tensors.push((format!("{PEFT_PREFIX}{name}"), t.detach().to_dtype(DType::F32)?));
        }
        let bytes = crate::model::hf::model_safetensors_bytes(&tensors)?;
        write_atomic(&dir.join(ADAPTER_WEIGHTS), &bytes)?;
        let pretty = serde_json::to_vec_pretty(&self.config_json()).expect("JSON value serialises");
        write_atomic(&dir.join(ADAPTER_CONFIG), &pretty)?;
        Ok(())
    }
}

/// Whether `dir` holds a PEFT adapter (`adapter_config.json`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}

/// The spec of the PEFT adapter in `dir`; refuses what prefer does not implement (another PEFT
/// method, DoRA, trained biases, per-layer ranks, a regex of target modules).
pub fn read_spec(dir: &Path) -> Result<LoraSpec> {
    let path = dir.join(ADAPTER_CONFIG);
    let v: Value =
        serde_json::from_str(&read_to_string(&path)?).map_err(|e| Error::model(&path, format!("invalid JSON: {e}")))?;
    let bad = |field: &str, what: &str| Error::model(&path, format!("`{field}`: {what}"));
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(bad(
            "peft_type",
            &format!("{peft_type} adapters are not supported; prefer reads LoRA"),
        ));
    }
    if v.get("use_dora").and_then(Value::as_bool).unwrap_or(false) {
        return Err(bad("use_dora", "DoRA adapters are not supported"));
    }
    match v.get("bias").and_then(Value::as_str).unwrap_or("none") {
        "none" => {}
        b => {
            return Err(bad(
                "bias",
                &format!("\"{b}\": trained biases are not supported; only \"none\""),
            ))
        }
    }
    if v.get("fan_in_fan_out").and_then(Value::as_bool).unwrap_or(false) {
        return Err(bad(
            "fan_in_fan_out",
            "true is for GPT-2's Conv1D layers, not the Llama family",
        ));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if v.get(key).and_then(Value::as_object).is_some_and(|o| !o.is_empty()) {
            return Err(bad(key, "per-module ranks or alphas are not supported"));
        }
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("r", "expected a positive integer"))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("lora_alpha", "expected a number"))?;
    let targets: Vec<String> = match v.get("target_modules") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(String::from).collect(),
        Some(Value::String(s)) if s == "all-linear" => vec![s.clone()],
        Some(Value::String(s)) => {
            return Err(bad(
                "target_modules",
                &format!("a regular expression (\"{s}\") is not supported; list the module names"),
            ))
        }
        _ => return Err(bad("target_modules", "expected a list of module names")),
    };
    let targets = Module::parse_targets(Some(&targets)).map_err(|e| Error::model(&path, e.to_string()))?;
    let modules_to_save = match v.get("modules_to_save") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(String::from).collect(),
        _ => Vec::new(),
    };
    Ok(LoraSpec {
        r,
        alpha,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        targets,
        use_rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        modules_to_save,
        base: v
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        task_type: v
            .get("task_type")
            .and_then(Value::as_str)
            .unwrap_or("CAUSAL_LM")
            .to_string(),
    })
}

/// The adapter saved in `dir` for a model of `cfg`, and the modules it saved (by their names in
/// the base model: `score.weight`).
pub fn load(dir: &Path, cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<(Adapters, Vec<(String, Tensor)>)> {
    let spec = read_spec(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    if !path.is_file() {
        return Err(Error::model(
            dir,
            format!("{ADAPTER_WEIGHTS} is missing (adapter_model.bin is not read; save with safe_serialization=True)"),
        ));
    }
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, device).map_err(|e| Error::model(&path, e.to_string()))?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let mut row: [Option<(Tensor, Tensor)>; 7] = Default::default();
        for &m in &spec.targets {
            let (out, inp) = m.shape(cfg);
            let mut take = |which: &str, shape: [usize; 2]| -> Result<Tensor> {
                let name = tensor_name(i, m, which);
                let t = tensors
                    .remove(&name)
                    .ok_or_else(|| Error::model(&path, format!("tensor `{name}` is missing")))?;
                if t.dims() != shape {
                    return Err(Error::model(
                        &path,
                        format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.dims()),
                    ));
                }
                Ok(t.to_dtype(dtype)?)
            };
            row[m.index()] = Some((take("lora_A", [spec.r, inp])?, take("lora_B", [out, spec.r])?));
        }
        layers.push(row);
    }
    let mut saved = Vec::new();
    let mut rest: Vec<String> = tensors.keys().cloned().collect();
    rest.sort();
    for name in rest {
        let t = tensors.remove(&name).expect("listed");
        match name.strip_prefix(PEFT_PREFIX) {
            Some(n) if spec.saves(n) => saved.push((n.to_string(), t.to_dtype(dtype)?)),
            _ => {
                return Err(Error::model(
                    &path,
                    format!(
                        "tensor `{name}` is neither a LoRA pair of target_modules nor one of modules_to_save \
                         (an adapter for another model, or a PEFT feature prefer does not read)"
                    ),
                ))
            }
        }
    }
    Ok((Adapters { spec, layers, seed: 0 }, saved))
}

/// `W + s·B·A` of one module (the merged weight), in `w`'s dtype.
pub fn merged_weight(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let dt = w.dtype();
    let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
    Ok((w.to_dtype(DType::F32)? + delta)?.to_dtype(dt)?)
}
