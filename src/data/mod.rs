//! The data layer: JSONL readers with file:line:field errors, the preference formats
//! (standard, TRL conversational, Anthropic HH transcripts), TRL-exact tokenisation and
//! truncation, and batching into scored sequences.

pub mod convert;
pub mod examples;
pub mod jsonl;
pub mod prompts;
pub mod sft;
pub mod synthetic;
pub mod tables;
pub mod tokenize;

pub use examples::{DataFormat, ExampleMeta, Shape, TextExample};
pub use tokenize::{load_tokenized_examples, LoadReport, TokenizeOptions, TokenizedExample, TruncationMode};
