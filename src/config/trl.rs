//! The keys a TRL recipe sets that are not prefer's own run keys: each is mapped to prefer's
//! meaning, accepted because it changes nothing prefer computes (a performance or hub knob of
//! PyTorch's stack), or refused with what to do instead. Never ignored silently: the accepted
//! ones are listed on stderr once per run.

use crate::error::{Error, Result};

/// What prefer does with a TRL key it has no field for.
enum Handling {
    /// Accepted; changes nothing here (the reason is printed once).
    Ignored(&'static str),
    /// Accepted when it has this value (TRL's default); any other value is refused with the
    /// message.
    OnlyDefault(toml::Value, &'static str),
}

fn off() -> toml::Value {
    toml::Value::Boolean(false)
}

fn handling(key: &str) -> Option<Handling> {
    use Handling::*;
    Some(match key {
        // TrainingArguments knobs of PyTorch's machinery
        "overwrite_output_dir" | "do_train" | "do_eval" | "do_predict" | "prediction_loss_only" => {
            Ignored("the run's actions come from the command, not flags")
        }
        "eval_accumulation_steps" | "dataloader_num_workers" | "dataloader_pin_memory" | "dataloader_persistent_workers"
        | "dataloader_prefetch_factor" | "dataset_num_proc" | "tf32" | "torch_compile" | "torch_compile_backend"
        | "torch_compile_mode" | "use_cpu" | "no_cuda" | "local_rank" | "ddp_backend" | "ddp_find_unused_parameters"
        | "ddp_timeout" | "ddp_bucket_cap_mb" | "gradient_checkpointing_kwargs" | "use_liger_kernel" | "use_logits_to_keep"
        | "pad_to_multiple_of" | "average_tokens_across_devices" | "half_precision_backend" | "log_level"
        | "log_level_replica" | "log_on_each_node" | "save_on_each_node" | "skip_memory_metrics" | "remove_unused_columns"
        | "label_names" | "include_tokens_per_second" | "include_num_input_tokens_seen" | "logging_first_step"
        | "logging_nan_inf_filter" | "save_only_model" | "eval_on_start" | "model_init_kwargs" | "torch_dtype"
        | "router_aux_loss_coef" | "cast_lm_head_to_fp32" | "ds3_gather_for_generation" | "eval_packing"
        | "log_completions" | "num_completions_to_print" | "log_unique_prompts" | "wandb_log_unique_prompts"
        | "dataset_kwargs_skip" | "hub_strategy" | "hub_private_repo" | "hub_token" | "hub_model_id"
        | "optim_args" | "length_column_name" | "group_by_length"
        | "shuffle_dataset" | "seed_data" => Ignored(
            "a performance, logging or hub setting of PyTorch/transformers; prefer's results do not depend on it",
        ),
        "save_safetensors" => OnlyDefault(
            toml::Value::Boolean(true),
            "prefer writes safetensors only (PyTorch .bin files are not written)",
        ),
        "fp16" => OnlyDefault(
            off(),
            "fp16 is a GPU mixed precision; on a CPU use bf16 = true (bf16 matmuls with f32 sums, as TRL's CPU autocast)",
        ),
        "bf16_full_eval" | "fp16_full_eval" => OnlyDefault(off(), "evaluation runs at the training precision"),
        "push_to_hub" => OnlyDefault(
            off(),
            "prefer does not upload; push output_dir with `huggingface-cli upload` (it is an HF / PEFT directory)",
        ),
        "deepspeed" | "fsdp" | "fsdp_config" | "accelerator_config" => OnlyDefault(
            toml::Value::String(String::new()),
            "prefer trains on one CPU process; there is nothing to shard",
        ),
        "trust_remote_code" => OnlyDefault(off(), "prefer runs only the Llama family it implements; no remote code"),
        "activation_offloading" => OnlyDefault(
            off(),
            "use gradient_checkpointing = true for the same purpose (activations recomputed, not kept)",
        ),
        "use_vllm" => OnlyDefault(off(), "prefer samples with its own KV-cache sampler; there is no vLLM"),
        "neftune_noise_alpha" => OnlyDefault(toml::Value::String(String::new()), "NEFTune is not implemented"),
        "reference_free" => OnlyDefault(
            off(),
            "TRL 1.x removed it; use a reference-free objective (loss_type = \"simpo\", \"orpo\", \"cpo\", ...: `prefer objectives list`)",
        ),
        "generate_during_eval" => OnlyDefault(
            off(),
            "not implemented in training; sample and score after it with `prefer eval --model OUTPUT_DIR --prompts FILE`",
        ),
        "pad_token" | "eos_token" | "chat_template_path" => OnlyDefault(
            toml::Value::String(String::new()),
            "prefer takes these from the model's tokenizer files; edit tokenizer_config.json (or the GGUF) instead",
        ),
        "lr_scheduler_kwargs" | "dataset_kwargs" | "generation_kwargs" | "chat_template_kwargs" => {
            OnlyDefault(toml::Value::String(String::new()), "not supported; leave it unset")
        }
        _ if key.starts_with("vllm_") => Ignored("used only with use_vllm, which prefer does not have"),
        _ => return None,
    })
}

/// Whether `key` is a key of TRL's configs or transformers' TrainingArguments that prefer
/// handles here (so an unknown-key message never suggests it as a typo of something else).
pub fn is_trl_key(key: &str) -> bool {
    handling(key).is_some() || ["rpo_alpha", "dataset_name", "dataset_config"].contains(&key)
}

/// Whether `v` is "unset": TOML has no null, so recipes translated from YAML leave it out;
/// an empty string or table counts as unset too.
fn unset(v: &toml::Value) -> bool {
    match v {
        toml::Value::String(s) => s.is_empty() || s == "none" || s == "None",
        toml::Value::Table(t) => t.is_empty(),
        toml::Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Apply the TRL keys of `table` (from `origin`): map `rpo_alpha`, drop the accepted ones (with
/// a note), refuse the others. Returns the notes to print.
pub fn apply(table: &mut toml::Table, origin: &str) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    // rpo_alpha = α: RPO, the DPO loss plus α times the NLL of the chosen completion
    if let Some(v) = table.remove("rpo_alpha") {
        let alpha = match v {
            toml::Value::Float(f) => Some(f),
            toml::Value::Integer(i) => Some(i as f64),
            ref other if unset(other) => None,
            _ => return Err(Error::Config(format!("{origin}: `rpo_alpha`: expected a number"))),
        };
        if let Some(alpha) = alpha {
            let names: Vec<String> = match table.get("loss_type") {
                None => vec!["sigmoid".into()],
                Some(toml::Value::String(s)) => s.split(',').map(|x| x.trim().to_string()).collect(),
                Some(toml::Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
                Some(_) => {
                    return Err(Error::Config(format!(
                        "{origin}: `loss_type`: expected a name or a list"
                    )))
                }
            };
            if names.iter().any(|n| n == "sft") {
                return Err(Error::Config(format!(
                    "{origin}: rpo_alpha adds the `sft` term, and loss_type already has it; set its weight in loss_weights instead"
                )));
            }
            let mut weights: Vec<f64> = match table.get("loss_weights") {
                Some(toml::Value::Array(a)) => a
                    .iter()
                    .map(|x| x.as_float().or_else(|| x.as_integer().map(|i| i as f64)))
                    .collect::<Option<_>>()
                    .ok_or_else(|| Error::Config(format!("{origin}: `loss_weights`: expected numbers")))?,
                _ => vec![1.0; names.len()],
            };
            let mut names = names;
            names.push("sft".into());
            weights.push(alpha);
            table.insert(
                "loss_type".into(),
                toml::Value::Array(names.into_iter().map(toml::Value::String).collect()),
            );
            table.insert(
                "loss_weights".into(),
                toml::Value::Array(weights.into_iter().map(toml::Value::Float).collect()),
            );
            notes.push(format!(
                "rpo_alpha = {alpha}: loss_type gets the `sft` term with weight {alpha} (TRL's RPO)"
            ));
        }
    }
    dataset_name(table, origin, &mut notes)?;
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let Some(h) = handling(&key) else { continue };
        let v = table.remove(&key).expect("listed");
        match h {
            Handling::Ignored(why) => notes.push(format!("`{key}` accepted: {why}")),
            Handling::OnlyDefault(default, why) => {
                if v == default || unset(&v) {
                    notes.push(format!("`{key}` = {v} accepted (TRL's default)"));
                } else {
                    return Err(Error::Config(format!(
                        "{origin}: `{key}` = {v} is not supported: {why}"
                    )));
                }
            }
        }
    }
    Ok(notes)
}

/// TRL scripts' `dataset_name` (with `dataset_config`, a subset): the data to train on, which
/// prefer reads from a local path. A path is `train_file`; a hub id is refused with how to
/// download it, as prefer never fetches from a hub itself.
fn dataset_name(table: &mut toml::Table, origin: &str, notes: &mut Vec<String>) -> Result<()> {
    let text = |key: &str, v: toml::Value| match v {
        toml::Value::String(s) => Ok(Some(s).filter(|s| !unset(&toml::Value::String(s.clone())))),
        other => Err(Error::Config(format!(
            "{origin}: `{key}`: expected a path, found {other}"
        ))),
    };
    let name = table
        .remove("dataset_name")
        .map(|v| text("dataset_name", v))
        .transpose()?
        .flatten();
    let config = table
        .remove("dataset_config")
        .map(|v| text("dataset_config", v))
        .transpose()?
        .flatten();
    let base = match (name, table.get("train_file")) {
        (Some(_), Some(_)) => {
            return Err(Error::Config(format!(
                "{origin}: both dataset_name and train_file are set; they name the same thing, keep one"
            )))
        }
        (Some(n), None) => {
            if !std::path::Path::new(&n).exists() {
                return Err(Error::Config(format!(
                    "{origin}: dataset_name = \"{n}\" is not a local path: prefer reads data from disk. \
                     Download it first, e.g. `huggingface-cli download --repo-type dataset {n} --local-dir data/{n}`, \
                     then set dataset_name (or train_file) to that folder"
                )));
            }
            notes.push(format!("dataset_name = \"{n}\" read as train_file"));
            n
        }
        (None, Some(toml::Value::String(f))) => f.clone(),
        (None, _) => {
            if config.is_some() {
                return Err(Error::Config(format!(
                    "{origin}: dataset_config needs dataset_name or train_file"
                )));
            }
            return Ok(());
        }
    };
    let file = match config {
        // a hub dataset's subset: its own folder of the download
        Some(c) => std::path::Path::new(&base).join(c).display().to_string(),
        None => base,
    };
    table.insert("train_file".into(), toml::Value::String(file));
    Ok(())
}

/// Every key of TRL 1.16's DPOConfig, RewardConfig, SFTConfig, KTOConfig, GRPOConfig,
/// RLOOConfig and the online trainers' configs (from TRL's source): an unknown key among them
/// is a TRL option prefer lacks, never a typo of another key.
const TRL_CONFIG_KEYS: &[&str] = &[
    "activation_offloading",
    "assistant_only_loss",
    "beta",
    "cache_implementation",
    "cast_lm_head_to_fp32",
    "center_rewards_coefficient",
    "chat_template_kwargs",
    "chat_template_path",
    "completion_only_loss",
    "dataset_kwargs",
    "dataset_num_proc",
    "dataset_text_field",
    "delta",
    "desirable_weight",
    "disable_dropout",
    "discopop_tau",
    "ds3_gather_for_generation",
    "entropy_coef",
    "entropy_coef_delta",
    "entropy_coef_max",
    "entropy_coef_min",
    "entropy_target",
    "eos_token",
    "epsilon",
    "epsilon_high",
    "eval_packing",
    "f_alpha_divergence_coef",
    "f_divergence_type",
    "generation_batch_size",
    "generation_kwargs",
    "importance_sampling_level",
    "label_smoothing",
    "ld_alpha",
    "learning_rate",
    "log_completions",
    "log_completions_hub_repo",
    "log_multimodal",
    "log_unique_prompts",
    "loss_type",
    "loss_weights",
    "mask_truncated_completions",
    "max_completion_length",
    "max_length",
    "max_tool_calling_iterations",
    "min_p",
    "model_init_kwargs",
    "multi_objective_aggregation",
    "normalize_advantages",
    "num_completions_to_print",
    "num_generations",
    "num_generations_eval",
    "num_iterations",
    "off_policy_mask_threshold",
    "packing",
    "packing_strategy",
    "pad_to_multiple_of",
    "pad_token",
    "padding_free",
    "precompute_ref_batch_size",
    "precompute_ref_log_probs",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "remove_unused_columns",
    "repetition_penalty",
    "reward_clip_range",
    "reward_weights",
    "router_aux_loss_coef",
    "sapo_temperature_neg",
    "sapo_temperature_pos",
    "scale_rewards",
    "shuffle_dataset",
    "steps_per_generation",
    "sync_ref_model",
    "temperature",
    "top_entropy_quantile",
    "top_k",
    "top_p",
    "train_sampling_strategy",
    "transformers_continuous_batching_config",
    "truncation_mode",
    "trust_remote_code",
    "undesirable_weight",
    "use_adaptive_entropy",
    "use_bias_correction_kl",
    "use_transformers_continuous_batching",
    "use_transformers_paged",
    "use_vllm",
    "use_weighting",
    "vespo_k_neg",
    "vespo_k_pos",
    "vespo_lambda_neg",
    "vespo_lambda_pos",
    "vllm_enable_sleep_mode",
    "vllm_gpu_memory_utilization",
    "vllm_group_port",
    "vllm_importance_sampling_cap",
    "vllm_importance_sampling_clip_max",
    "vllm_importance_sampling_clip_min",
    "vllm_importance_sampling_correction",
    "vllm_importance_sampling_mode",
    "vllm_max_model_length",
    "vllm_mode",
    "vllm_model_impl",
    "vllm_server_base_url",
    "vllm_server_host",
    "vllm_server_port",
    "vllm_server_timeout",
    "vllm_structured_outputs_regex",
    "vllm_tensor_parallel_size",
];

/// Whether `key` is a key of one of TRL's configs.
pub fn is_trl_config_key(key: &str) -> bool {
    TRL_CONFIG_KEYS.contains(&key)
}
