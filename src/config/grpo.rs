//! GRPO's keys (TRL's `GRPOConfig` names and defaults), flattened into the run config.

use crate::config::TrainConfig;
use crate::error::{Error, Result};

choice! {
    /// How GRPO normalises its per-token losses (`loss_type` with `task = "grpo"`), as TRL.
    pub enum GrpoLoss {
        /// Σ over the step's completion tokens / the step's completion tokens (TRL's default).
        Dapo = "dapo",
        /// Each completion's token mean, then the mean over completions.
        Grpo = "grpo",
        /// Σ over a micro-batch's tokens / its tokens.
        Bnpo = "bnpo",
        /// Σ over a micro-batch's tokens / (completions × max_completion_length).
        DrGrpo = "dr_grpo",
        /// Clipped importance weights (no gradient) times A·log π, normalised as dapo.
        Cispo = "cispo",
        /// A soft sigmoid gate on the ratio instead of clipping, normalised as grpo.
        Sapo = "sapo",
        /// The clipped surrogate summed over each completion's tokens, then averaged over
        /// completions (length-unbiased; use with importance_sampling_level = "sequence").
        Luspo = "luspo",
        /// Gamma weights φ(w) of the sequence ratio (no gradient) times −A·log π, normalised as dapo.
        Vespo = "vespo",
    }
}

choice! {
    /// Where the importance ratio is taken (`importance_sampling_level`), as TRL.
    pub enum ImportanceSamplingLevel {
        /// Per token (GRPO).
        Token = "token",
        /// Per sequence: exp of the mean per-token log-ratio (GSPO).
        Sequence = "sequence",
    }
}

choice! {
    /// How rewards are scaled into advantages (`scale_rewards`), as TRL.
    pub enum ScaleRewards {
        /// (r − group mean) / (group std + 1e-4).
        Group = "group",
        /// (r − group mean) / (std over the whole batch + 1e-4).
        Batch = "batch",
        /// r − group mean.
        None = "none",
    }
}

choice! {
    /// How several rewards become one advantage (`multi_objective_aggregation`), as TRL.
    pub enum MultiObjectiveAggregation {
        SumThenNormalize = "sum_then_normalize",
        NormalizeThenSum = "normalize_then_sum",
    }
}

settings! {
    /// GRPO and RLOO (task = "grpo" | "rloo"; TRL's GRPOConfig and RLOOConfig names; RLOO's
    /// defaults differ: beta 0.05, num_generations 2). train_file holds prompts: `prompt` as a
    /// string or as chat messages, other columns go to the reward functions. loss_type names
    /// the loss (dapo, grpo, bnpo, dr_grpo, cispo, sapo; default dapo); beta defaults to 0 (no
    /// reference model); per_device_train_batch_size counts completions.
    pub struct GrpoParams {
        /// Completions sampled per prompt (the group).
        pub num_generations: usize = 8,
        /// Tokens generated at most per completion.
        pub max_completion_length: usize = 512,
        /// Sampling temperature (also the temperature of the log-probs trained on).
        pub temperature: f64 = 1.0,
        /// Nucleus sampling mass (1 = off).
        pub top_p: f64 = 1.0,
        /// Sample among the k most likely tokens (0 = off).
        pub top_k: usize = 0,
        /// Drop tokens below this fraction of the most likely one's probability (0 = off).
        pub min_p: f64 = 0.0,
        /// transformers' repetition penalty while sampling (1 = off).
        pub repetition_penalty: f64 = 1.0,
        /// Sample in bf16: decoding reads the weight matrices as bf16, half the bytes per
        /// token. On CPUs with AMX they are packed once per generation into AMX tiles and the
        /// activations are rounded to bf16 too (bf16 products with f32 sums, as `bf16 = true`
        /// trains; about twice the batched decoding speed of f32); elsewhere f32 activations
        /// meet the bf16 weights widened on the fly. The completions then follow the bf16
        /// model, while the log-probs the loss uses stay the policy's own (as with vLLM
        /// sampling in bf16); the logged sampling log-probs show the difference.
        pub bf16_sampling: bool = false,
        /// Clipping ε of the probability ratio (lower bound 1 − ε).
        pub epsilon: f64 = 0.2,
        /// Upper clipping bound 1 + epsilon_high (default: epsilon); cispo's ε_max.
        pub epsilon_high: Option<f64> = None,
        /// Two-sided clipping: the unclipped ratio is also capped at delta (none by default).
        pub delta: Option<f64> = None,
        /// token | sequence (GSPO): where the importance ratio is taken.
        pub importance_sampling_level: ImportanceSamplingLevel = ImportanceSamplingLevel::Token,
        /// sapo's temperature for tokens with positive advantages.
        pub sapo_temperature_pos: f64 = 1.0,
        /// sapo's temperature for tokens with non-positive advantages.
        pub sapo_temperature_neg: f64 = 1.05,
        /// vespo's k for completions with A ≥ 0.
        pub vespo_k_pos: f64 = 2.0,
        /// vespo's λ for completions with A ≥ 0.
        pub vespo_lambda_pos: f64 = 3.0,
        /// vespo's k for completions with A < 0.
        pub vespo_k_neg: f64 = 3.0,
        /// vespo's λ for completions with A < 0.
        pub vespo_lambda_neg: f64 = 2.0,
        /// Leave completions cut at max_completion_length out of the loss (and its normalisers).
        pub mask_truncated_completions: bool = false,
        /// Train the policy term only on the tokens whose entropy is in this top fraction of the
        /// batch's (1 = every token).
        pub top_entropy_quantile: f64 = 1.0,
        /// sum_then_normalize (weighted sum of the rewards, then group advantages) |
        /// normalize_then_sum (each reward normalised within its group, the weighted sum then
        /// standardised over the batch; GDPO).
        pub multi_objective_aggregation: MultiObjectiveAggregation = MultiObjectiveAggregation::SumThenNormalize,
        /// μ: optimizer steps on each generation's completions (the clipped ratio against the
        /// log-probs at generation time binds from the second on).
        pub num_iterations: usize = 1,
        /// Micro-batches each generation serves (TRL's; default gradient_accumulation_steps:
        /// one generation per optimizer step). More spreads one generation over several
        /// optimizer steps, with the log-probs at generation time as the ratio's denominator; the
        /// generation's completions are then shuffled across its micro-batches, as TRL does.
        pub steps_per_generation: Option<usize> = None,
        /// Completions sampled at once (TRL's; instead of steps_per_generation, which is then
        /// generation_batch_size / per_device_train_batch_size).
        pub generation_batch_size: Option<usize> = None,
        /// group | batch | none: how rewards are scaled into advantages.
        pub scale_rewards: ScaleRewards = ScaleRewards::Group,
        /// Reward functions: accuracy, format, length, cmd:<command line>, or a reward model
        /// prefer trained (its path, or model:<path>).
        pub reward_funcs: Vec<String> = Vec::new(),
        /// Weights of reward_funcs in the total reward (default 1 each).
        pub reward_weights: Option<Vec<f64>> = None,
        /// The `format` reward's regular expression.
        pub reward_format_regex: Option<String> = None,
        /// The `length` reward's target, in completion tokens.
        pub reward_length_target: usize = 0,
        /// Seconds a `cmd:` reward may take for one step's completions.
        pub reward_timeout: f64 = 600.0,
        /// RLOO: standardise the advantages over the batch.
        pub normalize_advantages: bool = false,
        /// RLOO: clip rewards to [min, max] before the baseline.
        pub reward_clip_range: Option<Vec<f64>> = None,
    }
}

