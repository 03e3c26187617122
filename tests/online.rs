//! Online DPO / IPO, Nash-MD and XPO end to end on a tiny model: the expected reward of a learnable
//! rule reward rises, TRL's metrics are logged, a resumed run matches an uninterrupted one,
//! TRL's defaults and per-epoch lists load; and a reward model prefer trained scores completions
//! in-process.

use candle_core::DType;
use prefer::config::{Task, TrainConfig};
use prefer::rewards::RewardInput;
use prefer::testing::metrics;
use prefer::testing::{tiny_model, write_hf, TinySpec};
use serde_json::{Map, Value};
use std::path::Path;

/// Count the ASCII letters and digits of each completion (read from its JSON line, JSON escapes
/// removed): a reward about a quarter of the tiny vocabulary earns, so a prompt's two samples
/// often differ in it.
const COUNT_ALNUM: &str = r#"cmd:awk -F '"completion":"' '{split($2, c, "\""); s = c[1]; gsub(/\\u..../, "", s); gsub(/\\./, "", s); print gsub(/[A-Za-z0-9]/, "", s)}'"#;

/// A pairwise judge preferring the completion with more ASCII letters and digits (ties to the
/// first): 1 when the first has at least as many as the second, else 0.
const MORE_ALNUM_JUDGE: &str = r#"cmd:awk '{ i = index($0, "\"completions\":[\""); s = substr($0, i + 16); j = index(s, "\"]"); s = substr(s, 1, j - 1); gsub(/\\u..../, "", s); gsub(/\\./, "", s); k = index(s, "\",\""); a = substr(s, 1, k - 1); b = substr(s, k + 3); na = gsub(/[A-Za-z0-9]/, "", a); nb = gsub(/[A-Za-z0-9]/, "", b); print ((na >= nb) ? 1 : 0) }'"#;

fn setup(name: &str, task: Task) -> TrainConfig {
    prefer::testing::set_threads_for_tests();
    let dir = prefer::testing::scratch_dir(&format!("online-{name}"));
    // untied and small weights: a policy far from deterministic, whose two samples of a
    // prompt often differ
    let spec = TinySpec {
        tie_embeddings: false,
        init_scale: 0.5,
        ..TinySpec::default()
    };
    write_hf(&tiny_model(&spec, DType::F32, 5).unwrap(), &dir.join("model")).unwrap();
    let prompts: Vec<String> = ["the", "a cat", "dog", "it is", "we", "then", "so", "but"]
        .iter()
        .map(|p| serde_json::json!({"prompt": p}).to_string())
        .collect();
    std::fs::write(dir.join("prompts.jsonl"), prompts.join("\n")).unwrap();
    let mut cfg = TrainConfig {
        task,
        model_name_or_path: dir.join("model").display().to_string(),
        train_file: dir.join("prompts.jsonl").display().to_string(),
        output_dir: dir.join("out").display().to_string(),
        learning_rate: 1e-2,
        per_device_train_batch_size: 8,
        max_steps: 60,
        logging_steps: 1,
        save_steps: 1000,
        disable_tqdm: true,
        ..TrainConfig::default()
    };
    // one-token completions: the expected reward is then exact (`expected_reward`)
    cfg.grpo.temperature = 1.0;
    cfg.grpo.max_completion_length = 1;
    cfg.grpo.reward_funcs = vec![COUNT_ALNUM.into()];
    cfg.validate().unwrap();
    cfg
}

