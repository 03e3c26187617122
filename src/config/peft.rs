//! LoRA keys (TRL's `ModelConfig` names and defaults: `use_peft`, `lora_r`, ...), flattened
//! into the run config. The adapter itself is [`crate::model::lora`].

use crate::config::{Task, TrainConfig};
use crate::error::{Error, Result};
use crate::model::lora::{LoraSpec, Module};

settings! {
    /// LoRA (TRL's ModelConfig names and defaults): train low-rank adapters on a frozen base
    /// kept in its stored precision (GGUF blocks, bf16 safetensors), saved in PEFT's format.
    pub struct PeftParams {
        /// Train LoRA adapters instead of every weight. The reference of DPO-family objectives
        /// is then the base with the adapters off (no second copy).
        pub use_peft: bool = false,
        /// LoRA rank r.
        pub lora_r: usize = 16,
        /// LoRA alpha: the update is scaled by lora_alpha / r (lora_alpha / √r with use_rslora).
        pub lora_alpha: f64 = 32.0,
        /// Dropout on the adapters' input while training (as PEFT: the base path has none).
        pub lora_dropout: f64 = 0.05,
        /// Modules to adapt, by PEFT's names: q_proj, k_proj, v_proj, o_proj, gate_proj,
        /// up_proj, down_proj, or "all-linear". Default (as PEFT for Llama): q_proj and v_proj.
        pub lora_target_modules: Option<Vec<String>> = None,
        /// Base modules trained fully and saved with the adapter (a reward model's `score` is
        /// always one).
        pub lora_modules_to_save: Option<Vec<String>> = None,
        /// PEFT's task type, written into adapter_config.json: CAUSAL_LM (SEQ_CLS for task = "reward").
        pub lora_task_type: String = "CAUSAL_LM".into(),
        /// rsLoRA: scale by lora_alpha / √r instead of lora_alpha / r.
        pub use_rslora: bool = false,
    }
}

impl TrainConfig {
    /// The adapter a LoRA run starts from.
    pub fn lora_spec(&self) -> Result<LoraSpec> {
        let p = &self.peft;
        let mut modules_to_save = p.lora_modules_to_save.clone().unwrap_or_default();
        let mut task_type = p.lora_task_type.clone();
        if self.task == Task::Reward {
            // as TRL's RewardTrainer: a sequence-classification adapter whose head is trained fully
            task_type = "SEQ_CLS".into();
            if !modules_to_save.iter().any(|m| m == "score") {
                modules_to_save.push("score".into());
            }
        }
        Ok(LoraSpec {
            r: p.lora_r,
            alpha: p.lora_alpha,
            // TRL's disable_dropout turns off every nn.Dropout, LoRA's included
            dropout: if self.dropout_disabled() { 0.0 } else { p.lora_dropout },
            targets: Module::parse_targets(p.lora_target_modules.as_deref())?,
            use_rslora: p.use_rslora,
            modules_to_save,
            base: self.model_name_or_path.clone(),
            task_type,
        })
    }

    /// The LoRA keys' own checks.
    pub(crate) fn validate_peft(&self) -> Result<()> {
        let p = &self.peft;
        if !self.peft.use_peft {
            return Ok(());
        }
        let bad = |m: &str| Err(Error::Config(m.into()));
        if p.lora_r == 0 {
            return bad("lora_r must be ≥ 1");
        }
        if !(0.0..1.0).contains(&p.lora_dropout) {
            return bad("lora_dropout must be in [0, 1)");
        }
        if !p.lora_alpha.is_finite() {
            return bad("lora_alpha must be a finite number");
        }
        Module::parse_targets(p.lora_target_modules.as_deref())?;
        for m in p.lora_modules_to_save.iter().flatten() {
            if !["score", "lm_head", "embed_tokens", "norm"].contains(&m.as_str()) {
                return Err(Error::Config(format!(
                    "lora_modules_to_save: `{m}` is not a module prefer can train beside an adapter; \
                     use score, lm_head, embed_tokens or norm"
                )));
            }
        }
        if self.sync_ref_model {
            return bad(
                "sync_ref_model with use_peft is not supported: the reference of a LoRA run is the base \
                 with the adapters off; merge the adapter (`prefer merge`) and train that model instead",
            );
        }
        if self.crm {
            return bad("crm trains a peer reward model in full; it does not run with use_peft");
        }
        Ok(())
    }
}
