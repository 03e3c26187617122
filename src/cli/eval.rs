//! `prefer eval`: accuracy, margins, calibration and more of a model (or each checkpoint of a run) on pairs.

use super::*;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The policy: an HF directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter (a PEFT directory: adapter_config.json + adapter_model.safetensors) to
    /// put on --model. A PEFT directory given as --model itself loads the base it names.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The reference for implicit rewards (omit for ranking accuracy only).
    #[arg(long = "ref")]
    pub reference: Option<PathBuf>,
    /// Preference pairs (JSONL).
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    pub data: Option<PathBuf>,
    /// Instead of pairs, evaluate by generation: sample completions of these prompts (JSONL)
    /// and score them with --reward (e.g. GSM8K: --prompt-field question --chat).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[command(flatten)]
    pub gen: GenerationArgs,
    /// β of the implicit reward (default: the evaluated run's `beta`, else 0.1).
    #[arg(long)]
    pub beta: Option<f64>,
    /// The objective whose rewards and loss are reported (default: the evaluated run's
    /// `loss_type`, else `sigmoid`); comma-separated to combine, as in the config.
    #[arg(long = "loss-type", alias = "loss_type")]
    pub loss_type: Option<String>,
    /// True preference probability of every pair, for the idealised ranking accuracy
    /// (rows' `preference_strength` takes precedence).
    #[arg(long)]
    pub alpha: Option<f64>,
    #[command(flatten)]
    pub read: DataArgs,
    /// Also answer each prompt greedily and report how often the reply starts with the
    /// chosen completion (generation accuracy).
    #[arg(long)]
    pub generate: bool,
    /// --model is a run's output_dir: evaluate every checkpoint-N (table, eval_trajectory.json).
    #[arg(long)]
    pub checkpoints: bool,
    /// Write PNG plots here (reward histogram; with --checkpoints, each metric over steps).
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Factor-level analysis: how labels and the model's preferences line up with response
    /// length, list formatting, refusal phrases and question echoing.
    #[arg(long)]
    pub factors: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// How `prefer eval --prompts` samples and scores.
