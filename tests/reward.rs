//! Reward models: the scalar head, its HF layout, Bradley-Terry training, `prefer score`.

use candle_core::{DType, Device, Tensor};
use prefer::config::{Task, TrainConfig};
use prefer::model;
use prefer::testing::{tiny_model, write_hf, TinySpec};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    prefer::testing::scratch_dir(&format!("reward-{name}"))
}

/// The words of the toy prompts.
const WORDS: [&str; 8] = ["the", "cat", "is", "a", "dog", "here", "sat", "on"];

/// A tiny causal LM with random weights (`seed`), written as an HF directory `dir/lm`.
fn tiny_lm(dir: &Path, seed: u64) {
    write_hf(
        &tiny_model(&TinySpec::default(), DType::F32, seed).unwrap(),
        &dir.join("lm"),
    )
    .unwrap();
}

/// The `prefer` binary, on one thread.
fn prefer_cmd() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_prefer"));
    c.env("RAYON_NUM_THREADS", "1");
    c
}

#[test]
fn reward_head_scores_the_last_non_pad_token_and_round_trips() {
    prefer::testing::set_threads_for_tests();
    let rm = tiny_model(
        &TinySpec {
            tie_embeddings: false,
            ..TinySpec::default()
        },
        DType::F32,
        51,
    )
    .unwrap()
    .with_reward_head(7)
    .unwrap();
    let t = &rm.transformer;
    assert!(t.cfg.reward_head && t.lm_head.is_none() && t.score.is_some());
    let pad = rm.tokenizer.pad_id;
    let seqs = vec![vec![5u32, 6, 7, 8], vec![9u32, 10, pad]];
    let got: Vec<f32> = t.rewards(&seqs, pad).unwrap().to_vec1().unwrap();
    // by hand: the hidden state of the last non-pad token of each sequence alone, times w
    let w: Vec<f32> = t.score.as_ref().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for (k, (s, last)) in [(&seqs[0], 3usize), (&seqs[1], 1usize)].into_iter().enumerate() {
        let ids = &s[..=last];
        let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let a = model::AttentionInputs::padded(&t.cfg, &[vec![true; ids.len()]], DType::F32, &Device::Cpu).unwrap();
        let h: Vec<Vec<f32>> = t
            .hidden_states(&input, &a)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let want: f32 = h[last].iter().zip(&w).map(|(a, b)| a * b).sum();
        assert!((got[k] - want).abs() < 1e-4, "row {k}: {} vs {want}", got[k]);
    }
    // saved in the *ForSequenceClassification layout and reloaded bit-identically
    let dir = tmp("roundtrip");
    write_hf(&rm, &dir).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["num_labels"], 1);
    let names: Vec<String> = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    assert!(names.contains(&"score.weight".to_string()) && !names.contains(&"lm_head.weight".to_string()));
    let back = model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let again: Vec<f32> = back.transformer.rewards(&seqs, pad).unwrap().to_vec1().unwrap();
    assert_eq!(got, again);
}

