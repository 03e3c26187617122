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

/// Where the prompt is in a row, and how it is rendered.
#[derive(Clone, Debug)]
pub struct PromptField {
    /// The column holding the prompt (`prompt`; GSM8K's is `question`).
    pub name: String,
    /// Render a string prompt as the user turn of the chat template (messages always are).
    pub chat: bool,
}

impl Default for PromptField {
    fn default() -> Self {
        PromptField {
            name: "prompt".into(),
            chat: false,
        }
    }
}

/// Read and tokenise every prompt of `path`. With `max_length`, a prompt that leaves fewer than
/// `min_room` tokens of it for the completion is an error naming its line.
pub fn load_prompts(
    path: &Path,
    tok: &TextTokenizer,
    field: &PromptField,
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
            field: field.name.clone(),
            msg,
        };
        let text = match rec.obj.remove(&field.name) {
            None => {
                return Err(err(format!(
                    "missing: each row needs a `{}` (a string or a list of {{role, content}} messages)",
                    field.name
                )))
            }
            Some(Value::String(s)) if field.chat => tok.apply_chat_template(
                &[Message {
                    role: "user".into(),
                    content: s,
                }],
                true,
            )?,
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
            field: field.name.clone(),
            msg: "no prompts in the file".into(),
        });
    }
    Ok(out)
}
