//! `prefer`: argument parsing and dispatch. Each subcommand lives in its own file under `cli/`.

mod cli;

use clap::{Parser, Subcommand};

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
    /// Train a model: on preference data (DPO and ~30 objectives; reward models), or online on
    /// its own samples of a prompt file (GRPO, RLOO, online DPO, Nash-MD, XPO). Writes
    /// checkpoints, metrics.jsonl and the final model (HF layout) to output_dir.
    Train(cli::train::TrainArgs),
    /// Reward accuracy, margin and ranking accuracy of a model on preference pairs; or, with
    /// --prompts, its rewards on completions it generates.
    Eval(cli::eval::EvalArgs),
    /// Check, inspect or make preference data.
    Data {
        #[command(subcommand)]
        cmd: cli::data::DataCmd,
    },
    /// PAL pluralistic reward model (ideal-point mixture over frozen embeddings, Chen et al.
    /// 2025): fit K prototypes and each annotator's mixture, or fit new annotators from a few pairs.
    Pal {
        #[command(subcommand)]
        cmd: cli::pal::PalCmd,
    },
    /// Sample completions of a file of prompts (KV cache; each prompt computed once for all its
    /// samples), one JSON line per completion with its token ids and log-probs.
    Generate(cli::generate::GenerateArgs),
    /// Convert a GGUF model to an HF checkpoint directory (dequantised, f32).
    Convert(cli::convert::ConvertArgs),
    /// Merge a LoRA adapter (PEFT directory) into its base and write a full HF checkpoint.
    Merge(cli::convert::MergeArgs),
    /// Write a model as a GGUF file for llama.cpp / Ollama (architecture, tokenizer and chat
    /// template in GGUF's keys; f32, f16, bf16, q8_0, ..., q4_k_m).
    Export(cli::convert::ExportArgs),
    /// Token ids and pieces of each text of a JSONL file (one JSON line out per line in).
    Tokenize(cli::tokenize::TokenizeArgs),
    /// Scores of every response of a preference file under a reward model (JSONL to stdout:
    /// `scores` per line, plus `chosen_score`/`rejected_score` for pairs).
    Score(cli::score::ScoreArgs),
    /// Per-token log-probs of each text of a JSONL file under a model (JSONL to stdout).
    Logprobs(cli::logprobs::LogprobsArgs),
    /// Implicit vs explicit reward generalisation (DPORM vs EXRM, Lin et al. 2024): the accuracy
    /// of a DPO model's implicit reward and of a reward model on the same in-distribution and
    /// shifted pairs, one table.
    CompareRewards(cli::compare_rewards::CompareRewardsArgs),
    /// Run several objectives on the same model, data and budget; writes a table (sweep.md,
    /// sweep.json) and one plot per metric over steps (plot-*.png) to output_dir.
    Sweep(cli::sweep::SweepArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        cmd: cli::bench::BenchCmd,
    },
    /// The objectives prefer knows.
    Objectives {
        #[command(subcommand)]
        cmd: cli::objectives::ObjectivesCmd,
    },
}

/// `prefer train --beta 0.2 --per_device_train_batch_size 4` (as `trl dpo` takes them): every
/// `--KEY VALUE` or `--KEY=VALUE` after `train` that is not one of its own flags becomes
/// `--set KEY=VALUE` (dashes in KEY read as underscores); a bare `--KEY` is `KEY=true`.
fn config_flags_as_set(args: Vec<String>) -> Vec<String> {
    if args.get(1).map(String::as_str) != Some("train") {
        return args;
    }
    // `prefer train`'s own flags (and the global ones), as clap knows them
    use clap::CommandFactory;
    let cli = Cli::command();
    let own: Vec<String> = cli
        .get_arguments()
        .chain(cli.find_subcommand("train").into_iter().flat_map(|t| t.get_arguments()))
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .chain(["--help".to_string(), "--version".to_string()])
        .collect();
    let mut out = args[..2].to_vec();
    let mut it = args.into_iter().skip(2).peekable();
    while let Some(a) = it.next() {
        let Some(flag) = a.strip_prefix("--") else {
            out.push(a);
            continue;
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (flag.to_string(), None),
        };
        if own.contains(&format!("--{name}")) || name.is_empty() {
            out.push(a);
            continue;
        }
        let (name, value) = match inline {
            Some(v) => (name, v),
            None => match it.peek() {
                Some(next) if !next.starts_with("--") => (name, it.next().expect("peeked")),
                // HfArgumentParser's `--no_KEY` for a false boolean
                _ => match name.strip_prefix("no_").or_else(|| name.strip_prefix("no-")) {
                    Some(key) => (key.to_string(), "false".into()),
                    None => (name, "true".into()),
                },
            },
        };
        out.push("--set".into());
        out.push(format!("{}={value}", name.replace('-', "_")));
    }
    out
}

