//! GGUF (llama.cpp) files: architecture from metadata, tensors dequantised to the training
//! dtype, llama.cpp's Q/K row permutation undone so the model is in HF layout, and the
//! tokenizer and chat template rebuilt from metadata.

use super::compact::unpermute_qk;
use crate::error::{Error, Result};
use crate::model::{config::ModelConfig, LoadedModel, Transformer};
use crate::tokenizer::{byte_level_bpe_json, byte_level_pre_tokenizer, TextTokenizer};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::path::Path;

/// ggml type ids that candle cannot dequantise, by name (for the error message).
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

fn meta_u64(v: &Value) -> Option<u64> {
    Some(match v {
        Value::U8(x) => *x as u64,
        Value::I8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::I16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::I32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I64(x) => *x as u64,
        _ => return None,
    })
}

fn meta_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        other => meta_u64(other).map(|x| x as f64),
    }
}

struct Meta<'a> {
    content: &'a Content,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }
    fn u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .and_then(meta_u64)
            .ok_or_else(|| Error::model(self.path, format!("GGUF metadata `{key}` is missing or not an integer")))
    }
    fn str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(Error::model(
                        self.path,
                        format!("GGUF metadata `{key}` has a non-string entry"),
                    )),
                })
                .collect(),
            _ => Err(Error::model(self.path, format!("GGUF metadata `{key}` is missing"))),
        }
    }
}

/// The converter's permutation (for writing GGUF test fixtures).
pub fn permute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The GGUF name of an HF parameter name.
pub fn gguf_tensor_name(hf: &str) -> String {
    if hf == "model.embed_tokens.weight" {
        return "token_embd.weight".into();
    }
    if hf == "model.norm.weight" {
        return "output_norm.weight".into();
    }
    if hf == "lm_head.weight" {
        return "output.weight".into();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap_or(hf);
    let (layer, rest) = rest.split_once('.').unwrap_or(("0", rest));
    let part = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    ]
    .iter()
    .find_map(|(h, g)| rest.strip_prefix(h).map(|suffix| format!("{g}{suffix}")))
    .unwrap_or_else(|| rest.to_string());
    format!("blk.{layer}.{part}")
}

/// Read the architecture from GGUF metadata as a [`ModelConfig`].
fn config_from_meta(m: &Meta, has_output: bool) -> Result<ModelConfig> {
    let arch = m.str("general.architecture").unwrap_or("llama").to_string();
    let model_type = match arch.as_str() {
        "llama" | "mistral" | "qwen2" => arch.clone(),
        other => {
            return Err(Error::model(
                m.path,
                format!("GGUF architecture `{other}` is not supported (llama, mistral, qwen2)"),
            ))
        }
    };
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = m.u64(&k("embedding_length"))? as usize;
    let heads = m.u64(&k("attention.head_count"))? as usize;
    let kv = m
        .get(&k("attention.head_count_kv"))
        .and_then(meta_u64)
        .map(|x| x as usize)
        .unwrap_or(heads);
    let vocab = match m.get(&k("vocab_size")).and_then(meta_u64) {
        Some(v) => v as usize,
        None => m.strings("tokenizer.ggml.tokens")?.len(),
    };
    let head_dim = m
        .get(&k("attention.key_length"))
        .and_then(meta_u64)
        .map(|x| x as usize)
        .unwrap_or(hidden / heads);
    let mut v = json!({
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": m.u64(&k("feed_forward_length"))?,
        "num_hidden_layers": m.u64(&k("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "rms_norm_eps": m.get(&k("attention.layer_norm_rms_epsilon")).and_then(meta_f64).unwrap_or(1e-5),
        "rope_theta": m.get(&k("rope.freq_base")).and_then(meta_f64).unwrap_or(10000.0),
        "max_position_embeddings": m.get(&k("context_length")).and_then(meta_u64).unwrap_or(4096),
        "tie_word_embeddings": !has_output,
    });
    for (key, meta) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = m.get(meta).and_then(meta_u64) {
            v[key] = json!(id);
        }
    }
    // f32 rms_norm_eps in GGUF (9.9999997e-6): round to the value HF configs carry.
    if let Some(e) = v["rms_norm_eps"].as_f64() {
        v["rms_norm_eps"] = json!(format!("{e:.6e}").parse::<f64>().unwrap_or(e));
    }
    ModelConfig::from_json(&v, m.path)
}

fn tokenizer_from_meta(m: &Meta, cfg: &ModelConfig) -> Result<TextTokenizer> {
    let model = m.str("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(Error::model(
            m.path,
            format!("GGUF tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`); load the model's HF directory instead"),
        ));
    }
    let tokens = m.strings("tokenizer.ggml.tokens")?;
    let merges = m.strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match m.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| meta_u64(v).unwrap_or(1) as i64).collect(),
        _ => vec![],
    };
    let pre = byte_level_pre_tokenizer(m.str("tokenizer.ggml.pre").unwrap_or("gpt2"))?;
    let add_bos = matches!(m.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));
    let bos_id = cfg.bos_token_id;
    let bos_tok = bos_id.and_then(|i| tokens.get(i as usize).cloned());
    let bos = match (add_bos, bos_id, &bos_tok) {
        (true, Some(id), Some(t)) => Some((id, t.as_str())),
        _ => None,
    };
    let json = byte_level_bpe_json(&tokens, &merges, &types, pre, bos);
    let mut tc = json!({});
    let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
    if let Some(e) = name(cfg.eos_token_id) {
        tc["eos_token"] = json!(e);
    }
    if let Some(b) = bos_tok {
        tc["bos_token"] = json!(b);
    }
    if let Some(p) = name(cfg.pad_token_id) {
        tc["pad_token"] = json!(p);
    }
    if let Some(t) = m.str("tokenizer.chat_template") {
        tc["chat_template"] = json!(t);
    }
    TextTokenizer::from_parts(json.to_string(), &tc, cfg.eos_token_id, cfg.pad_token_id)
}

