//! `prefer`: the command-line interface.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};
use prefer::config::TrainConfig;
use prefer::data::tokenize::load_text_examples;
use prefer::data::{load_tokenized_examples, Shape, TokenizeOptions, TruncationMode};
use prefer::model;
use prefer::tokenizer::Message;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "prefer",
    version,
    about = "Align language models with preferences (DPO and friends) on real models, on CPU."
)]
struct Cli {
    /// CPU threads for tensor ops (0 = all cores). Same as RAYON_NUM_THREADS.
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model on preference pairs (DPO). Writes checkpoints, metrics.jsonl and the final
    /// model (HF layout) to output_dir.
    Train {
        /// The run's TOML config (keys as in TRL's DPOConfig; see --help-config).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config key, e.g. --set beta=0.2 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print every config key with its default and meaning.
        #[arg(long)]
        help_config: bool,
    },
    /// Reward accuracy, margin and ranking accuracy of a model on preference pairs.
    Eval {
        /// The policy: an HF directory or a .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// The reference for implicit rewards (omit for ranking accuracy only).
        #[arg(long = "ref")]
        reference: Option<PathBuf>,
        /// Preference pairs (JSONL).
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        /// True preference probability of every pair, for the idealised ranking accuracy
        /// (rows' `preference_strength` takes precedence).
        #[arg(long)]
        alpha: Option<f64>,
        #[command(flatten)]
        read: DataArgs,
        /// Also answer each prompt greedily and report how often the reply starts with the
        /// chosen completion (generation accuracy).
        #[arg(long)]
        generate: bool,
        /// --model is a run's output_dir: evaluate every checkpoint-N (table, eval_trajectory.json).
        #[arg(long)]
        checkpoints: bool,
        /// Write PNG plots here (reward histogram; with --checkpoints, each metric over steps).
        #[arg(long)]
        plots: Option<PathBuf>,
        /// Factor-level analysis: how labels and the model's preferences line up with response
        /// length, list formatting, refusal phrases and question echoing.
        #[arg(long)]
        factors: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check, inspect or make preference data.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// PAL pluralistic reward model (ideal-point mixture over frozen embeddings, Chen et al.
    /// 2025): fit K prototypes and each annotator's mixture, or fit new annotators from a few pairs.
    Pal {
        #[command(subcommand)]
        cmd: PalCmd,
    },
    /// Convert a GGUF model to an HF checkpoint directory (dequantised, f32).
    Convert {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Token ids and pieces of each text of a JSONL file (one JSON line out per line in).
    Tokenize {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        file: PathBuf,
        /// The field holding the text (a string, or a list of messages with --chat).
        #[arg(long, default_value = "text")]
        field: String,
        /// Render the field (a list of {role, content} messages) with the chat template first.
        #[arg(long)]
        chat: bool,
    },
    /// Scores of every response of a preference file under a reward model (JSONL to stdout:
    /// `scores` per line, plus `chosen_score`/`rejected_score` for pairs).
    Score {
        /// A reward model (HF directory with score.weight, as `prefer train` with task = "reward" writes).
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[command(flatten)]
        read: DataArgs,
    },
    /// Per-token log-probs of each text of a JSONL file under a model (JSONL to stdout).
    Logprobs {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value = "text")]
        field: String,
        /// Score only the completion: the prompt comes from this field...
        #[arg(long, requires = "completion_field")]
        prompt_field: Option<String>,
        /// ...and the scored completion from this one.
        #[arg(long, requires = "prompt_field")]
        completion_field: Option<String>,
    },
    /// Implicit vs explicit reward generalisation (DPORM vs EXRM, Lin et al. 2024): the accuracy
    /// of a DPO model's implicit reward and of a reward model on the same in-distribution and
    /// shifted pairs, one table.
    CompareRewards {
        /// The DPO-trained policy.
        #[arg(long)]
        dpo: PathBuf,
        /// Its reference model.
        #[arg(long = "ref")]
        reference: PathBuf,
        /// The reward model.
        #[arg(long)]
        rm: PathBuf,
        /// In-distribution held-out pairs.
        #[arg(long)]
        data: PathBuf,
        /// Distribution-shifted pairs.
        #[arg(long)]
        shifted: Option<PathBuf>,
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        #[command(flatten)]
        read: DataArgs,
        #[arg(long)]
        json: bool,
    },
    /// Run several objectives on the same model, data and budget; writes a table (sweep.md,
    /// sweep.json) and one plot per metric over steps (plot-*.png) to output_dir.
    Sweep {
        /// The base run config (every key but loss_type is shared).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Objectives to compare, comma-separated (e.g. sigmoid,ipo,simpo,kto).
        #[arg(long = "loss-type", alias = "loss_type", value_delimiter = ',')]
        loss_type: Vec<String>,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// The objectives prefer knows.
    Objectives {
        #[command(subcommand)]
        cmd: ObjectivesCmd,
    },
}

/// How the evaluation tools read and batch a data file.
#[derive(clap::Args, Clone, Debug)]
struct DataArgs {
    /// Examples per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 1024)]
    max_length: usize,
    /// Cut prompts to this many tokens (keeping their end), as in training; 0 = no limit.
    #[arg(long, default_value_t = 0)]
    max_prompt_length: usize,
    /// Report and skip bad rows instead of stopping at the first.
    #[arg(long)]
    skip_invalid: bool,
}

impl DataArgs {
    fn tokenize_options(&self) -> TokenizeOptions {
        TokenizeOptions {
            max_length: Some(self.max_length),
            max_prompt_length: (self.max_prompt_length > 0).then_some(self.max_prompt_length),
            truncation_mode: TruncationMode::KeepEnd,
        }
    }
}

#[derive(Subcommand)]
enum PalCmd {
    /// Embed every pair with the frozen model, fit PAL on each annotator's pairs but the last
    /// --eval-fraction, and report held-out accuracy (next to one shared prototype), each
    /// annotator's mixture, and how many annotators lean on each prototype. Writes
    /// pal.safetensors and pal.json to --out.
    Fit {
        /// The embedding model (HF directory or .gguf); rows need an `annotator`.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Prototypes K.
        #[arg(long, default_value_t = 2)]
        k: usize,
        /// Dimension of the preference space.
        #[arg(long, default_value_t = 16)]
        dim: usize,
        /// Full-batch Adam steps and learning rate.
        #[arg(long, default_value_t = 300)]
        steps: usize,
        #[arg(long, default_value_t = 0.02)]
        learning_rate: f64,
        /// Fraction of each annotator's pairs (the last ones) held out.
        #[arg(long, default_value_t = 0.2)]
        eval_fraction: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        read: DataArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Fit new annotators from a few pairs each: the prototypes and the map stay frozen, each
    /// annotator's mixture is fitted on their first --shots pairs and tested on the rest.
    Adapt {
        /// A directory `prefer pal fit` wrote.
        #[arg(long)]
        pal: PathBuf,
        /// Pairs of the new annotators (rows need an `annotator`).
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 10)]
        shots: usize,
        #[arg(long, default_value_t = 200)]
        steps: usize,
        #[arg(long, default_value_t = 0.1)]
        learning_rate: f64,
        /// The embedding model, if not the one recorded in pal.json.
        #[arg(long)]
        model: Option<PathBuf>,
        #[command(flatten)]
        read: DataArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DataCmd {
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
    /// Convert OpenAssistant message trees into ranked lists or pairs (conversational JSONL).
    Convert {
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
    /// Write the arithmetic preference set (correct sum chosen, near miss rejected).
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

#[derive(Subcommand)]
enum BenchCmd {
    /// DPO training steps on a real model: s/step, tokens/s, peak RSS, GFLOP/s vs the machine's matmul.
    Dpo(prefer::bench::DpoBenchArgs),
}

#[derive(Subcommand)]
enum ObjectivesCmd {
    /// Every objective name, its data shape, whether it needs a reference, and its source.
    List,
    /// Per-example losses and implicit rewards from a JSONL of sequence statistics, without a
    /// model. Fields per line: policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
    /// ref_rejected_logps (reference objectives), chosen_tokens, rejected_tokens (default 1).
    /// The whole file is one batch (batch-level terms such as `sft` and `aot` use all rows).
    Eval {
        /// Objective name(s), comma-separated.
        #[arg(long = "loss-type", alias = "loss_type")]
        loss_type: String,
        /// Sequence statistics (JSONL).
        #[arg(long)]
        stats: PathBuf,
        /// Objective hyperparameters as config keys, e.g. --set beta=0.5 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    prefer::util::tune_allocator();
    if cli.threads > 0 {
        // SAFETY: single-threaded here, before any tensor op starts candle's pool.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", cli.threads.to_string()) };
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // candle's element-wise ops get a pool of their own whose pinned threads spin while
        // rayon's (the GEMMs and prefer's kernels) work: on 2 cores one thread there was ~8 %
        // faster per DPO step. SAFETY: single-threaded here, before any tensor op.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    if let Err(e) = run(cli.cmd) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Train {
            config,
            set,
            help_config,
        } => {
            if help_config {
                print!("{}", TrainConfig::help());
                return Ok(());
            }
            if config.is_none() && set.is_empty() {
                bail!("give a run config: prefer train --config run.toml [--set key=value ...] (see --help-config)");
            }
            let cfg = TrainConfig::load(config.as_deref(), &set)?;
            if cfg.num_threads > 0 && std::env::var("RAYON_NUM_THREADS").is_err() {
                // SAFETY: no tensor op has run yet.
                unsafe { std::env::set_var("RAYON_NUM_THREADS", cfg.num_threads.to_string()) };
            }
            ctrlc::set_handler(|| {
                if prefer::train::STOP_REQUESTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    eprintln!("\nsecond Ctrl-C: exiting without a checkpoint");
                    std::process::exit(130);
                }
                eprintln!("\nCtrl-C: saving a checkpoint after this step (press again to quit now)");
            })
            .context("installing the Ctrl-C handler")?;
            let out = prefer::train::train(&cfg)?;
            if let Some(l) = &out.last_log {
                eprintln!("last metrics: {l}");
            }
            if out.interrupted {
                std::process::exit(130);
            }
            eprintln!("done: {} steps; model saved in {}", out.steps_done, cfg.output_dir);
            Ok(())
        }
        Cmd::Eval {
            model,
            reference,
            data,
            beta,
            alpha,
            read,
            generate,
            checkpoints,
            plots,
            factors,
            json,
        } => eval_cmd(
            &model,
            reference.as_deref(),
            &data,
            beta,
            alpha,
            &read,
            generate,
            checkpoints,
            plots.as_deref(),
            factors,
            json,
        ),
        Cmd::Data { cmd } => data_cmd(cmd),
        Cmd::Pal { cmd } => pal_cmd(cmd),
        Cmd::Convert { model, out } => {
            let m = model::load(&model, DType::F32, &Device::Cpu)?;
            model::hf::save_dir(&m, &out)?;
            eprintln!("wrote {} (HF layout, f32)", out.display());
            Ok(())
        }
        Cmd::Tokenize {
            model,
            file,
            field,
            chat,
        } => {
            let tok = model::load_tokenizer(&model)?;
            let mut out = std::io::stdout().lock();
            for (line, v) in read_jsonl(&file)? {
                let text = if chat {
                    let msgs: Vec<Message> = serde_json::from_value(v.get(&field).cloned().unwrap_or(Value::Null))
                        .with_context(|| {
                            format!(
                                "{}:{line}: field `{field}`: expected a list of {{role, content}} messages",
                                file.display()
                            )
                        })?;
                    tok.apply_chat_template(&msgs, true)?
                } else {
                    str_field(&v, &field, &file, line)?.to_string()
                };
                let ids = tok.encode(&text, true)?;
                let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap_or_default()).collect();
                writeln!(
                    out,
                    "{}",
                    json!({"line": line, "text": text, "ids": ids, "pieces": pieces})
                )?;
            }
            Ok(())
        }
        Cmd::Logprobs {
            model,
            file,
            field,
            prompt_field,
            completion_field,
        } => {
            let m = model::load(&model, DType::F32, &Device::Cpu)?;
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
                            bail!("{}:{line}: field `{cf}`: prompt + completion does not tokenise with the prompt's tokens first", file.display());
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
        Cmd::Score { model, data, read } => {
            let m = model::load(&model, DType::F32, &Device::Cpu)?;
            if !m.transformer.cfg.reward_head {
                bail!(
                    "{} has no reward head (score.weight); train one with task = \"reward\"",
                    model.display()
                );
            }
            let (examples, report) =
                load_tokenized_examples(&data, &m.tokenizer, &read.tokenize_options(), read.skip_invalid)?;
            for e in &report.skipped {
                eprintln!("skipped: {e}");
            }
            let heads =
                prefer::stats::score_reward_heads(&m.transformer, &examples, read.batch_size, m.tokenizer.pad_id)?;
            let gaussian = m.transformer.cfg.reward_variance;
            let mut out = std::io::stdout().lock();
            for (e, h) in examples.iter().zip(&heads) {
                // a Gaussian head scores with its mean and also reports σ per response
                let s: Vec<f64> = h.iter().map(|r| r[0]).collect();
                let mut rec = json!({"line": e.line, "scores": s});
                if m.transformer.cfg.num_labels > 1 && !gaussian {
                    // MaxMin: one reward per cluster head, per response
                    writeln!(out, "{}", json!({"line": e.line, "head_scores": h}))?;
                    continue;
                }
                if gaussian {
                    rec["sigmas"] = json!(h.iter().map(|r| (0.5 * r[1]).exp()).collect::<Vec<_>>());
                }
                if report.shape == Some(Shape::Pairwise) {
                    rec["chosen_score"] = json!(s[0]);
                    rec["rejected_score"] = json!(s[1]);
                    if gaussian {
                        rec["preference_probability"] = json!(prefer::util::gaussian_preference_probability(
                            h[0][0], h[0][1], h[1][0], h[1][1]
                        ));
                    }
                }
                writeln!(out, "{rec}")?;
            }
            Ok(())
        }
        Cmd::CompareRewards {
            dpo,
            reference,
            rm,
            data,
            shifted,
            beta,
            read,
            json,
        } => {
            let dev = Device::Cpu;
            let (pol, refm, rmm) = (
                model::load(&dpo, DType::F32, &dev)?,
                model::load(&reference, DType::F32, &dev)?,
                model::load(&rm, DType::F32, &dev)?,
            );
            if !rmm.transformer.cfg.reward_head {
                bail!("{} has no reward head; train one with task = \"reward\"", rm.display());
            }
            let opts = read.tokenize_options();
            let batch_size = read.batch_size;
            let acc =
                |scores: &[Vec<f64>]| scores.iter().filter(|r| r[0] > r[1]).count() as f64 / scores.len().max(1) as f64;
            let mut cols = vec![];
            for (name, file) in
                std::iter::once(("in-distribution", &data)).chain(shifted.as_ref().map(|f| ("shifted", f)))
            {
                let (pairs, report) = load_tokenized_examples(file, &pol.tokenizer, &opts, read.skip_invalid)?;
                for e in &report.skipped {
                    eprintln!("skipped: {e}");
                }
                let so = |t: &model::Transformer| {
                    prefer::stats::score_examples(t, &pairs, batch_size, &Default::default(), |_| {})
                };
                let (p, r) = (so(&pol.transformer)?, so(&refm.transformer)?);
                let implicit: Vec<Vec<f64>> = p
                    .iter()
                    .zip(&r)
                    .map(|(a, b)| vec![beta * (a[0] - b[0]), beta * (a[1] - b[1])])
                    .collect();
                let explicit =
                    prefer::stats::score_rewards(&rmm.transformer, &pairs, batch_size, rmm.tokenizer.pad_id)?;
                cols.push(json!({"split": name, "pairs": pairs.len(), "implicit_dpo": acc(&implicit), "explicit_rm": acc(&explicit)}));
            }
            if json {
                println!("{}", Value::Array(cols));
            } else {
                let head: Vec<String> = cols
                    .iter()
                    .map(|c| format!("{} ({} pairs)", c["split"].as_str().unwrap_or(""), c["pairs"]))
                    .collect();
                println!("| reward | {} |", head.join(" | "));
                println!("|---|{}", "---|".repeat(cols.len()));
                for (label, key) in [
                    ("implicit (DPO: β·log π/π_ref)", "implicit_dpo"),
                    ("explicit (reward model)", "explicit_rm"),
                ] {
                    let cells: Vec<String> = cols.iter().map(|c| pct(c[key].as_f64().unwrap_or(f64::NAN))).collect();
                    println!("| {label} | {} |", cells.join(" | "));
                }
            }
            Ok(())
        }
        Cmd::Sweep { config, loss_type, set } => {
            if loss_type.is_empty() {
                bail!("name the objectives to compare: --loss-type sigmoid,ipo,simpo");
            }
            let cfg = TrainConfig::load(config.as_deref(), &set)?;
            ctrlc::set_handler(|| {
                prefer::train::STOP_REQUESTED.store(true, std::sync::atomic::Ordering::SeqCst);
            })
            .context("installing the Ctrl-C handler")?;
            let rows = prefer::sweep::sweep(&cfg, &loss_type)?;
            print!("{}", prefer::sweep::table(&rows));
            eprintln!("table, JSON and plots in {}", cfg.output_dir);
            Ok(())
        }
        Cmd::Bench {
            cmd: BenchCmd::Dpo(args),
        } => prefer::bench::dpo(&args).map_err(Into::into),
        Cmd::Objectives {
            cmd: ObjectivesCmd::List,
        } => {
            println!(
                "{:<18} {:<9} {:<10} {:<13} source",
                "name", "shape", "reference", "status"
            );
            for e in prefer::objectives::REGISTRY {
                let status = match e.status {
                    prefer::objectives::Status::Checked => "checked",
                    prefer::objectives::Status::Experimental => "experimental",
                };
                let reference = if e.needs_reference { "yes" } else { "no" };
                let shape = e.loss.shape().to_string();
                println!(
                    "{:<18} {:<9} {:<10} {:<13} {}",
                    e.name, shape, reference, status, e.source
                );
            }
            Ok(())
        }
        Cmd::Objectives {
            cmd: ObjectivesCmd::Eval { loss_type, stats, set },
        } => objectives_eval(&loss_type, &stats, &set),
    }
}

/// A (chosen, rejected) pair of scores.
type Pair = (f64, f64);

/// A Gaussian reward head on pairs, from one scoring pass: the (chosen, rejected) means, and
/// each pair's probability that chosen is preferred, Φ((μ_w − μ_l)/√(σ_w² + σ_l²)).
fn gaussian_scores(
    m: &model::LoadedModel,
    pairs: &[prefer::data::TokenizedExample],
    batch_size: usize,
) -> Result<(Vec<Pair>, Vec<f64>)> {
    let heads = prefer::stats::score_reward_heads(&m.transformer, pairs, batch_size, m.tokenizer.pad_id)?;
    Ok(heads
        .iter()
        .map(|r| {
            let p = prefer::util::gaussian_preference_probability(r[0][0], r[0][1], r[1][0], r[1][1]);
            ((r[0][0], r[1][0]), p)
        })
        .unzip())
}

fn objectives_eval(loss_type: &str, stats_path: &Path, set: &[String]) -> Result<()> {
    let mut sets = vec![
        "model_name_or_path=-".to_string(),
        "train_file=-".to_string(),
        format!("loss_type={loss_type}"),
    ];
    sets.extend(set.iter().cloned());
    let cfg = TrainConfig::load(None, &sets)?;
    let objective = cfg.objective()?;
    let rows = read_jsonl(stats_path)?;
    let at = |line: usize, k: &str| format!("{}:{line}: field `{k}`", stats_path.display());
    let num = |v: &Value, line: usize, k: &str| -> Result<Option<f64>> {
        match v.get(k) {
            None => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .with_context(|| format!("{}: expected a number", at(line, k))),
        }
    };
    let (mut pc, mut pr, mut rc, mut rr, mut nc, mut nr) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut lvc, mut lvr) = (vec![], vec![]);
    for (line, v) in &rows {
        let need = |k: &str| -> Result<f64> { num(v, *line, k)?.with_context(|| format!("{}: missing", at(*line, k))) };
        pc.push(need("policy_chosen_logps")?);
        pr.push(need("policy_rejected_logps")?);
        if objective.needs_reference() {
            rc.push(need("ref_chosen_logps")?);
            rr.push(need("ref_rejected_logps")?);
        }
        if objective.needs_reward_variance() {
            lvc.push(need("chosen_log_variance")?);
            lvr.push(need("rejected_log_variance")?);
        }
        nc.push(num(v, *line, "chosen_tokens")?.unwrap_or(1.0) as usize);
        nr.push(num(v, *line, "rejected_tokens")?.unwrap_or(1.0) as usize);
    }
    if pc.is_empty() {
        bail!("{}: no rows", stats_path.display());
    }
    let n_rows = pc.len();
    let t = |x: &[f64]| candle_core::Tensor::new(x, &Device::Cpu);
    let st = prefer::objectives::PairStats {
        policy_chosen: t(&pc)?,
        policy_rejected: t(&pr)?,
        ref_chosen: if rc.is_empty() { None } else { Some(t(&rc)?) },
        ref_rejected: if rr.is_empty() { None } else { Some(t(&rr)?) },
        chosen_tokens: nc,
        rejected_tokens: nr,
        weights: None,
        strength: vec![1.0; n_rows],
        scores: None,
        margin: vec![0.0; n_rows],
        log_variance: if lvc.is_empty() {
            None
        } else {
            Some((t(&lvc)?, t(&lvr)?))
        },
    };
    let out = objective.loss_pairs(&st)?;
    let losses: Vec<f64> = out.losses.to_vec1()?;
    let beta = cfg.params.beta;
    let mut stdout = std::io::stdout().lock();
    for (i, (line, _)) in rows.iter().enumerate() {
        let mut rec = json!({"line": line, "loss": losses[i]});
        if !rc.is_empty() {
            rec["rewards/chosen"] = json!(beta * (pc[i] - rc[i]));
            rec["rewards/rejected"] = json!(beta * (pr[i] - rr[i]));
        }
        writeln!(stdout, "{rec}")?;
    }
    let mut summary = serde_json::Map::new();
    summary.insert("loss_type".into(), json!(objective.name()));
    summary.insert("loss".into(), json!(losses.iter().sum::<f64>() / losses.len() as f64));
    for (k, v) in out.metrics {
        summary.insert(k, json!(v));
    }
    eprintln!("{}", Value::Object(summary));
    Ok(())
}

fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>> {
    let mut out = vec![];
    for rec in prefer::data::jsonl::read_records(path)? {
        let r = rec?;
        out.push((r.line, Value::Object(r.obj)));
    }
    Ok(out)
}

fn str_field<'a>(v: &'a Value, field: &str, file: &Path, line: usize) -> Result<&'a str> {
    v.get(field).and_then(Value::as_str).with_context(|| {
        format!(
            "{}:{line}: field `{field}`: missing or not a string (choose the field with --field)",
            file.display()
        )
    })
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn print_summary(s: &prefer::eval::EvalSummary, beta: f64, gen_acc: Option<f64>) {
    println!("pairs                          {}", s.pairs);
    if s.reward_model {
        if let (Some(a), Some(mg)) = (s.reward_accuracy, s.reward_margin) {
            println!("reward accuracy (reward model) {}", pct(a));
            println!("mean reward margin             {mg:.4}");
        }
        if let Some(e) = s.calibration_ece {
            println!("calibration error (ECE)        {e:.4}");
        }
        return;
    }
    println!("ranking accuracy               {}", pct(s.ranking_accuracy));
    println!("ranking accuracy (per token)   {}", pct(s.ranking_accuracy_normalized));
    if let (Some(a), Some(mg)) = (s.reward_accuracy, s.reward_margin) {
        println!("reward accuracy (beta {beta})    {}", pct(a));
        println!("mean reward margin             {mg:.4}");
    }
    if let (Some(l), Some(rr)) = (s.dpo_loss, s.ref_ranking_accuracy) {
        println!("DPO loss                       {l:.4}");
        println!("reference ranking accuracy     {}", pct(rr));
    }
    if let Some(e) = s.calibration_ece {
        println!("calibration error (ECE)        {e:.4}");
    }
    if let (Some(i), Some(g)) = (s.idealized_ranking_accuracy, s.alignment_gap) {
        println!("idealised ranking accuracy     {}", pct(i));
        println!("alignment gap                  {:+.1} points", 100.0 * g);
    }
    if let Some(d) = &s.difficulty {
        println!("reference misranks             {}", pct(d.reference_misranked));
        if let Some(t) = d.mean_flip_threshold_misranked {
            println!("  DPO loss needed to flip them {t:.4} (mean)");
        }
    }
    if let Some(g) = gen_acc {
        println!("generation accuracy (greedy)   {}", pct(g));
    }
}

/// The models `prefer eval --checkpoints RUN_DIR` evaluates: every complete checkpoint-N, then
/// the final model if the run finished.
fn run_models(run: &Path) -> Result<Vec<(Option<usize>, PathBuf)>> {
    let mut v: Vec<(Option<usize>, PathBuf)> = std::fs::read_dir(run)
        .with_context(|| format!("reading {}", run.display()))?
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("checkpoint-")?
                .parse::<usize>()
                .ok()?;
            e.path()
                .join("model.safetensors")
                .is_file()
                .then(|| (Some(n), e.path()))
        })
        .collect();
    v.sort();
    if v.is_empty() {
        bail!("{} holds no checkpoint-N directories", run.display());
    }
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
fn eval_cmd(
    model_path: &Path,
    ref_path: Option<&Path>,
    data: &Path,
    beta: f64,
    alpha: Option<f64>,
    read: &DataArgs,
    generate: bool,
    checkpoints: bool,
    plots: Option<&Path>,
    factors: bool,
    as_json: bool,
) -> Result<()> {
    let batch_size = read.batch_size;
    let dev = Device::Cpu;
    let models = if checkpoints {
        run_models(model_path)?
    } else {
        vec![(None, model_path.to_path_buf())]
    };
    let tok = model::load_tokenizer(&models[0].1)?;
    let (pairs, report) = load_tokenized_examples(data, &tok, &read.tokenize_options(), read.skip_invalid)?;
    for e in &report.skipped {
        eprintln!("skipped: {e}");
    }
    if report.shape != Some(Shape::Pairwise) {
        bail!(
            "{}: prefer eval reads pairwise data (chosen/rejected); convert ranked lists with `prefer data convert --to pairs`",
            data.display()
        );
    }
    let score = |m: &model::LoadedModel| -> Result<Vec<(f64, f64)>> {
        let v = if m.transformer.cfg.reward_head {
            prefer::stats::score_rewards(&m.transformer, &pairs, batch_size, m.tokenizer.pad_id)?
        } else {
            prefer::stats::score_examples(&m.transformer, &pairs, batch_size, &Default::default(), |_| {})?
        };
        Ok(v.into_iter().map(|r| (r[0], r[1])).collect())
    };
    let reference = match ref_path {
        Some(r) => Some(score(&model::load(r, DType::F32, &dev)?)?),
        None => None,
    };
    // true preference probabilities: the data's preference_strength, else --alpha
    let alphas: Option<Vec<f64>> = pairs.iter().map(|p| p.meta.strength.or(alpha)).collect();
    let lengths: Vec<(usize, usize)> = pairs
        .iter()
        .map(|p| (p.chosen_ids().len(), p.rejected_ids().len()))
        .collect();
    let mut rows = Vec::new();
    for (step, path) in &models {
        let m = model::load(path, DType::F32, &dev)?;
        let (scores, gaussian) = match m.transformer.cfg.reward_variance {
            true => {
                let (s, p) = gaussian_scores(&m, &pairs, batch_size)?;
                (s, Some(p))
            }
            false => (score(&m)?, None),
        };
        // the model's probability that each pair's chosen response is preferred
        let probabilities: Option<Vec<f64>> = match (&reference, m.transformer.cfg.reward_head) {
            _ if gaussian.is_some() => gaussian,
            (_, true) => Some(prefer::eval::bt_probabilities(&scores)),
            (Some(r), false) => Some(prefer::eval::bt_probabilities(
                &scores
                    .iter()
                    .zip(r)
                    .map(|((c, j), (rc, rj))| (beta * (c - rc), beta * (j - rj)))
                    .collect::<Vec<_>>(),
            )),
            (None, false) => None,
        };
        let mut summary = if m.transformer.cfg.reward_head {
            prefer::eval::summarize_rewards(&scores, probabilities.as_deref().unwrap_or_default())
        } else {
            prefer::eval::summarize(&scores, reference.as_deref(), &lengths, beta)
        };
        if let (Some(r), false) = (&reference, m.transformer.cfg.reward_head) {
            summary = summary.with_ideal(r, alphas.as_deref(), beta);
        }
        let mut gen_acc = None;
        if generate && !m.transformer.cfg.reward_head {
            let mut hits = 0;
            for p in &pairs {
                let want: Vec<u32> = p
                    .chosen_ids()
                    .iter()
                    .copied()
                    .filter(|&t| t != m.tokenizer.eos_id)
                    .collect();
                let want_text = m.tokenizer.decode(&want, true)?;
                let got = model::logprobs::generate_greedy(
                    &m.transformer,
                    &p.prompt_ids,
                    want.len() + 4,
                    &[m.tokenizer.eos_id],
                )?;
                let got_text = m.tokenizer.decode(&got, true)?;
                if got_text.trim().starts_with(want_text.trim()) && !want_text.trim().is_empty() {
                    hits += 1;
                }
            }
            gen_acc = Some(hits as f64 / pairs.len() as f64);
        }
        if let (Some(dir), None) = (plots, step) {
            // reward (or log-ratio) histograms of chosen vs rejected
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let implicit: Vec<(f64, f64)> = match (&reference, m.transformer.cfg.reward_head) {
                (Some(r), false) => scores
                    .iter()
                    .zip(r)
                    .map(|((c, j), (rc, rj))| (beta * (c - rc), beta * (j - rj)))
                    .collect(),
                _ => scores.clone(),
            };
            let what = if m.transformer.cfg.reward_head || reference.is_some() {
                "reward"
            } else {
                "log-prob"
            };
            let p = dir.join("reward_histogram.png");
            prefer::plot::histogram(
                &p,
                &format!("{what}: chosen vs rejected"),
                what,
                &[
                    ("chosen", implicit.iter().map(|x| x.0).collect()),
                    ("rejected", implicit.iter().map(|x| x.1).collect()),
                ],
                30,
            )?;
            eprintln!("wrote {}", p.display());
            if let Some(probabilities) = &probabilities {
                // reliability diagram of the model's preference probabilities
                let cal = prefer::eval::calibration(probabilities, prefer::eval::CALIBRATION_BINS);
                let points: Vec<(f64, f64)> = cal
                    .bins
                    .iter()
                    .filter(|b| b.count > 0)
                    .map(|b| (b.confidence, b.accuracy))
                    .collect();
                let series = [
                    prefer::plot::Series {
                        name: format!("model (ECE {:.3})", cal.ece),
                        points,
                    },
                    prefer::plot::Series {
                        name: "perfectly calibrated".into(),
                        points: vec![(0.5, 0.5), (1.0, 1.0)],
                    },
                ];
                let p = dir.join("calibration.png");
                prefer::plot::line_chart(
                    &p,
                    match m.transformer.cfg.reward_variance {
                        true => "calibration of Φ(Δμ / √(σ_w² + σ_l²))",
                        false => "calibration of σ(reward margin)",
                    },
                    "confidence max(p, 1 − p)",
                    "fraction ranked correctly",
                    &series,
                )?;
                eprintln!("wrote {}", p.display());
            }
        }
        let mut v = serde_json::to_value(&summary)?;
        v["generation_accuracy"] = json!(gen_acc);
        v["model"] = json!(path.display().to_string());
        v["step"] = json!(step);
        let factor_rows = if factors {
            // the model's preference: implicit reward with a reference, else its own score
            let diff: Vec<f64> = match (&reference, m.transformer.cfg.reward_head) {
                (Some(r), false) => scores
                    .iter()
                    .zip(r)
                    .map(|((c, j), (rc, rj))| (c - rc) - (j - rj))
                    .collect(),
                _ => scores.iter().map(|(c, j)| c - j).collect(),
            };
            let (text, _) = load_text_examples(data, Some(&m.tokenizer), true)?;
            let by_line: std::collections::HashMap<usize, &prefer::data::TextExample> =
                text.iter().map(|t| (t.line, t)).collect();
            let texts: Vec<(String, String, String)> = pairs
                .iter()
                .map(|p| {
                    let t = by_line[&p.line];
                    (t.prompt.clone(), t.chosen().to_string(), t.rejected().to_string())
                })
                .collect();
            let rows = prefer::factors::analyze(&texts, &diff);
            v["factors"] = serde_json::to_value(&rows)?;
            Some(rows)
        } else {
            None
        };
        if !checkpoints {
            if as_json {
                println!("{v}");
            } else {
                print_summary(&summary, beta, gen_acc);
                if let Some(rows) = factor_rows {
                    println!("\n| factor | pairs differing | labels prefer more | model prefers more | corr(Δfactor, Δmodel) |");
                    println!("|---|---|---|---|---|");
                    let f = |x: Option<f64>| x.map(pct).unwrap_or("—".into());
                    for r in rows {
                        let c = r.model_correlation.map(|c| format!("{c:+.3}")).unwrap_or("—".into());
                        println!(
                            "| {} | {} | {} | {} | {c} |",
                            r.factor,
                            r.pairs_differing,
                            f(r.labels_prefer_more),
                            f(r.model_prefers_more)
                        );
                    }
                }
            }
            return Ok(());
        }
        eprintln!("{}: ranking accuracy {}", path.display(), pct(summary.ranking_accuracy));
        rows.push(v);
    }
    // a run's checkpoints: one table, JSON, and a plot per metric over steps
    let metrics = [
        "ranking_accuracy",
        "ranking_accuracy_normalized",
        "reward_accuracy",
        "reward_margin",
        "dpo_loss",
        "alignment_gap",
        "calibration_ece",
    ];
    if as_json {
        println!("{}", Value::Array(rows.clone()));
    } else {
        println!("| step | {} |", metrics.join(" | "));
        println!("|---|{}", "---|".repeat(metrics.len()));
        for r in &rows {
            let cells: Vec<String> = metrics
                .iter()
                .map(|k| r[*k].as_f64().map(|x| format!("{x:.4}")).unwrap_or("—".into()))
                .collect();
            println!("| {} | {} |", r["step"], cells.join(" | "));
        }
    }
    std::fs::write(
        model_path.join("eval_trajectory.json"),
        serde_json::to_vec_pretty(&rows)?,
    )?;
    if let Some(dir) = plots {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for k in metrics {
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|r| Some((r["step"].as_f64()?, r[k].as_f64()?)))
                .collect();
            if points.is_empty() {
                continue;
            }
            let p = dir.join(format!("eval-{k}.png"));
            let series = [prefer::plot::Series {
                name: k.to_string(),
                points,
            }];
            prefer::plot::line_chart(&p, &format!("{k} over training"), "step", k, &series)?;
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(())
}

/// Pairs of `data` embedded by `model`'s frozen body, with each row's annotator.
fn pal_embeddings(
    model_path: &Path,
    data: &Path,
    read: &DataArgs,
) -> Result<(prefer::pal::PairEmbeddings, Vec<String>)> {
    let m = model::load(model_path, DType::F32, &Device::Cpu)?;
    let (examples, report) = load_tokenized_examples(data, &m.tokenizer, &read.tokenize_options(), read.skip_invalid)?;
    for e in &report.skipped {
        eprintln!("skipped: {e}");
    }
    if report.shape != Some(Shape::Pairwise) {
        bail!(
            "{}: PAL reads pairwise data (chosen/rejected) with an `annotator` on every row",
            data.display()
        );
    }
    let (names, users) = prefer::pal::annotators(&examples, data)?;
    eprintln!(
        "embedding {} pairs of {} annotators with {}",
        examples.len(),
        names.len(),
        model_path.display()
    );
    let emb = prefer::pal::embed_pairs(&m.transformer, &examples, users, read.batch_size, m.tokenizer.pad_id)?;
    Ok((emb, names))
}

fn pal_cmd(cmd: PalCmd) -> Result<()> {
    let pct = |x: f64| format!("{:.1} %", 100.0 * x);
    match cmd {
        PalCmd::Fit {
            model: model_path,
            data,
            out,
            k,
            dim,
            steps,
            learning_rate,
            eval_fraction,
            seed,
            read,
            json,
        } => {
            if !(0.0..1.0).contains(&eval_fraction) {
                bail!("--eval-fraction {eval_fraction} must be in [0, 1)");
            }
            if k == 0 || dim == 0 || steps == 0 {
                bail!("--k, --dim and --steps must be at least 1 (got {k}, {dim}, {steps})");
            }
            let (emb, names) = pal_embeddings(&model_path, &data, &read)?;
            let opts = prefer::pal::PalOptions {
                k,
                dim,
                steps,
                learning_rate,
                seed,
            };
            let (pal, report) = prefer::pal::fit(&emb, names, eval_fraction, &opts)?;
            pal.save(&out, json!({"model": model_path.display().to_string()}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "PAL, K = {k}: loss {:.4} -> {:.4} over {steps} steps",
                    report.first_loss, report.final_loss
                );
                println!(
                    "train accuracy ({} pairs)      {}",
                    report.train_pairs,
                    pct(report.train_accuracy)
                );
                println!(
                    "held-out accuracy ({} pairs)   {}",
                    report.held_out_pairs,
                    pct(report.held_out_accuracy)
                );
                println!(
                    "one shared prototype, held out {}",
                    pct(report.single_prototype_held_out_accuracy)
                );
                println!("annotators per prototype       {:?}", report.users_per_prototype);
                println!("\n| annotator | train pairs | held-out pairs | held-out accuracy | weights |\n|---|---|---|---|---|");
                for u in &report.users {
                    let w: Vec<String> = u.weights.iter().map(|w| format!("{w:.2}")).collect();
                    println!(
                        "| {} | {} | {} | {} | {} |",
                        u.user,
                        u.fit_pairs,
                        u.held_out_pairs,
                        pct(u.held_out_accuracy),
                        w.join(" ")
                    );
                }
            }
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        PalCmd::Adapt {
            pal: dir,
            data,
            shots,
            steps,
            learning_rate,
            model: model_path,
            read,
            json,
        } => {
            let (pal, info) = prefer::pal::Pal::load(&dir)?;
            let model_path = match model_path {
                Some(p) => p,
                None => PathBuf::from(
                    info["model"]
                        .as_str()
                        .with_context(|| format!("{}: pal.json names no model; pass --model", dir.display()))?,
                ),
            };
            let (emb, names) = pal_embeddings(&model_path, &data, &read)?;
            let report = prefer::pal::adapt_users(&pal, &emb, &names, shots, steps, learning_rate)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} new annotators, {shots} pairs each to fit, the rest to test",
                    report.users.len()
                );
                println!("held-out accuracy, adapted      {}", pct(report.held_out_accuracy));
                println!("held-out accuracy, uniform mix  {}", pct(report.uniform_accuracy));
                println!("\n| annotator | test pairs | adapted | uniform | weights |\n|---|---|---|---|---|");
                for u in &report.users {
                    let w: Vec<String> = u.weights.iter().map(|w| format!("{w:.2}")).collect();
                    println!(
                        "| {} | {} | {} | {} | {} |",
                        u.user,
                        u.held_out_pairs,
                        pct(u.held_out_accuracy),
                        pct(u.uniform_accuracy.unwrap_or(f64::NAN)),
                        w.join(" ")
                    );
                }
            }
            Ok(())
        }
    }
}

fn data_cmd(cmd: DataCmd) -> Result<()> {
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
                .or_else(prefer::paths::smollm2_gguf)
                .context("no tokenizer: pass --model (an HF dir or .gguf)")?;
            let tok = model::load_tokenizer(&model)?;
            let opts = TokenizeOptions {
                max_length: None,
                max_prompt_length: None,
                truncation_mode: TruncationMode::KeepEnd,
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
        DataCmd::Convert { file, from, to, out } => {
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
            for (name, lines) in [("train.jsonl", &all[..train]), ("eval.jsonl", &all[train..])] {
                let p = out.join(name);
                std::fs::write(&p, lines.join("\n") + "\n").with_context(|| format!("writing {}", p.display()))?;
                eprintln!("wrote {} ({} pairs)", p.display(), lines.len());
            }
            Ok(())
        }
    }
}

fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut body = lines.join("\n");
    body.push('\n');
    prefer::util::write_atomic(path, body.as_bytes())?;
    Ok(())
}

fn median(xs: &[usize]) -> usize {
    let mut v = xs.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or(0)
}
