//! Checkpoints: `output_dir/checkpoint-N/` holds the model in HF layout, the optimizer state
//! (`optimizer.safetensors`), `trainer_state.json` (step, logging window, the algorithm's
//! state) and whatever the algorithm keeps beside them (a synced reference, a peer model). The directory is
//! written under a temporary name and renamed, so a checkpoint either exists whole or not at all.

use super::Window;
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::optim::{Optimizer, OPTIMIZER_FILE};
use crate::util::write_atomic;
use serde_json::Value;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TrainerState {
    pub global_step: usize,
    pub optimizer_steps: u64,
    pub window: Window,
    pub last_grad_norm: f64,
    pub last_lr: f64,
    /// Steps skipped for a non-finite loss or gradient norm: in all, and in a row up to now.
    #[serde(default)]
    pub nonfinite_steps: usize,
    #[serde(default)]
    pub nonfinite_in_a_row: usize,
    /// The algorithm's own state ([`crate::algorithms::Algorithm::state`]): MaxMin's
    /// clusters, LCPO's noise estimate, ...
    #[serde(default)]
    pub algorithm: Value,
    /// load_best_model_at_end: the best metric_for_best_model so far, and the checkpoint that
    /// had it (TrainerState's names in transformers).
    #[serde(default)]
    pub best_metric: Option<f64>,
    #[serde(default)]
    pub best_model_checkpoint: Option<PathBuf>,
    /// The configuration the run was started with (for the record).
    #[serde(default)]
    pub config: Option<Value>,
}

pub fn save(
    out_dir: &Path,
    model: &LoadedModel,
    opt: &Optimizer,
    state: &TrainerState,
    cfg: &TrainConfig,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = out_dir.join(format!("checkpoint-{}", state.global_step));
    let tmp = out_dir.join(format!(".checkpoint-{}.tmp", state.global_step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    crate::model::hf::save_dir(model, &tmp)?;
    extra(&tmp)?;
    opt.save_file(&tmp.join(OPTIMIZER_FILE))?;
    let mut state = state.clone();
    state.optimizer_steps = opt.t;
    state.config = serde_json::to_value(cfg).ok();
    write_atomic(
        &tmp.join(STATE_FILE),
        &serde_json::to_vec_pretty(&state).expect("state serialises"),
    )?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

pub fn load_state(dir: &Path, opt: &mut Optimizer) -> Result<TrainerState> {
    let p = dir.join(STATE_FILE);
    let state: TrainerState = serde_json::from_str(&crate::util::read_to_string(&p)?)
        .map_err(|e| Error::model(&p, format!("invalid trainer state: {e}")))?;
    opt.load_file(&dir.join(OPTIMIZER_FILE), state.optimizer_steps)?;
    Ok(state)
}

/// The complete checkpoints of `out_dir` (`checkpoint-N` with its trainer state), by step.
pub fn list(out_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(out_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("checkpoint-")?
                .parse::<usize>()
                .ok()?;
            e.path().join(STATE_FILE).is_file().then(|| (n, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint in `out_dir`.
pub fn latest(out_dir: &Path) -> Option<PathBuf> {
    list(out_dir).pop().map(|(_, p)| p)
}

/// Keep the newest `limit` (at least 1) complete checkpoints of `out_dir`, and `best` besides
/// (load_best_model_at_end's, never removed; with `limit` 1 that keeps two, as transformers):
/// each older one is renamed to a hidden name first (so `latest` can never pick it
/// half-deleted), then removed.
pub fn prune(out_dir: &Path, limit: usize, best: Option<&Path>) -> Result<()> {
    let found: Vec<(usize, PathBuf)> = list(out_dir)
        .into_iter()
        .filter(|(_, d)| best.is_none_or(|b| b.file_name() != d.file_name()))
        .collect();
    let limit = match best.is_some() {
        true => limit.max(2) - 1,
        false => limit.max(1),
    };
    let excess = found.len().saturating_sub(limit);
    for (n, dir) in found.into_iter().take(excess) {
        let gone = out_dir.join(format!(".checkpoint-{n}.deleting"));
        std::fs::rename(&dir, &gone).map_err(|e| Error::io(&dir, e))?;
        std::fs::remove_dir_all(&gone).map_err(|e| Error::io(&gone, e))?;
    }
    Ok(())
}
