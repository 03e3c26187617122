//! The training loop end to end on generated tiny models: learning, exact resume, Ctrl-C,
//! precomputed reference log-probs, and the CLI tools.

use prefer::algorithms::preference::Preference;
use prefer::algorithms::reward::RewardModel;
use prefer::config::{Task, TrainConfig};
use prefer::stats::reference::Reference;
use prefer::testing::metrics;
use prefer::testing::{tiny_model, write_gguf, write_hf, TinySpec};
use prefer::train::Trainer;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    prefer::testing::scratch_dir(&format!("train-{name}"))
}

/// A learnable toy preference: after any prompt, " 1" is preferred to " 2".
fn toy_data(dir: &Path, n: usize) -> PathBuf {
    let words = ["the", "cat", "is", "a", "dog", "here", "sat", "on"];
    let mut lines = vec![];
    for i in 0..n {
        let prompt = format!(
            "{} {} {} =",
            words[i % 8],
            words[(i * 3 + 1) % 8],
            words[(i * 5 + 2) % 8]
        );
        lines.push(serde_json::json!({"prompt": prompt, "chosen": " 1", "rejected": " 2"}).to_string());
    }
    let p = dir.join("toy.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn tiny_setup(name: &str) -> (PathBuf, TrainConfig) {
    prefer::testing::set_threads_for_tests();
    let dir = tmp(name);
    let model_dir = dir.join("model");
    write_hf(
        &tiny_model(&TinySpec::default(), candle_core::DType::F32, 11).unwrap(),
        &model_dir,
    )
    .unwrap();
    let data = toy_data(&dir, 24);
    let cfg = TrainConfig {
        model_name_or_path: model_dir.display().to_string(),
        train_file: data.display().to_string(),
        output_dir: dir.join("out").display().to_string(),
        learning_rate: 5e-3,
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 2,
        max_steps: 12,
        logging_steps: 1,
        save_steps: 4,
        warmup_steps: 2,
        params: prefer::objectives::ObjectiveParams {
            beta: 0.5,
            ..Default::default()
        },
        disable_tqdm: true,
        ref_log_probs_cache_dir: dir.join("cache").display().to_string(),
        ..TrainConfig::default()
    };
    (dir, cfg)
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// The metrics of two runs agree step by step to `rel` (relative).
fn assert_same_metrics(a: &[Value], b: &[Value], rel: f64) {
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(b) {
        for k in ["loss", "rewards/margins", "logps/chosen", "grad_norm"] {
            assert!(
                (f(a, k) - f(b, k)).abs() < rel * (1.0 + f(b, k).abs()),
                "{k}: {a} vs {b}"
            );
        }
    }
}

/// The reference of a trainer running an offline preference objective.
fn reference_of(tr: &Trainer) -> &Reference {
    &tr.algorithm::<Preference>().expect("a preference objective").reference
}

/// The live reference model of a trainer.
fn live_reference(tr: &Trainer) -> &prefer::model::Transformer {
    match reference_of(tr) {
        prefer::stats::reference::Reference::Model(r) => r,
        _ => panic!("expected a live reference"),
    }
}

const TRL_KEYS: [&str; 10] = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "learning_rate",
    "tokens_per_second",
];

#[test]
fn dpo_learns_the_toy_preference_and_saves_an_hf_model() {
    let (_dir, cfg) = tiny_setup("learn");
    let out = prefer::train::train(&cfg).unwrap();
    assert_eq!((out.steps_done, out.interrupted), (12, false));
    let m = metrics(&cfg);
    assert_eq!(m.len(), 12);
    for k in TRL_KEYS {
        assert!(m[0].get(k).is_some(), "metric {k} missing");
    }
    // step 1: policy = reference, so rewards are 0 and the loss is log 2
    assert!((f(&m[0], "loss") - std::f64::consts::LN_2).abs() < 1e-5);
    assert_eq!(f(&m[0], "rewards/margins"), 0.0);
    assert_eq!(f(&m[0], "learning_rate"), 0.0, "warm-up starts at 0");
    let last = m.last().unwrap();
    assert!(f(last, "loss") < 0.6, "loss did not fall: {last}");
    assert!(f(last, "rewards/accuracies") > 0.9, "{last}");
    assert!(f(last, "rewards/margins") > 0.2, "{last}");
    // the final model is an HF checkpoint that loads and ranks " 1" above " 2"
    let trained = prefer::model::load(
        Path::new(&cfg.output_dir),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let (pairs, _) = prefer::data::load_tokenized_examples(
        Path::new(&cfg.train_file),
        &trained.tokenizer,
        &cfg.tokenize_options(),
        false,
    )
    .unwrap();
    let scores = prefer::stats::score_examples(&trained.transformer, &pairs, 8, &Default::default(), |_| {}).unwrap();
    assert!(scores.iter().all(|r| r[0] > r[1]));
    for k in [4, 8, 12] {
        assert!(Path::new(&cfg.output_dir)
            .join(format!("checkpoint-{k}/trainer_state.json"))
            .is_file());
    }
}

/// `fused_kernels = false` reaches the trained policy and the live reference (the trainable
/// copy of a model is rebuilt, and must keep its kernels), and both settings train to the same
/// metrics.
#[test]
fn fused_kernels_option_reaches_both_models_and_changes_no_metric() {
    use prefer::model::Kernels;
    let (_dir, cfg) = tiny_setup("kernels");
    let mut logs = Vec::new();
    for (fused, want) in [(true, Kernels::FUSED), (false, Kernels::PRIMITIVE)] {
        let c = TrainConfig {
            fused_kernels: fused,
            max_steps: 3,
            output_dir: format!("{}-{fused}", cfg.output_dir),
            ..cfg.clone()
        };
        let tr = Trainer::new(&c).unwrap();
        assert_eq!(tr.policy.transformer.kernels, want);
        assert_eq!(live_reference(&tr).kernels, want);
        drop(tr); // its hold on the output_dir
        prefer::train::train(&c).unwrap();
        logs.push(metrics(&c));
    }
    assert_same_metrics(&logs[0], &logs[1], 1e-4);
}

/// `bf16 = true` reaches the trained policy and the live reference. At the first step both
/// compute the same bf16 products from the same weights, so the DPO loss is exactly ln 2 as
/// in f32; later steps stay near the f32 run without equalling it. On a CPU without a fast
/// bf16 product (neither AMX nor AVX512-BF16 on AMD) the run is f32, and equals the f32 run.
#[test]
fn bf16_option_reaches_both_models_and_trains_near_f32() {
    use prefer::model::Kernels;
    let fast = prefer::model::kernels::CpuPath::fast_bf16().is_some();
    if !fast {
        eprintln!("no fast bf16 product on this CPU: bf16 = true must train in f32");
    }
    let (_dir, cfg) = tiny_setup("bf16");
    let mut logs = Vec::new();
    for bf16 in [false, true] {
        let c = TrainConfig {
            bf16,
            max_steps: 4,
            logging_steps: 1,
            output_dir: format!("{}-{bf16}", cfg.output_dir),
            ..cfg.clone()
        };
        let tr = Trainer::new(&c).unwrap();
        let want = Kernels {
            fused: true,
            bf16: bf16 && fast,
            bf16_attention: bf16 && fast,
        };
        assert_eq!(tr.policy.transformer.kernels, want);
        assert_eq!(live_reference(&tr).kernels, want);
        drop(tr); // its hold on the output_dir
        prefer::train::train(&c).unwrap();
        logs.push(metrics(&c));
    }
    let (f32_log, bf16_log) = (&logs[0], &logs[1]);
    assert!(
        (f(&bf16_log[0], "loss") - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        bf16_log[0]
    );
    assert!(f(&bf16_log[0], "rewards/margins").abs() < 1e-6);
    let mut differs = false;
    for (a, b) in f32_log.iter().zip(bf16_log) {
        for k in ["loss", "logps/chosen", "grad_norm"] {
            let (x, y) = (f(a, k), f(b, k));
            assert!((x - y).abs() < 0.05 * (1.0 + x.abs()), "{k}: f32 {x} vs bf16 {y}");
            differs |= (x - y).abs() > 1e-6 * (1.0 + x.abs());
        }
    }
    assert_eq!(
        differs, fast,
        "bf16 training differs from f32 exactly where a fast bf16 product exists"
    );
}

/// The metrics of two runs of `cfg`, without and with `sync_ref_model` (its sync far beyond
/// the run, so the reference stays the starting model, but held dense for mixing); `check` sees
/// each trainer before it trains.
fn runs_without_and_with_sync(cfg: &TrainConfig, check: impl Fn(&Trainer, bool)) -> Vec<Vec<Value>> {
    [false, true]
        .into_iter()
        .map(|sync| {
            let c = TrainConfig {
                sync_ref_model: sync,
                ref_model_sync_steps: 1000,
                output_dir: format!("{}-{sync}", cfg.output_dir),
                ..cfg.clone()
            };
            let tr = Trainer::new(&c).unwrap();
            check(&tr, sync);
            drop(tr); // its hold on the output_dir
            prefer::train::train(&c).unwrap();
            metrics(&c)
        })
        .collect()
}

/// Under `bf16 = true` on a CPU with a fast bf16 product, the live reference keeps its layers
/// only packed for the bf16 products, and the run's metrics equal, bit for bit, those of a run
/// whose reference is a dense f32 copy (`sync_ref_model` keeps it dense; its sync is beyond the
/// run). Elsewhere neither run packs and they equal each other too.
#[test]
fn bf16_reference_packed_trains_exactly_as_a_dense_one() {
    use prefer::model::kernels::CpuPath;
    let fast = CpuPath::fast_bf16().is_some() && CpuPath::Avx512Bf16.allows();
    let (_dir, cfg) = tiny_setup("packed-ref");
    let c = TrainConfig {
        bf16: true,
        max_steps: 3,
        logging_steps: 1,
        ..cfg
    };
    let logs = runs_without_and_with_sync(&c, |tr, sync| {
        let packed = live_reference(tr).compact_layers().is_some_and(|l| !l.holds_weights());
        assert_eq!(packed, fast && !sync, "sync_ref_model {sync}");
    });
    assert_eq!(logs[0].len(), 3);
    for (a, b) in logs[0].iter().zip(&logs[1]) {
        for k in ["loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"] {
            assert_eq!(f(a, k), f(b, k), "{k}: {a} vs {b}");
        }
    }
}

/// A quantised GGUF starting model: the live reference keeps its layers quantised (unless
/// `sync_ref_model` must mix weights into them) and still equals the policy at the first step,
/// so the first DPO loss is ln 2 and both runs train to the same metrics.
#[test]
fn quantised_reference_stays_compact_and_exact() {
    let (dir, cfg) = tiny_setup("compact-ref");
    let gguf = dir.join("tiny-q8.gguf");
    let m = tiny_model(&TinySpec::default(), candle_core::DType::F32, 11).unwrap();
    write_gguf(&m, &gguf, candle_core::quantized::GgmlDType::Q8_0).unwrap();
    let c = TrainConfig {
        model_name_or_path: gguf.display().to_string(),
        max_steps: 3,
        ..cfg
    };
    let logs = runs_without_and_with_sync(&c, |tr, sync| {
        assert_eq!(live_reference(tr).compact_layers().is_some(), !sync);
    });
    assert!(
        (f(&logs[0][0], "loss") - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        logs[0][0]
    );
    assert_same_metrics(&logs[0], &logs[1], 1e-5);
}

/// `gradient_checkpointing = true` reaches the trained model (a DPO policy, and a reward model
/// with its CRM peer), and trains to the same metrics as keeping every activation.
#[test]
fn gradient_checkpointing_reaches_the_trained_models_and_changes_no_metric() {
    let (_dir, cfg) = tiny_setup("checkpointing");
    let rm = TrainConfig {
        task: Task::Reward,
        crm: true,
        ..cfg.clone()
    };
    for base in [cfg, rm] {
        let mut logs = Vec::new();
        for on in [false, true] {
            let c = TrainConfig {
                gradient_checkpointing: on,
                max_steps: 3,
                output_dir: format!("{}-{}-{on}", base.output_dir, base.task),
                ..base.clone()
            };
            let tr = Trainer::new(&c).unwrap();
            assert_eq!(tr.policy.transformer.backward_options.gradient_checkpointing, on);
            let crm = tr.algorithm::<RewardModel>().and_then(|a| a.crm.as_ref());
            if let Some(p) = crm {
                assert_eq!(p.peer.transformer.backward_options.gradient_checkpointing, on);
            }
            drop(tr); // its hold on the output_dir
            prefer::train::train(&c).unwrap();
            logs.push(metrics(&c));
        }
        let keys: &[&str] = match base.task {
            Task::Reward => &["loss", "accuracy", "margin", "grad_norm"],
            _ => &["loss", "rewards/margins", "logps/chosen", "grad_norm"],
        };
        for (a, b) in logs[0].iter().zip(&logs[1]) {
            for k in keys {
                assert!(
                    (f(a, k) - f(b, k)).abs() < 1e-5 * (1.0 + f(b, k).abs()),
                    "{k}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn resume_gives_the_same_metrics_as_an_uninterrupted_run() {
    let (_dir, cfg) = tiny_setup("resume");
    prefer::train::train(&cfg).unwrap();
    let full = metrics(&cfg);
    // again in a fresh dir, stopped after step 6 (logging window and checkpoint mid-run), then resumed
    let cfg2 = TrainConfig {
        output_dir: format!("{}-2", cfg.output_dir),
        save_steps: 5,
        logging_steps: 3,
        ..cfg.clone()
    };
    let cfg_full2 = cfg2.clone();
    let mut t = Trainer::new(&cfg2).unwrap();
    t.stop_after_step = Some(7);
    let out = t.run().unwrap();
    assert!(out.interrupted && out.steps_done == 7);
    drop(t); // its hold on the output_dir
    let resumed = TrainConfig {
        resume_from_checkpoint: Some("latest".into()),
        ..cfg2.clone()
    };
    let out = prefer::train::train(&resumed).unwrap();
    assert_eq!(out.steps_done, 12);
    // an uninterrupted run with the same logging
    let straight = TrainConfig {
        output_dir: format!("{}-3", cfg.output_dir),
        ..cfg_full2
    };
    prefer::train::train(&straight).unwrap();
    let (a, b) = (metrics(&resumed), metrics(&straight));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for k in TRL_KEYS.iter().filter(|k| **k != "tokens_per_second") {
            assert_eq!(x[*k], y[*k], "step {}: {k} differs after resume", x["step"]);
        }
    }
    // and logging every step vs every 3 steps agree where they meet (step 12's window = steps 10-12)
    let last3: f64 = full[9..12].iter().map(|v| f(v, "loss")).sum::<f64>() / 3.0;
    assert!((f(a.last().unwrap(), "loss") - last3).abs() < 1e-12);
}

#[test]
fn precomputed_reference_matches_live_and_is_cached() {
    let (_dir, cfg) = tiny_setup("precompute");
    let live = TrainConfig {
        max_steps: 3,
        ..cfg.clone()
    };
    prefer::train::train(&live).unwrap();
    let pre = TrainConfig {
        max_steps: 3,
        precompute_ref_log_probs: true,
        output_dir: format!("{}-pre", cfg.output_dir),
        ..cfg.clone()
    };
    prefer::train::train(&pre).unwrap();
    let cached: Vec<_> = std::fs::read_dir(&cfg.ref_log_probs_cache_dir).unwrap().collect();
    assert_eq!(cached.len(), 1, "one cache file");
    for (x, y) in metrics(&live).iter().zip(metrics(&pre).iter()) {
        for k in ["loss", "rewards/margins", "logps/chosen"] {
            assert!((f(x, k) - f(y, k)).abs() < 1e-5, "{k}: {} vs {}", x[k], y[k]);
        }
    }
    // a second run reuses the cache: make it unreadable as a model to prove the model is not needed
    let t = Trainer::new(&pre).unwrap();
    assert!(matches!(reference_of(&t), Reference::Cached { .. }));
    drop(t); // its hold on the output_dir
    let before = std::fs::metadata(cached[0].as_ref().unwrap().path())
        .unwrap()
        .modified()
        .unwrap();
    prefer::train::train(&pre).unwrap();
    let after = std::fs::metadata(cached[0].as_ref().unwrap().path())
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "cache was rewritten instead of reused");
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_prefer"));
    c.env("RAYON_NUM_THREADS", "1");
    c
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_continues() {
    let (dir, cfg) = tiny_setup("ctrlc");
    let toml_path = dir.join("run.toml");
    let long = TrainConfig {
        max_steps: 100000,
        save_steps: 100000,
        ..cfg.clone()
    };
    std::fs::write(&toml_path, toml::to_string(&long).unwrap()).unwrap();
    let mut child = bin()
        .args(["train", "--config"])
        .arg(&toml_path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics_path = Path::new(&cfg.output_dir).join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics_path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 2
    {
        assert!(t0.elapsed().as_secs() < 120, "training never logged");
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("training exited early ({status}): {err}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted at step"), "{err}");
    let ck = prefer::train::checkpoint::latest(Path::new(&cfg.output_dir)).expect("a checkpoint after Ctrl-C");
    let step: usize = ck
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .trim_start_matches("checkpoint-")
        .parse()
        .unwrap();
    assert!(step >= 2);
    // resume from it with a finite budget
    let out = bin()
        .args(["train", "--config"])
        .arg(&toml_path)
        .args([
            "--set",
            "resume_from_checkpoint=latest",
            "--set",
            &format!("max_steps={}", step + 2),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("resumed from {}", ck.display())));
}

/// Every parameter of the policy, flattened (to compare weights before and after a step).
fn weights(t: &Trainer) -> Vec<f32> {
    t.policy
        .transformer
        .params()
        .iter()
        .flat_map(|(_, w)| w.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// A step's metrics, the weights after it, and the parameters left without a kept gradient.
type StepSeen = (Vec<(String, f64)>, Vec<f32>, usize);

/// Each step of `c` for `steps` steps: its metrics and gradient norm, the policy's weights after
/// it, and how many parameters were left without a kept gradient (the ones
/// `optimizer_in_backward` streamed).
fn steps_of(c: &TrainConfig, steps: usize) -> Vec<StepSeen> {
    let mut t = Trainer::new(c).unwrap();
    (0..steps)
        .map(|_| {
            let r = t.step().unwrap();
            let mut m: Vec<(String, f64)> = r.metrics.into_iter().collect();
            m.push(("grad_norm".into(), r.grad_norm));
            let streamed = t
                .opt
                .params
                .iter()
                .filter(|p| matches!(p.grad, prefer::optim::Grad::None))
                .count();
            (m, weights(&t), streamed)
        })
        .collect()
}

/// `optimizer_in_backward`: a first backward pass keeps only the squared norms of the decoder
/// layers' gradients and of the (tied) embedding's, a second computes them again and updates
/// each layer, and each block of the embedding's rows, as soon as it is done. The run equals one
/// without it, bit for bit (metrics, gradient norm, weights after every step): with per-layer
/// graphs or checkpointing, f32 or bf16 moments, clipping that cuts or not, AdamW or SGD, bf16
/// products, and for a reward model. Those parameters were streamed, the final norm was not.
#[test]
fn optimizer_in_backward_trains_exactly_as_without() {
    let (_dir, cfg) = tiny_setup("opt-in-bwd");
    let base = TrainConfig {
        gradient_accumulation_steps: 1,
        max_steps: 3,
        save_steps: 100,
        ..cfg
    };
    let layer_params = Trainer::new(&TrainConfig {
        output_dir: format!("{}-count", base.output_dir),
        ..base.clone()
    })
    .unwrap()
    .opt
    .params
    .iter()
    .filter(|p| p.name.starts_with("model.layers.") || p.name.contains("embed_tokens"))
    .count();
    assert!(layer_params > 0);
    use prefer::config::{MomentsDtype, Optim};
    let clipped = TrainConfig {
        max_grad_norm: 1e-3,
        weight_decay: 0.01,
        ..base.clone()
    };
    let variants = [
        ("graphs", base.clone()),
        (
            "checkpointing",
            TrainConfig {
                gradient_checkpointing: true,
                ..base.clone()
            },
        ),
        (
            "clipped",
            TrainConfig {
                gradient_checkpointing: true,
                ..clipped.clone()
            },
        ),
        (
            "bf16-moments",
            TrainConfig {
                adam_moments_dtype: MomentsDtype::Bf16,
                ..clipped.clone()
            },
        ),
        (
            "sgd",
            TrainConfig {
                optim: Optim::Sgd,
                ..clipped.clone()
            },
        ),
        (
            "bf16",
            TrainConfig {
                bf16: true,
                gradient_checkpointing: true,
                ..clipped.clone()
            },
        ),
        // a reward model: its score head is updated from a kept gradient, its layers and its
        // embedding (reached by lookups only) streamed
        (
            "reward",
            TrainConfig {
                task: Task::Reward,
                ..base.clone()
            },
        ),
    ];
    for (name, c) in variants {
        let run = |on: bool| {
            steps_of(
                &TrainConfig {
                    optimizer_in_backward: on,
                    output_dir: format!("{}-{name}-{on}", c.output_dir),
                    ..c.clone()
                },
                3,
            )
        };
        let (plain, streamed) = (run(false), run(true));
        for (step, (a, b)) in plain.iter().zip(&streamed).enumerate() {
            assert_eq!(a.0, b.0, "{name}, step {step}: metrics");
            assert!(a.1 == b.1, "{name}, step {step}: weights differ");
            assert_eq!(
                (a.2, b.2),
                (0, layer_params),
                "{name}, step {step}: parameters streamed"
            );
        }
        let norm = plain[0].0.iter().find(|(k, _)| k == "grad_norm").unwrap().1;
        assert!(norm.is_finite() && norm > 0.0);
        if c.max_grad_norm < 1.0 {
            assert!(norm > c.max_grad_norm, "{name}: the test means to clip ({norm})");
        }
        assert_ne!(plain[0].1, plain[2].1, "{name}: the weights train");
    }
}

/// `optimizer_in_backward` with a step whose loss is NaN: the second backward pass is not run,
/// the weights stay, and the next step trains (no pass left over from the skipped step). With
/// two micro-batches per step it is refused by the config check, and by the step itself.
#[test]
fn optimizer_in_backward_skips_a_nonfinite_step_and_needs_one_micro_batch() {
    let (_dir, cfg) = tiny_setup("opt-in-bwd-nan");
    let c = TrainConfig {
        gradient_accumulation_steps: 1,
        optimizer_in_backward: true,
        gradient_checkpointing: true,
        save_steps: 100,
        ..cfg.clone()
    };
    let mut t = Trainer::new(&c).unwrap();
    t.inject_nonfinite = vec![1];
    t.step().unwrap();
    let before = weights(&t);
    assert!(t.step().unwrap().metrics["loss"].is_nan());
    assert_eq!(weights(&t), before, "a NaN step changed the weights");
    t.step().unwrap();
    assert_ne!(weights(&t), before, "the next step trains");
    drop(t);
    let two = TrainConfig {
        gradient_accumulation_steps: 2,
        output_dir: format!("{}-two", c.output_dir),
        ..c
    };
    let e = two.validate().unwrap_err().to_string();
    assert!(
        e.contains("optimizer_in_backward") && e.contains("gradient_accumulation_steps = 2"),
        "{e}"
    );
    let e = Trainer::new(&two).unwrap().step().unwrap_err().to_string();
    assert!(e.contains("optimizer_in_backward"), "{e}");
}

/// `adam_moments_dtype = "bf16"`: the moments are bf16 in the checkpoint, a resumed run equals
/// an uninterrupted one metric for metric, and training stays near the f32-moment run.
#[test]
fn bf16_adam_moments_resume_exactly_and_train_near_f32() {
    let (_dir, cfg) = tiny_setup("bf16-moments");
    let c = TrainConfig {
        adam_moments_dtype: prefer::config::MomentsDtype::Bf16,
        max_steps: 10,
        save_steps: 4,
        ..cfg.clone()
    };
    prefer::train::train(&c).unwrap();
    let straight = metrics(&c);
    let st = candle_core::safetensors::load(
        Path::new(&c.output_dir).join("checkpoint-4/optimizer.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(st.values().all(|t| t.dtype() == candle_core::DType::BF16));
    let c2 = TrainConfig {
        output_dir: format!("{}-2", c.output_dir),
        ..c.clone()
    };
    let resumed = prefer::testing::stop_and_resume(&c2, 6);
    assert_eq!(resumed.len(), straight.len());
    for (x, y) in resumed.iter().zip(&straight) {
        for k in TRL_KEYS.iter().filter(|k| **k != "tokens_per_second") {
            assert_eq!(x[*k], y[*k], "step {}: {k}", x["step"]);
        }
    }
    let f32_run = TrainConfig {
        output_dir: format!("{}-f32", c.output_dir),
        adam_moments_dtype: prefer::config::MomentsDtype::F32,
        ..c.clone()
    };
    prefer::train::train(&f32_run).unwrap();
    for (a, b) in metrics(&f32_run).iter().zip(&straight) {
        let (x, y) = (f(a, "loss"), f(b, "loss"));
        assert!(
            (x - y).abs() < 0.02 * (1.0 + x.abs()),
            "step {}: loss f32 {x} vs bf16 moments {y}",
            a["step"]
        );
    }
}

/// A step whose loss is NaN leaves the weights exactly as they were, is reported in the log
/// (`nonfinite_steps`), and the run goes on; more such steps in a row than
/// `max_nonfinite_steps` stop the run with an error that names the checkpoint kept.
#[test]
fn a_nonfinite_step_leaves_the_weights_and_too_many_stop_the_run() {
    let (_dir, cfg) = tiny_setup("nonfinite");
    let c = TrainConfig {
        max_steps: 6,
        save_steps: 2,
        ..cfg.clone()
    };
    let mut t = Trainer::new(&c).unwrap();
    t.inject_nonfinite = vec![2];
    t.step().unwrap();
    t.step().unwrap();
    let before = weights(&t);
    let r = t.step().unwrap();
    assert!(r.metrics["loss"].is_nan());
    assert_eq!(weights(&t), before, "a NaN step changed the weights");
    t.step().unwrap();
    assert_ne!(weights(&t), before, "the next finite step trains again");
    assert_eq!(t.state.nonfinite_steps, 1);
    drop(t);
    // through run(): the log says how many steps were skipped, the weights stay finite
    let mut t = Trainer::new(&c).unwrap();
    t.inject_nonfinite = vec![3];
    t.run().unwrap();
    let log = metrics(&c);
    assert_eq!(log[3]["nonfinite_steps"], 1, "{}", log[3]);
    assert!(log[2].get("nonfinite_steps").is_none());
    assert!(weights(&t).iter().all(|w| w.is_finite()));
    drop(t);
    // three in a row with max_nonfinite_steps = 2: the run stops at the third, and the
    // checkpoint of step 2 is there to resume from
    let c3 = TrainConfig {
        output_dir: format!("{}-3", c.output_dir),
        max_nonfinite_steps: 2,
        ..c.clone()
    };
    let mut t = Trainer::new(&c3).unwrap();
    t.inject_nonfinite = vec![2, 3, 4];
    let e = t.run().unwrap_err().to_string();
    assert!(
        e.contains("step 5") && e.contains("3 steps in a row") && e.contains("max_nonfinite_steps = 2"),
        "{e}"
    );
    let ck = prefer::train::checkpoint::latest(Path::new(&c3.output_dir)).unwrap();
    assert!(ck.ends_with("checkpoint-4"), "{}", ck.display());
}

/// Two runs pointed at one output_dir: the second is refused while the first holds it, with a
/// message that says so; once the first is gone the directory is free again. An output_dir
/// that cannot be created fails before any work, naming it.
#[test]
fn one_output_dir_takes_one_run_and_an_unwritable_one_fails_first() {
    let (dir, cfg) = tiny_setup("lock");
    let first = Trainer::new(&cfg).unwrap();
    let e = Trainer::new(&cfg).err().unwrap().to_string();
    assert!(
        e.contains("another run is writing to it") && e.contains(&cfg.output_dir),
        "{e}"
    );
    assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
    drop(first);
    Trainer::new(&cfg).unwrap();
    // a file where the directory should be
    let blocked = dir.join("blocked");
    std::fs::write(&blocked, "a file").unwrap();
    let c = TrainConfig {
        output_dir: blocked.join("out").display().to_string(),
        ..cfg.clone()
    };
    let e = Trainer::new(&c).err().unwrap().to_string();
    assert!(e.contains("cannot create it") && e.contains("blocked"), "{e}");
}

/// A save that cannot be written (here a file-size limit, as a full disk would fail it) stops
/// the run with an error naming the file; the checkpoint saved before is whole, is still what
/// `latest` picks, and the run resumes from it to the same end as an uninterrupted one.
#[cfg(unix)]
#[test]
fn a_save_that_cannot_be_written_fails_clearly_and_loses_nothing() {
    let (dir, cfg) = tiny_setup("fsize");
    let c = TrainConfig {
        max_steps: 8,
        save_steps: 4,
        ..cfg.clone()
    };
    let toml_path = dir.join("fsize.toml");
    std::fs::write(&toml_path, toml::to_string(&c).unwrap()).unwrap();
    let run = |limit_kib: Option<u64>, resume: bool| {
        // SIGXFSZ ignored, so that writing past the limit is an error (EFBIG), not a kill
        let limit = limit_kib.map(|k| format!("ulimit -f {k}; ")).unwrap_or_default();
        let resume = if resume {
            "--set resume_from_checkpoint=latest"
        } else {
            ""
        };
        let script = format!("trap '' XFSZ; {limit}exec \"$0\" train --config \"$1\" --set max_steps=$2 {resume}");
        Command::new("bash")
            .env("RAYON_NUM_THREADS", "1")
            .args(["-c", &script, env!("CARGO_BIN_EXE_prefer")])
            .arg(&toml_path)
            .arg(if limit_kib.is_some() { "8" } else { "4" })
            .output()
            .unwrap()
    };
    // four steps and a checkpoint, then a run limited to files of 16 KiB: its first save fails
    let out = run(None, false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(Some(16), true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the limited run succeeded: {err}");
    assert!(err.contains("File too large") && err.contains("checkpoint-8"), "{err}");
    let out_dir = Path::new(&c.output_dir);
    let latest = prefer::train::checkpoint::latest(out_dir).unwrap();
    assert!(latest.ends_with("checkpoint-4"), "{}", latest.display());
    assert!(!out_dir.join("checkpoint-8").exists());
    // resumed without the limit, it ends where an uninterrupted run ends
    let done = Command::new(env!("CARGO_BIN_EXE_prefer"))
        .env("RAYON_NUM_THREADS", "1")
        .args(["train", "--config"])
        .arg(&toml_path)
        .args(["--set", "resume_from_checkpoint=latest"])
        .output()
        .unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let straight = TrainConfig {
        output_dir: format!("{}-straight", c.output_dir),
        ..c.clone()
    };
    prefer::train::train(&straight).unwrap();
    let (a, b) = (metrics(&c), metrics(&straight));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["loss"], y["loss"], "step {}", x["step"]);
    }
}

/// SIGKILL at seeded random moments of a run (steps, logging, checkpoint writes), each time
/// resumed from `latest`: the finished run's metrics equal an uninterrupted run's, step for
/// step, and no half-written checkpoint is ever taken for a whole one.
#[test]
fn sigkill_at_random_moments_then_resume_gives_the_uninterrupted_metrics() {
    let (dir, cfg) = tiny_setup("sigkill");
    let c = TrainConfig {
        max_steps: 20,
        save_steps: 1,
        logging_steps: 1,
        ..cfg.clone()
    };
    prefer::train::train(&c).unwrap();
    let want = metrics(&c);
    let killed = TrainConfig {
        output_dir: format!("{}-killed", c.output_dir),
        ..c.clone()
    };
    let toml_path = dir.join("killed.toml");
    std::fs::write(&toml_path, toml::to_string(&killed).unwrap()).unwrap();
    let out_dir = PathBuf::from(&killed.output_dir);
    let mut rng = prefer::util::Rng::new(7);
    let (mut kills, mut rounds) = (0, 0);
    loop {
        rounds += 1;
        assert!(rounds < 40, "the run never finished");
        let mut cmd = bin();
        cmd.args(["train", "--config"]).arg(&toml_path);
        if prefer::train::checkpoint::latest(&out_dir).is_some() {
            cmd.args(["--set", "resume_from_checkpoint=latest"]);
        }
        let done_before = prefer::train::checkpoint::latest(&out_dir)
            .map(|c| c.display().to_string())
            .unwrap_or_default();
        let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
        // let it make one to three steps of progress past where it resumed, then kill it
        // without warning a random few milliseconds later (checkpoints are saved every step,
        // so some kills land in the middle of one)
        let steps_on = 1 + (rng.uniform() * 3.0) as usize;
        let progressed = |dir: &Path| {
            let now = prefer::train::checkpoint::latest(dir)
                .map(|c| c.display().to_string())
                .unwrap_or_default();
            let step = |s: &str| s.rsplit('-').next().and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
            step(&now) >= step(&done_before) + steps_on
        };
        let t0 = std::time::Instant::now();
        while !progressed(&out_dir) && child.try_wait().unwrap().is_none() {
            assert!(t0.elapsed().as_secs() < 120, "no progress");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(std::time::Duration::from_micros((rng.uniform() * 20_000.0) as u64));
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            break;
        }
        Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status()
            .unwrap();
        let _ = child.wait();
        kills += 1;
        // whatever the moment, `latest` is a whole checkpoint (its state file is there, and
        // it loads)
        if let Some(ck) = prefer::train::checkpoint::latest(&out_dir) {
            assert!(ck.join("model.safetensors").is_file() && ck.join("optimizer.safetensors").is_file());
        }
    }
    assert!(
        kills >= 2,
        "the run was killed only {kills} times: the test did not test"
    );
    eprintln!("killed {kills} times in {rounds} rounds");
    let got = metrics(&killed);
    assert_eq!(got.len(), want.len(), "one record per step");
    for (x, y) in got.iter().zip(&want) {
        for k in TRL_KEYS.iter().filter(|k| **k != "tokens_per_second") {
            assert_eq!(x[*k], y[*k], "step {}: {k} differs after {kills} kills", x["step"]);
        }
    }
}

#[test]
fn cli_tools_work_on_a_gguf_model() {
    let (dir, cfg) = tiny_setup("cli");
    let gguf = dir.join("tiny.gguf");
    write_gguf(
        &tiny_model(&TinySpec::default(), candle_core::DType::F32, 11).unwrap(),
        &gguf,
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    // convert
    let hf = dir.join("converted");
    let o = bin()
        .args(["convert", "--model"])
        .arg(&gguf)
        .arg("--out")
        .arg(&hf)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(hf.join("model.safetensors").is_file() && hf.join("tokenizer_config.json").is_file());
    // tokenize
    let texts = dir.join("texts.jsonl");
    std::fs::write(&texts, "{\"text\": \"the cat\", \"p\": \"the\", \"c\": \" cat\"}\n").unwrap();
    let o = bin()
        .args(["tokenize", "--model"])
        .arg(&gguf)
        .arg("--data")
        .arg(&texts)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["pieces"], serde_json::json!(["t", "he", "Ġ", "c", "a", "t"]));
    // logprobs: whole text, and completion only; both agree on the completion tokens
    let o = bin()
        .args(["logprobs", "--model"])
        .arg(&gguf)
        .arg("--data")
        .arg(&texts)
        .output()
        .unwrap();
    let whole: Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = bin()
        .args(["logprobs", "--model"])
        .arg(&gguf)
        .arg("--data")
        .arg(&texts)
        .args(["--prompt-field", "p", "--completion-field", "c"])
        .output()
        .unwrap();
    let comp: Value = serde_json::from_slice(&o.stdout).unwrap();
    let whole_lp = whole["logprobs"].as_array().unwrap();
    assert_eq!(whole_lp.len(), 5, "every token but the first is scored");
    assert_eq!(comp["tokens"], serde_json::json!(["Ġ", "c", "a", "t"]));
    assert_eq!(whole_lp[1..].to_vec(), comp["logprobs"].as_array().unwrap().clone());
    // eval: a model against itself has zero margins and 0% strict reward accuracy
    let o = bin()
        .args(["eval", "--json", "--model"])
        .arg(&gguf)
        .arg("--ref")
        .arg(&hf)
        .arg("--data")
        .arg(&cfg.train_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["pairs"], 24);
    assert!(v["reward_margin"].as_f64().unwrap().abs() < 1e-4);
    assert_eq!(v["ranking_accuracy"], v["ref_ranking_accuracy"]);
    // data validate: exit 1 and file:line on a bad row
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\"}\n",
    )
    .unwrap();
    let o = bin().args(["data", "validate"]).arg(&bad).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("bad.jsonl:2: field `chosen`"));
    let o = bin()
        .args(["data", "inspect"])
        .arg(&cfg.train_file)
        .arg("--model")
        .arg(&gguf)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && s.contains("24 usable") && s.contains("prompt tokens"),
        "{s}"
    );
    // --json on the commands that print tables: validate, inspect, objectives list
    let o = bin()
        .args(["data", "validate", "--json", "--data"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["rows"].as_u64(), v["invalid"].as_u64()), (Some(2), Some(1)));
    assert!(
        v["errors"][0].as_str().unwrap().contains("bad.jsonl:2: field `chosen`"),
        "{v}"
    );
    let o = bin()
        .args(["data", "inspect", "--json", "--model"])
        .arg(&gguf)
        .arg("--data")
        .arg(&cfg.train_file)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["usable"], 24);
    let p = &v["prompt_tokens"];
    assert!(
        p["min"].as_u64() <= p["median"].as_u64() && p["median"].as_u64() <= p["max"].as_u64(),
        "{v}"
    );
    assert!(v["prompt_share"].as_f64().unwrap() > 0.0 && v["prompt_share"].as_f64().unwrap() < 1.0);
    let o = bin().args(["objectives", "list", "--json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let sigmoid = v.as_array().unwrap().iter().find(|r| r["name"] == "sigmoid").unwrap();
    assert_eq!(
        (&sigmoid["shape"], &sigmoid["needs_reference"]),
        (&Value::from("pairwise"), &Value::from(true))
    );
    // objectives eval: losses from a statistics file, no model
    let st = dir.join("stats.jsonl");
    std::fs::write(&st, "{\"policy_chosen_logps\": -1, \"policy_rejected_logps\": -2, \"ref_chosen_logps\": -1.5, \"ref_rejected_logps\": -1.5}\n").unwrap();
    let o = bin()
        .args([
            "objectives",
            "eval",
            "--loss-type",
            "sigmoid",
            "--set",
            "beta=1",
            "--stats",
        ])
        .arg(&st)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        (v["loss"].as_f64().unwrap() - (1.0f64 + (-1.0f64).exp()).ln()).abs() < 1e-12,
        "{v}"
    );
    let o = bin().args(["objectives", "list"]).output().unwrap();
    let listing = String::from_utf8_lossy(&o.stdout);
    for e in prefer::objectives::REGISTRY {
        assert!(listing.contains(e.name), "{} missing from objectives list", e.name);
    }
    // train: an unknown key is an error with a suggestion
    let o = bin()
        .args([
            "train",
            "--set",
            "model_name_or_path=x",
            "--set",
            "train_file=y",
            "--set",
            "bta=1",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("did you mean `beta`"));
}

/// One short run per family on the toy preference: the chosen completion ends up preferred.
#[test]
fn each_objective_family_learns_the_toy_preference() {
    let (_dir, cfg) = tiny_setup("families");
    for (loss, extra) in [
        ("ipo", vec![]),
        ("robust", vec!["label_smoothing=0.1"]),
        ("sigmoid,sft", vec!["loss_weights=[1.0, 0.05]"]),
        ("simpo", vec!["beta=2.0"]),
        ("orpo", vec![]),
        ("cpo", vec![]),
        ("lcpo", vec!["lcpo_noise_rate=0.2"]),
        ("osp", vec![]),
        ("slic", vec!["slic_delta=2.0"]),
        ("mapo", vec!["mapo_t=10.0"]),
    ] {
        let mut sets = vec![
            format!("loss_type={loss}"),
            format!("output_dir={}-{}", cfg.output_dir, loss.replace(',', "+")),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        let mut table = toml::Table::try_from(&cfg).unwrap();
        table.remove("loss_type");
        table.remove("output_dir");
        let base = prefer::testing::scratch_dir(&format!("fam-{}", loss.replace(',', "+"))).join("base.toml");
        std::fs::write(&base, toml::to_string(&table).unwrap()).unwrap();
        let c = TrainConfig::load(Some(&base), &sets).unwrap();
        let t = Trainer::new(&c).unwrap();
        assert_eq!(
            matches!(reference_of(&t), Reference::None),
            !c.objective().unwrap().needs_reference(),
            "{loss}: a reference-free objective must not load a reference"
        );
        drop(t); // its hold on the output_dir
        let out = prefer::train::train(&c).unwrap();
        let last = out.last_log.unwrap();
        assert!(
            f(&last, "rewards/accuracies") >= 0.75 && f(&last, "rewards/margins") > 0.0,
            "{loss}: {last}"
        );
        let m = metrics(&c);
        assert!(
            f(m.last().unwrap(), "loss") < f(&m[0], "loss"),
            "{loss}: loss did not fall"
        );
    }
}

#[test]
fn tr_dpo_sync_resumes_exactly_and_alpha_one_resets_the_reference() {
    let (_dir, cfg) = tiny_setup("sync");
    let c = TrainConfig {
        sync_ref_model: true,
        ref_model_sync_steps: 3,
        ref_model_mixup_alpha: 0.5,
        save_steps: 5,
        ..cfg.clone()
    };
    prefer::train::train(&c).unwrap();
    let straight = metrics(&c);
    let c2 = TrainConfig {
        output_dir: format!("{}-2", c.output_dir),
        ..c.clone()
    };
    let mut t = Trainer::new(&c2).unwrap();
    t.stop_after_step = Some(7);
    t.run().unwrap();
    drop(t); // its hold on the output_dir
    assert!(Path::new(&c2.output_dir)
        .join("checkpoint-7/ref_model/model.safetensors")
        .is_file());
    prefer::train::train(&TrainConfig {
        resume_from_checkpoint: Some("latest".into()),
        ..c2.clone()
    })
    .unwrap();
    let resumed = metrics(&c2);
    for (x, y) in straight.iter().zip(&resumed) {
        for k in ["loss", "rewards/margins", "grad_norm"] {
            assert_eq!(x[k], y[k], "step {}: {k}", x["step"]);
        }
    }
    // α = 1: after the sync at step 3 the reference is the policy, so step 4 starts at zero reward
    let c3 = TrainConfig {
        ref_model_mixup_alpha: 1.0,
        output_dir: format!("{}-3", c.output_dir),
        max_steps: 4,
        ..c
    };
    prefer::train::train(&c3).unwrap();
    let m = metrics(&c3);
    assert!(f(&m[2], "rewards/margins").abs() > 1e-4);
    assert_eq!(f(&m[3], "rewards/margins"), 0.0);
    assert!((f(&m[3], "loss") - std::f64::consts::LN_2).abs() < 1e-6);
}

#[test]
fn ld_alpha_and_wpo_weighting_train() {
    let (dir, cfg) = tiny_setup("ldwpo");
    // WPO weighs a pair by the policy's own probability of its tokens relative to Σ_v p(v)²;
    // the default tiny model (unit-scale tied embeddings) is so peaked that the weights are
    // ~1e-17 and nothing would learn, so WPO trains the same model with its embeddings scaled
    // down, whose outputs are flat (weights near 1)
    let flat_model = dir.join("flat-model");
    let mut m = tiny_model(&TinySpec::default(), candle_core::DType::F32, 11).unwrap();
    m.transformer = m
        .transformer
        .map(|name, t| Ok(if name.contains("embed") { (t * 0.05)? } else { t.clone() }))
        .unwrap();
    write_hf(&m, &flat_model).unwrap();
    for (name, c) in [
        (
            "ld",
            TrainConfig {
                ld_alpha: Some(0.5),
                ..cfg.clone()
            },
        ),
        (
            "wpo",
            TrainConfig {
                use_weighting: true,
                model_name_or_path: flat_model.display().to_string(),
                ..cfg.clone()
            },
        ),
    ] {
        let c = TrainConfig {
            output_dir: format!("{}-{name}", cfg.output_dir),
            ..c
        };
        let out = prefer::train::train(&c).unwrap();
        let last = out.last_log.unwrap();
        eprintln!("{name}: {last}");
        assert!(f(&last, "rewards/margins") > 0.05, "{name}: {last}");
    }
    // WPO weights are below 1, so the first-step loss is below log 2 (but not vanishing)
    let m = metrics(&TrainConfig {
        output_dir: format!("{}-wpo", cfg.output_dir),
        ..cfg.clone()
    });
    let first = f(&m[0], "loss");
    assert!(first < std::f64::consts::LN_2 - 1e-3 && first > 0.05, "{}", m[0]);
    // precompute and sync cannot be combined
    let e = TrainConfig {
        sync_ref_model: true,
        precompute_ref_log_probs: true,
        ..cfg
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("sync_ref_model"), "{e}");
}

fn write_lines(dir: &Path, name: &str, lines: Vec<String>) -> String {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n")).unwrap();
    p.display().to_string()
}

/// Unpaired (KTO) and ranked (LiPO, PRO) data train end to end; a shape mismatch is one error
/// at start-up.
#[test]
fn unpaired_and_ranked_objectives_train() {
    let (dir, cfg) = tiny_setup("shapes");
    let words = ["the", "cat", "is", "a", "dog", "here", "sat", "on"];
    let unpaired: Vec<String> = (0..24)
        .map(|i| {
            let good = i % 2 == 0;
            serde_json::json!({"prompt": format!("{} {} =", words[i % 8], words[(i * 3 + 1) % 8]),
                "completion": if good { " 1" } else { " 2" }, "label": good})
            .to_string()
        })
        .collect();
    let ranked: Vec<String> = (0..24)
        .map(|i| {
            serde_json::json!({"prompt": format!("{} {} =", words[i % 8], words[(i * 3 + 1) % 8]),
                "responses": [" 2", " 1", " 3"], "ranks": [1, 0, 2]})
            .to_string()
        })
        .collect();
    let unpaired_file = write_lines(&dir, "unpaired.jsonl", unpaired);
    let ranked_file = write_lines(&dir, "ranked.jsonl", ranked);
    for (loss, file) in [
        ("kto", &unpaired_file),
        ("apo_zero_unpaired", &unpaired_file),
        ("lipo", &ranked_file),
        ("pro", &ranked_file),
    ] {
        let c = TrainConfig {
            loss_type: prefer::config::LossType::One(loss.into()),
            train_file: file.clone(),
            output_dir: format!("{}-{loss}", cfg.output_dir),
            ..cfg.clone()
        };
        let out = prefer::train::train(&c).unwrap();
        let last = out.last_log.unwrap();
        assert!(f(&last, "rewards/margins") > 0.0, "{loss}: {last}");
        let m = metrics(&c);
        assert!(
            f(m.last().unwrap(), "loss") < f(&m[0], "loss"),
            "{loss}: loss did not fall"
        );
        if loss == "kto" {
            assert!(last.get("kl").is_some(), "kto logs its reference point: {last}");
        }
    }
    // pairwise objective on unpaired data: one clear error before any model work
    let c = TrainConfig {
        train_file: unpaired_file,
        ..cfg
    };
    let e = Trainer::new(&c).err().unwrap().to_string();
    assert!(e.contains("reads pairwise data") && e.contains("unpaired rows"), "{e}");
}

#[test]
fn reward_augmented_option_relabels_then_trains() {
    let (dir, cfg) = tiny_setup("augment");
    let lines: Vec<String> = (0..12)
        .map(|i| serde_json::json!({"prompt": format!("the {i} =" ), "chosen": " 1", "rejected": " 2", "chosen_score": 9, "rejected_score": 2}).to_string())
        .collect();
    let file = write_lines(&dir, "scored.jsonl", lines);
    let c = TrainConfig {
        train_file: file,
        reward_augmented: true,
        max_steps: 2,
        ..cfg
    };
    let out = prefer::train::train(&c).unwrap();
    assert_eq!(out.steps_done, 2);
    let relabeled = std::fs::read_to_string(Path::new(&c.output_dir).join("reward_augmented_train.jsonl")).unwrap();
    assert_eq!(relabeled.lines().count(), 24);
}

#[test]
fn sweep_writes_a_table_and_plots() {
    let (dir, cfg) = tiny_setup("sweep");
    let toml_path = dir.join("base.toml");
    std::fs::write(
        &toml_path,
        toml::to_string(&TrainConfig {
            max_steps: 4,
            ..cfg.clone()
        })
        .unwrap(),
    )
    .unwrap();
    let o = bin()
        .args(["sweep", "--config"])
        .arg(&toml_path)
        .args(["--loss-type", "sigmoid,ipo,simpo"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    for name in ["| sigmoid |", "| ipo |", "| simpo |"] {
        assert!(table.contains(name), "{table}");
    }
    let rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&cfg.output_dir).join("sweep.json")).unwrap()).unwrap();
    assert_eq!(rows.len(), 3);
    for r in &rows {
        assert_eq!(r["steps"], 4);
        let rank = r["ranking_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&rank));
        assert!(r["kl_to_reference"].as_f64().unwrap().is_finite());
    }
    for plot in [
        "plot-loss.png",
        "plot-rewards_accuracies.png",
        "plot-rewards_margins.png",
    ] {
        let bytes = std::fs::read(Path::new(&cfg.output_dir).join(plot)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{plot} is not a PNG");
        assert!(bytes.len() > 5000, "{plot} looks empty");
    }
    // an objective that reads another data shape is refused before any training
    let o = bin()
        .args(["sweep", "--config"])
        .arg(&toml_path)
        .args(["--loss-type", "sigmoid,kto"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("kto reads unpaired data"));
}

#[test]
fn eval_over_checkpoints_with_diagnostics_and_plots() {
    let (dir, cfg) = tiny_setup("evalckpt");
    prefer::train::train(&cfg).unwrap(); // checkpoints 4, 8, 12
    let plots = dir.join("plots");
    let o = bin()
        .args(["eval", "--checkpoints", "--json", "--alpha", "0.8", "--model"])
        .arg(&cfg.output_dir)
        .arg("--ref")
        .arg(&cfg.model_name_or_path)
        .arg("--data")
        .arg(&cfg.train_file)
        .arg("--plots")
        .arg(&plots)
        .args(["--beta", "0.5"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let steps: Vec<u64> = rows.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![4, 8, 12]);
    for r in &rows {
        let gap = r["alignment_gap"].as_f64().unwrap();
        let want = r["idealized_ranking_accuracy"].as_f64().unwrap() - r["ranking_accuracy"].as_f64().unwrap();
        assert!((gap - want).abs() < 1e-12);
        assert!(r["difficulty"]["reference_misranked"].as_f64().is_some());
    }
    // training moves the ranking towards the chosen completion
    assert!(rows[2]["ranking_accuracy"].as_f64() >= rows[0]["ranking_accuracy"].as_f64());
    assert!(Path::new(&cfg.output_dir).join("eval_trajectory.json").is_file());
    for p in ["eval-ranking_accuracy.png", "eval-reward_accuracy.png"] {
        let bytes = std::fs::read(plots.join(p)).unwrap();
        assert_eq!(&bytes[..4], b"\x89PNG");
    }
    // a single model: the histogram of implicit rewards
    let o = bin()
        .args(["eval", "--model"])
        .arg(Path::new(&cfg.output_dir).join("checkpoint-12"))
        .arg("--ref")
        .arg(&cfg.model_name_or_path)
        .arg("--data")
        .arg(&cfg.train_file)
        .arg("--plots")
        .arg(&plots)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("reference misranks") && text.contains("reward accuracy") && text.contains("calibration error"),
        "{text}"
    );
    for p in ["reward_histogram.png", "calibration.png"] {
        assert_eq!(&std::fs::read(plots.join(p)).unwrap()[..4], b"\x89PNG", "{p}");
    }
    // the ECE in the trajectory is the one of the implicit rewards' reliability diagram
    for r in &rows {
        let e = r["calibration_ece"].as_f64().unwrap();
        assert!((0.0..=0.5).contains(&e), "{e}");
    }
}

/// `prefer eval` reports the evaluated run's objective: its `beta` and `loss_type` come from the
/// run's `run_config.json` (or a checkpoint's `trainer_state.json`) unless flags override them,
/// and the loss is computed through the objective registry.
#[test]
fn eval_reads_beta_and_loss_type_from_the_run() {
    let (dir, mut cfg) = tiny_setup("evalcfg");
    cfg.max_steps = 4;
    cfg.loss_type = prefer::config::LossType::One("ipo".into());
    prefer::train::train(&cfg).unwrap();
    let saved = Path::new(&cfg.output_dir).join("run_config.json");
    let (back, _) = TrainConfig::of_trained_model(Path::new(&cfg.output_dir)).unwrap();
    assert_eq!(
        (back.params.beta, back.loss_type.names()),
        (0.5, vec!["ipo".to_string()]),
        "{saved:?}"
    );
    let eval = |model: &Path, extra: &[&str]| -> Value {
        let o = bin()
            .args(["eval", "--json", "--model"])
            .arg(model)
            .arg("--ref")
            .arg(&cfg.model_name_or_path)
            .arg("--data")
            .arg(&cfg.train_file)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let out = Path::new(&cfg.output_dir);
    let run = eval(out, &[]);
    assert_eq!(run["loss_type"], "ipo");
    let explicit = eval(out, &["--beta", "0.5", "--loss-type", "ipo"]);
    assert_eq!(run["reward_margin"], explicit["reward_margin"]);
    assert_eq!(run["loss"], explicit["loss"]);
    // β scales the implicit reward; the loss is the named objective's
    let small = eval(out, &["--beta", "0.1"]);
    let (m5, m1) = (f(&run, "reward_margin"), f(&small, "reward_margin"));
    assert!(m5 != 0.0 && (m1 - m5 / 5.0).abs() < 1e-9 * m5.abs(), "{m1} vs {m5}");
    let dpo = eval(out, &["--loss-type", "sigmoid"]);
    assert_eq!(dpo["loss_type"], "sigmoid");
    assert_ne!(dpo["loss"], run["loss"]);
    // a checkpoint records the run's config too
    let ck = eval(&out.join("checkpoint-4"), &[]);
    assert_eq!(
        (ck["loss_type"].as_str(), ck["loss"].as_f64()),
        (Some("ipo"), run["loss"].as_f64())
    );
    // a model prefer did not train: TRL's defaults
    let plain = eval(Path::new(&cfg.model_name_or_path), &[]);
    assert_eq!(plain["loss_type"], "sigmoid");
    assert!(dir.is_dir());
}

/// Where the eval set comes from: a dataset's test split (a saved DatasetDict or a hub
/// download's shards, narrowed by dataset_train_split / dataset_test_split), or eval_fraction
/// of train_file held out by a seeded choice; TRL's dataset_name reads a local path.
#[test]
fn dataset_splits_and_eval_fraction_make_the_eval_set() {
    let (dir, base) = tiny_setup("splits");
    let data = prefer::testing::fixture("datasets");
    let at = |name: &str, sets: &[(&str, &str)]| -> prefer::Result<Trainer> {
        let mut cfg = TrainConfig {
            output_dir: dir.join(name).display().to_string(),
            max_length: 256,
            max_prompt_length: 128,
            ..base.clone()
        };
        let mut table = toml::Table::try_from(&cfg).unwrap();
        table.remove("train_file");
        for (k, v) in sets {
            table.insert(k.to_string(), toml::Value::String(v.to_string()));
        }
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, toml::to_string(&table).unwrap()).unwrap();
        cfg = TrainConfig::load(Some(&file), &[])?;
        Trainer::new(&cfg)
    };
    let prompts = |t: &Trainer, eval: bool| -> Vec<Vec<u32>> {
        let v = if eval { &t.data.eval } else { &t.data.train };
        v.iter().map(|e| e.prompt_ids.clone()).collect()
    };
    let dict = data.join("pairs-dict").display().to_string();
    let hub = data.join("pairs-hub").display().to_string();
    // a DatasetDict: train split trained, test split evaluated
    let t = at("dict", &[("train_file", &dict)]).unwrap();
    assert!(t.cfg.train_file.ends_with("pairs-dict/train"), "{}", t.cfg.train_file);
    assert!(t.cfg.eval_file.as_deref().unwrap().ends_with("pairs-dict/test"));
    assert_eq!((t.data.train.len(), t.data.eval.len()), (6, 2));
    let (dict_train, dict_eval) = (prompts(&t, false), prompts(&t, true));
    drop(t);
    // the same splits as a hub download's Parquet shards, named by TRL's dataset_name
    let t = at("hub", &[("dataset_name", &hub)]).unwrap();
    assert_eq!(
        (prompts(&t, false), prompts(&t, true)),
        (dict_train.clone(), dict_eval.clone())
    );
    drop(t);
    // the splits swapped; no evaluation at all with eval_strategy = "no"
    let t = at(
        "swapped",
        &[
            ("train_file", &hub),
            ("dataset_train_split", "test"),
            ("dataset_test_split", "train"),
        ],
    )
    .unwrap();
    assert_eq!(
        (prompts(&t, false), prompts(&t, true)),
        (dict_eval.clone(), dict_train.clone())
    );
    drop(t);
    let t = at("no-eval", &[("train_file", &dict), ("eval_strategy", "no")]).unwrap();
    assert_eq!((t.data.train.len(), t.data.eval.len()), (6, 0));
    drop(t);
    let e = at(
        "bad-split",
        &[("train_file", &dict), ("dataset_train_split", "validation")],
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("[\"train\", \"test\"]"), "{e}");
    let e = at("hub-id", &[("dataset_name", "trl-lib/ultrafeedback_binarized")])
        .err()
        .unwrap();
    assert!(e.to_string().contains("huggingface-cli download"), "{e}");
    // eval_fraction: a seeded quarter of the 8 pairs held out, the rest trained, none lost
    let jsonl = data.join("pairs.jsonl").display().to_string();
    let at_frac = |name: &str, seed: u64| {
        let cfg = TrainConfig {
            output_dir: dir.join(name).display().to_string(),
            train_file: jsonl.clone(),
            max_length: 256,
            max_prompt_length: 128,
            eval_fraction: 0.25,
            data_seed: Some(seed),
            ..base.clone()
        };
        let t = Trainer::new(&cfg).unwrap();
        (prompts(&t, false), prompts(&t, true))
    };
    let (train1, eval1) = at_frac("frac-1", 1);
    assert_eq!((train1.len(), eval1.len()), (6, 2));
    let mut all = [train1.clone(), eval1.clone()].concat();
    all.sort();
    let mut want = [dict_train.clone(), dict_eval.clone()].concat();
    want.sort();
    assert_eq!(all, want, "every pair is trained or held out, once");
    assert_eq!(at_frac("frac-1-again", 1), (train1.clone(), eval1.clone()), "seeded");
    let other = (2..20)
        .map(|s| at_frac(&format!("frac-{s}"), s).1)
        .find(|e| *e != eval1);
    assert!(other.is_some(), "data_seed chooses the held-out rows");
}

/// load_best_model_at_end: output_dir gets the checkpoint whose evaluation was best (here the
/// *highest* eval loss, so not the last), and save_total_limit never removes it.
#[test]
fn load_best_model_at_end_keeps_and_writes_the_best_checkpoint() {
    let (_dir, base) = tiny_setup("best");
    let cfg = TrainConfig {
        learning_rate: 1e-3,
        eval_fraction: 0.25,
        eval_steps: 4,
        save_steps: 4,
        save_total_limit: Some(1),
        load_best_model_at_end: true,
        metric_for_best_model: Some("loss".into()),
        greater_is_better: Some(true),
        ..base.clone()
    };
    cfg.validate().unwrap();
    prefer::train::train(&cfg).unwrap();
    let evals: Vec<(u64, f64)> = metrics(&cfg)
        .iter()
        .filter(|m| m["eval_loss"].is_number())
        .map(|m| (m["step"].as_u64().unwrap(), f(m, "eval_loss")))
        .collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [4, 8, 12]);
    let best = evals.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
    assert_ne!(
        best, 12,
        "the test needs a best checkpoint that is not the last: {evals:?}"
    );
    let out = Path::new(&cfg.output_dir);
    let kept: Vec<usize> = prefer::train::checkpoint::list(out).into_iter().map(|c| c.0).collect();
    assert_eq!(kept, [best as usize, 12], "the best and the newest are kept");
    let tensors =
        |p: &Path| candle_core::safetensors::load(p.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let (final_model, best_model) = (tensors(out), tensors(&out.join(format!("checkpoint-{best}"))));
    let last_model = tensors(&out.join("checkpoint-12"));
    for (name, t) in &best_model {
        let d = prefer::testing::max_abs_diff(t, &final_model[name]).unwrap();
        assert_eq!(d, 0.0, "{name}: output_dir is the best checkpoint");
    }
    let moved = best_model
        .iter()
        .map(|(n, t)| prefer::testing::max_abs_diff(t, &last_model[n]).unwrap())
        .fold(0f32, f32::max);
    assert!(moved > 0.0, "training moved the weights after the best checkpoint");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint-12/trainer_state.json")).unwrap()).unwrap();
    assert!(state["best_model_checkpoint"]
        .as_str()
        .unwrap()
        .ends_with(&format!("checkpoint-{best}")));
    // refused when checkpoints would have no evaluation of their own
    let e = TrainConfig {
        eval_steps: 3,
        ..cfg.clone()
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("multiple of eval_steps"), "{e}");
    let e = TrainConfig {
        eval_strategy: prefer::config::Strategy::Epoch,
        ..cfg.clone()
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("eval_strategy = save_strategy"), "{e}");
    let no_eval = TrainConfig {
        eval_fraction: 0.0,
        output_dir: format!("{}-no-eval", cfg.output_dir),
        ..cfg.clone()
    };
    let e = Trainer::new(&no_eval).err().unwrap();
    assert!(e.to_string().contains("needs an eval set"), "{e}");
}
