//! Supervised fine-tuning data, prepared exactly as TRL 1.16's `SFTTrainer` prepares it
//! (`_prepare_dataset`; checked token by token against TRL's own output in `tests/sft.rs`):
//!
//! * **plain text**: `{"text": ...}` (the column is `dataset_text_field`); EOS appended to the
//!   text when it does not end with it, then tokenised with the tokenizer's special tokens;
//! * **prompt–completion**: `{"prompt": ..., "completion": ...}`, strings (EOS appended to the
//!   completion) or message lists (the prompt rendered with the generation prompt, the whole
//!   conversation without); the completion starts where the two token lists diverge;
//! * **conversational**: `{"messages": [...]}`, rendered with the chat template.
//!
//! Each example is its token ids and, per token, whether it is a loss target: every token, or
//! only the completion's with `completion_only_loss` (default: on for prompt–completion data),
//! and only the assistant's with `assistant_only_loss` (the `{% generation %}` spans of the
//! chat template, as transformers' `return_assistant_tokens_mask`). Then truncation to
//! `max_length` (`keep_start` or `keep_end`), dropping examples left without a target; or, with
//! packing, best-fit-decreasing bins of at most `max_length` tokens (TRL's `bfd`).

use super::jsonl::Record;
use crate::data::TruncationMode;
use crate::error::{Error, Result};
use crate::tokenizer::{Message, TextTokenizer};
use serde_json::Value;
use std::path::Path;

/// One SFT example: its tokens and which of them the loss reads.
#[derive(Clone, Debug, PartialEq)]
pub struct SftExample {
    /// The line of the file it came from.
    pub line: usize,
    pub ids: Vec<u32>,
    /// `targets[i]`: token i is predicted with a loss (the first token never is: nothing
    /// predicts it).
    pub targets: Vec<bool>,
}

impl SftExample {
    /// Tokens the loss reads.
    pub fn num_targets(&self) -> usize {
        self.targets.iter().skip(1).filter(|&&t| t).count()
    }
}

/// How SFT rows become examples (TRL's `SFTConfig` names).
#[derive(Clone, Debug)]
pub struct SftOptions {
    pub dataset_text_field: String,
    /// `None`: on for prompt–completion data, as TRL.
    pub completion_only_loss: Option<bool>,
    pub assistant_only_loss: bool,
    /// 0: no limit.
    pub max_length: usize,
    pub truncation_mode: TruncationMode,
    /// Pack into bins instead of truncating (each sequence is cut to `max_length` first).
    pub packing: bool,
    /// Dataset columns read as prefer's fields: `(field, column)`.
    pub columns: Vec<(String, String)>,
}

/// The kind of an SFT file, from its first row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SftKind {
    Text,
    PromptCompletion,
    Messages,
}

fn messages(r: &Record, field: &str) -> Result<Vec<Message>> {
    let v = r.obj.get(field).ok_or_else(|| r.error(field, "missing"))?;
    serde_json::from_value(v.clone())
        .map_err(|e| r.error(field, format!("expected a list of {{role, content}} messages: {e}")))
}

fn is_list(r: &Record, field: &str) -> bool {
    matches!(r.obj.get(field), Some(Value::Array(_)))
}

/// Where two token lists stop agreeing (TRL's `common_prefix_length`).
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The kind of row `r`, or why it is none.
pub fn detect(r: &Record, text_field: &str) -> Result<SftKind> {
    if r.obj.contains_key("prompt") && r.obj.contains_key("completion") {
        Ok(SftKind::PromptCompletion)
    } else if r.obj.contains_key("messages") {
        Ok(SftKind::Messages)
    } else if r.obj.contains_key(text_field) {
        Ok(SftKind::Text)
    } else {
        Err(r.error(
            text_field,
            format!(
                "missing: an SFT row needs `{text_field}` (plain text; the column is dataset_text_field), \
                 `prompt` and `completion`, or `messages`"
            ),
        ))
    }
}

