//! A randomly initialised Llama of a chosen size, written as a quantised GGUF the way
//! llama.cpp's converter writes one (the tiny byte-level tokenizer of `prefer::testing`): for
//! measuring how LoRA training's memory grows with model size when no larger real model is at
//! hand.
//!
//! cargo run --release --example synthetic_llama -- --hidden 2048 --layers 16 --intermediate 8192 \
//!     --heads 32 --kv-heads 8 --quant q4_1 --out target/llama-1b-q4_1.gguf

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use prefer::testing::{tiny_model, write_gguf, TinySpec};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let num = |name: &str, default: usize| -> usize {
        arg(name, &default.to_string())
            .parse()
            .unwrap_or_else(|_| panic!("{name}: expected a whole number"))
    };
    let spec = TinySpec {
        hidden: num("--hidden", 2048),
        layers: num("--layers", 16),
        heads: num("--heads", 32),
        kv_heads: num("--kv-heads", 8),
        intermediate: num("--intermediate", 8192),
        ..TinySpec::default()
    };
    let quant = match arg("--quant", "q4_1").as_str() {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q8_0" => GgmlDType::Q8_0,
        "f16" => GgmlDType::F16,
        "f32" => GgmlDType::F32,
        q => panic!("--quant {q}: use q4_0, q4_1, q8_0, f16 or f32"),
    };
    let out = std::path::PathBuf::from(arg("--out", "target/synthetic-llama.gguf"));
    let m = tiny_model(&spec, DType::F32, 1).expect("random model");
    let params = m.transformer.cfg.num_params();
    write_gguf(&m, &out, quant).expect("write the GGUF");
    let bytes = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!(
        "{}: {:.2} B parameters ({spec:?}), {:.2} GiB as {quant:?}",
        out.display(),
        params as f64 / 1e9,
        bytes as f64 / (1u64 << 30) as f64
    );
}