#[test]
fn reward_model_training_learns_the_toy_preference_and_scores() {
    prefer::testing::set_threads_for_tests();
    let dir = tmp("train");
    tiny_lm(&dir, 52);
    let lines: Vec<String> = (0..24)
        .map(|i| serde_json::json!({"prompt": format!("{} {} =", WORDS[i % 8], WORDS[(i * 3 + 1) % 8]), "chosen": " 1", "rejected": " 2"}).to_string())
        .collect();
    std::fs::write(dir.join("pairs.jsonl"), lines.join("\n")).unwrap();
    let cfg = TrainConfig {
        task: Task::Reward,
        model_name_or_path: dir.join("lm").display().to_string(),
        train_file: dir.join("pairs.jsonl").display().to_string(),
        output_dir: dir.join("rm").display().to_string(),
        learning_rate: 1e-3,
        per_device_train_batch_size: 4,
        max_steps: 12,
        logging_steps: 1,
        disable_tqdm: true,
        ..TrainConfig::default()
    };
    assert_eq!(cfg.objective().unwrap().name(), "bradley_terry");
    let out = prefer::train::train(&cfg).unwrap();
    let last = out.last_log.unwrap();
    for k in ["accuracy", "margin", "mean_reward", "min_reward", "max_reward"] {
        assert!(last.get(k).is_some(), "{k} missing: {last}");
    }
    assert!(
        last["accuracy"].as_f64().unwrap() > 0.9 && last["margin"].as_f64().unwrap() > 0.0,
        "{last}"
    );
    // the saved reward model scores chosen above rejected, through the CLI too
    let o = prefer_cmd()
        .args(["score", "--model"])
        .arg(Path::new(&cfg.output_dir))
        .arg("--data")
        .arg(&cfg.train_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 24);
    let right = rows
        .iter()
        .filter(|r| r["chosen_score"].as_f64() > r["rejected_score"].as_f64())
        .count();
    assert!(right >= 22, "{right}/24");
    // task mismatches are one clear error
    let e = TrainConfig {
        task: Task::Dpo,
        loss_type: prefer::config::LossType::One("bradley_terry".into()),
        ..cfg.clone()
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("set task = \"reward\""), "{e}");
    let e = prefer::train::Trainer::new(&TrainConfig {
        task: Task::Dpo,
        model_name_or_path: cfg.output_dir.clone(),
        ..cfg
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("is a reward model"), "{e}");
}

#[test]
fn compare_rewards_reports_implicit_and_explicit_accuracy_on_both_splits() {
    prefer::testing::set_threads_for_tests();
    let dir = tmp("compare");
    tiny_lm(&dir, 53);
    let make = |name: &str, rejected: &str| {
        let lines: Vec<String> = (0..24)
            .map(|i| serde_json::json!({"prompt": format!("{} {} =", WORDS[i % 8], WORDS[(i * 5 + 3) % 8]), "chosen": " 1", "rejected": rejected}).to_string())
            .collect();
        std::fs::write(dir.join(name), lines.join("\n")).unwrap();
        dir.join(name)
    };
    let (train, shifted) = (make("train.jsonl", " 2"), make("shifted.jsonl", " 9"));
    let base = TrainConfig {
        model_name_or_path: dir.join("lm").display().to_string(),
        train_file: train.display().to_string(),
        per_device_train_batch_size: 4,
        max_steps: 12,
        disable_tqdm: true,
        ..TrainConfig::default()
    };
    prefer::train::train(&TrainConfig {
        task: Task::Reward,
        learning_rate: 1e-3,
        output_dir: dir.join("rm").display().to_string(),
        ..base.clone()
    })
    .unwrap();
    prefer::train::train(&TrainConfig {
        learning_rate: 5e-3,
        output_dir: dir.join("dpo").display().to_string(),
        ..base
    })
    .unwrap();
    let o = prefer_cmd()
        .args(["compare-rewards", "--json", "--dpo"])
        .arg(dir.join("dpo"))
        .arg("--ref")
        .arg(dir.join("lm"))
        .arg("--rm")
        .arg(dir.join("rm"))
        .arg("--data")
        .arg(&train)
        .arg("--shifted")
        .arg(&shifted)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cols: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(cols.len(), 2);
    assert_eq!(
        (cols[0]["split"].as_str(), cols[1]["split"].as_str()),
        (Some("in-distribution"), Some("shifted"))
    );
    for key in ["implicit_dpo", "explicit_rm"] {
        assert!(
            cols[0][key].as_f64().unwrap() > 0.9,
            "{key} in-distribution: {}",
            cols[0]
        );
        assert!((0.0..=1.0).contains(&cols[1][key].as_f64().unwrap()));
    }
}

/// MaxMin-RLHF's EM recovers two planted groups of annotators with opposite preferences.
#[test]
fn em_recovers_planted_annotator_clusters() {
    prefer::testing::set_threads_for_tests();
    let dir = tmp("maxmin");
    tiny_lm(&dir, 54);
    let mut lines = vec![];
    for i in 0..64 {
        let group_a = i % 2 == 0;
        let annotator = format!("{}{}", if group_a { "a" } else { "b" }, (i / 2) % 4);
        let (c, r) = if group_a { (" 1", " 2") } else { (" 2", " 1") };
        lines.push(
            serde_json::json!({"prompt": format!("{} {} =", WORDS[i % 8], WORDS[(i / 8) % 8]), "chosen": c, "rejected": r, "annotator": annotator})
                .to_string(),
        );
    }
    std::fs::write(dir.join("pairs.jsonl"), lines.join("\n")).unwrap();
    let cfg = TrainConfig {
        task: Task::Reward,
        reward_clusters: 2,
        em_steps: 4,
        model_name_or_path: dir.join("lm").display().to_string(),
        train_file: dir.join("pairs.jsonl").display().to_string(),
        output_dir: dir.join("rm").display().to_string(),
        learning_rate: 1e-3,
        per_device_train_batch_size: 8,
        max_steps: 24,
        logging_steps: 4,
        disable_tqdm: true,
        ..TrainConfig::default()
    };
    let mut t = prefer::train::Trainer::new(&cfg).unwrap();
    assert_eq!(t.policy.transformer.cfg.num_labels, 2);
    let out = t.run().unwrap();
    let bs = t.cfg.per_device_eval_batch_size;
    let rm = (*t.algorithm)
        .as_any_mut()
        .downcast_mut::<prefer::algorithms::reward::RewardModel>()
        .unwrap();
    let mm = rm.maxmin.as_mut().unwrap();
    mm.e_step(&t.policy, &t.data.train, bs).unwrap();
    let clusters = mm.clusters.clone().unwrap();
    assert_eq!(clusters.len(), 8);
    let ca = clusters["a0"];
    for (a, &c) in &clusters {
        assert_eq!(c == ca, a.starts_with('a'), "impure clusters: {clusters:?}");
    }
    let last = out.last_log.unwrap();
    for h in 0..2 {
        assert_eq!(
            last[format!("maxmin/cluster_{h}_annotators")].as_f64(),
            Some(4.0),
            "{last}"
        );
    }
    for (k, v) in &mm.metrics {
        if k.ends_with("accuracy") {
            assert!(*v > 0.9, "{k} = {v}");
        }
    }
    // K heads are saved as num_labels = 2
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("rm/config.json")).unwrap()).unwrap();
    assert_eq!(saved["num_labels"], 2);
    let back = model::load(&dir.join("rm"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.transformer.cfg.num_labels, 2);
    drop(t); // its hold on the output_dir
             // rows without an annotator are refused up front
    std::fs::write(
        dir.join("anon.jsonl"),
        "{\"prompt\": \"a =\", \"chosen\": \" 1\", \"rejected\": \" 2\"}\n",
    )
    .unwrap();
    let e = prefer::train::Trainer::new(&TrainConfig {
        train_file: dir.join("anon.jsonl").display().to_string(),
        ..cfg
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("anon.jsonl:1: field `annotator`"), "{e}");
}

/// Collaborative reward modeling on 30 % planted label noise: each model filters the pairs its
/// peer is least sure of, the filtered pairs are mostly the flipped ones, and a resumed run
/// matches an uninterrupted one (the peer and its optimizer live in the checkpoints).
#[test]
fn crm_filters_planted_noise_and_resumes_exactly() {
    prefer::testing::set_threads_for_tests();
    let dir = tmp("crm");
    tiny_lm(&dir, 55);
    let lines: Vec<String> = (0..64)
        .map(|i| serde_json::json!({"prompt": format!("{} {} =", WORDS[i % 8], WORDS[(i / 8) % 8]), "chosen": " 1", "rejected": " 2"}).to_string())
        .collect();
    std::fs::write(dir.join("clean.jsonl"), lines.join("\n")).unwrap();
    let (noisy, flipped) = prefer::data::convert::corrupt_labels(&dir.join("clean.jsonl"), 0.3, 3).unwrap();
    assert!((12..=26).contains(&flipped), "{flipped}");
    std::fs::write(dir.join("noisy.jsonl"), noisy.join("\n")).unwrap();
    let cfg = TrainConfig {
        task: Task::Reward,
        crm: true,
        model_name_or_path: dir.join("lm").display().to_string(),
        train_file: dir.join("noisy.jsonl").display().to_string(),
        output_dir: dir.join("crm").display().to_string(),
        learning_rate: 1e-3,
        per_device_train_batch_size: 8,
        max_steps: 16,
        logging_steps: 1,
        save_steps: 5,
        disable_tqdm: true,
        ..TrainConfig::default()
    };
    let out = prefer::train::train(&cfg).unwrap();
    let last = out.last_log.unwrap();
    assert_eq!(
        last["crm/filtered_for_model"].as_f64(),
        Some(2.0),
        "8 − ceil(0.7·8) per batch: {last}"
    );
    assert!(Path::new(&cfg.output_dir)
        .join("peer_model/model.safetensors")
        .is_file());
    // the model's lowest-margin pairs (what it would filter for its peer) are mostly flipped ones
    let m = model::load(Path::new(&cfg.output_dir), DType::F32, &Device::Cpu).unwrap();
    let (ex, _) =
        prefer::data::load_tokenized_examples(Path::new(&cfg.train_file), &m.tokenizer, &cfg.tokenize_options(), false)
            .unwrap();
    let scores = prefer::stats::score_rewards(&m.transformer, &ex, 16, m.tokenizer.pad_id).unwrap();
    let is_flipped: Vec<bool> = noisy
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["flipped"] == true)
        .collect();
    let mut order: Vec<usize> = (0..ex.len()).collect();
    order.sort_by(|&a, &b| (scores[a][0] - scores[a][1]).total_cmp(&(scores[b][0] - scores[b][1])));
    let bottom = &order[..flipped];
    let caught = bottom.iter().filter(|&&i| is_flipped[i]).count();
    assert!(
        caught as f64 / flipped as f64 > 0.8,
        "{caught} of the {flipped} lowest-margin pairs are flipped"
    );
    // resume from step 5 gives the same metrics as the run above
    let c2 = TrainConfig {
        output_dir: dir.join("crm2").display().to_string(),
        ..cfg.clone()
    };
    let mut t = prefer::train::Trainer::new(&c2).unwrap();
    t.stop_after_step = Some(5);
    t.run().unwrap();
    drop(t); // its hold on the output_dir
    assert!(Path::new(&c2.output_dir)
        .join("checkpoint-5/peer_model/optimizer.safetensors")
        .is_file());
    prefer::train::train(&TrainConfig {
        resume_from_checkpoint: Some("latest".into()),
        ..c2.clone()
    })
    .unwrap();
    for (a, b) in prefer::testing::metrics(&cfg)
        .iter()
        .zip(prefer::testing::metrics(&c2).iter())
    {
        assert_eq!(a["loss"], b["loss"], "step {}", a["step"]);
        assert_eq!(a["accuracy"], b["accuracy"]);
    }
}

