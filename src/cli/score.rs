//! `prefer score`: a reward model's scores of every response of a preference file.

use super::*;

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// A reward model (HF directory with score.weight, as `prefer train` with task = "reward" writes).
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter (a PEFT directory: adapter_config.json + adapter_model.safetensors) to
    /// put on --model. A PEFT directory given as --model itself loads the base it names.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The responses to score: preference pairs, ranked lists or unpaired rows.
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub read: DataArgs,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let ScoreArgs {
        model,
        data,
        read,
        adapter,
    } = args;
    let m = model::load::load_with_adapter(&model, adapter.as_deref(), DType::F32, &Device::Cpu)?;
    if !m.transformer.cfg.reward_head {
        bail!(
            "{} has no reward head (score.weight); train one with task = \"reward\"",
            model.display()
        );
    }
    let (examples, report) = load_tokenized_examples(
        &data,
        &m.tokenizer,
        &read.tokenize_options(adapter.as_deref().unwrap_or(&model)),
        read.skip_invalid,
    )?;
    for e in &report.skipped {
        eprintln!("skipped: {e}");
    }
    let heads = prefer::stats::score_reward_heads(&m.transformer, &examples, read.batch_size, m.tokenizer.pad_id)?;
    let gaussian = m.transformer.cfg.reward_variance;
    let mut out = std::io::stdout().lock();
    for (e, h) in examples.iter().zip(&heads) {
        // a Gaussian head scores with its mean and also reports σ per response
        let s: Vec<f64> = h.iter().map(|r| r[0]).collect();
        let mut rec = json!({"line": e.line, "scores": s});
        if m.transformer.cfg.num_labels > 1 && !gaussian {
            // MaxMin: one reward per cluster head, per response
            writeln!(out, "{}", json!({"line": e.line, "head_scores": h}))?;
            continue;
        }
        if gaussian {
            rec["sigmas"] = json!(h.iter().map(|r| (0.5 * r[1]).exp()).collect::<Vec<_>>());
        }
        if report.shape == Some(Shape::Pairwise) {
            rec["chosen_score"] = json!(s[0]);
            rec["rejected_score"] = json!(s[1]);
            if gaussian {
                rec["preference_probability"] = json!(prefer::util::gaussian_preference_probability(
                    h[0][0], h[0][1], h[1][0], h[1][1]
                ));
            }
        }
        writeln!(out, "{rec}")?;
    }
    Ok(())
}
