//! `prefer data validate | inspect | convert | corrupt | reward-augment | make-arithmetic`.

use super::*;

#[derive(Subcommand)]
pub enum DataCmd {
    /// Validate a preference file: every bad row with file:line:field; exit code 1 if any.
    Validate {
        file: PathBuf,
        /// Also tokenise with this model's tokenizer (checks lengths and prompt boundaries).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 1024)]
        max_length: usize,
        #[arg(long, default_value_t = 512)]
        max_prompt_length: usize,
    },
    /// Counts, how prompts were split, and token-length histograms.
    Inspect {
        file: PathBuf,
        /// Tokenizer to count tokens with (default: the SmolLM2 GGUF if present).
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// OpenAssistant message trees to ranked lists or pairs (conversational JSONL). Formerly
    /// `prefer data convert` (still accepted), renamed so it is not mistaken for `prefer convert`
    /// (GGUF to HF).
    #[command(alias = "convert")]
    Oasst {
        file: PathBuf,
        /// Source format (only `oasst`: message trees with ranked sibling replies).
        #[arg(long, default_value = "oasst")]
        from: String,
        /// `lists` (prompt, responses, ranks) or `pairs` (every better/worse combination).
        #[arg(long, default_value = "lists")]
        to: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Flip the labels of a seeded random fraction of pairs (marked `"flipped": true`): known
    /// noise for comparing robust methods.
    Corrupt {
        file: PathBuf,
        #[arg(long)]
        flip_rate: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Reward-augmented relabeling (Zhang et al. 2024): each pair with chosen_score and
    /// rejected_score becomes two examples conditioned on a target score.
    RewardAugment {
        file: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the arithmetic preference set (correct sum chosen, near miss rejected) as
    /// train.jsonl / eval.jsonl, and its questions with their answers as train_prompts.jsonl /
    /// eval_prompts.jsonl (for online training and `prefer eval --prompts`).
    MakeArithmetic {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 400)]
        train: usize,
        #[arg(long, default_value_t = 100)]
        eval: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

pub fn run(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Validate {
            file,
            model,
            max_length,
            max_prompt_length,
        } => {
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
            for e in &report.skipped {
                println!("{e}");
            }
            let fmt = report.format.map(|f| f.to_string()).unwrap_or_else(|| "unknown".into());
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
        DataCmd::Inspect { file, model } => {
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
            hist("prompt", pairs.iter().map(|p| p.prompt_ids.len()).collect());
            hist(
                "response",
                pairs.iter().flat_map(|p| p.responses.iter().map(|r| r.len())).collect(),
            );
            hist(
                "prompt+longer completion",
                pairs
                    .iter()
                    .map(|p| p.prompt_ids.len() + p.responses.iter().map(Vec::len).max().unwrap_or(0))
                    .collect(),
            );
            let prompt: usize = pairs.iter().map(|p| p.responses.len() * p.prompt_ids.len()).sum();
            let all: usize = pairs.iter().map(|p| p.num_tokens()).sum();
            println!(
                "\nprompt share of a pair's tokens: {:.0}%",
                100.0 * prompt as f64 / all.max(1) as f64
            );
            Ok(())
        }
        DataCmd::Oasst { file, from, to, out } => {
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
            file,
            flip_rate,
            seed,
            out,
        } => {
            let (lines, flipped) = prefer::data::convert::corrupt_labels(&file, flip_rate, seed)?;
            write_lines(&out, &lines)?;
            eprintln!("wrote {} ({flipped} of {} pairs flipped)", out.display(), lines.len());
            Ok(())
        }
        DataCmd::RewardAugment { file, out } => {
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
