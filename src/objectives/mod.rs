//! Objectives: pure functions of sequence statistics (DESIGN.md). An objective never touches
//! weights: it gets summed log-probs and token counts of policy and reference and returns a
//! per-example loss plus named metrics.
//!
//! Adding a pairwise objective is one small function `fn(&Ctx) -> Result<Tensor>` in its
//! family's file plus one line in [`REGISTRY`]. `loss_type` may name several, combined with
//! `loss_weights` (TRL: L = Σ_k w_k · mean(loss_k)).

pub mod dpo;
pub mod listwise;
pub mod noisy;
pub mod reference_free;
pub mod reward;
pub mod unpaired;

use crate::data::Shape;
use crate::error::{Error, Result};
use crate::stats::SeqStats;
use candle_core::{DType, Tensor};

/// Sequence statistics of a batch of B preference pairs. Tensors are `[B]`.
#[derive(Clone, Debug)]
pub struct PairStats {
    /// Summed completion log-probs under the policy.
    pub policy_chosen: Tensor,
    pub policy_rejected: Tensor,
    /// Summed reference log-probs; `None` for reference-free objectives.
    pub ref_chosen: Option<Tensor>,
    pub ref_rejected: Option<Tensor>,
    /// Completion token counts (EOS included).
    pub chosen_tokens: Vec<usize>,
    pub rejected_tokens: Vec<usize>,
    /// `[B]` per-pair loss weights (WPO's ω_w·ω_l with `use_weighting`), no gradient.
    pub weights: Option<Tensor>,
    /// Per pair: probability that chosen is preferred (`preference_strength`; 1 when absent).
    pub strength: Vec<f64>,
    /// Per pair: (chosen_score, rejected_score), when the data has them.
    pub scores: Option<Vec<(f64, f64)>>,
    /// Per pair: the reward margin `margin` a reward model must exceed (0 when absent).
    pub margin: Vec<f64>,
    /// A Gaussian reward head's (chosen, rejected) log σ²; `policy_*` are then the means μ.
    pub log_variance: Option<(Tensor, Tensor)>,
}

/// What an objective returns for a batch.
#[derive(Debug)]
pub struct ObjectiveOutput {
    /// `[B]` per-example losses (the trainer averages them).
    pub losses: Tensor,
    /// Named metrics, each a batch mean (TRL's names: `rewards/chosen`, ...).
    pub metrics: Vec<(String, f64)>,
}

/// Hyperparameters of the objectives, under TRL's `DPOConfig` / `CPOConfig` names (the run
/// config's keys; documented in `config::KEYS`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ObjectiveParams {
    pub beta: f64,
    pub label_smoothing: f64,
    /// `reverse_kl` | `forward_kl` | `js_divergence` | `alpha_divergence`.
    pub f_divergence_type: String,
    pub f_alpha_divergence_coef: f64,
    pub discopop_tau: f64,
    pub simpo_gamma: f64,
    pub cpo_alpha: f64,
    /// AlphaPO's reward-shape α (TRL `alpha`; 0 = log reward).
    pub alpha: f64,
    /// KTO's λ_D and λ_U.
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
    /// Weight of PRO's SFT term on the best response.
    pub pro_sft_weight: f64,
    /// The pairwise objective LCPO wraps, and its label-noise rate η.
    pub lcpo_base: String,
    pub lcpo_noise_rate: f64,
    pub mapo_k: f64,
    pub mapo_t: f64,
    pub slic_delta: f64,
    pub slic_lambda: f64,
    /// Bradley-Terry reward models: weight η of mean((r_w + r_l)²) (TRL `center_rewards_coefficient`).
    pub center_rewards_coefficient: Option<f64>,
}

