//! prefer: align language models with preferences.
//!
//! Layers (see DESIGN.md), top to bottom: `train` (the loop) → `objectives` (pure functions of
//! sequence statistics) → `data` (readers, validation, tokenisation) → `model` (transformer,
//! loaders, log-probs) → candle.

pub mod bench;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod factors;
pub mod model;
pub mod objectives;
pub mod pal;
pub mod paths;
pub mod plot;
pub mod stats;
pub mod sweep;
pub mod testing;
pub mod tokenizer;
pub mod train;
pub mod util;

pub use error::{Error, Result};
