//! `prefer convert`: a GGUF (or any loadable model) to an HF checkpoint directory.

use super::*;

#[derive(clap::Args)]
pub struct ConvertArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let ConvertArgs { model, out } = args;
    let m = model::load(&model, DType::F32, &Device::Cpu)?;
    model::hf::save_dir(&m, &out)?;
    eprintln!("wrote {} (HF layout, f32)", out.display());
    Ok(())
}
