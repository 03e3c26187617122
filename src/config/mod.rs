//! The run configuration: a TOML file whose keys are TRL's `DPOConfig` / `TrainingArguments`
//! names wherever TRL has the option, defaults equal to TRL's, every key overridable with
//! `--set key=value`. Unknown keys and values outside a closed set are errors that suggest the
//! closest known one.
//!
//! Each key is declared once, with its type, default and documentation: the run's own keys in
//! [`TrainConfig`] below, the objectives' hyperparameters beside their objectives
//! ([`crate::objectives::ObjectiveParams`] and the family files). `prefer train --help-config`
//! is generated from those declarations.

pub mod grpo;
pub mod online;
pub mod peft;
pub mod sft;
pub mod trl;

use crate::data::{TokenizeOptions, TruncationMode};
use crate::error::{Error, Result};
use crate::objectives::ObjectiveParams;
pub use crate::optim::schedule::LrSchedulerType;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

choice! {
    /// What a run trains (`task`).
    pub enum Task {
        /// The policy, with a preference objective over its log-probs.
        Dpo = "dpo",
        /// A reward model: the LM body plus a reward head.
        Reward = "reward",
        /// Online: GRPO on completions the policy samples, scored by reward functions.
        Grpo = "grpo",
        /// Online: RLOO (leave-one-out baseline, KL in the reward, sequence-level ratio).
        Rloo = "rloo",
        /// Online: DPO / IPO on two completions of each prompt, ranked by the reward.
        OnlineDpo = "online_dpo",
        /// Online: Nash-MD (a policy completion against one from the policy–reference mixture).
        NashMd = "nash_md",
        /// Online: XPO (a policy completion against a reference completion, plus exploration).
        Xpo = "xpo",
        /// Online: IPO-MD (IPO on two completions of the policy–reference mixture, ranked by the
        /// reward; experimental).
        IpoMd = "ipo_md",
        /// Supervised fine-tuning: the NLL of text, completions or assistant turns.
        Sft = "sft",
    }
}

choice! {
    /// The optimizer (`optim`).
    pub enum Optim {
        AdamwTorch = "adamw_torch" | "adamw",
        Sgd = "sgd",
    }
}

/// `ref_model`: one path, or several averaged in weight space.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RefModel {
    One(String),
    Soup(Vec<String>),
}

impl RefModel {
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            RefModel::One(s) => vec![PathBuf::from(s)],
            RefModel::Soup(v) => v.iter().map(PathBuf::from).collect(),
        }
    }
}

choice! {
    /// When something happens during training (`logging_strategy`, `save_strategy`,
    /// `eval_strategy`), as TrainingArguments.
    pub enum Strategy {
        Steps = "steps",
        Epoch = "epoch",
        No = "no",
    }
}

choice! {
    /// How AdamW keeps its moments (`adam_moments_dtype`).
    pub enum MomentsDtype {
        F32 = "f32",
        Bf16 = "bf16",
    }
}

/// `loss_type`: one name, a list, or a comma-separated string.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum LossType {
    One(String),
    Many(Vec<String>),
}

impl LossType {
    pub fn names(&self) -> Vec<String> {
        match self {
            LossType::One(s) => s
                .split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect(),
            LossType::Many(v) => v.clone(),
        }
    }
}

