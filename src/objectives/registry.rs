//! The catalogue: every objective by the name `loss_type` selects, with the data shape it
//! reads, whether it needs a reference, how its rewards are logged, how far its formula has been
//! checked and where it comes from. Adding an objective is one function in its family's file and
//! one entry here.

use super::{dpo, listwise, noisy, reference_free, unpaired, Ctx, ObjectiveOutput, ObjectiveParams};
use crate::data::Shape;
use crate::error::{Error, Result};
use candle_core::Tensor;

/// How an objective's implicit reward is logged as `rewards/chosen` / `rewards/rejected`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewardKind {
    /// β (log π − log π_ref), summed over tokens (DPO family).
    Implicit,
    /// β log π, summed (reference-free, CPO).
    PolicySum,
    /// β log π / |y| (length-normalised, SimPO / ORPO).
    PolicyMean,
    /// The statistics are a reward model's rewards; metrics are TRL RewardTrainer's.
    Reward,
    /// A Gaussian reward head's means (and log-variances in `log_variance`); metrics are TRL
    /// RewardTrainer's on the means.
    RewardDistribution,
}

/// How far a formula has been checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Transcribed from the reference implementation named in `source` and tested against it.
    Checked,
    /// The documented shape; the paper's exact formula could not be consulted.
    Experimental,
}

pub type LossFn = fn(&Ctx) -> Result<Tensor>;

/// The loss function of an objective, by the data shape it reads.
#[derive(Clone, Copy)]
pub enum LossKind {
    /// Per-example losses of pairs; metrics come from the entry's reward kind.
    Pairwise(LossFn),
    /// Unpaired (prompt, completion, label) examples: losses and metrics.
    Unpaired(fn(&unpaired::UnpairedCtx) -> Result<ObjectiveOutput>),
    /// Ranked lists: losses and metrics.
    Listwise(fn(&listwise::ListCtx) -> Result<ObjectiveOutput>),
}

impl LossKind {
    pub fn shape(&self) -> Shape {
        match self {
            LossKind::Pairwise(_) => Shape::Pairwise,
            LossKind::Unpaired(_) => Shape::Unpaired,
            LossKind::Listwise(_) => Shape::Ranked,
        }
    }
}
pub type MetricsFn = fn(&Ctx) -> Result<Vec<(String, f64)>>;

/// One catalogue entry.
pub struct ObjectiveEntry {
    pub name: &'static str,
    pub needs_reference: bool,
    pub rewards: RewardKind,
    pub status: Status,
    pub source: &'static str,
    pub loss: LossKind,
    /// Unpaired objectives that estimate a KL reference point from mismatched completions.
    pub needs_kl: bool,
    /// Extra metrics beyond the reward metrics (e.g. ORPO's `nll_loss`).
    pub metrics: Option<MetricsFn>,
    /// An objective whose hyperparameters move during training (LCPO's EM estimate of the
    /// noise rate): how they move after each optimizer step, from the step's metrics, and
    /// which keys of [`ObjectiveParams`] are that state (checkpoints save and restore them).
    pub end_step: Option<(EndStepFn, &'static [&'static str])>,
}

/// An objective's update of its own hyperparameters after an optimizer step.
pub type EndStepFn = fn(&mut ObjectiveParams, &std::collections::BTreeMap<String, f64>);

macro_rules! entry {
    ($name:literal, $reference:expr, $rewards:ident, $status:ident, $source:literal, $loss:path) => {
        entry!($name, $reference, $rewards, $status, $source, $loss, None)
    };
    ($name:literal, $reference:expr, $rewards:ident, $status:ident, $source:literal, $loss:path, $metrics:expr) => {
        ObjectiveEntry {
            name: $name,
            needs_reference: $reference,
            rewards: RewardKind::$rewards,
            status: Status::$status,
            source: $source,
            loss: LossKind::Pairwise($loss),
            needs_kl: false,
            metrics: $metrics,
            end_step: None,
        }
    };
}