/// The policy's expected reward over the run's prompts, computed exactly: with one-token
/// completions the reward of token v is the count of ASCII letters and digits in its text (what
/// `COUNT_ALNUM` counts), and `Σ_v softmax(logits)_v · reward(v)` is the mean reward sampling at
/// temperature 1 would approach. Exact, so a test of learning is not at the mercy of a few
/// samples.
fn expected_reward(model_dir: &str, cfg: &TrainConfig) -> f64 {
    let m = prefer::model::load(Path::new(model_dir), DType::F32, &candle_core::Device::Cpu).unwrap();
    let prompts =
        prefer::data::prompts::load_prompts(Path::new(&cfg.train_file), &m.tokenizer, &Default::default(), None, 1)
            .unwrap();
    let vocab = m.transformer.cfg.vocab_size;
    let reward: Vec<f64> = (0..vocab as u32)
        .map(|v| {
            let t = m.tokenizer.decode(&[v], true).unwrap();
            t.chars().filter(|c| c.is_ascii_alphanumeric()).count() as f64
        })
        .collect();
    let mut total = 0.0;
    for p in &prompts {
        let z: Vec<f32> = prefer::sample::full_forward_logits(&m.transformer, &p.ids)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mx = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = z.iter().map(|&x| (x as f64 - mx).exp()).collect();
        let s: f64 = e.iter().sum();
        total += e.iter().zip(&reward).map(|(p, r)| p / s * r).sum::<f64>();
    }
    total / prompts.len() as f64
}

/// Train `cfg` and return the policy's expected reward before and after.
fn reward_before_after(cfg: &TrainConfig) -> (f64, f64) {
    let before = expected_reward(&cfg.model_name_or_path, cfg);
    prefer::train::train(cfg).unwrap();
    (before, expected_reward(&cfg.output_dir, cfg))
}

fn has(logs: &[Value], keys: &[&str]) {
    for k in keys {
        assert!(logs[0][*k].is_number(), "{k} missing: {}", logs[0]);
    }
}

#[test]
fn online_dpo_raises_a_learnable_reward() {
    let cfg = setup("dpo", Task::OnlineDpo);
    let (first, last) = reward_before_after(&cfg);
    assert!(last > 1.2 * first, "expected reward {first:.3} -> {last:.3}");
    has(
        &metrics(&cfg),
        &[
            "loss",
            "objective/scores",
            "objective/scores_margin",
            "objective/kl",
            "objective/entropy",
            "objective/non_score_reward",
            "objective/rlhf_reward",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "val/contain_eos_token",
            "beta",
            "completions/mean_length",
        ],
    );
    // two completions per prompt, one of them chosen
    let comps = std::fs::read_to_string(Path::new(&cfg.output_dir).join("completions.jsonl")).unwrap();
    let recs: Vec<Value> = comps.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs.len(), 60 * 16);
    let chosen = recs.iter().filter(|r| r["chosen"] == true).count();
    assert_eq!(chosen, 60 * 8);
    // the chosen completion never has the lower reward
    for step in recs.chunks(16) {
        for k in 0..8 {
            let (a, b) = (&step[k], &step[k + 8]);
            let (w, l) = if a["chosen"] == true { (a, b) } else { (b, a) };
            assert!(w["reward"].as_f64().unwrap() >= l["reward"].as_f64().unwrap());
        }
    }
}

#[test]
fn online_ipo_raises_a_learnable_reward() {
    let mut cfg = setup("ipo", Task::OnlineDpo);
    cfg.loss_type = prefer::config::LossType::One("ipo".into());
    let (first, last) = reward_before_after(&cfg);
    assert!(last > 1.2 * first, "expected reward {first:.3} -> {last:.3}");
}

/// IPO-MD: both completions from the policy–reference mixture, ranked, IPO's loss (its default).
#[test]
fn ipo_md_raises_a_learnable_reward_from_mixture_samples() {
    let cfg = setup("ipo-md", Task::IpoMd);
    assert_eq!(cfg.loss_type.names(), ["sigmoid"], "setup builds the config directly");
    let cfg = TrainConfig {
        loss_type: prefer::config::LossType::One("ipo".into()),
        ..cfg
    };
    let (first, last) = reward_before_after(&cfg);
    assert!(last > 1.2 * first, "expected reward {first:.3} -> {last:.3}");
    has(
        &metrics(&cfg),
        &["loss", "objective/scores", "mixture_coef", "rewards/margins"],
    );
    let comps = std::fs::read_to_string(Path::new(&cfg.output_dir).join("completions.jsonl")).unwrap();
    let first_step: Vec<Value> = comps
        .lines()
        .take(16)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        first_step.iter().all(|r| r["sampled_from"] == "mixture"),
        "{:?}",
        first_step[0]
    );
}

