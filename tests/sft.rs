//! SFT: the data path against TRL 1.16's own preparation, token by token, on SmolLM2's real
//! tokenizer and chat template (`tests/fixtures/trl-sft`, written by
//! `scripts/peers/trl_sft_fixture.py`); the loss against an independent computation; a tiny
//! model learning a toy corpus; assistant-only masks from `{% generation %}`; exact resume.

use candle_core::{DType, Device};
use prefer::batch::{PaddingSide, ScoredSeq};
use prefer::config::{Task, TrainConfig};
use prefer::data::sft::{load_sft_examples, pack_bfd, SftOptions};
use prefer::data::TruncationMode;
use prefer::model;
use prefer::testing::metrics;
use prefer::testing::{fixture, tiny_model, write_hf, TinySpec};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn smollm2_tokenizer() -> prefer::tokenizer::TextTokenizer {
    let p = prefer::testing::shared::smollm2_gguf()
        .unwrap_or_else(|| panic!("SmolLM2-135M-Instruct GGUF not found; run `scripts/fetch-model.sh`"));
    model::load_tokenizer(&p).unwrap()
}

fn opts(max_length: usize, packing: bool) -> SftOptions {
    SftOptions {
        dataset_text_field: "text".into(),
        completion_only_loss: None,
        assistant_only_loss: false,
        max_length,
        truncation_mode: TruncationMode::KeepStart,
        packing,
        columns: Vec::new(),
    }
}

fn ids_of(v: &Value) -> Vec<Vec<i64>> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn sft_data_matches_trls_preparation_token_by_token() {
    let tok = smollm2_tokenizer();
    let dir = fixture("trl-sft");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    assert_eq!(expected["trl_version"], "1.16.0");
    let max = expected["max_length"].as_u64().unwrap() as usize;
    for case in [
        "text",
        "prompt_completion",
        "conversational_prompt_completion",
        "messages",
    ] {
        let (ex, report) =
            load_sft_examples(&dir.join(format!("{case}.jsonl")), &tok, &opts(max, false), false).unwrap();
        let want_ids = ids_of(&expected["cases"][case]["input_ids"]);
        let want_labels = ids_of(&expected["cases"][case]["labels"]);
        assert_eq!(ex.len(), want_ids.len(), "{case}: examples");
        let mut masked = 0;
        for (i, e) in ex.iter().enumerate() {
            let ids: Vec<i64> = e.ids.iter().map(|&x| x as i64).collect();
            assert_eq!(ids, want_ids[i], "{case}[{i}]: input_ids");
            let targets: Vec<bool> = want_labels[i].iter().map(|&l| l != -100).collect();
            assert_eq!(e.targets, targets, "{case}[{i}]: which tokens carry the loss");
            masked += targets.iter().filter(|&&t| !t).count();
        }
        // prompt-completion rows mask their prompts (TRL's completion_only_loss default)
        assert_eq!(
            masked > 0,
            case.contains("prompt_completion"),
            "{case}: {masked} masked"
        );
        assert!(
            report.truncated > 0,
            "{case}: the fixture's rows are longer than max_length"
        );
    }
    // packing: TRL's best-fit-decreasing bins, in TRL's order
    let pmax = expected["packed_max_length"].as_u64().unwrap() as usize;
    let (ex, _) = load_sft_examples(&dir.join("text_short.jsonl"), &tok, &opts(pmax, true), false).unwrap();
    let bins = pack_bfd(&ex.iter().map(|e| e.ids.len()).collect::<Vec<_>>(), pmax);
    let want_ids = ids_of(&expected["cases"]["text_short_packed"]["input_ids"]);
    let want_lengths = ids_of(&expected["cases"]["text_short_packed"]["seq_lengths"]);
    assert_eq!(bins.len(), want_ids.len());
    for (b, bin) in bins.iter().enumerate() {
        let ids: Vec<i64> = bin.iter().flat_map(|&i| ex[i].ids.iter().map(|&x| x as i64)).collect();
        let lengths: Vec<i64> = bin.iter().map(|&i| ex[i].ids.len() as i64).collect();
        assert_eq!(ids, want_ids[b], "bin {b}: input_ids");
        assert_eq!(lengths, want_lengths[b], "bin {b}: seq_lengths");
    }
}

#[test]
fn best_fit_decreasing_by_hand() {
    // TRL's docstring example: lengths 3, 4, 2, 1 in bins of 4 → [4], [3, 1], [2]
    assert_eq!(pack_bfd(&[3, 4, 2, 1], 4), vec![vec![1], vec![0, 3], vec![2]]);
    // the tightest fit wins over the first fit; ties go to the older bin
    assert_eq!(pack_bfd(&[5, 7, 3, 2, 2], 8), vec![vec![1], vec![0, 2], vec![3, 4]]);
    // over-long sequences count as max_length
    assert_eq!(pack_bfd(&[20, 1], 8), vec![vec![0], vec![1]]);
}