/// Every pairwise objective, by the name `loss_type` selects.
pub const REGISTRY: &[ObjectiveEntry] = &[
    entry!(
        "sigmoid",
        true,
        Implicit,
        Checked,
        "DPO, Rafailov et al. 2023 (arXiv:2305.18290); TRL `sigmoid` (ε ignored since TRL 0.29)",
        dpo::sigmoid
    ),
    entry!(
        "hinge",
        true,
        Implicit,
        Checked,
        "RSO/SLiC hinge, Liu et al. 2023 (arXiv:2309.06657); TRL `hinge`",
        dpo::hinge
    ),
    entry!(
        "ipo",
        true,
        Implicit,
        Checked,
        "IPO, Azar et al. 2023 (arXiv:2310.12036); TRL `ipo` (length-normalised)",
        dpo::ipo
    ),
    entry!(
        "exo_pair",
        true,
        Implicit,
        Checked,
        "EXO, Ji et al. 2024 (arXiv:2402.00856); TRL `exo_pair` (ε defaults to 1e-3)",
        dpo::exo_pair
    ),
    entry!(
        "nca_pair",
        true,
        Implicit,
        Checked,
        "NCA, Chen et al. 2024 (arXiv:2402.05369); TRL `nca_pair`",
        dpo::nca_pair
    ),
    entry!(
        "robust",
        true,
        Implicit,
        Checked,
        "rDPO, Chowdhury et al. 2024 (arXiv:2403.00409); TRL `robust`",
        dpo::robust
    ),
    entry!(
        "bco_pair",
        true,
        Implicit,
        Checked,
        "BCO, Jung et al. 2024 (arXiv:2404.04656); TRL `bco_pair` (no running-mean shift, TRL ≥0.29)",
        dpo::bco_pair
    ),
    entry!(
        "sppo_hard",
        true,
        Implicit,
        Checked,
        "SPPO, Wu et al. 2024 (arXiv:2405.00675); TRL `sppo_hard`",
        dpo::sppo_hard
    ),
    entry!(
        "aot",
        true,
        Implicit,
        Checked,
        "AOT, Melnyk et al. 2024 (arXiv:2406.05882); TRL `aot`",
        dpo::aot
    ),
    entry!(
        "aot_unpaired",
        true,
        Implicit,
        Checked,
        "AOT unpaired, Melnyk et al. 2024 (arXiv:2406.05882); TRL `aot_unpaired` (`aot_pair` ≤0.28)",
        dpo::aot_unpaired
    ),
    entry!(
        "apo_zero",
        true,
        Implicit,
        Checked,
        "APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266); TRL `apo_zero`",
        dpo::apo_zero
    ),
    entry!(
        "apo_down",
        true,
        Implicit,
        Checked,
        "APO-down, D'Oosterlinck et al. 2024 (arXiv:2408.06266); TRL `apo_down`",
        dpo::apo_down
    ),
    entry!(
        "discopop",
        true,
        Implicit,
        Checked,
        "DiscoPOP, Chris Lu et al. 2024 (arXiv:2406.08414); TRL `discopop`",
        dpo::discopop
    ),
    entry!("dpop", true, Implicit, Experimental, "DPO-Positive (Smaug), Pal et al. 2024 (arXiv:2402.13228): the penalty λ·max(0, −Δ_w) inside the sigmoid, as recalled from the paper (its text was not consulted here; some implementations add it outside)", dpo::dpop),
    entry!(
        "sft",
        false,
        PolicySum,
        Checked,
        "token-mean NLL of the chosen completion over the batch; TRL `sft`",
        dpo::sft
    ),
    entry!(
        "sigmoid_norm",
        true,
        Implicit,
        Checked,
        "DPO on length-normalised log-ratios; TRL `sigmoid_norm`",
        dpo::sigmoid_norm
    ),
    entry!(
        "cdpo",
        true,
        Implicit,
        Checked,
        "conservative DPO, E. Mitchell 2023 (label-smoothed sigmoid; TRL ≤0.28 `sigmoid`, OpenRLHF, torchtune)",
        dpo::cdpo
    ),
    entry!(
        "ipo_sum",
        true,
        Implicit,
        Checked,
        "IPO on summed log-probs, as OpenRLHF's DPOLoss(ipo=True)",
        dpo::ipo_sum
    ),
    entry!(
        "simpo",
        false,
        PolicyMean,
        Checked,
        "SimPO, Meng et al. 2024 (arXiv:2405.14734); TRL CPOTrainer loss_type=simpo, cpo_alpha=0",
        reference_free::simpo
    ),
    entry!(
        "cpo",
        false,
        PolicySum,
        Checked,
        "CPO, Xu et al. 2024 (arXiv:2401.08417); TRL CPOTrainer loss_type=sigmoid with cpo_alpha NLL",
        reference_free::cpo
    ),
    entry!(
        "alphapo",
        false,
        PolicyMean,
        Checked,
        "AlphaPO, Gupta et al. 2025 (arXiv:2501.03884); TRL CPOTrainer simpo with `alpha` reward shape, cpo_alpha=0",
        reference_free::alphapo
    ),
    entry!(
        "orpo",
        false,
        PolicyMean,
        Checked,
        "ORPO, Hong et al. 2024 (arXiv:2403.07691); TRL ORPOTrainer (λ = beta)",
        reference_free::orpo,
        Some(reference_free::orpo_metrics)
    ),
    entry!("bradley_terry", false, Reward, Checked, "Bradley-Terry reward model loss, TRL RewardTrainer (optional per-pair `margin`, center_rewards_coefficient)", crate::objectives::reward::bradley_terry),
    entry!("gaussian", false, RewardDistribution, Experimental, "Gaussian reward head (mean, log-variance) with the Thurstone likelihood of independent Gaussian rewards, P(y_w ≻ y_l) = Φ((μ_w − μ_l − m)/√(σ_w² + σ_l²)), the uncertainty-aware generalisation of Bradley-Terry (cf. PURM, Sun et al. 2025, arXiv:2503.22480, whose exact loss was not consulted)", crate::objectives::reward::gaussian, Some(crate::objectives::reward::gaussian_metrics)),
    entry!("mapo", false, PolicyMean, Experimental, "MaPO, Hong et al. 2024 (arXiv:2406.06424), official diffusion code with the mean token NLL as the per-sample loss", reference_free::mapo),
    entry!("slic", false, PolicySum, Experimental, "SLiC-HF, Zhao et al. 2023 (arXiv:2305.10425), form recalled in ALGORITHMS.md (hinge on summed log-probs + λ·NLL of chosen)", reference_free::slic),
    entry!("osp", true, Implicit, Experimental, "OSP soft-preference cross-entropy, Zhai et al. 2024 (arXiv:2405.14103), documented shape (paper not consulted); p = preference_strength", noisy::osp),
    entry!("copg", true, Implicit, Experimental, "CoPG, Flet-Berliac et al. 2024 (arXiv:2406.19185), squared regularised-reward difference on scored pairs (completion of the formula recalled)", noisy::copg),
    ObjectiveEntry {
        name: "lcpo",
        needs_reference: true,
        rewards: RewardKind::Implicit,
        status: Status::Experimental,
        source: "LCPO / RE-PO, Cao, Xu et al. (arXiv:2509.24159), EM label-correctness wrapper around lcpo_base (documented shape, paper not consulted)",
        loss: LossKind::Pairwise(noisy::lcpo),
        needs_kl: false,
        metrics: Some(noisy::lcpo_metrics),
        end_step: Some((noisy::lcpo_end_step, &["lcpo_noise_rate"])),
    },
    ObjectiveEntry {
        name: "kto",
        needs_reference: true,
        rewards: RewardKind::Implicit,
        status: Status::Checked,
        source: "KTO, Ethayarajh et al. 2024 (arXiv:2402.01306); TRL KTOTrainer (z0 from mismatched completions)",
        loss: LossKind::Unpaired(unpaired::kto),
        needs_kl: true,
        metrics: None,
        end_step: None,
    },
    ObjectiveEntry {
        name: "apo_zero_unpaired",
        needs_reference: true,
        rewards: RewardKind::Implicit,
        status: Status::Checked,
        source: "APO-zero for unpaired data, D'Oosterlinck et al. 2024 (arXiv:2408.06266); TRL KTOTrainer loss_type",
        loss: LossKind::Unpaired(unpaired::apo_zero_unpaired),
        needs_kl: false,
        metrics: None,
        end_step: None,
    },
    ObjectiveEntry {
        name: "lipo",
        needs_reference: true,
        rewards: RewardKind::Implicit,
        status: Status::Experimental,
        source: "LiPO-λ, Liu et al. 2024 (arXiv:2402.01878); lambda weights as recalled in ALGORITHMS.md, not checked against the paper",
        loss: LossKind::Listwise(listwise::lipo),
        needs_kl: false,
        metrics: None,
        end_step: None,
    },
    ObjectiveEntry {
        name: "pro",
        needs_reference: false,
        rewards: RewardKind::PolicyMean,
        status: Status::Experimental,
        source: "PRO, Song et al. 2023 (arXiv:2306.17492); Plackett-Luce with dynamic temperature as recalled in ALGORITHMS.md, not checked against the paper",
        loss: LossKind::Listwise(listwise::pro),
        needs_kl: false,
        metrics: None,
        end_step: None,
    },
];

pub fn lookup(name: &str) -> Result<&'static ObjectiveEntry> {
    REGISTRY.iter().find(|e| e.name == name).ok_or_else(|| {
        let names: Vec<&str> = REGISTRY.iter().map(|e| e.name).collect();
        let hint = crate::util::closest(name, names.iter().copied())
            .map(|c| format!(" (did you mean `{c}`?)"))
            .unwrap_or_default();
        Error::Config(format!(
            "unknown loss_type `{name}`{hint}; `prefer objectives list` shows all: {}",
            names.join(", ")
        ))
    })
}