settings! {
    /// The run: model, data, task and objective, optimizer and schedule, logging, checkpoints
    /// and performance (TRL's DPOConfig / RewardConfig / TrainingArguments names).
    pub struct TrainConfig {
        /// Policy to train: an HF model directory (config.json + safetensors) or a .gguf file.
        /// Required.
        pub model_name_or_path: String = String::new(),
        /// Reference model: a path (HF dir, .gguf, or an earlier checkpoint of a run: SePPO-style), or a list of paths averaged in weight space (SALSA soup). Default: the
        /// starting policy.
        pub ref_model: Option<RefModel> = None,
        /// TR-DPO: every ref_model_sync_steps, π_ref ← α·π_θ + (1−α)·π_ref with α =
        /// ref_model_mixup_alpha (α = 1: the reference becomes the policy).
        pub sync_ref_model: bool = false,
        /// α of sync_ref_model.
        pub ref_model_mixup_alpha: f64 = 0.6,
        /// Steps between reference updates with sync_ref_model.
        pub ref_model_sync_steps: usize = 512,
        /// LD-DPO: log-probs count tokens past the shorter completion's length α times (policy
        /// and reference).
        pub ld_alpha: Option<f64> = None,
        /// WPO: weight each pair's loss by exp(mean_t[log p(y_t) − log Σ_v p(v)²]) of chosen
        /// times rejected.
        pub use_weighting: bool = false,
        /// Where checkpoints, metrics.jsonl and the final model go.
        pub output_dir: String = "runs/prefer".into(),
        /// Training data (JSONL, a JSON array, Parquet, or a `datasets` folder): preference
        /// pairs (standard, conversational or Anthropic HH, auto-detected), SFT rows for sft,
        /// or prompts for the online tasks. Required.
        pub train_file: String = String::new(),
        /// Dataset columns under other names, read as prefer's fields:
        /// `columns = {prompt = "question", chosen = "response_a", rejected = "response_b"}`.
        pub columns: Option<std::collections::BTreeMap<String, String>> = None,
        /// The column read as `prompt` (same as columns.prompt).
        pub prompt_column: Option<String> = None,
        /// The column read as `chosen`.
        pub chosen_column: Option<String> = None,
        /// The column read as `rejected`.
        pub rejected_column: Option<String> = None,
        /// Held-out pairs evaluated every eval_steps and at the end.
        pub eval_file: Option<String> = None,
        /// The split train_file reads when it is a dataset with several (a saved `DatasetDict`,
        /// or a hub download's `train-*.parquet` / `test-*.parquet` shards), as TRL's scripts.
        pub dataset_train_split: String = "train".into(),
        /// The split evaluated when eval_file is unset and train_file's dataset has it (unless
        /// eval_strategy = "no").
        pub dataset_test_split: String = "test".into(),
        /// Without eval_file or a test split: hold out this fraction of train_file's rows
        /// (chosen with data_seed, else seed) as the eval set. 0 = none.
        pub eval_fraction: f64 = 0.0,
        /// dpo (align the policy with an objective over log-probs) | reward (train a reward model:
        /// the LM body plus a reward head, saved as *ForSequenceClassification) | sft
        /// (supervised fine-tuning, TRL's SFTTrainer) | grpo | rloo | online_dpo | nash_md | xpo
        /// (online: sample completions of train_file's prompts, score them with reward_funcs,
        /// learn from them).
        pub task: Task = Task::Dpo,
        /// Objective name (`prefer objectives list`), or a list (or comma-separated string)
        /// combined with loss_weights.
        pub loss_type: LossType = LossType::One("sigmoid".into()),
        /// Weights of a loss_type list: L = Σ w_k · mean(loss_k); RPO = ["sigmoid", "sft"] with
        /// [1.0, 0.005]. Default: 1.0 each.
        pub loss_weights: Option<Vec<f64>> = None,
        /// MaxMin-RLHF: K > 1 learns K reward heads on one body with EM over annotator clusters
        /// (rows need `annotator`).
        pub reward_clusters: usize = 1,
        /// Steps between EM reassignments of annotators to clusters; 0 = once per epoch.
        pub em_steps: usize = 0,
        /// Collaborative reward modeling: train two reward models, each on the pairs its peer
        /// is most confident about (largest margins); the peer is saved in
        /// output_dir/peer_model.
        pub crm: bool = false,
        /// Fraction of each batch a CRM model keeps (the rest is filtered as likely noisy).
        pub crm_keep_ratio: f64 = 0.7,
        /// CRM: ramp the filtered fraction linearly from 0 to 1 − crm_keep_ratio over this
        /// fraction of the run (co-teaching's schedule, Han et al. 2018: margins mean little
        /// before the models have learned anything; 0 filters from the first step).
        pub crm_warmup_ratio: f64 = 0.25,
        /// Peak learning rate.
        pub learning_rate: f64 = 1e-6,
        /// Preference pairs per micro-batch.
        pub per_device_train_batch_size: usize = 8,
        /// Pairs per batch when evaluating or precomputing reference log-probs.
        pub per_device_eval_batch_size: usize = 8,
        /// Micro-batches per optimizer step.
        pub gradient_accumulation_steps: usize = 1,
        /// Optimizer steps to run; -1 = derive from num_train_epochs.
        pub max_steps: i64 = -1,
        /// Passes over train_file when max_steps = -1.
        pub num_train_epochs: f64 = 3.0,
        /// constant | constant_with_warmup | linear | cosine.
        pub lr_scheduler_type: LrSchedulerType = LrSchedulerType::Linear,
        /// Linear warm-up steps (overrides warmup_ratio when > 0).
        pub warmup_steps: usize = 0,
        /// Warm-up as a fraction of all steps.
        pub warmup_ratio: f64 = 0.0,
        /// Clip the global gradient norm to this; 0 = no clipping.
        pub max_grad_norm: f64 = 1.0,
        /// A step whose loss or gradient norm is not finite (NaN, ±inf) leaves the weights and
        /// the optimizer as they were and is reported; after this many such steps in a row the
        /// run stops with an error, keeping its last checkpoint (0 = stop at the first).
        pub max_nonfinite_steps: usize = 3,
        /// adamw_torch (alias adamw) | sgd.
        pub optim: Optim = Optim::AdamwTorch,
        /// Decoupled weight decay (AdamW) / L2 (SGD); not applied to biases and norms.
        pub weight_decay: f64 = 0.0,
        /// f32 | bf16: how AdamW keeps its two moments. bf16 halves their memory (0.5 GiB less
        /// for a 135M model) and rounds them stochastically, so that their small updates are
        /// kept in expectation; not in TRL (PyTorch's AnyPrecisionAdamW has such an option).
        pub adam_moments_dtype: MomentsDtype = MomentsDtype::F32,
        /// AdamW β1.
        pub adam_beta1: f64 = 0.9,
        /// AdamW β2.
        pub adam_beta2: f64 = 0.999,
        /// AdamW ε.
        pub adam_epsilon: f64 = 1e-8,
        /// Seed of the data order.
        pub seed: u64 = 42,
        /// Shuffle the pairs each epoch (seeded); false = file order.
        pub shuffle: bool = true,
        /// Seed of the data order when set (TrainingArguments' data_seed); else `seed`.
        pub data_seed: Option<u64> = None,
        /// Write metrics every this many optimizer steps.
        pub logging_steps: usize = 10,
        /// Save a checkpoint every this many steps (and always at the end).
        pub save_steps: usize = 500,
        /// Evaluate eval_file every this many steps; 0 = only at the end.
        pub eval_steps: usize = 0,
        /// When to write metrics: steps (every logging_steps) | epoch | no (TrainingArguments').
        pub logging_strategy: Strategy = Strategy::Steps,
        /// When to save checkpoints: steps (every save_steps) | epoch | no. A run still saves
        /// its final model, and a checkpoint on Ctrl-C.
        pub save_strategy: Strategy = Strategy::Steps,
        /// When to evaluate eval_file: steps (every eval_steps, and at the end) | epoch | no.
        pub eval_strategy: Strategy = Strategy::Steps,
        /// Keep at most this many checkpoints in output_dir (the oldest are removed, each
        /// renamed away before it is deleted, so `latest` never sees half a checkpoint).
        pub save_total_limit: Option<usize> = None,
        /// At the end, output_dir holds the checkpoint with the best metric_for_best_model
        /// instead of the last weights (TrainingArguments'); save_total_limit never removes that
        /// checkpoint. Needs an eval set and eval_strategy = save_strategy (save_steps a multiple
        /// of eval_steps).
        pub load_best_model_at_end: bool = false,
        /// The eval metric that picks the best checkpoint, with or without its `eval_` prefix
        /// (e.g. "loss", "rewards/accuracies"). Default: loss.
        pub metric_for_best_model: Option<String> = None,
        /// Whether a larger metric_for_best_model is better. Default: false for a name ending in
        /// "loss", true otherwise (as transformers).
        pub greater_is_better: Option<bool> = None,
        /// A name for the run, recorded in run_config.json.
        pub run_name: Option<String> = None,
        /// Where metrics go besides output_dir/metrics.jsonl (always written): "tensorboard"
        /// (event files in logging_dir, default output_dir/runs; TRL's tags), "all" (the same),
        /// "none" / "jsonl" (nothing else); other loggers (wandb, ...) are refused.
        pub report_to: LossType = LossType::One("jsonl".into()),
        /// Where TensorBoard event files go (default output_dir/runs); metrics.jsonl stays in
        /// output_dir.
        pub logging_dir: Option<String> = None,
        /// Drop dropout while training (TRL's disable_dropout). prefer's models have no dropout;
        /// this turns off LoRA's. Default as TRL: on for dpo, reward and the online pairwise
        /// methods, off for grpo, rloo and sft.
        pub disable_dropout: Option<bool> = None,
        /// Batch size of the reference pass with precompute_ref_log_probs (default:
        /// per_device_eval_batch_size).
        pub precompute_ref_batch_size: Option<usize> = None,
        /// Max tokens of prompt + completion.
        pub max_length: usize = 1024,
        /// Max prompt tokens (truncated per truncation_mode); 0 = no limit.
        pub max_prompt_length: usize = 512,
        /// keep_end (keep the prompt's last tokens) | keep_start.
        pub truncation_mode: TruncationMode = TruncationMode::KeepEnd,
        /// Compute reference log-probs once, cache them on disk and drop the reference model.
        pub precompute_ref_log_probs: bool = false,
        /// Pack a batch into one row without padding (each sequence attends only to itself).
        /// Same log-probs as padding; fewer tokens computed. TRL's option; its default there is
        /// false.
        pub padding_free: bool = true,
        /// Compute each prompt once for all its responses: [prompt, chosen, rejected] as one
        /// unit in which each response sees the prompt and itself. Same log-probs as separate
        /// sequences.
        pub share_prompt: bool = true,
        /// Fused CPU kernels with their own backward (RMSNorm, RoPE, the attention of a block,
        /// SwiGLU, the log-prob head); false = candle primitive ops. Same values either way;
        /// fused is faster and keeps far fewer activations.
        pub fused_kernels: bool = true,
        /// Multiply in bf16 with f32 sums, as TRL's `bf16 = true` (PyTorch CPU autocast) does:
        /// the linear layers and the log-prob head round both operands to bf16, forward and
        /// backward. Weights, gradients and optimizer state stay f32. Runs on AMX tiles (Xeon
        /// 4th generation and later) or with AVX512-BF16 (AMD Zen 4/5); on a CPU with neither
        /// it would only be slower, so training says so and runs in f32.
        pub bf16: bool = false,
        /// Recompute each decoder layer in backward instead of keeping its activations: far
        /// less memory for a second forward pass of the layers (TRL's option; exact, same
        /// numbers).
        pub gradient_checkpointing: bool = false,
        /// Update the weights during the backward pass, each decoder layer (and the output
        /// projection and embedding, a block of rows at a time) as soon as its gradient exists,
        /// so that the gradients never all exist at once: one copy of the model's size less at
        /// the memory peak (0.5 GiB for a 135M model in f32). The global gradient norm (for
        /// max_grad_norm and the non-finite check) must be known before the first update, so
        /// the backward runs twice: the first pass only measures, the second updates. The same
        /// numbers as without it, bit for bit, for about 1.5× the step time; it pays most with
        /// gradient_checkpointing. Needs gradient_accumulation_steps = 1 and full fine-tuning
        /// (no use_peft). Not in TRL (torchtune's optimizer_in_bwd, which cannot clip).
        pub optimizer_in_backward: bool = false,
        /// Where precomputed reference log-probs are cached (keyed by model and data hash).
        pub ref_log_probs_cache_dir: String = "~/.cache/prefer/ref_logps".into(),
        /// A checkpoint directory, or "latest" for the newest one in output_dir.
        pub resume_from_checkpoint: Option<String> = None,
        /// Reward-augmented relabeling of scored pairs (chosen_score, rejected_score) before
        /// training: each pair becomes two score-conditioned pairs (Zhang et al. 2024); the
        /// relabeled file is written to output_dir.
        pub reward_augmented: bool = false,
        /// Report and skip bad rows instead of stopping at the first.
        pub skip_invalid: bool = false,
        /// CPU threads for tensor ops; 0 = all cores.
        pub num_threads: usize = 0,
        /// No progress bar.
        pub disable_tqdm: bool = false,
    }
    flatten {
        /// The objectives' hyperparameters (`beta`, `label_smoothing`, ...).
        pub params: ObjectiveParams,
        /// GRPO's (task = "grpo").
        pub grpo: crate::config::grpo::GrpoParams,
        /// Online DPO's, Nash-MD's and XPO's.
        pub online: crate::config::online::OnlineParams,
        /// LoRA's (use_peft = true).
        pub peft: crate::config::peft::PeftParams,
        /// SFT's (task = "sft").
        pub sft: crate::config::sft::SftParams,
    }
}

