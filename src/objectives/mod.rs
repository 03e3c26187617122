//! Objectives: pure functions of sequence statistics (DESIGN.md). An objective never touches
//! weights; it gets summed log-probs (and token counts) of policy and reference and returns a
//! per-example loss plus named metrics. Adding one is one small type in its family's file plus
//! one line in [`REGISTRY`].

pub mod dpo;

use crate::error::{Error, Result};
use candle_core::Tensor;

/// Sequence statistics of a batch of preference pairs. Tensors are `[B]`.
#[derive(Clone, Debug)]
pub struct PairStats {
    pub policy_chosen: Tensor,
    pub policy_rejected: Tensor,
    /// Reference log-probs; `None` for reference-free objectives.
    pub ref_chosen: Option<Tensor>,
    pub ref_rejected: Option<Tensor>,
    /// Completion token counts (EOS included).
    pub chosen_tokens: Vec<usize>,
    pub rejected_tokens: Vec<usize>,
}

impl PairStats {
    pub fn reference(&self, objective: &str) -> Result<(&Tensor, &Tensor)> {
        match (&self.ref_chosen, &self.ref_rejected) {
            (Some(c), Some(r)) => Ok((c, r)),
            _ => Err(Error::msg(format!(
                "objective `{objective}` needs reference log-probs"
            ))),
        }
    }
}

/// What an objective returns for a batch.
#[derive(Debug)]
pub struct ObjectiveOutput {
    /// `[B]` per-example losses (the trainer averages them).
    pub losses: Tensor,
    /// Named metrics, each a batch mean (TRL's names: `rewards/chosen`, ...).
    pub metrics: Vec<(String, f64)>,
}

/// Hyperparameters shared by the pairwise objectives (TRL's `DPOConfig` names).
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectiveParams {
    pub beta: f64,
    pub label_smoothing: f64,
}

impl Default for ObjectiveParams {
    fn default() -> Self {
        ObjectiveParams {
            beta: 0.1,
            label_smoothing: 0.0,
        }
    }
}

pub trait PairwiseObjective: Send + Sync {
    fn name(&self) -> &'static str;
    fn needs_reference(&self) -> bool;
    fn loss(&self, stats: &PairStats) -> Result<ObjectiveOutput>;
}

/// One catalogue entry.
pub struct ObjectiveEntry {
    pub name: &'static str,
    pub needs_reference: bool,
    pub source: &'static str,
    pub build: fn(&ObjectiveParams) -> Box<dyn PairwiseObjective>,
}

/// Every objective, by the name `loss_type` selects.
pub const REGISTRY: &[ObjectiveEntry] = &[ObjectiveEntry {
    name: "sigmoid",
    needs_reference: true,
    source: "Rafailov et al. 2023, Direct Preference Optimization (arXiv:2305.18290); label_smoothing: cDPO (Mitchell 2023)",
    build: |p| Box::new(dpo::Sigmoid(p.clone())),
}];

/// Build the objective named `name`, or say which names exist.
pub fn build(name: &str, params: &ObjectiveParams) -> Result<Box<dyn PairwiseObjective>> {
    match REGISTRY.iter().find(|e| e.name == name) {
        Some(e) => Ok((e.build)(params)),
        None => {
            let names: Vec<&str> = REGISTRY.iter().map(|e| e.name).collect();
            let hint = crate::util::closest(name, names.iter().copied())
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            Err(Error::Config(format!(
                "unknown loss_type `{name}`{hint}; available: {}",
                names.join(", ")
            )))
        }
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

/// Batch mean of a `[B]` tensor as f64 (for metrics; no gradient).
pub fn mean(x: &Tensor) -> Result<f64> {
    Ok(x.detach()
        .to_dtype(candle_core::DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?)
}