fn main() {
    // `prefer objectives list | head`: end quietly when the reader goes away, as Unix tools do,
    // instead of panicking on a write to a closed pipe. SAFETY: first thing, one thread.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse_from(config_flags_as_set(std::env::args().collect()));
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
    let result = match cli.cmd {
        Cmd::Train(a) => cli::train::run(a),
        Cmd::Eval(a) => cli::eval::run(a),
        Cmd::Data { cmd } => cli::data::run(cmd),
        Cmd::Pal { cmd } => cli::pal::run(cmd),
        Cmd::Generate(a) => cli::generate::run(a),
        Cmd::Convert(a) => cli::convert::run(a),
        Cmd::Merge(a) => cli::convert::run_merge(a),
        Cmd::Export(a) => cli::convert::run_export(a),
        Cmd::Tokenize(a) => cli::tokenize::run(a),
        Cmd::Score(a) => cli::score::run(a),
        Cmd::Logprobs(a) => cli::logprobs::run(a),
        Cmd::CompareRewards(a) => cli::compare_rewards::run(a),
        Cmd::Sweep(a) => cli::sweep::run(a),
        Cmd::Bench { cmd } => cli::bench::run(cmd),
        Cmd::Objectives { cmd } => cli::objectives::run(cmd),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag of every subcommand, with what is wrong with it: no help text, or a name off
    /// the shared convention (inputs --data / --prompts / --model / --adapter / --config, outputs
    /// --out; old spellings only as hidden aliases).
    fn problems(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if a.is_hide_set() || id == "help" || id == "version" {
                continue;
            }
            let name = a
                .get_long()
                .map(|l| format!("--{l}"))
                .unwrap_or_else(|| id.to_uppercase());
            if a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{path} {name}: no help text"));
            }
            if a.get_long().is_none() && !a.is_positional() {
                out.push(format!("{path} {name}: no long name"));
            }
            if a.is_positional() {
                out.push(format!("{path} {name}: positional; inputs are --data FILE"));
            }
            if let Some(l) = a.get_long() {
                if ["file", "input", "output", "in", "output-dir", "prompt-file"].contains(&l) {
                    out.push(format!("{path} {name}: inputs are --data / --prompts, outputs --out"));
                }
            }
        }
        for s in cmd.get_subcommands() {
            problems(s, &format!("{path} {}", s.get_name()), out);
        }
    }

    #[test]
    fn every_flag_has_help_and_follows_the_naming_convention() {
        let mut out = Vec::new();
        problems(&super::Cli::command(), "prefer", &mut out);
        assert!(out.is_empty(), "{}", out.join("\n"));
    }

    /// Old spellings still parse: `--file` of tokenize and logprobs, a positional file of the
    /// data subcommands, `data convert` for `data oasst`.
    #[test]
    fn renamed_flags_keep_their_old_spelling() {
        use clap::Parser;
        for argv in [
            "prefer tokenize --model m --file f.jsonl",
            "prefer tokenize --model m --data f.jsonl",
            "prefer logprobs --model m --file f.jsonl",
            "prefer data validate f.jsonl",
            "prefer data validate --data f.jsonl",
            "prefer data inspect f.jsonl --json",
            "prefer data convert f.jsonl --out o.jsonl",
            "prefer data oasst --data f.jsonl --out o.jsonl",
        ] {
            super::Cli::try_parse_from(argv.split(' ')).unwrap_or_else(|e| panic!("{argv}: {e}"));
        }
    }
}
