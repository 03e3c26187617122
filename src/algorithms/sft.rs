//! Supervised fine-tuning (task = "sft"), as TRL 1.16's `SFTTrainer` computes it: the
//! negative log-likelihood of the target tokens ([`crate::data::sft`] decides which), summed
//! over the step's micro-batches and divided by the step's target tokens (transformers'
//! `num_items_in_batch`), or DFT's probability-weighted version. Metrics with TRL's names:
//! `loss`, `mean_token_accuracy` and `entropy` (each micro-batch's ratio over its target
//! tokens, averaged), `num_tokens` (input tokens seen so far).

use super::data::{SftData, TrainData};
use super::{Algorithm, MicroBatch, StepCtx};
use crate::batch::{Layout, ScoredGroup};
use crate::config::sft::SftLoss;
use crate::config::TrainConfig;
use crate::data::sft::SftExample;
use crate::data::TokenizedExample;
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use candle_core::{DType, Tensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub struct Sft {
    data: Arc<SftData>,
    loss: SftLoss,
    layout: Layout,
    /// Target tokens of the current step (all its micro-batches).
    step_targets: usize,
    /// Input tokens seen so far (TRL's `num_tokens`).
    num_tokens: u64,
}

/// What one pass over some units computed.
struct Pass {
    /// Σ over target tokens of the per-token loss (differentiable).
    loss_sum: Tensor,
    targets: usize,
    correct: usize,
    entropy_sum: f64,
    tokens: usize,
    positions: usize,
}

impl Sft {
    pub fn new(cfg: &TrainConfig, data: &TrainData) -> Result<Self> {
        let data = data
            .sft
            .clone()
            .ok_or_else(|| Error::msg("task = \"sft\" without SFT data"))?;
        Ok(Sft {
            data,
            loss: cfg.sft_loss()?,
            // the same log-probs in any layout; packed rows and padding_free need no padding
            layout: Layout {
                share_prompt: false,
                padding_free: cfg.padding_free || cfg.sft.packing,
                ..Layout::PADDED
            },
            step_targets: 0,
            num_tokens: 0,
        })
    }

    fn examples<'a>(units: &'a [Vec<SftExample>], indices: &[usize]) -> Vec<&'a SftExample> {
        indices.iter().flat_map(|&i| units[i].iter()).collect()
    }

    /// The loss terms and counts of `examples` under `policy`.
    fn pass(&self, policy: &LoadedModel, examples: &[&SftExample]) -> Result<Pass> {
        // each sequence as a one-token "prompt" and the rest scored: every position that
        // predicts a token, the mask picks the targets
        let rest: Vec<Vec<Vec<u32>>> = examples
            .iter()
            .map(|e| vec![e.ids.get(1..).unwrap_or(&[]).to_vec()])
            .collect();
        let groups: Vec<ScoredGroup> = examples
            .iter()
            .zip(&rest)
            .map(|(e, r)| ScoredGroup {
                prompt: &e.ids[..1.min(e.ids.len())],
                responses: r,
            })
            .collect();
        let lp = crate::model::logprobs::group_sequence_logps_entropy(&policy.transformer, &groups, self.layout, 1.0)?;
        let mask: Vec<f32> = examples
            .iter()
            .flat_map(|e| e.targets.iter().skip(1).map(|&t| if t { 1.0 } else { 0.0 }))
            .collect();
        let dev = lp.token_logps.device();
        let n = mask.len();
        if lp.token_logps.dim(0)? != n {
            return Err(Error::msg(format!(
                "sft: {} scored positions for {n} targets",
                lp.token_logps.dim(0)?
            )));
        }
        let m = Tensor::from_vec(mask.clone(), n, dev)?.to_dtype(lp.token_logps.dtype())?;
        let nll = lp.token_logps.neg()?;
        let per_token = match self.loss {
            SftLoss::Nll => nll,
            // DFT: each token's NLL weighted by its probability, no gradient through the weight
            SftLoss::Dft => (nll * lp.token_logps.detach().exp()?)?,
        };
        let loss_sum = (per_token * m)?.sum_all()?;
        let entropies = lp.entropies.unwrap_or_default();
        let tops = lp.top_logps.unwrap_or_default();
        let token_lps: Vec<f64> = lp.token_logps.detach().to_dtype(DType::F64)?.to_vec1()?;
        let (mut correct, mut entropy_sum, mut targets) = (0usize, 0f64, 0usize);
        for i in 0..n {
            if mask[i] > 0.0 {
                targets += 1;
                entropy_sum += entropies.get(i).copied().unwrap_or(0.0);
                if tops.get(i).is_some_and(|&t| token_lps[i] >= t) {
                    correct += 1;
                }
            }
        }
        let tokens: usize = examples.iter().map(|e| e.ids.len()).sum();
        Ok(Pass {
            loss_sum,
            targets,
            correct,
            entropy_sum,
            tokens,
            positions: tokens,
        })
    }

    fn metrics(p: &Pass) -> Vec<(String, f64)> {
        let n = p.targets.max(1) as f64;
        vec![
            ("mean_token_accuracy".into(), p.correct as f64 / n),
            ("entropy".into(), p.entropy_sum / n),
        ]
    }
}