impl Default for ObjectiveParams {
    fn default() -> Self {
        ObjectiveParams {
            beta: 0.1,
            label_smoothing: 0.0,
            f_divergence_type: "reverse_kl".into(),
            f_alpha_divergence_coef: 0.5,
            discopop_tau: 0.05,
            simpo_gamma: 0.5,
            cpo_alpha: 1.0,
            alpha: 0.0,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            pro_sft_weight: 1.0,
            lcpo_base: "sigmoid".into(),
            lcpo_noise_rate: 0.1,
            mapo_k: 0.5,
            mapo_t: 1000.0,
            slic_delta: 1.0,
            slic_lambda: 0.1,
            center_rewards_coefficient: None,
        }
    }
}

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

impl PairStats {
    /// The pairwise view of a batch: chosen = response 0, rejected = response 1 of each example.
    pub fn from_stats(stats: &SeqStats) -> Result<PairStats> {
        let s = stats;
        let b = s.offsets.len() - 1;
        let idx = |k: usize| -> Result<Tensor> {
            let v: Vec<u32> = (0..b).map(|e| (s.offsets[e] + k) as u32).collect();
            Ok(Tensor::new(v, s.policy.device())?)
        };
        for e in 0..b {
            if s.offsets[e + 1] - s.offsets[e] != 2 {
                return Err(Error::msg(
                    "a pairwise objective got an example without exactly two responses",
                ));
            }
        }
        let (c, r) = (idx(0)?, idx(1)?);
        let pick = |t: &Tensor, i: &Tensor| -> Result<Tensor> { Ok(t.index_select(i, 0)?) };
        Ok(PairStats {
            policy_chosen: pick(&s.policy, &c)?,
            policy_rejected: pick(&s.policy, &r)?,
            ref_chosen: s.reference.as_ref().map(|t| pick(t, &c)).transpose()?,
            ref_rejected: s.reference.as_ref().map(|t| pick(t, &r)).transpose()?,
            chosen_tokens: (0..b).map(|e| s.tokens[s.offsets[e]]).collect(),
            rejected_tokens: (0..b).map(|e| s.tokens[s.offsets[e] + 1]).collect(),
            weights: s.weights.clone(),
            strength: s.meta.iter().map(|m| m.strength.unwrap_or(1.0)).collect(),
            scores: s
                .meta
                .iter()
                .map(|m| m.scores.as_ref().map(|s| (s[0], s[1])))
                .collect::<Option<Vec<_>>>(),
            margin: s.meta.iter().map(|m| m.margin.unwrap_or(0.0)).collect(),
            log_variance: match &s.log_variance {
                None => None,
                Some(v) => Some((pick(v, &c)?, pick(v, &r)?)),
            },
        })
    }
}

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
}

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
    entry!("lcpo", true, Implicit, Experimental, "LCPO / RE-PO, Cao, Xu et al. (arXiv:2509.24159), EM label-correctness wrapper around lcpo_base (documented shape, paper not consulted)", noisy::lcpo, Some(noisy::lcpo_metrics)),
    ObjectiveEntry {
        name: "kto",
        needs_reference: true,
        rewards: RewardKind::Implicit,
        status: Status::Checked,
        source: "KTO, Ethayarajh et al. 2024 (arXiv:2402.01306); TRL KTOTrainer (z0 from mismatched completions)",
        loss: LossKind::Unpaired(unpaired::kto),
        needs_kl: true,
        metrics: None,
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
    },
];

/// An objective: one registry entry, or a weighted sum of several (`loss_weights`).
pub struct Objective {
    pub parts: Vec<(f64, &'static ObjectiveEntry)>,
    pub params: ObjectiveParams,
}

impl Objective {
    pub fn name(&self) -> String {
        self.parts.iter().map(|(_, e)| e.name).collect::<Vec<_>>().join("+")
    }

    /// Whether the objective reads a Gaussian reward head's log-variances.
    pub fn needs_reward_variance(&self) -> bool {
        self.parts
            .iter()
            .any(|(_, e)| e.rewards == RewardKind::RewardDistribution)
    }

    pub fn needs_reference(&self) -> bool {
        self.parts.iter().any(|(_, e)| e.needs_reference)
    }