/// A pairwise judge ranks the pairs in place of a reward: one that prefers more letters and
/// digits teaches what the COUNT_ALNUM reward does, for online DPO and for Nash-MD (whose p it
/// is); its verdicts are logged beside each completion, and no reward metric is made up.
#[test]
fn a_pairwise_judge_ranks_the_pairs_in_place_of_a_reward() {
    for task in [Task::OnlineDpo, Task::NashMd] {
        let mut cfg = setup(&format!("judge-{task:?}"), task);
        cfg.grpo.reward_funcs.clear();
        cfg.online.judge = Some(MORE_ALNUM_JUDGE.into());
        if task == Task::NashMd {
            cfg.params.beta = 0.02;
        }
        cfg.validate().unwrap();
        let (first, last) = reward_before_after(&cfg);
        assert!(last > 1.2 * first, "{task:?}: expected reward {first:.3} -> {last:.3}");
        let logs = metrics(&cfg);
        assert!(
            logs[0].get("reward").is_none() && logs[0].get("objective/scores").is_none(),
            "{}",
            logs[0]
        );
        let comps = std::fs::read_to_string(Path::new(&cfg.output_dir).join("completions.jsonl")).unwrap();
        let recs: Vec<Value> = comps.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        for step in recs.chunks(16) {
            for k in 0..8 {
                let (a, b) = (&step[k], &step[k + 8]);
                let p = a["judge"].as_f64().unwrap();
                assert!(p == 0.0 || p == 1.0, "{a}");
                assert_eq!(p + b["judge"].as_f64().unwrap(), 1.0);
                assert!(a["reward"].is_null());
                if task == Task::OnlineDpo {
                    assert_eq!(a["chosen"] == true, p >= 0.5, "{a}");
                }
            }
        }
    }
    // a judge replaces the rewards; it does not join them, and GRPO has none
    let mut cfg = setup("judge-refused", Task::OnlineDpo);
    cfg.online.judge = Some(MORE_ALNUM_JUDGE.into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("keep one"), "{e}");
    cfg.task = Task::Grpo;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("GRPO and RLOO score each completion"), "{e}");
}

#[test]
fn xpo_raises_a_learnable_reward() {
    let cfg = setup("xpo", Task::Xpo);
    let (first, last) = reward_before_after(&cfg);
    assert!(last > 1.2 * first, "expected reward {first:.3} -> {last:.3}");
    has(
        &metrics(&cfg),
        &[
            "loss/dpo",
            "loss/xpo",
            "objective/model_scores",
            "objective/ref_scores",
            "objective/scores_margin",
            "objective/kl",
            "val/model_contain_eos_token",
            "val/ref_contain_eos_token",
            "alpha",
        ],
    );
}

#[test]
fn nash_md_raises_a_learnable_reward_and_resumes_exactly() {
    let mut cfg = setup("nash", Task::NashMd);
    cfg.params.beta = 0.02;
    let (first, last) = reward_before_after(&cfg);
    assert!(last > 1.2 * first, "expected reward {first:.3} -> {last:.3}");
    has(
        &metrics(&cfg),
        &[
            "loss/score",
            "loss/kl",
            "rewards/probabilities",
            "objective/entropy",
            "mixture_coef",
            "val/ref_contain_eos_token",
        ],
    );
    // stop after 3 steps, resume, and log what the uninterrupted run logged
    cfg.max_steps = 6;
    cfg.output_dir = format!("{}-short", cfg.output_dir);
    prefer::train::train(&cfg).unwrap();
    let whole = metrics(&cfg);
    let c2 = TrainConfig {
        output_dir: format!("{}-2", cfg.output_dir),
        save_steps: 3,
        ..cfg.clone()
    };
    let resumed = prefer::testing::stop_and_resume(&c2, 3);
    assert_eq!(resumed.len(), whole.len());
    for (a, b) in whole.iter().zip(&resumed) {
        for k in ["loss", "reward", "loss/kl", "grad_norm"] {
            assert_eq!(a[k], b[k], "step {}: {k}", a["step"]);
        }
    }
}

