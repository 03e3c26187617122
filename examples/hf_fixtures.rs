//! Writes fixtures for `scripts/check_hf_compat.py`, which checks with Hugging Face
//! `transformers` that prefer's checkpoints load unchanged and give prefer's log-probs.
//!
//!   cargo run --release --example hf_fixtures -- OUT_DIR [--smollm2-layers N]
//!
//! OUT_DIR/<variant>/ gets an HF checkpoint written by prefer plus `expected.json` (token ids,
//! prefer's per-token log-probs, tokenisations and a rendered chat template). With
//! `--smollm2-layers N` it also writes OUT_DIR/smollm2-N.gguf: the real SmolLM2 GGUF cut to its
//! first N blocks, still Q4_1/Q8_0 as shipped (small enough to copy around), for a check of the
//! GGUF path (Q/K un-permutation, tokenizer from metadata) on real weights.

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device};
use prefer::model::{self, LoadedModel};
use prefer::testing::{tiny_model, write_gguf, TinySpec};
use prefer::tokenizer::Message;
use serde_json::json;
use std::path::Path;

const TEXTS: [&str; 4] = [
    "the cat is here and the dog sat on it",
    "<|im_start|>user\n12 + 30 =<|im_end|>\n 42",
    "\n\nHuman: What's 1234 + 5678? Café, naïve, 日本語…\n\nAssistant:  It is   6912.\n",
    "Hello world!!! I'm fine, you're 100% right -- aren't you?",
];

/// A reward model saved to `dir`, with `expected.json` holding its outputs on TEXTS.
fn write_reward_fixture(rm: &LoadedModel, dir: &Path) -> anyhow::Result<()> {
    model::hf::save_dir(rm, dir)?;
    let mut rewards = vec![];
    for t in TEXTS {
        let ids = rm.tokenizer.encode(t, true)?;
        let r: Vec<Vec<f32>> = rm
            .transformer
            .reward_matrix(std::slice::from_ref(&ids), rm.tokenizer.pad_id)?
            .to_vec2()?;
        let mut rec = json!({"text": t, "ids": ids, "reward": r[0][0]});
        if rm.transformer.cfg.reward_variance {
            rec["log_variance"] = json!(r[0][1]);
        }
        rewards.push(rec);
    }
    std::fs::write(
        dir.join("expected.json"),
        serde_json::to_string_pretty(&json!({"rewards": rewards}))?,
    )?;
    Ok(())
}

fn expected(m: &LoadedModel, texts: &[&str]) -> anyhow::Result<serde_json::Value> {
    let tok = &m.tokenizer;
    let mut seqs = vec![];
    for t in texts {
        let ids = tok.encode(t, true)?;
        let start = 1.max(ids.len() / 3);
        let lps = model::logprobs::token_logprobs(&m.transformer, &ids, start)?;
        seqs.push(json!({"text": t, "ids": ids, "completion_start": start, "logprobs": lps}));
    }
    let msgs = vec![Message {
        role: "user".into(),
        content: "What is 2 + 2?".into(),
    }];
    let chat = tok.apply_chat_template(&msgs, true).ok();
    Ok(json!({"sequences": seqs, "chat": {"messages": msgs, "rendered": chat}}))
}

pub fn write_expected(m: &LoadedModel, dir: &Path, texts: &[&str]) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("expected.json"),
        serde_json::to_string_pretty(&expected(m, texts)?)?,
    )?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = Path::new(args.get(1).map(String::as_str).unwrap_or("hf-fixtures")).to_path_buf();
    std::fs::create_dir_all(&out)?;
    let texts = TEXTS;
    if args.get(1).map(String::as_str) == Some("--expected") {
        // prefer's expectations for an existing HF checkpoint (e.g. one `prefer convert` wrote)
        let dir = Path::new(args.get(2).ok_or_else(|| anyhow::anyhow!("--expected DIR"))?);
        let m = model::load(dir, DType::F32, &Device::Cpu)?;
        write_expected(&m, dir, &texts)?;
        return Ok(());
    }
    let variants = [
        ("llama-tied", TinySpec::default()),
        (
            "qwen2-untied-bias",
            TinySpec {
                tie_embeddings: false,
                model_type: "qwen2",
                ..TinySpec::default()
            },
        ),
        (
            "mistral-llama3-rope",
            TinySpec {
                kv_heads: 4,
                llama3_rope_scaling: true,
                model_type: "mistral",
                ..TinySpec::default()
            },
        ),
        (
            "llama-bos",
            TinySpec {
                add_bos: true,
                ..TinySpec::default()
            },
        ),
    ];
    for (name, spec) in variants {
        let m = tiny_model(&spec, DType::F32, 42)?;
        let dir = out.join(name);
        model::hf::save_dir(&m, &dir)?;
        write_expected(&m, &dir, &texts)?;
        eprintln!("wrote {}", dir.display());
    }
    // Reward models (score head on the last non-pad token): *ForSequenceClassification,
    // one output, or two for a Gaussian head (mean and log-variance).
    let rm = tiny_model(&TinySpec::default(), DType::F32, 44)?.with_reward_head(1)?;
    write_reward_fixture(&rm, &out.join("llama-reward"))?;
    let rm = tiny_model(&TinySpec::default(), DType::F32, 45)?.with_gaussian_reward_head(2)?;
    write_reward_fixture(&rm, &out.join("llama-reward-gaussian"))?;
    // A GGUF (Q8_0) loaded and saved by prefer: the HF checkpoint of a GGUF model.
    let m = tiny_model(&TinySpec::default(), DType::F32, 43)?;
    let g = out.join("tiny-q8.gguf");
    write_gguf(&m, &g, GgmlDType::Q8_0)?;
    let gm = model::load(&g, DType::F32, &Device::Cpu)?;
    let dir = out.join("from-gguf-q8");
    model::hf::save_dir(&gm, &dir)?;
    write_expected(&gm, &dir, &texts)?;
    std::fs::remove_file(&g)?;

    if let Some(i) = args.iter().position(|a| a == "--smollm2-layers") {
        let n: usize = args.get(i + 1).map(|s| s.parse()).transpose()?.unwrap_or(4);
        let src = prefer::testing::shared::smollm2_gguf()
            .ok_or_else(|| anyhow::anyhow!("SmolLM2 GGUF not found; run scripts/fetch-model.sh"))?;
        let mut f = std::fs::File::open(&src)?;
        let content = gguf_file::Content::read(&mut f)?;
        let mut meta: Vec<(String, gguf_file::Value)> =
            content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (k, v) in meta.iter_mut() {
            if k == "llama.block_count" {
                *v = gguf_file::Value::U32(n as u32);
            }
        }
        let mut tensors = vec![];
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let keep = match name.strip_prefix("blk.") {
                Some(rest) => rest
                    .split('.')
                    .next()
                    .and_then(|b| b.parse::<usize>().ok())
                    .is_some_and(|b| b < n),
                None => true,
            };
            if keep {
                tensors.push((name.clone(), content.tensor(&mut f, name, &Device::Cpu)?));
            }
        }
        let p = out.join(format!("smollm2-{n}.gguf"));
        let mut w = std::fs::File::create(&p)?;
        let mr: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tr: Vec<(&str, &candle_core::quantized::QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut w, &mr, &tr)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
