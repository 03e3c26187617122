//! prefer: align language models with preferences.
//!
//! Layers (see DESIGN.md), top to bottom: `train` (the loop) → `objectives` (pure functions of
//! sequence statistics) → `data` (readers, validation, tokenisation) → `model` (transformer,
//! loaders, log-probs) → candle.

#[macro_use]
mod macros;

pub mod algorithms;
pub mod batch;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod factors;
pub mod model;
pub mod objectives;
pub mod optim;
pub mod pal;
pub mod plot;
pub mod stats;
pub mod sweep;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokenizer;
pub mod train;
pub mod util;

pub use error::{Error, Result};