fn read_content(path: &Path) -> Result<(std::fs::File, Content)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut file).map_err(|e| {
        let msg = e.to_string();
        match msg.rsplit_once("unknown dtype for tensor ") {
            Some((_, id)) => {
                let digits: String = id.chars().take_while(char::is_ascii_digit).collect();
                let id: u32 = digits.parse().unwrap_or(u32::MAX);
                Error::model(
                    path,
                    format!(
                        "GGUF quantisation type {} (ggml type id {id}) is not supported; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q8_K",
                        ggml_type_name(id)
                    ),
                )
            }
            None => Error::model(path, format!("not a readable GGUF file: {msg}")),
        }
    })?;
    Ok((file, content))
}

/// llama.cpp's tensor of Llama-3 RoPE scaling: one divisor per rotary frequency.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// Only the tokenizer of a `.gguf` file (no weights are read).
pub fn load_tokenizer(path: &Path) -> Result<TextTokenizer> {
    let (_, content) = read_content(path)?;
    let m = Meta {
        content: &content,
        path,
    };
    let cfg = config_from_meta(&m, content.tensor_infos.contains_key("output.weight"))?;
    tokenizer_from_meta(&m, &cfg)
}

/// The heads to un-permute an HF tensor by: llama.cpp's converter permutes the rows of Q and K
/// for the architectures it runs with interleaved RoPE (llama, mistral), not for Qwen2 (NeoX
/// RoPE, HF's layout kept; checked against llama.cpp, `scripts/check-gguf-export.sh`).
pub fn qk_heads(name: &str, cfg: &ModelConfig) -> Option<usize> {
    if cfg.model_type == "qwen2" {
        None
    } else if name.ends_with("q_proj.weight") {
        Some(cfg.num_attention_heads)
    } else if name.ends_with("k_proj.weight") {
        Some(cfg.num_key_value_heads)
    } else {
        None
    }
}

/// A `.gguf` file opened for reading tensors by their HF names.
struct GgufFile<'a> {
    file: std::fs::File,
    content: &'a Content,
    path: &'a Path,
    device: &'a Device,
}

impl GgufFile<'_> {
    fn tensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        let gname = gguf_tensor_name(name);
        self.content
            .tensor(&mut self.file, &gname, self.device)
            .map_err(|e| Error::model(self.path, format!("tensor `{gname}`: {e}")))
    }
}

/// Load a `.gguf` file.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    load(path, dtype, device, false)
}

/// Load a `.gguf` file as a frozen model whose decoder layers stay quantised
/// ([`super::compact::CompactLayers`]; F32 layer tensors are kept widened).
pub(crate) fn load_gguf_frozen(path: &Path, dtype: DType, device: &Device) -> Result<Option<LoadedModel>> {
    load(path, dtype, device, true).map(Some)
}

