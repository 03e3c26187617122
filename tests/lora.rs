//! LoRA adapters on generated tiny models: the start equals the base bit for bit, adapter
//! gradients against finite differences and across every backward path (frozen base held or
//! stored quantised, checkpointing, dropout), merging, PEFT's file format, and training end to
//! end (the base as the reference, adapter-only checkpoints, exact resume).

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use prefer::batch::{Layout, PaddingSide, ScoredGroup, ScoredSeq};
use prefer::config::TrainConfig;
use prefer::model::lora::{self, Adapters, LoraSpec, Module};
use prefer::model::{self, LoadedModel, Transformer};
use prefer::testing::metrics;
use prefer::testing::{max_abs_diff, tiny_model, write_gguf, write_hf, TinySpec};
use prefer::train::Trainer;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn spec(targets: &[Module], dropout: f64) -> LoraSpec {
    LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout,
        targets: targets.to_vec(),
        use_rslora: false,
        modules_to_save: vec![],
        base: String::new(),
        task_type: "CAUSAL_LM".into(),
    }
}

fn seqs() -> Vec<ScoredSeq> {
    vec![
        ScoredSeq {
            ids: vec![5, 9, 17, 200, 33, 2],
            completion_start: 3,
        },
        ScoredSeq {
            ids: vec![11, 12, 13, 14, 15, 16, 17, 18, 19, 2],
            completion_start: 6,
        },
    ]
}

