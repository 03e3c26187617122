//! Preference pairs in the three accepted shapes, auto-detected:
//!
//! * **standard**: `{"prompt": str, "chosen": str, "rejected": str}`
//! * **conversational** (TRL): `prompt`, `chosen`, `rejected` as lists of `{role, content}`
//!   messages, rendered with the model's chat template exactly as TRL's
//!   `maybe_apply_chat_template` does;
//! * **hh** (Anthropic HH transcripts): only `chosen` and `rejected`; the prompt is their shared
//!   prefix through the last `"\n\nAssistant:"`.

use super::jsonl::{kind, Record};
use crate::error::Result;
use crate::tokenizer::{Message, TextTokenizer};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    Standard,
    Conversational,
    Hh,
}

impl std::fmt::Display for DataFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataFormat::Standard => "standard (prompt/chosen/rejected strings)",
            DataFormat::Conversational => "conversational (lists of {role, content} messages)",
            DataFormat::Hh => "Anthropic HH transcripts (chosen/rejected only)",
        })
    }
}

pub const HH_ASSISTANT: &str = "\n\nAssistant:";

/// A pair as text: the prompt and the two completions (before EOS is appended).
#[derive(Clone, Debug, PartialEq)]
pub struct TextPair {
    pub line: usize,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// Which shape a record has, from its fields.
pub fn detect_format(r: &Record) -> Result<DataFormat> {
    match (r.obj.get("prompt"), r.obj.get("chosen"), r.obj.get("rejected")) {
        (Some(Value::Array(_)), _, _) => Ok(DataFormat::Conversational),
        (Some(Value::String(_)), _, _) => Ok(DataFormat::Standard),
        (Some(other), _, _) => Err(r.error(
            "prompt",
            format!("expected a string or a list of messages, found {}", kind(other)),
        )),
        (None, Some(_), Some(_)) => Ok(DataFormat::Hh),
        (None, None, _) => Err(r.error("chosen", "missing (a preference pair needs `chosen` and `rejected`)")),
        (None, Some(_), None) => Err(r.error("rejected", "missing (a preference pair needs `chosen` and `rejected`)")),
    }
}

fn messages(r: &Record, field: &str) -> Result<Vec<Message>> {
    let v = r.obj.get(field).ok_or_else(|| r.error(field, "missing"))?;
    let arr = v.as_array().ok_or_else(|| {
        r.error(
            field,
            format!("expected a list of {{role, content}} messages, found {}", kind(v)),
        )
    })?;
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(role), Some(content)) => Ok(Message {
                    role: role.into(),
                    content: content.into(),
                }),
                _ => Err(r.error(&format!("{field}[{i}]"), "expected {\"role\": str, \"content\": str}")),
            }
        })
        .collect()
}

/// Parse one record of the given format into text. `tok` renders conversational data.
pub fn parse_pair(r: &Record, format: DataFormat, tok: Option<&TextTokenizer>) -> Result<TextPair> {
    let pair = match format {
        DataFormat::Standard => TextPair {
            line: r.line,
            prompt: r.string("prompt")?.to_string(),
            chosen: r.string("chosen")?.to_string(),
            rejected: r.string("rejected")?.to_string(),
        },
        DataFormat::Hh => {
            let chosen = r.string("chosen")?;
            let rejected = r.string("rejected")?;
            let cut = chosen.rfind(HH_ASSISTANT).ok_or_else(|| {
                r.error(
                    "chosen",
                    "no \"\\n\\nAssistant:\" turn, so the prompt cannot be split off",
                )
            })? + HH_ASSISTANT.len();
            let prompt = &chosen[..cut];
            if !rejected.starts_with(prompt) {
                return Err(r.error(
                    "rejected",
                    "does not share the prompt with `chosen` (their text differs before the last \"\\n\\nAssistant:\" of `chosen`)",
                ));
            }
            TextPair {
                line: r.line,
                prompt: prompt.to_string(),
                chosen: chosen[cut..].to_string(),
                rejected: rejected[cut..].to_string(),
            }
        }
        DataFormat::Conversational => {
            let tok = tok.ok_or_else(|| {
                r.error(
                    "prompt",
                    "conversational data needs a model's chat template (pass --model)",
                )
            })?;
            let prompt = messages(r, "prompt")?;
            let prompt_text = tok
                .apply_chat_template(&prompt, true)
                .map_err(|e| r.error("prompt", e.to_string()))?;
            let complete = |field: &str| -> Result<String> {
                let mut all = prompt.clone();
                all.extend(messages(r, field)?);
                let text = tok
                    .apply_chat_template(&all, false)
                    .map_err(|e| r.error(field, e.to_string()))?;
                text.strip_prefix(prompt_text.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        r.error(
                            field,
                            "the chat template renders prompt+completion with a different prefix than the prompt alone",
                        )
                    })
            };
            TextPair {
                line: r.line,
                chosen: complete("chosen")?,
                rejected: complete("rejected")?,
                prompt: prompt_text,
            }
        }
    };
    for (field, text) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
        if text.trim().is_empty() {
            return Err(r.error(field, "empty completion"));
        }
    }
    Ok(pair)
}