    /// The data shape this objective accepts.
    pub fn shape(&self) -> Shape {
        self.parts[0].1.loss.shape()
    }

    /// Whether examples need a mismatched completion for a KL estimate (KTO).
    pub fn needs_kl(&self) -> bool {
        self.parts.iter().any(|(_, e)| e.needs_kl)
    }

    /// Per-example losses and metrics for a batch of the objective's shape.
    pub fn loss(&self, stats: &SeqStats) -> Result<ObjectiveOutput> {
        let mut out = match self.shape() {
            Shape::Pairwise => return self.loss_pairs(&PairStats::from_stats(stats)?),
            Shape::Unpaired => {
                let ctx = unpaired::UnpairedCtx::new(stats, &self.params, self.needs_kl())?;
                self.combine(|k| match k {
                    LossKind::Unpaired(f) => f(&ctx),
                    _ => unreachable!("build() checks that parts share a shape"),
                })?
            }
            Shape::Ranked => {
                let ctx = listwise::ListCtx::new(stats, &self.params)?;
                self.combine(|k| match k {
                    LossKind::Listwise(f) => f(&ctx),
                    _ => unreachable!("build() checks that parts share a shape"),
                })?
            }
        };
        if let Some(w) = &stats.weights {
            out.losses = (out.losses * w)?;
        }
        Ok(out)
    }

    /// Σ_k w_k · losses_k, with the first part's metrics.
    fn combine(&self, mut f: impl FnMut(&LossKind) -> Result<ObjectiveOutput>) -> Result<ObjectiveOutput> {
        let mut total: Option<ObjectiveOutput> = None;
        for (w, e) in &self.parts {
            let o = f(&e.loss)?;
            let l = (o.losses * *w)?;
            total = Some(match total {
                None => ObjectiveOutput {
                    losses: l,
                    metrics: o.metrics,
                },
                Some(t) => ObjectiveOutput {
                    losses: (t.losses + l)?,
                    metrics: t.metrics,
                },
            });
        }
        Ok(total.expect("at least one part"))
    }

    /// Per-example losses `Σ_k w_k loss_k` and metrics of a pairwise objective.
    pub fn loss_pairs(&self, stats: &PairStats) -> Result<ObjectiveOutput> {
        let ctx = Ctx {
            s: stats,
            p: &self.params,
        };
        let mut total: Option<Tensor> = None;
        let mut metrics = reward_metrics(&ctx, self.parts[0].1.rewards)?;
        for (w, e) in &self.parts {
            let LossKind::Pairwise(loss) = e.loss else {
                return Err(Error::msg(format!("`{}` is not a pairwise objective", e.name)));
            };
            let l = (loss(&ctx)? * *w)?;
            total = Some(match total {
                None => l,
                Some(t) => (t + l)?,
            });
            if let Some(m) = e.metrics {
                metrics.extend(m(&ctx)?);
            }
        }
        let mut losses = total.expect("at least one part");
        if let Some(w) = &stats.weights {
            losses = (losses * w)?;
        }
        Ok(ObjectiveOutput { losses, metrics })
    }
}

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

/// Build the objective for `loss_type` names with `loss_weights` (default 1.0 each).
pub fn build(names: &[String], weights: Option<&[f64]>, params: &ObjectiveParams) -> Result<Objective> {
    if names.is_empty() {
        return Err(Error::Config("loss_type is empty".into()));
    }
    if let Some(w) = weights {
        if w.len() != names.len() {
            return Err(Error::Config(format!(
                "loss_weights has {} entries but loss_type names {}",
                w.len(),
                names.len()
            )));
        }
    }
    let parts = names
        .iter()
        .enumerate()
        .map(|(i, n)| Ok((weights.map_or(1.0, |w| w[i]), lookup(n)?)))
        .collect::<Result<Vec<_>>>()?;
    let shape = parts[0].1.loss.shape();
    if let Some((_, e)) = parts.iter().find(|(_, e)| e.loss.shape() != shape) {
        return Err(Error::Config(format!(
            "loss_type combines `{}` ({shape}) with `{}` ({}); combined objectives must read the same data shape",
            parts[0].1.name,
            e.name,
            e.loss.shape()
        )));
    }
    if params.label_smoothing != 0.0 && parts.iter().any(|(_, e)| e.name == "sigmoid") {
        return Err(Error::Config(
            "label_smoothing has no effect on loss_type `sigmoid` (TRL ≥0.29 ignores it); use `cdpo` for label-smoothed DPO or `robust` for rDPO".into(),
        ));
    }
    if !matches!(
        params.f_divergence_type.as_str(),
        "reverse_kl" | "forward_kl" | "js_divergence" | "alpha_divergence"
    ) {
        return Err(Error::Config(format!(
            "f_divergence_type `{}` is not one of reverse_kl, forward_kl, js_divergence, alpha_divergence",
            params.f_divergence_type
        )));
    }
    Ok(Objective {
        parts,
        params: params.clone(),
    })
}

/// The quantities objectives are written in (notation of ALGORITHMS.md).
pub struct Ctx<'a> {
    pub s: &'a PairStats,
    pub p: &'a ObjectiveParams,
}

