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

/// Split `rows` into (train, held out): `fraction` of them (rounded, at least one, never all),
/// chosen by a seeded shuffle; both keep the rows' file order. `what` names the data in the
/// error when there are too few rows to split.
pub fn hold_out<T>(rows: Vec<T>, fraction: f64, seed: u64, what: &str) -> crate::error::Result<(Vec<T>, Vec<T>)> {
    let n = rows.len();
    if n < 2 {
        return Err(crate::error::Error::Config(format!(
            "{what}: eval_fraction needs at least 2 rows to hold some out, found {n}"
        )));
    }
    let k = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    // a stream of its own, so the held-out rows do not depend on how the data order is drawn
    crate::util::Rng::new(seed ^ 0x6865_6c64_5f6f_7574).shuffle(&mut order);
    let mut held = vec![false; n];
    for &i in &order[..k] {
        held[i] = true;
    }
    let (mut train, mut eval) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (r, h) in rows.into_iter().zip(held) {
        if h {
            eval.push(r)
        } else {
            train.push(r)
        }
    }
    Ok((train, eval))
}
