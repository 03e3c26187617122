//! A run's examples (the trainer core holds them and hands micro-batches of indices to the
//! algorithm): `train_file` and `eval_file` read, validated and tokenised for the
//! objective that will read them.

use crate::config::TrainConfig;
use crate::data::{load_tokenized_examples, Shape, TokenizedExample};
use crate::error::{Error, Result};
use crate::objectives::Objective;
use crate::tokenizer::TextTokenizer;
use std::path::Path;

/// The tokenised train and eval sets of a run.
pub struct TrainData {
    pub train: Vec<TokenizedExample>,
    /// Empty without `eval_file`.
    pub eval: Vec<TokenizedExample>,
    /// An online run's prompts (its `train_file`); `train` and `eval` are then empty.
    pub prompts: Vec<crate::data::prompts::Prompt>,
    /// An SFT run's examples; `train` and `eval` are then empty.
    pub sft: Option<std::sync::Arc<SftData>>,
}

/// An SFT run's train and eval units: one example each, or with packing a bin of examples.
#[derive(Debug, Default)]
pub struct SftData {
    pub train: Vec<Vec<crate::data::sft::SftExample>>,
    pub eval: Vec<Vec<crate::data::sft::SftExample>>,
}

impl TrainData {
    /// The units the data order draws: examples, or an online run's prompts.
    pub fn len(&self) -> usize {
        if let Some(s) = &self.sft {
            return s.train.len();
        }
        if self.prompts.is_empty() {
            self.train.len()
        } else {
            self.prompts.len()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether there is an eval set.
    pub fn has_eval(&self) -> bool {
        !self.eval.is_empty() || self.sft.as_ref().is_some_and(|s| !s.eval.is_empty())
    }

    /// An SFT run's files, prepared as TRL's SFTTrainer prepares them
    /// ([`crate::data::sft`]); with packing, in best-fit-decreasing bins of `max_length`.
    pub fn load_sft(cfg: &TrainConfig, tokenizer: &TextTokenizer) -> Result<TrainData> {
        use crate::data::sft::{load_sft_examples, pack_bfd};
        let opts = cfg.sft_options();
        type Units = Vec<Vec<crate::data::sft::SftExample>>;
        // the examples of `f`, each reported
        let read = |f: &str, what: &str| -> Result<Vec<crate::data::sft::SftExample>> {
            let (ex, report) = load_sft_examples(Path::new(f), tokenizer, &opts, cfg.skip_invalid)?;
            for e in &report.skipped {
                eprintln!("skipped ({what}): {e}");
            }
            if ex.is_empty() {
                return Err(Error::Config(format!(
                    "{f}: no SFT example left to train on (every row was skipped, or lost its targets to truncation)"
                )));
            }
            eprintln!(
                "{what}: {} SFT examples ({:?}; {} skipped, {} truncated, {} without a target dropped)",
                ex.len(),
                report.kind,
                report.skipped.len(),
                report.truncated,
                report.dropped
            );
            Ok(ex)
        };
        // examples as training units: one each, or with packing a bin each
        let units = |ex: Vec<crate::data::sft::SftExample>, what: &str| -> Units {
            if !opts.packing {
                return ex.into_iter().map(|e| vec![e]).collect();
            }
            let lengths: Vec<usize> = ex.iter().map(|e| e.ids.len()).collect();
            let bins: Units = pack_bfd(&lengths, opts.max_length)
                .into_iter()
                .map(|bin| bin.into_iter().map(|i| ex[i].clone()).collect())
                .collect();
            eprintln!(
                "{what}: packed into {} rows of ≤ {} tokens",
                bins.len(),
                opts.max_length
            );
            bins
        };
        let train_ex = read(&cfg.train_file, "train_file")?;
        let (train, eval) = match &cfg.eval_file {
            Some(f) => (units(train_ex, "train_file"), units(read(f, "eval_file")?, "eval_file")),
            // held out of train_file's examples before packing, tokenised once
            None if holds_out(cfg) => {
                let (t, e) = crate::data::hold_out(train_ex, cfg.eval_fraction, hold_out_seed(cfg), &cfg.train_file)?;
                eprintln!(
                    "eval: {} SFT examples held out of train_file (eval_fraction {})",
                    e.len(),
                    cfg.eval_fraction
                );
                (units(t, "train_file"), units(e, "eval"))
            }
            None => (units(train_ex, "train_file"), vec![]),
        };
        Ok(TrainData {
            train: vec![],
            eval: vec![],
            prompts: vec![],
            sft: Some(std::sync::Arc::new(SftData { train, eval })),
        })
    }

    /// An online run's prompts: `train_file` as prompt-only rows. A prompt that leaves less
    /// than `max_completion_length` of the model's `context` is an error naming its line,
    /// before anything trains.
    pub fn load_prompts(cfg: &TrainConfig, tokenizer: &TextTokenizer, context: usize) -> Result<TrainData> {
        let prompts = crate::data::prompts::load_prompts(
            Path::new(&cfg.train_file),
            tokenizer,
            &crate::data::prompts::PromptField {
                name: cfg.prompt_column.clone().unwrap_or_else(|| "prompt".into()),
                ..Default::default()
            },
            (context > 0).then_some(context),
            cfg.grpo.max_completion_length.max(1),
        )?;
        eprintln!("train_file: {} prompts", prompts.len());
        Ok(TrainData {
            train: vec![],
            eval: vec![],
            prompts,
            sft: None,
        })
    }

    /// Read both files. With `reward_augmented`, the files are relabelled first into
    /// `output_dir`, and `cfg` then names the relabelled files (so checkpoints record them).
    pub fn load(cfg: &mut TrainConfig, tokenizer: &TextTokenizer, objective: &Objective) -> Result<TrainData> {
        if cfg.reward_augmented {
            relabel_reward_augmented(cfg)?;
        }
        let opts = cfg.tokenize_options();
        let (mut train, report) =
            load_tokenized_examples(Path::new(&cfg.train_file), tokenizer, &opts, cfg.skip_invalid)?;
        for e in &report.skipped {
            eprintln!("skipped: {e}");
        }
        check_shape(objective, report.shape, &cfg.train_file)?;
        let mut eval = match &cfg.eval_file {
            Some(f) => {
                let (p, r) = load_tokenized_examples(Path::new(f), tokenizer, &opts, cfg.skip_invalid)?;
                for e in &r.skipped {
                    eprintln!("skipped (eval): {e}");
                }
                check_shape(objective, r.shape, f)?;
                p
            }
            None if holds_out(cfg) => {
                let (t, e) = crate::data::hold_out(train, cfg.eval_fraction, hold_out_seed(cfg), &cfg.train_file)?;
                train = t;
                eprintln!(
                    "eval: {} examples held out of train_file (eval_fraction {})",
                    e.len(),
                    cfg.eval_fraction
                );
                e
            }
            None => vec![],
        };
        if objective.needs_kl() {
            add_mismatched_completions(&mut train, &cfg.train_file, cfg.max_length)?;
            if !eval.is_empty() {
                add_mismatched_completions(&mut eval, cfg.eval_file.as_deref().unwrap_or(""), cfg.max_length)?;
            }
        }
        eprintln!(
            "train_file: {} {} examples ({}; {} skipped, {} prompts and {} completions truncated)",
            train.len(),
            report.shape.map(|f| f.to_string()).unwrap_or_default(),
            report.format.map(|f| f.to_string()).unwrap_or_default(),
            report.skipped.len(),
            report.prompts_truncated,
            report.completions_truncated
        );
        Ok(TrainData {
            train,
            eval,
            prompts: vec![],
            sft: None,
        })
    }
}

/// Narrow a dataset with several splits to the run's: `train_file` becomes its
/// `dataset_train_split`, and without an `eval_file` (unless eval_strategy = "no") its
/// `dataset_test_split` when it has one, as TRL's scripts take `dataset[dataset_test_split]`.
/// A file, or a dataset of one split, is left as it is.
pub fn resolve_dataset_splits(cfg: &mut TrainConfig) -> Result<()> {
    let dir = Path::new(&cfg.train_file).to_path_buf();
    let splits = crate::data::tables::splits(&dir);
    if splits.is_empty() {
        return Ok(());
    }
    if !splits.contains(&cfg.dataset_train_split) {
        return Err(Error::Config(format!(
            "train_file = \"{}\" holds the splits {splits:?}, not dataset_train_split = \"{}\"; set \
             dataset_train_split to one of them",
            dir.display(),
            cfg.dataset_train_split
        )));
    }
    cfg.train_file = dir.join(&cfg.dataset_train_split).display().to_string();
    eprintln!("train_file: split `{}` of {}", cfg.dataset_train_split, dir.display());
    let test = &cfg.dataset_test_split;
    if cfg.eval_file.is_none()
        && cfg.eval_strategy != crate::config::Strategy::No
        && !cfg.task.is_online()
        && test != &cfg.dataset_train_split
        && splits.contains(test)
    {
        cfg.eval_file = Some(dir.join(test).display().to_string());
        eprintln!("eval_file: split `{test}` of {} (dataset_test_split)", dir.display());
    }
    Ok(())
}

/// The seed that chooses eval_fraction's held-out rows: data_seed, else seed.
pub(crate) fn hold_out_seed(cfg: &TrainConfig) -> u64 {
    cfg.data_seed.unwrap_or(cfg.seed)
}

/// Whether the run holds out eval_fraction of its train rows (no eval_file, evaluation on).
pub(crate) fn holds_out(cfg: &TrainConfig) -> bool {
    cfg.eval_fraction > 0.0 && cfg.eval_file.is_none() && cfg.eval_strategy != crate::config::Strategy::No
}

/// Relabel scored pairs into files beside the run's outputs, and point `cfg` at them.
fn relabel_reward_augmented(cfg: &mut TrainConfig) -> Result<()> {
    let out_dir = cfg.output_dir();
    crate::util::create_dir_all(&out_dir)?;
    let relabel = |f: &str, name: &str| -> Result<String> {
        let lines = crate::data::convert::reward_augment(Path::new(f))?;
        let p = out_dir.join(name);
        crate::util::write_atomic(&p, (lines.join("\n") + "\n").as_bytes())?;
        eprintln!("reward_augmented: {} pairs from {f} in {}", lines.len(), p.display());
        Ok(p.display().to_string())
    };
    cfg.train_file = relabel(&cfg.train_file, "reward_augmented_train.jsonl")?;
    if let Some(f) = cfg.eval_file.clone() {
        cfg.eval_file = Some(relabel(&f, "reward_augmented_eval.jsonl")?);
    }
    Ok(())
}

/// The data shape must be the one the objective reads: one clear error at start-up.
fn check_shape(objective: &Objective, shape: Option<Shape>, file: &str) -> Result<()> {
    match shape {
        Some(s) if s != objective.shape() => Err(Error::Config(format!(
            "loss_type `{}` reads {} data, but {file} holds {s} rows (pairwise: prompt/chosen/rejected; ranked: prompt/responses/ranks or scores; unpaired: prompt/completion/label)",
            objective.name(),
            objective.shape()
        ))),
        _ => Ok(()),
    }
}

/// KTO's KL estimate needs, for each example, a completion that does not belong to its
/// prompt: the previous example's (in file order, so the pairing is fixed and cacheable).
fn add_mismatched_completions(examples: &mut [TokenizedExample], file: &str, max_length: usize) -> Result<()> {
    let n = examples.len();
    if n < 2 {
        return Err(Error::Config(format!(
            "{file}: KTO's reference point needs at least 2 examples"
        )));
    }
    let completions: Vec<Vec<u32>> = examples.iter().map(|e| e.responses[0].clone()).collect();
    for (i, e) in examples.iter_mut().enumerate() {
        let mut other = completions[(i + n - 1) % n].clone();
        other.truncate(max_length.saturating_sub(e.prompt_ids.len()).max(1));
        e.responses.push(other);
    }
    Ok(())
}
