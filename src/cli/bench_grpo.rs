//! `prefer bench grpo`: GRPO steps on a real model and real prompts (GSM8K questions with the
//! accuracy reward), timed phase by phase: sampling and scoring (`rollout`), log-probs and loss
//! (`forward`), `backward`, `optimizer`; and the peak memory.

use super::*;
use prefer::config::Task;
use prefer::error::Error;
use prefer::train::Trainer;

#[derive(clap::Args, Debug, Clone)]
pub struct GrpoBenchArgs {
    /// Model (default: models/SmolLM2-135M-Instruct.Q4_1.gguf or $PREFER_SMOLLM2).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// GSM8K-style rows with `question` and `answer` (default: data/gsm8k/train.jsonl under
    /// $PREFER_SHARED when set, else the checkout's tests/fixtures/gsm8k/train.jsonl).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Timed optimizer steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Prompts per step.
    #[arg(long, default_value_t = 4)]
    pub prompts: usize,
    /// Completions per prompt (GRPO's group).
    #[arg(long, default_value_t = 8)]
    pub num_generations: usize,
    /// New tokens per completion at most.
    #[arg(long, default_value_t = 128)]
    pub max_completion_length: usize,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// How AdamW keeps its moments: f32, or bf16 (half their memory; `adam_moments_dtype`).
    #[arg(long, default_value = "f32")]
    pub adam_moments_dtype: String,
    /// Sample in bf16 (`bf16_sampling`: AMX tiles where the CPU has them).
    #[arg(long)]
    pub bf16_sampling: bool,
    /// Train with bf16 products (`bf16`: AMX or AVX512-BF16 where the CPU has them).
    #[arg(long)]
    pub bf16: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn grpo(args: &GrpoBenchArgs) -> Result<()> {
    let model = args
        .model
        .clone()
        .or_else(super::default_model)
        .ok_or_else(|| Error::msg("no model: pass --model or run scripts/fetch-model.sh"))?;
    let data = match &args.data {
        Some(d) => d.clone(),
        None => super::bench_data("gsm8k/train.jsonl")
            .ok_or_else(|| Error::msg("no data: pass --data FILE (GSM8K-style rows), or set PREFER_SHARED"))?,
    };
    let out = std::env::temp_dir().join(format!("prefer-bench-grpo-{}", std::process::id()));
    std::fs::create_dir_all(&out)?;
    // the questions as chat prompts, their answers for the reward
    let n = (args.steps + 1) * args.prompts;
    let text = std::fs::read_to_string(&data).with_context(|| format!("reading {}", data.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().take(n).enumerate() {
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}:{}", data.display(), i + 1))?;
        rows.push(json!({"prompt": [{"role": "user", "content": v["question"]}], "answer": v["answer"]}).to_string());
    }
    let prompts = out.join("prompts.jsonl");
    write_lines(&prompts, &rows)?;
    let mut cfg = TrainConfig {
        task: Task::Grpo,
        model_name_or_path: model.display().to_string(),
        train_file: prompts.display().to_string(),
        output_dir: out.join("run").display().to_string(),
        per_device_train_batch_size: args.prompts * args.num_generations,
        max_steps: (args.steps + 1) as i64,
        learning_rate: 1e-6,
        shuffle: false,
        save_steps: 1_000_000,
        disable_tqdm: true,
        gradient_checkpointing: args.gradient_checkpointing,
        adam_moments_dtype: prefer::config::MomentsDtype::parse(&args.adam_moments_dtype)
            .map_err(anyhow::Error::msg)?,
        ..TrainConfig::default()
    };
    cfg.params.beta = 0.0;
    cfg.grpo.num_generations = args.num_generations;
    cfg.grpo.max_completion_length = args.max_completion_length;
    cfg.grpo.reward_funcs = vec!["accuracy".into()];
    cfg.grpo.bf16_sampling = args.bf16_sampling;
    cfg.bf16 = args.bf16;
    cfg.validate()?;
    let mut tr = Trainer::new(&cfg)?;
    let warm = tr.step()?;
    eprintln!("warm-up step: {:.1} s", warm.seconds);
    let mut secs = Vec::new();
    let mut phases: std::collections::BTreeMap<&str, f64> = Default::default();
    let mut generated = 0.0;
    for i in 0..args.steps {
        let r = tr.step()?;
        let len = r.metrics.get("completions/mean_length").copied().unwrap_or(0.0);
        generated += len * (args.prompts * args.num_generations) as f64;
        eprintln!(
            "step {}: {:.1} s ({}), mean completion {len:.0} tokens, reward {:.3}",
            i + 1,
            r.seconds,
            r.phases
                .iter()
                .map(|(k, v)| format!("{k} {v:.1} s"))
                .collect::<Vec<_>>()
                .join(", "),
            r.metrics.get("reward").copied().unwrap_or(f64::NAN)
        );
        for (k, v) in &r.phases {
            *phases.entry(*k).or_default() += v / args.steps as f64;
        }
        secs.push(r.seconds);
    }
    let total: f64 = secs.iter().sum();
    let rollout = phases.get("rollout").copied().unwrap_or(0.0) * args.steps as f64;
    let peak = prefer::util::peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    let rec = json!({
        "model": model.display().to_string(),
        "prompts": args.prompts,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "bf16_sampling": args.bf16_sampling,
        "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "s_per_step_mean": total / args.steps.max(1) as f64,
        "phase_seconds_per_step": phases,
        "generated_tokens_per_second": generated / rollout.max(1e-9),
        "peak_rss_gib": peak,
        "threads": candle_core::utils::get_num_threads(),
    });
    let _ = std::fs::remove_dir_all(&out);
    if args.json {
        println!("{rec}");
    } else {
        println!(
            "GRPO on {}: {} prompts × {} generations, ≤ {} new tokens, f32",
            model.display(),
            args.prompts,
            args.num_generations,
            args.max_completion_length
        );
        println!(
            "s/step                      {:.1}",
            rec["s_per_step_mean"].as_f64().unwrap_or(f64::NAN)
        );
        for (k, v) in &phases {
            println!("  {k:<24}  {v:.1} s");
        }
        println!(
            "generated tokens/s          {:.1}",
            rec["generated_tokens_per_second"].as_f64().unwrap_or(f64::NAN)
        );
        println!("peak RSS                    {peak:.2} GiB");
    }
    Ok(())
}
