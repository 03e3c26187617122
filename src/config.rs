//! The run configuration: a TOML file whose keys are TRL's `DPOConfig` / `TrainingArguments`
//! names wherever TRL has the option, defaults equal to TRL's, every key overridable with
//! `--set key=value`. Unknown keys are an error that suggests the closest known key.

use crate::data::{TokenizeOptions, TruncationMode};
use crate::error::{Error, Result};
use crate::objectives::ObjectiveParams;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Every key: (name, default as TOML, documentation). `prefer train --help-config` prints it.
pub const KEYS: &[(&str, &str, &str)] = &[
    (
        "model_name_or_path",
        "(required)",
        "Policy to train: an HF model directory (config.json + safetensors) or a .gguf file.",
    ),
    (
        "ref_model",
        "(the starting policy)",
        "Reference model: a path (HF dir, .gguf, or an earlier checkpoint of a run: SePPO-style), or a list of paths averaged in weight space (SALSA soup).",
    ),
    (
        "sync_ref_model",
        "false",
        "TR-DPO: every ref_model_sync_steps, π_ref ← α·π_θ + (1−α)·π_ref with α = ref_model_mixup_alpha (α = 1: the reference becomes the policy).",
    ),
    ("ref_model_mixup_alpha", "0.6", "α of sync_ref_model."),
    ("ref_model_sync_steps", "512", "Steps between reference updates with sync_ref_model."),
    (
        "ld_alpha",
        "(none)",
        "LD-DPO: log-probs count tokens past the shorter completion's length α times (policy and reference).",
    ),
    (
        "use_weighting",
        "false",
        "WPO: weight each pair's loss by exp(mean_t[log p(y_t) − log Σ_v p(v)²]) of chosen times rejected.",
    ),
    (
        "output_dir",
        "\"runs/prefer\"",
        "Where checkpoints, metrics.jsonl and the final model go.",
    ),
    (
        "train_file",
        "(required)",
        "Preference pairs, JSONL: standard, conversational or Anthropic HH (auto-detected).",
    ),
    (
        "eval_file",
        "(none)",
        "Held-out pairs evaluated every eval_steps and at the end.",
    ),
    (
        "task",
        "\"dpo\"",
        "dpo (align the policy with an objective over log-probs) | reward (train a Bradley-Terry reward model: the LM body plus a scalar head, saved as *ForSequenceClassification).",
    ),
    (
        "loss_type",
        "\"sigmoid\"",
        "Objective name (`prefer objectives list`), or a list (or comma-separated string) combined with loss_weights.",
    ),
    (
        "loss_weights",
        "(1.0 each)",
        "Weights of a loss_type list: L = Σ w_k · mean(loss_k); RPO = [\"sigmoid\", \"sft\"] with [1.0, 0.005].",
    ),
    (
        "beta",
        "0.1",
        "Temperature β: scales the implicit reward β·log(π/π_ref) (ORPO: the odds-ratio weight λ).",
    ),
    (
        "label_smoothing",
        "0.0",
        "Label-flip rate ε of cdpo, robust, exo_pair, aot, simpo, cpo (sigmoid ignores it, as TRL ≥0.29).",
    ),
    (
        "f_divergence_type",
        "\"reverse_kl\"",
        "reverse_kl | forward_kl | js_divergence | alpha_divergence: transform of the log-ratios (TRL).",
    ),
    ("f_alpha_divergence_coef", "0.5", "α of alpha_divergence."),
    ("discopop_tau", "0.05", "τ of the discopop loss."),
    ("simpo_gamma", "0.5", "Target reward margin γ of simpo and alphapo."),
    ("cpo_alpha", "1.0", "Weight of the NLL term of cpo."),
    ("alpha", "0.0", "AlphaPO reward-shape α (0 = SimPO's log reward)."),
    (
        "reward_clusters",
        "1",
        "MaxMin-RLHF: K > 1 learns K reward heads on one body with EM over annotator clusters (rows need `annotator`).",
    ),
    ("em_steps", "0", "Steps between EM reassignments of annotators to clusters; 0 = once per epoch."),
    (
        "crm",
        "false",
        "Collaborative reward modeling: train two reward models, each on the pairs its peer is most confident about (largest margins); the peer is saved in output_dir/peer_model.",
    ),
    ("crm_keep_ratio", "0.7", "Fraction of each batch a CRM model keeps (the rest is filtered as likely noisy)."),
    (
        "crm_warmup_ratio",
        "0.25",
        "CRM: ramp the filtered fraction linearly from 0 to 1 − crm_keep_ratio over this fraction of the run (co-teaching's schedule, Han et al. 2018: margins mean little before the models have learned anything; 0 filters from the first step).",
    ),
    ("center_rewards_coefficient", "(none)", "Reward models: weight η of the centring term mean((r_w + r_l)²) (TRL)."),
    ("desirable_weight", "1.0", "KTO's λ_D: weight of desirable completions."),
    ("undesirable_weight", "1.0", "KTO's λ_U: weight of undesirable completions."),
    ("pro_sft_weight", "1.0", "Weight of PRO's SFT term on the best response."),
    ("lcpo_base", "\"sigmoid\"", "The pairwise objective lcpo wraps."),
    ("lcpo_noise_rate", "0.1", "lcpo's initial label-noise rate η, re-estimated each step (EM) and logged as lcpo/noise_rate."),
    ("mapo_k", "0.5", "MaPO's k in φ(ℓ) = kℓ/(e^{kℓ} − 1)."),
    ("mapo_t", "1000.0", "MaPO's scale T of the margin."),
    ("slic_delta", "1.0", "SLiC's margin δ."),
    ("slic_lambda", "0.1", "SLiC's weight λ of the NLL term."),
    ("learning_rate", "1e-6", "Peak learning rate."),
    ("per_device_train_batch_size", "8", "Preference pairs per micro-batch."),
    (
        "per_device_eval_batch_size",
        "8",
        "Pairs per batch when evaluating or precomputing reference log-probs.",
    ),
    ("gradient_accumulation_steps", "1", "Micro-batches per optimizer step."),
    (
        "max_steps",
        "-1",
        "Optimizer steps to run; -1 = derive from num_train_epochs.",
    ),
    ("num_train_epochs", "3.0", "Passes over train_file when max_steps = -1."),
    (
        "lr_scheduler_type",
        "\"linear\"",
        "constant | constant_with_warmup | linear | cosine.",
    ),
    (
        "warmup_steps",
        "0",
        "Linear warm-up steps (overrides warmup_ratio when > 0).",
    ),
    ("warmup_ratio", "0.0", "Warm-up as a fraction of all steps."),
    (
        "max_grad_norm",
        "1.0",
        "Clip the global gradient norm to this; 0 = no clipping.",
    ),
    ("optim", "\"adamw_torch\"", "adamw_torch (alias adamw) | sgd."),
    (
        "weight_decay",
        "0.0",
        "Decoupled weight decay (AdamW) / L2 (SGD); not applied to biases and norms.",
    ),
    ("adam_beta1", "0.9", "AdamW β1."),
    ("adam_beta2", "0.999", "AdamW β2."),
    ("adam_epsilon", "1e-8", "AdamW ε."),
    ("seed", "42", "Seed of the data order."),
    (
        "shuffle",
        "true",
        "Shuffle the pairs each epoch (seeded); false = file order.",
    ),
    ("logging_steps", "10", "Write metrics every this many optimizer steps."),
    (
        "save_steps",
        "500",
        "Save a checkpoint every this many steps (and always at the end).",
    ),
    (
        "eval_steps",
        "0",
        "Evaluate eval_file every this many steps; 0 = only at the end.",
    ),
    ("max_length", "1024", "Max tokens of prompt + completion."),
    (
        "max_prompt_length",
        "512",
        "Max prompt tokens (truncated per truncation_mode); 0 = no limit.",
    ),
    (
        "truncation_mode",
        "\"keep_end\"",
        "keep_end (keep the prompt's last tokens) | keep_start.",
    ),
    (
        "precompute_ref_log_probs",
        "false",
        "Compute reference log-probs once, cache them on disk and drop the reference model.",
    ),
    (
        "padding_free",
        "true",
        "Pack a batch into one row without padding (each sequence attends only to itself). Same log-probs as padding; fewer tokens computed. TRL's option; its default there is false.",
    ),
    (
        "gradient_checkpointing",
        "false",
        "Recompute each decoder layer in backward instead of keeping its activations: far less memory for a second forward pass of the layers (TRL's option; exact, same numbers).",
    ),
    (
        "fused_kernels",
        "true",
        "Fused CPU kernels with their own backward (RMSNorm, RoPE, the attention of a block, SwiGLU, the log-prob head); false = candle primitive ops. Same values either way; fused is faster and keeps far fewer activations.",
    ),
    (
        "bf16",
        "false",
        "Multiply in bf16 with f32 sums, as TRL's `bf16 = true` (PyTorch CPU autocast) does: the linear layers and the log-prob head round both operands to bf16, forward and backward. Weights, gradients and optimizer state stay f32. Fast on CPUs with AMX (Xeon 4th generation and later); elsewhere the same numbers at f32 speed.",
    ),
    (
        "share_prompt",
        "true",
        "Compute each prompt once for all its responses: [prompt, chosen, rejected] as one unit in which each response sees the prompt and itself. Same log-probs as separate sequences.",
    ),
    (
        "ref_log_probs_cache_dir",
        "\"~/.cache/prefer/ref_logps\"",
        "Where precomputed reference log-probs are cached (keyed by model and data hash).",
    ),
    (
        "resume_from_checkpoint",
        "(none)",
        "A checkpoint directory, or \"latest\" for the newest one in output_dir.",
    ),
    (
        "reward_augmented",
        "false",
        "Reward-augmented relabeling of scored pairs (chosen_score, rejected_score) before training: each pair becomes two score-conditioned pairs (Zhang et al. 2024); the relabeled file is written to output_dir.",
    ),
    (
        "skip_invalid",
        "false",
        "Report and skip bad rows instead of stopping at the first.",
    ),
    ("num_threads", "0", "CPU threads for tensor ops; 0 = all cores."),
    ("disable_tqdm", "false", "No progress bar."),
];

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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
/// Unknown keys are caught by [`KEYS`] (with a suggestion) before deserialising.
#[serde(default)]
pub struct TrainConfig {
    pub model_name_or_path: String,
    pub ref_model: Option<RefModel>,
    pub sync_ref_model: bool,
    pub ref_model_mixup_alpha: f64,
    pub ref_model_sync_steps: usize,
    pub ld_alpha: Option<f64>,
    pub use_weighting: bool,
    pub output_dir: String,
    pub train_file: String,
    pub eval_file: Option<String>,
    pub task: String,
    pub reward_clusters: usize,
    pub crm: bool,
    pub crm_keep_ratio: f64,
    pub crm_warmup_ratio: f64,
    pub em_steps: usize,
    pub loss_type: LossType,
    pub loss_weights: Option<Vec<f64>>,
    /// The objectives' hyperparameters (`beta`, `label_smoothing`, ...), flattened into the
    /// config's top level.
    #[serde(flatten)]
    pub params: ObjectiveParams,
    pub learning_rate: f64,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub max_steps: i64,
    pub num_train_epochs: f64,
    pub lr_scheduler_type: String,
    pub warmup_steps: usize,
    pub warmup_ratio: f64,
    pub max_grad_norm: f64,
    pub optim: String,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub seed: u64,
    pub shuffle: bool,
    pub logging_steps: usize,
    pub save_steps: usize,
    pub eval_steps: usize,
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub truncation_mode: TruncationMode,
    pub precompute_ref_log_probs: bool,
    pub padding_free: bool,
    pub share_prompt: bool,
    pub fused_kernels: bool,
    pub bf16: bool,
    pub gradient_checkpointing: bool,
    pub ref_log_probs_cache_dir: String,
    pub resume_from_checkpoint: Option<String>,
    pub reward_augmented: bool,
    pub skip_invalid: bool,
    pub num_threads: usize,
    pub disable_tqdm: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model_name_or_path: String::new(),
            ref_model: None,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            ld_alpha: None,
            use_weighting: false,
            output_dir: "runs/prefer".into(),
            train_file: String::new(),
            eval_file: None,
            task: "dpo".into(),
            reward_clusters: 1,
            crm: false,
            crm_keep_ratio: 0.7,
            crm_warmup_ratio: 0.25,
            em_steps: 0,
            loss_type: LossType::One("sigmoid".into()),
            loss_weights: None,
            params: ObjectiveParams::default(),
            learning_rate: 1e-6,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            max_steps: -1,
            num_train_epochs: 3.0,
            lr_scheduler_type: "linear".into(),
            warmup_steps: 0,
            warmup_ratio: 0.0,
            max_grad_norm: 1.0,
            optim: "adamw_torch".into(),
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            seed: 42,
            shuffle: true,
            logging_steps: 10,
            save_steps: 500,
            eval_steps: 0,
            max_length: 1024,
            max_prompt_length: 512,
            truncation_mode: TruncationMode::KeepEnd,
            precompute_ref_log_probs: false,
            padding_free: true,
            share_prompt: true,
            fused_kernels: true,
            bf16: false,
            gradient_checkpointing: false,
            ref_log_probs_cache_dir: "~/.cache/prefer/ref_logps".into(),
            resume_from_checkpoint: None,
            reward_augmented: false,
            skip_invalid: false,
            num_threads: 0,
            disable_tqdm: false,
        }
    }
}

