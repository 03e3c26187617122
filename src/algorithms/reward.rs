//! Reward models (`task = "reward"`): the LM body with a reward head (one output, K heads for
//! MaxMin, or a Gaussian head's mean and log-variance), trained with a reward objective
//! (`bradley_terry`, `gaussian`) on pairs; optionally MaxMin's EM over annotator clusters
//! ([`MaxMin`]) or a collaborative peer ([`Crm`]).

use super::crm::{Crm, PEER_DIR};
use super::maxmin::MaxMin;
use super::{Algorithm, MicroBatch, StepCtx};
use crate::algorithms::data::TrainData;
use crate::batch::{forward_positions, Layout};
use crate::config::TrainConfig;
use crate::data::TokenizedExample;
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::objectives::Objective;
use crate::stats::{group_rewards, SeqStats};
use candle_core::{DType, Device};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct RewardModel {
    pub objective: Objective,
    /// MaxMin's clusters, with `reward_clusters` > 1.
    pub maxmin: Option<MaxMin>,
    /// CRM's peer, with `crm`.
    pub crm: Option<Crm>,
    /// Batch size of MaxMin's scoring passes.
    eval_batch_size: usize,
}

/// `model` with the reward head the objective trains: Gaussian (mean, log-variance) for
/// `gaussian`, else one head per cluster.
fn with_head(model: LoadedModel, objective: &Objective, clusters: usize, seed: u64) -> Result<LoadedModel> {
    match objective.needs_reward_variance() {
        true => model.with_gaussian_reward_head(seed),
        false => model.with_reward_heads(seed, clusters.max(1)),
    }
}

impl RewardModel {
    /// The algorithm, and the policy with its reward head.
    pub fn new(
        cfg: &TrainConfig,
        objective: Objective,
        policy: LoadedModel,
        data: &TrainData,
        resume: Option<&Path>,
    ) -> Result<(LoadedModel, RewardModel)> {
        let policy = with_head(policy, &objective, cfg.reward_clusters, cfg.seed)?;
        if cfg.reward_clusters > 1 {
            if let Some(e) = data.train.iter().find(|e| e.meta.annotator.is_none()) {
                return Err(Error::Data {
                    path: PathBuf::from(&cfg.train_file),
                    line: e.line,
                    field: "annotator".into(),
                    msg: "missing; reward_clusters > 1 clusters annotators, so every row needs one".into(),
                });
            }
        }
        let crm = if cfg.crm {
            // same start, another head initialisation; a resumed run restores the peer
            let saved = resume.map(|d| d.join(PEER_DIR)).filter(|d| d.is_dir());
            let (dev, dtype) = (Device::Cpu, DType::F32);
            let m = match &saved {
                Some(d) => crate::model::load(d, dtype, &dev)?,
                None => with_head(
                    crate::model::load(Path::new(&cfg.model_name_or_path), dtype, &dev)?,
                    &objective,
                    cfg.reward_clusters,
                    cfg.seed.wrapping_add(1),
                )?,
            };
            let (peer, opt) = super::trainable(m, cfg)?;
            Some(Crm {
                peer,
                opt,
                keep_ratio: cfg.crm_keep_ratio,
                warmup_ratio: cfg.crm_warmup_ratio,
            })
        } else {
            None
        };
        let maxmin = (cfg.reward_clusters > 1).then(|| MaxMin {
            em_steps: cfg.em_steps,
            ..Default::default()
        });
        let algorithm = RewardModel {
            objective,
            maxmin,
            crm,
            eval_batch_size: cfg.per_device_eval_batch_size,
        };
        Ok((policy, algorithm))
    }

    /// Rewards of the examples at `indices` (each pair on its annotator's head with MaxMin).
    pub fn stats(&self, policy: &LoadedModel, indices: &[usize], examples: &[TokenizedExample]) -> Result<SeqStats> {
        let batch: Vec<&TokenizedExample> = indices.iter().map(|&i| &examples[i]).collect();
        let heads = self.maxmin.as_ref().and_then(|m| m.heads(&batch));
        group_rewards(&policy.transformer, &batch, policy.tokenizer.pad_id, heads.as_deref())
    }
}

