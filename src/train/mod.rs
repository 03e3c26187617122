//! The training loop: batching, gradient accumulation, optimizer and schedule, clipping,
//! metrics with TRL's names (`metrics.jsonl` + a progress bar), checkpoints with exact resume,
//! and a checkpoint on Ctrl-C.

pub mod checkpoint;
pub mod optim;
pub mod schedule;

use crate::config::TrainConfig;
use crate::data::{load_tokenized_examples, TokenizedExample};
use crate::error::{Error, Result};
use crate::model::{self, LoadedModel};
use crate::objectives::{self, Objective, PairStats};
use crate::stats::reference::{self, Reference, Split};
use crate::stats::SeqStats;
use crate::stats::{group_logps, score_examples, StatsOptions};
use crate::util::Rng;
use candle_core::{DType, Device};
use checkpoint::TrainerState;
use optim::{OptimKind, Optimizer};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Set (by the CLI's Ctrl-C handler) to ask the loop to save a checkpoint and stop.
pub static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// What a run did.
#[derive(Debug)]
pub struct TrainOutcome {
    pub steps_done: usize,
    pub total_steps: usize,
    pub interrupted: bool,
    pub last_checkpoint: Option<PathBuf>,
    /// The last logged record.
    pub last_log: Option<Value>,
}

/// Metric sums over a logging window (saved in checkpoints so resumed logs are identical).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Window {
    pub sums: BTreeMap<String, f64>,
    pub steps: usize,
    pub tokens: usize,
    pub seconds: f64,
}

/// The data order: micro-batch `k` of an endless stream over epochs, each epoch a seeded
/// permutation (or file order when `shuffle = false`).
pub struct Order {
    n: usize,
    batch: usize,
    seed: u64,
    shuffle: bool,
    cached_epoch: Option<(usize, Vec<usize>)>,
}

impl Order {
    pub fn new(n: usize, batch: usize, seed: u64, shuffle: bool) -> Self {
        Order {
            n,
            batch,
            seed,
            shuffle,
            cached_epoch: None,
        }
    }
    pub fn batches_per_epoch(&self) -> usize {
        self.n.div_ceil(self.batch)
    }
    /// Indices of micro-batch `k`.
    pub fn micro_batch(&mut self, k: usize) -> Vec<usize> {
        let per = self.batches_per_epoch();
        let (epoch, j) = (k / per, k % per);
        if self.cached_epoch.as_ref().map(|c| c.0) != Some(epoch) {
            let mut idx: Vec<usize> = (0..self.n).collect();
            if self.shuffle {
                Rng::new(self.seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407)).shuffle(&mut idx);
            }
            self.cached_epoch = Some((epoch, idx));
        }
        let idx = &self.cached_epoch.as_ref().expect("just set").1;
        idx[j * self.batch..((j + 1) * self.batch).min(self.n)].to_vec()
    }
}

/// Total optimizer steps (transformers' arithmetic: whole update steps per epoch).
pub fn total_steps(cfg: &TrainConfig, n_pairs: usize) -> usize {
    if cfg.max_steps > 0 {
        return cfg.max_steps as usize;
    }
    let batches = n_pairs.div_ceil(cfg.per_device_train_batch_size);
    let per_epoch = (batches / cfg.gradient_accumulation_steps).max(1);
    (cfg.num_train_epochs * per_epoch as f64).ceil() as usize
}

fn progress_bar(total: usize, hidden: bool) -> indicatif::ProgressBar {
    if hidden {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:30}] {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}

fn say(pb: &indicatif::ProgressBar, msg: &str) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

/// Find the checkpoint to resume from: a path, or "latest"/"true" for the newest complete
/// `checkpoint-N` in `output_dir`.
pub fn resolve_resume(cfg: &TrainConfig) -> Result<Option<PathBuf>> {
    match cfg.resume_from_checkpoint.as_deref() {
        None | Some("") | Some("false") => Ok(None),
        Some("latest") | Some("true") => checkpoint::latest(&cfg.output_dir()).map(Some).ok_or_else(|| {
            Error::Config(format!(
                "resume_from_checkpoint = \"latest\" but {} holds no complete checkpoint",
                cfg.output_dir
            ))
        }),
        Some(p) => {
            let p = PathBuf::from(p);
            if p.join(checkpoint::STATE_FILE).is_file() {
                Ok(Some(p))
            } else {
                Err(Error::Config(format!(
                    "{} is not a complete checkpoint (no {})",
                    p.display(),
                    checkpoint::STATE_FILE
                )))
            }
        }
    }
}

