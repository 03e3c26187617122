//! `prefer train`: one training run from a config.

use super::*;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The run's TOML config (keys as in TRL's DPOConfig; see --help-config).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set beta=0.2 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print every config key with its default and meaning.
    #[arg(long)]
    pub help_config: bool,
    /// With --help-config: print it as Markdown tables (docs/config.md).
    #[arg(long, requires = "help_config")]
    pub markdown: bool,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let TrainArgs {
        config,
        set,
        help_config,
        markdown,
    } = args;
    if help_config {
        match markdown {
            true => print!("{}", TrainConfig::help_markdown()),
            false => print!("{}", TrainConfig::help()),
        }
        return Ok(());
    }
    if config.is_none() && set.is_empty() {
        bail!("give a run config: prefer train --config run.toml [--set key=value ...] (see --help-config)");
    }
    let cfg = TrainConfig::load(config.as_deref(), &set)?;
    if cfg.num_threads > 0 && std::env::var("RAYON_NUM_THREADS").is_err() {
        // SAFETY: no tensor op has run yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", cfg.num_threads.to_string()) };
    }
    ctrlc::set_handler(|| {
        if prefer::train::STOP_REQUESTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: saving a checkpoint after this step (press again to quit now)");
    })
    .context("installing the Ctrl-C handler")?;
    let out = prefer::train::train(&cfg)?;
    if let Some(l) = &out.last_log {
        eprintln!("last metrics: {l}");
    }
    if out.interrupted {
        std::process::exit(130);
    }
    eprintln!("done: {} steps; model saved in {}", out.steps_done, cfg.output_dir);
    Ok(())
}
