//! Porting TRL recipes: YAML and TOML configs, TRL's keys (mapped, accepted or refused with a
//! reason, never ignored silently), `--key value` flags, errors that name the key, file and
//! line, and the TrainingArguments strategies and checkpoint limit at work.

use prefer::config::{Strategy, TrainConfig};
use prefer::testing::{fixture, tiny_model, write_hf, TinySpec};
use std::path::{Path, PathBuf};
use std::process::Command;

fn local() -> Vec<String> {
    vec!["model_name_or_path=\"m\"".into(), "train_file=\"t.jsonl\"".into()]
}

#[test]
fn alignment_handbook_and_trl_recipes_load_unchanged() {
    let dpo = TrainConfig::load(Some(&fixture("trl-recipes/zephyr-dpo.yaml")), &local()).unwrap();
    assert_eq!(dpo.params.beta, 0.01);
    assert_eq!(dpo.learning_rate, 5e-7);
    assert_eq!(dpo.eval_strategy, Strategy::Steps);
    assert_eq!(dpo.save_total_limit, Some(1));
    assert!(dpo.bf16 && dpo.gradient_checkpointing);
    assert_eq!(dpo.max_prompt_length, 512);
    assert_eq!(dpo.report_to.names(), vec!["none".to_string()]);
    let mut set = local();
    set.push("task=\"sft\"".into());
    let sft = TrainConfig::load(Some(&fixture("trl-recipes/trl-sft-cli.yaml")), &set).unwrap();
    assert!(sft.sft.packing);
    assert_eq!(sft.sft.completion_only_loss, None, "YAML null = unset");
    assert_eq!(sft.eval_strategy, Strategy::No);
    assert_eq!(sft.run_name.as_deref(), Some("qwen-sft"));
    assert_eq!(sft.max_length, 512);
}

#[test]
fn trl_keys_are_mapped_or_refused_with_the_reason() {
    // rpo_alpha: the DPO loss plus α·NLL, as TRL's RPO
    let mut set = local();
    set.push("rpo_alpha=0.5".into());
    let c = TrainConfig::load(None, &set).unwrap();
    assert_eq!(c.loss_type.names(), vec!["sigmoid".to_string(), "sft".into()]);
    assert_eq!(c.loss_weights, Some(vec![1.0, 0.5]));
    // each refusal says why and what to do
    for (key, value, words) in [
        ("fp16", "true", "bf16"),
        ("push_to_hub", "true", "upload"),
        ("report_to", "\"wandb\"", "metrics.jsonl"),
        ("load_best_model_at_end", "true", "eval_steps"),
        ("use_vllm", "true", "sampler"),
        ("reference_free", "true", "simpo"),
        ("generate_during_eval", "true", "prefer eval"),
    ] {
        let mut set = local();
        set.push(format!("{key}={value}"));
        let e = TrainConfig::load(None, &set).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(words), "{key}: {e}");
        // TRL's default value is accepted
        if value == "true" {
            let mut set = local();
            set.push(format!("{key}=false"));
            TrainConfig::load(None, &set).unwrap_or_else(|e| panic!("{key}=false: {e}"));
        }
    }
    // the file form names the file
    let e = TrainConfig::load(Some(&fixture("trl-recipes/refused.yaml")), &local())
        .unwrap_err()
        .to_string();
    assert!(e.contains("refused.yaml"), "{e}");
    // a TRL option prefer lacks is named as such, not "did you mean" another key
    let mut set = local();
    set.push("entropy_coef=0.1".into());
    let e = TrainConfig::load(None, &set).unwrap_err().to_string();
    assert!(e.contains("TRL option") && !e.contains("did you mean"), "{e}");
    // suggestions only for near misses
    let mut set = local();
    set.push("learnig_rate=1e-5".into());
    assert!(TrainConfig::load(None, &set)
        .unwrap_err()
        .to_string()
        .contains("did you mean `learning_rate`"));
    let mut set = local();
    set.push("max_completion_tokens=5".into());
    let e = TrainConfig::load(None, &set).unwrap_err().to_string();
    assert!(!e.contains("did you mean `max_prompt_length`"), "{e}");
    // disable_dropout: TRL's per-task default, LoRA's dropout included
    let c = TrainConfig::load(
        None,
        &[
            "model_name_or_path=\"m\"".into(),
            "train_file=\"t\"".into(),
            "use_peft=true".into(),
        ],
    )
    .unwrap();
    assert!(c.dropout_disabled());
    assert_eq!(c.lora_spec().unwrap().dropout, 0.0);
    let c = TrainConfig::load(
        None,
        &[
            "model_name_or_path=\"m\"".into(),
            "train_file=\"t\"".into(),
            "use_peft=true".into(),
            "task=\"grpo\"".into(),
            "reward_funcs=[\"length\"]".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.lora_spec().unwrap().dropout, 0.05);
}