impl Ctx<'_> {
    pub fn reference(&self) -> Result<(&Tensor, &Tensor)> {
        match (&self.s.ref_chosen, &self.s.ref_rejected) {
            (Some(c), Some(r)) => Ok((c, r)),
            _ => Err(Error::msg("this objective needs reference log-probs")),
        }
    }
    /// Δ_w = log π(y_w) − log π_ref(y_w), Δ_l likewise.
    pub fn deltas(&self) -> Result<(Tensor, Tensor)> {
        let (rc, rr) = self.reference()?;
        Ok(((&self.s.policy_chosen - rc)?, (&self.s.policy_rejected - rr)?))
    }
    /// h = Δ_w − Δ_l.
    pub fn h(&self) -> Result<Tensor> {
        let (w, l) = self.deltas()?;
        Ok((w - l)?)
    }
    /// Token counts |y_w|, |y_l| as tensors (clamped to ≥ 1).
    pub fn lengths(&self) -> Result<(Tensor, Tensor)> {
        let t = |v: &[usize]| -> Result<Tensor> {
            let x: Vec<f64> = v.iter().map(|&n| n.max(1) as f64).collect();
            Ok(Tensor::new(x, self.s.policy_chosen.device())?.to_dtype(self.s.policy_chosen.dtype())?)
        };
        Ok((t(&self.s.chosen_tokens)?, t(&self.s.rejected_tokens)?))
    }
    /// ℓ̄ = log π(y)/|y| for chosen and rejected.
    pub fn mean_logps(&self) -> Result<(Tensor, Tensor)> {
        let (nw, nl) = self.lengths()?;
        Ok(((&self.s.policy_chosen / nw)?, (&self.s.policy_rejected / nl)?))
    }
    /// Scores after TRL's f-divergence transform of Δ (`f_divergence_type`).
    pub fn scores(&self) -> Result<(Tensor, Tensor)> {
        let (w, l) = self.deltas()?;
        let f = |d: Tensor| -> Result<Tensor> {
            Ok(match self.p.f_divergence_type.as_str() {
                "forward_kl" => d.neg()?.exp()?.neg()?,
                "js_divergence" => log_sigmoid(&d)?,
                "alpha_divergence" if (self.p.f_alpha_divergence_coef - 1.0).abs() >= 1e-6 => {
                    let a = self.p.f_alpha_divergence_coef;
                    ((d * (a - 1.0))?.minimum(80.0)?.exp()? / (a - 1.0))?
                }
                _ => d,
            })
        };
        Ok((f(w)?, f(l)?))
    }
    /// d = s_w − s_l.
    pub fn d(&self) -> Result<Tensor> {
        let (w, l) = self.scores()?;
        Ok((w - l)?)
    }
    /// d̄ = s_w/|y_w| − s_l/|y_l|.
    pub fn d_norm(&self) -> Result<Tensor> {
        let (w, l) = self.scores()?;
        let (nw, nl) = self.lengths()?;
        Ok(((w / nw)? - (l / nl)?)?)
    }
    /// Per-example terms whose batch mean is the token-mean NLL of the chosen completions over
    /// the whole batch (`Σ −log π(y_w) / Σ |y_w|`, as `nn.CrossEntropyLoss` over the batch).
    pub fn chosen_nll_batch_token_mean(&self) -> Result<Tensor> {
        let b = self.s.chosen_tokens.len() as f64;
        let total: usize = self.s.chosen_tokens.iter().sum();
        Ok((self.s.policy_chosen.neg()? * (b / total.max(1) as f64))?)
    }
}

