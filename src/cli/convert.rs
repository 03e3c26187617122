//! `prefer convert`: a GGUF (or any loadable model) to an HF checkpoint directory; and
//! `prefer merge`: a base with a LoRA adapter merged into its weights, as a full HF checkpoint.

use super::*;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The model to convert: a .gguf file, or any model prefer loads.
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

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The model: an HF directory, a .gguf file, or a PEFT adapter directory (merged on its base).
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter (PEFT directory) to merge into --model first.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The .gguf file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// How matrices are stored: f32 | f16 | bf16 | q8_0 | q5_1 | q5_0 | q4_1 | q4_0 | q6_k |
    /// q5_k_m | q4_k_m (llama-quantize's mixes; norms stay f32).
    #[arg(long, default_value = "q8_0")]
    pub quant: String,
}

pub fn run_export(args: ExportArgs) -> Result<()> {
    let quant = model::gguf::ExportQuant::parse(&args.quant).map_err(|e| anyhow::anyhow!("--quant: {e}"))?;
    let m = model::load::load_with_adapter(&args.model, args.adapter.as_deref(), DType::F32, &Device::Cpu)?;
    model::gguf::save_gguf(&m, &args.out, quant)?;
    let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({}, {:.1} MiB){}",
        args.out.display(),
        args.quant,
        bytes as f64 / 1048576.0,
        if m.transformer.adapters().is_some() {
            ", adapter merged"
        } else {
            ""
        }
    );
    Ok(())
}
