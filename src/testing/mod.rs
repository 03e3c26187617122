//! Tiny generated models for tests and examples: random weights, a small byte-level BPE
//! tokenizer with ChatML special tokens, written as real HF directories and GGUF files so the
//! loaders are exercised exactly as on a real checkpoint.

pub mod fuzz;
pub mod shared;

use crate::error::Result;
use crate::model::{gguf, hf, LoadedModel, ModelConfig, Transformer};
use crate::tokenizer::{byte_level_bpe_json, byte_level_pre_tokenizer, bytes_to_unicode, TextTokenizer};
use crate::util::Rng;
use candle_core::quantized::gguf_file::Value as GValue;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::path::Path;

pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Shape of a tiny model.
#[derive(Clone, Debug)]
pub struct TinySpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub tie_embeddings: bool,
    pub model_type: &'static str,
    pub add_bos: bool,
    pub llama3_rope_scaling: bool,
    /// Standard deviation of the random weights (times 1/sqrt(fan-in) for matrices).
    pub init_scale: f64,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            hidden: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 64,
            tie_embeddings: true,
            model_type: "llama",
            add_bos: false,
            llama3_rope_scaling: false,
            init_scale: 1.0,
        }
    }
}

/// Vocabulary of the tiny tokenizer: 3 special tokens, the 256 byte symbols, a few merges.
pub fn tiny_vocab() -> (Vec<String>, Vec<String>, Vec<i64>) {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    let mut types = vec![3i64, 3, 3];
    for c in bytes_to_unicode() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges = [
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("i", "s"),
        ("Ġ", "a"),
        ("Ġ", "1"),
        ("=", "Ġ"),
    ];
    let mut m = Vec::new();
    for (a, b) in merges {
        m.push(format!("{a} {b}"));
        tokens.push(format!("{a}{b}"));
        types.push(1);
    }
    (tokens, m, types)
}

/// The tiny tokenizer (eos `<|im_end|>` = 2, bos `<|endoftext|>` = 0 if `add_bos`).
pub fn tiny_tokenizer(add_bos: bool) -> Result<TextTokenizer> {
    let (tokens, merges, types) = tiny_vocab();
    let bos = add_bos.then_some((0u32, "<|endoftext|>"));
    let json = byte_level_bpe_json(&tokens, &merges, &types, byte_level_pre_tokenizer("smollm")?, bos);
    let mut tc = json!({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE});
    if add_bos {
        tc["bos_token"] = json!("<|endoftext|>");
    }
    TextTokenizer::from_parts(json.to_string(), &tc, Some(2), Some(0))
}

pub fn tiny_config(spec: &TinySpec) -> Result<ModelConfig> {
    let (tokens, _, _) = tiny_vocab();
    let mut v = json!({
        "model_type": spec.model_type,
        "vocab_size": tokens.len(),
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": spec.tie_embeddings,
        "eos_token_id": 2,
        "bos_token_id": 0,
        "pad_token_id": 0,
    });
    if spec.llama3_rope_scaling {
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
    }
    ModelConfig::from_json(&v, Path::new("<tiny>"))
}

