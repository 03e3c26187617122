//! Prompt-only data (what online methods and `prefer generate` read): JSONL rows whose
//! `prompt` is a string (used as is) or a list of `{role, content}` messages (rendered with the
//! chat template, generation prompt added), plus any other columns, kept for reward functions
//! (e.g. GSM8K's `answer`). Errors name the file, line and field.

use super::jsonl::read_records;
use crate::error::{Error, Result};
use crate::tokenizer::{Message, TextTokenizer};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// One prompt, rendered and tokenised.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    /// 1-based line in the source file.
    pub line: usize,
    /// The prompt text the model continues (after the chat template, for messages).
    pub text: String,
    pub ids: Vec<u32>,
    /// The row's other columns.
    pub columns: Map<String, Value>,
}

/// Read and tokenise every prompt of `path`. With `max_length`, a prompt that leaves fewer than
/// `min_room` tokens of it for the completion is an error naming its line.
pub fn load_prompts(
    path: &Path,
    tok: &TextTokenizer,
    max_length: Option<usize>,
    min_room: usize,
) -> Result<Vec<Prompt>> {
    let mut out = Vec::new();
    for rec in read_records(path)? {
        let mut rec = rec?;
        let line = rec.line;
        let err = |msg: String| Error::Data {
            path: PathBuf::from(path),
            line,
            field: "prompt".into(),
            msg,
        };
        let text = match rec.obj.remove("prompt") {
            None => {
                return Err(err(
                    "missing: each row needs a `prompt` (a string or a list of {role, content} messages)".into(),
                ))
            }
            Some(Value::String(s)) => s,
            Some(v @ Value::Array(_)) => {
                let msgs: Vec<Message> = serde_json::from_value(v)
                    .map_err(|e| err(format!("expected a list of {{role, content}} messages: {e}")))?;
                tok.apply_chat_template(&msgs, true)?
            }
            Some(other) => return Err(err(format!("expected a string or a list of messages, found {other}"))),
        };
        if text.trim().is_empty() {
            return Err(err("empty prompt".into()));
        }
        let ids = tok.encode(&text, true)?;
        if ids.is_empty() {
            return Err(err("the prompt tokenises to nothing".into()));
        }
        if let Some(max) = max_length {
            if ids.len() + min_room > max {
                return Err(err(format!(
                    "{} tokens leave no room for a completion of {min_room} within {max}",
                    ids.len()
                )));
            }
        }
        out.push(Prompt {
            line,
            text,
            ids,
            columns: rec.obj,
        });
    }
    if out.is_empty() {
        return Err(Error::Data {
            path: PathBuf::from(path),
            line: 0,
            field: "prompt".into(),
            msg: "no prompts in the file".into(),
        });
    }
    Ok(out)
}
