//! Training algorithms: what one optimizer step of a method computes, behind the small
//! [`Algorithm`] trait that the trainer core (`train`, above this module) runs. The core owns the loop,
//! gradient accumulation, clipping, schedules, checkpoints, resume, logging and Ctrl-C, and
//! knows nothing of any one method; an algorithm owns everything else it needs: its objective,
//! extra models (a reference, a peer reward model, later a reward model or a teacher), and
//! state that checkpoints save and restore.
//!
//! - [`preference::Preference`]: offline preference objectives (the DPO family, reference-free,
//!   unpaired, listwise), with the reference source and TR-DPO's reference sync.
//! - [`reward::RewardModel`]: reward models, with MaxMin's EM over annotator clusters
//!   ([`maxmin`]) and collaborative reward modeling's peer model ([`crm`]).
//! - [`grpo::Grpo`]: GRPO and RLOO (online, groups of completions per prompt).
//! - [`online_pairs::OnlinePairs`]: online DPO / IPO, Nash-MD and XPO (online, two completions
//!   per prompt ranked by the reward).
//! - [`sft::Sft`]: supervised fine-tuning (the NLL of text, completions or assistant turns).
//!
//! [`rollout`] holds what the online methods share: rewards, sampling options, per-step seeds,
//! reward statistics and the completions log.
//!
//! An online method plugs in the same way: [`Algorithm::begin_step`] is its rollout (sample
//! with the policy, score with rewards), [`Algorithm::micro_batch`] its loss on the rollout.

pub mod crm;
pub mod data;
pub mod grpo;
pub mod grpo_loss;
pub mod maxmin;
pub mod online_pairs;
pub mod preference;
pub mod reward;
pub mod rollout;
pub mod sft;

use crate::config::{Task, TrainConfig};
use crate::data::TokenizedExample;
use crate::error::Result;
use crate::model::LoadedModel;
use crate::objectives::Objective;
use crate::optim::{OptimKind, Optimizer};
use candle_core::Tensor;
use data::TrainData;
use serde_json::Value;
use std::any::Any;
use std::collections::BTreeMap;
use std::path::Path;

/// What the trainer core tells an algorithm about the step it is in.
pub struct StepCtx<'a> {
    /// The model being trained (its parameters are the optimizer's variables).
    pub policy: &'a LoadedModel,
    pub data: &'a TrainData,
    pub cfg: &'a TrainConfig,
    /// The optimizer step being computed (0-based); in [`Algorithm::end_step`], the step just
    /// finished.
    pub step: usize,
    pub total_steps: usize,
    /// Micro-batches per optimizer step (the core divides each micro-batch's loss by it).
    pub accumulation: usize,
    /// Micro-batches in one pass over the training set.
    pub batches_per_epoch: usize,
    /// The data order, for an algorithm whose data window is not the step's own micro-batches
    /// (GRPO's `steps_per_generation`).
    pub order: &'a dyn DataOrder,
}

/// The run's data order as the core keeps it: the units micro-batch `k` holds (`k` counts
/// micro-batches from the start of training, across epochs).
pub trait DataOrder {
    fn micro_batch(&self, k: usize) -> Vec<usize>;
}

/// One micro-batch's loss and what it measured.
pub struct MicroBatch {
    /// The scalar loss, differentiable in the policy's parameters.
    pub loss: Tensor,
    /// Named metrics (TRL's names), each a micro-batch mean; the core averages them over the
    /// step's micro-batches.
    pub metrics: Vec<(String, f64)>,
    /// Named counts, summed over the step's micro-batches (e.g. CRM's filtered pairs).
    pub counts: Vec<(String, f64)>,
    /// Tokens of the micro-batch's sequences, each prompt counted once per response (TRL's
    /// count, behind `tokens_per_second`).
    pub tokens: usize,
    /// Token positions the policy's forward pass computed (padding included).
    pub positions: usize,
}

/// Access to an algorithm as its concrete type (the trainer's `Trainer::algorithm`), for
/// every `'static` type.
pub trait AsAny: Any {
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A training method, as the trainer core runs it.
pub trait Algorithm: AsAny + Send {
    /// Before a step's micro-batches (`batches`: the indices of each): an online method's
    /// rollout, MaxMin's E-step.
    fn begin_step(&mut self, _ctx: &StepCtx, _batches: &[Vec<usize>]) -> Result<()> {
        Ok(())
    }