/// A tiny model with seeded random weights.
pub fn tiny_model(spec: &TinySpec, dtype: DType, seed: u64) -> Result<LoadedModel> {
    let cfg = tiny_config(spec)?;
    let mut rng = Rng::new(seed);
    let dev = Device::Cpu;
    let transformer = Transformer::build(&cfg, |name, shape| {
        let n: usize = shape.iter().product();
        let vals: Vec<f64> = if name.ends_with("norm.weight") {
            (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect()
        } else if name.ends_with(".bias") {
            (0..n).map(|_| 0.1 * rng.normal()).collect()
        } else {
            let fan_in = *shape.last().unwrap_or(&1) as f64;
            let std = if name.contains("embed") {
                1.0
            } else {
                spec.init_scale / fan_in.sqrt()
            };
            (0..n).map(|_| std * rng.normal()).collect()
        };
        Ok(Tensor::from_vec(vals, shape, &dev)?.to_dtype(dtype)?)
    })?;
    Ok(LoadedModel {
        transformer,
        tokenizer: tiny_tokenizer(spec.add_bos)?,
        source: "<tiny>".into(),
        weight_files: vec![],
    })
}

/// Write `model` as a GGUF file the way llama.cpp's converter does (Q/K rows permuted,
/// tokenizer and chat template in the metadata), with matrices stored as `quant`.
pub fn write_gguf(model: &LoadedModel, path: &Path, quant: GgmlDType) -> Result<()> {
    let cfg = &model.transformer.cfg;
    let (tokens, merges, types) = tiny_vocab();
    let s = |x: &str| GValue::String(x.to_string());
    let arch = &cfg.model_type;
    let arch_keys: [(&str, GValue); 9] = [
        ("block_count", GValue::U32(cfg.num_hidden_layers as u32)),
        ("context_length", GValue::U32(cfg.max_position_embeddings as u32)),
        ("embedding_length", GValue::U32(cfg.hidden_size as u32)),
        ("feed_forward_length", GValue::U32(cfg.intermediate_size as u32)),
        ("attention.head_count", GValue::U32(cfg.num_attention_heads as u32)),
        ("attention.head_count_kv", GValue::U32(cfg.num_key_value_heads as u32)),
        ("rope.freq_base", GValue::F32(cfg.rope_theta as f32)),
        ("attention.layer_norm_rms_epsilon", GValue::F32(cfg.rms_norm_eps as f32)),
        ("vocab_size", GValue::U32(cfg.vocab_size as u32)),
    ];
    let mut meta: Vec<(String, GValue)> = vec![
        ("general.architecture".into(), s(arch)),
        ("general.name".into(), s("tiny")),
    ];
    meta.extend(arch_keys.into_iter().map(|(k, v)| (format!("{arch}.{k}"), v)));
    meta.extend([
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        (
            "tokenizer.ggml.tokens".into(),
            GValue::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            GValue::Array(merges.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            GValue::Array(types.iter().map(|&t| GValue::I32(t as i32)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), GValue::U32(0)),
        (
            "tokenizer.ggml.eos_token_id".into(),
            GValue::U32(model.tokenizer.eos_id),
        ),
        (
            "tokenizer.ggml.padding_token_id".into(),
            GValue::U32(model.tokenizer.pad_id),
        ),
        (
            "tokenizer.ggml.add_bos_token".into(),
            GValue::Bool(model.tokenizer.bos_token.is_some()),
        ),
    ]);
    if let Some(t) = &model.tokenizer.chat_template {
        meta.push(("tokenizer.chat_template".into(), s(t)));
    }
    let mut qtensors = Vec::new();
    for (name, t) in model.transformer.params() {
        let mut t = t.to_dtype(DType::F32)?;
        // llama.cpp's converter permutes Q/K rows for llama and mistral, not for qwen2
        if let Some(h) = gguf::qk_heads(name, cfg) {
            t = gguf::permute_qk(&t, h)?;
        }
        let q = if t.rank() == 2 { quant } else { GgmlDType::F32 };
        qtensors.push((gguf::gguf_tensor_name(name), QTensor::quantize(&t, q)?));
    }
    let mut f = std::fs::File::create(path).map_err(|e| crate::Error::io(path, e))?;
    let meta_refs: Vec<(&str, &GValue)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    Ok(())
}

/// Write `model` as an HF directory.
pub fn write_hf(model: &LoadedModel, dir: &Path) -> Result<()> {
    hf::save_dir(model, dir)
}

/// A fresh, empty scratch directory for a test: `$TMPDIR/prefer-<name>-<pid>`.
///
/// Scratch directories are removed when the test process exits, so a test run leaves nothing
/// behind (a CI disk once filled up with them), unless a test panicked (they are kept so the
/// failure can be inspected) or `PREFER_KEEP_SCRATCH` is set.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("prefer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create a scratch directory");
    scratch::register(&d);
    d
}

mod scratch {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, Once};

    static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static PANICKED: AtomicBool = AtomicBool::new(false);

    pub(super) fn register(dir: &Path) {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                PANICKED.store(true, Ordering::SeqCst);
                previous(info)
            }));
            // SAFETY: `remove_all` is a plain `extern "C" fn()` that catches every panic.
            unsafe { libc::atexit(remove_all) };
        });
        if let Ok(mut dirs) = DIRS.lock() {
            dirs.push(dir.to_path_buf());
        }
    }

    extern "C" fn remove_all() {
        let _ = std::panic::catch_unwind(|| {
            if PANICKED.load(Ordering::SeqCst) || std::env::var_os("PREFER_KEEP_SCRATCH").is_some() {
                return;
            }
            if let Ok(dirs) = DIRS.lock() {
                for d in dirs.iter() {
                    let _ = std::fs::remove_dir_all(d);
                }
            }
        });
    }
}

/// The records a run logged: `output_dir/metrics.jsonl`, one JSON object per line.
pub fn metrics(cfg: &crate::config::TrainConfig) -> Vec<serde_json::Value> {
    std::fs::read_to_string(cfg.output_dir().join("metrics.jsonl"))
        .expect("the run's metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
        .collect()
}

/// `records` without the keys that measure time (`tokens_per_second`, `*_runtime`,
/// `*_per_second`): what two runs that compute the same numbers log alike.
pub fn without_timings(records: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    records
        .into_iter()
        .map(|mut r| {
            if let Some(o) = r.as_object_mut() {
                o.retain(|k, _| !(k.ends_with("per_second") || k.ends_with("runtime")));
            }
            r
        })
        .collect()
}

/// Run `cfg` (its own `output_dir`) as if Ctrl-C came after step `stop`, then resume it from
/// its latest checkpoint to the end, and return what the whole run logged: what a run that was
/// never stopped logs, if resuming is exact.
pub fn stop_and_resume(cfg: &crate::config::TrainConfig, stop: usize) -> Vec<serde_json::Value> {
    let mut t = crate::train::Trainer::new(cfg).expect("the run starts");
    t.stop_after_step = Some(stop);
    assert!(
        t.run().expect("the run until the stop").interrupted,
        "the run stopped at step {stop}"
    );
    drop(t); // its hold on the output_dir
    crate::train::train(&crate::config::TrainConfig {
        resume_from_checkpoint: Some("latest".into()),
        ..cfg.clone()
    })
    .expect("the resumed run");
    metrics(cfg)
}

/// The largest absolute difference between two tensors of the same shape, as f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar()?)
}

/// Tests run several test threads; give candle's pool one thread each so nothing spins on an
/// oversubscribed core (measured 7x slowdowns otherwise). Call at the top of heavy tests.
pub fn set_threads_for_tests() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var("RAYON_NUM_THREADS").is_err() {
            // SAFETY: called once, before any candle op spawns its thread pool.
            unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
        }
    });
}

/// A file of the repository's test fixtures (`tests/fixtures/`: small slices of the real data
/// sets, with their licences), so tests need nothing beside the repository.
pub fn fixture(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}
