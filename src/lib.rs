//! prefer: align language models with preferences.
//!
//! The folders follow the pipeline (ARCHITECTURE.md has a paragraph on each): `data` (readers,
//! formats, tokenisation) → `batch` (collation) → `model` (architectures, kernels, loaders) →
//! `stats` (sequence statistics, reference log-probs) → `objectives` (pure functions of the
//! statistics, the registry) → `algorithms` (what a training step computes) → `train` (the
//! trainer core) → the CLI (`src/cli/`, in the binary). Beside them: `sample` (drawing
//! completions with a KV cache), `config`, `optim`, `eval`, `pal`, `sweep`, `plot`, `tokenizer`,
//! `util`.

#[macro_use]
mod macros;

pub mod algorithms;
pub mod batch;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod model;
pub mod objectives;
pub mod optim;
pub mod pal;
pub mod plot;
pub mod rewards;
pub mod sample;
pub mod stats;
pub mod sweep;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokenizer;
pub mod train;
pub mod util;

pub use error::{Error, Result};
