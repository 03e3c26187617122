//! `prefer pal fit | adapt`: the PAL pluralistic reward model.

use super::*;

#[derive(Subcommand)]
pub enum PalCmd {
    /// Embed every pair with the frozen model, fit PAL on each annotator's pairs but the last
    /// --eval-fraction, and report held-out accuracy (next to one shared prototype), each
    /// annotator's mixture, and how many annotators lean on each prototype. Writes
    /// pal.safetensors and pal.json to --out.
    Fit {
        /// The embedding model (HF directory or .gguf); rows need an `annotator`.
        #[arg(long)]
        model: PathBuf,
        /// Preference pairs with an `annotator` column.
        #[arg(long)]
        data: PathBuf,
        /// The directory to write pal.safetensors and pal.json to.
        #[arg(long)]
        out: PathBuf,
        /// Prototypes K.
        #[arg(long, default_value_t = 2)]
        k: usize,
        /// Dimension of the preference space.
        #[arg(long, default_value_t = 16)]
        dim: usize,
        /// Full-batch Adam steps.
        #[arg(long, default_value_t = 300)]
        steps: usize,
        /// Adam's learning rate.
        #[arg(long, default_value_t = 0.02)]
        learning_rate: f64,
        /// Fraction of each annotator's pairs (the last ones) held out.
        #[arg(long, default_value_t = 0.2)]
        eval_fraction: f64,
        /// Seed of the initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        read: DataArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Fit new annotators from a few pairs each: the prototypes and the map stay frozen, each
    /// annotator's mixture is fitted on their first --shots pairs and tested on the rest.
    Adapt {
        /// A directory `prefer pal fit` wrote.
        #[arg(long)]
        pal: PathBuf,
        /// Pairs of the new annotators (rows need an `annotator`).
        #[arg(long)]
        data: PathBuf,
        /// Pairs per annotator used to fit its mixture (the rest test it).
        #[arg(long, default_value_t = 10)]
        shots: usize,
        /// Full-batch Adam steps.
        #[arg(long, default_value_t = 200)]
        steps: usize,
        /// Adam's learning rate.
        #[arg(long, default_value_t = 0.1)]
        learning_rate: f64,
        /// The embedding model, if not the one recorded in pal.json.
        #[arg(long)]
        model: Option<PathBuf>,
        #[command(flatten)]
        read: DataArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Pairs of `data` embedded by `model`'s frozen body, with each row's annotator.
fn pal_embeddings(
    model_path: &Path,
    data: &Path,
    read: &DataArgs,
) -> Result<(prefer::pal::PairEmbeddings, Vec<String>)> {
    let m = model::load(model_path, DType::F32, &Device::Cpu)?;
    let (examples, report) = load_tokenized_examples(
        data,
        &m.tokenizer,
        &read.tokenize_options(model_path),
        read.skip_invalid,
    )?;
    for e in &report.skipped {
        eprintln!("skipped: {e}");
    }
    if report.shape != Some(Shape::Pairwise) {
        bail!(
            "{}: PAL reads pairwise data (chosen/rejected) with an `annotator` on every row",
            data.display()
        );
    }
    let (names, users) = prefer::pal::annotators(&examples, data)?;
    eprintln!(
        "embedding {} pairs of {} annotators with {}",
        examples.len(),
        names.len(),
        model_path.display()
    );
    let emb = prefer::pal::embed_pairs(&m.transformer, &examples, users, read.batch_size, m.tokenizer.pad_id)?;
    Ok((emb, names))
}

pub fn run(cmd: PalCmd) -> Result<()> {
    let pct = |x: f64| format!("{:.1} %", 100.0 * x);
    match cmd {
        PalCmd::Fit {
            model: model_path,
            data,
            out,
            k,
            dim,
            steps,
            learning_rate,
            eval_fraction,
            seed,
            read,
            json,
        } => {
            if !(0.0..1.0).contains(&eval_fraction) {
                bail!("--eval-fraction {eval_fraction} must be in [0, 1)");
            }
            if k == 0 || dim == 0 || steps == 0 {
                bail!("--k, --dim and --steps must be at least 1 (got {k}, {dim}, {steps})");
            }
            let (emb, names) = pal_embeddings(&model_path, &data, &read)?;
            let opts = prefer::pal::PalOptions {
                k,
                dim,
                steps,
                learning_rate,
                seed,
            };
            let (pal, report) = prefer::pal::fit(&emb, names, eval_fraction, &opts)?;
            pal.save(&out, json!({"model": model_path.display().to_string()}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "PAL, K = {k}: loss {:.4} -> {:.4} over {steps} steps",
                    report.first_loss, report.final_loss
                );
                println!(
                    "train accuracy ({} pairs)      {}",
                    report.train_pairs,
                    pct(report.train_accuracy)
                );
                println!(
                    "held-out accuracy ({} pairs)   {}",
                    report.held_out_pairs,
                    pct(report.held_out_accuracy)
                );
                println!(
                    "one shared prototype, held out {}",
                    pct(report.single_prototype_held_out_accuracy)
                );
                println!("annotators per prototype       {:?}", report.users_per_prototype);
                println!("\n| annotator | train pairs | held-out pairs | held-out accuracy | weights |\n|---|---|---|---|---|");
                for u in &report.users {
                    let w: Vec<String> = u.weights.iter().map(|w| format!("{w:.2}")).collect();
                    println!(
                        "| {} | {} | {} | {} | {} |",
                        u.user,
                        u.fit_pairs,
                        u.held_out_pairs,
                        pct(u.held_out_accuracy),
                        w.join(" ")
                    );
                }
            }
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        PalCmd::Adapt {
            pal: dir,
            data,
            shots,
            steps,
            learning_rate,
            model: model_path,
            read,
            json,
        } => {
            let (pal, info) = prefer::pal::Pal::load(&dir)?;
            let model_path = match model_path {
                Some(p) => p,
                None => PathBuf::from(
                    info["model"]
                        .as_str()
                        .with_context(|| format!("{}: pal.json names no model; pass --model", dir.display()))?,
                ),
            };
            let (emb, names) = pal_embeddings(&model_path, &data, &read)?;
            let report = prefer::pal::adapt_users(&pal, &emb, &names, shots, steps, learning_rate)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} new annotators, {shots} pairs each to fit, the rest to test",
                    report.users.len()
                );
                println!("held-out accuracy, adapted      {}", pct(report.held_out_accuracy));
                println!("held-out accuracy, uniform mix  {}", pct(report.uniform_accuracy));
                println!("\n| annotator | test pairs | adapted | uniform | weights |\n|---|---|---|---|---|");
                for u in &report.users {
                    let w: Vec<String> = u.weights.iter().map(|w| format!("{w:.2}")).collect();
                    println!(
                        "| {} | {} | {} | {} | {} |",
                        u.user,
                        u.held_out_pairs,
                        pct(u.held_out_accuracy),
                        pct(u.uniform_accuracy.unwrap_or(f64::NAN)),
                        w.join(" ")
                    );
                }
            }
            Ok(())
        }
    }
}
