//! `prefer bench dpo`: DPO training steps on a real model, timed, next to the machine's own
//! f32 matmul throughput measured by the same process.

use candle_core::{Device, Tensor};
use prefer::config::TrainConfig;
use prefer::error::{Error, Result};
use prefer::train::Trainer;
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
    /// Preference pairs (default: data/hh-rlhf-harmless-base/pairs.jsonl under $PREFER_SHARED, else ../shared).
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
    /// bf16 matmuls with f32 sums (TRL's `bf16 = true`): AMX tiles where the CPU has them.
    #[arg(long)]
    pub bf16: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Figures to compare against: a JSON object or JSON lines, each with at least
    /// `s_per_step_median` (and optionally `peak_rss_gib`, `reference`, `dtype`, `batch_pairs`,
    /// `max_length`, `name`). The record whose configuration matches this run is used; the
    /// output of `--json` is such a record. benches/trl-1.16-2vcpu.jsonl holds TRL's figures.
    #[arg(long)]
    pub compare_file: Option<String>,
}

/// The records of a compare file: one JSON object, or JSON lines (`//` lines are comments).
/// Each must be an object with a numeric `s_per_step_median`; a bad line is named.
fn read_records(file: &str) -> Result<Vec<serde_json::Value>> {
    let path = std::path::Path::new(file);
    let text = prefer::util::read_to_string(path)?;
    let mut records = Vec::new();
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v @ serde_json::Value::Object(_)) => records.push((1, v)),
        _ => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() || line.trim_start().starts_with("//") {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| Error::msg(format!("{file}:{}: not a JSON object: {e}", i + 1)))?;
                records.push((i + 1, v));
            }
        }
    }
    for (line, r) in &records {
        if !r.is_object() {
            return Err(Error::msg(format!("{file}:{line}: expected a JSON object")));
        }
        if r.get("s_per_step_median").and_then(|v| v.as_f64()).is_none() {
            return Err(Error::msg(format!(
                "{file}:{line}: field `s_per_step_median` (a number) is missing"
            )));
        }
    }
    Ok(records.into_iter().map(|(_, r)| r).collect())
}

/// The configuration keys a compare record must agree on with the run (when it has them).
const MATCH_KEYS: [&str; 5] = [
    "reference",
    "dtype",
    "batch_pairs",
    "max_length",
    "gradient_checkpointing",
];

/// The first record whose configuration matches `run`; a record without a key matches any value.
fn matching_record<'a>(records: &'a [serde_json::Value], run: &serde_json::Value) -> Option<&'a serde_json::Value> {
    records.iter().find(|r| {
        MATCH_KEYS
            .iter()
            .all(|k| r.get(k).is_none_or(|v| Some(v) == run.get(k)))
    })
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

/// Best-of-3 GFLOP/s of prefer's bf16 matmul (`bf16 = true`: AMX tiles where the CPU has them),
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