/// TRL's OnlineDPOConfig defaults, its `max_new_tokens` name, per-epoch lists, and the checks.
#[test]
fn online_configs_load_with_trls_defaults_and_refuse_bad_values() {
    let cfg = setup("config", Task::OnlineDpo);
    let dir = Path::new(&cfg.output_dir).parent().unwrap().to_path_buf();
    let toml = dir.join("run.toml");
    let write = |task: &str, extra: &str| {
        std::fs::write(
            &toml,
            format!(
                "task = \"{task}\"\nmodel_name_or_path = \"{}\"\ntrain_file = \"{}\"\nreward_funcs = [\"length\"]\nreward_length_target = 4\n{extra}",
                cfg.model_name_or_path, cfg.train_file
            ),
        )
        .unwrap();
    };
    write("online_dpo", "");
    let c = TrainConfig::load(Some(&toml), &[]).unwrap();
    assert_eq!(
        (
            c.grpo.temperature,
            c.grpo.max_completion_length,
            c.learning_rate,
            c.params.beta
        ),
        (0.9, 64, 5e-7, 0.1)
    );
    write("xpo", "max_new_tokens = 12\nbeta = [0.1, 0.05]\nalpha = [1e-4, 1e-5]\n");
    let c = TrainConfig::load(Some(&toml), &[]).unwrap();
    assert_eq!(c.grpo.max_completion_length, 12);
    assert_eq!(c.online.beta_per_epoch, Some(vec![0.1, 0.05]));
    assert_eq!(c.online.alpha_per_epoch, Some(vec![1e-4, 1e-5]));
    assert_eq!(c.params.reference_free.alpha, 1e-4);
    write("xpo", "");
    assert_eq!(
        TrainConfig::load(Some(&toml), &[]).unwrap().params.reference_free.alpha,
        1e-5
    );
    write("nash_md", "mixture_coef = [0.5, 0.25]\n");
    let c = TrainConfig::load(Some(&toml), &[]).unwrap();
    assert_eq!(
        (c.online.mixture_coef, c.online.mixture_coef_per_epoch),
        (0.5, Some(vec![0.5, 0.25]))
    );
    assert_eq!(prefer::config::online::at_epoch(&Some(vec![0.5, 0.25]), 0.5, 7), 0.25);
    // IPO-MD takes online DPO's defaults, with IPO's loss unless loss_type is set
    write("ipo_md", "");
    let c = TrainConfig::load(Some(&toml), &[]).unwrap();
    assert_eq!(
        (c.loss_type.names(), c.grpo.temperature),
        (vec!["ipo".to_string()], 0.9)
    );
    for (task, set, want) in [
        ("nash_md", "loss_type=ipo", "remove loss_type"),
        ("online_dpo", "loss_type=kto", "pairwise objective"),
        ("online_dpo", "mixture_coef=1.5", "mixture_coef must be in [0, 1]"),
        ("online_dpo", "reward_funcs=[]", "set reward_funcs"),
        (
            "online_dpo",
            "missing_eos_penalty=-1",
            "missing_eos_penalty must be ≥ 0",
        ),
        ("dpo", "beta=[0.1, 0.2]", "only with task"),
    ] {
        write(task, "");
        let e = TrainConfig::load(Some(&toml), &[set.into()]).unwrap_err().to_string();
        assert!(e.contains(want), "{task} {set}: {e}");
    }
}