impl Algorithm for Sft {
    fn begin_step(&mut self, _ctx: &StepCtx, batches: &[Vec<usize>]) -> Result<()> {
        let all: Vec<usize> = batches.iter().flatten().copied().collect();
        let ex = Self::examples(&self.data.train, &all);
        self.step_targets = ex.iter().map(|e| e.num_targets()).sum();
        self.num_tokens += ex.iter().map(|e| e.ids.len() as u64).sum::<u64>();
        Ok(())
    }

    fn micro_batch(&mut self, ctx: &StepCtx, indices: &[usize]) -> Result<MicroBatch> {
        let ex = Self::examples(&self.data.train, indices);
        let p = self.pass(ctx.policy, &ex)?;
        // Σ over the step's micro-batches of this is Σ NLL / the step's target tokens (the core
        // divides each micro-batch's loss by the accumulation count)
        let scale = ctx.accumulation as f64 / self.step_targets.max(1) as f64;
        let loss = (&p.loss_sum * scale)?;
        Ok(MicroBatch {
            loss,
            metrics: Self::metrics(&p),
            counts: vec![],
            tokens: p.tokens,
            positions: p.positions,
        })
    }

    fn evaluate(
        &self,
        policy: &LoadedModel,
        _eval: &[TokenizedExample],
        batch_size: usize,
    ) -> Result<Vec<(String, f64)>> {
        // eval_loss: Σ NLL / target tokens over the whole set; the ratios likewise
        let (mut loss, mut targets, mut correct, mut ent) = (0f64, 0usize, 0usize, 0f64);
        let all: Vec<usize> = (0..self.data.eval.len()).collect();
        for chunk in all.chunks(batch_size.max(1)) {
            let ex = Self::examples(&self.data.eval, chunk);
            let p = self.pass(policy, &ex)?;
            loss += p.loss_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            targets += p.targets;
            correct += p.correct;
            ent += p.entropy_sum;
        }
        let n = targets.max(1) as f64;
        Ok(vec![
            ("loss".into(), loss / n),
            ("mean_token_accuracy".into(), correct as f64 / n),
            ("entropy".into(), ent / n),
            ("num_tokens".into(), self.num_tokens as f64),
        ])
    }

    fn log_metrics(&self) -> BTreeMap<String, f64> {
        BTreeMap::from([("num_tokens".into(), self.num_tokens as f64)])
    }

    fn state(&self) -> Result<Value> {
        Ok(serde_json::json!({ "num_tokens": self.num_tokens }))
    }

    fn restore(&mut self, _dir: &Path, state: &Value, _optimizer_steps: u64) -> Result<()> {
        self.num_tokens = state["num_tokens"].as_u64().unwrap_or(0);
        Ok(())
    }
}