fn token_logps(m: &Transformer) -> Vec<f64> {
    let lp = model::sequence_logps(m, &seqs(), PaddingSide::Right).unwrap();
    lp.token_logps.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

/// `m` with adapters whose `B` is random too (PEFT starts it at zero, which would hide every
/// path through `A`).
fn with_random_adapters(m: &LoadedModel, s: LoraSpec, seed: u64) -> LoadedModel {
    let t = &m.transformer;
    let a = Adapters::init(&t.cfg, s, seed, t.dtype(), t.device()).unwrap();
    let mut rng = prefer::util::Rng::new(seed + 1);
    let a = a
        .map(|name, x| {
            if !name.contains("lora_B") {
                return Ok(x.clone());
            }
            let v: Vec<f64> = (0..x.elem_count()).map(|_| 0.3 * rng.normal()).collect();
            Ok(Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?)
        })
        .unwrap();
    LoadedModel {
        transformer: t.with_adapters(a).unwrap(),
        ..m.clone()
    }
}

fn tmp(name: &str) -> PathBuf {
    prefer::testing::scratch_dir(&format!("lora-{name}"))
}

#[test]
fn fresh_adapters_leave_the_model_exactly_at_its_base() {
    prefer::testing::set_threads_for_tests();
    let dir = tmp("start");
    let m = tiny_model(&TinySpec::default(), DType::F32, 3).unwrap();
    let gguf = dir.join("q8.gguf");
    write_gguf(&m, &gguf, GgmlDType::Q8_0).unwrap();
    let frozen = model::load_frozen(&gguf, DType::F32, &Device::Cpu).unwrap().unwrap();
    for base in [m, frozen] {
        let t = &base.transformer;
        let a = Adapters::init(&t.cfg, spec(&Module::ALL, 0.0), 7, DType::F32, &Device::Cpu).unwrap();
        // PEFT's initialisation: A uniform in ±1/√in, B zero
        for (name, x) in a.named() {
            let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            if name.contains("lora_B") {
                assert!(v.iter().all(|&x| x == 0.0), "{name}");
            } else {
                let bound = 1.0 / (x.dim(1).unwrap() as f32).sqrt();
                assert!(v.iter().all(|x| x.abs() <= bound), "{name}");
                assert!(
                    v.iter().any(|x| x.abs() > bound / 2.0),
                    "{name}: not spread over the range"
                );
            }
        }
        let adapted = t.with_adapters(a).unwrap();
        assert_eq!(token_logps(t), token_logps(&adapted), "bit-exact at initialisation");
        // and as the trainer runs it: trainable, with layer ops
        let lm = LoadedModel {
            transformer: adapted,
            ..base.clone()
        };
        let (mut tm, vars) = lm.into_trainable().unwrap();
        tm.transformer.set_layer_graphs(true);
        assert_eq!(vars.len(), 2 * 7 * t.cfg.num_hidden_layers, "only the adapters train");
        assert_eq!(token_logps(t), token_logps(&tm.transformer));
    }
}

/// f64, primitive ops: every adapter tensor's gradient against central differences, with a
/// dropout mask held fixed (the clock is reset before each forward pass).
#[test]
fn adapter_gradients_match_finite_differences() {
    prefer::testing::set_threads_for_tests();
    let base = tiny_model(
        &TinySpec {
            layers: 1,
            ..TinySpec::default()
        },
        DType::F64,
        4,
    )
    .unwrap();
    for dropout in [0.0, 0.3] {
        let m = with_random_adapters(&base, spec(&Module::ALL, dropout), 5);
        let weights = [0.7, -1.3];
        let (tm, vars) = m.clone().into_trainable().unwrap();
        let objective = |t: &Transformer| -> Tensor {
            t.set_dropout_step(Some(3));
            let lp = model::sequence_logps(t, &seqs(), PaddingSide::Left).unwrap();
            let w = Tensor::new(&weights, &Device::Cpu).unwrap();
            (lp.sums * w).unwrap().sum_all().unwrap()
        };
        let grads = tm.transformer.backward(&objective(&tm.transformer)).unwrap();
        let mut checked = 0;
        for (name, v) in &vars {
            let g: Vec<f64> = grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let n = g.len();
            for &idx in &[0, n / 3, n - 1] {
                let eps = 1e-5;
                let f = |delta: f64| -> f64 {
                    let moved = tm
                        .transformer
                        .adapters()
                        .unwrap()
                        .map(|nm, t| {
                            let mut x: Vec<f64> = t.flatten_all()?.to_vec1()?;
                            if nm == name {
                                x[idx] += delta;
                            }
                            Ok(Tensor::from_vec(x, t.shape(), t.device())?)
                        })
                        .unwrap();
                    // trainable (variables) so that dropout is on, as in training
                    let lm = LoadedModel {
                        transformer: m.transformer.without_adapters().unwrap().with_adapters(moved).unwrap(),
                        ..m.clone()
                    };
                    let (t2, _) = lm.into_trainable().unwrap();
                    objective(&t2.transformer).to_scalar::<f64>().unwrap()
                };
                let fd = (f(eps) - f(-eps)) / (2.0 * eps);
                let tol = 1e-6 + 1e-5 * fd.abs().max(g[idx].abs());
                assert!(
                    (fd - g[idx]).abs() < tol,
                    "dropout {dropout} {name}[{idx}]: fd {fd} vs backprop {}",
                    g[idx]
                );
                checked += 1;
            }
        }
        assert_eq!(checked, vars.len() * 3);
    }
}

/// The gradients of the adapters, flattened, for a weighted sum of sequence log-probs.
fn adapter_grads(m: &LoadedModel, layer_graphs: bool, checkpointing: bool, fused: bool) -> (Vec<f64>, Vec<f64>) {
    let (mut tm, vars) = m.clone().into_trainable().unwrap();
    tm.transformer.set_layer_graphs(layer_graphs);
    tm.transformer.set_gradient_checkpointing(checkpointing);
    tm.transformer.kernels.fused = fused;
    let groups = [
        (vec![5u32, 9, 17], vec![vec![200u32, 33, 2], vec![41, 2]]),
        (vec![7], vec![vec![8, 100, 2]]),
    ];
    let groups: Vec<ScoredGroup> = groups
        .iter()
        .map(|(p, r)| ScoredGroup {
            prompt: p,
            responses: r,
        })
        .collect();
    tm.transformer.set_dropout_step(Some(1));
    let lp = model::group_sequence_logps(&tm.transformer, &groups, Layout::default(), false).unwrap();
    let w = Tensor::new(&[0.3f32, -0.8, 1.1], &Device::Cpu).unwrap();
    let loss = (lp.sums.to_dtype(DType::F32).unwrap() * w).unwrap().sum_all().unwrap();
    let grads = tm.transformer.backward(&loss).unwrap();
    let mut flat = Vec::new();
    for (_, v) in &vars {
        let g = grads.get(v.as_tensor()).expect("every adapter tensor gets a gradient");
        // a gradient recorded in a graph would keep that graph's activations alive
        assert!(!g.track_op(), "an adapter's gradient is outside any graph");
        flat.extend(
            g.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
        );
    }
    let tok = lp.token_logps.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    (tok, flat)
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

/// The hand-written backward (fused kernels, f32) with per-layer graphs or checkpointing, on a
/// base held in f32 or stored as Q8 blocks, gives the adapters the gradients candle's own
/// backward computes through primitive ops, dropout included.
#[test]
fn every_backward_path_gives_the_adapters_the_same_gradients() {
    prefer::testing::set_threads_for_tests();
    let dir = tmp("paths");
    let m = tiny_model(&TinySpec::default(), DType::F32, 8).unwrap();
    let gguf = dir.join("q8.gguf");
    write_gguf(&m, &gguf, GgmlDType::Q8_0).unwrap();
    let stored = model::load_frozen(&gguf, DType::F32, &Device::Cpu).unwrap().unwrap();
    // the same base widened once: what the stored layers widen to
    let held = LoadedModel {
        transformer: stored.transformer.merged().unwrap(),
        ..stored.clone()
    };
    for dropout in [0.0, 0.25] {
        let s = spec(
            &[Module::QProj, Module::VProj, Module::OProj, Module::DownProj],
            dropout,
        );
        let reference = adapter_grads(&with_random_adapters(&held, s.clone(), 9), false, false, false);
        for base in [&held, &stored] {
            let m = with_random_adapters(base, s.clone(), 9);
            for (graphs, ckpt) in [(false, false), (true, false), (false, true)] {
                let (tok, g) = adapter_grads(&m, graphs, ckpt, true);
                let what = format!(
                    "dropout {dropout}, {}, layer graphs {graphs}, checkpointing {ckpt}",
                    if base.transformer.compact_layers().is_some() {
                        "stored base"
                    } else {
                        "held base"
                    }
                );
                assert!(max_rel(&tok, &reference.0) < 1e-5, "{what}: log-probs");
                assert!(
                    max_rel(&g, &reference.1) < 1e-4,
                    "{what}: gradients {}",
                    max_rel(&g, &reference.1)
                );
            }
        }
    }
}

#[test]
fn dropout_masks_are_seeded_and_scaled_like_torch() {
    let d = lora::Dropout { p: 0.25, key: 42 };
    let m: Vec<f32> = d
        .mask(50, 80, DType::F32, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let kept = m.iter().filter(|&&x| x != 0.0).count() as f64 / m.len() as f64;
    assert!((kept - 0.75).abs() < 0.03, "kept {kept}");
    assert!(m.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
    let again: Vec<f32> = d
        .mask(50, 80, DType::F32, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(m, again);
    let other = lora::Dropout { p: 0.25, key: 43 };
    let o: Vec<f32> = other
        .mask(50, 80, DType::F32, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(m, o);
}

#[test]
fn merged_weights_compute_what_base_plus_adapter_computes() {
    prefer::testing::set_threads_for_tests();
    let dir = tmp("merge");
    let m = tiny_model(&TinySpec::default(), DType::F32, 12).unwrap();
    let gguf = dir.join("q4.gguf");
    write_gguf(&m, &gguf, GgmlDType::Q4_1).unwrap();
    let stored = model::load_frozen(&gguf, DType::F32, &Device::Cpu).unwrap().unwrap();
    for base in [&m, &stored] {
        let mut s = spec(&Module::ALL, 0.0);
        s.use_rslora = true;
        let a = with_random_adapters(base, s, 13);
        let merged = a.transformer.merged().unwrap();
        assert!(merged.adapters().is_none() && merged.compact_layers().is_none());
        let (x, y) = (token_logps(&a.transformer), token_logps(&merged));
        // f32 log-probs near −5: relative 1e-5
        let d = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p - q).abs() / p.abs().max(1.0))
            .fold(0.0, f64::max);
        assert!(d < 1e-5, "merged vs adapted: {d}");
        // the adapters do change the model
        let b = token_logps(&base.transformer);
        assert!(x.iter().zip(&b).any(|(p, q)| (p - q).abs() > 1e-3));
    }
}

#[test]
fn peft_directory_round_trips_and_loads_onto_its_base() {
    prefer::testing::set_threads_for_tests();
    let dir = tmp("roundtrip");
    let m = tiny_model(&TinySpec::default(), DType::F32, 21).unwrap();
    let base_dir = dir.join("base");
    write_hf(&m, &base_dir).unwrap();
    let mut s = spec(&[Module::KProj, Module::GateProj], 0.1);
    s.base = base_dir.display().to_string();
    let a = with_random_adapters(&m, s.clone(), 22);
    let out = dir.join("adapter");
    model::hf::save_dir(&a, &out).unwrap();
    // PEFT's files, and nothing of the base's weights
    assert!(out.join("adapter_config.json").is_file() && out.join("adapter_model.safetensors").is_file());
    assert!(!out.join("model.safetensors").exists());
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["target_modules"], serde_json::json!(["k_proj", "gate_proj"]));
    let st = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(st.contains_key("base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"));
    assert_eq!(st.len(), 2 * 2 * 2);
    // back: the directory alone (its config names the base), or base + --adapter
    for loaded in [
        model::load(&out, DType::F32, &Device::Cpu).unwrap(),
        model::load::load_with_adapter(&base_dir, Some(&out), DType::F32, &Device::Cpu).unwrap(),
    ] {
        let la = loaded.transformer.adapters().unwrap();
        assert_eq!(la.spec, s);
        for ((n1, t1), (n2, t2)) in la.named().iter().zip(a.transformer.adapters().unwrap().named()) {
            assert_eq!(*n1, n2);
            assert_eq!(max_abs_diff(t1, t2).unwrap(), 0.0, "{n1}");
        }
        assert_eq!(token_logps(&loaded.transformer), token_logps(&a.transformer));
    }
    // errors name the file and what to do
    let mut bad = cfg.clone();
    bad["use_dora"] = Value::Bool(true);
    std::fs::write(out.join("adapter_config.json"), bad.to_string()).unwrap();
    let e = model::load(&out, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json") && e.contains("DoRA"), "{e}");
    let mut gone = cfg.clone();
    gone["base_model_name_or_path"] = Value::String("HuggingFaceTB/not-here".into());
    std::fs::write(out.join("adapter_config.json"), gone.to_string()).unwrap();
    let e = model::load(&out, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("--adapter") && e.contains("not-here"), "{e}");
}

fn toy_data(dir: &Path, n: usize) -> PathBuf {
    let words = ["the", "cat", "is", "a", "dog", "here", "sat", "on"];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let prompt = format!(
                "{} {} {} =",
                words[i % 8],
                words[(i * 3 + 1) % 8],
                words[(i * 5 + 2) % 8]
            );
            serde_json::json!({"prompt": prompt, "chosen": " 1", "rejected": " 2"}).to_string()
        })
        .collect();
    let p = dir.join("toy.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn lora_setup(name: &str) -> (PathBuf, TrainConfig) {
    prefer::testing::set_threads_for_tests();
    let dir = tmp(name);
    let gguf = dir.join("tiny-q8.gguf");
    write_gguf(
        &tiny_model(&TinySpec::default(), DType::F32, 11).unwrap(),
        &gguf,
        GgmlDType::Q8_0,
    )
    .unwrap();
    let data = toy_data(&dir, 24);
    let mut cfg = TrainConfig {
        model_name_or_path: gguf.display().to_string(),
        train_file: data.display().to_string(),
        output_dir: dir.join("out").display().to_string(),
        learning_rate: 2e-2,
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 2,
        max_steps: 12,
        logging_steps: 1,
        save_steps: 5,
        warmup_steps: 2,
        disable_tqdm: true,
        ref_log_probs_cache_dir: dir.join("cache").display().to_string(),
        ..TrainConfig::default()
    };
    cfg.params.beta = 0.5;
    cfg.peft.use_peft = true;
    cfg.peft.lora_r = 4;
    cfg.peft.lora_alpha = 8.0;
    cfg.peft.lora_dropout = 0.1;
    // TRL's DPO turns dropout off (LoRA's included) unless told otherwise: keep it on here
    cfg.disable_dropout = Some(false);
    cfg.peft.lora_target_modules = Some(vec!["all-linear".into()]);
    (dir, cfg)
}

/// LoRA DPO on a Q8 GGUF: the base stays stored, the reference is the base with the adapters
/// off (loss ln 2 at the first step), only the adapters move, checkpoints hold the adapter
/// alone, and resuming gives the same numbers as not stopping (dropout masks included).
#[test]
fn lora_dpo_learns_saves_peft_checkpoints_and_resumes_exactly() {
    let (dir, cfg) = lora_setup("dpo");
    let t = Trainer::new(&cfg).unwrap();
    assert!(
        t.policy.transformer.compact_layers().is_some(),
        "the base stays quantised"
    );
    let reference = match &t
        .algorithm::<prefer::algorithms::preference::Preference>()
        .unwrap()
        .reference
    {
        prefer::stats::reference::Reference::Model(r) => r.clone(),
        _ => panic!("expected a live reference"),
    };
    assert!(reference.adapters().is_none());
    // the same stored layers: no second copy
    let (p, r) = (
        t.policy.transformer.compact_layers().unwrap(),
        reference.compact_layers().unwrap(),
    );
    assert!(std::ptr::eq(p as *const _ as *const u8, r as *const _ as *const u8));
    drop(t);
    prefer::train::train(&cfg).unwrap();
    let full = metrics(&cfg);
    let loss = |v: &Value| v["loss"].as_f64().unwrap();
    assert!((loss(&full[0]) - std::f64::consts::LN_2).abs() < 1e-6, "{}", full[0]);
    let late: f64 = full[9..].iter().map(loss).sum::<f64>() / 3.0;
    assert!(late < 0.5, "LoRA DPO learns the toy preference: late loss {late}");
    let out = Path::new(&cfg.output_dir);
    for d in [out.to_path_buf(), out.join("checkpoint-10")] {
        assert!(d.join("adapter_model.safetensors").is_file(), "{}", d.display());
        assert!(!d.join("model.safetensors").exists(), "{}: no full model", d.display());
    }
    // optimizer state of the adapters only
    let opt = candle_core::safetensors::load(out.join("checkpoint-10/optimizer.safetensors"), &Device::Cpu).unwrap();
    assert!(
        opt.keys().all(|k| k.contains("lora_")),
        "{:?}",
        opt.keys().collect::<Vec<_>>()
    );
    // the saved adapter scores what the trained policy scored
    let trained = model::load(out, DType::F32, &Device::Cpu).unwrap();
    assert!(trained.transformer.adapters().is_some());
    // stop after step 7, resume
    let cfg2 = TrainConfig {
        output_dir: dir.join("out2").display().to_string(),
        ..cfg.clone()
    };
    let again = prefer::testing::stop_and_resume(&cfg2, 7);
    assert_eq!(again.len(), full.len());
    for (x, y) in again.iter().zip(&full) {
        for k in ["loss", "grad_norm", "rewards/margins", "logps/chosen"] {
            assert_eq!(x[k], y[k], "step {}: {k} differs after resume", x["step"]);
        }
    }
}

/// A reward model with LoRA trains its head fully (`score` is a module to save), saves it in
/// the adapter, and loads back to the same rewards.
#[test]
fn lora_reward_model_trains_its_head_and_saves_it_with_the_adapter() {
    let (_dir, mut cfg) = lora_setup("reward");
    cfg.task = prefer::config::Task::Reward;
    cfg.max_steps = 6;
    cfg.learning_rate = 1e-2;
    let t = Trainer::new(&cfg).unwrap();
    let names: Vec<&str> = t.opt.params.iter().map(|p| p.name.as_str()).collect();
    assert!(names.contains(&"score.weight"), "{names:?}");
    assert!(names.iter().all(|n| *n == "score.weight" || n.contains("lora_")));
    drop(t);
    prefer::train::train(&cfg).unwrap();
    let out = Path::new(&cfg.output_dir);
    let ac: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(ac["task_type"], "SEQ_CLS");
    assert_eq!(ac["modules_to_save"], serde_json::json!(["score"]));
    let st = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(st.contains_key("base_model.model.score.weight"));
    let m = model::load(out, DType::F32, &Device::Cpu).unwrap();
    let r = m.transformer.rewards(&[vec![5, 9, 17, 2], vec![7, 8, 2]], 0).unwrap();
    let r: Vec<f32> = r.to_vec1().unwrap();
    assert!(r.iter().all(|x| x.is_finite()) && r[0] != r[1]);
}

#[test]
fn lora_keys_are_checked() {
    let (_dir, mut cfg) = lora_setup("keys");
    cfg.peft.lora_target_modules = Some(vec!["qkv_proj".into()]);
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("qkv_proj") && e.contains("all-linear"), "{e}");
    cfg.peft.lora_target_modules = None;
    cfg.peft.lora_dropout = 1.0;
    assert!(cfg.validate().unwrap_err().to_string().contains("lora_dropout"));
    cfg.peft.lora_dropout = 0.0;
    cfg.sync_ref_model = true;
    assert!(cfg.validate().unwrap_err().to_string().contains("sync_ref_model"));
}

/// Sampling from an adapted model on a stored quantised base (widened once per generation)
/// draws exactly what the same base held widened with the same adapters draws, and the
/// adapters count: the base alone draws otherwise.
#[test]
fn sampling_from_an_adapted_stored_base_equals_the_held_one() {
    use prefer::sample::{sample, SamplingParams};
    prefer::testing::set_threads_for_tests();
    let dir = tmp("sample");
    let spec_m = TinySpec {
        tie_embeddings: false,
        init_scale: 0.5,
        ..TinySpec::default()
    };
    let gguf = dir.join("q8.gguf");
    write_gguf(&tiny_model(&spec_m, DType::F32, 31).unwrap(), &gguf, GgmlDType::Q8_0).unwrap();
    let stored = model::load_frozen(&gguf, DType::F32, &Device::Cpu).unwrap().unwrap();
    let held = LoadedModel {
        transformer: stored.transformer.merged().unwrap(),
        ..stored.clone()
    };
    let params = SamplingParams {
        max_completion_length: 8,
        ..Default::default()
    };
    let prompts = vec![vec![5u32, 9, 17], vec![7, 8]];
    let draw = |t: &Transformer| {
        sample(t, &prompts, 3, &params, 4, &|_: &[u32]| false, &mut |_| {})
            .unwrap()
            .into_iter()
            .map(|c| (c.ids, c.logprobs))
            .collect::<Vec<_>>()
    };
    let s = spec(&Module::ALL, 0.0);
    let a = draw(&with_random_adapters(&stored, s.clone(), 32).transformer);
    let b = draw(&with_random_adapters(&held, s, 32).transformer);
    assert_eq!(a, b);
    assert_ne!(a, draw(&held.transformer), "the adapters change what is drawn");
}

/// LoRA with precomputed reference log-probs (the base's, cached) trains as with the live base.
#[test]
fn lora_with_precomputed_reference_matches_the_live_base() {
    let (_dir, cfg) = lora_setup("precompute");
    let cfg = TrainConfig { max_steps: 4, ..cfg };
    prefer::train::train(&cfg).unwrap();
    let pre = TrainConfig {
        output_dir: format!("{}-pre", cfg.output_dir),
        precompute_ref_log_probs: true,
        ..cfg.clone()
    };
    prefer::train::train(&pre).unwrap();
    let (a, b) = (metrics(&cfg), metrics(&pre));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for k in ["loss", "rewards/margins", "logps/chosen"] {
            let (p, q) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!((p - q).abs() < 1e-5 * (1.0 + q.abs()), "{k}: {p} vs {q}");
        }
    }
}

/// A PEFT directory as `model_name_or_path` continues training its adapter on its base (the
/// reference stays the base), and as `ref_model` it is the base with that adapter on.
#[test]
fn a_peft_directory_is_a_starting_model_and_a_reference() {
    let (dir, cfg) = lora_setup("continue");
    let cfg = TrainConfig { max_steps: 3, ..cfg };
    prefer::train::train(&cfg).unwrap();
    let saved = model::load(Path::new(&cfg.output_dir), DType::F32, &Device::Cpu).unwrap();
    let next = TrainConfig {
        model_name_or_path: cfg.output_dir.clone(),
        output_dir: dir.join("next").display().to_string(),
        ..cfg.clone()
    };
    let t = Trainer::new(&next).unwrap();
    assert!(t.policy.transformer.compact_layers().is_some(), "the base stays stored");
    let (a, b) = (
        t.policy.transformer.adapters().unwrap(),
        saved.transformer.adapters().unwrap(),
    );
    for ((n, x), (_, y)) in a.named().iter().zip(b.named()) {
        assert_eq!(max_abs_diff(x, y).unwrap(), 0.0, "{n}");
    }
    match &t
        .algorithm::<prefer::algorithms::preference::Preference>()
        .unwrap()
        .reference
    {
        prefer::stats::reference::Reference::Model(r) => assert!(r.adapters().is_none()),
        _ => panic!("expected a live reference"),
    }
    drop(t);
    let with_ref = TrainConfig {
        ref_model: Some(prefer::config::RefModel::One(cfg.output_dir.clone())),
        output_dir: dir.join("ref").display().to_string(),
        ..cfg.clone()
    };
    let t = Trainer::new(&with_ref).unwrap();
    match &t
        .algorithm::<prefer::algorithms::preference::Preference>()
        .unwrap()
        .reference
    {
        prefer::stats::reference::Reference::Model(r) => {
            assert_eq!(
                token_logps(r),
                token_logps(&saved.transformer),
                "the reference is base + adapter"
            )
        }
        _ => panic!("expected a live reference"),
    }
}