/// A reward model prefer trained scores `prompt + completion (+ EOS when it stopped)` with its
/// own tokenizer, exactly as `Transformer::rewards` does; MaxMin's heads give their minimum;
/// a causal LM is refused with a clear error; and an online run reads it by path.
#[test]
fn a_reward_model_scores_completions_in_process() {
    prefer::testing::set_threads_for_tests();
    let cfg = setup("rm", Task::OnlineDpo);
    let dir = Path::new(&cfg.output_dir).parent().unwrap().to_path_buf();
    let base = tiny_model(&TinySpec::default(), DType::F32, 21).unwrap();
    let rm = base.clone().with_reward_head(3).unwrap();
    write_hf(&rm, &dir.join("rm")).unwrap();
    let heads = base.with_reward_heads(4, 3).unwrap();
    write_hf(&heads, &dir.join("rm3")).unwrap();
    let cols = Map::new();
    let xs = [
        RewardInput {
            prompt: "the cat",
            completion: " sat on",
            completion_tokens: 2,
            stopped: true,
            columns: &cols,
        },
        RewardInput {
            prompt: "a dog",
            completion: " is here",
            completion_tokens: 2,
            stopped: false,
            columns: &cols,
        },
    ];
    let opts = prefer::rewards::RewardOptions::default();
    let mut r = prefer::rewards::by_name(&dir.join("rm").display().to_string(), &opts).unwrap();
    let got = r.score(&xs).unwrap();
    let tok = &rm.tokenizer;
    let seqs = vec![
        tok.encode(&format!("the cat sat on{}", tok.eos_token), true).unwrap(),
        tok.encode("a dog is here", true).unwrap(),
    ];
    let want: Vec<f32> = rm.transformer.rewards(&seqs, tok.pad_id).unwrap().to_vec1().unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((g.unwrap() - *w as f64).abs() < 1e-5, "{got:?} vs {want:?}");
    }
    let mut r3 = prefer::rewards::by_name(&format!("model:{}", dir.join("rm3").display()), &opts).unwrap();
    let got3 = r3.score(&xs).unwrap();
    let m: Vec<Vec<f32>> = heads
        .transformer
        .reward_matrix(&seqs, tok.pad_id)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (g, row) in got3.iter().zip(&m) {
        let min = row.iter().cloned().fold(f32::INFINITY, f32::min);
        assert!((g.unwrap() - min as f64).abs() < 1e-5, "{got3:?} vs {m:?}");
    }
    let e = prefer::rewards::by_name(&format!("model:{}", cfg.model_name_or_path), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no reward head"), "{e}");
    let e = prefer::rewards::by_name("model:/no/such/rm", &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no such file"), "{e}");
    // an online run with the reward model as its only reward
    let mut c = cfg.clone();
    c.grpo.reward_funcs = vec![];
    c.online.reward_model_path = Some(dir.join("rm").display().to_string());
    c.max_steps = 2;
    c.validate().unwrap();
    prefer::train::train(&c).unwrap();
    let logs = metrics(&c);
    let key = format!("rewards/model:{}/mean", dir.join("rm").display());
    assert!(logs[0][&key].is_number(), "{}", logs[0]);
}

/// `sync_ref_model` with α = 1 makes the reference the policy every `ref_model_sync_steps`:
/// the step after a sync sees a KL of exactly zero (the policy has not moved since), the
/// others do not.
#[test]
fn sync_ref_model_moves_the_online_reference() {
    let mut cfg = setup("sync", Task::OnlineDpo);
    cfg.max_steps = 4;
    cfg.sync_ref_model = true;
    cfg.ref_model_sync_steps = 2;
    cfg.ref_model_mixup_alpha = 1.0;
    cfg.validate().unwrap();
    prefer::train::train(&cfg).unwrap();
    let kl: Vec<f64> = metrics(&cfg)
        .iter()
        .map(|r| r["objective/kl"].as_f64().unwrap())
        .collect();
    assert_eq!(kl[0], 0.0, "the reference starts as the policy");
    assert!(kl[1].abs() > 1e-4, "{kl:?}");
    assert!(kl[2].abs() < 1e-6, "synced after step 2: {kl:?}");
    assert!(kl[3].abs() > 1e-4, "{kl:?}");
}

/// Bad input to an online run: a row without a prompt and a prompt with no room for its
/// completion are refused before training, naming the line; a reward command that starts
/// failing mid-run stops the run with the command named, and the checkpoints already written
/// stay.
#[test]
fn online_runs_refuse_bad_prompts_and_stop_cleanly_on_a_failing_reward() {
    let cfg = setup("bad", Task::OnlineDpo);
    let dir = Path::new(&cfg.output_dir).parent().unwrap().to_path_buf();
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"the\"}\n{\"question\": \"a cat\"}\n").unwrap();
    let e = prefer::train::train(&TrainConfig {
        train_file: bad.display().to_string(),
        ..cfg.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("bad.jsonl:2:") && e.contains("`prompt`"), "{e}");
    let mut long = cfg.clone();
    long.grpo.max_completion_length = 100_000;
    let e = prefer::train::train(&long).unwrap_err().to_string();
    assert!(
        e.contains("prompts.jsonl:1:") && e.contains("no room for a completion"),
        "{e}"
    );
    // a reward that works twice (steps 1 and 2), then exits with status 3
    let counter = dir.join("calls");
    let mut failing = cfg.clone();
    failing.grpo.reward_funcs = vec![format!(
        "cmd:n=$(cat {0} 2>/dev/null || echo 0); echo $((n + 1)) > {0}; [ $n -lt 2 ] || exit 3; awk '{{print 1}}'",
        counter.display()
    )];
    failing.max_steps = 5;
    failing.save_steps = 1;
    let e = prefer::train::train(&failing).unwrap_err().to_string();
    assert!(e.contains("reward command") && e.contains("exit"), "{e}");
    let out = Path::new(&failing.output_dir);
    assert!(
        out.join("checkpoint-2").is_dir(),
        "the checkpoints before the failure stay"
    );
    assert!(!out.join("checkpoint-3").exists());
}

/// Online DPO and Nash-MD with LoRA adapters on a frozen base: the reward rises (the reference
/// is the base with the adapters off; Nash-MD samples from its mixture with the policy), and
/// the output is a PEFT adapter that loads back onto its base.
#[test]
fn online_methods_with_lora_raise_a_learnable_reward() {
    for task in [Task::OnlineDpo, Task::NashMd] {
        let mut cfg = setup(&format!("lora-{task:?}"), task);
        cfg.peft.use_peft = true;
        cfg.peft.lora_r = 8;
        cfg.peft.lora_alpha = 16.0;
        cfg.peft.lora_target_modules = Some(vec!["all-linear".into()]);
        // the untied output head trained fully beside the adapters (one-token completions
        // depend on it most)
        cfg.peft.lora_modules_to_save = Some(vec!["lm_head".into()]);
        cfg.learning_rate = 1e-2;
        cfg.validate().unwrap();
        let (first, last) = reward_before_after(&cfg);
        assert!(last > 1.2 * first, "{task:?}: expected reward {first:.3} -> {last:.3}");
        let st = candle_core::safetensors::load(
            Path::new(&cfg.output_dir).join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(
            st.contains_key("base_model.model.lm_head.weight"),
            "the module to save is saved"
        );
    }
}

/// Online DPO with `optimizer_in_backward` on an untied model (the embedding and the head are
/// updated from kept gradients, the layers in the second pass): the same metrics, bit for bit.
#[test]
fn online_dpo_with_optimizer_in_backward_equals_without() {
    let base = setup("oib", Task::OnlineDpo);
    let runs: Vec<Vec<Value>> = [false, true]
        .into_iter()
        .map(|on| {
            let c = TrainConfig {
                max_steps: 3,
                optimizer_in_backward: on,
                output_dir: format!("{}-{on}", base.output_dir),
                ..base.clone()
            };
            prefer::train::train(&c).unwrap();
            prefer::testing::without_timings(metrics(&c))
        })
        .collect();
    assert_eq!(runs[0].len(), 3);
    assert!(
        runs[0].iter().all(|r| r["grad_norm"].as_f64().unwrap() > 0.0),
        "the policy learns"
    );
    assert_eq!(runs[0], runs[1]);
}
