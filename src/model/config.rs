//! `config.json` of the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5), in both the
//! transformers 4 dialect (`rope_theta`, `rope_scaling`) and the transformers 5 dialect
//! (`rope_parameters` holding `rope_type` and `rope_theta`).

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::Path;

/// Llama-3 style frequency scaling of RoPE (`rope_type = "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

impl Llama3RopeScaling {
    /// llama.cpp's form of this scaling (`rope_freqs.weight`, what its converter writes): one
    /// divisor per frequency of `1/theta^(2i/d)`, 1 for the high frequencies, `factor` for the
    /// low ones, `1/((1 − s)/factor + s)` between.
    pub fn freq_factors(&self, theta: f64, head_dim: usize) -> Vec<f64> {
        let (lo, hi) = (
            self.original_max_position_embeddings / self.low_freq_factor,
            self.original_max_position_embeddings / self.high_freq_factor,
        );
        (0..head_dim / 2)
            .map(|i| {
                let wavelen = 2.0 * std::f64::consts::PI * theta.powf((2 * i) as f64 / head_dim as f64);
                if wavelen < hi {
                    1.0
                } else if wavelen > lo {
                    self.factor
                } else {
                    let s = (self.original_max_position_embeddings / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - s) / self.factor + s)
                }
            })
            .collect()
    }

    /// The scaling whose [`Self::freq_factors`] are `factors` (a GGUF's `rope_freqs.weight`),
    /// `None` when they are all 1. The factors fix only the ratios of
    /// `original_max_position_embeddings`, `low_freq_factor` and `high_freq_factor`, so
    /// `low_freq_factor` is taken as 1 (as every Llama 3.x has it): the same frequencies.
    /// Needs two frequencies between the high and the low band to solve for the others.
    pub fn from_freq_factors(
        factors: &[f64],
        theta: f64,
        head_dim: usize,
    ) -> std::result::Result<Option<Self>, String> {
        if factors.len() != head_dim / 2 {
            return Err(format!("{} rope factors for head_dim {head_dim}", factors.len()));
        }
        let factor = factors.iter().cloned().fold(1.0, f64::max);
        if factor <= 1.0 + 1e-6 {
            return Ok(None);
        }
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
        // between the bands, s = (L/wavelen − 1)/(hi − 1) is linear in the frequency
        let points: Vec<(f64, f64)> = factors
            .iter()
            .enumerate()
            .filter(|(_, &f)| !close(f, 1.0) && !close(f, factor))
            .map(|(i, &f)| {
                let inv = theta.powf(-((2 * i) as f64) / head_dim as f64);
                (inv, (1.0 / f - 1.0 / factor) / (1.0 - 1.0 / factor))
            })
            .collect();
        if points.len() < 2 {
            return Err("rope_freqs.weight has fewer than two frequencies between its bands, so its Llama-3 parameters cannot be recovered".into());
        }
        let n = points.len() as f64;
        let (mx, my) = (
            points.iter().map(|p| p.0).sum::<f64>() / n,
            points.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let a = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>()
            / points.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>();
        let b = my - a * mx;
        // s = (L·inv/2π − 1)/(hi − 1): b = −1/(hi − 1), a = L/(2π(hi − 1))
        let hi = 1.0 - 1.0 / b;
        let len = -2.0 * std::f64::consts::PI * a / b;
        // they were written as f32: round to the values configs carry
        let round = |x: f64, places: i32| {
            let p = 10f64.powi(places);
            (x * p).round() / p
        };
        let s = Llama3RopeScaling {
            factor: round(factor, 4),
            low_freq_factor: 1.0,
            high_freq_factor: round(hi, 4),
            original_max_position_embeddings: round(len, 0),
        };
        let back = s.freq_factors(theta, head_dim);
        if !back.iter().zip(factors).all(|(x, y)| (x - y).abs() <= 1e-4 * y.abs()) {
            return Err("rope_freqs.weight is not a Llama-3 scaling prefer can express".into());
        }
        Ok(Some(s))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// A reward model: `*ForSequenceClassification` with a scalar head `score.weight` `[1, H]`
    /// on the last non-padding token, and no language-model head.
    pub reward_head: bool,
    /// Outputs of the reward head (1 for a plain reward model, K for one head per cluster, 2 for
    /// a Gaussian head).
    pub num_labels: usize,
    /// A Gaussian reward head: output 0 is the reward's mean μ, output 1 its log-variance log σ²
    /// (saved as `id2label` `reward_mean` / `reward_log_variance`).
    pub reward_variance: bool,
    /// Bias on q/k/v projections (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

fn get_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| Error::model(path, format!("config.json: missing or non-integer `{key}`")))
}

