//! `prefer sweep`: several objectives on the same model, data and budget, one after another,
//! then one table (final loss, reward accuracy, ranking accuracy, KL to the reference,
//! tokens/s) and one plot per metric over steps.

use crate::config::{LossType, TrainConfig};
use crate::data::{examples::detect, jsonl::read_records, load_tokenized_examples, Shape};
use crate::error::{Error, Result};
use crate::plot::{line_chart, Series};
use crate::stats::score_examples;
use crate::train::Trainer;
use candle_core::{DType, Device};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Metrics plotted over steps, when the runs log them.
pub const PLOTTED: &[&str] = &[
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "eval_loss",
];

#[derive(Clone, Debug, Serialize)]
pub struct SweepRow {
    pub loss_type: String,
    pub steps: usize,
    pub final_loss: f64,
    /// The last logged `rewards/accuracies` (eval if an eval_file is set).
    pub reward_accuracy: Option<f64>,
    /// Fraction of held-out pairs where the trained policy gives chosen the higher log-prob.
    pub ranking_accuracy: Option<f64>,
    /// Mean over held-out completions of log π − log π_ref (a data-based estimate; KL proper
    /// needs samples from π).
    pub kl_to_reference: Option<f64>,
    pub tokens_per_second: f64,
    pub output_dir: String,
}

fn data_shape(path: &str) -> Result<Option<Shape>> {
    match read_records(Path::new(path))?.into_iter().flatten().next() {
        Some(r) => Ok(Some(detect(&r)?.0)),
        None => Ok(None),
    }
}

fn read_metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .map(|s| s.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

/// Run every objective of `loss_types` with `base`'s settings; outputs go to
/// `base.output_dir/<loss_type>/`, the table and plots to `base.output_dir`.
pub fn sweep(base: &TrainConfig, loss_types: &[String]) -> Result<Vec<SweepRow>> {
    let mut base = base.clone();
    crate::algorithms::data::resolve_dataset_splits(&mut base)?;
    let base = &base;
    let out = base.output_dir();
    crate::util::create_dir_all(&out)?;
    // check every objective against the data before training anything
    let shape = data_shape(&base.train_file)?;
    let configs: Vec<(String, TrainConfig)> = loss_types
        .iter()
        .map(|lt| {
            let name = lt.replace(',', "+");
            let cfg = TrainConfig {
                loss_type: LossType::One(lt.clone()),
                loss_weights: None,
                output_dir: out.join(&name).display().to_string(),
                ..base.clone()
            };
            cfg.validate()?;
            let obj = cfg.objective()?;
            if let Some(s) = shape {
                if s != obj.shape() {
                    return Err(Error::Config(format!(
                        "{lt} reads {} data, but {} holds {s} rows",
                        obj.shape(),
                        base.train_file
                    )));
                }
            }
            Ok((name, cfg))
        })
        .collect::<Result<_>>()?;
    // held-out pairs and the starting model's log-probs on them, once
    let held_out_file = base.eval_file.clone().unwrap_or_else(|| base.train_file.clone());
    let start = crate::model::load(Path::new(&base.model_name_or_path), DType::F32, &Device::Cpu)?;
    let (mut held_out, _) = load_tokenized_examples(
        Path::new(&held_out_file),
        &start.tokenizer,
        &base.tokenize_options(),
        true,
    )?;
    if crate::algorithms::data::holds_out(base) {
        // the rows each run holds out of train_file
        let seed = crate::algorithms::data::hold_out_seed(base);
        held_out = crate::data::hold_out(held_out, base.eval_fraction, seed, &base.train_file)?.1;
    }
    let pairwise = shape == Some(Shape::Pairwise);
    let base_scores = if pairwise {
        Some(score_examples(
            &start.transformer,
            &held_out,
            base.per_device_eval_batch_size,
            &Default::default(),
            |_| {},
        )?)
    } else {
        None
    };
    drop(start);
    let mut rows = Vec::new();
    for (name, cfg) in &configs {
        eprintln!("== sweep: {name}");
        let mut t = Trainer::new(cfg)?;
        let outcome = t.run()?;
        let metrics = read_metrics(Path::new(&cfg.output_dir));
        let last = metrics.last().cloned().unwrap_or(Value::Null);
        let num = |k: &str| last.get(k).and_then(Value::as_f64);
        let (ranking, kl) = match &base_scores {
            Some(b) => {
                let p = score_examples(
                    &t.policy.transformer,
                    &held_out,
                    cfg.per_device_eval_batch_size,
                    &Default::default(),
                    |_| {},
                )?;
                let rank = ranking_accuracy(&p);
                let n: usize = p.iter().map(Vec::len).sum();
                let kl = p
                    .iter()
                    .zip(b)
                    .flat_map(|(x, y)| x.iter().zip(y).map(|(a, c)| a - c))
                    .sum::<f64>()
                    / n.max(1) as f64;
                (Some(rank), Some(kl))
            }
            None => (None, None),
        };
        let tps: Vec<f64> = metrics
            .iter()
            .filter_map(|m| m.get("tokens_per_second").and_then(Value::as_f64))
            .collect();
        rows.push(SweepRow {
            loss_type: name.clone(),
            steps: outcome.steps_done,
            final_loss: num("loss").unwrap_or(f64::NAN),
            reward_accuracy: num("eval_rewards/accuracies").or(num("rewards/accuracies")),
            ranking_accuracy: ranking,
            kl_to_reference: kl,
            tokens_per_second: tps.iter().sum::<f64>() / tps.len().max(1) as f64,
            output_dir: cfg.output_dir.clone(),
        });
        if outcome.interrupted {
            break;
        }
    }
    write_report(&out, &rows)?;
    Ok(rows)
}

fn fmt(x: Option<f64>, pct: bool) -> String {
    match x {
        Some(v) if pct => format!("{:.1}%", 100.0 * v),
        Some(v) => format!("{v:.4}"),
        None => "—".into(),
    }
}

/// The table as Markdown.
pub fn table(rows: &[SweepRow]) -> String {
    let mut s = String::from(
        "| loss_type | steps | final loss | reward accuracy | ranking accuracy | KL to reference (est.) | tokens/s |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.4} | {} | {} | {} | {:.0} |\n",
            r.loss_type,
            r.steps,
            r.final_loss,
            fmt(r.reward_accuracy, true),
            fmt(r.ranking_accuracy, true),
            fmt(r.kl_to_reference, false),
            r.tokens_per_second
        ));
    }
    s
}