fn check_keys(table: &toml::Table, origin: &str) -> Result<()> {
    for key in table.keys() {
        if !KEYS.iter().any(|(k, _, _)| k == key) {
            let hint = crate::util::closest(key, KEYS.iter().map(|(k, _, _)| *k))
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_else(|| "; `prefer train --help-config` lists every key".into());
            return Err(Error::Config(format!("{origin}: unknown key `{key}`{hint}")));
        }
    }
    Ok(())
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
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let mut table = match path {
            Some(p) => {
                let text = crate::util::read_to_string(p)?;
                let t: toml::Table =
                    toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
                check_keys(&t, &p.display().to_string())?;
                t
            }
            None => toml::Table::new(),
        };
        for o in overrides {
            let (k, v) = parse_override(o)?;
            let mut one = toml::Table::new();
            one.insert(k.clone(), v.clone());
            check_keys(&one, "--set")?;
            // ints given where floats are expected are fine in TOML; make "1e-5" strings numbers
            table.insert(k, v);
        }
        let cfg: TrainConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(e.message().to_string()))?;
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
        if self.per_device_train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return bad("per_device_train_batch_size and gradient_accumulation_steps must be ≥ 1".into());
        }
        if !matches!(
            self.lr_scheduler_type.as_str(),
            "constant" | "constant_with_warmup" | "linear" | "cosine"
        ) {
            return bad(format!(
                "lr_scheduler_type `{}` is not supported (constant, constant_with_warmup, linear, cosine)",
                self.lr_scheduler_type
            ));
        }
        if self.crm && (self.task != "reward" || self.reward_clusters > 1) {
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
        if self.reward_clusters > 1 && self.task != "reward" {
            return bad("reward_clusters > 1 trains several reward heads: set task = \"reward\"".into());
        }
        if !matches!(self.task.as_str(), "dpo" | "reward") {
            return bad(format!("task `{}` is not one of dpo, reward", self.task));
        }
        if !matches!(self.optim.as_str(), "adamw" | "adamw_torch" | "sgd") {
            return bad(format!("optim `{}` is not supported (adamw_torch, sgd)", self.optim));
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
        let reward = self.task == "reward";
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

    pub fn kernels(&self) -> crate::model::Kernels {
        crate::model::Kernels {
            fused: self.fused_kernels,
            bf16: self.bf16,
        }
    }

    pub fn tokenize_options(&self) -> TokenizeOptions {
        TokenizeOptions {
            max_length: Some(self.max_length),
            max_prompt_length: (self.max_prompt_length > 0).then_some(self.max_prompt_length),
            truncation_mode: self.truncation_mode,
        }
    }

    pub fn output_dir(&self) -> PathBuf {
        PathBuf::from(&self.output_dir)
    }

    pub fn cache_dir(&self) -> PathBuf {
        expand_home(&self.ref_log_probs_cache_dir)
    }

    /// `--help-config` text.
    pub fn help() -> String {
        let mut s = String::from("Run configuration keys (TOML; override any with --set key=value):\n\n");
        for (k, d, doc) in KEYS {
            s.push_str(&format!("  {k:<30} default {d}\n      {doc}\n"));
        }
        s
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

    #[test]
    fn keys_table_matches_struct_fields() {
        let c = TrainConfig {
            loss_weights: Some(vec![1.0]),
            params: ObjectiveParams {
                center_rewards_coefficient: Some(0.1),
                ..Default::default()
            },
            ref_model: Some(RefModel::One("x".into())),
            ld_alpha: Some(0.5),
            eval_file: Some("x".into()),
            resume_from_checkpoint: Some("x".into()),
            ..TrainConfig::default()
        };
        let v = toml::Value::try_from(&c).unwrap();
        let mut fields: Vec<&str> = v.as_table().unwrap().keys().map(String::as_str).collect();
        let mut keys: Vec<&str> = KEYS.iter().map(|k| k.0).collect();
        fields.sort();
        keys.sort();
        assert_eq!(fields, keys);
    }

    #[test]
    fn unknown_key_suggests_closest_and_overrides_apply() {
        let dir = std::env::temp_dir().join(format!("prefer-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
        let e = TrainConfig::load(Some(&p), &["loss_type=sigmod".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `sigmoid`"), "{e}");
    }
}