fn get_token_id(v: &Value, key: &str) -> Option<u32> {
    match v.get(key) {
        Some(Value::Number(n)) => n.as_u64().map(|x| x as u32),
        // Llama 3 lists several eos ids; the first is the one appended to completions.
        Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|x| x as u32),
        _ => None,
    }
}

/// The `id2label` names of a Gaussian reward head's two outputs.
pub const GAUSSIAN_LABELS: [&str; 2] = ["reward_mean", "reward_log_variance"];

impl ModelConfig {
    /// Parse a `config.json` value. `path` is only used in error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama")
            .to_string();
        if !matches!(model_type.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(Error::model(
                path,
                format!(
                    "model_type `{model_type}` is not supported; prefer handles llama, mistral and qwen2 (SmolLM2 is llama)"
                ),
            ));
        }
        if v.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
            return Err(Error::model(path, "config.json: `mlp_bias = true` is not supported"));
        }
        let hidden_size = get_usize(v, "hidden_size", path)?;
        let num_attention_heads = get_usize(v, "num_attention_heads", path)?;
        let num_key_value_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_attention_heads);
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::model(
                path,
                format!("num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"),
            ));
        }
        // transformers 5: rope_parameters {rope_type, rope_theta, factor, ...}
        // transformers 4: rope_theta at top level, rope_scaling {rope_type|type, factor, ...}
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = rope_params
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let scaling = rope_params.or_else(|| v.get("rope_scaling").filter(|p| p.is_object()));
        let rope_scaling = match scaling {
            None => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| {
                            s.get(k).and_then(Value::as_f64).ok_or_else(|| {
                                Error::model(path, format!("config.json: llama3 rope scaling lacks `{k}`"))
                            })
                        };
                        Some(Llama3RopeScaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f("original_max_position_embeddings")?,
                        })
                    }
                    other => {
                        return Err(Error::model(
                            path,
                            format!("rope scaling type `{other}` is not supported (supported: default, llama3)"),
                        ))
                    }
                }
            }
        };
        let attention_bias = v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false);
        let is_qwen = model_type == "qwen2";
        Ok(ModelConfig {
            vocab_size: get_usize(v, "vocab_size", path)?,
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size", path)?,
            num_hidden_layers: get_usize(v, "num_hidden_layers", path)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: v.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(4096) as usize,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            reward_head: v.get("architectures").and_then(Value::as_array).is_some_and(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .any(|s| s.ends_with("ForSequenceClassification"))
            }),
            num_labels: v
                .get("num_labels")
                .and_then(Value::as_u64)
                .or_else(|| v.get("id2label").and_then(Value::as_object).map(|m| m.len() as u64))
                .unwrap_or(1)
                .max(1) as usize,
            reward_variance: v
                .get("id2label")
                .and_then(|m| m.get("1"))
                .and_then(Value::as_str)
                .is_some_and(|l| l == GAUSSIAN_LABELS[1]),
            qkv_bias: is_qwen || attention_bias,
            o_bias: !is_qwen && attention_bias,
            bos_token_id: get_token_id(v, "bos_token_id"),
            eos_token_id: get_token_id(v, "eos_token_id"),
            pad_token_id: get_token_id(v, "pad_token_id"),
            model_type,
        })
    }

    /// A transformers-4 style `config.json` (which transformers 5 also reads).
    pub fn to_json(&self) -> Value {
        let family = match self.model_type.as_str() {
            "qwen2" => "Qwen2",
            "mistral" => "Mistral",
            _ => "Llama",
        };
        let arch = format!(
            "{family}{}",
            if self.reward_head {
                "ForSequenceClassification"
            } else {
                "ForCausalLM"
            }
        );
        let mut v = json!({
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": 0.02,
            "use_cache": true,
            "torch_dtype": "float32",
        });
        let o = v.as_object_mut().expect("object literal");
        if self.model_type == "llama" {
            o.insert("attention_bias".into(), json!(self.qkv_bias));
            o.insert("mlp_bias".into(), json!(false));
            o.insert("pretraining_tp".into(), json!(1));
        }
        if self.reward_head {
            let k = self.num_labels.max(1);
            o.insert("num_labels".into(), json!(k));
            let label = |i: usize| match self.reward_variance {
                true => GAUSSIAN_LABELS[i.min(1)].to_string(),
                false => format!("LABEL_{i}"),
            };
            let id2label: serde_json::Map<String, Value> = (0..k).map(|i| (i.to_string(), json!(label(i)))).collect();
            let label2id: serde_json::Map<String, Value> = (0..k).map(|i| (label(i), json!(i))).collect();
            o.insert("id2label".into(), Value::Object(id2label));
            o.insert("label2id".into(), Value::Object(label2id));
        }
        if let Some(s) = &self.rope_scaling {
            o.insert(
                "rope_scaling".into(),
                json!({
                    "rope_type": "llama3",
                    "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings as u64,
                }),
            );
        } else {
            o.insert("rope_scaling".into(), Value::Null);
        }
        for (k, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if let Some(id) = id {
                o.insert(k.into(), json!(id));
            }
        }
        v
    }

    /// Inverse frequencies of RoPE, `1/theta^(2i/d)`, with Llama-3 scaling applied if set
    /// (the same arithmetic as transformers' `_compute_llama3_parameters`).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        if let Some(s) = &self.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        inv
    }

    /// Number of parameters (for FLOP counts).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h;
        let emb = self.vocab_size * h;
        let head = if self.reward_head {
            h * self.num_labels
        } else if self.tie_word_embeddings {
            0
        } else {
            emb
        };
        emb + head + self.num_hidden_layers * per_layer + h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's rope_freqs of Llama 3.2 (factor 32) and 3.1 (factor 8), by its converter's
    /// formula, are our inverse frequencies' divisors; and read back (stored as f32) they give
    /// parameters with the same frequencies, exactly those of the config when low_freq_factor
    /// is 1, and equivalent ones when it is not.
    #[test]
    fn llama3_rope_freqs_match_llama_cpp_and_read_back() {
        for (theta, d, factor, lo, hi, len) in [
            (500000.0, 64, 32.0, 1.0, 4.0, 8192.0),
            (500000.0, 128, 8.0, 1.0, 4.0, 8192.0),
            (10000.0, 64, 8.0, 2.0, 8.0, 32.0),
        ] {
            let s = Llama3RopeScaling {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position_embeddings: len,
            };
            let f = s.freq_factors(theta, d);
            // convert_hf_to_gguf.py's loop, by hand
            let mut want = Vec::new();
            for i in 0..d / 2 {
                let freq = 1.0 / f64::powf(theta, (2 * i) as f64 / d as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                want.push(if wavelen < len / hi {
                    1.0
                } else if wavelen > len / lo {
                    factor
                } else {
                    let smooth = (len / wavelen - lo) / (hi - lo);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                });
            }
            for (x, y) in f.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-14 * y, "{x} vs {y}");
            }
            let cfg = |r: Option<Llama3RopeScaling>| {
                ModelConfig {
                rope_theta: theta,
                head_dim: d,
                rope_scaling: r,
                ..ModelConfig::from_json(&serde_json::json!({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}), Path::new("x")).unwrap()
            }
            };
            let plain = cfg(None).rope_inv_freq();
            let scaled = cfg(Some(s.clone())).rope_inv_freq();
            for i in 0..d / 2 {
                assert!((plain[i] / f[i] - scaled[i]).abs() <= 1e-12 * plain[i], "{i}");
            }
            let stored: Vec<f64> = f.iter().map(|&x| x as f32 as f64).collect();
            let back = Llama3RopeScaling::from_freq_factors(&stored, theta, d)
                .unwrap()
                .unwrap();
            if lo == 1.0 {
                assert_eq!(back, s);
            }
            let again = cfg(Some(back)).rope_inv_freq();
            for i in 0..d / 2 {
                assert!(
                    (again[i] - scaled[i]).abs() <= 1e-6 * scaled[i],
                    "{i}: {} vs {}",
                    again[i],
                    scaled[i]
                );
            }
        }
        assert_eq!(Llama3RopeScaling::from_freq_factors(&[1.0; 32], 1e4, 64), Ok(None));
        assert!(Llama3RopeScaling::from_freq_factors(&[1.0, 3.0, 1.0, 8.0], 1e4, 8).is_err());
    }

    #[test]
    fn reads_both_rope_dialects() {
        let p = Path::new("config.json");
        let base = json!({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1});
        let mut v4 = base.clone();
        v4["rope_theta"] = json!(500000.0);
        v4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v5 = base.clone();
        v5["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c4 = ModelConfig::from_json(&v4, p).unwrap();
        let c5 = ModelConfig::from_json(&v5, p).unwrap();
        assert_eq!(c4, c5);
        assert_eq!(c4.rope_theta, 500000.0);
        assert_eq!(c4.head_dim, 4);
        // transformers 5 default rope
        let mut v5d = base.clone();
        v5d["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1234.0});
        let c = ModelConfig::from_json(&v5d, p).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.is_none()), (1234.0, true));
        // round trip through to_json
        assert_eq!(ModelConfig::from_json(&c4.to_json(), p).unwrap(), c4);
    }

    #[test]
    fn llama3_scaling_matches_hand_values() {
        let c = ModelConfig::from_json(
            &json!({"vocab_size": 10, "hidden_size": 128, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 1, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
            Path::new("c"),
        )
        .unwrap();
        let inv = c.rope_inv_freq();
        // i = 0: wavelength 2π < 2048 (high-frequency band): unchanged.
        assert!((inv[0] - 1.0).abs() < 1e-15);
        // last: base freq 500000^(-126/128), wavelength > 8192: divided by factor 8.
        let base = 1.0 / 500000f64.powf(126.0 / 128.0);
        assert!((inv[63] - base / 8.0).abs() < 1e-18);
        // a middle one in the smooth band: check against the formula by hand.
        let i = (0..64)
            .find(|&i| {
                let w = 2.0 * std::f64::consts::PI * 500000f64.powf(2.0 * i as f64 / 128.0);
                (2048.0..=8192.0).contains(&w)
            })
            .unwrap();
        let f = 1.0 / 500000f64.powf(2.0 * i as f64 / 128.0);
        let w = 2.0 * std::f64::consts::PI / f;
        let s = (8192.0 / w - 1.0) / 3.0;
        assert!((inv[i] - ((1.0 - s) * f / 8.0 + s * f)).abs() < 1e-15);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_unknown_types_fail() {
        let v = json!({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2});
        let c = ModelConfig::from_json(&v, Path::new("c")).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        let mut bad = v.clone();
        bad["model_type"] = json!("gpt2");
        let e = ModelConfig::from_json(&bad, Path::new("c")).unwrap_err().to_string();
        assert!(e.contains("gpt2"), "{e}");
    }
}