/// One row as an example (before truncation).
pub fn tokenize_row(r: &Record, kind: SftKind, tok: &TextTokenizer, opts: &SftOptions) -> Result<SftExample> {
    let completion_only = opts.completion_only_loss.unwrap_or(kind == SftKind::PromptCompletion);
    let eos = tok.eos_token.as_str();
    let (ids, mut targets, assistant) = match kind {
        SftKind::Text => {
            let mut text = r.string(&opts.dataset_text_field)?.to_string();
            if !text.ends_with(eos) {
                text.push_str(eos);
            }
            let ids = tok.encode(&text, true)?;
            let n = ids.len();
            (ids, vec![true; n], None)
        }
        SftKind::PromptCompletion if is_list(r, "prompt") => {
            let prompt = messages(r, "prompt")?;
            let mut all = prompt.clone();
            all.extend(messages(r, "completion")?);
            let p = tok.encode(&tok.apply_chat_template(&prompt, true)?, false)?;
            let (ids, assistant) = encode_chat(tok, &all, opts.assistant_only_loss, r)?;
            let start = common_prefix(&p, &ids);
            let n = ids.len();
            let t = (0..n).map(|i| !completion_only || i >= start).collect();
            (ids, t, assistant)
        }
        SftKind::PromptCompletion => {
            let prompt = r.string("prompt")?;
            let mut completion = r.string("completion")?.to_string();
            if !completion.ends_with(eos) {
                completion.push_str(eos);
            }
            let p = tok.encode(prompt, true)?;
            let ids = tok.encode(&format!("{prompt}{completion}"), true)?;
            let start = common_prefix(&p, &ids);
            let n = ids.len();
            let t = (0..n).map(|i| !completion_only || i >= start).collect();
            (ids, t, None)
        }
        SftKind::Messages => {
            let all = messages(r, "messages")?;
            let (ids, assistant) = encode_chat(tok, &all, opts.assistant_only_loss, r)?;
            let n = ids.len();
            (ids, vec![true; n], assistant)
        }
    };
    if let Some(a) = assistant {
        for (t, a) in targets.iter_mut().zip(a) {
            *t &= a;
        }
    }
    Ok(SftExample {
        line: r.line,
        ids,
        targets,
    })
}

/// The private-use characters that stand for `{% generation %}` / `{% endgeneration %}` while
/// a template renders (minijinja has no such tag).
const GEN_START: char = '\u{F8F0}';
const GEN_END: char = '\u{F8F1}';

/// A conversation's token ids, and with `assistant_only` which of them lie inside the chat
/// template's `{% generation %}` spans (transformers' `return_assistant_tokens_mask`).
fn encode_chat(
    tok: &TextTokenizer,
    msgs: &[Message],
    assistant_only: bool,
    r: &Record,
) -> Result<(Vec<u32>, Option<Vec<bool>>)> {
    if !assistant_only {
        return Ok((tok.encode(&tok.apply_chat_template(msgs, false)?, false)?, None));
    }
    let tpl = tok
        .chat_template
        .as_deref()
        .ok_or_else(|| r.error("messages", "assistant_only_loss needs a chat template"))?;
    let marked = generation_markers(tpl);
    if marked == tpl {
        return Err(r.error(
            "messages",
            "assistant_only_loss = true, but the chat template marks no assistant tokens: it lacks the \
             `{% generation %}` keyword (as TRL, which needs it too); use a template with it, or \
             completion_only_loss with prompt-completion data",
        ));
    }
    let text = crate::tokenizer::render_chat_template(&marked, msgs, false, tok.bos_token.as_deref(), &tok.eos_token)?;
    // the text without markers, and its byte ranges inside generation spans
    let mut clean = String::with_capacity(text.len());
    let mut spans = Vec::new();
    let mut open = None;
    for c in text.chars() {
        match c {
            GEN_START => open = Some(clean.len()),
            GEN_END => {
                if let Some(s) = open.take() {
                    spans.push((s, clean.len()));
                }
            }
            c => clean.push(c),
        }
    }
    let enc = tok
        .inner
        .encode(clean.as_str(), false)
        .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
    let mask: Vec<bool> = enc
        .get_offsets()
        .iter()
        .map(|&(s, e)| spans.iter().any(|&(a, b)| s < b && e > a && s >= a))
        .collect();
    if !mask.iter().any(|&m| m) {
        return Err(r.error(
            "messages",
            "assistant_only_loss = true, but this conversation has no assistant tokens (as TRL, an error)",
        ));
    }
    Ok((enc.get_ids().to_vec(), Some(mask)))
}

/// The template with `{% generation %}` / `{% endgeneration %}` (any whitespace and `-`
/// trimming) replaced by output of the marker characters.
fn generation_markers(tpl: &str) -> String {
    crate::tokenizer::replace_generation_tags(
        tpl,
        &format!("{{{{ '{GEN_START}' }}}}"),
        &format!("{{{{ '{GEN_END}' }}}}"),
    )
    .into_owned()
}