impl TrainConfig {
    /// Whether the run writes TensorBoard event files (`report_to` "tensorboard" or "all").
    pub fn reports_to_tensorboard(&self) -> bool {
        self.report_to.names().iter().any(|r| r == "tensorboard" || r == "all")
    }

    /// Whether dropout is off in training: `disable_dropout`, or TRL's default for the task
    /// (on for dpo, reward and the online pairwise methods; off for grpo, rloo and sft).
    pub fn dropout_disabled(&self) -> bool {
        self.disable_dropout
            .unwrap_or(matches!(self.task, Task::Dpo | Task::Reward) || self.task.is_online_pairwise())
    }
}

impl Task {
    /// Online DPO, Nash-MD and XPO: two completions per prompt, ranked by a reward.
    pub fn is_online_pairwise(self) -> bool {
        matches!(self, Task::OnlineDpo | Task::NashMd | Task::Xpo | Task::IpoMd)
    }

    /// Whether the run samples its own completions from prompts (`train_file` holds prompts).
    pub fn is_online(self) -> bool {
        matches!(self, Task::Grpo | Task::Rloo) || self.is_online_pairwise()
    }
}

/// TRL's other names for prefer's keys: `max_new_tokens` (OnlineDPOConfig) is
/// `max_completion_length`.
fn canonical_key(key: &str) -> String {
    match key {
        "max_new_tokens" => "max_completion_length".into(),
        k => k.into(),
    }
}