/// `sweep.md`, `sweep.json` and one `plot-<metric>.png` per logged metric in `out`.
pub fn write_report(out: &Path, rows: &[SweepRow]) -> Result<Vec<PathBuf>> {
    crate::util::write_atomic(&out.join("sweep.md"), table(rows).as_bytes())?;
    crate::util::write_atomic(
        &out.join("sweep.json"),
        &serde_json::to_vec_pretty(rows).expect("rows serialise"),
    )?;
    let runs: Vec<(String, Vec<Value>)> = rows
        .iter()
        .map(|r| (r.loss_type.clone(), read_metrics(Path::new(&r.output_dir))))
        .collect();
    let mut written = vec![];
    for metric in PLOTTED {
        let series: Vec<Series> = runs
            .iter()
            .map(|(name, ms)| Series {
                name: name.clone(),
                points: ms
                    .iter()
                    .filter_map(|m| Some((m.get("step")?.as_f64()?, m.get(*metric)?.as_f64()?)))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        if series.is_empty() {
            continue;
        }
        let path = out.join(format!("plot-{}.png", metric.replace('/', "_")));
        match line_chart(&path, metric, "step", metric, &series) {
            Ok(()) => written.push(path),
            Err(e) => eprintln!("plot {metric}: {e}"),
        }
    }
    Ok(written)
}

/// Ranking accuracy of per-example scores (chosen = response 0).
pub fn ranking_accuracy(scores: &[Vec<f64>]) -> f64 {
    scores.iter().filter(|r| r[0] > r[1]).count() as f64 / scores.len().max(1) as f64
}
