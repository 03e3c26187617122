//! `prefer convert`: a GGUF (or any loadable model) to an HF checkpoint directory; and
//! `prefer merge`: a base with a LoRA adapter merged into its weights, as a full HF checkpoint.

use super::*;

#[derive(clap::Args)]
pub struct ConvertArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter (a PEFT directory: adapter_config.json + adapter_model.safetensors) to
    /// put on --model. A PEFT directory given as --model itself loads the base it names.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The HF checkpoint directory to write (adapters merged into the weights).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let ConvertArgs { model, adapter, out } = args;
    let m = model::load::load_with_adapter(&model, adapter.as_deref(), DType::F32, &Device::Cpu)?;
    write_merged(m, &out)
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The base model: an HF directory or a .gguf file (default: the adapter's
    /// base_model_name_or_path).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// The LoRA adapter: a PEFT directory (a run's output_dir or checkpoint with use_peft).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The HF checkpoint directory to write.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run_merge(args: MergeArgs) -> Result<()> {
    let MergeArgs { base, adapter, out } = args;
    let base = match base {
        Some(b) => b,
        None => model::load::adapter_base(&adapter)?,
    };
    let m = model::load::load_with_adapter(&base, Some(&adapter), DType::F32, &Device::Cpu)?;
    write_merged(m, &out)
}

/// `m` as a full HF checkpoint in `out`: dequantised, with any adapter merged (f32).
fn write_merged(m: model::LoadedModel, out: &Path) -> Result<()> {
    let merged = m.transformer.adapters().is_some();
    let m = model::LoadedModel {
        transformer: m.transformer.merged()?,
        ..m
    };
    model::hf::save_dir(&m, out)?;
    match merged {
        true => eprintln!("wrote {} (HF layout, f32, adapter merged)", out.display()),
        false => eprintln!("wrote {} (HF layout, f32)", out.display()),
    }
    Ok(())
}
