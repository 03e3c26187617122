//! Evaluation by generation: sample completions of prompts and score them with rewards (e.g.
//! GSM8K accuracy), so a user sees where a model starts before online training.

use crate::data::prompts::Prompt;
use crate::error::Result;
use crate::model::LoadedModel;
use crate::rewards::{score_all, Reward, RewardInput};
use crate::sample::{sample, Completion, SamplingParams};
use serde::Serialize;

/// Mean and standard deviation of one reward over the scored completions.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RewardSummary {
    pub name: String,
    pub mean: f64,
    pub std: f64,
    /// Completions it scored (the others it skipped).
    pub scored: usize,
}

/// What a generation evaluation found.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GenerationSummary {
    pub prompts: usize,
    pub completions: usize,
    pub rewards: Vec<RewardSummary>,
    /// Mean of the weighted total reward.
    pub reward: f64,
    pub mean_completion_length: f64,
    /// Fraction of completions cut at `max_completion_length`.
    pub clipped_ratio: f64,
}

/// One scored completion.
#[derive(Clone, Debug, Serialize)]
pub struct ScoredCompletion {
    pub prompt_index: usize,
    pub completion: String,
    pub rewards: Vec<Option<f64>>,
    pub reward: Option<f64>,
}

/// Sample `num_generations` completions of every prompt and score them with `rewards`.
pub fn evaluate_generation(
    model: &LoadedModel,
    prompts: &[Prompt],
    num_generations: usize,
    params: &SamplingParams,
    seed: u64,
    rewards: &mut [Box<dyn Reward>],
    progress: &mut (dyn FnMut(usize) + Send),
) -> Result<(GenerationSummary, Vec<ScoredCompletion>)> {
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let comps: Vec<Completion> = sample(
        &model.transformer,
        &ids,
        num_generations,
        params,
        seed,
        &|_| false,
        progress,
    )?;
    let texts: Vec<String> = comps
        .iter()
        .map(|c| model.tokenizer.decode(&c.ids, true))
        .collect::<Result<_>>()?;
    let inputs: Vec<RewardInput> = comps
        .iter()
        .zip(&texts)
        .map(|(c, t)| RewardInput {
            prompt: &prompts[c.prompt_index].text,
            completion: t,
            completion_tokens: c.ids.len(),
            stopped: c.finish_reason == crate::sample::FinishReason::Stop,
            columns: &prompts[c.prompt_index].columns,
        })
        .collect();
    let (per, total) = score_all(rewards, None, &inputs)?;
    let stats = |xs: &[Option<f64>]| {
        let v: Vec<f64> = xs.iter().flatten().copied().collect();
        let n = v.len().max(1) as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt(), v.len())
    };
    let summaries = rewards
        .iter()
        .zip(&per)
        .map(|(r, s)| {
            let (mean, std, scored) = stats(s);
            RewardSummary {
                name: r.name().to_string(),
                mean,
                std,
                scored,
            }
        })
        .collect();
    let n = comps.len().max(1) as f64;
    let summary = GenerationSummary {
        prompts: prompts.len(),
        completions: comps.len(),
        rewards: summaries,
        reward: stats(&total).0,
        mean_completion_length: comps.iter().map(|c| c.ids.len() as f64).sum::<f64>() / n,
        clipped_ratio: comps
            .iter()
            .filter(|c| c.finish_reason == crate::sample::FinishReason::Length)
            .count() as f64
            / n,
    };
    let scored = comps
        .iter()
        .zip(texts)
        .enumerate()
        .map(|(i, (c, t))| ScoredCompletion {
            prompt_index: c.prompt_index,
            completion: t,
            rewards: per.iter().map(|s| s[i]).collect(),
            reward: total[i],
        })
        .collect();
    Ok((summary, scored))
}