fn load(path: &Path, dtype: DType, device: &Device, compact: bool) -> Result<LoadedModel> {
    use super::compact::{layer_tensor_names, CompactLayers, Stored};
    let (file, content) = read_content(path)?;
    let m = Meta {
        content: &content,
        path,
    };
    let mut cfg = config_from_meta(&m, content.tensor_infos.contains_key("output.weight"))?;
    let mut f = GgufFile {
        file,
        content: &content,
        path,
        device,
    };
    // Llama 3.x: llama.cpp keeps its RoPE scaling as a tensor of per-frequency divisors
    if content.tensor_infos.contains_key(ROPE_FREQS) {
        let q = content
            .tensor(&mut f.file, ROPE_FREQS, device)
            .map_err(|e| Error::model(path, format!("tensor `{ROPE_FREQS}`: {e}")))?;
        let factors: Vec<f64> = q.dequantize(device)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        cfg.rope_scaling =
            crate::model::config::Llama3RopeScaling::from_freq_factors(&factors, cfg.rope_theta, cfg.head_dim)
                .map_err(|e| Error::model(path, e))?;
    }
    let widen = |q: &candle_core::quantized::QTensor, name: &str| -> Result<Tensor> {
        let mut t = q.dequantize(device)?;
        if let Some(h) = qk_heads(name, &cfg) {
            t = unpermute_qk(&t, h)?;
        }
        Ok(t.to_dtype(dtype)?)
    };
    let mut transformer = Transformer::build_parts(&cfg, |name, _| widen(&f.tensor(name)?, name), !compact)?;
    if compact {
        let mut stored = std::collections::HashMap::new();
        for i in 0..cfg.num_hidden_layers {
            for name in layer_tensor_names(&cfg, i)? {
                let q = f.tensor(&name)?;
                let s = if q.dtype() == candle_core::quantized::GgmlDType::F32 {
                    Stored::Dense(widen(&q, &name)?)
                } else {
                    Stored::Quantized {
                        q,
                        unpermute_heads: qk_heads(&name, &cfg),
                    }
                };
                stored.insert(name, s);
            }
        }
        let layers = CompactLayers::new(&cfg, stored, dtype, device)?;
        transformer.compact = Some(std::sync::Arc::new(layers));
    }
    let tokenizer = tokenizer_from_meta(&m, &cfg)?;
    Ok(LoadedModel {
        transformer,
        tokenizer,
        source: path.to_path_buf(),
        weight_files: vec![path.to_path_buf()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips_and_names_map() {
        let w = Tensor::arange(0f32, 48.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 6))
            .unwrap();
        let p = permute_qk(&w, 2).unwrap();
        assert_ne!(p.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // rows of head 0 were [0,1,2,3] (first half 0,1; second half 2,3): interleaved to 0,2,1,3
        let first_col: Vec<f32> = p.to_vec2::<f32>().unwrap().iter().map(|r| r[0]).collect();
        assert_eq!(first_col, vec![0.0, 12.0, 6.0, 18.0, 24.0, 36.0, 30.0, 42.0]);
        let back = unpermute_qk(&p, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert_eq!(
            gguf_tensor_name("model.layers.3.self_attn.k_proj.weight"),
            "blk.3.attn_k.weight"
        );
        assert_eq!(
            gguf_tensor_name("model.layers.0.post_attention_layernorm.weight"),
            "blk.0.ffn_norm.weight"
        );
        assert_eq!(
            gguf_tensor_name("model.layers.1.self_attn.q_proj.bias"),
            "blk.1.attn_q.bias"
        );
    }
}

// ---- Writing -------------------------------------------------------------------------------

choice! {
    /// How `prefer export` stores a model's matrices (norms and biases stay F32). The k-quant
    /// mixes follow llama.cpp's `llama-quantize` rules: `attn_v` and `ffn_down` get more bits in
    /// the first and last eighth of the layers and every third between, the output head Q6_K,
    /// and a matrix whose rows are no multiple of 256 falls back (Q4_K → Q5_0, Q5_K → Q5_1,
    /// Q6_K → Q8_0).
    pub enum ExportQuant {
        F32 = "f32",
        F16 = "f16",
        Bf16 = "bf16",
        Q8_0 = "q8_0",
        Q5_1 = "q5_1",
        Q5_0 = "q5_0",
        Q4_1 = "q4_1",
        Q4_0 = "q4_0",
        Q6K = "q6_k",
        Q5KM = "q5_k_m",
        Q4KM = "q4_k_m",
    }
}

impl ExportQuant {
    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            ExportQuant::F32 => 0,
            ExportQuant::F16 => 1,
            ExportQuant::Q4_0 => 2,
            ExportQuant::Q4_1 => 3,
            ExportQuant::Q8_0 => 7,
            ExportQuant::Q5_0 => 8,
            ExportQuant::Q5_1 => 9,
            ExportQuant::Q4KM => 15,
            ExportQuant::Q5KM => 17,
            ExportQuant::Q6K => 18,
            ExportQuant::Bf16 => 32,
        }
    }

    /// The type of the matrix `gguf_name` (`blk.3.attn_v.weight`) of a model with `layers`
    /// layers and rows of `cols` values.
    fn matrix_type(self, gguf_name: &str, layers: usize, cols: usize) -> GgmlDType {
        use GgmlDType as G;
        let layer: Option<usize> = gguf_name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse().ok());
        // llama.cpp's use_more_bits(i, n)
        let more_bits = |i: usize| i < layers / 8 || i >= 7 * layers / 8 || (i - layers / 8) % 3 == 2;
        let sensitive = gguf_name.contains("attn_v.") || gguf_name.contains("ffn_down.");
        let wanted = match self {
            ExportQuant::F32 => G::F32,
            ExportQuant::F16 => G::F16,
            ExportQuant::Bf16 => G::BF16,
            ExportQuant::Q8_0 => G::Q8_0,
            ExportQuant::Q5_1 => G::Q5_1,
            ExportQuant::Q5_0 => G::Q5_0,
            ExportQuant::Q4_1 => G::Q4_1,
            ExportQuant::Q4_0 => G::Q4_0,
            ExportQuant::Q6K => G::Q6K,
            ExportQuant::Q5KM | ExportQuant::Q4KM if gguf_name == "output.weight" => G::Q6K,
            ExportQuant::Q5KM | ExportQuant::Q4KM if sensitive && layer.is_some_and(more_bits) => G::Q6K,
            ExportQuant::Q5KM => G::Q5K,
            ExportQuant::Q4KM => G::Q4K,
        };
        let fits = |t: G| cols.is_multiple_of(t.block_size());
        let fallback = match wanted {
            G::Q4K => G::Q5_0,
            G::Q5K => G::Q5_1,
            G::Q6K => G::Q8_0,
            other => other,
        };
        if fits(wanted) {
            wanted
        } else if fits(fallback) {
            fallback
        } else {
            G::F16
        }
    }
}

/// The byte-level BPE tokenizer of `tok` as GGUF metadata: tokens by id (padded to
/// `vocab_size` with unused `[PAD{i}]` entries, as llama.cpp's converter pads), merges, token
/// types (3 = control for special added tokens, 1 = normal, 5 = unused), the pre-tokenizer's
/// llama.cpp name, special ids, BOS insertion and the chat template.
fn tokenizer_meta(tok: &TextTokenizer, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let v: serde_json::Value =
        serde_json::from_str(&tok.json).map_err(|e| Error::Tokenizer(format!("tokenizer.json: {e}")))?;
    let model = &v["model"];
    if model["type"].as_str() != Some("BPE") || v["decoder"]["type"].as_str() != Some("ByteLevel") {
        return Err(Error::Tokenizer(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2); this model's is another kind".into(),
        ));
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    let mut put = |id: u64, t: &str, ty: i32| -> Result<()> {
        let i = id as usize;
        if i >= vocab_size {
            return Err(Error::Tokenizer(format!(
                "token `{t}` has id {i}, beyond the model's vocab_size {vocab_size}"
            )));
        }
        tokens[i] = Some(t.to_string());
        types[i] = ty;
        Ok(())
    };
    for (t, id) in model["vocab"].as_object().into_iter().flatten() {
        put(id.as_u64().unwrap_or(u64::MAX), t, 1)?;
    }
    for a in v["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        let special = a["special"].as_bool().unwrap_or(false);
        put(id, t, if special { 3 } else { 4 })?;
    }
    let mut strings = Vec::with_capacity(vocab_size);
    for (i, t) in tokens.into_iter().enumerate() {
        match t {
            Some(t) => strings.push(Value::String(t)),
            None => {
                strings.push(Value::String(format!("[PAD{i}]")));
                types[i] = 5;
            }
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .map(Value::String)
        .collect();
    // the pre-tokenizer by what it does (llama.cpp knows these by name)
    let pre_json = v["pre_tokenizer"].to_string();
    let pre = if pre_json.contains("\"Digits\"") {
        "smollm"
    } else if pre_json.contains(r"\\p{N}{1,3}") {
        "llama-bpe"
    } else if pre_json.contains(r"\\p{N}|") {
        "qwen2"
    } else {
        "gpt2"
    };
    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(strings)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(tok.eos_id)),
        ("tokenizer.ggml.padding_token_id".to_string(), Value::U32(tok.pad_id)),
    ];
    // whether encoding adds BOS: what the tokenizer does, not whether it names a BOS token
    let bos = tok.bos_token.as_ref().and_then(|b| tok.inner.token_to_id(b));
    let with = tok.encode("a", true)?;
    let adds_bos = bos.is_some() && with.first() == bos.as_ref() && with.len() > tok.encode("a", false)?.len();
    meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(adds_bos)));
    if let Some(b) = bos {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(t) = &tok.chat_template {
        meta.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    Ok(meta)
}

/// Write `model` as a GGUF file that llama.cpp loads: the architecture in `general.*` and
/// `{arch}.*` keys, the tokenizer and chat template in `tokenizer.*`, tensors under llama.cpp's
/// names with the Q/K rows permuted as its converter permutes them, matrices stored as `quant`
/// (see [`ExportQuant`]). A model with LoRA adapters is written merged; a reward model is
/// refused (llama.cpp runs language models).
pub fn save_gguf(model: &LoadedModel, path: &Path, quant: ExportQuant) -> Result<()> {
    use candle_core::quantized::QTensor;
    let cfg = &model.transformer.cfg;
    if cfg.reward_head {
        return Err(Error::model(
            &model.source,
            "a reward model (score head) has no GGUF form llama.cpp runs; export a language model",
        ));
    }
    let transformer = match model.transformer.adapters().is_some() || model.transformer.compact_layers().is_some() {
        true => model.transformer.merged()?,
        false => model.transformer.clone(),
    };
    let arch = cfg.model_type.as_str();
    let k = |s: &str| format!("{arch}.{s}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String(
                model
                    .source
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_else(|| "prefer".into()),
            ),
        ),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (k("block_count"), Value::U32(cfg.num_hidden_layers as u32)),
        (k("context_length"), Value::U32(cfg.max_position_embeddings as u32)),
        (k("embedding_length"), Value::U32(cfg.hidden_size as u32)),
        (k("feed_forward_length"), Value::U32(cfg.intermediate_size as u32)),
        (k("attention.head_count"), Value::U32(cfg.num_attention_heads as u32)),
        (k("attention.head_count_kv"), Value::U32(cfg.num_key_value_heads as u32)),
        (k("attention.key_length"), Value::U32(cfg.head_dim as u32)),
        (k("attention.value_length"), Value::U32(cfg.head_dim as u32)),
        (k("rope.dimension_count"), Value::U32(cfg.head_dim as u32)),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (k("vocab_size"), Value::U32(cfg.vocab_size as u32)),
    ];
    meta.extend(tokenizer_meta(&model.tokenizer, cfg.vocab_size)?);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    if let Some(s) = &cfg.rope_scaling {
        // llama.cpp's form of Llama-3 scaling, as its converter writes it
        let f: Vec<f32> = s
            .freq_factors(cfg.rope_theta, cfg.head_dim)
            .iter()
            .map(|&x| x as f32)
            .collect();
        let n = f.len();
        let t = Tensor::from_vec(f, n, &candle_core::Device::Cpu)?;
        tensors.push((ROPE_FREQS.into(), QTensor::quantize(&t, GgmlDType::F32)?));
    }
    for (name, t) in transformer.params() {
        let mut t = t.detach().to_dtype(DType::F32)?;
        if let Some(h) = qk_heads(name, cfg) {
            t = permute_qk(&t, h)?;
        }
        let gname = gguf_tensor_name(name);
        let ty = match t.rank() {
            2 => quant.matrix_type(&gname, cfg.num_hidden_layers, t.dim(1)?),
            _ => GgmlDType::F32,
        };
        let q = QTensor::quantize(&t, ty).map_err(|e| Error::msg(format!("quantising `{gname}` as {ty:?}: {e}")))?;
        tensors.push((gname, q));
    }
    let tmp = path.with_extension("gguf.tmp");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?);
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs)
            .map_err(|e| Error::model(&tmp, format!("writing GGUF: {e}")))?;
        use std::io::Write;
        f.flush().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(())
}
