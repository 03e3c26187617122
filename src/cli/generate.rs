//! `prefer generate`: sample completions of a file of prompts (KV cache, each prompt computed
//! once for all its samples), one JSON line per completion.

use super::*;
use prefer::sample::{sample, SamplingParams};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The model: an HF directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter (a PEFT directory: adapter_config.json + adapter_model.safetensors) to
    /// put on --model. A PEFT directory given as --model itself loads the base it names.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Prompts, JSONL: `prompt` as a string (used as is) or as {role, content} messages
    /// (rendered with the chat template, generation prompt added).
    #[arg(long)]
    pub prompts: PathBuf,
    /// The column holding the prompt.
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    /// Render string prompts as the user turn of the chat template.
    #[arg(long)]
    pub chat: bool,
    /// Where the completions go (JSONL: prompt_index, completion, completion_ids, logprobs,
    /// finish_reason).
    #[arg(long)]
    pub out: PathBuf,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_generations: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (1 = all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one (0 = none).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f64,
    /// Penalise tokens already in the prompt or completion (1 = none), as transformers does.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Tokens generated at most per completion.
    #[arg(long, default_value_t = 256)]
    pub max_completion_length: usize,
    /// A string that ends a completion (repeatable); the text stops before it.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Seed: the same seed draws the same completions.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Decode in bf16: the weight matrices read as bf16, half the bytes per token; on CPUs with
    /// AMX or AMD's AVX512-BF16 packed into tiles, with the activations rounded to bf16 too.
    /// Samples the bf16 model.
    #[arg(long)]
    pub bf16_weights: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let m = model::load::load_with_adapter(&args.model, args.adapter.as_deref(), DType::F32, &Device::Cpu)?;
    let tok = &m.tokenizer;
    let prompts = prefer::data::prompts::load_prompts(
        &args.prompts,
        tok,
        &prefer::data::prompts::PromptField {
            name: args.prompt_field.clone(),
            chat: args.chat,
        },
        Some(m.transformer.cfg.max_position_embeddings).filter(|&n| n > 0),
        args.max_completion_length,
    )?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        max_completion_length: args.max_completion_length,
        stop_tokens: vec![tok.eos_id],
        bf16_weights: args.bf16_weights,
    };
    if !(args.top_p > 0.0 && args.top_p <= 1.0) || args.temperature < 0.0 || args.num_generations == 0 {
        bail!("--top-p must be in (0, 1], --temperature ≥ 0 and --num-generations ≥ 1");
    }
    let text_of = |ids: &[u32]| tok.decode(ids, true);
    let stop = |ids: &[u32]| -> bool {
        !args.stop.is_empty() && text_of(ids).is_ok_and(|t| args.stop.iter().any(|s| t.contains(s.as_str())))
    };
    let total = prompts.len() * args.num_generations * args.max_completion_length;
    let pb = prefer::util::progress_bar(total, false);
    pb.set_prefix("generate");
    let t0 = std::time::Instant::now();
    let mut tokens = 0usize;
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let mut progress = |n: usize| {
        tokens += n;
        pb.inc(n as u64);
        pb.set_message(format!("{:.1} tokens/s", tokens as f64 / t0.elapsed().as_secs_f64()));
    };
    let comps = sample(
        &m.transformer,
        &ids,
        args.num_generations,
        &params,
        args.seed,
        &stop,
        &mut progress,
    )?;
    let mut lines = Vec::with_capacity(comps.len());
    for c in comps {
        let mut text = text_of(&c.ids)?;
        if let Some(cut) = args.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
        lines.push(
            json!({
                "prompt_index": c.prompt_index,
                "sample_index": c.sample_index,
                "completion": text,
                "completion_ids": c.ids,
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
            })
            .to_string(),
        );
    }
    pb.finish_and_clear();
    write_lines(&args.out, &lines)?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} completions of {} prompts to {}: {tokens} tokens in {secs:.1} s ({:.1} tokens/s)",
        lines.len(),
        prompts.len(),
        args.out.display(),
        tokens as f64 / secs
    );
    Ok(())
}
