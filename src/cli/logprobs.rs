//! `prefer logprobs`: per-token log-probs of each text of a JSONL file.

use super::*;

#[derive(clap::Args)]
pub struct LogprobsArgs {
    /// The model: an HF directory, a .gguf file, or a PEFT adapter directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter (a PEFT directory: adapter_config.json + adapter_model.safetensors) to
    /// put on --model. A PEFT directory given as --model itself loads the base it names.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The texts: a JSONL file (or any data format prefer reads), one text per row.
    #[arg(long = "data", alias = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// The field holding the whole text to score (without --prompt-field).
    #[arg(long, default_value = "text")]
    pub field: String,
    /// Score only the completion: the prompt comes from this field...
    #[arg(long, requires = "completion_field")]
    pub prompt_field: Option<String>,
    /// ...and the scored completion from this one.
    #[arg(long, requires = "prompt_field")]
    pub completion_field: Option<String>,
}

pub fn run(args: LogprobsArgs) -> Result<()> {
    let LogprobsArgs {
        model,
        file,
        field,
        prompt_field,
        completion_field,
        adapter,
    } = args;
    let m = model::load::load_with_adapter(&model, adapter.as_deref(), DType::F32, &Device::Cpu)?;
    let tok = &m.tokenizer;
    let mut out = std::io::stdout().lock();
    for (line, v) in read_jsonl(&file)? {
        let (ids, start) = match (&prompt_field, &completion_field) {
            (Some(pf), Some(cf)) => {
                let p = str_field(&v, pf, &file, line)?;
                let c = str_field(&v, cf, &file, line)?;
                let pids = tok.encode(p, true)?;
                let ids = tok.encode(&format!("{p}{c}"), true)?;
                if ids.len() <= pids.len() || ids[..pids.len()] != pids[..] {
                    bail!(
                        "{}:{line}: field `{cf}`: prompt + completion does not tokenise with the prompt's tokens first",
                        file.display()
                    );
                }
                let n = pids.len();
                (ids, n)
            }
            _ => (tok.encode(str_field(&v, &field, &file, line)?, true)?, 1),
        };
        if ids.len() < 2 && start == 1 {
            writeln!(
                out,
                "{}",
                json!({"line": line, "tokens": [], "logprobs": [], "sum": 0.0})
            )?;
            continue;
        }
        let lps = model::logprobs::token_logprobs(&m.transformer, &ids, start)?;
        let pieces: Vec<String> = ids[start..]
            .iter()
            .map(|&i| tok.id_to_token(i).unwrap_or_default())
            .collect();
        let sum: f64 = lps.iter().map(|&x| x as f64).sum();
        writeln!(
            out,
            "{}",
            json!({"line": line, "ids": &ids[start..], "tokens": pieces, "logprobs": lps, "sum": sum, "mean": sum / lps.len() as f64})
        )?;
    }
    Ok(())
}