#[derive(clap::Args)]
pub struct GenerationArgs {
    /// The column holding the prompt.
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    /// Render string prompts as the user turn of the chat template.
    #[arg(long)]
    pub chat: bool,
    /// Rewards to score completions with (repeatable): accuracy, format, length, cmd:<command>, model:<reward model>.
    #[arg(long = "reward", default_value = "accuracy")]
    pub rewards: Vec<String>,
    /// `format`'s regular expression.
    #[arg(long)]
    pub reward_format_regex: Option<String>,
    /// `length`'s target in tokens.
    #[arg(long, default_value_t = 0)]
    pub reward_length_target: usize,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_generations: usize,
    /// Sampling temperature (0 = greedy, the default for evaluation).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// New tokens per completion at most.
    #[arg(long, default_value_t = 256)]
    pub max_completion_length: usize,
    /// Seed of the sampler (with --temperature above 0).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write every completion with its rewards here (JSONL).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `prefer eval --prompts`: sample, score, summarise.
fn eval_generation(
    model_path: &Path,
    adapter: Option<&Path>,
    prompts: &Path,
    read: &DataArgs,
    g: &GenerationArgs,
    as_json: bool,
) -> Result<()> {
    let m = model::load::load_with_adapter(model_path, adapter, DType::F32, &Device::Cpu)?;
    let field = prefer::data::prompts::PromptField {
        name: g.prompt_field.clone(),
        chat: g.chat,
    };
    let max_length = read.tokenize_options(adapter.unwrap_or(model_path)).max_length;
    let ps = prefer::data::prompts::load_prompts(prompts, &m.tokenizer, &field, max_length, 1)?;
    let opts = prefer::rewards::RewardOptions {
        format_regex: g.reward_format_regex.clone(),
        length_target: g.reward_length_target,
        command_timeout: 600.0,
    };
    let mut rewards = g
        .rewards
        .iter()
        .map(|r| prefer::rewards::by_name(r, &opts))
        .collect::<prefer::Result<Vec<_>>>()?;
    let params = prefer::sample::SamplingParams {
        temperature: g.temperature,
        max_completion_length: g.max_completion_length,
        stop_tokens: vec![m.tokenizer.eos_id],
        ..Default::default()
    };
    let pb = prefer::util::progress_bar(ps.len() * g.num_generations * g.max_completion_length, false);
    pb.set_prefix("generate");
    let t0 = std::time::Instant::now();
    let (summary, scored) = prefer::eval::generation::evaluate_generation(
        &m,
        &ps,
        g.num_generations,
        &params,
        g.seed,
        &mut rewards,
        &mut |n| pb.inc(n as u64),
    )?;
    pb.finish_and_clear();
    eprintln!("generated in {:.1} s", t0.elapsed().as_secs_f64());
    if let Some(out) = &g.out {
        let lines: Vec<String> = scored.iter().map(|c| json!(c).to_string()).collect();
        write_lines(out, &lines)?;
    }
    if as_json {
        println!("{}", json!(summary));
    } else {
        println!("prompts                        {}", summary.prompts);
        println!("completions                    {}", summary.completions);
        for r in &summary.rewards {
            println!(
                "{:<30} {:.4} (std {:.4}, {} scored)",
                format!("reward {}", r.name),
                r.mean,
                r.std,
                r.scored
            );
        }
        println!(
            "mean completion length         {:.1} tokens",
            summary.mean_completion_length
        );
        println!("cut at max_completion_length   {}", pct(summary.clipped_ratio));
    }
    Ok(())
}

pub fn run(args: EvalArgs) -> Result<()> {
    if let Some(p) = &args.prompts {
        return eval_generation(
            &args.model,
            args.adapter.as_deref(),
            p,
            &args.read,
            &args.gen,
            args.json,
        );
    }
    let EvalArgs {
        model,
        reference,
        data,
        beta,
        loss_type,
        alpha,
        read,
        generate,
        checkpoints,
        plots,
        factors,
        json,
        adapter,
        ..
    } = args;
    let data = data.context("give --data (preference pairs) or --prompts (evaluation by generation)")?;
    let objective = super::run_objective(adapter.as_deref().unwrap_or(&model), beta, loss_type.as_deref())?;
    eval_cmd(
        &model,
        adapter.as_deref(),
        reference.as_deref(),
        &data,
        &objective,
        alpha,
        &read,
        generate,
        checkpoints,
        plots.as_deref(),
        factors,
        json,
    )
}

/// A (chosen, rejected) pair of scores.
type Pair = (f64, f64);

/// A Gaussian reward head on pairs, from one scoring pass: the (chosen, rejected) means, and
/// each pair's probability that chosen is preferred, Φ((μ_w − μ_l)/√(σ_w² + σ_l²)).
fn gaussian_scores(
    m: &model::LoadedModel,
    pairs: &[prefer::data::TokenizedExample],
    batch_size: usize,
) -> Result<(Vec<Pair>, Vec<f64>)> {
    let heads = prefer::stats::score_reward_heads(&m.transformer, pairs, batch_size, m.tokenizer.pad_id)?;
    Ok(heads
        .iter()
        .map(|r| {
            let p = prefer::util::gaussian_preference_probability(r[0][0], r[0][1], r[1][0], r[1][1]);
            ((r[0][0], r[1][0]), p)
        })
        .unzip())
}

fn print_summary(s: &prefer::eval::EvalSummary, beta: f64, gen_acc: Option<f64>) {
    println!("pairs                          {}", s.pairs);
    if s.reward_model {
        if let (Some(a), Some(mg)) = (s.reward_accuracy, s.reward_margin) {
            println!("reward accuracy (reward model) {}", pct(a));
            println!("mean reward margin             {mg:.4}");
        }
        if let Some(e) = s.calibration_ece {
            println!("calibration error (ECE)        {e:.4}");
        }
        return;
    }
    println!("ranking accuracy               {}", pct(s.ranking_accuracy));
    println!("ranking accuracy (per token)   {}", pct(s.ranking_accuracy_normalized));
    if let (Some(a), Some(mg)) = (s.reward_accuracy, s.reward_margin) {
        println!("reward accuracy (beta {beta})    {}", pct(a));
        println!("mean reward margin             {mg:.4}");
    }
    if let (Some(l), Some(t)) = (s.loss, &s.loss_type) {
        println!("{:<30} {l:.4}", format!("loss ({t})"));
    }
    if let Some(rr) = s.ref_ranking_accuracy {
        println!("reference ranking accuracy     {}", pct(rr));
    }
    if let Some(e) = s.calibration_ece {
        println!("calibration error (ECE)        {e:.4}");
    }
    if let (Some(i), Some(g)) = (s.idealized_ranking_accuracy, s.alignment_gap) {
        println!("idealised ranking accuracy     {}", pct(i));
        println!("alignment gap                  {:+.1} points", 100.0 * g);
    }
    if let Some(d) = &s.difficulty {
        println!("reference misranks             {}", pct(d.reference_misranked));
        if let Some(t) = d.mean_flip_threshold_misranked {
            println!("  DPO loss needed to flip them {t:.4} (mean)");
        }
    }
    if let Some(g) = gen_acc {
        println!("generation accuracy (greedy)   {}", pct(g));
    }
}

/// The models `prefer eval --checkpoints RUN_DIR` evaluates: every complete checkpoint-N, then
/// the final model if the run finished.
fn run_models(run: &Path) -> Result<Vec<(Option<usize>, PathBuf)>> {
    if !run.is_dir() {
        bail!("{} is not a run directory", run.display());
    }
    let v: Vec<(Option<usize>, PathBuf)> = prefer::train::checkpoint::list(run)
        .into_iter()
        .map(|(n, p)| (Some(n), p))
        .collect();
    if v.is_empty() {
        bail!("{} holds no checkpoint-N directories", run.display());
    }
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
fn eval_cmd(
    model_path: &Path,
    adapter: Option<&Path>,
    ref_path: Option<&Path>,
    data: &Path,
    objective: &prefer::objectives::Objective,
    alpha: Option<f64>,
    read: &DataArgs,
    generate: bool,
    checkpoints: bool,
    plots: Option<&Path>,
    factors: bool,
    as_json: bool,
) -> Result<()> {
    let batch_size = read.batch_size;
    let beta = objective.params.beta;
    let dev = Device::Cpu;
    let models = if checkpoints {
        run_models(model_path)?
    } else {
        vec![(None, model_path.to_path_buf())]
    };
    let tok = model::load_tokenizer(&models[0].1)?;
    let opts = read.tokenize_options(adapter.unwrap_or(model_path));
    let (pairs, report) = load_tokenized_examples(data, &tok, &opts, read.skip_invalid)?;
    for e in &report.skipped {
        eprintln!("skipped: {e}");
    }
    if report.shape != Some(Shape::Pairwise) {
        bail!(
            "{}: prefer eval reads pairwise data (chosen/rejected); convert ranked lists with `prefer data oasst --to pairs`",
            data.display()
        );
    }
    let score = |m: &model::LoadedModel| -> Result<Vec<(f64, f64)>> {
        let v = if m.transformer.cfg.reward_head {
            prefer::stats::score_rewards(&m.transformer, &pairs, batch_size, m.tokenizer.pad_id)?
        } else {
            prefer::stats::score_examples(&m.transformer, &pairs, batch_size, &Default::default(), |_| {})?
        };
        Ok(v.into_iter().map(|r| (r[0], r[1])).collect())
    };
    let reference = match ref_path {
        Some(r) => Some(score(&model::load(r, DType::F32, &dev)?)?),
        None => None,
    };
    // true preference probabilities: the data's preference_strength, else --alpha
    let alphas: Option<Vec<f64>> = pairs.iter().map(|p| p.meta.strength.or(alpha)).collect();
    let lengths: Vec<(usize, usize)> = pairs
        .iter()
        .map(|p| (p.chosen_ids().len(), p.rejected_ids().len()))
        .collect();
    let mut rows = Vec::new();
    for (step, path) in &models {
        // --adapter goes on the evaluated model (not on a run's checkpoints, which hold their own)
        let m = model::load::load_with_adapter(path, adapter.filter(|_| step.is_none()), DType::F32, &dev)?;
        let (scores, gaussian) = match m.transformer.cfg.reward_variance {
            true => {
                let (s, p) = gaussian_scores(&m, &pairs, batch_size)?;
                (s, Some(p))
            }
            false => (score(&m)?, None),
        };
        // each pair's (chosen, rejected) reward: a reward model's, or the objective's implicit
        // reward (β·Δ for the DPO family) where the objective can be evaluated
        let rewards: Option<Vec<(f64, f64)>> = if m.transformer.cfg.reward_head {
            Some(scores.clone())
        } else if reference.is_some() || !objective.needs_reference() {
            let stats = prefer::objectives::PairStats::from_f64(&scores, reference.as_deref(), &lengths)?;
            Some(objective.pair_rewards(&stats)?)
        } else {
            None
        };
        // the model's probability that each pair's chosen response is preferred
        let probabilities: Option<Vec<f64>> = match gaussian {
            Some(g) => Some(g),
            None => rewards.as_deref().map(prefer::eval::bt_probabilities),
        };
        let mut summary = if m.transformer.cfg.reward_head {
            prefer::eval::summarize_rewards(&scores, probabilities.as_deref().unwrap_or_default())
        } else {
            prefer::eval::summarize(&scores, reference.as_deref(), &lengths, objective)?
        };
        if let (Some(r), false) = (&reference, m.transformer.cfg.reward_head) {
            summary = summary.with_ideal(r, alphas.as_deref(), beta);
        }
        let mut gen_acc = None;
        if generate && !m.transformer.cfg.reward_head {
            let mut hits = 0;
            for p in &pairs {
                let want: Vec<u32> = p
                    .chosen_ids()
                    .iter()
                    .copied()
                    .filter(|&t| t != m.tokenizer.eos_id)
                    .collect();
                let want_text = m.tokenizer.decode(&want, true)?;
                let got = model::logprobs::generate_greedy(
                    &m.transformer,
                    &p.prompt_ids,
                    want.len() + 4,
                    &[m.tokenizer.eos_id],
                )?;
                let got_text = m.tokenizer.decode(&got, true)?;
                if got_text.trim().starts_with(want_text.trim()) && !want_text.trim().is_empty() {
                    hits += 1;
                }
            }
            gen_acc = Some(hits as f64 / pairs.len() as f64);
        }
        if let (Some(dir), None) = (plots, step) {
            // reward (or log-ratio) histograms of chosen vs rejected
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let implicit = rewards.clone().unwrap_or_else(|| scores.clone());
            let what = if rewards.is_some() { "reward" } else { "log-prob" };
            let p = dir.join("reward_histogram.png");
            prefer::plot::histogram(
                &p,
                &format!("{what}: chosen vs rejected"),
                what,
                &[
                    ("chosen", implicit.iter().map(|x| x.0).collect()),
                    ("rejected", implicit.iter().map(|x| x.1).collect()),
                ],
                30,
            )?;
            eprintln!("wrote {}", p.display());
            if let Some(probabilities) = &probabilities {
                // reliability diagram of the model's preference probabilities
                let cal = prefer::eval::calibration(probabilities, prefer::eval::CALIBRATION_BINS);
                let points: Vec<(f64, f64)> = cal
                    .bins
                    .iter()
                    .filter(|b| b.count > 0)
                    .map(|b| (b.confidence, b.accuracy))
                    .collect();
                let series = [
                    prefer::plot::Series {
                        name: format!("model (ECE {:.3})", cal.ece),
                        points,
                    },
                    prefer::plot::Series {
                        name: "perfectly calibrated".into(),
                        points: vec![(0.5, 0.5), (1.0, 1.0)],
                    },
                ];
                let p = dir.join("calibration.png");
                prefer::plot::line_chart(
                    &p,
                    match m.transformer.cfg.reward_variance {
                        true => "calibration of Φ(Δμ / √(σ_w² + σ_l²))",
                        false => "calibration of σ(reward margin)",
                    },
                    "confidence max(p, 1 − p)",
                    "fraction ranked correctly",
                    &series,
                )?;
                eprintln!("wrote {}", p.display());
            }
        }
        let mut v = serde_json::to_value(&summary)?;
        v["generation_accuracy"] = json!(gen_acc);
        v["model"] = json!(path.display().to_string());
        v["step"] = json!(step);
        let factor_rows = if factors {
            // the model's preference: its reward margin (implicit or explicit), else its log-prob margin
            let diff: Vec<f64> = rewards.as_ref().unwrap_or(&scores).iter().map(|(c, j)| c - j).collect();
            let (text, _) = load_text_examples(data, Some(&m.tokenizer), true)?;
            let by_line: std::collections::HashMap<usize, &prefer::data::TextExample> =
                text.iter().map(|t| (t.line, t)).collect();
            let texts: Vec<(String, String, String)> = pairs
                .iter()
                .map(|p| {
                    let t = by_line[&p.line];
                    (t.prompt.clone(), t.chosen().to_string(), t.rejected().to_string())
                })
                .collect();
            let rows = prefer::eval::factors::analyze(&texts, &diff);
            v["factors"] = serde_json::to_value(&rows)?;
            Some(rows)
        } else {
            None
        };
        if !checkpoints {
            if as_json {
                println!("{v}");
            } else {
                print_summary(&summary, beta, gen_acc);
                if let Some(rows) = factor_rows {
                    println!("\n| factor | pairs differing | labels prefer more | model prefers more | corr(Δfactor, Δmodel) |");
                    println!("|---|---|---|---|---|");
                    let f = |x: Option<f64>| x.map(pct).unwrap_or("—".into());
                    for r in rows {
                        let c = r.model_correlation.map(|c| format!("{c:+.3}")).unwrap_or("—".into());
                        println!(
                            "| {} | {} | {} | {} | {c} |",
                            r.factor,
                            r.pairs_differing,
                            f(r.labels_prefer_more),
                            f(r.model_prefers_more)
                        );
                    }
                }
            }
            return Ok(());
        }
        eprintln!("{}: ranking accuracy {}", path.display(), pct(summary.ranking_accuracy));
        rows.push(v);
    }
    // a run's checkpoints: one table, JSON, and a plot per metric over steps
    let metrics = [
        "ranking_accuracy",
        "ranking_accuracy_normalized",
        "reward_accuracy",
        "reward_margin",
        "loss",
        "alignment_gap",
        "calibration_ece",
    ];
    if as_json {
        println!("{}", Value::Array(rows.clone()));
    } else {
        println!("| step | {} |", metrics.join(" | "));
        println!("|---|{}", "---|".repeat(metrics.len()));
        for r in &rows {
            let cells: Vec<String> = metrics
                .iter()
                .map(|k| r[*k].as_f64().map(|x| format!("{x:.4}")).unwrap_or("—".into()))
                .collect();
            println!("| {} | {} |", r["step"], cells.join(" | "));
        }
    }
    std::fs::write(
        model_path.join("eval_trajectory.json"),
        serde_json::to_vec_pretty(&rows)?,
    )?;
    if let Some(dir) = plots {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for k in metrics {
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|r| Some((r["step"].as_f64()?, r[k].as_f64()?)))
                .collect();
            if points.is_empty() {
                continue;
            }
            let p = dir.join(format!("eval-{k}.png"));
            let series = [prefer::plot::Series {
                name: k.to_string(),
                points,
            }];
            prefer::plot::line_chart(&p, &format!("{k} over training"), "step", k, &series)?;
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(())
}