pub fn dpo(args: &DpoBenchArgs) -> Result<()> {
    // a bad compare file fails before the run, not after it
    let records = args.compare_file.as_deref().map(read_records).transpose()?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => super::default_model()
            .ok_or_else(|| Error::msg("no model: pass --model or run scripts/fetch-model.sh"))?
            .display()
            .to_string(),
    };
    let data = match &args.data {
        Some(d) => d.clone(),
        None => Some(super::shared_data("data/hh-rlhf-harmless-base/pairs.jsonl"))
            .filter(|p| p.is_file())
            .ok_or_else(|| Error::msg("no data: pass --data FILE"))?
            .display()
            .to_string(),
    };
    let out = std::env::temp_dir().join(format!("prefer-bench-{}", std::process::id()));
    prefer::util::create_dir_all(&out)?;
    // Only the pairs the timed steps use (plus spares for rows the data layer rejects), so a
    // precomputed reference costs one pass over them, not over the whole file.
    let need = (args.steps + 1) * args.batch_size;
    let text = prefer::util::read_to_string(std::path::Path::new(&data))?;
    let data_subset = out.join("pairs.jsonl");
    let (mut max_length, mut max_prompt_length) = (args.max_length, args.max_prompt_length);
    let subset = match args.synthetic_length {
        None => text.lines().take(need + 16).collect::<Vec<_>>().join("\n"),
        Some(n) => {
            let tok = prefer::model::load_tokenizer(std::path::Path::new(&model))?;
            let (rows, p) = synthetic_pairs(&text, &tok, n, need + 4)?;
            (max_length, max_prompt_length) = (n + 32, p + 16);
            rows
        }
    };
    std::fs::write(&data_subset, subset).map_err(|e| Error::io(&data_subset, e))?;
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
        bf16: args.bf16,
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
    let mut first_loss = None;
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
        first_loss.get_or_insert(r.metrics["loss"]);
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
        "s_per_step_median": median, "tokens_per_second": tokens as f64 / total,
        "pairs_per_second": (args.steps * args.batch_size) as f64 / total,
        "dtype": if args.bf16 { "bf16" } else { "f32" }, "bf16_amx": args.bf16 && prefer::model::kernels::matmul::amx_available(), "share_prompt": !args.no_share_prompt, "padding_free": !args.no_padding_free, "fused_kernels": !args.no_fused_kernels,
        "gradient_checkpointing": args.gradient_checkpointing,
        "peak_rss_gib": peak, "gflops_achieved": achieved, "gflops_trl_equivalent": equivalent,
        "computed_positions_per_second": positions as f64 / total,
        "phase_seconds_per_step": phase_secs.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v / args.steps as f64))).collect::<serde_json::Map<_, _>>(),
        "matmul_gflops_2048": mm_big, "matmul_gflops_2048_bf16": mm_bf16, "matmul_gflops_model_shape": mm_model,
    });
    let compare = records.as_deref().and_then(|r| matching_record(r, &v));
    if args.json {
        println!("{v}");
    } else {
        println!("prefer bench dpo: {model}");
        println!(
            "  threads {threads}, batch {} pairs, max_length {}, reference {}, matmuls {}",
            args.batch_size,
            args.max_length,
            if live_ref { "live" } else { "precomputed" },
            if args.bf16 { "bf16" } else { "f32" }
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
            if prefer::model::kernels::matmul::amx_available() {
                "AMX tiles"
            } else {
                "no AMX here: rounded operands through the f32 GEMM"
            }
        );
    }
    if let (Some(f), None) = (&args.compare_file, compare) {
        let want: Vec<String> = MATCH_KEYS.iter().map(|k| format!("{k} = {}", v[k])).collect();
        eprintln!(
            "no record in {f} matches this run ({}); add one to compare",
            want.join(", ")
        );
    }
    if let Some(c) = compare {
        let name = c.get("name").and_then(|n| n.as_str()).unwrap_or("compared");
        let theirs = c["s_per_step_median"].as_f64().unwrap_or(f64::NAN);
        println!("vs {name}: {theirs:.2} s/step");
        println!("  speed-up (their s/step / ours)   {:.2}x", theirs / median);
        if let Some(rss) = c.get("peak_rss_gib").and_then(|x| x.as_f64()) {
            println!(
                "  memory (our peak RSS / theirs)   {:.2}  ({peak:.2} vs {rss:.2} GiB)",
                peak / rss
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{matching_record, read_records};
    use prefer::error::Result;
    use serde_json::json;

    /// The matching record of `file` for `run`, or an error naming what failed.
    fn comparison_record(file: &str, run: &serde_json::Value) -> Result<serde_json::Value> {
        let records = read_records(file)?;
        matching_record(&records, run)
            .cloned()
            .ok_or_else(|| prefer::error::Error::msg(format!("{file}: no record matches {run}")))
    }

    #[test]
    fn compare_file_picks_the_matching_record_and_names_bad_lines() {
        let dir = prefer::testing::scratch_dir("bench-compare");
        let f = dir.join("figures.jsonl");
        std::fs::write(
            &f,
            "// a comment\n{\"reference\": \"live\", \"s_per_step_median\": 6.5}\n\
             {\"reference\": \"precomputed\", \"dtype\": \"f32\", \"s_per_step_median\": 5.4}\n",
        )
        .unwrap();
        let run = json!({"reference": "precomputed", "dtype": "f32", "batch_pairs": 2, "max_length": 256});
        let r = comparison_record(f.to_str().unwrap(), &run).unwrap();
        assert_eq!(r["s_per_step_median"], json!(5.4));
        // no record for bf16
        let bf16 = json!({"reference": "precomputed", "dtype": "bf16", "batch_pairs": 2, "max_length": 256});
        let e = comparison_record(f.to_str().unwrap(), &bf16).unwrap_err().to_string();
        assert!(e.contains("no record matches") && e.contains("bf16"), "{e}");
        // a record without the figure is named by line
        std::fs::write(&f, "{\"reference\": \"live\"}\n").unwrap();
        let e = comparison_record(f.to_str().unwrap(), &run).unwrap_err().to_string();
        assert!(e.contains(":1:") && e.contains("s_per_step_median"), "{e}");
        // a single JSON object (the output of --json) works as a file
        std::fs::write(&f, run.to_string().replace('}', ", \"s_per_step_median\": 3.0}")).unwrap();
        assert_eq!(
            comparison_record(f.to_str().unwrap(), &run).unwrap()["s_per_step_median"],
            json!(3.0)
        );
        // the shipped TRL figures: gradient checkpointing is matched like the other options
        let trl = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/trl-1.16-2vcpu.jsonl");
        let live = |gc: bool| json!({"reference": "live", "dtype": "f32", "batch_pairs": 2, "max_length": 256, "gradient_checkpointing": gc});
        assert_eq!(
            comparison_record(trl, &live(false)).unwrap()["s_per_step_median"],
            json!(6.5)
        );
        assert_eq!(
            comparison_record(trl, &live(true)).unwrap()["s_per_step_median"],
            json!(7.6)
        );
    }
}