    /// Units of the data order (examples, or an online run's prompts) in a micro-batch of
    /// `per_device_train_batch_size` (GRPO's counts completions: that many / num_generations).
    fn units_per_micro_batch(&self, per_device_train_batch_size: usize) -> usize {
        per_device_train_batch_size
    }

    /// Optimizer steps each step's data serves (GRPO's `num_iterations`: the same prompts, and
    /// the same completions, for μ steps); the core repeats the data order that many times.
    fn steps_per_batch(&self) -> usize {
        1
    }

    /// The loss of the micro-batch of training examples at `indices`.
    fn micro_batch(&mut self, ctx: &StepCtx, indices: &[usize]) -> Result<MicroBatch>;

    /// After the policy's update, with the step's averaged metrics and learning rate: the
    /// algorithm's own models and state move here (a peer's update, TR-DPO's reference sync,
    /// LCPO's M-step).
    fn end_step(&mut self, _ctx: &StepCtx, _metrics: &BTreeMap<String, f64>, _lr: f64) -> Result<()> {
        Ok(())
    }

    /// Held-out metrics (without the `eval_` prefix the core adds); none by default (the online
    /// methods read prompts, not held-out pairs).
    fn evaluate(
        &self,
        _policy: &LoadedModel,
        _eval: &[TokenizedExample],
        _batch_size: usize,
    ) -> Result<Vec<(String, f64)>> {
        Ok(Vec::new())
    }

    /// Files in `output_dir` this algorithm appends step-keyed JSON lines to (each line has a
    /// `step`): the core cuts them back to the step a run starts from, as `metrics.jsonl`.
    fn step_logs(&self) -> &[&'static str] {
        &[]
    }

    /// Metrics added to every log record (e.g. MaxMin's cluster sizes).
    fn log_metrics(&self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }

    /// State that a checkpoint keeps in `trainer_state.json` for an exact resume.
    fn state(&self) -> Result<Value> {
        Ok(Value::Null)
    }

    /// Write what else a checkpoint needs (extra models, their optimizers) into `dir`.
    fn save_checkpoint(&self, _dir: &Path, _policy: &LoadedModel) -> Result<()> {
        Ok(())
    }

    /// Restore [`Self::state`] and what [`Self::save_checkpoint`] wrote; `optimizer_steps` is
    /// the checkpoint's count of optimizer updates.
    fn restore(&mut self, _dir: &Path, _state: &Value, _optimizer_steps: u64) -> Result<()> {
        Ok(())
    }

