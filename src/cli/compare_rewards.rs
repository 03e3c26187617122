//! `prefer compare-rewards`: a DPO model's implicit reward against a reward model, in and out of distribution.

use super::*;

#[derive(clap::Args)]
pub struct CompareRewardsArgs {
    /// The DPO-trained policy.
    #[arg(long)]
    pub dpo: PathBuf,
    /// Its reference model.
    #[arg(long = "ref")]
    pub reference: PathBuf,
    /// The reward model.
    #[arg(long)]
    pub rm: PathBuf,
    /// In-distribution held-out pairs.
    #[arg(long)]
    pub data: PathBuf,
    /// Distribution-shifted pairs.
    #[arg(long)]
    pub shifted: Option<PathBuf>,
    /// β of the implicit reward (default: the DPO run's `beta`, else 0.1).
    #[arg(long)]
    pub beta: Option<f64>,
    /// The objective whose implicit reward is compared (default: the DPO run's `loss_type`,
    /// else `sigmoid`).
    #[arg(long = "loss-type", alias = "loss_type")]
    pub loss_type: Option<String>,
    #[command(flatten)]
    pub read: DataArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: CompareRewardsArgs) -> Result<()> {
    let CompareRewardsArgs {
        dpo,
        reference,
        rm,
        data,
        shifted,
        beta,
        loss_type,
        read,
        json,
    } = args;
    let objective = super::run_objective(&dpo, beta, loss_type.as_deref())?;
    let dev = Device::Cpu;
    let (pol, refm, rmm) = (
        model::load(&dpo, DType::F32, &dev)?,
        model::load(&reference, DType::F32, &dev)?,
        model::load(&rm, DType::F32, &dev)?,
    );
    if !rmm.transformer.cfg.reward_head {
        bail!("{} has no reward head; train one with task = \"reward\"", rm.display());
    }
    let opts = read.tokenize_options(&dpo);
    let batch_size = read.batch_size;
    let acc = |scores: &[(f64, f64)]| scores.iter().filter(|r| r.0 > r.1).count() as f64 / scores.len().max(1) as f64;
    let pairs_of = |v: Vec<Vec<f64>>| -> Vec<(f64, f64)> { v.into_iter().map(|r| (r[0], r[1])).collect() };
    let mut cols = vec![];
    for (name, file) in std::iter::once(("in-distribution", &data)).chain(shifted.as_ref().map(|f| ("shifted", f))) {
        let (pairs, report) = load_tokenized_examples(file, &pol.tokenizer, &opts, read.skip_invalid)?;
        for e in &report.skipped {
            eprintln!("skipped: {e}");
        }
        let so =
            |t: &model::Transformer| prefer::stats::score_examples(t, &pairs, batch_size, &Default::default(), |_| {});
        let (p, r) = (pairs_of(so(&pol.transformer)?), pairs_of(so(&refm.transformer)?));
        let lengths: Vec<(usize, usize)> = pairs
            .iter()
            .map(|e| (e.chosen_ids().len(), e.rejected_ids().len()))
            .collect();
        let implicit = objective.pair_rewards(&prefer::objectives::PairStats::from_f64(&p, Some(&r), &lengths)?)?;
        let explicit = pairs_of(prefer::stats::score_rewards(
            &rmm.transformer,
            &pairs,
            batch_size,
            rmm.tokenizer.pad_id,
        )?);
        cols.push(
            json!({"split": name, "pairs": pairs.len(), "implicit_dpo": acc(&implicit), "explicit_rm": acc(&explicit)}),
        );
    }
    if json {
        println!("{}", Value::Array(cols));
    } else {
        let head: Vec<String> = cols
            .iter()
            .map(|c| format!("{} ({} pairs)", c["split"].as_str().unwrap_or(""), c["pairs"]))
            .collect();
        println!("| reward | {} |", head.join(" | "));
        println!("|---|{}", "---|".repeat(cols.len()));
        for (label, key) in [
            ("implicit (DPO: β·log π/π_ref)", "implicit_dpo"),
            ("explicit (reward model)", "explicit_rm"),
        ] {
            let cells: Vec<String> = cols.iter().map(|c| pct(c[key].as_f64().unwrap_or(f64::NAN))).collect();
            println!("| {label} | {} |", cells.join(" | "));
        }
    }
    Ok(())
}
