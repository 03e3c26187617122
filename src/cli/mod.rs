//! The command-line interface: one file per subcommand, each an argument struct (clap derive)
//! and a `run` function. Shared here: how evaluation tools read a data file, JSONL helpers.

pub mod bench;
pub mod bench_generate;
pub mod bench_grpo;
pub mod compare_rewards;
pub mod convert;
pub mod data;
pub mod eval;
pub mod generate;
pub mod logprobs;
pub mod objectives;
pub mod pal;
pub mod score;
pub mod sweep;
pub mod tokenize;
pub mod train;

pub(crate) use anyhow::{bail, Context, Result};
pub(crate) use candle_core::{DType, Device};
pub(crate) use clap::Subcommand;
pub(crate) use prefer::config::TrainConfig;
pub(crate) use prefer::data::tokenize::load_text_examples;
pub(crate) use prefer::data::{load_tokenized_examples, Shape, TokenizeOptions, TruncationMode};
pub(crate) use prefer::model;
pub(crate) use prefer::tokenizer::Message;
pub(crate) use serde_json::{json, Value};
pub(crate) use std::io::Write;
pub(crate) use std::path::{Path, PathBuf};

/// The objective an evaluation reports: the evaluated model's run (its saved `loss_type`,
/// `loss_weights` and hyperparameters), with `beta` and `loss_type` overriding; TRL's defaults
/// (`sigmoid`, β = 0.1) for a model that prefer did not train. Says on stderr what it used.
pub fn run_objective(
    model: &Path,
    beta: Option<f64>,
    loss_type: Option<&str>,
) -> Result<prefer::objectives::Objective> {
    let (mut cfg, from) = match TrainConfig::of_trained_model(model) {
        Some((c, p)) => (c, Some(p)),
        None => (TrainConfig::default(), None),
    };
    if let Some(b) = beta {
        cfg.params.beta = b;
    }
    if let Some(l) = loss_type {
        cfg.loss_type = prefer::config::LossType::One(l.to_string());
        cfg.loss_weights = None;
    }
    let objective = prefer::objectives::build(&cfg.loss_type.names(), cfg.loss_weights.as_deref(), &cfg.params)?;
    eprintln!(
        "objective: {}, beta {}{}",
        objective.name(),
        cfg.params.beta,
        match &from {
            Some(p) => format!(" (the run's, from {}; --beta and --loss-type override)", p.display()),
            None => " (no run config beside the model: TRL's defaults unless --beta / --loss-type)".into(),
        }
    );
    Ok(objective)
}

/// The SmolLM2 GGUF where `scripts/fetch-model.sh` puts it (`models/` under the current
/// directory), or `$PREFER_SMOLLM2`: the default model of `prefer bench` and `prefer data inspect`.
pub fn default_model() -> Option<PathBuf> {
    std::env::var_os("PREFER_SMOLLM2")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf")))
        .filter(|p| p.is_file())
}

/// A benchmark's default data: `data/<rel>` under `$PREFER_SHARED` (a folder with the full
/// data files) when that is set, else the repository's slice of it, `tests/fixtures/<rel>`
/// (when run from a checkout); `None` if neither is there.
pub fn bench_data(rel: &str) -> Option<PathBuf> {
    match std::env::var_os("PREFER_SHARED") {
        Some(shared) => Some(PathBuf::from(shared).join("data").join(rel)),
        None => Some(PathBuf::from("tests/fixtures").join(rel)),
    }
    .filter(|p| p.is_file())
}

/// How the evaluation tools read and batch a data file.
#[derive(clap::Args, Clone, Debug)]
pub struct DataArgs {
    /// Examples per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Cut each prompt + completion to this many tokens (default: the evaluated run's
    /// max_length, else 1024).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Cut prompts to this many tokens, as in training; 0 = no limit (default: the evaluated
    /// run's max_prompt_length, else no limit).
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// Report and skip bad rows instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
}

impl DataArgs {
    /// How data is read for `model`: the run that trained it (its max_length,
    /// max_prompt_length, truncation_mode and column names, from run_config.json or a
    /// checkpoint's trainer_state.json), with --max-length / --max-prompt-length overriding;
    /// for any other model 1024 tokens, no prompt cut, prompts keeping their end.
    pub fn tokenize_options(&self, model: &Path) -> TokenizeOptions {
        let run = TrainConfig::of_trained_model(model);
        let mut o = match &run {
            Some((c, _)) => c.tokenize_options(),
            None => TokenizeOptions {
                max_length: Some(1024),
                max_prompt_length: None,
                truncation_mode: TruncationMode::KeepEnd,
                columns: Vec::new(),
            },
        };
        if let Some(l) = self.max_length {
            o.max_length = Some(l);
        }
        if let Some(p) = self.max_prompt_length {
            o.max_prompt_length = (p > 0).then_some(p);
        }
        if let Some((_, from)) = &run {
            eprintln!(
                "data: max_length {}, max_prompt_length {} (the run's, from {}; --max-length and --max-prompt-length override)",
                o.max_length.map(|l| l.to_string()).unwrap_or_else(|| "none".into()),
                o.max_prompt_length.map(|l| l.to_string()).unwrap_or_else(|| "none".into()),
                from.display()
            );
        }
        o
    }
}

pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>> {
    let mut out = vec![];
    for rec in prefer::data::jsonl::read_records(path)? {
        let r = rec?;
        out.push((r.line, Value::Object(r.obj)));
    }
    Ok(out)
}

pub fn str_field<'a>(v: &'a Value, field: &str, file: &Path, line: usize) -> Result<&'a str> {
    v.get(field).and_then(Value::as_str).with_context(|| {
        format!(
            "{}:{line}: field `{field}`: missing or not a string (choose the field with --field)",
            file.display()
        )
    })
}

pub fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

pub fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut body = lines.join("\n");
    body.push('\n');
    prefer::util::write_atomic(path, body.as_bytes())?;
    Ok(())
}

pub fn median(xs: &[usize]) -> usize {
    let mut v = xs.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or(0)
}
