//! `prefer bench generate`: the sampler's tokens/s on a real model, for one stream (batch 1)
//! and for a GRPO-shaped batch (prompts × generations, each prompt computed once for its
//! group), next to what the machine allows: its memory bandwidth (the bound of batch-1 decoding,
//! which reads every weight once per token) and its f32 matmul throughput (the bound of a large
//! batch). Completions run to the full length (no stop token), so every run generates the same
//! number of tokens.

use super::*;
use prefer::error::Error;
use prefer::sample::{sample, SamplingParams};
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateBenchArgs {
    /// Model (default: models/SmolLM2-135M-Instruct.Q4_1.gguf or $PREFER_SMOLLM2).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// GSM8K-style rows with `question` (default: data/gsm8k/train.jsonl under $PREFER_SHARED
    /// when set, else the checkout's tests/fixtures/gsm8k/train.jsonl).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Prompts of the GRPO-shaped batch.
    #[arg(long, default_value_t = 4)]
    pub prompts: usize,
    /// Completions per prompt of the GRPO-shaped batch.
    #[arg(long, default_value_t = 8)]
    pub num_generations: usize,
    /// New tokens per completion.
    #[arg(long, default_value_t = 128)]
    pub max_completion_length: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Decode in bf16 (`prefer generate --bf16-weights`: bf16 tiles where the CPU has AMX or
    /// AMD's AVX512-BF16).
    #[arg(long)]
    pub bf16_weights: bool,
}

/// Best-of-3 read bandwidth in GB/s: summing a 512 MiB buffer of f32 on every thread.
fn read_bandwidth_gbs() -> f64 {
    use rayon::prelude::*;
    let v = vec![1.0f32; 128 << 20];
    let mut best = f64::MAX;
    let mut sink = 0.0f32;
    for _ in 0..3 {
        let t = Instant::now();
        sink += v
            .par_chunks(1 << 16)
            .map(|c| {
                // sixteen independent sums, so the loop vectorises and memory is the bound
                let mut acc = [0f32; 16];
                for x in c.chunks_exact(16) {
                    for (a, b) in acc.iter_mut().zip(x) {
                        *a += b;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum::<f32>();
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (v.len() * 4) as f64 / best / 1e9
}

pub fn generate(args: &GenerateBenchArgs) -> Result<()> {
    let model = args
        .model
        .clone()
        .or_else(super::default_model)
        .ok_or_else(|| Error::msg("no model: pass --model or run scripts/fetch-model.sh"))?;
    let data = match args.data.clone() {
        Some(d) => d,
        None => super::bench_data("gsm8k/train.jsonl")
            .ok_or_else(|| Error::msg("no data: pass --data FILE (rows with `question`), or set PREFER_SHARED"))?,
    };
    let m = prefer::model::load(&model, DType::F32, &Device::Cpu)?;
    let text = std::fs::read_to_string(&data).with_context(|| format!("reading {}", data.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().take(args.prompts.max(1)).enumerate() {
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}:{}", data.display(), i + 1))?;
        let q = v["question"].as_str().unwrap_or_default().to_string();
        let chat = m.tokenizer.apply_chat_template(
            &[prefer::tokenizer::Message {
                role: "user".into(),
                content: q,
            }],
            true,
        )?;
        prompts.push(m.tokenizer.encode(&chat, true)?);
    }
    let params = SamplingParams {
        temperature: 1.0,
        max_completion_length: args.max_completion_length,
        stop_tokens: vec![],
        bf16_weights: args.bf16_weights,
        ..Default::default()
    };
    let run = |ps: &[Vec<u32>], g: usize, params: &SamplingParams| -> Result<f64> {
        let t = Instant::now();
        sample(&m.transformer, ps, g, params, 7, &|_| false, &mut |_| {})?;
        Ok(t.elapsed().as_secs_f64())
    };
    // batch 1: the prompt once (prefill and one token), then the whole completion
    let one = &prompts[..1];
    run(
        one,
        1,
        &SamplingParams {
            max_completion_length: 8,
            ..params.clone()
        },
    )?; // warm-up
    let prefill = run(
        one,
        1,
        &SamplingParams {
            max_completion_length: 1,
            ..params.clone()
        },
    )?;
    let whole = run(one, 1, &params)?;
    let n = args.max_completion_length as f64;
    let decode_b1 = (n - 1.0) / (whole - prefill).max(1e-9);
    let batch = run(&prompts, args.num_generations, &params)?;
    let total = (prompts.len() * args.num_generations) as f64 * n;
    let params_count: usize = m.transformer.params().iter().map(|(_, t)| t.elem_count()).sum();
    let weight_bytes = params_count as f64 * 4.0;
    let bw = read_bandwidth_gbs();
    let mm = super::bench::matmul_gflops(1024, m.transformer.cfg.hidden_size, 2048)?;
    // what the products of decoding read: f32 weights; bf16 copies widened on the fly; or bf16
    // tiles for AMX or AVX512-BF16 (activations rounded to bf16 too)
    let decode_weights = match (args.bf16_weights, prefer::model::kernels::CpuPath::fast_bf16()) {
        (false, _) => "f32",
        (true, None) => "bf16 (widened to f32 in registers)",
        (true, Some(prefer::model::kernels::CpuPath::Amx)) => "bf16 (AMX tiles, bf16 activations)",
        (true, Some(_)) => "bf16 (tiles multiplied with vdpbf16ps, bf16 activations)",
    };
    let rec = json!({
        "model": model.display().to_string(),
        "threads": candle_core::utils::get_num_threads(),
        "max_completion_length": args.max_completion_length,
        "decode_weights": decode_weights,
        "batch1_decode_tokens_per_second": decode_b1,
        "batch1_end_to_end_tokens_per_second": n / whole,
        "prompts": prompts.len(),
        "num_generations": args.num_generations,
        "batch_tokens_per_second": total / batch,
        "batch_seconds": batch,
        "weights_gib_f32": weight_bytes / (1u64 << 30) as f64,
        "read_bandwidth_gbs": bw,
        "bandwidth_bound_batch1_tokens_per_second": bw * 1e9 / weight_bytes,
        "matmul_gflops_f32": mm,
        "matmul_bound_tokens_per_second": mm * 1e9 / (2.0 * params_count as f64),
    });
    if args.json {
        println!("{rec}");
        return Ok(());
    }
    let f = |k: &str| rec[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "generation on {} (f32 weights {:.2} GiB; decoding from {decode_weights}), {} new tokens per completion",
        model.display(),
        f("weights_gib_f32"),
        args.max_completion_length
    );
    println!(
        "batch 1, decode tokens/s             {:.1}",
        f("batch1_decode_tokens_per_second")
    );
    println!(
        "batch 1, with the prompt, tokens/s   {:.1}",
        f("batch1_end_to_end_tokens_per_second")
    );
    println!(
        "{} prompts × {} generations, tokens/s  {:.1}  ({:.1} s)",
        prompts.len(),
        args.num_generations,
        f("batch_tokens_per_second"),
        batch
    );
    println!(
        "machine: read bandwidth {:.1} GB/s -> batch-1 bound {:.1} tokens/s (f32 weights); f32 matmul {:.1} GFLOP/s -> {:.0} tokens/s",
        bw,
        f("bandwidth_bound_batch1_tokens_per_second"),
        mm,
        f("matmul_bound_tokens_per_second")
    );
    Ok(())
}