/// The data shape must be the one the objective reads: one clear error at start-up.
fn check_shape(objective: &Objective, shape: Option<crate::data::Shape>, file: &str) -> Result<()> {
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

/// Objective statistics for a batch of examples.
fn batch_stats(
    policy: &LoadedModel,
    reference: &Reference,
    split: Split,
    indices: &[usize],
    examples: &[TokenizedExample],
    opts: &StatsOptions,
    clusters: Option<&BTreeMap<String, usize>>,
) -> Result<SeqStats> {
    let batch: Vec<&TokenizedExample> = indices.iter().map(|&i| &examples[i]).collect();
    let heads: Option<Vec<usize>> = clusters.map(|c| {
        batch
            .iter()
            .map(|e| e.meta.annotator.as_ref().and_then(|a| c.get(a)).copied().unwrap_or(0))
            .collect()
    });
    let lp = if policy.transformer.cfg.reward_head {
        crate::stats::group_rewards(&policy.transformer, &batch, policy.tokenizer.pad_id, heads.as_deref())?
    } else {
        group_logps(&policy.transformer, &batch, opts)?
    };
    let reference = reference.logps(split, indices, &batch, policy.transformer.dtype(), opts)?;
    Ok(SeqStats { reference, ..lp })
}

/// Evaluate the objective on a whole set (no gradient): `eval_loss` and the objective's metrics
/// prefixed with `eval_`.
pub fn evaluate(
    policy: &LoadedModel,
    reference: &Reference,
    objective: &Objective,
    pairs: &[TokenizedExample],
    batch_size: usize,
    opts: &StatsOptions,
    clusters: Option<&BTreeMap<String, usize>>,
) -> Result<Vec<(String, f64)>> {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let all: Vec<usize> = (0..pairs.len()).collect();
    for chunk in all.chunks(batch_size.max(1)) {
        let stats = batch_stats(policy, reference, Split::Eval, chunk, pairs, opts, clusters)?;
        let out = objective.loss(&stats)?;
        let w = chunk.len() as f64;
        *sums.entry("loss".into()).or_default() += objectives::mean(&out.losses)? * w;
        for (k, v) in out.metrics {
            *sums.entry(k).or_default() += v * w;
        }
    }
    Ok(sums
        .into_iter()
        .map(|(k, v)| (format!("eval_{k}"), v / pairs.len() as f64))
        .collect())
}

/// Everything a run holds: models, data, objective, optimizer and progress.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub policy: LoadedModel,
    pub reference: Reference,
    pub objective: Objective,
    pub opt: Optimizer,
    pub order: Order,
    pub train_pairs: Vec<TokenizedExample>,
    pub eval_pairs: Vec<TokenizedExample>,
    pub total: usize,
    pub warmup: usize,
    pub state: TrainerState,
    pub resumed_from: Option<PathBuf>,
    /// Behave as if Ctrl-C came after this step (tests and scripted runs).
    pub stop_after_step: Option<usize>,
    pub stats_options: StatsOptions,
    /// Collaborative reward modeling: the peer reward model and its optimizer.
    pub peer: Option<Peer>,
}

/// CRM's second reward model: each model trains on the pairs its peer is most confident about.
pub struct Peer {
    pub model: LoadedModel,
    pub opt: Optimizer,
}

/// 1.0 for the `ceil(keep · B)` pairs with the largest margins, 0.0 for the rest.
pub fn confident_mask(margins: &[f64], keep: f64) -> Vec<f64> {
    let n = ((keep * margins.len() as f64).ceil() as usize).clamp(1, margins.len());
    let mut idx: Vec<usize> = (0..margins.len()).collect();
    idx.sort_by(|&a, &b| margins[b].total_cmp(&margins[a]));
    let mut m = vec![0.0; margins.len()];
    for &i in &idx[..n] {
        m[i] = 1.0;
    }
    m
}