/// What loading an SFT file found.
#[derive(Debug, Default)]
pub struct SftReport {
    pub kind: Option<SftKind>,
    pub truncated: usize,
    /// Dropped: no loss target left after truncation.
    pub dropped: usize,
    pub skipped: Vec<String>,
}

/// Read and prepare an SFT file; with `skip_invalid`, bad rows are reported instead of
/// stopping at the first.
pub fn load_sft_examples(
    path: &Path,
    tok: &TextTokenizer,
    opts: &SftOptions,
    skip_invalid: bool,
) -> Result<(Vec<SftExample>, SftReport)> {
    let mut out = Vec::new();
    let mut report = SftReport::default();
    for rec in super::jsonl::read_records_renamed(path, &opts.columns)? {
        let one = rec.and_then(|r| {
            let kind = detect(&r, &opts.dataset_text_field)?;
            match report.kind {
                Some(k) if k != kind => {
                    return Err(r.error(
                        "prompt",
                        format!("this row is {kind:?} data but the file began with {k:?} rows; use one kind per file"),
                    ))
                }
                _ => report.kind = Some(kind),
            }
            tokenize_row(&r, kind, tok, opts)
        });
        match one {
            Ok(e) => out.push(e),
            Err(e) if skip_invalid => report.skipped.push(e.to_string()),
            Err(e) => return Err(e),
        }
    }
    if opts.packing {
        // packing cuts each sequence to max_length and keeps every one
        if opts.max_length > 0 {
            for e in &mut out {
                if e.ids.len() > opts.max_length {
                    report.truncated += 1;
                    e.ids.truncate(opts.max_length);
                    e.targets.truncate(opts.max_length);
                }
            }
        }
        out.retain(|e| !e.ids.is_empty());
        return Ok((out, report));
    }
    if opts.max_length > 0 {
        for e in &mut out {
            let n = e.ids.len();
            if n > opts.max_length {
                report.truncated += 1;
                let keep = match opts.truncation_mode {
                    TruncationMode::KeepStart => 0..opts.max_length,
                    TruncationMode::KeepEnd => n - opts.max_length..n,
                };
                e.ids = e.ids[keep.clone()].to_vec();
                e.targets = e.targets[keep].to_vec();
            }
        }
    }
    // TRL drops examples whose labels are all -100 (its labels include position 0's)
    let before = out.len();
    out.retain(|e| e.targets.iter().any(|&t| t));
    report.dropped = before - out.len();
    Ok((out, report))
}

/// TRL's best-fit-decreasing packing (`pack_dataset(strategy="bfd")`): per chunk of 1000
/// examples (the `datasets.map` batch TRL packs in), sequences sorted by length, longest first
/// (ties in file order), each put into the open bin whose free space fits it most tightly (the
/// oldest such bin), else a new bin of `max_length`. Returns the bins as example indices, in
/// TRL's order.
pub fn pack_bfd(lengths: &[usize], max_length: usize) -> Vec<Vec<usize>> {
    let mut all = Vec::new();
    for chunk_start in (0..lengths.len()).step_by(1000) {
        let end = (chunk_start + 1000).min(lengths.len());
        let mut order: Vec<usize> = (chunk_start..end).filter(|&i| lengths[i] > 0).collect();
        order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
        // bins: (ids, free space); by space, the bins in the order they reached it
        let mut bins: Vec<(Vec<usize>, usize)> = Vec::new();
        let mut by_space: std::collections::BTreeMap<usize, std::collections::VecDeque<usize>> = Default::default();
        for i in order {
            let len = lengths[i].min(max_length);
            let fit = by_space
                .range(len..)
                .next()
                .map(|(&s, _)| s)
                .filter(|&s| s < max_length);
            let b = match fit {
                Some(s) => {
                    let q = by_space.get_mut(&s).expect("listed");
                    let b = q.pop_front().expect("non-empty");
                    if q.is_empty() {
                        by_space.remove(&s);
                    }
                    b
                }
                None => {
                    bins.push((Vec::new(), max_length));
                    bins.len() - 1
                }
            };
            bins[b].0.push(i);
            bins[b].1 -= len;
            let space = bins[b].1;
            // a full bin is queued too (as TRL, whose segment tree never offers space 0)
            by_space.entry(space).or_default().push_back(b);
        }
        all.extend(bins.into_iter().map(|(ids, _)| ids));
    }
    all
}
