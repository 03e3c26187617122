//! The trainer core: the loop, gradient accumulation, the optimizer and its schedule, clipping,
//! metrics with TRL's names (`metrics.jsonl` + a progress bar), evaluation, checkpoints with
//! exact resume, and a checkpoint on Ctrl-C. What a step computes is the run's
//! [`crate::algorithms::Algorithm`]; this module knows no method.

pub mod checkpoint;
pub mod order;
pub mod tensorboard;

pub use order::{total_steps, Order};

use crate::algorithms::data::TrainData;
use crate::algorithms::{self, Algorithm, StepCtx};
use crate::config::{Strategy, TrainConfig};
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::optim::{schedule, Optimizer};
use crate::util::{progress_bar, say};
use candle_core::DType;
use checkpoint::TrainerState;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
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

/// What one optimizer step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub metrics: BTreeMap<String, f64>,
    /// Tokens of the step's sequences, each prompt counted once per response (TRL's count).
    pub tokens: usize,
    /// Token positions the policy's forward pass computed under the configured layout
    /// (fewer than `tokens` with shared prompts; more with padding).
    pub positions: usize,
    /// Seconds spent in each phase: `rollout` (the algorithm's work before the micro-batches:
    /// sampling and scoring, an E-step; when it took any), `forward` (policy, reference and
    /// loss), `backward`, `optimizer` (gradient accumulation, clipping and the update).
    pub phases: BTreeMap<&'static str, f64>,
    pub seconds: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

/// Run a training job described by `cfg`.
pub fn train(cfg: &TrainConfig) -> Result<TrainOutcome> {
    Trainer::new(cfg)?.run()
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

/// The [`StepCtx`] of step `$step` (a macro: it borrows the trainer's fields one by one, so
/// the algorithm can be borrowed mutably beside it).
macro_rules! ctx {
    ($t:expr, $step:expr) => {
        StepCtx {
            policy: &$t.policy,
            data: &$t.data,
            cfg: &$t.cfg,
            step: $step,
            total_steps: $t.total,
            accumulation: $t.cfg.gradient_accumulation_steps,
            batches_per_epoch: $t.order.batches_per_epoch(),
            order: &$t.order,
        }
    };
}

/// Everything a run holds: the policy and its optimizer, the data and its order, the
/// algorithm, and progress.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub policy: LoadedModel,
    pub opt: Optimizer,
    pub algorithm: Box<dyn Algorithm>,
    pub data: TrainData,
    pub order: Order,
    pub total: usize,
    pub warmup: usize,
    pub state: TrainerState,
    pub resumed_from: Option<PathBuf>,
    /// Behave as if Ctrl-C came after this step (tests and scripted runs).
    pub stop_after_step: Option<usize>,
    /// Make the loss of these steps (0-based) NaN (tests of the non-finite guard).
    pub inject_nonfinite: Vec<usize>,
    /// This run's hold on its output_dir (released when the trainer is dropped or the
    /// process dies).
    _lock: crate::util::fs::DirLock,
}

