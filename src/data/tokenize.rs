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

use super::jsonl::{read_records, Record};
use super::pairs::{detect_format, parse_pair, DataFormat, TextPair};
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
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions {
            max_length: Some(1024),
            max_prompt_length: Some(512),
            truncation_mode: TruncationMode::KeepEnd,
        }
    }
}

/// A tokenised pair: sequences are `prompt_ids + chosen_ids` and `prompt_ids + rejected_ids`.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizedPair {
    /// 1-based line in the source file.
    pub line: usize,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    pub prompt_truncated: bool,
    pub completion_truncated: bool,
}

impl TokenizedPair {
    /// Real (non-pad) tokens of the two sequences together.
    pub fn num_tokens(&self) -> usize {
        2 * self.prompt_ids.len() + self.chosen_ids.len() + self.rejected_ids.len()
    }
}

/// What loading a file found.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub path: PathBuf,
    pub format: Option<DataFormat>,
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

/// Tokenise one text pair (see the module docs for the exact rules).
pub fn tokenize_pair(p: &TextPair, tok: &TextTokenizer, opts: &TokenizeOptions, path: &Path) -> Result<TokenizedPair> {
    let mut prompt_ids = tok.encode(&p.prompt, true)?;
    let completion = |field: &str, text: &str| -> Result<Vec<u32>> {
        let full = tok.encode(&format!("{}{}{}", p.prompt, text, tok.eos_token), true)?;
        if full.len() <= prompt_ids.len() || full[..prompt_ids.len()] != prompt_ids[..] {
            return Err(data_err(
                path,
                p.line,
                field,
                "tokenising prompt + completion does not start with the prompt's tokens (a token merges across the boundary); end the prompt with whitespace or punctuation",
            ));
        }
        Ok(full[prompt_ids.len()..].to_vec())
    };
    let mut chosen_ids = completion("chosen", &p.chosen)?;
    let mut rejected_ids = completion("rejected", &p.rejected)?;
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
        for ids in [&mut chosen_ids, &mut rejected_ids] {
            if ids.len() > room {
                ids.truncate(room);
                completion_truncated = true;
            }
        }
    }
    Ok(TokenizedPair {
        line: p.line,
        prompt_ids,
        chosen_ids,
        rejected_ids,
        prompt_truncated,
        completion_truncated,
    })
}

/// Read a preference file as text pairs. With `skip_invalid`, bad rows are reported in the
/// returned report and skipped; without it, the first bad row is the error.
pub fn load_text_pairs(
    path: &Path,
    tok: Option<&TextTokenizer>,
    skip_invalid: bool,
) -> Result<(Vec<TextPair>, LoadReport)> {
    let mut report = LoadReport {
        path: path.to_path_buf(),
        ..Default::default()
    };
    let mut out = Vec::new();
    for rec in read_records(path)? {
        report.records += 1;
        let parsed = rec.and_then(|r: Record| {
            let f = detect_format(&r)?;
            match report.format {
                None => report.format = Some(f),
                Some(ff) if ff != f => {
                    return Err(r.error(
                        "<line>",
                        format!("this row is {f}, but earlier rows are {ff}; one file holds one format"),
                    ))
                }
                _ => {}
            }
            parse_pair(&r, f, tok)
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
pub fn load_tokenized_pairs(
    path: &Path,
    tok: &TextTokenizer,
    opts: &TokenizeOptions,
    skip_invalid: bool,
) -> Result<(Vec<TokenizedPair>, LoadReport)> {
    let (pairs, mut report) = load_text_pairs(path, Some(tok), skip_invalid)?;
    let mut out = Vec::with_capacity(pairs.len());
    for p in &pairs {
        match tokenize_pair(p, tok, opts, path) {
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