/// What one optimizer step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub metrics: BTreeMap<String, f64>,
    /// Tokens of the step's sequences, each prompt counted once per response (TRL's count).
    pub tokens: usize,
    /// Token positions the policy's forward pass computed under the configured layout
    /// (fewer than `tokens` with shared prompts; more with padding).
    pub positions: usize,
    /// Seconds spent in each phase: `forward` (policy, reference and loss), `backward`,
    /// `optimizer` (gradient accumulation, clipping and the update).
    pub phases: BTreeMap<&'static str, f64>,
    pub seconds: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

/// Run a training job described by `cfg`.
pub fn train(cfg: &TrainConfig) -> Result<TrainOutcome> {
    Trainer::new(cfg)?.run()
}

impl Trainer {
    /// Load models and data, build the reference and the optimizer, restore a checkpoint.
    pub fn new(cfg: &TrainConfig) -> Result<Self> {
        let dev = Device::Cpu;
        let dtype = DType::F32;
        let resume = resolve_resume(cfg)?;
        let start_path = PathBuf::from(&cfg.model_name_or_path);
        let mut policy = model::load(resume.as_deref().unwrap_or(&start_path), dtype, &dev)?;
        policy.transformer.kernels = cfg.kernels();
        if cfg.bf16 && !model::kernels::matmul::amx_available() {
            eprintln!(
                "bf16 = true: this CPU (or kernel) offers no AMX tiles, so the bf16 products run through the f32 GEMM: the same numbers, at f32 speed"
            );
        }
        let opts = cfg.tokenize_options();
        let mut cfg = cfg.clone();
        if cfg.reward_augmented {
            // relabel into files beside the run's outputs, then train on those
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
        }
        let cfg = &cfg;
        let (train_pairs, report) =
            load_tokenized_examples(Path::new(&cfg.train_file), &policy.tokenizer, &opts, cfg.skip_invalid)?;
        for e in &report.skipped {
            eprintln!("skipped: {e}");
        }
        let objective = cfg.objective()?;
        check_shape(&objective, report.shape, &cfg.train_file)?;
        let mut eval_pairs = match &cfg.eval_file {
            Some(f) => {
                let (p, r) = load_tokenized_examples(Path::new(f), &policy.tokenizer, &opts, cfg.skip_invalid)?;
                for e in &r.skipped {
                    eprintln!("skipped (eval): {e}");
                }
                check_shape(&objective, r.shape, f)?;
                p
            }
            None => vec![],
        };
        let mut train_pairs = train_pairs;
        if objective.needs_kl() {
            add_mismatched_completions(&mut train_pairs, &cfg.train_file, cfg.max_length)?;
            if !eval_pairs.is_empty() {
                add_mismatched_completions(&mut eval_pairs, cfg.eval_file.as_deref().unwrap_or(""), cfg.max_length)?;
            }
        }
        eprintln!(
            "train_file: {} {} examples ({}; {} skipped, {} prompts and {} completions truncated)",
            train_pairs.len(),
            report.shape.map(|f| f.to_string()).unwrap_or_default(),
            report.format.map(|f| f.to_string()).unwrap_or_default(),
            report.skipped.len(),
            report.prompts_truncated,
            report.completions_truncated
        );

        // The reference: the starting model (or ref_model, a weight-space soup when a list),
        // also when resuming; with sync_ref_model a resumed run restores the synced reference.
        let ref_paths = match &cfg.ref_model {
            Some(r) => r.paths(),
            None => vec![start_path.clone()],
        };
        let synced_ref = resume
            .as_ref()
            .map(|d| d.join(checkpoint::REF_DIR))
            .filter(|d| d.is_dir());
        let load_ref = || -> Result<LoadedModel> {
            let mut m = if let Some(d) = &synced_ref {
                model::load(d, dtype, &dev)?
            } else if resume.is_none() && ref_paths == [start_path.clone()] {
                // the starting model; its layers stay in the checkpoint's precision unless
                // sync_ref_model must mix weights into them
                let compact = match cfg.sync_ref_model {
                    false => model::load_frozen(&start_path, dtype, &dev)?,
                    true => None,
                };
                match compact {
                    Some(m) => {
                        if let Some(c) = &m.transformer.compact {
                            eprintln!(
                                "reference model: decoder layers kept as stored ({:.1} MiB instead of {:.1} MiB), widened layer by layer",
                                c.bytes() as f64 / 1048576.0,
                                c.widened_bytes() as f64 / 1048576.0
                            );
                        }
                        m
                    }
                    None => policy.frozen_copy()?,
                }
            } else {
                model::load_soup(&ref_paths, dtype, &dev)?
            };
            m.transformer.kernels = cfg.kernels();
            Ok(m)
        };
        let reference = if !objective.needs_reference() {
            Reference::None
        } else if cfg.precompute_ref_log_probs {
            let cache_dir = cfg.cache_dir();
            let mut loaded: Option<(LoadedModel, u64)> = None;
            let mut tables = Vec::new();
            for (name, pairs) in [("train", &train_pairs), ("eval", &eval_pairs)] {
                if pairs.is_empty() {
                    tables.push(vec![]);
                    continue;
                }
                if loaded.is_none() {
                    let m = load_ref()?;
                    let h = reference::model_hash(&m)?;
                    loaded = Some((m, h));
                }
                let (m, h) = loaded.as_ref().expect("loaded above");
                let path = reference::cache_path(&cache_dir, *h, pairs, dtype, cfg.bf16, &cfg.stats_options());
                match reference::load_cache(&path, pairs.len()) {
                    Some(v) => {
                        eprintln!("reference log-probs ({name}): reusing {}", path.display());
                        tables.push(v)
                    }
                    None => {
                        let pb = progress_bar(pairs.len(), cfg.disable_tqdm);
                        pb.set_prefix(format!("reference log-probs ({name})"));
                        let v = score_examples(
                            &m.transformer,
                            pairs,
                            cfg.per_device_eval_batch_size,
                            &cfg.stats_options(),
                            |n| pb.inc(n as u64),
                        )?;
                        pb.finish_and_clear();
                        reference::store_cache(&path, &v)?;
                        eprintln!(
                            "reference log-probs ({name}): computed and cached in {}",
                            path.display()
                        );
                        tables.push(v)
                    }
                }
            }
            drop(loaded); // the reference model leaves memory here
            let eval = tables.pop().unwrap_or_default();
            let train = tables.pop().unwrap_or_default();
            Reference::Cached { train, eval }
        } else {
            Reference::Model(Box::new(load_ref()?.transformer))
        };

        // a reward model's head: Gaussian (mean, log-variance) for `gaussian`, else one per cluster
        let gaussian = objective.needs_reward_variance();
        let add_head = |m: LoadedModel, seed: u64| match gaussian {
            true => m.with_gaussian_reward_head(seed),
            false => m.with_reward_heads(seed, cfg.reward_clusters.max(1)),
        };
        let policy = if cfg.task == "reward" {
            add_head(policy, cfg.seed)?
        } else {
            policy
        };
        if cfg.reward_clusters > 1 {
            if let Some(e) = train_pairs.iter().find(|e| e.meta.annotator.is_none()) {
                return Err(Error::Data {
                    path: PathBuf::from(&cfg.train_file),
                    line: e.line,
                    field: "annotator".into(),
                    msg: "missing; reward_clusters > 1 clusters annotators, so every row needs one".into(),
                });
            }
        }
        if policy.transformer.cfg.reward_head && cfg.task != "reward" {
            return Err(Error::Config(format!(
                "{} is a reward model (it has a score head); set task = \"reward\" or start from a causal LM",
                policy.source.display()
            )));
        }
        let mut policy = policy;
        policy
            .transformer
            .set_gradient_checkpointing(cfg.gradient_checkpointing);
        policy.transformer.set_sparse_embedding_grad(true);
        policy.transformer.set_layer_graphs(true);
        let (policy, vars) = policy.into_trainable()?;
        let kind = if cfg.optim == "sgd" {
            OptimKind::Sgd
        } else {
            OptimKind::AdamW {
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
            }
        };
        let mut opt = Optimizer::new(kind.clone(), cfg.weight_decay, vars);
        let total = total_steps(cfg, train_pairs.len());
        let warmup = schedule::warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, total);
        let order = Order::new(
            train_pairs.len(),
            cfg.per_device_train_batch_size,
            cfg.seed,
            cfg.shuffle,
        );
        let mut state = TrainerState::default();
        let mut objective = objective;
        let mut peer = if cfg.crm {
            // same start, another head initialisation; a resumed run restores the peer and its optimizer
            let saved = resume
                .as_ref()
                .map(|d| d.join(checkpoint::PEER_DIR))
                .filter(|d| d.is_dir());
            let m = match &saved {
                Some(d) => model::load(d, dtype, &dev)?,
                None => add_head(model::load(&start_path, dtype, &dev)?, cfg.seed.wrapping_add(1))?,
            };
            let mut m = m;
            m.transformer.kernels = cfg.kernels();
            m.transformer.set_gradient_checkpointing(cfg.gradient_checkpointing);
            m.transformer.set_sparse_embedding_grad(true);
            m.transformer.set_layer_graphs(true);
            let (m, vars) = m.into_trainable()?;
            let popt = Optimizer::new(kind.clone(), cfg.weight_decay, vars);
            Some(Peer { model: m, opt: popt })
        } else {
            None
        };

