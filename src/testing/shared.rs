//! Where the shared data and the real model live on this machine (tests, examples and the
//! `hf_fixtures` example only; user-facing commands never look there by themselves).

use std::path::PathBuf;

/// The `shared/` folder beside the checkout (`../shared`), or `$PREFER_SHARED`.
pub fn shared_dir() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PREFER_SHARED") {
        return Some(PathBuf::from(p));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let p = root.join("../shared");
    p.is_dir().then_some(p)
}

pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The SmolLM2-135M-Instruct GGUF: `$PREFER_SMOLLM2`, `../shared/models/...`, or `models/`
/// (where `scripts/fetch-model.sh` puts it).
pub fn smollm2_gguf() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PREFER_SMOLLM2") {
        return Some(PathBuf::from(p));
    }
    let mut cands = vec![];
    if let Some(s) = shared_dir() {
        cands.push(s.join("models/smollm2-135m-instruct-q4_1").join(SMOLLM2_FILE));
    }
    cands.push(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(SMOLLM2_FILE),
    );
    cands.into_iter().find(|p| p.is_file())
}