impl Algorithm for RewardModel {
    fn begin_step(&mut self, ctx: &StepCtx, _batches: &[Vec<usize>]) -> Result<()> {
        if let Some(m) = &mut self.maxmin {
            if m.due(ctx.step, ctx.batches_per_epoch, ctx.accumulation) {
                m.e_step(ctx.policy, &ctx.data.train, self.eval_batch_size)?;
            }
        }
        if let Some(c) = &mut self.crm {
            c.opt.zero_grad();
        }
        Ok(())
    }

    fn micro_batch(&mut self, ctx: &StepCtx, indices: &[usize]) -> Result<MicroBatch> {
        let examples = &ctx.data.train;
        let batch: Vec<&TokenizedExample> = indices.iter().map(|&i| &examples[i]).collect();
        let stats = self.stats(ctx.policy, indices, examples)?;
        let out = self.objective.loss(&stats)?;
        let mut counts = Vec::new();
        let loss = match &mut self.crm {
            None => out.losses.mean_all()?,
            Some(c) => {
                // CRM: each model learns only from the pairs its peer finds most confident
                let (loss, for_model, for_peer) = c.filtered_loss(
                    &self.objective,
                    &stats,
                    &out.losses,
                    &batch,
                    ctx.step,
                    ctx.total_steps,
                    ctx.accumulation,
                )?;
                counts.push(("crm/filtered_for_model".to_string(), for_model));
                counts.push(("crm/filtered_for_peer".to_string(), for_peer));
                loss
            }
        };
        Ok(MicroBatch {
            loss,
            metrics: out.metrics,
            counts,
            // reward models score padded separate sequences (stats::group_rewards)
            tokens: batch.iter().map(|e| e.num_tokens()).sum(),
            positions: forward_positions(&batch, Layout::PADDED),
        })
    }

    fn end_step(&mut self, ctx: &StepCtx, _metrics: &BTreeMap<String, f64>, lr: f64) -> Result<()> {
        if let Some(c) = &mut self.crm {
            c.opt.clip_grad_norm(ctx.cfg.max_grad_norm)?;
            c.opt.step(lr)?;
        }
        Ok(())
    }

    fn evaluate(
        &self,
        policy: &LoadedModel,
        eval: &[TokenizedExample],
        batch_size: usize,
    ) -> Result<Vec<(String, f64)>> {
        super::evaluate_in_batches(eval.len(), batch_size, |chunk| {
            self.objective.loss(&self.stats(policy, chunk, eval)?)
        })
    }

    fn log_metrics(&self) -> BTreeMap<String, f64> {
        self.maxmin.as_ref().map(|m| m.metrics.clone()).unwrap_or_default()
    }

    fn state(&self) -> Result<Value> {
        Ok(match &self.maxmin {
            Some(m) => json!({"clusters": m.clusters, "em_metrics": m.metrics}),
            None => Value::Null,
        })
    }

    fn save_checkpoint(&self, dir: &Path, _policy: &LoadedModel) -> Result<()> {
        match &self.crm {
            Some(c) => c.save_checkpoint(dir),
            None => Ok(()),
        }
    }

    fn restore(&mut self, dir: &Path, state: &Value, optimizer_steps: u64) -> Result<()> {
        if let Some(m) = &mut self.maxmin {
            let bad = |e: serde_json::Error| Error::msg(format!("checkpoint {}: MaxMin state: {e}", dir.display()));
            m.clusters = serde_json::from_value(state["clusters"].clone()).map_err(bad)?;
            m.metrics = serde_json::from_value(state["em_metrics"].clone()).map_err(bad)?;
        }
        if let Some(c) = &mut self.crm {
            c.restore(dir, optimizer_steps)?;
        }
        Ok(())
    }

    fn save_final(&self, out_dir: &Path) -> Result<()> {
        if let Some(c) = &self.crm {
            crate::model::hf::save_dir(&c.peer, &out_dir.join(PEER_DIR))?;
        }
        Ok(())
    }
}