fn check_keys(table: &toml::Table, origin: &str) -> Result<()> {
    let keys = TrainConfig::keys();
    for key in table.keys() {
        if crate::config::trl::is_trl_key(key) {
            continue;
        }
        if !keys.iter().any(|(k, _)| k == key) {
            if crate::config::trl::is_trl_config_key(key) {
                return Err(Error::Config(format!(
                    "{origin}: `{key}` is a TRL option prefer does not implement; remove it \
                     (`prefer train --help-config` lists what prefer reads)"
                )));
            }
            // a near miss only: a couple of edits, not another key that shares words
            let hint = crate::util::closest(key, keys.iter().map(|(k, _)| *k))
                .filter(|c| crate::util::text::edit_distance(key, c) <= 2 + key.len() / 8)
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_else(|| "; `prefer train --help-config` lists every key".into());
            return Err(Error::Config(format!("{origin}: unknown key `{key}`{hint}")));
        }
    }
    Ok(())
}

/// The 1-based line of a config text that sets `key` (TOML `key =` or YAML `key:`).
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('=') || rest.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

/// A YAML mapping as a TOML table: numbers, strings, booleans, lists and nested mappings as
/// themselves; `null` leaves the key out (unset).
fn yaml_table(text: &str) -> std::result::Result<toml::Table, String> {
    fn conv(v: serde_json::Value) -> Option<toml::Value> {
        use serde_json::Value as J;
        Some(match v {
            J::Null => return None,
            J::Bool(b) => toml::Value::Boolean(b),
            J::Number(n) => match n.as_i64() {
                Some(i) => toml::Value::Integer(i),
                None => toml::Value::Float(n.as_f64()?),
            },
            J::String(s) => toml::Value::String(s),
            J::Array(a) => toml::Value::Array(a.into_iter().filter_map(conv).collect()),
            J::Object(o) => toml::Value::Table(o.into_iter().filter_map(|(k, v)| Some((k, conv(v)?))).collect()),
        })
    }
    let v: serde_json::Value = serde_yaml_ng::from_str(text).map_err(|e| format!("invalid YAML: {e}"))?;
    match v {
        serde_json::Value::Object(o) => Ok(o.into_iter().filter_map(|(k, v)| Some((k, conv(v)?))).collect()),
        serde_json::Value::Null => Ok(toml::Table::new()),
        _ => Err("a config is a mapping of keys to values".into()),
    }
}

/// Parse `key=value` (value as TOML, or as a bare string if it is not valid TOML).
pub fn parse_override(s: &str) -> Result<(String, toml::Value)> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| Error::Config(format!("--set `{s}`: expected key=value")))?;
    let k = k.trim().to_string();
    let v = v.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {v}")) {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(v.into())),
        Err(_) => toml::Value::String(v.into()),
    };
    Ok((k, value))
}