fn tmp(name: &str) -> PathBuf {
    prefer::testing::scratch_dir(&format!("sft-{name}"))
}

/// A toy corpus the tiny model can learn: prompt "<word> ->" and completion repeating a fixed
/// sentence.
fn toy_sft(dir: &Path, n: usize) -> PathBuf {
    let words = ["the", "cat", "is", "a", "dog", "here", "sat", "on"];
    let lines: Vec<String> = (0..n)
        .map(|i| serde_json::json!({"prompt": format!("{} ->", words[i % 8]), "completion": " 1 2 3 4"}).to_string())
        .collect();
    let p = dir.join("sft.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn setup(name: &str) -> (PathBuf, TrainConfig) {
    prefer::testing::set_threads_for_tests();
    let dir = tmp(name);
    write_hf(
        &tiny_model(&TinySpec::default(), DType::F32, 11).unwrap(),
        &dir.join("model"),
    )
    .unwrap();
    let data = toy_sft(&dir, 24);
    let set = |k: &str, v: String| format!("{k}={v}");
    let cfg = TrainConfig::load(
        None,
        &[
            set("task", "\"sft\"".into()),
            set("model_name_or_path", format!("\"{}\"", dir.join("model").display())),
            set("train_file", format!("\"{}\"", data.display())),
            set("output_dir", format!("\"{}\"", dir.join("out").display())),
            "learning_rate=1e-2".into(),
            "per_device_train_batch_size=4".into(),
            "gradient_accumulation_steps=2".into(),
            "max_steps=12".into(),
            "logging_steps=1".into(),
            "save_steps=5".into(),
            "disable_tqdm=true".into(),
        ],
    )
    .unwrap();
    (dir, cfg)
}

#[test]
fn sft_defaults_are_trls() {
    let (_dir, cfg) = setup("defaults");
    let d = TrainConfig::load(
        None,
        &[
            "task=\"sft\"".into(),
            "model_name_or_path=\"m\"".into(),
            "train_file=\"t\"".into(),
        ],
    )
    .unwrap();
    assert_eq!(d.learning_rate, 2e-5);
    assert_eq!(d.truncation_mode, TruncationMode::KeepStart);
    assert_eq!(d.loss_type.names(), vec!["nll".to_string()]);
    assert_eq!(cfg.task, Task::Sft);
    let e = TrainConfig::load(
        None,
        &[
            "task=\"sft\"".into(),
            "model_name_or_path=\"m\"".into(),
            "train_file=\"t\"".into(),
            "loss_type=\"sigmoid\"".into(),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("nll") && e.contains("dft"), "{e}");
}

/// The first step's logged loss is Σ NLL of the completion tokens of the step's 8 examples /
/// their count, computed independently through `sequence_logps` on the starting model; the
/// model then learns the corpus, with TRL's metrics logged.
#[test]
fn sft_loss_is_the_token_mean_nll_and_the_toy_corpus_is_learned() {
    let (dir, cfg) = setup("learn");
    let m = model::load(&dir.join("model"), DType::F32, &Device::Cpu).unwrap();
    let (ex, _) = load_sft_examples(Path::new(&cfg.train_file), &m.tokenizer, &cfg.sft_options(), false).unwrap();
    // step 1 reads the first 8 units (shuffled by the seeded order): take them from the trainer
    let t = prefer::train::Trainer::new(&cfg).unwrap();
    let first: Vec<usize> = (0..2).flat_map(|a| t.order.micro_batch(a)).collect();
    drop(t);
    let (mut sum, mut n) = (0f64, 0usize);
    for &i in &first {
        let e = &ex[i];
        let start = e.targets.iter().position(|&t| t).unwrap();
        assert!(
            e.targets[start..].iter().all(|&t| t),
            "completion-only: the targets are one tail"
        );
        let seq = ScoredSeq {
            ids: e.ids.clone(),
            completion_start: start,
        };
        let lp = model::sequence_logps(&m.transformer, &[seq], PaddingSide::Right).unwrap();
        let v: Vec<f64> = lp.token_logps.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        sum -= v.iter().sum::<f64>();
        n += v.len();
    }
    prefer::train::train(&cfg).unwrap();
    let logs = metrics(&cfg);
    let loss0 = logs[0]["loss"].as_f64().unwrap();
    assert!(
        (loss0 - sum / n as f64).abs() < 1e-5,
        "step 1 loss {loss0} vs {}",
        sum / n as f64
    );
    for k in [
        "loss",
        "mean_token_accuracy",
        "entropy",
        "num_tokens",
        "grad_norm",
        "learning_rate",
    ] {
        assert!(logs[0][k].is_number(), "{k} missing: {}", logs[0]);
    }
    let last = logs.last().unwrap();
    assert!(
        last["loss"].as_f64().unwrap() < 0.3 * loss0,
        "{loss0} -> {}",
        last["loss"]
    );
    assert!(last["mean_token_accuracy"].as_f64().unwrap() > 0.9, "{last}");
    // num_tokens counts every input token seen: 12 steps of 8 = 4 epochs of the 24 examples
    let all: usize = ex.iter().map(|e| e.ids.len()).sum();
    assert_eq!(last["num_tokens"].as_f64().unwrap() as usize, 4 * all);
    // the output is a causal LM checkpoint that generates the corpus
    let trained = model::load(Path::new(&cfg.output_dir), DType::F32, &Device::Cpu).unwrap();
    let prompt = trained.tokenizer.encode("cat ->", true).unwrap();
    let out = model::logprobs::generate_greedy(&trained.transformer, &prompt, 8, &[trained.tokenizer.eos_id]).unwrap();
    assert_eq!(trained.tokenizer.decode(&out, true).unwrap(), " 1 2 3 4");
}

#[test]
fn sft_resumes_exactly_and_packs() {
    let (_dir, cfg) = setup("resume");
    prefer::train::train(&cfg).unwrap();
    let full = metrics(&cfg);
    let c2 = TrainConfig {
        output_dir: format!("{}-2", cfg.output_dir),
        ..cfg.clone()
    };
    let again = prefer::testing::stop_and_resume(&c2, 7);
    assert_eq!(again.len(), full.len());
    for (x, y) in again.iter().zip(&full) {
        for k in ["loss", "mean_token_accuracy", "entropy", "num_tokens", "grad_norm"] {
            assert_eq!(x[k], y[k], "step {}: {k} differs after resume", x["step"]);
        }
    }
    // packing: rows of several examples, the same loss definition, and it learns too
    let packed = TrainConfig {
        output_dir: format!("{}-packed", cfg.output_dir),
        max_length: 32,
        sft: prefer::config::sft::SftParams {
            packing: true,
            ..cfg.sft.clone()
        },
        per_device_train_batch_size: 1,
        ..cfg.clone()
    };
    prefer::train::train(&packed).unwrap();
    let logs = metrics(&packed);
    let (a, b) = (
        logs[0]["loss"].as_f64().unwrap(),
        logs.last().unwrap()["loss"].as_f64().unwrap(),
    );
    assert!(b < 0.5 * a, "packed: {a} -> {b}");
}

/// `assistant_only_loss`: the targets are the tokens inside the template's `{% generation %}`
/// spans (the assistant's content and end marker), as transformers' assistant masks; a template
/// without them is refused as TRL refuses it.
#[test]
fn assistant_only_loss_reads_generation_spans() {
    let mut tok = prefer::testing::tiny_tokenizer(false).unwrap();
    let dir = tmp("assistant");
    let rows = [serde_json::json!({"messages": [
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "is here"},
        {"role": "user", "content": "a dog"},
        {"role": "assistant", "content": "sat on"}]})];
    let p = dir.join("chat.jsonl");
    std::fs::write(&p, rows.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n")).unwrap();
    let o = SftOptions {
        assistant_only_loss: true,
        ..opts(0, false)
    };
    tok.chat_template = Some(prefer::testing::CHATML_TEMPLATE.into());
    let e = load_sft_examples(&p, &tok, &o, false).unwrap_err().to_string();
    assert!(e.contains("generation") && e.contains("chat.jsonl:1"), "{e}");
    tok.chat_template = Some(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}".into(),
    );
    let (ex, _) = load_sft_examples(&p, &tok, &o, false).unwrap();
    let e = &ex[0];
    let picked: Vec<u32> = e
        .ids
        .iter()
        .zip(&e.targets)
        .filter(|(_, &t)| t)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(tok.decode(&picked, false).unwrap(), "is here<|im_end|>sat on<|im_end|>");
    // the same conversation without the option: every token
    let (all, _) = load_sft_examples(&p, &tok, &opts(0, false), false).unwrap();
    assert_eq!(all[0].ids, e.ids);
    assert!(all[0].targets.iter().all(|&t| t));
}

/// eval_fraction holds out a share of the rows before packing, and the run evaluates it.
#[test]
fn sft_eval_fraction_holds_out_rows_before_packing() {
    let (_dir, cfg) = setup("held-out");
    for packing in [false, true] {
        let c = TrainConfig {
            output_dir: format!("{}-{packing}", cfg.output_dir),
            eval_fraction: 0.25,
            max_length: 32,
            max_steps: 2,
            sft: prefer::config::sft::SftParams {
                packing,
                ..cfg.sft.clone()
            },
            ..cfg.clone()
        };
        let mut t = prefer::train::Trainer::new(&c).unwrap();
        let s = t.data.sft.clone().unwrap();
        let n = |u: &Vec<Vec<prefer::data::sft::SftExample>>| u.iter().map(Vec::len).sum::<usize>();
        assert_eq!((n(&s.train), n(&s.eval)), (18, 6), "packing {packing}");
        assert_eq!(packing, s.train.len() < 18, "packing {packing}: units");
        t.run().unwrap();
        drop(t);
        let logs = metrics(&c);
        assert!(logs.iter().any(|m| m["eval_loss"].is_number()), "{logs:?}");
    }
}