/// `log(sigmoid(x)) = -log(exp(0) + exp(-x))`, computed as a log-sum-exp with the shift
/// `m = max(0, -x)` held constant, so it is stable for large |x| and its gradient is exact
/// everywhere (including x = 0, where `min`/`abs` formulations pick a one-sided subgradient).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let m = x.neg()?.maximum(0.0)?.detach();
    let sum = (m.neg()?.exp()? + (x.neg()? - &m)?.exp()?)?;
    Ok((sum.log()? + m)?.neg()?)
}

/// `log Φ(x)` elementwise (standard normal CDF), computed in f64 on the host
/// ([`crate::util::log_ndtr`]); its gradient is the exact `φ(x)/Φ(x)`, attached as
/// `(x − stop(x))·g + stop(log Φ(x))` (first derivatives only).
pub fn log_ndtr(x: &Tensor) -> Result<Tensor> {
    let z: Vec<f64> = x.detach().to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let host = |f: fn(f64) -> f64| -> Result<Tensor> {
        let v: Vec<f64> = z.iter().map(|&z| f(z)).collect();
        Ok(Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?)
    };
    let (value, slope) = (host(crate::util::log_ndtr)?, host(crate::util::d_log_ndtr)?);
    Ok(((x - x.detach())? * slope)?.add(&value)?)
}

/// `sigmoid(x) = exp(log_sigmoid(x))`, stable.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(x)?.exp()?)
}

/// Batch mean of a `[B]` tensor as f64 (for metrics; no gradient).
pub fn mean(x: &Tensor) -> Result<f64> {
    Ok(x.detach().to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

/// TRL's reward metrics for the objective's kind of implicit reward.
fn reward_metrics(c: &Ctx, kind: RewardKind) -> Result<Vec<(String, f64)>> {
    if matches!(kind, RewardKind::Reward | RewardKind::RewardDistribution) {
        return reward::metrics(c);
    }
    let beta = c.p.beta;
    let (chosen, rejected) = match kind {
        RewardKind::Implicit => {
            let (w, l) = c.deltas()?;
            ((w.detach() * beta)?, (l.detach() * beta)?)
        }
        RewardKind::PolicySum => (
            (c.s.policy_chosen.detach() * beta)?,
            (c.s.policy_rejected.detach() * beta)?,
        ),
        RewardKind::PolicyMean => {
            let (w, l) = c.mean_logps()?;
            ((w.detach() * beta)?, (l.detach() * beta)?)
        }
        RewardKind::Reward | RewardKind::RewardDistribution => unreachable!("handled above"),
    };
    let acc = chosen.gt(&rejected)?.to_dtype(chosen.dtype())?;
    Ok(vec![
        ("rewards/chosen".into(), mean(&chosen)?),
        ("rewards/rejected".into(), mean(&rejected)?),
        ("rewards/accuracies".into(), mean(&acc)?),
        ("rewards/margins".into(), mean(&(chosen - rejected)?)?),
        ("logps/chosen".into(), mean(&c.s.policy_chosen)?),
        ("logps/rejected".into(), mean(&c.s.policy_rejected)?),
    ])
}
