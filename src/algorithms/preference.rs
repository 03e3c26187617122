//! Offline preference optimisation: any objective of the catalogue (the DPO family,
//! reference-free, unpaired, listwise) on fixed data, with its reference log-probs from a live
//! model, a compact frozen model, a disk cache or nowhere ([`Reference`]), and TR-DPO's
//! reference sync (`sync_ref_model`).

use super::{Algorithm, MicroBatch, StepCtx};
use crate::algorithms::data::TrainData;
use crate::batch::forward_positions;
use crate::config::TrainConfig;
use crate::data::TokenizedExample;
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::objectives::Objective;
use crate::stats::reference::{self, Reference, Split, SYNCED_REF_DIR};
use crate::stats::{group_logps, SeqStats, StatsOptions};
use candle_core::{DType, Device};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;

/// TR-DPO: every `every` steps, `ref ← α·policy + (1−α)·ref`.
#[derive(Clone, Copy, Debug)]
pub struct RefSync {
    pub every: usize,
    pub alpha: f64,
}

pub struct Preference {
    pub objective: Objective,
    pub reference: Reference,
    pub stats_options: StatsOptions,
    pub sync: Option<RefSync>,
}

impl Preference {
    pub fn new(
        cfg: &TrainConfig,
        objective: Objective,
        policy: &LoadedModel,
        data: &TrainData,
        resume: Option<&Path>,
    ) -> Result<Self> {
        if policy.transformer.cfg.reward_head {
            return Err(Error::Config(format!(
                "{} is a reward model (it has a score head); set task = \"reward\" or start from a causal LM",
                policy.source.display()
            )));
        }
        let reference = reference_for_run(
            cfg,
            objective.needs_reference(),
            policy,
            &data.train,
            &data.eval,
            resume,
            false,
        )?;
        Ok(Preference {
            objective,
            reference,
            stats_options: cfg.stats_options(),
            sync: cfg.sync_ref_model.then_some(RefSync {
                every: cfg.ref_model_sync_steps,
                alpha: cfg.ref_model_mixup_alpha,
            }),
        })
    }

    /// Policy and reference statistics of the examples at `indices` of `split`.
    pub fn stats(
        &self,
        policy: &LoadedModel,
        split: Split,
        indices: &[usize],
        examples: &[TokenizedExample],
    ) -> Result<SeqStats> {
        let batch: Vec<&TokenizedExample> = indices.iter().map(|&i| &examples[i]).collect();
        let lp = group_logps(&policy.transformer, &batch, &self.stats_options)?;
        let reference =
            self.reference
                .logps(split, indices, &batch, policy.transformer.dtype(), &self.stats_options)?;
        Ok(SeqStats { reference, ..lp })
    }
}

impl Algorithm for Preference {
    fn micro_batch(&mut self, ctx: &StepCtx, indices: &[usize]) -> Result<MicroBatch> {
        let examples = &ctx.data.train;
        let batch: Vec<&TokenizedExample> = indices.iter().map(|&i| &examples[i]).collect();
        let stats = self.stats(ctx.policy, Split::Train, indices, examples)?;
        let out = self.objective.loss(&stats)?;
        Ok(MicroBatch {
            loss: out.losses.mean_all()?,
            metrics: out.metrics,
            counts: Vec::new(),
            tokens: batch.iter().map(|e| e.num_tokens()).sum(),
            positions: forward_positions(&batch, self.stats_options.layout),
        })
    }

    fn end_step(&mut self, ctx: &StepCtx, metrics: &BTreeMap<String, f64>, _lr: f64) -> Result<()> {
        self.objective.end_step(metrics);
        if let (Some(sync), Reference::Model(r)) = (self.sync, &self.reference) {
            if (ctx.step + 1).is_multiple_of(sync.every) {
                let mixed = crate::model::mix_into_reference(r, &ctx.policy.transformer, sync.alpha)?;
                self.reference = Reference::Model(Box::new(mixed));
            }
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
            self.objective.loss(&self.stats(policy, Split::Eval, chunk, eval)?)
        })
    }

    fn state(&self) -> Result<Value> {
        Ok(serde_json::json!({ "objective": self.objective.state() }))
    }

    /// With `sync_ref_model` the reference has moved: keep it for an exact resume.
    fn save_checkpoint(&self, dir: &Path, policy: &LoadedModel) -> Result<()> {
        if let (Some(_), Reference::Model(r)) = (self.sync, &self.reference) {
            let synced = LoadedModel {
                transformer: (**r).clone(),
                ..policy.clone()
            };
            crate::model::hf::save_dir(&synced, &dir.join(SYNCED_REF_DIR))?;
        }
        Ok(())
    }

    fn restore(&mut self, _dir: &Path, state: &Value, _optimizer_steps: u64) -> Result<()> {
        self.objective.restore(&state["objective"])
    }
}

