//! SFT's keys (task = "sft"; TRL's `SFTConfig` names and defaults), flattened into the run
//! config. Where SFTConfig's defaults differ from the offline trainers' (learning_rate 2e-5,
//! truncation_mode keep_start, loss_type nll), `TrainConfig::load` applies them for task = "sft"
//! unless the key is set.

use crate::config::{Task, TrainConfig};
use crate::error::{Error, Result};

choice! {
    /// SFT's loss (`loss_type` with `task = "sft"`), as TRL.
    pub enum SftLoss {
        /// Token-mean negative log-likelihood of the target tokens over the step.
        Nll = "nll",
        /// Dynamic fine-tuning (Wu et al. 2025): each token's NLL weighted by its probability
        /// (no gradient through the weight).
        Dft = "dft",
    }
}

settings! {
    /// Supervised fine-tuning (task = "sft"; TRL's SFTConfig names): plain text
    /// (dataset_text_field), prompt-completion or conversational `messages` rows.
    pub struct SftParams {
        /// The column of plain-text rows.
        pub dataset_text_field: String = "text".into(),
        /// Pack sequences into rows of max_length tokens (best-fit decreasing, as TRL's
        /// packing_strategy = "bfd"); each sequence still attends only to itself.
        pub packing: bool = false,
        /// How to pack: bfd (the only strategy prefer implements).
        pub packing_strategy: String = "bfd".into(),
        /// Loss on the completion only (prompt-completion rows). Default: on for
        /// prompt-completion data, as TRL.
        pub completion_only_loss: Option<bool> = None,
        /// Loss on the assistant's tokens only: the `{% generation %}` spans of the chat template
        /// (as TRL, a template without them is an error).
        pub assistant_only_loss: bool = false,
    }
}

impl SftParams {
    pub(crate) fn validate(cfg: &TrainConfig) -> Result<()> {
        if cfg.task != Task::Sft {
            return Ok(());
        }
        let bad = |m: String| Err(Error::Config(m));
        if cfg.sft.packing_strategy != "bfd" {
            return bad(format!(
                "packing_strategy = \"{}\": prefer packs with \"bfd\" (best-fit decreasing, TRL's default) only",
                cfg.sft.packing_strategy
            ));
        }
        if cfg.sft.packing && cfg.max_length == 0 {
            return bad("packing needs max_length (the length of a packed row)".into());
        }
        cfg.sft_loss()?;
        Ok(())
    }
}

impl TrainConfig {
    /// SFT's loss from `loss_type`.
    pub fn sft_loss(&self) -> Result<SftLoss> {
        let names = self.loss_type.names();
        match names.as_slice() {
            [one] => SftLoss::parse(one).map_err(|e| Error::Config(format!("loss_type (task = \"sft\"): {e}"))),
            _ => Err(Error::Config("loss_type (task = \"sft\"): one of nll, dft".into())),
        }
    }

    /// How SFT rows become examples.
    pub fn sft_options(&self) -> crate::data::sft::SftOptions {
        crate::data::sft::SftOptions {
            dataset_text_field: self.sft.dataset_text_field.clone(),
            completion_only_loss: self.sft.completion_only_loss,
            assistant_only_loss: self.sft.assistant_only_loss,
            max_length: self.max_length,
            truncation_mode: self.truncation_mode,
            packing: self.sft.packing,
            columns: self.column_map(),
        }
    }
}
