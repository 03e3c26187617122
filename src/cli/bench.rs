//! `prefer bench dpo`: DPO training steps on a real model, timed, next to the machine's own
//! f32 matmul throughput measured by the same process.

use candle_core::{Device, Tensor};
use prefer::config::TrainConfig;
use prefer::error::{Error, Result};
use prefer::train::Trainer;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// DPO training steps on a real model: s/step, tokens/s, peak RSS, GFLOP/s vs the machine's matmul.
    Dpo(DpoBenchArgs),
    /// GRPO steps on a real model and GSM8K prompts: s/step split into sampling, log-probs,
    /// backward and optimizer; generated tokens/s; peak RSS.
    Grpo(super::bench_grpo::GrpoBenchArgs),
    /// The sampler's tokens/s: batch 1 and a GRPO-shaped batch, next to the machine's memory
    /// bandwidth and matmul bounds.
    Generate(super::bench_generate::GenerateBenchArgs),
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Dpo(args) => dpo(&args).map_err(Into::into),
        BenchCmd::Grpo(args) => super::bench_grpo::grpo(&args),
        BenchCmd::Generate(args) => super::bench_generate::generate(&args),
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct DpoBenchArgs {
    /// Model (default: models/SmolLM2-135M-Instruct.Q4_1.gguf, where scripts/fetch-model.sh puts it, or $PREFER_SMOLLM2).
    #[arg(long)]
    pub model: Option<String>,
    /// Preference pairs (default: data/hh-rlhf-harmless-base/pairs.jsonl under $PREFER_SHARED
    /// when set, else the checkout's tests/fixtures/hh-rlhf-harmless-base/pairs.jsonl).
    #[arg(long)]
    pub data: Option<String>,
    /// Timed optimizer steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Preference pairs per step.
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// Tokens of a sequence (prompt + completion) at most. Only pairs within it are used, so
    /// no sequence is truncated and a peer trains on exactly the same tokens.
    #[arg(long, default_value_t = 256)]
    pub max_length: usize,
    /// A separate cut of prompts (0 = none, as TRL 1.16, which has no such option).
    #[arg(long, default_value_t = 0)]
    pub max_prompt_length: usize,
    /// Use precomputed (cached) reference log-probs instead of a live reference model.
    #[arg(long)]
    pub precompute_ref_log_probs: bool,
    /// Pad every sequence separately instead of sharing the prompt between chosen and rejected.
    #[arg(long)]
    pub no_share_prompt: bool,
    /// Pad each batch to its longest row instead of packing it into one row.
    #[arg(long)]
    pub no_padding_free: bool,
    /// Instead of the HH pairs as they are, pairs whose every sequence is about N tokens (72 %
    /// prompt, as on HH), cut from the HH text: for measuring how cost grows with length.
    #[arg(long, value_name = "N")]
    pub synthetic_length: Option<usize>,
    /// Use candle primitive ops instead of the fused kernels (RMSNorm, RoPE, attention, SwiGLU,
    /// log-prob head).
    #[arg(long)]
    pub no_fused_kernels: bool,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Update each layer during a second backward pass instead of keeping all the layers'
    /// gradients (`optimizer_in_backward`: less memory, one more backward pass of the layers).
    #[arg(long)]
    pub optimizer_in_backward: bool,
    /// bf16 matmuls with f32 sums (TRL's `bf16 = true`): AMX tiles where the CPU has them.
    #[arg(long)]
    pub bf16: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// How AdamW keeps its moments: f32, or bf16 (half their memory; `adam_moments_dtype`).
    #[arg(long, default_value = "f32")]
    pub adam_moments_dtype: String,
    /// Train LoRA adapters on the frozen base (kept in its stored precision) instead of every
    /// weight (`use_peft`); the reference is the base with the adapters off.
    #[arg(long)]
    pub peft: bool,
    /// LoRA rank with --peft.
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    /// Modules adapted with --peft (comma-separated PEFT names, or all-linear).
    #[arg(long, default_value = "q_proj,v_proj")]
    pub lora_target_modules: String,
    /// Write the pairs the run trained on, in order (JSONL prompt/chosen/rejected): the input
    /// of a peer's run on the same batches (scripts/bench-dpo-vs-trl.sh).
    #[arg(long)]
    pub rows_out: Option<PathBuf>,
}