/// The reference of a run: none when the objective needs none; else the starting model
/// (or `ref_model`, a weight-space soup when a list), also when resuming, and with
/// `sync_ref_model` the synced reference a resumed checkpoint holds. With
/// `precompute_ref_log_probs` it is scored once over both sets, cached on disk (keyed by the
/// weights, the data and the options) and dropped from memory. `dense`: keep every layer
/// widened (a reference that samples token by token would otherwise widen its layers at every
/// token).
pub fn reference_for_run(
    cfg: &TrainConfig,
    needs_reference: bool,
    policy: &LoadedModel,
    train: &[TokenizedExample],
    eval: &[TokenizedExample],
    resume: Option<&Path>,
    dense: bool,
) -> Result<Reference> {
    if !needs_reference {
        return Ok(Reference::None);
    }
    let (dev, dtype) = (Device::Cpu, DType::F32);
    let start_path = PathBuf::from(&cfg.model_name_or_path);
    let ref_paths = match &cfg.ref_model {
        Some(r) => r.paths(),
        None => vec![start_path.clone()],
    };
    let synced_ref = resume.map(|d| d.join(SYNCED_REF_DIR)).filter(|d| d.is_dir());
    // with bf16 products, a live reference whose weights never change keeps its layers only
    // as the products' packed operands (half the bytes, no packing at every pass)
    let pack = cfg.kernels().bf16 && !cfg.precompute_ref_log_probs && !cfg.sync_ref_model && !dense;
    // `m`'s frozen copy with packed layers, where that applies
    let packed = |m: &LoadedModel| -> Result<Option<LoadedModel>> {
        let Some(t) = pack.then(|| m.transformer.frozen_packed_copy()).transpose()?.flatten() else {
            return Ok(None);
        };
        if let Some(c) = &t.compact {
            eprintln!(
                "reference model: decoder layers kept packed for bf16 products ({:.1} MiB instead of {:.1} MiB)",
                c.bytes() as f64 / 1048576.0,
                c.widened_bytes() as f64 / 1048576.0
            );
        }
        Ok(Some(LoadedModel {
            transformer: t,
            ..m.clone()
        }))
    };
    let load_ref = || -> Result<LoadedModel> {
        let mut m = if let Some(d) = &synced_ref {
            crate::model::load(d, dtype, &dev)?
        } else if policy.transformer.adapters().is_some() && cfg.ref_model.is_none() {
            // a LoRA run: the base with the adapters off, sharing the policy's weights
            LoadedModel {
                transformer: policy.transformer.without_adapters()?,
                ..policy.clone()
            }
        } else if resume.is_none() && ref_paths == [start_path.clone()] {
            // the starting model; its layers stay in the checkpoint's precision unless
            // sync_ref_model must mix weights into them
            let compact = match cfg.sync_ref_model || dense {
                false => crate::model::load_frozen(&start_path, dtype, &dev)?,
                true => None,
            };
            match compact {
                Some(m) => {
                    if let Some(c) = &m.transformer.compact {
                        eprintln!(
                            "reference model: decoder layers kept as stored ({:.1} MiB instead of {:.1} MiB), widened layer by layer",
                            c.bytes() as f64 / 1048576.0,
                            c.widened_bytes() as f64 / 1048576.0
                        );
                    }
                    m
                }
                // packed straight from the policy's weights: no f32 copy of the layers
                None => match packed(policy)? {
                    Some(m) => m,
                    None => policy.frozen_copy()?,
                },
            }
        } else {
            let m = crate::model::load_soup(&ref_paths, dtype, &dev)?;
            packed(&m)?.unwrap_or(m)
        };
        m.transformer.kernels = cfg.kernels();
        Ok(m)
    };
    let reference = if cfg.precompute_ref_log_probs {
        let cache_dir = cfg.cache_dir();
        let mut loaded: Option<(LoadedModel, u64)> = None;
        let mut tables = Vec::new();
        for (name, pairs) in [("train", train), ("eval", eval)] {
            if pairs.is_empty() {
                tables.push(vec![]);
                continue;
            }
            if loaded.is_none() {
                let m = load_ref()?;
                let h = reference::model_hash(&m)?;
                loaded = Some((m, h));
            }
            let (m, h) = loaded.as_ref().expect("loaded above");
            let path = reference::cache_path(&cache_dir, *h, pairs, dtype, cfg.bf16, &cfg.stats_options());
            match reference::load_cache(&path, pairs.len()) {
                Some(v) => {
                    eprintln!("reference log-probs ({name}): reusing {}", path.display());
                    tables.push(v)
                }
                None => {
                    let pb = crate::util::progress_bar(pairs.len(), cfg.disable_tqdm);
                    pb.set_prefix(format!("reference log-probs ({name})"));
                    let v = crate::stats::score_examples(
                        &m.transformer,
                        pairs,
                        cfg.precompute_ref_batch_size.unwrap_or(cfg.per_device_eval_batch_size),
                        &cfg.stats_options(),
                        |n| pb.inc(n as u64),
                    )?;
                    pb.finish_and_clear();
                    reference::store_cache(&path, &v)?;
                    eprintln!(
                        "reference log-probs ({name}): computed and cached in {}",
                        path.display()
                    );
                    tables.push(v)
                }
            }
        }
        drop(loaded); // the reference model leaves memory here
        let eval = tables.pop().unwrap_or_default();
        let train = tables.pop().unwrap_or_default();
        Reference::Cached { train, eval }
    } else {
        Reference::Model(Box::new(load_ref()?.transformer))
    };
    Ok(reference)
}
