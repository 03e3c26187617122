//! Tokenisation exactly as TRL's DPOTrainer does it, so numbers are comparable:
//!
//! * the tokenizer's EOS *text* is appended to chosen and rejected;
//! * prompt ids = `tokenizer(prompt)` (the post-processor adds BOS if the tokenizer has one);
//! * completion ids = `tokenizer(prompt + completion + eos)` with the prompt ids removed from
//!   the front; if the joint tokenisation does not start with the prompt ids (a token merged
//!   across the boundary) the pair is rejected with a clear error instead of being mis-masked;
//! * EOS is scored; prompt and BOS are not.
//!
//! Truncation (TRL's meaning): a prompt longer than `max_prompt_length` keeps its end
//! (`keep_end`, the default) or its start (`keep_start`); then completions are cut so that
//! prompt + completion fits `max_length`. A prompt that leaves no room for any completion token
//! is an error ("prompt longer than the limit").

use super::examples::{detect, parse_example, DataFormat, ExampleMeta, Shape, TextExample};
use super::jsonl::Record;
use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    #[default]
    KeepEnd,
    KeepStart,
}

#[derive(Clone, Debug)]
pub struct TokenizeOptions {
    pub max_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
    pub truncation_mode: TruncationMode,
    /// Dataset columns read as prefer's fields: `(field, column)` (`columns` in the config).
    pub columns: Vec<(String, String)>,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions {
            max_length: Some(1024),
            max_prompt_length: Some(512),
            truncation_mode: TruncationMode::KeepEnd,
            columns: Vec::new(),
        }
    }
}

/// A tokenised example: its sequences are `prompt_ids + responses[k]` (pairwise:
/// `[chosen, rejected]`; ranked: best first; unpaired: `[completion]`).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizedExample {
    /// 1-based line in the source file.
    pub line: usize,
    pub prompt_ids: Vec<u32>,
    pub responses: Vec<Vec<u32>>,
    pub meta: ExampleMeta,
    pub prompt_truncated: bool,
    pub completion_truncated: bool,
}

impl TokenizedExample {
    pub fn chosen_ids(&self) -> &[u32] {
        &self.responses[0]
    }
    pub fn rejected_ids(&self) -> &[u32] {
        &self.responses[1]
    }
    /// Real (non-pad) tokens of all its sequences together.
    pub fn num_tokens(&self) -> usize {
        self.responses.iter().map(|r| self.prompt_ids.len() + r.len()).sum()
    }
}

/// What loading a file found.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub path: PathBuf,
    pub format: Option<DataFormat>,
    pub shape: Option<Shape>,
    pub records: usize,
    pub kept: usize,
    pub prompts_truncated: usize,
    pub completions_truncated: usize,
    /// Rows reported and skipped (only with `skip_invalid`).
    pub skipped: Vec<Error>,
}

fn data_err(path: &Path, line: usize, field: &str, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        field: field.into(),
        msg: msg.into(),
    }
}

/// Tokenise one text example (see the module docs for the exact rules).
pub fn tokenize_example(
    p: &TextExample,
    tok: &TextTokenizer,
    opts: &TokenizeOptions,
    path: &Path,
) -> Result<TokenizedExample> {
    let mut prompt_ids = tok.encode(&p.prompt, true)?;
    let field = |k: usize| match (p.meta.shape, k) {
        (Shape::Pairwise, 0) => "chosen".to_string(),
        (Shape::Pairwise, _) => "rejected".to_string(),
        (Shape::Unpaired, _) => "completion".to_string(),
        (Shape::Ranked, k) => format!("responses[{k}]"),
    };
    let mut responses = Vec::with_capacity(p.responses.len());
    for (k, text) in p.responses.iter().enumerate() {
        let full = tok.encode(&format!("{}{}{}", p.prompt, text, tok.eos_token), true)?;
        if full.len() <= prompt_ids.len() || full[..prompt_ids.len()] != prompt_ids[..] {
            return Err(data_err(
                path,
                p.line,
                &field(k),
                "tokenising prompt + completion does not start with the prompt's tokens (a token merges across the boundary); end the prompt with whitespace or punctuation",
            ));
        }
        responses.push(full[prompt_ids.len()..].to_vec());
    }
    let mut prompt_truncated = false;
    if let Some(mp) = opts.max_prompt_length {
        if prompt_ids.len() > mp {
            prompt_truncated = true;
            prompt_ids = match opts.truncation_mode {
                TruncationMode::KeepEnd => prompt_ids[prompt_ids.len() - mp..].to_vec(),
                TruncationMode::KeepStart => prompt_ids[..mp].to_vec(),
            };
        }
    }
    let mut completion_truncated = false;
    if let Some(ml) = opts.max_length {
        if prompt_ids.len() >= ml {
            return Err(data_err(
                path,
                p.line,
                "prompt",
                format!(
                    "prompt is {} tokens, which leaves no room for the completion within max_length = {ml}; raise max_length or set max_prompt_length",
                    prompt_ids.len()
                ),
            ));
        }
        let room = ml - prompt_ids.len();
        for ids in responses.iter_mut() {
            if ids.len() > room {
                ids.truncate(room);
                completion_truncated = true;
            }
        }
    }
    Ok(TokenizedExample {
        line: p.line,
        prompt_ids,
        responses,
        meta: p.meta.clone(),
        prompt_truncated,
        completion_truncated,
    })
}

