//! The data layer: JSONL readers with file:line:field errors, the preference formats
//! (standard, TRL conversational, Anthropic HH transcripts), TRL-exact tokenisation and
//! truncation, and batching into scored sequences.

pub mod jsonl;
pub mod pairs;
pub mod synthetic;
pub mod tokenize;

pub use pairs::{DataFormat, TextPair};
pub use tokenize::{load_tokenized_pairs, LoadReport, TokenizeOptions, TokenizedPair, TruncationMode};