/// Best-of-3 GFLOP/s of an f32 `[m,k] x [k,n]` matmul (candle's, as the f32 model runs it).
pub fn matmul_gflops(m: usize, k: usize, n: usize) -> Result<f64> {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (k, n), &dev)?;
    let _ = a.matmul(&b)?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        let _ = c.dims();
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// Best-of-3 GFLOP/s of prefer's bf16 matmul (`bf16 = true`: AMX tiles or `vdpbf16ps`),
/// `[m,k] x [k,n]`, counting the conversion and packing of both operands.
pub fn bf16_matmul_gflops(m: usize, k: usize, n: usize) -> Result<f64> {
    use prefer::model::kernels::matmul::{matmul, Rhs, View};
    let dev = Device::Cpu;
    let a: Vec<f32> = Tensor::randn(0f32, 1.0, m * k, &dev)?.to_vec1()?;
    let b: Vec<f32> = Tensor::randn(0f32, 1.0, k * n, &dev)?.to_vec1()?;
    let mut c = vec![0f32; m * n];
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = Instant::now();
        let rhs = Rhs::new(View::row_major(&b, k, n))?;
        matmul(View::row_major(&a, m, k), &rhs, &mut c, n, false)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// `count` pairs in the standard format whose prompt is ~72 % and each response ~28 % of `n`
/// tokens, cut from consecutive stretches of the text of `jsonl`; returns them and the prompt
/// length.
fn synthetic_pairs(
    jsonl: &str,
    tok: &prefer::tokenizer::TextTokenizer,
    n: usize,
    count: usize,
) -> Result<(String, usize)> {
    let p = n * 72 / 100;
    let c = n - p;
    let need = count * (p + 2 * c);
    let mut ids = Vec::new();
    for line in jsonl.lines() {
        if ids.len() >= need {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::msg(format!("bench data: {e}")))?;
        if let Some(t) = v.get("chosen").and_then(|x| x.as_str()) {
            ids.extend(tok.encode(t, false)?);
        }
    }
    if ids.len() < need {
        return Err(Error::msg(format!(
            "not enough text for {count} synthetic pairs of {n} tokens"
        )));
    }
    let mut rows = Vec::with_capacity(count);
    for (k, w) in ids.chunks(p + 2 * c).take(count).enumerate() {
        let text = |a: usize, b: usize| tok.decode(&w[a..b], true);
        let row = serde_json::json!({
            "prompt": format!("{k}. {}", text(0, p)?),
            "chosen": text(p, p + c)?,
            "rejected": text(p + c, p + 2 * c)?,
        });
        rows.push(row.to_string());
    }
    Ok((rows.join("\n"), p))
}

/// The first `count` rows of `text` (JSONL pairs) whose prompt + chosen and prompt + rejected
/// fit `max_length` tokens as prefer tokenizes them (completion + EOS), as JSON lines.
fn whole_pairs(
    text: &str,
    file: &str,
    tok: &prefer::tokenizer::TextTokenizer,
    max_length: usize,
    count: usize,
    scratch: &std::path::Path,
) -> Result<String> {
    // read and tokenized by the data layer itself, a window of rows at a time
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut kept = Vec::new();
    let probe = scratch.join("probe.jsonl");
    let opts = prefer::data::TokenizeOptions {
        max_length: None,
        max_prompt_length: None,
        truncation_mode: Default::default(),
        columns: Vec::new(),
    };
    for window in lines.chunks(256) {
        std::fs::write(&probe, window.join("\n")).map_err(|e| Error::io(&probe, e))?;
        let (texts, _) = prefer::data::tokenize::load_text_examples(&probe, None, true)?;
        for t in texts {
            let Ok(e) = prefer::data::tokenize::tokenize_example(&t, tok, &opts, &probe) else {
                continue; // a row the data layer rejects (as the run would skip it)
            };
            if e.responses.len() == 2 && e.responses.iter().all(|r| e.prompt_ids.len() + r.len() <= max_length) {
                // explicit prompt/chosen/rejected, split as prefer splits them (a peer given
                // the implicit-prompt rows would find its own split)
                let row = serde_json::json!({"prompt": t.prompt, "chosen": t.chosen(), "rejected": t.rejected()});
                kept.push(row.to_string());
                if kept.len() == count {
                    return Ok(kept.join("\n"));
                }
            }
        }
    }
    Err(Error::msg(format!(
        "{file}: only {} pairs fit max_length {max_length} whole; {count} needed (fewer --steps or a larger --max-length)",
        kept.len()
    )))
}

pub fn dpo(args: &DpoBenchArgs) -> Result<()> {
    let model = match &args.model {
        Some(m) => m.clone(),
        None => super::default_model()
            .ok_or_else(|| Error::msg("no model: pass --model or run scripts/fetch-model.sh"))?
            .display()
            .to_string(),
    };
    let data = match &args.data {
        Some(d) => d.clone(),
        None => super::bench_data("hh-rlhf-harmless-base/pairs.jsonl")
            .ok_or_else(|| Error::msg("no data: pass --data FILE (preference pairs), or set PREFER_SHARED"))?
            .display()
            .to_string(),
    };
    let out = std::env::temp_dir().join(format!("prefer-bench-{}", std::process::id()));
    prefer::util::create_dir_all(&out)?;
    // Only the pairs the timed steps use, so a precomputed reference costs one pass over
    // them, not over the whole file; and only pairs whose sequences fit max_length whole, so
    // that no truncation rule (prefer's or a peer's) changes what is trained on.
    let need = (args.steps + 1) * args.batch_size;
    let text = prefer::util::read_to_string(std::path::Path::new(&data))?;
    let data_subset = out.join("pairs.jsonl");
    let tok = prefer::model::load_tokenizer(std::path::Path::new(&model))?;
    let (mut max_length, mut max_prompt_length) = (args.max_length, args.max_prompt_length);
    let subset = match args.synthetic_length {
        None => whole_pairs(&text, &data, &tok, max_length, need, &out)?,
        Some(n) => {
            let (rows, p) = synthetic_pairs(&text, &tok, n, need)?;
            (max_length, max_prompt_length) = (n + 32, p + 16);
            rows
        }
    };
    std::fs::write(&data_subset, &subset).map_err(|e| Error::io(&data_subset, e))?;
    if let Some(f) = &args.rows_out {
        std::fs::write(f, format!("{subset}\n")).map_err(|e| Error::io(f, e))?;
    }
    let cfg = TrainConfig {
        model_name_or_path: model.clone(),
        train_file: data_subset.display().to_string(),
        output_dir: out.display().to_string(),
        per_device_train_batch_size: args.batch_size,
        per_device_eval_batch_size: args.batch_size,
        max_length,
        max_prompt_length,
        max_steps: (args.steps + 1) as i64,
        learning_rate: 1e-6,
        shuffle: false,
        skip_invalid: true,
        precompute_ref_log_probs: args.precompute_ref_log_probs,
        ref_log_probs_cache_dir: out.join("cache").display().to_string(),
        disable_tqdm: true,
        share_prompt: !args.no_share_prompt,
        padding_free: !args.no_padding_free,
        fused_kernels: !args.no_fused_kernels,
        gradient_checkpointing: args.gradient_checkpointing,
        optimizer_in_backward: args.optimizer_in_backward,
        bf16: args.bf16,
        adam_moments_dtype: prefer::config::MomentsDtype::parse(&args.adam_moments_dtype).map_err(Error::msg)?,
        peft: prefer::config::peft::PeftParams {
            use_peft: args.peft,
            lora_r: args.lora_r,
            lora_alpha: 2.0 * args.lora_r as f64,
            lora_target_modules: Some(
                args.lora_target_modules
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect(),
            ),
            ..Default::default()
        },
        ..TrainConfig::default()
    };
    cfg.validate()?;
    let threads = candle_core::utils::get_num_threads();
    let mut tr = Trainer::new(&cfg)?;
    prefer::util::memtrace("after Trainer::new");
    let params = tr.policy.transformer.cfg.num_params() as f64;
    let warm = tr.step()?;
    eprintln!("warm-up step: {:.2} s, loss {:.4}", warm.seconds, warm.metrics["loss"]);
    let mut secs = Vec::new();
    let mut tokens = 0usize;
    let mut positions = 0usize;
    let mut phase_secs: std::collections::BTreeMap<&str, f64> = Default::default();
    let mut losses = vec![warm.metrics["loss"]];
    for i in 0..args.steps {
        let r = tr.step()?;
        eprintln!(
            "step {}: {:.2} s, {} tokens ({} computed), loss {:.6}",
            i + 1,
            r.seconds,
            r.tokens,
            r.positions,
            r.metrics["loss"]
        );
        positions += r.positions;
        for (k, v) in &r.phases {
            *phase_secs.entry(*k).or_insert(0.0) += v;
        }
        losses.push(r.metrics["loss"]);
        secs.push(r.seconds);
        tokens += r.tokens;
    }
    let total: f64 = secs.iter().sum();
    let mut sorted = secs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let live_ref = !args.precompute_ref_log_probs;
    // 6·N per trained token (forward + backward), 2·N per reference token.
    let per_token = (6.0 + if live_ref { 2.0 } else { 0.0 }) * params;
    let equivalent = per_token * tokens as f64 / total / 1e9;
    let achieved = per_token * positions as f64 / total / 1e9;
    let peak = prefer::util::peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    let mm_big = matmul_gflops(2048, 2048, 2048)?;
    let mm_bf16 = bf16_matmul_gflops(2048, 2048, 2048)?;
    let h = tr.policy.transformer.cfg.hidden_size;
    let mm_model = matmul_gflops(512, h, tr.policy.transformer.cfg.intermediate_size)?;
    let _ = std::fs::remove_dir_all(&out);
    let v = serde_json::json!({
        "model": model, "threads": threads, "batch_pairs": args.batch_size, "max_length": args.max_length, "synthetic_length": args.synthetic_length,
        "reference": if live_ref { "live" } else { "precomputed" },
        "losses": losses, "s_per_step": secs, "s_per_step_median": median, "tokens_per_second": tokens as f64 / total, "tokens_per_step": tokens as f64 / args.steps as f64,
        "pairs_per_second": (args.steps * args.batch_size) as f64 / total,
        "dtype": if args.bf16 { "bf16" } else { "f32" }, "bf16_kernel": if args.bf16 { prefer::model::kernels::matmul::bf16_kernel() } else { None }, "kernel_path": prefer::model::kernels::CpuPath::active().name(), "share_prompt": !args.no_share_prompt, "padding_free": !args.no_padding_free, "fused_kernels": !args.no_fused_kernels,
        "gradient_checkpointing": args.gradient_checkpointing, "optimizer_in_backward": args.optimizer_in_backward, "adam_moments_dtype": args.adam_moments_dtype,
        "peft": args.peft.then(|| serde_json::json!({"lora_r": args.lora_r, "lora_target_modules": args.lora_target_modules})),
        "peak_rss_gib": peak, "gflops_achieved": achieved, "gflops_trl_equivalent": equivalent,
        "computed_positions_per_second": positions as f64 / total,
        "phase_seconds_per_step": phase_secs.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v / args.steps as f64))).collect::<serde_json::Map<_, _>>(),
        "matmul_gflops_2048": mm_big, "matmul_gflops_2048_bf16": mm_bf16, "matmul_gflops_model_shape": mm_model,
    });
    if args.json {
        println!("{v}");
    } else {
        println!("prefer bench dpo: {model}");
        println!(
            "  threads {threads}, batch {} pairs, max_length {}, reference {}, matmuls {}, {}",
            args.batch_size,
            args.max_length,
            if live_ref { "live" } else { "precomputed" },
            if args.bf16 { "bf16" } else { "f32" },
            match args.peft {
                true => format!(
                    "LoRA r {} on {} (frozen base as stored)",
                    args.lora_r, args.lora_target_modules
                ),
                false => "full fine-tuning".into(),
            }
        );
        println!("  s/step (median of {})        {median:.2}", args.steps);
        println!("  real tokens / s              {:.0}", tokens as f64 / total);
        println!(
            "  pairs / s                    {:.3}",
            (args.steps * args.batch_size) as f64 / total
        );
        println!("  peak RSS                     {peak:.2} GiB");
        let phases: Vec<String> = phase_secs
            .iter()
            .map(|(k, v)| format!("{k} {:.2}", v / args.steps as f64))
            .collect();
        println!("  s/step by phase (mean)       {}", phases.join(", "));
        println!(
            "  computed positions / s       {:.0}  (share_prompt {}, padding_free {}, fused_kernels {}, gradient_checkpointing {})",
            positions as f64 / total,
            !args.no_share_prompt,
            !args.no_padding_free,
            !args.no_fused_kernels,
            args.gradient_checkpointing
        );
        println!(
            "  achieved GFLOP/s             {achieved:.1}  ((6{}) x params x computed positions / time)",
            if live_ref { "+2" } else { "" }
        );
        println!("  TRL-equivalent GFLOP/s       {equivalent:.1}  (the same, counting every token TRL computes)");
        println!(
            "  machine f32 matmul GFLOP/s   {mm_big:.1} (2048^3), {mm_model:.1} (512x{h}x{})",
            tr.policy.transformer.cfg.intermediate_size
        );
        println!(
            "  machine bf16 matmul GFLOP/s  {mm_bf16:.1} (2048^3, prefer's bf16 matmul incl. packing; {})",
            prefer::model::kernels::matmul::bf16_kernel()
                .unwrap_or("no fast bf16 product here: rounded operands through the f32 GEMM")
        );
    }
    Ok(())
}