#[test]
fn a_wrong_value_names_the_key_the_file_and_the_line() {
    let dir = prefer::testing::scratch_dir("config-lines");
    let toml = dir.join("run.toml");
    std::fs::write(
        &toml,
        "model_name_or_path = \"m\"\ntrain_file = \"t\"\n\nlearning_rate = \"abc\"\n",
    )
    .unwrap();
    let e = TrainConfig::load(Some(&toml), &[]).unwrap_err().to_string();
    assert!(e.contains("run.toml:4: learning_rate") && e.contains("abc"), "{e}");
    let yaml = dir.join("run.yaml");
    std::fs::write(
        &yaml,
        "model_name_or_path: m\ntrain_file: t\nper_device_train_batch_size: many\n",
    )
    .unwrap();
    let e = TrainConfig::load(Some(&yaml), &[]).unwrap_err().to_string();
    assert!(
        e.contains("run.yaml:3: per_device_train_batch_size") && e.contains("many"),
        "{e}"
    );
    let e = TrainConfig::load(
        None,
        &[
            "model_name_or_path=\"m\"".into(),
            "train_file=\"t\"".into(),
            "beta=\"x\"".into(),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--set beta"), "{e}");
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_prefer"))
}

/// `prefer train --beta 0.2 ...`: TRL's command-line flags, as `--set`.
#[test]
fn trl_command_line_flags_are_config_keys() {
    let flags: Vec<String> = std::fs::read_to_string(fixture("trl-recipes/trl-dpo-flags.txt"))
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect();
    // run in a scratch directory: the recipe's output_dir is relative
    let dir = prefer::testing::scratch_dir("config-flags");
    // a wrong value among them is reported through --set, which proves the flags were read
    let out = bin()
        .current_dir(&dir)
        .arg("train")
        .args(&flags)
        .args([
            "--model_name_or_path",
            "m",
            "--train-file",
            "t.jsonl",
            "--max_steps",
            "abc",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--set max_steps"), "{err}");
    // and without it they load: the run then fails only on the missing model
    let out = bin()
        .current_dir(&dir)
        .arg("train")
        .args(&flags)
        .args(["--model_name_or_path", "no-such-model", "--train-file", "t.jsonl"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-model"), "{err}");
    assert!(err.contains("rpo_alpha = 0.5"), "the mapping is reported: {err}");
    assert!(!Path::new(env!("CARGO_MANIFEST_DIR")).join("Qwen2-0.5B-DPO").exists());
}

fn toy(dir: &Path) -> PathBuf {
    let lines: Vec<String> = (0..16)
        .map(|i| serde_json::json!({"prompt": format!("q{i} ="), "chosen": " 1", "rejected": " 2"}).to_string())
        .collect();
    let p = dir.join("toy.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

/// save_total_limit keeps the newest checkpoints (resume still finds `latest`); the epoch and
/// "no" strategies save and log when TrainingArguments would.
#[test]
fn checkpoint_limit_and_strategies() {
    prefer::testing::set_threads_for_tests();
    let dir = prefer::testing::scratch_dir("config-strategies");
    write_hf(
        &tiny_model(&TinySpec::default(), candle_core::DType::F32, 3).unwrap(),
        &dir.join("model"),
    )
    .unwrap();
    let data = toy(&dir);
    let base = TrainConfig {
        model_name_or_path: dir.join("model").display().to_string(),
        train_file: data.display().to_string(),
        per_device_train_batch_size: 4,
        max_steps: 8,
        logging_steps: 1,
        save_steps: 2,
        disable_tqdm: true,
        ..TrainConfig::default()
    };
    let ckpts = |out: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("checkpoint-") || n.starts_with(".checkpoint"))
            .collect();
        v.sort();
        v
    };
    let limited = TrainConfig {
        output_dir: dir.join("limited").display().to_string(),
        save_total_limit: Some(2),
        ..base.clone()
    };
    prefer::train::train(&limited).unwrap();
    assert_eq!(ckpts(&limited.output_dir), vec!["checkpoint-6", "checkpoint-8"]);
    // 16 examples / 4 = 4 steps an epoch
    let epoch = TrainConfig {
        output_dir: dir.join("epoch").display().to_string(),
        save_strategy: Strategy::Epoch,
        logging_strategy: Strategy::Epoch,
        ..base.clone()
    };
    prefer::train::train(&epoch).unwrap();
    assert_eq!(ckpts(&epoch.output_dir), vec!["checkpoint-4", "checkpoint-8"]);
    let logged = std::fs::read_to_string(Path::new(&epoch.output_dir).join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = logged
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![4, 8]);
    // report_to = tensorboard: one event per logged record, with TRL's tags, framed and
    // checksummed (tensorboard's own reader: scripts/check-tensorboard.sh)
    let tb = TrainConfig {
        output_dir: dir.join("tb").display().to_string(),
        report_to: prefer::config::LossType::One("tensorboard".into()),
        eval_file: Some(data.display().to_string()),
        eval_steps: 4,
        ..base.clone()
    };
    prefer::train::train(&tb).unwrap();
    let runs = Path::new(&tb.output_dir).join("runs");
    let files: Vec<PathBuf> = std::fs::read_dir(&runs).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(files.len(), 1);
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    let recs = prefer::train::tensorboard::read_records(&files[0]).unwrap();
    assert_eq!(recs.len(), 1 + 8, "file_version + one event per logged step");
    let has = |r: &[u8], s: &str| r.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(has(&recs[1], "train/loss") && has(&recs[1], "train/rewards/accuracies"));
    assert!(
        has(&recs[4], "eval/loss") && !has(&recs[3], "eval/loss"),
        "eval at step 4 only"
    );
    let none = TrainConfig {
        output_dir: dir.join("none").display().to_string(),
        save_strategy: Strategy::No,
        ..base
    };
    prefer::train::train(&none).unwrap();
    assert!(ckpts(&none.output_dir).is_empty());
    assert!(
        Path::new(&none.output_dir).join("model.safetensors").is_file(),
        "the final model is saved"
    );
}

/// `prefer data oasst` (formerly `data convert`, still accepted) converts OpenAssistant trees.
#[test]
fn data_oasst_and_its_old_name_agree() {
    let dir = prefer::testing::scratch_dir("data-oasst");
    let src = fixture("oasst-en100/en_10_tree.jsonl");
    for (name, out) in [("oasst", "a.jsonl"), ("convert", "b.jsonl")] {
        let o = bin()
            .args(["data", name])
            .arg(&src)
            .args(["--to", "pairs", "--out"])
            .arg(dir.join(out))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (a, b) = (
        std::fs::read_to_string(dir.join("a.jsonl")).unwrap(),
        std::fs::read_to_string(dir.join("b.jsonl")).unwrap(),
    );
    assert!(!a.is_empty());
    assert_eq!(a, b);
}