    /// Write the extra models a finished run leaves beside the policy in `output_dir`.
    fn save_final(&self, _out_dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// The algorithm a config describes, with the policy it trains (a reward model gets its head
/// here) and the data it reads. `resume`: the checkpoint a resumed run starts from. With
/// `reward_augmented`, `cfg` then names the relabelled files.
pub fn build(
    cfg: &mut TrainConfig,
    policy: LoadedModel,
    resume: Option<&Path>,
) -> Result<(LoadedModel, Box<dyn Algorithm>, TrainData)> {
    data::resolve_dataset_splits(cfg)?;
    if matches!(cfg.task, Task::Grpo | Task::Rloo) {
        let data = TrainData::load_prompts(cfg, &policy.tokenizer, policy.transformer.cfg.max_position_embeddings)?;
        let a = grpo::Grpo::new(cfg, &policy, resume)?;
        return Ok((policy, Box::new(a), data));
    }
    if cfg.task.is_online_pairwise() {
        let data = TrainData::load_prompts(cfg, &policy.tokenizer, policy.transformer.cfg.max_position_embeddings)?;
        let a = online_pairs::OnlinePairs::new(cfg, &policy, resume)?;
        return Ok((policy, Box::new(a), data));
    }
    if cfg.task == Task::Sft {
        let data = TrainData::load_sft(cfg, &policy.tokenizer)?;
        let a = sft::Sft::new(cfg, &data)?;
        return Ok((policy, Box::new(a), data));
    }
    let objective: Objective = cfg.objective()?;
    let data = TrainData::load(cfg, &policy.tokenizer, &objective)?;
    let cfg = &*cfg;
    match cfg.task {
        Task::Reward => {
            let (policy, a) = reward::RewardModel::new(cfg, objective, policy, &data, resume)?;
            Ok((policy, Box::new(a), data))
        }
        _ => {
            let a = preference::Preference::new(cfg, objective, &policy, &data, resume)?;
            Ok((policy, Box::new(a), data))
        }
    }
}

/// Mean of the objective's loss and metrics over a whole set, in batches (no gradient):
/// `loss` and the objective's metrics, weighted by batch size.
pub fn evaluate_in_batches(
    n: usize,
    batch_size: usize,
    mut batch: impl FnMut(&[usize]) -> Result<crate::objectives::ObjectiveOutput>,
) -> Result<Vec<(String, f64)>> {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let all: Vec<usize> = (0..n).collect();
    for chunk in all.chunks(batch_size.max(1)) {
        let out = batch(chunk)?;
        let w = chunk.len() as f64;
        *sums.entry("loss".into()).or_default() += crate::objectives::mean(&out.losses)? * w;
        for (k, v) in out.metrics {
            *sums.entry(k).or_default() += v * w;
        }
    }
    Ok(sums.into_iter().map(|(k, v)| (k, v / n.max(1) as f64)).collect())
}

/// The policy a run starts from at `path` (the starting model, or the checkpoint it resumes).
/// With `use_peft` (or when `path` is a PEFT adapter directory) the base stays frozen in its
/// stored precision where that is smaller, with LoRA adapters on it: those in `path`, or fresh
/// ones as PEFT initialises them.
pub fn load_policy(cfg: &TrainConfig, path: &Path) -> Result<LoadedModel> {
    use crate::model::lora;
    let (dtype, dev) = (candle_core::DType::F32, candle_core::Device::Cpu);
    if !(cfg.peft.use_peft || lora::is_adapter_dir(path)) {
        return crate::model::load(path, dtype, &dev);
    }
    let m = match crate::model::load_frozen(path, dtype, &dev)? {
        Some(m) => m,
        None => crate::model::load(path, dtype, &dev)?,
    };
    let transformer = match m.transformer.adapters() {
        Some(a) => {
            let mut a = a.clone();
            a.seed = cfg.seed;
            m.transformer.without_adapters()?.with_adapters(a)?
        }
        None => {
            let t = &m.transformer;
            let a = lora::Adapters::init(&t.cfg, cfg.lora_spec()?, cfg.seed, t.dtype(), t.device())?;
            t.with_adapters(a)?
        }
    };
    if let (Some(a), Some(c)) = (transformer.adapters(), transformer.compact_layers()) {
        eprintln!(
            "LoRA: {} adapter parameters (r = {}, {}); base layers kept as stored ({:.1} MiB instead of {:.1} MiB)",
            a.parameter_count(),
            a.spec.r,
            a.spec.targets.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
            c.bytes() as f64 / 1048576.0,
            c.widened_bytes() as f64 / 1048576.0
        );
    }
    Ok(LoadedModel { transformer, ..m })
}

/// `model` made trainable as the config asks (kernels, gradient checkpointing, sparse embedding
/// gradients, per-layer graphs), with its optimizer: the policy's, and any extra model an
/// algorithm trains.
pub fn trainable(mut model: LoadedModel, cfg: &TrainConfig) -> Result<(LoadedModel, Optimizer)> {
    model.transformer.kernels = cfg.kernels();
    model.transformer.set_gradient_checkpointing(cfg.gradient_checkpointing);
    model.transformer.set_sparse_embedding_grad(true);
    model.transformer.set_layer_graphs(true);
    let (model, vars) = model.into_trainable()?;
    let kind = match cfg.optim {
        crate::config::Optim::Sgd => OptimKind::Sgd,
        crate::config::Optim::AdamwTorch => OptimKind::AdamW {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            bf16_moments: cfg.adam_moments_dtype == crate::config::MomentsDtype::Bf16,
        },
    };
    Ok((model, Optimizer::new(kind, cfg.weight_decay, vars)))
}