impl Trainer {
    /// Load the policy and the data, build the algorithm and the optimizer, restore a checkpoint.
    pub fn new(cfg: &TrainConfig) -> Result<Self> {
        // the output directory first: a run that cannot write there, or whose directory another
        // run is writing to, stops before any work
        let lock = crate::util::fs::DirLock::acquire(&cfg.output_dir())?;
        let resume = resolve_resume(cfg)?;
        let start_path = PathBuf::from(&cfg.model_name_or_path);
        crate::util::memtrace("before load_policy");
        let mut policy = algorithms::load_policy(cfg, resume.as_deref().unwrap_or(&start_path))?;
        crate::util::memtrace("after load_policy");
        policy.transformer.kernels = cfg.kernels();
        if let Some(notice) = cfg.bf16_notice() {
            eprintln!("{notice}");
        }
        let mut cfg = cfg.clone();
        let (policy, mut algorithm, data) = algorithms::build(&mut cfg, policy, resume.as_deref())?;
        if cfg.load_best_model_at_end && !data.has_eval() {
            return Err(Error::Config(
                "load_best_model_at_end needs an eval set: eval_file, a test split of train_file's dataset \
                 (dataset_test_split), or eval_fraction"
                    .into(),
            ));
        }
        crate::util::memtrace("after build");
        let (mut policy, mut opt) = algorithms::trainable(policy, &cfg)?;
        // the policy's only: an extra model an algorithm trains steps on its own
        policy.transformer.set_optimizer_in_backward(cfg.optimizer_in_backward);
        crate::util::memtrace("after trainable");
        let units = algorithm.units_per_micro_batch(cfg.per_device_train_batch_size);
        let total = total_steps(&cfg, data.len(), units, algorithm.steps_per_batch());
        let warmup = schedule::warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, total);
        let order = Order::new(data.len(), units, cfg.data_seed.unwrap_or(cfg.seed), cfg.shuffle);
        let mut state = TrainerState::default();
        if let Some(dir) = &resume {
            state = checkpoint::load_state(dir, &mut opt)?;
            algorithm.restore(dir, &state.algorithm, state.optimizer_steps)?;
            eprintln!("resumed from {} at step {}", dir.display(), state.global_step);
        }
        Ok(Trainer {
            cfg,
            policy,
            opt,
            algorithm,
            data,
            order,
            total,
            warmup,
            state,
            resumed_from: resume,
            stop_after_step: None,
            inject_nonfinite: Vec::new(),
            _lock: lock,
        })
    }

    /// The run's algorithm as its concrete type (`None` for another algorithm).
    pub fn algorithm<A: Algorithm>(&self) -> Option<&A> {
        // through the trait object: `Box<dyn Algorithm>` is itself `Any`
        (*self.algorithm).as_any().downcast_ref::<A>()
    }

    /// One optimizer step over `gradient_accumulation_steps` micro-batches.
    /// Runs on a worker of the thread pool with the other workers kept awake
    /// ([`crate::util::with_workers_awake`]): a step makes thousands of parallel regions, and
    /// each one entered from outside the pool waits for a cold wake-up when it ends (back to back
    /// on `prefer bench dpo`: 143 against 139 tokens/s), as does a worker that fell asleep
    /// between two of them (156 / 159 → 175 / 177 tokens/s kept awake). A reward command that
    /// GRPO runs inside the step shares the cores with the spinning workers.
    pub fn step(&mut self) -> Result<StepReport> {
        crate::util::with_workers_awake(|| self.step_on_worker())
    }

    fn step_on_worker(&mut self) -> Result<StepReport> {
        let step = self.state.global_step;
        let accum = self.cfg.gradient_accumulation_steps;
        // the data of step ⌊step / μ⌋ (μ = the algorithm's steps per batch, GRPO's num_iterations)
        let data_step = step / self.algorithm.steps_per_batch().max(1);
        let batches: Vec<Vec<usize>> = (0..accum)
            .map(|a| self.order.micro_batch(data_step * accum + a))
            .collect();
        let t0 = Instant::now();
        self.algorithm.begin_step(&ctx!(self, step), &batches)?;
        let rollout = t0.elapsed().as_secs_f64();
        let cfg = &self.cfg;
        let lr = schedule::learning_rate(cfg.lr_scheduler_type, cfg.learning_rate, step, self.total, self.warmup);
        self.opt.zero_grad();
        let mut metrics: BTreeMap<String, f64> = BTreeMap::new();
        let mut tokens = 0usize;
        let mut positions = 0usize;
        let mut phases: BTreeMap<&'static str, f64> = BTreeMap::new();
        if rollout > 1e-3 {
            phases.insert("rollout", rollout);
        }
        // a LoRA policy's dropout masks are drawn for this step
        self.policy.transformer.set_dropout_step(Some(step));
        let mut clock = Instant::now();
        let mut lap = |name: &'static str| {
            *phases.entry(name).or_default() += clock.elapsed().as_secs_f64();
            clock = Instant::now();
        };
        for indices in &batches {
            let mut out = self.algorithm.micro_batch(&ctx!(self, step), indices)?;
            if self.inject_nonfinite.contains(&step) {
                out.loss = (out.loss * f64::NAN)?;
            }
            tokens += out.tokens;
            positions += out.positions;
            *metrics.entry("loss".into()).or_default() +=
                out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()? / accum as f64;
            for (k, v) in out.metrics {
                *metrics.entry(k).or_default() += v / accum as f64;
            }
            for (k, v) in out.counts {
                *metrics.entry(k).or_default() += v;
            }
            lap("forward");
            crate::util::memtrace("after forward");
            let mut grads = self.policy.transformer.backward(&(out.loss / accum as f64)?)?;
            lap("backward");
            crate::util::memtrace("after backward");
            // with optimizer_in_backward, some gradients are only measured so far (none without)
            let streamed = self.policy.transformer.streamed_norms()?;
            self.opt.accumulate_streamed(&mut grads, &streamed)?;
            drop(grads);
            lap("optimizer");
        }
        self.policy.transformer.set_dropout_step(None);
        let grad_norm = self.opt.clip_grad_norm(self.cfg.max_grad_norm)?;
        let loss = metrics.get("loss").copied().unwrap_or(0.0);
        if loss.is_finite() && grad_norm.is_finite() {
            self.opt.step(lr)?;
            if self.cfg.optimizer_in_backward {
                lap("optimizer");
                // the streamed gradients again, each part applied as soon as it is made
                let opt = &mut self.opt;
                let mut apply = |id, offset, g: &[f32]| opt.update_streamed(id, offset, g, lr);
                self.policy.transformer.backward_again(Some(&mut apply))?;
                self.opt.check_streamed_done()?;
                lap("backward");
                crate::util::memtrace("after second backward");
            }
            self.state.nonfinite_in_a_row = 0;
        } else {
            self.policy.transformer.backward_again(None)?;
            // the weights and the optimizer's moments stay as they were
            self.state.nonfinite_steps += 1;
            self.state.nonfinite_in_a_row += 1;
            let what = format!("step {}: loss {loss}, gradient norm {grad_norm}", step + 1);
            if self.state.nonfinite_in_a_row > self.cfg.max_nonfinite_steps {
                return Err(Error::msg(format!(
                    "{what}: {} steps in a row were not finite (max_nonfinite_steps = {}), so the run stops; \
                     the last checkpoint in {} is intact. Lower the learning rate, check the data of these steps, \
                     or resume with resume_from_checkpoint = \"latest\"",
                    self.state.nonfinite_in_a_row, self.cfg.max_nonfinite_steps, self.cfg.output_dir
                )));
            }
            eprintln!("{what}: not finite, so this step leaves the weights unchanged");
        }
        self.algorithm.end_step(&ctx!(self, step), &metrics, lr)?;
        lap("optimizer");
        crate::util::memtrace("after optimizer");
        self.state.global_step += 1;
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

    /// `eval_loss` and the algorithm's metrics on `eval_file`, each prefixed with `eval_`.
    pub fn evaluate(&self) -> Result<Vec<(String, f64)>> {
        let ev = self
            .algorithm
            .evaluate(&self.policy, &self.data.eval, self.cfg.per_device_eval_batch_size)?;
        Ok(ev.into_iter().map(|(k, v)| (format!("eval_{k}"), v)).collect())
    }

    /// The metrics record for the current logging window (and resets the window).
    fn log_record(&mut self, with_eval: bool) -> Result<Value> {
        let s = self.state.global_step;
        let epoch = (s * self.cfg.gradient_accumulation_steps) as f64
            / (self.order.batches_per_epoch() * self.algorithm.steps_per_batch().max(1)) as f64;
        let mut rec = Map::new();
        rec.insert("step".into(), json!(s));
        rec.insert("epoch".into(), json!((epoch * 1e4).round() / 1e4));
        let w = std::mem::take(&mut self.state.window);
        for (k, v) in &w.sums {
            rec.insert(k.clone(), json!(v / w.steps.max(1) as f64));
        }
        rec.insert("grad_norm".into(), json!(self.state.last_grad_norm));
        if self.state.nonfinite_steps > 0 {
            rec.insert("nonfinite_steps".into(), json!(self.state.nonfinite_steps));
        }
        rec.insert("learning_rate".into(), json!(self.state.last_lr));
        rec.insert("tokens_per_second".into(), json!(w.tokens as f64 / w.seconds.max(1e-9)));
        for (k, v) in self.algorithm.log_metrics() {
            rec.insert(k, json!(v));
        }
        if with_eval {
            for (k, v) in self.evaluate()? {
                rec.insert(k, json!(v));
            }
        }
        Ok(Value::Object(rec))
    }

    /// Save a checkpoint of the current step: the policy, its optimizer, the trainer's and the
    /// algorithm's state, and what the algorithm keeps beside them.
    fn save_checkpoint(&mut self) -> Result<PathBuf> {
        self.state.algorithm = self.algorithm.state()?;
        let algorithm = &self.algorithm;
        let policy = &self.policy;
        checkpoint::save(
            &self.cfg.output_dir(),
            policy,
            &self.opt,
            &self.state,
            &self.cfg,
            |dir| algorithm.save_checkpoint(dir, policy),
        )
    }

    /// The logged name of metric_for_best_model: `eval_` and the name (default `eval_loss`).
    fn best_metric_key(&self) -> String {
        let m = self.cfg.metric_for_best_model.as_deref().unwrap_or("loss");
        match m.starts_with("eval_") {
            true => m.to_string(),
            false => format!("eval_{m}"),
        }
    }

    /// load_best_model_at_end: record `checkpoint` as the best when the evaluation in `rec`
    /// (made at the step it is saved) beats the best so far.
    fn note_if_best(&mut self, rec: &Value, checkpoint: &std::path::Path) -> Result<()> {
        let key = self.best_metric_key();
        let Some(v) = rec.get(&key).and_then(Value::as_f64) else {
            let logged: Vec<&str> = rec
                .as_object()
                .map(|o| {
                    o.keys()
                        .filter(|k| k.starts_with("eval_"))
                        .map(String::as_str)
                        .collect()
                })
                .unwrap_or_default();
            return Err(Error::Config(format!(
                "metric_for_best_model: the evaluation logs no `{key}`; it logs {}",
                logged.join(", ")
            )));
        };
        let greater = self.cfg.greater_is_better.unwrap_or(!key.ends_with("loss"));
        let better = match self.state.best_metric {
            None => v.is_finite(),
            Some(b) => (greater && v > b) || (!greater && v < b),
        };
        if better {
            self.state.best_metric = Some(v);
            self.state.best_model_checkpoint = Some(checkpoint.to_path_buf());
        }
        Ok(())
    }

    /// Optimizer steps in one pass over the training data.
    fn epoch_steps(&self) -> usize {
        let per_epoch = self.order.batches_per_epoch() / self.cfg.gradient_accumulation_steps.max(1);
        (per_epoch.max(1) * self.algorithm.steps_per_batch().max(1)).max(1)
    }

    /// The loop: steps, logging, evaluation, checkpoints, Ctrl-C.
    pub fn run(&mut self) -> Result<TrainOutcome> {
        let out_dir = self.cfg.output_dir();
        crate::util::create_dir_all(&out_dir)?;
        let metrics_path = out_dir.join("metrics.jsonl");
        crate::util::fs::truncate_jsonl_after_step(&metrics_path, self.state.global_step)?;
        let mut tensorboard = match self.cfg.reports_to_tensorboard() {
            true => {
                let dir = match &self.cfg.logging_dir {
                    Some(d) => PathBuf::from(d),
                    None => out_dir.join("runs"),
                };
                Some(tensorboard::EventWriter::create(&dir, self.state.global_step)?)
            }
            false => None,
        };
        for f in self.algorithm.step_logs() {
            crate::util::fs::truncate_jsonl_after_step(&out_dir.join(f), self.state.global_step)?;
        }
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
            // TrainingArguments' strategies: every N steps, every epoch, or never
            let epoch_steps = self.epoch_steps();
            let due = |strategy: Strategy, every: usize| match strategy {
                Strategy::Steps => every > 0 && s.is_multiple_of(every),
                Strategy::Epoch => s.is_multiple_of(epoch_steps),
                Strategy::No => false,
            };
            let do_eval = self.data.has_eval()
                && cfg.eval_strategy != Strategy::No
                && (due(cfg.eval_strategy, cfg.eval_steps) || s == total);
            let do_log = cfg.logging_strategy != Strategy::No
                && (due(cfg.logging_strategy, cfg.logging_steps.max(1)) || s == total);
            if do_log || do_eval {
                let rec = self.log_record(do_eval)?;
                crate::util::fs::append_jsonl(&metrics_path, &rec)?;
                if let (Some(tb), Some(obj)) = (tensorboard.as_mut(), rec.as_object()) {
                    tb.log(s, obj)?;
                }
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
            let save = match self.cfg.save_strategy {
                Strategy::Steps => s.is_multiple_of(self.cfg.save_steps.max(1)) || s == total,
                Strategy::Epoch => s.is_multiple_of(epoch_steps) || s == total,
                // no checkpoints, except the one Ctrl-C leaves to resume from
                Strategy::No => false,
            };
            if save || stop {
                if do_eval && self.cfg.load_best_model_at_end {
                    let rec = last_log.as_ref().expect("an evaluation logs a record");
                    self.note_if_best(rec, &out_dir.join(format!("checkpoint-{s}")))?;
                }
                last_checkpoint = Some(self.save_checkpoint()?);
                if let Some(limit) = self.cfg.save_total_limit {
                    checkpoint::prune(&out_dir, limit, self.state.best_model_checkpoint.as_deref())?;
                }
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
            let best = match (&self.state.best_model_checkpoint, self.cfg.load_best_model_at_end) {
                (Some(dir), true)
                    if dir.is_dir() && !dir.ends_with(format!("checkpoint-{}", self.state.global_step)) =>
                {
                    eprintln!(
                        "load_best_model_at_end: output_dir holds {} ({} {})",
                        dir.display(),
                        self.best_metric_key(),
                        self.state.best_metric.unwrap_or(f64::NAN)
                    );
                    Some(crate::algorithms::load_policy(&self.cfg, dir)?)
                }
                _ => None,
            };
            crate::model::hf::save_dir(best.as_ref().unwrap_or(&self.policy), &out_dir)?;
            crate::util::write_atomic(
                &out_dir.join(crate::config::RUN_CONFIG_FILE),
                &serde_json::to_vec_pretty(&self.cfg).expect("the config serialises"),
            )?;
            self.algorithm.save_final(&out_dir)?;
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
