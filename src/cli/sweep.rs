//! `prefer sweep`: several objectives on the same model, data and budget.

use super::*;

#[derive(clap::Args)]
pub struct SweepArgs {
    /// The base run config (every key but loss_type is shared).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Objectives to compare, comma-separated (e.g. sigmoid,ipo,simpo,kto).
    #[arg(long = "loss-type", alias = "loss_type", value_delimiter = ',')]
    pub loss_type: Vec<String>,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

pub fn run(args: SweepArgs) -> Result<()> {
    let SweepArgs { config, loss_type, set } = args;
    if loss_type.is_empty() {
        bail!("name the objectives to compare: --loss-type sigmoid,ipo,simpo");
    }
    let cfg = TrainConfig::load(config.as_deref(), &set)?;
    ctrlc::set_handler(|| {
        prefer::train::STOP_REQUESTED.store(true, std::sync::atomic::Ordering::SeqCst);
    })
    .context("installing the Ctrl-C handler")?;
    let rows = prefer::sweep::sweep(&cfg, &loss_type)?;
    print!("{}", prefer::sweep::table(&rows));
    eprintln!("table, JSON and plots in {}", cfg.output_dir);
    Ok(())
}