impl GrpoParams {
    /// The normalisation `loss_type` names for GRPO (`sigmoid`, the config's default, means
    /// GRPO's default `dapo`).
    pub fn loss(cfg: &TrainConfig) -> Result<GrpoLoss> {
        let names = cfg.loss_type.names();
        match names.as_slice() {
            [n] if n == "sigmoid" => Ok(GrpoLoss::Dapo),
            [n] => GrpoLoss::parse(n).map_err(|e| Error::Config(format!("`loss_type` with task = \"grpo\": {e}"))),
            _ => Err(Error::Config(
                "task = \"grpo\" takes one loss_type (dapo, grpo, bnpo, dr_grpo, cispo, sapo, luspo, vespo)".into(),
            )),
        }
    }

    /// The checks a GRPO or RLOO run needs before it loads anything.
    /// Micro-batches per generation: steps_per_generation, or generation_batch_size in
    /// micro-batches, else gradient_accumulation_steps (TRL's rules).
    pub fn steps_per_generation(cfg: &TrainConfig) -> Result<usize> {
        let g = &cfg.grpo;
        let b = cfg.per_device_train_batch_size;
        let s = match (g.steps_per_generation, g.generation_batch_size) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "steps_per_generation and generation_batch_size set the same thing; keep one".into(),
                ))
            }
            (Some(s), None) => s,
            (None, Some(n)) if b > 0 && n.is_multiple_of(b) => n / b,
            (None, Some(n)) => {
                return Err(Error::Config(format!(
                    "generation_batch_size ({n}) must be a multiple of per_device_train_batch_size ({b})"
                )))
            }
            (None, None) => cfg.gradient_accumulation_steps,
        };
        if s == 0 {
            return Err(Error::Config("steps_per_generation must be ≥ 1".into()));
        }
        Ok(s)
    }

    pub fn validate(cfg: &TrainConfig) -> Result<()> {
        let g = &cfg.grpo;
        let bad = |m: String| Err(Error::Config(m));
        if cfg.task == crate::config::Task::Rloo && cfg.loss_type.names() != ["sigmoid"] {
            return bad("task = \"rloo\" has one loss (TRL's RLOO); remove loss_type".into());
        }
        if matches!(&g.reward_clip_range, Some(r) if r.len() != 2 || r[0] > r[1]) {
            return bad("reward_clip_range must be [min, max] with min ≤ max".into());
        }
        Self::loss(cfg)?;
        if g.num_generations < 2 {
            return bad("num_generations must be ≥ 2: GRPO compares the completions of a prompt".into());
        }
        if !cfg.per_device_train_batch_size.is_multiple_of(g.num_generations) {
            return bad(format!(
                "per_device_train_batch_size ({}) counts completions and must be a multiple of num_generations ({})",
                cfg.per_device_train_batch_size, g.num_generations
            ));
        }
        if g.max_completion_length == 0 {
            return bad("max_completion_length must be ≥ 1".into());
        }
        if !(g.top_entropy_quantile > 0.0 && g.top_entropy_quantile <= 1.0) {
            return bad("top_entropy_quantile must be in (0, 1]".into());
        }
        if g.num_iterations == 0 {
            return bad("num_iterations must be ≥ 1".into());
        }
        GrpoParams::steps_per_generation(cfg)?;
        if g.reward_funcs.is_empty() {
            return bad("task = \"grpo\" needs reward_funcs, e.g. [\"accuracy\"] (accuracy, format, length, cmd:<command line>)".into());
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) || g.temperature <= 0.0 {
            return bad("GRPO samples: top_p must be in (0, 1] and temperature > 0".into());
        }
        Ok(())
    }
}
