//! `prefer objectives list | eval`: the catalogue, and losses from sequence statistics without a model.

use super::*;

#[derive(Subcommand)]
pub enum ObjectivesCmd {
    /// Every objective name, its data shape, whether it needs a reference, and its source.
    List {
        /// Print one JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Per-example losses and implicit rewards from a JSONL of sequence statistics, without a
    /// model. Fields per line: policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
    /// ref_rejected_logps (reference objectives), chosen_tokens, rejected_tokens (default 1).
    /// The whole file is one batch (batch-level terms such as `sft` and `aot` use all rows).
    Eval {
        /// Objective name(s), comma-separated.
        #[arg(long = "loss-type", alias = "loss_type")]
        loss_type: String,
        /// Sequence statistics (JSONL).
        #[arg(long)]
        stats: PathBuf,
        /// Objective hyperparameters as config keys, e.g. --set beta=0.5 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

pub fn run(cmd: ObjectivesCmd) -> Result<()> {
    match cmd {
        ObjectivesCmd::List { json } => list(json),
        ObjectivesCmd::Eval { loss_type, stats, set } => objectives_eval(&loss_type, &stats, &set),
    }
}

fn list(as_json: bool) -> Result<()> {
    let status = |e: &prefer::objectives::ObjectiveEntry| match e.status {
        prefer::objectives::Status::Checked => "checked",
        prefer::objectives::Status::Experimental => "experimental",
    };
    if as_json {
        let rows: Vec<Value> = prefer::objectives::REGISTRY
            .iter()
            .map(|e| {
                json!({
                    "name": e.name,
                    "shape": e.loss.shape().to_string(),
                    "needs_reference": e.needs_reference,
                    "status": status(e),
                    "source": e.source,
                })
            })
            .collect();
        println!("{}", Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<18} {:<9} {:<10} {:<13} source",
        "name", "shape", "reference", "status"
    );
    for e in prefer::objectives::REGISTRY {
        let status = status(e);
        let reference = if e.needs_reference { "yes" } else { "no" };
        let shape = e.loss.shape().to_string();
        println!(
            "{:<18} {:<9} {:<10} {:<13} {}",
            e.name, shape, reference, status, e.source
        );
    }
    Ok(())
}

fn objectives_eval(loss_type: &str, stats_path: &Path, set: &[String]) -> Result<()> {
    let mut sets = vec![
        "model_name_or_path=-".to_string(),
        "train_file=-".to_string(),
        format!("loss_type={loss_type}"),
    ];
    sets.extend(set.iter().cloned());
    let cfg = TrainConfig::load(None, &sets)?;
    let objective = cfg.objective()?;
    let rows = read_jsonl(stats_path)?;
    let at = |line: usize, k: &str| format!("{}:{line}: field `{k}`", stats_path.display());
    let num = |v: &Value, line: usize, k: &str| -> Result<Option<f64>> {
        match v.get(k) {
            None => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .with_context(|| format!("{}: expected a number", at(line, k))),
        }
    };
    let (mut pc, mut pr, mut rc, mut rr, mut nc, mut nr) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut lvc, mut lvr) = (vec![], vec![]);
    for (line, v) in &rows {
        let need = |k: &str| -> Result<f64> { num(v, *line, k)?.with_context(|| format!("{}: missing", at(*line, k))) };
        pc.push(need("policy_chosen_logps")?);
        pr.push(need("policy_rejected_logps")?);
        if objective.needs_reference() {
            rc.push(need("ref_chosen_logps")?);
            rr.push(need("ref_rejected_logps")?);
        }
        if objective.needs_reward_variance() {
            lvc.push(need("chosen_log_variance")?);
            lvr.push(need("rejected_log_variance")?);
        }
        nc.push(num(v, *line, "chosen_tokens")?.unwrap_or(1.0) as usize);
        nr.push(num(v, *line, "rejected_tokens")?.unwrap_or(1.0) as usize);
    }
    if pc.is_empty() {
        bail!("{}: no rows", stats_path.display());
    }
    let policy: Vec<(f64, f64)> = pc.iter().copied().zip(pr.iter().copied()).collect();
    let reference: Vec<(f64, f64)> = rc.iter().copied().zip(rr.iter().copied()).collect();
    let lengths: Vec<(usize, usize)> = nc.into_iter().zip(nr).collect();
    let mut st =
        prefer::objectives::PairStats::from_f64(&policy, (!reference.is_empty()).then_some(&reference[..]), &lengths)?;
    if !lvc.is_empty() {
        let t = |x: &[f64]| candle_core::Tensor::new(x, &Device::Cpu);
        st.log_variance = Some((t(&lvc)?, t(&lvr)?));
    }
    let out = objective.loss_pairs(&st)?;
    let losses: Vec<f64> = out.losses.to_vec1()?;
    let rewards = objective.pair_rewards(&st)?;
    let mut stdout = std::io::stdout().lock();
    for (i, (line, _)) in rows.iter().enumerate() {
        let rec =
            json!({"line": line, "loss": losses[i], "rewards/chosen": rewards[i].0, "rewards/rejected": rewards[i].1});
        writeln!(stdout, "{rec}")?;
    }
    let mut summary = serde_json::Map::new();
    summary.insert("loss_type".into(), json!(objective.name()));
    summary.insert("loss".into(), json!(losses.iter().sum::<f64>() / losses.len() as f64));
    for (k, v) in out.metrics {
        summary.insert(k, json!(v));
    }
    eprintln!("{}", Value::Object(summary));
    Ok(())
}