/// Read a preference file as text examples. With `skip_invalid`, bad rows are reported in the
/// returned report and skipped; without it, the first bad row is the error.
pub fn load_text_examples(
    path: &Path,
    tok: Option<&TextTokenizer>,
    skip_invalid: bool,
) -> Result<(Vec<TextExample>, LoadReport)> {
    load_text_examples_renamed(path, tok, skip_invalid, &[])
}

/// [`load_text_examples`] reading the dataset's `column` as prefer's `field` for each
/// `(field, column)` of `columns`.
pub fn load_text_examples_renamed(
    path: &Path,
    tok: Option<&TextTokenizer>,
    skip_invalid: bool,
    columns: &[(String, String)],
) -> Result<(Vec<TextExample>, LoadReport)> {
    let mut report = LoadReport {
        path: path.to_path_buf(),
        ..Default::default()
    };
    let mut out = Vec::new();
    for rec in super::jsonl::read_records_renamed(path, columns)? {
        report.records += 1;
        let parsed = rec.and_then(|r: Record| {
            let (shape, f) = detect(&r)?;
            match (report.shape, report.format) {
                (None, _) => {
                    report.shape = Some(shape);
                    report.format = Some(f);
                }
                (Some(s0), Some(f0)) if s0 != shape || f0 != f => {
                    return Err(r.error(
                        "<line>",
                        format!(
                        "this row is {shape} {f}, but earlier rows are {s0} {f0}; one file holds one shape and format"
                    ),
                    ))
                }
                _ => {}
            }
            parse_example(&r, shape, f, tok)
        });
        match parsed {
            Ok(p) => out.push(p),
            Err(e) if skip_invalid => report.skipped.push(e),
            Err(e) => return Err(e),
        }
    }
    if out.is_empty() && report.skipped.is_empty() {
        return Err(Error::msg(format!(
            "{}: no preference pairs in the file",
            path.display()
        )));
    }
    report.kept = out.len();
    Ok((out, report))
}

/// Read and tokenise a preference file.
pub fn load_tokenized_examples(
    path: &Path,
    tok: &TextTokenizer,
    opts: &TokenizeOptions,
    skip_invalid: bool,
) -> Result<(Vec<TokenizedExample>, LoadReport)> {
    let (pairs, mut report) = load_text_examples_renamed(path, Some(tok), skip_invalid, &opts.columns)?;
    let mut out = Vec::with_capacity(pairs.len());
    for p in &pairs {
        match tokenize_example(p, tok, opts, path) {
            Ok(t) => {
                report.prompts_truncated += t.prompt_truncated as usize;
                report.completions_truncated += t.completion_truncated as usize;
                out.push(t)
            }
            Err(e) if skip_invalid => report.skipped.push(e),
            Err(e) => return Err(e),
        }
    }
    report.kept = out.len();
    if out.is_empty() {
        return Err(Error::msg(format!(
            "{}: no usable preference pairs ({} rows skipped; first problem: {})",
            path.display(),
            report.skipped.len(),
            report.skipped.first().map(|e| e.to_string()).unwrap_or_default()
        )));
    }
    Ok((out, report))
}