        if let Some(dir) = &resume {
            state = checkpoint::load_state(dir, &mut opt)?;
            if let Some(p) = &mut peer {
                checkpoint::load_optimizer(&dir.join(checkpoint::PEER_DIR), &mut p.opt, state.optimizer_steps)?;
            }
            if let Some(eta) = state.lcpo_noise_rate {
                objective.params.lcpo_noise_rate = eta;
            }
            eprintln!("resumed from {} at step {}", dir.display(), state.global_step);
        }
        Ok(Trainer {
            cfg: cfg.clone(),
            policy,
            reference,
            objective,
            opt,
            order,
            train_pairs,
            eval_pairs,
            total,
            warmup,
            state,
            resumed_from: resume,
            stop_after_step: None,
            stats_options: cfg.stats_options(),
            peer,
        })
    }

    /// One optimizer step over `gradient_accumulation_steps` micro-batches.
    /// MaxMin-RLHF's E-step: assign each annotator to the reward head under which their
    /// preferences are most likely (Σ log σ(r_k(y_w) − r_k(y_l)) over their pairs), and record
    /// cluster sizes and per-cluster accuracy.
    pub fn e_step(&mut self) -> Result<()> {
        let k = self.policy.transformer.cfg.num_labels;
        let scores = crate::stats::score_reward_heads(
            &self.policy.transformer,
            &self.train_pairs,
            self.cfg.per_device_eval_batch_size,
            self.policy.tokenizer.pad_id,
        )?;
        let mut ll: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (e, s) in self.train_pairs.iter().zip(&scores) {
            let a = e.meta.annotator.clone().unwrap_or_default();
            let row = ll.entry(a).or_insert_with(|| vec![0.0; k]);
            for (h, v) in row.iter_mut().enumerate() {
                *v += crate::util::log_sigmoid(s[0][h] - s[1][h]);
            }
        }
        let assign: BTreeMap<String, usize> = ll
            .into_iter()
            .map(|(a, row)| {
                let best = (0..k).max_by(|&x, &y| row[x].total_cmp(&row[y])).unwrap_or(0);
                (a, best)
            })
            .collect();
        let mut m = BTreeMap::new();
        for h in 0..k {
            let members = assign.values().filter(|&&c| c == h).count();
            let (mut right, mut n) = (0usize, 0usize);
            for (e, s) in self.train_pairs.iter().zip(&scores) {
                if e.meta.annotator.as_ref().and_then(|a| assign.get(a)) == Some(&h) {
                    n += 1;
                    right += (s[0][h] > s[1][h]) as usize;
                }
            }
            m.insert(format!("maxmin/cluster_{h}_annotators"), members as f64);
            m.insert(
                format!("maxmin/cluster_{h}_accuracy"),
                if n > 0 { right as f64 / n as f64 } else { f64::NAN },
            );
        }
        self.state.clusters = Some(assign);
        self.state.em_metrics = m;
        Ok(())
    }

    pub fn step(&mut self) -> Result<StepReport> {
        if self.cfg.reward_clusters > 1 {
            let every = if self.cfg.em_steps > 0 {
                self.cfg.em_steps
            } else {
                (self.order.batches_per_epoch() / self.cfg.gradient_accumulation_steps).max(1)
            };
            if self.state.clusters.is_none() || self.state.global_step.is_multiple_of(every) {
                self.e_step()?;
            }
        }
        let t0 = Instant::now();
        let cfg = &self.cfg;
        let accum = cfg.gradient_accumulation_steps;
        let step = self.state.global_step;
        let lr = schedule::learning_rate(&cfg.lr_scheduler_type, cfg.learning_rate, step, self.total, self.warmup);
        self.opt.zero_grad();
        if let Some(p) = &mut self.peer {
            p.opt.zero_grad();
        }
        let mut metrics: BTreeMap<String, f64> = BTreeMap::new();
        let mut tokens = 0usize;
        let mut positions = 0usize;
        let mut phases: BTreeMap<&'static str, f64> = BTreeMap::new();
        let mut clock = Instant::now();
        let mut lap = |name: &'static str| {
            *phases.entry(name).or_default() += clock.elapsed().as_secs_f64();
            clock = Instant::now();
        };
        for a in 0..accum {
            let indices = self.order.micro_batch(step * accum + a);
            tokens += indices.iter().map(|&i| self.train_pairs[i].num_tokens()).sum::<usize>();
            let batch: Vec<&TokenizedExample> = indices.iter().map(|&i| &self.train_pairs[i]).collect();
            // reward models score padded separate sequences (stats::group_rewards)
            let layout = if self.policy.transformer.cfg.reward_head {
                crate::batch::Layout::PADDED
            } else {
                self.stats_options.layout
            };
            positions += crate::batch::forward_positions(&batch, layout);
            let stats = batch_stats(
                &self.policy,
                &self.reference,
                Split::Train,
                &indices,
                &self.train_pairs,
                &self.stats_options,
                self.state.clusters.as_ref(),
            )?;
            let out = self.objective.loss(&stats)?;
            let loss = match &mut self.peer {
                None => out.losses.mean_all()?,
                Some(peer) => {
                    // CRM: each model learns only from the pairs its peer finds most confident
                    let pstats = batch_stats(
                        &peer.model,
                        &Reference::None,
                        Split::Train,
                        &indices,
                        &self.train_pairs,
                        &self.stats_options,
                        None,
                    )?;
                    let pout = self.objective.loss(&pstats)?;
                    let margins = |st: &SeqStats| -> Result<Vec<f64>> {
                        let p = PairStats::from_stats(st)?;
                        Ok((&p.policy_chosen - &p.policy_rejected)?
                            .detach()
                            .to_dtype(DType::F64)?
                            .to_vec1()?)
                    };
                    // co-teaching's schedule: filter nothing at first, all of 1 − keep after the warmup
                    let warmup = (cfg.crm_warmup_ratio * self.total as f64).ceil();
                    let ramp = if warmup > 0.0 {
                        (step as f64 / warmup).min(1.0)
                    } else {
                        1.0
                    };
                    let keep = 1.0 - (1.0 - cfg.crm_keep_ratio) * ramp;
                    let (own, peer_m) = (margins(&stats)?, margins(&pstats)?);
                    let mask_for_self = confident_mask(&peer_m, keep);
                    let mask_for_peer = confident_mask(&own, keep);
                    let masked_mean = |l: &candle_core::Tensor, m: &[f64]| -> Result<candle_core::Tensor> {
                        let t = candle_core::Tensor::new(m, l.device())?.to_dtype(l.dtype())?;
                        Ok(((l * t)?.sum_all()? / m.iter().sum::<f64>())?)
                    };
                    let ploss = masked_mean(&pout.losses, &mask_for_peer)?;
                    let mut pgrads = peer.model.transformer.backward(&(ploss / accum as f64)?)?;
                    peer.opt.accumulate(&mut pgrads)?;
                    let dropped = |m: &[f64]| m.iter().filter(|&&x| x == 0.0).count() as f64;
                    *metrics.entry("crm/filtered_for_model".into()).or_default() += dropped(&mask_for_self);
                    *metrics.entry("crm/filtered_for_peer".into()).or_default() += dropped(&mask_for_peer);
                    masked_mean(&out.losses, &mask_for_self)?
                }
            };
            *metrics.entry("loss".into()).or_default() += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? / accum as f64;
            for (k, v) in out.metrics {
                *metrics.entry(k).or_default() += v / accum as f64;
            }
            lap("forward");
            crate::util::memtrace("after forward");
            let mut grads = self.policy.transformer.backward(&(loss / accum as f64)?)?;
            lap("backward");
            crate::util::memtrace("after backward");
            self.opt.accumulate(&mut grads)?;
            drop(grads);
            lap("optimizer");
        }
        // LCPO's M-step: move η towards this step's estimate of the label-noise rate
        if let Some(est) = metrics.get("lcpo/estimated_noise") {
            let eta = 0.9 * self.objective.params.lcpo_noise_rate + 0.1 * est;
            self.objective.params.lcpo_noise_rate = eta;
            self.state.lcpo_noise_rate = Some(eta);
        }
        let grad_norm = self.opt.clip_grad_norm(self.cfg.max_grad_norm)?;
        self.opt.step(lr)?;
        if let Some(p) = &mut self.peer {
            p.opt.clip_grad_norm(self.cfg.max_grad_norm)?;
            p.opt.step(lr)?;
        }
        lap("optimizer");
        crate::util::memtrace("after optimizer");
        self.state.global_step += 1;
        if cfg.sync_ref_model && self.state.global_step.is_multiple_of(cfg.ref_model_sync_steps) {
            if let Reference::Model(r) = &self.reference {
                let mixed = model::mix_into_reference(r, &self.policy.transformer, cfg.ref_model_mixup_alpha)?;
                self.reference = Reference::Model(Box::new(mixed));
            }
        }
        let seconds = t0.elapsed().as_secs_f64();
        let w = &mut self.state.window;
        for (k, v) in &metrics {
            *w.sums.entry(k.clone()).or_default() += v;
        }
        w.steps += 1;
        w.tokens += tokens;
        w.seconds += seconds;
        self.state.last_grad_norm = grad_norm;
        self.state.last_lr = lr;
        Ok(StepReport {
            metrics,
            tokens,
            positions,
            phases,
            seconds,
            grad_norm,
            lr,
        })
    }

    /// The metrics record for the current logging window (and resets the window).
    fn log_record(&mut self, with_eval: bool) -> Result<Value> {
        let s = self.state.global_step;
        let epoch = (s * self.cfg.gradient_accumulation_steps) as f64 / self.order.batches_per_epoch() as f64;
        let mut rec = Map::new();
        rec.insert("step".into(), json!(s));
        rec.insert("epoch".into(), json!((epoch * 1e4).round() / 1e4));
        let w = std::mem::take(&mut self.state.window);
        for (k, v) in &w.sums {
            rec.insert(k.clone(), json!(v / w.steps.max(1) as f64));
        }
        rec.insert("grad_norm".into(), json!(self.state.last_grad_norm));
        rec.insert("learning_rate".into(), json!(self.state.last_lr));
        rec.insert("tokens_per_second".into(), json!(w.tokens as f64 / w.seconds.max(1e-9)));
        for (k, v) in &self.state.em_metrics {
            rec.insert(k.clone(), json!(v));
        }
        if with_eval {
            let ev = evaluate(
                &self.policy,
                &self.reference,
                &self.objective,
                &self.eval_pairs,
                self.cfg.per_device_eval_batch_size,
                &self.stats_options,
                self.state.clusters.as_ref(),
            )?;
            for (k, v) in ev {
                rec.insert(k, json!(v));
            }
        }
        Ok(Value::Object(rec))
    }

    /// The loop: steps, logging, evaluation, checkpoints, Ctrl-C.
    pub fn run(&mut self) -> Result<TrainOutcome> {
        let out_dir = self.cfg.output_dir();
        crate::util::create_dir_all(&out_dir)?;
        let metrics_path = out_dir.join("metrics.jsonl");
        checkpoint::truncate_metrics(&metrics_path, self.state.global_step)?;
        let total = self.total;
        let pb = progress_bar(total, self.cfg.disable_tqdm);
        pb.set_prefix("train");
        pb.set_position(self.state.global_step as u64);
        let (mut last_checkpoint, mut last_log, mut interrupted) = (None, None, false);
        while self.state.global_step < total {
            self.step()?;
            pb.inc(1);
            let s = self.state.global_step;
            let cfg = &self.cfg;
            let do_eval =
                !self.eval_pairs.is_empty() && ((cfg.eval_steps > 0 && s.is_multiple_of(cfg.eval_steps)) || s == total);
            if s.is_multiple_of(cfg.logging_steps.max(1)) || s == total || do_eval {
                let rec = self.log_record(do_eval)?;
                checkpoint::append_metrics(&metrics_path, &rec)?;
                let get = |k: &str| rec.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
                pb.set_message(format!(
                    "loss {:.4} acc {:.2} margin {:.3} tok/s {:.0}",
                    get("loss"),
                    get("rewards/accuracies"),
                    get("rewards/margins"),
                    get("tokens_per_second")
                ));
                if pb.is_hidden() && !self.cfg.disable_tqdm {
                    say(&pb, &rec.to_string());
                }
                last_log = Some(rec);
            }
            let stop = STOP_REQUESTED.load(Ordering::SeqCst) || self.stop_after_step == Some(s);
            if s.is_multiple_of(self.cfg.save_steps.max(1)) || s == total || stop {
                // with sync_ref_model the reference has moved: keep it for an exact resume
                let synced = match (&self.reference, self.cfg.sync_ref_model) {
                    (Reference::Model(r), true) => Some(LoadedModel {
                        transformer: (**r).clone(),
                        ..self.policy.clone()
                    }),
                    _ => None,
                };
                let peer = self.peer.as_ref().map(|p| (&p.model, &p.opt));
                last_checkpoint = Some(checkpoint::save(
                    &out_dir,
                    &self.policy,
                    synced.as_ref(),
                    peer,
                    &self.opt,
                    &self.state,
                    &self.cfg,
                )?);
            }
            if stop && s < total {
                interrupted = true;
                say(
                    &pb,
                    &format!(
                        "interrupted at step {s}: checkpoint saved in {}; continue with --set resume_from_checkpoint=latest",
                        last_checkpoint.as_ref().map(|p: &PathBuf| p.display().to_string()).unwrap_or_default()
                    ),
                );
                break;
            }
        }
        pb.finish_and_clear();
        if !interrupted {
            crate::model::hf::save_dir(&self.policy, &out_dir)?;
            if let Some(p) = &self.peer {
                crate::model::hf::save_dir(&p.model, &out_dir.join(checkpoint::PEER_DIR))?;
            }
        }
        Ok(TrainOutcome {
            steps_done: self.state.global_step,
            total_steps: total,
            interrupted,
            last_checkpoint,
            last_log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_order_is_seeded_and_file_order_without_shuffle() {
        let mut plain = Order::new(10, 4, 42, false);
        assert_eq!(plain.batches_per_epoch(), 3);
        assert_eq!(plain.micro_batch(0), vec![0, 1, 2, 3]);
        assert_eq!(plain.micro_batch(2), vec![8, 9]);
        assert_eq!(
            plain.micro_batch(3),
            vec![0, 1, 2, 3],
            "epoch 2 starts over in file order"
        );
        let mut a = Order::new(10, 4, 42, true);
        let mut b = Order::new(10, 4, 42, true);
        let ea: Vec<usize> = (0..3).flat_map(|k| a.micro_batch(k)).collect();
        let eb: Vec<usize> = (0..3).flat_map(|k| b.micro_batch(k)).collect();
        assert_eq!(ea, eb, "same seed, same order");
        assert_ne!(ea, (0..10).collect::<Vec<_>>());
        let mut sorted = ea.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>(), "an epoch visits every pair once");
        let e2: Vec<usize> = (3..6).flat_map(|k| a.micro_batch(k)).collect();
        assert_ne!(ea, e2, "each epoch is reshuffled");
        let mut c = Order::new(10, 4, 7, true);
        let ec: Vec<usize> = (0..3).flat_map(|k| c.micro_batch(k)).collect();
        assert_ne!(ea, ec, "another seed, another order");
    }

    #[test]
    fn total_steps_follow_transformers() {
        let cfg = TrainConfig {
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 2,
            num_train_epochs: 1.5,
            ..TrainConfig::default()
        };
        // 10 pairs -> 3 batches -> 1 update/epoch (floor) -> ceil(1.5) = 2
        assert_eq!(total_steps(&cfg, 10), 2);
        assert_eq!(total_steps(&TrainConfig { max_steps: 7, ..cfg }, 10), 7);
    }
}
