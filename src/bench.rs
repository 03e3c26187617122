//! `prefer bench dpo`: DPO training steps on a real model, timed, next to the machine's own
//! f32 matmul throughput measured by the same process.

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::train::Trainer;
use candle_core::{Device, Tensor};
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct DpoBenchArgs {
    /// Model (default: the SmolLM2-135M-Instruct GGUF from ../shared/models or models/).
    #[arg(long)]
    pub model: Option<String>,
    /// Preference pairs (default: ../shared/data/hh-rlhf-harmless-base/pairs.jsonl).
    #[arg(long)]
    pub data: Option<String>,
    /// Timed optimizer steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 256)]
    pub max_length: usize,
    #[arg(long, default_value_t = 128)]
    pub max_prompt_length: usize,
    /// Use precomputed (cached) reference log-probs instead of a live reference model.
    #[arg(long)]
    pub precompute_ref_log_probs: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Best-of-3 GFLOP/s of an f32 `[m,k] x [k,n]` matmul.
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

pub fn dpo(args: &DpoBenchArgs) -> Result<()> {
    let model = match &args.model {
        Some(m) => m.clone(),
        None => crate::paths::smollm2_gguf()
            .ok_or_else(|| Error::msg("no model: pass --model or run scripts/fetch-model.sh"))?
            .display()
            .to_string(),
    };
    let data = match &args.data {
        Some(d) => d.clone(),
        None => crate::paths::shared_dir()
            .map(|s| s.join("data/hh-rlhf-harmless-base/pairs.jsonl"))
            .filter(|p| p.is_file())
            .ok_or_else(|| Error::msg("no data: pass --data FILE"))?
            .display()
            .to_string(),
    };
    let out = std::env::temp_dir().join(format!("prefer-bench-{}", std::process::id()));
    crate::util::create_dir_all(&out)?;
    // Only the pairs the timed steps use (plus spares for rows the data layer rejects), so a
    // precomputed reference costs one pass over them, not over the whole file.
    let need = (args.steps + 1) * args.batch_size;
    let text = crate::util::read_to_string(std::path::Path::new(&data))?;
    let subset: Vec<&str> = text.lines().take(need + 16).collect();
    let data_subset = out.join("pairs.jsonl");
    std::fs::write(&data_subset, subset.join("\n")).map_err(|e| Error::io(&data_subset, e))?;
    let cfg = TrainConfig {
        model_name_or_path: model.clone(),
        train_file: data_subset.display().to_string(),
        output_dir: out.display().to_string(),
        per_device_train_batch_size: args.batch_size,
        per_device_eval_batch_size: args.batch_size,
        max_length: args.max_length,
        max_prompt_length: args.max_prompt_length,
        max_steps: (args.steps + 1) as i64,
        learning_rate: 1e-6,
        shuffle: false,
        skip_invalid: true,
        precompute_ref_log_probs: args.precompute_ref_log_probs,
        ref_log_probs_cache_dir: out.join("cache").display().to_string(),
        disable_tqdm: true,
        ..TrainConfig::default()
    };
    cfg.validate()?;
    let threads = candle_core::utils::get_num_threads();
    let mut tr = Trainer::new(&cfg)?;
    let params = tr.policy.transformer.cfg.num_params() as f64;
    let warm = tr.step()?;
    eprintln!("warm-up step: {:.2} s, loss {:.4}", warm.seconds, warm.metrics["loss"]);
    let mut secs = Vec::new();
    let mut tokens = 0usize;
    let mut first_loss = None;
    for i in 0..args.steps {
        let r = tr.step()?;
        eprintln!(
            "step {}: {:.2} s, {} tokens, loss {:.6}",
            i + 1,
            r.seconds,
            r.tokens,
            r.metrics["loss"]
        );
        first_loss.get_or_insert(r.metrics["loss"]);
        secs.push(r.seconds);
        tokens += r.tokens;
    }
    let total: f64 = secs.iter().sum();
    let mut sorted = secs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let live_ref = !args.precompute_ref_log_probs;
    let flops = (6.0 + if live_ref { 2.0 } else { 0.0 }) * params * tokens as f64;
    let achieved = flops / total / 1e9;
    let peak = crate::util::peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    let mm_big = matmul_gflops(2048, 2048, 2048)?;
    let h = tr.policy.transformer.cfg.hidden_size;
    let mm_model = matmul_gflops(512, h, tr.policy.transformer.cfg.intermediate_size)?;
    let _ = std::fs::remove_dir_all(&out);
    let v = serde_json::json!({
        "model": model, "threads": threads, "batch_pairs": args.batch_size, "max_length": args.max_length,
        "reference": if live_ref { "live" } else { "precomputed" },
        "s_per_step_median": median, "tokens_per_second": tokens as f64 / total,
        "pairs_per_second": (args.steps * args.batch_size) as f64 / total,
        "peak_rss_gib": peak, "gflops_achieved": achieved,
        "matmul_gflops_2048": mm_big, "matmul_gflops_model_shape": mm_model,
    });
    if args.json {
        println!("{v}");
    } else {
        println!("prefer bench dpo: {model}");
        println!(
            "  threads {threads}, batch {} pairs, max_length {}, reference {}",
            args.batch_size,
            args.max_length,
            if live_ref { "live" } else { "precomputed" }
        );
        println!("  s/step (median of {})        {median:.2}", args.steps);
        println!("  real tokens / s              {:.0}", tokens as f64 / total);
        println!(
            "  pairs / s                    {:.3}",
            (args.steps * args.batch_size) as f64 / total
        );
        println!("  peak RSS                     {peak:.2} GiB");
        println!(
            "  achieved GFLOP/s             {achieved:.1}  ((6{}) x params x tokens / time)",
            if live_ref { "+2" } else { "" }
        );
        println!(
            "  machine f32 matmul GFLOP/s   {mm_big:.1} (2048^3), {mm_model:.1} (512x{h}x{})",
            tr.policy.transformer.cfg.intermediate_size
        );
    }
    Ok(())
}