impl TrainConfig {
    /// Load a TOML file (optional) and apply `--set` overrides.
    /// A `.yaml` / `.yml` file (TRL CLI and alignment-handbook recipes) is read as the same
    /// keys; YAML's `null` means "unset".
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let mut text = String::new();
        let mut table = match path {
            Some(p) => {
                text = crate::util::read_to_string(p)?;
                let yaml = matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
                let t: toml::Table = match yaml {
                    true => yaml_table(&text).map_err(|e| Error::Config(format!("{}: {e}", p.display())))?,
                    false => toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", p.display())))?,
                };
                let t: toml::Table = t.into_iter().map(|(k, v)| (canonical_key(&k), v)).collect();
                check_keys(&t, &p.display().to_string())?;
                t
            }
            None => toml::Table::new(),
        };
        let origin = path.map(|p| p.display().to_string()).unwrap_or_else(|| "--set".into());
        for o in overrides {
            let (k, v) = parse_override(o)?;
            let k = canonical_key(&k);
            let mut one = toml::Table::new();
            one.insert(k.clone(), v.clone());
            check_keys(&one, "--set")?;
            // ints given where floats are expected are fine in TOML; make "1e-5" strings numbers
            table.insert(k, v);
        }
        for key in ["beta", "alpha", "mixture_coef"] {
            crate::config::online::split_per_epoch_list(&mut table, key)?;
        }
        for note in crate::config::trl::apply(&mut table, &origin)? {
            eprintln!("config: {note}");
        }
        let cfg: TrainConfig = match toml::Value::Table(table.clone()).try_into() {
            Ok(c) => c,
            Err(e) => {
                // name the key whose value is wrong (the first that fails on its own), with the
                // file and line that set it, or --set
                for (k, v) in &table {
                    let one = toml::Table::from_iter([(k.clone(), v.clone())]);
                    if let Err(e) = toml::Value::Table(one).try_into::<TrainConfig>() {
                        let set_by_flag = overrides
                            .iter()
                            .any(|o| o.split('=').next().map(str::trim) == Some(k.as_str()));
                        let at = match (path, key_line(&text, k)) {
                            (Some(p), Some(line)) if !set_by_flag => format!("{}:{line}: ", p.display()),
                            _ => "--set ".to_string(),
                        };
                        return Err(Error::Config(format!("{at}{k}: {}, found {v}", e.message())));
                    }
                }
                return Err(Error::Config(e.message().to_string()));
            }
        };
        let mut cfg = cfg;
        if cfg.task == Task::Grpo && !table.contains_key("beta") {
            // TRL's GRPOConfig: beta = 0 (no reference model) unless set
            cfg.params.beta = 0.0;
        }
        if cfg.task == Task::Rloo {
            // TRL's RLOOConfig defaults where they differ from GRPO's
            if !table.contains_key("beta") {
                cfg.params.beta = 0.05;
            }
            if !table.contains_key("num_generations") {
                cfg.grpo.num_generations = 2;
            }
        }
        if cfg.task == Task::Sft {
            // TRL's SFTConfig defaults where they differ from DPOConfig's
            if !table.contains_key("learning_rate") {
                cfg.learning_rate = 2e-5;
            }
            if !table.contains_key("truncation_mode") {
                cfg.truncation_mode = TruncationMode::KeepStart;
            }
            if !table.contains_key("loss_type") {
                cfg.loss_type = LossType::One("nll".into());
            }
            if !table.contains_key("max_prompt_length") {
                cfg.max_prompt_length = 0;
            }
        }
        if cfg.task.is_online_pairwise() {
            // TRL's OnlineDPOConfig defaults where they differ from the offline ones / GRPO's
            let set = |k: &str| table.contains_key(k);
            if !set("temperature") {
                cfg.grpo.temperature = 0.9;
            }
            if !set("max_completion_length") {
                cfg.grpo.max_completion_length = 64;
            }
            if !set("learning_rate") {
                cfg.learning_rate = 5e-7;
            }
            if cfg.task == Task::Xpo && !set("alpha") {
                cfg.params.reference_free.alpha = 1e-5;
            }
            if cfg.task == Task::IpoMd && !set("loss_type") {
                cfg.loss_type = LossType::One("ipo".into());
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.model_name_or_path.is_empty() {
            return bad("`model_name_or_path` is required (an HF model directory or a .gguf file)".into());
        }
        if self.train_file.is_empty() {
            return bad("`train_file` is required (a JSONL file of preference pairs)".into());
        }
        self.validate_peft()?;
        for r in self.report_to.names() {
            if !["jsonl", "none", "all", "tensorboard"].contains(&r.as_str()) {
                return bad(format!(
                    "report_to = \"{r}\": prefer writes output_dir/metrics.jsonl always, and TensorBoard event \
                     files with report_to = \"tensorboard\"; {r} is not implemented (read metrics.jsonl with \
                     pandas.read_json(lines=True), or point TensorBoard at the event files)"
                ));
            }
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return bad(format!(
                "eval_fraction = {}: it is the fraction of train_file held out for evaluation, in [0, 1)",
                self.eval_fraction
            ));
        }
        if self.eval_fraction > 0.0 && self.task.is_online() {
            return bad(
                "eval_fraction: the online tasks evaluate nothing during training; evaluate the trained \
                 policy with `prefer eval --model OUTPUT_DIR --prompts FILE`"
                    .into(),
            );
        }
        if self.load_best_model_at_end {
            if self.task.is_online() {
                return bad("load_best_model_at_end: the online tasks evaluate nothing during training, so no checkpoint is best".into());
            }
            if self.eval_strategy != self.save_strategy || self.eval_strategy == Strategy::No {
                return bad(format!(
                    "load_best_model_at_end compares the checkpoints by the evaluation made when each was saved: set \
                     eval_strategy = save_strategy (now {:?} and {:?}), not \"no\"",
                    self.eval_strategy.as_str(),
                    self.save_strategy.as_str()
                ));
            }
            if self.eval_strategy == Strategy::Steps
                && (self.eval_steps == 0 || !self.save_steps.is_multiple_of(self.eval_steps))
            {
                return bad(format!(
                    "load_best_model_at_end: save_steps ({}) must be a multiple of eval_steps ({}), so that every \
                     checkpoint has an evaluation",
                    self.save_steps, self.eval_steps
                ));
            }
        }
        if self.per_device_train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return bad("per_device_train_batch_size and gradient_accumulation_steps must be ≥ 1".into());
        }
        if self.optimizer_in_backward && (self.gradient_accumulation_steps > 1 || self.peft.use_peft) {
            return bad(format!(
                "optimizer_in_backward updates each layer as soon as its gradient is known, so it needs one \
                 micro-batch per step (gradient_accumulation_steps = {}) and full fine-tuning (use_peft = {}; \
                 LoRA's gradients are small anyway); set gradient_accumulation_steps = 1 and use_peft = false, \
                 or turn optimizer_in_backward off",
                self.gradient_accumulation_steps, self.peft.use_peft
            ));
        }
        if self.crm && (self.task != Task::Reward || self.reward_clusters > 1) {
            return bad(
                "crm trains two single-head reward models: set task = \"reward\" and reward_clusters = 1".into(),
            );
        }
        if !(self.crm_keep_ratio > 0.0 && self.crm_keep_ratio <= 1.0) {
            return bad("crm_keep_ratio must be in (0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.crm_warmup_ratio) {
            return bad("crm_warmup_ratio must be in [0, 1]".into());
        }
        if self.reward_clusters > 1 && self.task != Task::Reward {
            return bad("reward_clusters > 1 trains several reward heads: set task = \"reward\"".into());
        }
        if self.max_prompt_length > 0 && self.max_prompt_length >= self.max_length {
            return bad(format!(
                "max_prompt_length ({}) must be below max_length ({})",
                self.max_prompt_length, self.max_length
            ));
        }
        if !(0.0..0.5).contains(&self.params.label_smoothing) {
            return bad("label_smoothing must be in [0, 0.5)".into());
        }
        if self.params.f_divergence_type != crate::objectives::FDivergenceType::ReverseKl {
            // TRL 1.16's rule: the f-DPO reparameterisation leaves a β·log Z(x) term that only
            // cancels in the chosen − rejected difference
            const WITH_F: [&str; 8] = [
                "sigmoid",
                "sigmoid_norm",
                "hinge",
                "ipo",
                "exo_pair",
                "robust",
                "discopop",
                "sft",
            ];
            let names = self.loss_type.names();
            if let Some(n) = names.iter().find(|n| !WITH_F.contains(&n.as_str())) {
                return bad(format!(
                    "f_divergence_type = \"{}\" does not apply to loss_type `{n}`: the f-DPO reparameterisation leaves a β·log Z(x) term that cancels only in the chosen − rejected difference, so it is defined for {} (as in TRL). Use f_divergence_type = \"reverse_kl\" with `{n}`.",
                    self.params.f_divergence_type.as_str(),
                    WITH_F.join(", ")
                ));
            }
        }
        if self.sync_ref_model && self.precompute_ref_log_probs {
            return bad("sync_ref_model updates the reference during training, so its log-probs cannot be precomputed; turn one off".into());
        }
        if self.sync_ref_model && self.ref_model_sync_steps == 0 {
            return bad("ref_model_sync_steps must be ≥ 1".into());
        }
        if !(0.0..=1.0).contains(&self.ref_model_mixup_alpha) {
            return bad("ref_model_mixup_alpha must be in [0, 1]".into());
        }
        if matches!(&self.ref_model, Some(RefModel::Soup(v)) if v.is_empty()) {
            return bad("ref_model is an empty list".into());
        }
        if self.online.judge.is_some() && !self.task.is_online_pairwise() {
            return bad(format!(
                "judge compares the two completions of the online pairwise tasks (online_dpo, nash_md, xpo, \
                 ipo_md), not task = \"{}\"; GRPO and RLOO score each completion with reward_funcs",
                self.task.as_str()
            ));
        }
        if matches!(self.task, Task::Grpo | Task::Rloo) {
            return crate::config::grpo::GrpoParams::validate(self);
        }
        if self.task == Task::Sft {
            return crate::config::sft::SftParams::validate(self);
        }
        if self.task.is_online_pairwise() {
            return crate::config::online::OnlineParams::validate(self);
        }
        let o = &self.online;
        if o.beta_per_epoch.is_some() || o.alpha_per_epoch.is_some() || o.mixture_coef_per_epoch.is_some() {
            return bad(
                "beta, alpha and mixture_coef take a list (one value per epoch) only with task = \"online_dpo\", \"nash_md\", \"xpo\" or \"ipo_md\"".into(),
            );
        }
        if self.objective()?.needs_reward_variance() && self.reward_clusters > 1 {
            return bad("loss_type `gaussian` trains one Gaussian head: set reward_clusters = 1".into());
        }
        Ok(())
    }

    /// The objective `loss_type` / `loss_weights` describe (`bradley_terry` for `task = "reward"`
    /// unless another reward objective is named).
    pub fn objective(&self) -> Result<crate::objectives::Objective> {
        use crate::objectives::RewardKind;
        let mut names = self.loss_type.names();
        let reward = self.task == Task::Reward;
        if reward && names == ["sigmoid"] {
            names = vec!["bradley_terry".into()];
        }
        let obj = crate::objectives::build(&names, self.loss_weights.as_deref(), &self.params)?;
        let is_reward = obj
            .parts
            .iter()
            .all(|(_, e)| matches!(e.rewards, RewardKind::Reward | RewardKind::RewardDistribution));
        match (reward, is_reward) {
            (true, false) => Err(Error::Config(format!(
                "task = \"reward\" trains with a reward-model objective (bradley_terry or gaussian), not `{}`",
                obj.name()
            ))),
            (false, true) => Err(Error::Config(format!(
                "`{}` trains reward models: set task = \"reward\"",
                obj.name()
            ))),
            _ => Ok(obj),
        }
    }

    pub fn stats_options(&self) -> crate::stats::StatsOptions {
        crate::stats::StatsOptions {
            ld_alpha: self.ld_alpha,
            use_weighting: self.use_weighting,
            layout: crate::batch::Layout {
                share_prompt: self.share_prompt,
                padding_free: self.padding_free,
                padding_side: crate::batch::PaddingSide::Right,
            },
        }
    }

    /// The kernels a run uses: `bf16` only where this CPU has a fast bf16 product
    /// ([`crate::model::kernels::CpuPath::fast_bf16`]); elsewhere bf16 would cost rounding and
    /// give no speed, so the run is f32 (and [`Self::bf16_notice`] says so).
    pub fn kernels(&self) -> crate::model::Kernels {
        let bf16 = self.bf16 && crate::model::kernels::CpuPath::fast_bf16().is_some();
        crate::model::Kernels {
            fused: self.fused_kernels,
            bf16,
            bf16_attention: bf16,
        }
    }

    /// What `bf16 = true` does on this CPU, for the start of a run; `None` without bf16.
    pub fn bf16_notice(&self) -> Option<String> {
        use crate::model::kernels::matmul::bf16_kernel;
        match (self.bf16, bf16_kernel()) {
            (false, _) => None,
            (true, Some(k)) => Some(format!("bf16 = true: bf16 products with f32 sums on {k}")),
            (true, None) => Some(
                "bf16 = true: this CPU has no fast bf16 product (neither AMX nor AVX512-BF16 on an AMD CPU), \
                 so bf16 would round every operand and gain nothing: training runs in f32"
                    .into(),
            ),
        }
    }

    pub fn tokenize_options(&self) -> TokenizeOptions {
        TokenizeOptions {
            max_length: Some(self.max_length),
            max_prompt_length: (self.max_prompt_length > 0).then_some(self.max_prompt_length),
            truncation_mode: self.truncation_mode,
            columns: self.column_map(),
        }
    }

    /// `(field, column)` pairs: the dataset's `column` read as prefer's `field`, from
    /// `columns` and the `prompt_column` / `chosen_column` / `rejected_column` keys.
    pub fn column_map(&self) -> Vec<(String, String)> {
        let mut m: Vec<(String, String)> = self.columns.clone().unwrap_or_default().into_iter().collect();
        for (field, col) in [
            ("prompt", &self.prompt_column),
            ("chosen", &self.chosen_column),
            ("rejected", &self.rejected_column),
        ] {
            if let Some(c) = col {
                m.retain(|(f, _)| f != field);
                m.push((field.to_string(), c.clone()));
            }
        }
        m
    }

    pub fn output_dir(&self) -> PathBuf {
        PathBuf::from(&self.output_dir)
    }

    pub fn cache_dir(&self) -> PathBuf {
        expand_home(&self.ref_log_probs_cache_dir)
    }

    /// `--help-config` text.
    pub fn help() -> String {
        let defaults = toml::Value::try_from(TrainConfig::default()).expect("the defaults serialise");
        let one_line = |doc: &str| doc.lines().map(str::trim).collect::<Vec<_>>().join(" ");
        let mut s = String::from("Run configuration keys (TOML; override any with --set key=value):\n");
        for (title, keys) in TrainConfig::sections() {
            s.push_str(&format!("\n# {}\n\n", one_line(title)));
            for (k, doc) in keys {
                let d = match defaults.get(k) {
                    None => "(none)".to_string(),
                    Some(toml::Value::String(v)) if v.is_empty() => "(required)".to_string(),
                    Some(v) => v.to_string(),
                };
                s.push_str(&format!("  {k:<30} default {d}\n      {}\n", one_line(doc)));
            }
        }
        s
    }
}

impl TrainConfig {
    /// `--help-config --markdown`: every key in a table per section, the reference in
    /// docs/config.md (a test keeps that file equal to this).
    pub fn help_markdown() -> String {
        let defaults = toml::Value::try_from(TrainConfig::default()).expect("the defaults serialise");
        let one_line = |doc: &str| doc.lines().map(str::trim).collect::<Vec<_>>().join(" ");
        let cell = |t: &str| t.replace('|', "\\|");
        let mut s = String::from(
            "# Run configuration reference\n\n\
             Every key of a `prefer train` config (TOML or YAML; override any with `--set key=value` or \
             `--key value`), with its default. Generated by `prefer train --help-config --markdown`; \
             TRL keys that are not prefer keys are listed in the README's \"Porting a TRL recipe\".\n",
        );
        for (title, keys) in TrainConfig::sections() {
            s.push_str(&format!(
                "\n## {}\n\n| key | default | meaning |\n|---|---|---|\n",
                one_line(title)
            ));
            for (k, doc) in keys {
                let d = match defaults.get(k) {
                    None => "(none)".to_string(),
                    Some(toml::Value::String(v)) if v.is_empty() => "(required)".to_string(),
                    Some(v) => format!("`{v}`"),
                };
                s.push_str(&format!("| `{k}` | {} | {} |\n", cell(&d), cell(&one_line(doc))));
            }
        }
        s
    }
}

/// The file beside a finished run's model that records the run's configuration.
pub const RUN_CONFIG_FILE: &str = "run_config.json";

impl TrainConfig {
    /// The configuration a model was trained with, and the file it came from, when `dir` is a
    /// run's output or one of its checkpoints: `run_config.json` beside a final model, or the
    /// `config` a checkpoint's `trainer_state.json` records. `None` for any other model.
    pub fn of_trained_model(dir: &Path) -> Option<(TrainConfig, PathBuf)> {
        let read =
            |p: &Path| -> Option<serde_json::Value> { serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok() };
        let run = dir.join(RUN_CONFIG_FILE);
        let state = dir.join("trainer_state.json");
        let (v, from) = match read(&run) {
            Some(v) => (v, run),
            None => (read(&state)?.get("config")?.clone(), state),
        };
        serde_json::from_value(v).ok().map(|c| (c, from))
    }
}

pub fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An f-divergence other than reverse KL is refused with the losses TRL 1.16 refuses it
    /// with (their β·log Z(x) does not cancel), and accepted with the others.
    #[test]
    fn f_divergence_is_refused_where_trl_refuses_it() {
        let dir = crate::testing::scratch_dir("fdiv-config");
        let p = dir.join("run.toml");
        std::fs::write(&p, "model_name_or_path = \"m\"\ntrain_file = \"d.jsonl\"\n").unwrap();
        let load = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            TrainConfig::load(Some(&p), &sets).and_then(|c| c.validate().map(|_| c))
        };
        for ok in ["ipo", "sigmoid_norm", "sigmoid,sft", "robust"] {
            let lt = format!("loss_type={ok}");
            load(&["f_divergence_type=js_divergence", &lt]).unwrap();
        }
        for bad in ["nca_pair", "bco_pair", "sppo_hard", "apo_down", "sigmoid,apo_zero"] {
            let lt = format!("loss_type={bad}");
            let e = load(&["f_divergence_type=forward_kl", &lt]).unwrap_err().to_string();
            assert!(
                e.contains("does not apply to loss_type") && e.contains("reverse_kl"),
                "{bad}: {e}"
            );
        }
        load(&["f_divergence_type=reverse_kl", "loss_type=nca_pair"]).unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A config saved with a UTF-8 byte-order mark (Windows editors) loads as without one.
    #[test]
    fn a_config_with_a_byte_order_mark_loads() {
        let dir = crate::testing::scratch_dir("bom-config");
        let p = dir.join("run.toml");
        std::fs::write(
            &p,
            "\u{feff}beta = 0.25\nmodel_name_or_path = \"m\"\ntrain_file = \"d.jsonl\"\n",
        )
        .unwrap();
        assert!(crate::util::read_to_string(&p).unwrap().starts_with("beta"));
        let c = TrainConfig::load(Some(&p), &[]).unwrap();
        assert_eq!(c.params.beta, 0.25);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn keys_table_matches_struct_fields() {
        // every optional key set, so that every field serialises
        let mut c = TrainConfig {
            loss_weights: Some(vec![1.0]),
            params: {
                let mut p = ObjectiveParams::default();
                p.reward.center_rewards_coefficient = Some(0.1);
                p
            },
            ref_model: Some(RefModel::One("x".into())),
            ld_alpha: Some(0.5),
            eval_file: Some("x".into()),
            resume_from_checkpoint: Some("x".into()),
            ..TrainConfig::default()
        };
        c.grpo.epsilon_high = Some(0.28);
        c.grpo.delta = Some(1.5);
        c.grpo.reward_clip_range = Some(vec![-1.0, 1.0]);
        c.grpo.reward_format_regex = Some("x".into());
        c.grpo.reward_weights = Some(vec![1.0]);
        c.online.missing_eos_penalty = Some(1.0);
        c.online.reward_model_path = Some("x".into());
        c.online.beta_per_epoch = Some(vec![0.1]);
        c.online.alpha_per_epoch = Some(vec![0.1]);
        c.online.mixture_coef_per_epoch = Some(vec![0.5]);
        c.online.judge = Some("cmd:x".into());
        c.grpo.steps_per_generation = Some(2);
        c.grpo.generation_batch_size = Some(16);
        c.metric_for_best_model = Some("loss".into());
        c.greater_is_better = Some(false);
        c.peft.lora_target_modules = Some(vec!["q_proj".into()]);
        c.peft.lora_modules_to_save = Some(vec!["score".into()]);
        c.sft.completion_only_loss = Some(true);
        c.data_seed = Some(1);
        c.save_total_limit = Some(1);
        c.run_name = Some("r".into());
        c.logging_dir = Some("l".into());
        c.disable_dropout = Some(true);
        c.precompute_ref_batch_size = Some(2);
        c.columns = Some([("prompt".to_string(), "q".to_string())].into_iter().collect());
        c.prompt_column = Some("q".into());
        c.chosen_column = Some("a".into());
        c.rejected_column = Some("b".into());
        let v = toml::Value::try_from(&c).unwrap();
        let mut fields: Vec<&str> = v.as_table().unwrap().keys().map(String::as_str).collect();
        let mut keys: Vec<&str> = TrainConfig::keys().iter().map(|k| k.0).collect();
        // the keys of the hand-written table these declarations replaced, none lost
        for old in [
            "model_name_or_path",
            "ref_model",
            "sync_ref_model",
            "ref_model_mixup_alpha",
            "ref_model_sync_steps",
            "ld_alpha",
            "use_weighting",
            "output_dir",
            "train_file",
            "eval_file",
            "task",
            "loss_type",
            "loss_weights",
            "beta",
            "label_smoothing",
            "f_divergence_type",
            "f_alpha_divergence_coef",
            "discopop_tau",
            "simpo_gamma",
            "cpo_alpha",
            "alpha",
            "reward_clusters",
            "em_steps",
            "crm",
            "crm_keep_ratio",
            "crm_warmup_ratio",
            "center_rewards_coefficient",
            "desirable_weight",
            "undesirable_weight",
            "pro_sft_weight",
            "lcpo_base",
            "lcpo_noise_rate",
            "mapo_k",
            "mapo_t",
            "slic_delta",
            "slic_lambda",
            "learning_rate",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "max_steps",
            "num_train_epochs",
            "lr_scheduler_type",
            "warmup_steps",
            "warmup_ratio",
            "max_grad_norm",
            "optim",
            "weight_decay",
            "adam_beta1",
            "adam_beta2",
            "adam_epsilon",
            "seed",
            "shuffle",
            "logging_steps",
            "save_steps",
            "eval_steps",
            "max_length",
            "max_prompt_length",
            "truncation_mode",
            "precompute_ref_log_probs",
            "padding_free",
            "gradient_checkpointing",
            "fused_kernels",
            "bf16",
            "share_prompt",
            "ref_log_probs_cache_dir",
            "resume_from_checkpoint",
            "reward_augmented",
            "skip_invalid",
            "num_threads",
            "disable_tqdm",
        ] {
            assert!(keys.contains(&old), "{old}");
        }
        fields.sort();
        keys.sort();
        assert_eq!(fields, keys);
    }

    /// docs/config.md is the generated reference, never a stale copy.
    #[test]
    fn the_config_reference_in_docs_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/config.md");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == TrainConfig::help_markdown(),
            "docs/config.md differs from the config keys: regenerate it with \
             `cargo run --release -- train --help-config --markdown > docs/config.md`"
        );
        // every key is in it, with its default
        for (k, _) in TrainConfig::keys() {
            assert!(committed.contains(&format!("| `{k}` |")), "{k}");
        }
    }

    #[test]
    fn unknown_key_suggests_closest_and_overrides_apply() {
        let dir = crate::testing::scratch_dir("cfg");
        let p = dir.join("run.toml");
        std::fs::write(
            &p,
            "model_name_or_path = \"m\"\ntrain_file = \"t\"\nlearnig_rate = 1e-5\n",
        )
        .unwrap();
        let e = TrainConfig::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(
            e.contains("`learnig_rate`") && e.contains("did you mean `learning_rate`"),
            "{e}"
        );
        std::fs::write(&p, "model_name_or_path = \"m\"\ntrain_file = \"t\"\n").unwrap();
        let c = TrainConfig::load(
            Some(&p),
            &[
                "beta=0.25".into(),
                "output_dir=out/x".into(),
                "truncation_mode=keep_start".into(),
                "shuffle=false".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            (c.params.beta, c.output_dir.as_str(), c.shuffle),
            (0.25, "out/x", false)
        );
        assert_eq!(c.truncation_mode, TruncationMode::KeepStart);
        assert_eq!(c.learning_rate, 1e-6, "TRL's default");
        let e = TrainConfig::load(Some(&p), &["bta=1".into()]).unwrap_err().to_string();
        assert!(e.contains("did you mean `beta`"), "{e}");
        let e = TrainConfig::load(Some(&p), &["lr_scheduler_type=cosin".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--set lr_scheduler_type:") && e.contains("did you mean `cosine`"),
            "{e}"
        );
        let e = TrainConfig::load(Some(&p), &["optim=adam".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--set optim: `adam` is not one of adamw_torch, sgd; did you mean `adamw`?"),
            "{e}"
        );
        let e = TrainConfig::load(Some(&p), &["f_divergence_type=js".into(), "optim=adamw".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--set f_divergence_type: `js` is not one of"), "{e}");
        let e = TrainConfig::load(Some(&p), &["loss_type=lcpo".into(), "lcpo_base=kto".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lcpo_base `kto` must be a pairwise objective"), "{e}");
        let e = TrainConfig::load(Some(&p), &["loss_type=sigmod".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `sigmoid`"), "{e}");
    }
}
