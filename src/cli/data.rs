//! `prefer data validate | inspect | convert | corrupt | reward-augment | make-arithmetic`.

use super::*;

/// The data file a `prefer data` command reads: `--data FILE` (a bare FILE, the old form, still
/// works).
#[derive(clap::Args, Clone, Debug)]
pub struct InputFile {
    /// The data file: JSONL, a JSON array, Parquet, or a `datasets` folder.
    #[arg(long = "data", value_name = "FILE", required_unless_present = "file")]
    data: Option<PathBuf>,
    #[arg(hide = true, value_name = "FILE", conflicts_with = "data")]
    file: Option<PathBuf>,
}

impl InputFile {
    fn path(self) -> PathBuf {
        self.data.or(self.file).expect("clap requires --data or FILE")
    }
}

#[derive(Subcommand)]
pub enum DataCmd {
    /// Validate a preference file: every bad row with file:line:field; exit code 1 if any.
    Validate {
        #[command(flatten)]
        input: InputFile,
        /// Also tokenise with this model's tokenizer (checks lengths and prompt boundaries).
        #[arg(long)]
        model: Option<PathBuf>,
        /// With --model: the longest prompt + completion allowed, in tokens.
        #[arg(long, default_value_t = 1024)]
        max_length: usize,
        /// With --model: prompts are cut to this many tokens (0 = no cut).
        #[arg(long, default_value_t = 512)]
        max_prompt_length: usize,
        /// Print one JSON object (counts and every error) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Counts, how prompts were split, and token-length histograms.
    Inspect {
        #[command(flatten)]
        input: InputFile,
        /// Tokenizer to count tokens with (default: the SmolLM2 GGUF if present).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Print one JSON object (counts and token-length statistics) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// OpenAssistant message trees to ranked lists or pairs (conversational JSONL). Formerly
    /// `prefer data convert` (still accepted), renamed so it is not mistaken for `prefer convert`
    /// (GGUF to HF).
    #[command(alias = "convert")]
    Oasst {
        #[command(flatten)]
        input: InputFile,
        /// Source format (only `oasst`: message trees with ranked sibling replies).
        #[arg(long, default_value = "oasst")]
        from: String,
        /// `lists` (prompt, responses, ranks) or `pairs` (every better/worse combination).
        #[arg(long, default_value = "lists")]
        to: String,
        /// The JSONL file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Flip the labels of a seeded random fraction of pairs (marked `"flipped": true`): known
    /// noise for comparing robust methods.
    Corrupt {
        #[command(flatten)]
        input: InputFile,
        /// The fraction of pairs whose chosen and rejected are swapped.
        #[arg(long)]
        flip_rate: f64,
        /// Seed of the choice of pairs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The JSONL file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Reward-augmented relabeling (Zhang et al. 2024): each pair with chosen_score and
    /// rejected_score becomes two examples conditioned on a target score.
    RewardAugment {
        #[command(flatten)]
        input: InputFile,
        /// The JSONL file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the arithmetic preference set (correct sum chosen, near miss rejected) as
    /// train.jsonl / eval.jsonl, and its questions with their answers as train_prompts.jsonl /
    /// eval_prompts.jsonl (for online training and `prefer eval --prompts`).
    MakeArithmetic {
        /// The directory to write the four files to.
        #[arg(long)]
        out: PathBuf,
        /// Pairs (and prompts) in the train files.
        #[arg(long, default_value_t = 400)]
        train: usize,
        /// Pairs (and prompts) in the eval files.
        #[arg(long, default_value_t = 100)]
        eval: usize,
        /// Seed of the questions and near misses.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

pub fn run(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Validate {
            input,
            model,
            max_length,
            max_prompt_length,
            json,
        } => {
            let file = input.path();
            let tok = model.as_deref().map(model::load_tokenizer).transpose()?;
            let (pairs, mut report) = load_text_examples(&file, tok.as_ref(), true)?;
            if let Some(tok) = &tok {
                let opts = TokenizeOptions {
                    max_length: Some(max_length),
                    max_prompt_length: (max_prompt_length > 0).then_some(max_prompt_length),
                    truncation_mode: TruncationMode::KeepEnd,
                    columns: Vec::new(),
                };
                for p in &pairs {
                    if let Err(e) = prefer::data::tokenize::tokenize_example(p, tok, &opts, &file) {
                        report.skipped.push(e);
                    }
                }
            }
            let fmt = report.format.map(|f| f.to_string()).unwrap_or_else(|| "unknown".into());
            if json {
                println!(
                    "{}",
                    json!({
                        "file": file.display().to_string(),
                        "rows": report.records,
                        "format": fmt,
                        "valid": report.records - report.skipped.len(),
                        "invalid": report.skipped.len(),
                        "errors": report.skipped.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                    })
                );
                if !report.skipped.is_empty() {
                    std::process::exit(1);
                }
                return Ok(());
            }
            for e in &report.skipped {
                println!("{e}");
            }
            println!(
                "{}: {} rows, format {fmt}: {} valid, {} invalid",
                file.display(),
                report.records,
                report.records - report.skipped.len(),
                report.skipped.len()
            );
            if !report.skipped.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        DataCmd::Inspect { input, model, json } => {
            let file = input.path();
            let model = model
                .or_else(super::default_model)
                .context("no tokenizer: pass --model (an HF dir or .gguf)")?;
            let tok = model::load_tokenizer(&model)?;
            let opts = TokenizeOptions {
                max_length: None,
                max_prompt_length: None,
                truncation_mode: TruncationMode::KeepEnd,
                columns: Vec::new(),
            };
            let (text, _) = load_text_examples(&file, Some(&tok), true)?;
            let (pairs, report) = load_tokenized_examples(&file, &tok, &opts, true)?;
            let prompt_lengths: Vec<usize> = pairs.iter().map(|p| p.prompt_ids.len()).collect();
            let response_lengths: Vec<usize> = pairs.iter().flat_map(|p| p.responses.iter().map(|r| r.len())).collect();
            let longest: Vec<usize> = pairs
                .iter()
                .map(|p| p.prompt_ids.len() + p.responses.iter().map(Vec::len).max().unwrap_or(0))
                .collect();
            let prompt: usize = pairs.iter().map(|p| p.responses.len() * p.prompt_ids.len()).sum();
            let all: usize = pairs.iter().map(|p| p.num_tokens()).sum();
            let prompt_share = prompt as f64 / all.max(1) as f64;
            if json {
                let stats = |xs: &[usize]| {
                    json!({
                        "min": xs.iter().min().copied().unwrap_or(0),
                        "median": median(xs),
                        "mean": xs.iter().sum::<usize>() as f64 / xs.len().max(1) as f64,
                        "max": xs.iter().max().copied().unwrap_or(0),
                    })
                };
                println!(
                    "{}",
                    json!({
                        "file": file.display().to_string(),
                        "format": report.format.map(|f| f.to_string()),
                        "rows": report.records,
                        "usable": pairs.len(),
                        "invalid": report.skipped.len(),
                        "errors": report.skipped.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                        "prompt_tokens": stats(&prompt_lengths),
                        "response_tokens": stats(&response_lengths),
                        "prompt_and_longer_completion_tokens": stats(&longest),
                        "prompt_share": prompt_share,
                    })
                );
                return Ok(());
            }
            println!("file        {}", file.display());
            println!(
                "format      {}",
                report.format.map(|f| f.to_string()).unwrap_or_default()
            );
            println!(
                "rows        {} ({} usable, {} invalid)",
                report.records,
                pairs.len(),
                report.skipped.len()
            );
            for e in report.skipped.iter().take(5) {
                println!("  invalid   {e}");
            }
            if report.skipped.len() > 5 {
                println!(
                    "  ... and {} more (prefer data validate lists all)",
                    report.skipped.len() - 5
                );
            }
            if let Some(p) = text.first() {
                let show = |s: &str| {
                    let s: String = s
                        .chars()
                        .rev()
                        .take(120)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    format!("{s:?}")
                };
                println!("\nhow the first pair was split (line {}):", p.line);
                println!("  prompt    …{}", show(&p.prompt));
                for (k, r) in p.responses.iter().enumerate() {
                    let name = match (p.meta.shape, k) {
                        (Shape::Pairwise, 0) => "chosen".to_string(),
                        (Shape::Pairwise, _) => "rejected".to_string(),
                        (Shape::Unpaired, _) => format!("completion (label {:?})", p.meta.label.unwrap_or(false)),
                        (Shape::Ranked, k) => format!("response #{}", k + 1),
                    };
                    println!("  {name:<9} {:?}", r.chars().take(120).collect::<String>());
                }
                println!("  EOS appended to each completion: {:?}", tok.eos_token);
            }
            let hist = |name: &str, xs: Vec<usize>| {
                println!(
                    "\n{name} tokens: min {} / median {} / mean {:.0} / max {}",
                    xs.iter().min().unwrap_or(&0),
                    median(&xs),
                    xs.iter().sum::<usize>() as f64 / xs.len().max(1) as f64,
                    xs.iter().max().unwrap_or(&0)
                );
                print!("{}", prefer::util::text_histogram(&xs, 8, 40));
            };
            hist("prompt", prompt_lengths);
            hist("response", response_lengths);
            hist("prompt+longer completion", longest);
            println!("\nprompt share of a pair's tokens: {:.0}%", 100.0 * prompt_share);
            Ok(())
        }
        DataCmd::Oasst { input, from, to, out } => {
            let file = input.path();
            if from != "oasst" {
                bail!("--from {from}: only `oasst` (OpenAssistant message trees) is supported");
            }
            let target = match to.as_str() {
                "lists" => prefer::data::convert::OasstTarget::Lists,
                "pairs" => prefer::data::convert::OasstTarget::Pairs,
                other => bail!("--to {other}: use `lists` or `pairs`"),
            };
            let lines = prefer::data::convert::oasst_trees(&file, target)?;
            write_lines(&out, &lines)?;
            eprintln!("wrote {} ({} {to})", out.display(), lines.len());
            Ok(())
        }
        DataCmd::Corrupt {
            input,
            flip_rate,
            seed,
            out,
        } => {
            let file = input.path();
            let (lines, flipped) = prefer::data::convert::corrupt_labels(&file, flip_rate, seed)?;
            write_lines(&out, &lines)?;
            eprintln!("wrote {} ({flipped} of {} pairs flipped)", out.display(), lines.len());
            Ok(())
        }
        DataCmd::RewardAugment { input, out } => {
            let file = input.path();
            let lines = prefer::data::convert::reward_augment(&file)?;
            write_lines(&out, &lines)?;
            eprintln!("wrote {} ({} score-conditioned pairs)", out.display(), lines.len());
            Ok(())
        }
        DataCmd::MakeArithmetic { out, train, eval, seed } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let all = prefer::data::synthetic::arithmetic_pairs(train + eval, seed);
            let prompts = prefer::data::synthetic::arithmetic_prompts(train + eval, seed);
            for (name, lines, what) in [
                ("train.jsonl", &all[..train], "pairs"),
                ("eval.jsonl", &all[train..], "pairs"),
                ("train_prompts.jsonl", &prompts[..train], "prompts"),
                ("eval_prompts.jsonl", &prompts[train..], "prompts"),
            ] {
                let p = out.join(name);
                std::fs::write(&p, lines.join("\n") + "\n").with_context(|| format!("writing {}", p.display()))?;
                eprintln!("wrote {} ({} {what})", p.display(), lines.len());
            }
            Ok(())
        }
    }
}