/// A Gaussian reward head (`loss_type = "gaussian"`): on clean pairs (prompts ending in `=`,
/// always " 1" over " 2") and ambiguous ones (prompts ending in `?`, each labelled " 3" over
/// " 4" once and " 4" over " 3" once), it ranks the clean pairs with confidence and puts ½ on
/// each ambiguous pair. (Which of Δμ and σ carries the confidence is not identified by pairwise
/// labels alone, so the test does not compare σ across groups.) It saves in the
/// `*ForSequenceClassification` layout with num_labels = 2 and labelled outputs, reloads to
/// identical scores, and `prefer score` / `prefer eval` report σ, probabilities and calibration.
#[test]
fn gaussian_reward_head_learns_where_labels_disagree_and_round_trips() {
    prefer::testing::set_threads_for_tests();
    let dir = tmp("gaussian");
    tiny_lm(&dir, 57);
    let mut lines = Vec::new();
    for i in 0..16 {
        // lines 4i+1, 4i+2: a clean prompt twice; 4i+3, 4i+4: an ambiguous one, both ways
        let p = format!("{} {}", WORDS[i % 8], WORDS[(i / 8) % 8]);
        for _ in 0..2 {
            lines.push(serde_json::json!({"prompt": format!("{p} ="), "chosen": " 1", "rejected": " 2"}).to_string());
        }
        for (c, r) in [(" 3", " 4"), (" 4", " 3")] {
            lines.push(serde_json::json!({"prompt": format!("{p} ?"), "chosen": c, "rejected": r}).to_string());
        }
    }
    std::fs::write(dir.join("pairs.jsonl"), lines.join("\n")).unwrap();
    let cfg = TrainConfig {
        task: Task::Reward,
        loss_type: prefer::config::LossType::One("gaussian".into()),
        model_name_or_path: dir.join("lm").display().to_string(),
        train_file: dir.join("pairs.jsonl").display().to_string(),
        output_dir: dir.join("rm").display().to_string(),
        learning_rate: 2e-3,
        per_device_train_batch_size: 8,
        max_steps: 40,
        logging_steps: 10,
        disable_tqdm: true,
        ..TrainConfig::default()
    };
    let out = prefer::train::train(&cfg).unwrap();
    let last = out.last_log.unwrap();
    for k in ["accuracy", "margin", "mean_sigma", "mean_probability"] {
        assert!(last.get(k).is_some(), "{k} missing: {last}");
    }
    let rm = model::load(Path::new(&cfg.output_dir), DType::F32, &Device::Cpu).unwrap();
    assert!(rm.transformer.cfg.reward_variance && rm.transformer.cfg.num_labels == 2);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&cfg.output_dir).join("config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["num_labels"], 2);
    assert_eq!(saved["id2label"]["1"], "reward_log_variance");

    let o = prefer_cmd()
        .args(["score", "--model"])
        .arg(&cfg.output_dir)
        .arg("--data")
        .arg(&cfg.train_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 64);
    let f = |r: &serde_json::Value, k: &str, i: usize| r[k][i].as_f64().unwrap();
    let (clean, ambiguous): (Vec<_>, Vec<_>) = rows.iter().partition(|r| (r["line"].as_u64().unwrap() - 1) % 4 < 2);
    let right = clean.iter().filter(|r| f(r, "scores", 0) > f(r, "scores", 1)).count();
    assert!(right >= 30, "clean pairs ranked right: {right}/32");
    let prob = |r: &serde_json::Value| r["preference_probability"].as_f64().unwrap();
    // clean pairs: confident; ambiguous pairs (each labelled both ways): indifferent
    let p_clean = clean.iter().map(|r| prob(r)).sum::<f64>() / clean.len() as f64;
    let off_half = ambiguous.iter().map(|r| (prob(r) - 0.5).abs()).fold(0.0, f64::max);
    assert!(
        p_clean > 0.9 && off_half < 0.1,
        "P clean {p_clean}, ambiguous max |P − ½| {off_half}"
    );
    // σ is reported for every response, and P is Φ(Δμ/√(σ_w² + σ_l²)) of what is reported
    for r in &rows {
        let (s0, s1) = (f(r, "sigmas", 0), f(r, "sigmas", 1));
        assert!(s0 > 0.0 && s1 > 0.0 && s0.is_finite() && s1.is_finite(), "{r}");
        let z = (f(r, "scores", 0) - f(r, "scores", 1)) / (s0 * s0 + s1 * s1).sqrt();
        assert!((prefer::util::log_ndtr(z).exp() - prob(r)).abs() < 1e-9, "{r}");
    }

    // reloaded bit-identically: the same means and variances
    let ex: Vec<prefer::data::TokenizedExample> = {
        let (e, _) = prefer::data::load_tokenized_examples(
            Path::new(&cfg.train_file),
            &rm.tokenizer,
            &Default::default(),
            false,
        )
        .unwrap();
        e
    };
    let a = prefer::stats::score_reward_heads(&rm.transformer, &ex, 8, rm.tokenizer.pad_id).unwrap();
    let back = model::load(Path::new(&cfg.output_dir), DType::F32, &Device::Cpu).unwrap();
    let b = prefer::stats::score_reward_heads(&back.transformer, &ex, 8, back.tokenizer.pad_id).unwrap();
    assert_eq!(a, b);

    // prefer eval reports accuracy and the calibration of Φ(Δμ/√(σ_w² + σ_l²))
    let o = prefer_cmd()
        .args(["eval", "--json", "--model"])
        .arg(&cfg.output_dir)
        .arg("--data")
        .arg(&cfg.train_file)
        .arg("--plots")
        .arg(dir.join("plots"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ece = v["calibration_ece"].as_f64().unwrap();
    // by hand from the scored probabilities
    let probs: Vec<f64> = rows.iter().map(prob).collect();
    let want = prefer::eval::calibration(&probs, prefer::eval::CALIBRATION_BINS).ece;
    assert!((ece - want).abs() < 1e-9, "{ece} vs {want}");
    assert!(dir.join("plots/calibration.png").is_file());
    // a Gaussian head with MaxMin clusters is one clear error
    let e = TrainConfig {
        reward_clusters: 2,
        ..cfg
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("reward_clusters = 1"), "{e}");
}

/// `prefer pal fit` / `prefer pal adapt` end to end on a tiny model: two groups of annotators
/// with opposite preferences. Two prototypes serve both groups on held-out pairs where one
/// shared prototype cannot, the annotators split 4/4 between the prototypes, and new
/// annotators are fitted from 6 pairs each. Rows without an annotator are refused by line.
#[test]
fn pal_cli_fits_annotator_groups_and_adapts_new_annotators() {
    prefer::testing::set_threads_for_tests();
    let dir = tmp("pal");
    tiny_lm(&dir, 58);
    let rows = |annotators: &[&str], per: usize| -> String {
        let mut lines = vec![];
        for i in 0..per {
            for (j, a) in annotators.iter().enumerate() {
                let (c, r) = if a.starts_with('a') { (" 1", " 2") } else { (" 2", " 1") };
                let prompt = format!("{} {} =", WORDS[(i + j) % 8], WORDS[(i * 3 + j) % 8]);
                lines.push(
                    serde_json::json!({"prompt": prompt, "chosen": c, "rejected": r, "annotator": a}).to_string(),
                );
            }
        }
        lines.join("\n")
    };
    std::fs::write(
        dir.join("known.jsonl"),
        rows(&["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"], 12),
    )
    .unwrap();
    std::fs::write(dir.join("new.jsonl"), rows(&["a9", "b9"], 16)).unwrap();
    let prefer = |args: &[&str]| {
        let o = prefer_cmd().current_dir(&dir).args(args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (ok, out, err) = prefer(&[
        "pal",
        "fit",
        "--model",
        "lm",
        "--data",
        "known.jsonl",
        "--out",
        "pal",
        "--eval-fraction",
        "0.25",
        "--json",
    ]);
    assert!(ok, "{err}");
    let fit: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (fit["train_pairs"].as_u64(), fit["held_out_pairs"].as_u64()),
        (Some(72), Some(24))
    );
    let (two, one) = (
        fit["held_out_accuracy"].as_f64().unwrap(),
        fit["single_prototype_held_out_accuracy"].as_f64().unwrap(),
    );
    assert!(two > 0.9 && one < 0.75, "held out: K=2 {two}, one prototype {one}");
    assert_eq!(fit["users_per_prototype"], serde_json::json!([4, 4]), "{fit}");
    let (ok, out, err) = prefer(&[
        "pal",
        "adapt",
        "--pal",
        "pal",
        "--data",
        "new.jsonl",
        "--shots",
        "6",
        "--json",
    ]);
    assert!(ok, "{err}");
    let adapt: serde_json::Value = serde_json::from_str(&out).unwrap();
    let acc = adapt["held_out_accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "{adapt}");
    assert_eq!(adapt["users"][0]["held_out_pairs"], 10);
    // the two new annotators lean on different prototypes
    let lean = |u: usize| adapt["users"][u]["weights"][0].as_f64().unwrap() > 0.5;
    assert_ne!(lean(0), lean(1), "{adapt}");
    // the table form names every annotator
    let (ok, out, _) = prefer(&["pal", "adapt", "--pal", "pal", "--data", "new.jsonl", "--shots", "6"]);
    assert!(ok && out.contains("| a9 |") && out.contains("| b9 |"), "{out}");
    // rows without an annotator: one clear error with file and line
    std::fs::write(
        dir.join("anon.jsonl"),
        "{\"prompt\": \"a =\", \"chosen\": \" 1\", \"rejected\": \" 2\"}\n",
    )
    .unwrap();
    let (ok, _, err) = prefer(&["pal", "fit", "--model", "lm", "--data", "anon.jsonl", "--out", "x"]);
    assert!(
        !ok && err.contains("anon.jsonl:1") && err.contains("annotator"),
        "{err}"
    );
    // nonsense sizes are refused before anything is loaded
    let (ok, _, err) = prefer(&[
        "pal",
        "fit",
        "--model",
        "lm",
        "--data",
        "known.jsonl",
        "--out",
        "x",
        "--dim",
        "0",
    ]);
    assert!(!ok && err.contains("--dim"), "{err}");
    // too few pairs to adapt and test
    let (ok, _, err) = prefer(&["pal", "adapt", "--pal", "pal", "--data", "new.jsonl", "--shots", "16"]);
    assert!(!ok && err.contains("--shots 16"), "{err}");
}
