//! Preference examples as text, in every accepted data shape and text format, auto-detected
//! from the fields of each JSONL row.
//!
//! Shapes:
//! * **pairwise**: `chosen`, `rejected` (+ optional `chosen_score`/`rejected_score`,
//!   `preference_strength` in [0, 1], `annotator`);
//! * **ranked** lists: `responses` with `ranks` (0 = best, as OpenAssistant) or `scores`
//!   (higher = better);
//! * **unpaired**: `completion` with a boolean `label` (desirable or not).
//!
//! Text formats:
//! * **standard**: `prompt` and the completions are strings;
//! * **conversational** (TRL): lists of `{role, content}` messages, rendered with the model's
//!   chat template exactly as TRL's `maybe_apply_chat_template` does;
//! * **hh** (Anthropic HH transcripts, pairwise only): `chosen` and `rejected` without a
//!   prompt; the prompt is their shared prefix through the last `"\n\nAssistant:"`.

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
            DataFormat::Standard => "standard (strings)",
            DataFormat::Conversational => "conversational (lists of {role, content} messages)",
            DataFormat::Hh => "Anthropic HH transcripts (chosen/rejected only)",
        })
    }
}

/// The data shape of an example; each objective declares the one it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Pairwise,
    Ranked,
    Unpaired,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Shape::Pairwise => "pairwise",
            Shape::Ranked => "ranked",
            Shape::Unpaired => "unpaired",
        })
    }
}

pub const HH_ASSISTANT: &str = "\n\nAssistant:";

/// What an example carries besides its texts.
#[derive(Clone, Debug, PartialEq)]
pub struct ExampleMeta {
    pub shape: Shape,
    /// Unpaired: is the completion desirable?
    pub label: Option<bool>,
    /// One score per response, higher = better: pair scores, list scores, or for ranks the
    /// graded label K − 1 − rank.
    pub scores: Option<Vec<f64>>,
    /// Whether `scores` were derived from ranks (no reward-model scale).
    pub scores_from_ranks: bool,
    /// Pairwise soft label: probability that chosen is preferred, in [0, 1].
    pub strength: Option<f64>,
    /// Pairwise: a reward margin for reward-model training (TRL's `margin` column).
    pub margin: Option<f64>,
    pub annotator: Option<String>,
}

impl ExampleMeta {
    /// A shape with no label, scores, strength or annotator.
    pub fn new(shape: Shape) -> Self {
        ExampleMeta {
            shape,
            label: None,
            scores: None,
            scores_from_ranks: false,
            strength: None,
            margin: None,
            annotator: None,
        }
    }
}

/// An example as text: the prompt and its responses (before EOS is appended). Pairwise:
/// `[chosen, rejected]`; ranked: best first; unpaired: `[completion]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TextExample {
    pub line: usize,
    pub prompt: String,
    pub responses: Vec<String>,
    pub meta: ExampleMeta,
}

impl TextExample {
    pub fn chosen(&self) -> &str {
        &self.responses[0]
    }
    pub fn rejected(&self) -> &str {
        &self.responses[1]
    }
}

/// The shape and text format of a record, from its fields.
pub fn detect(r: &Record) -> Result<(Shape, DataFormat)> {
    let shape =
        if r.obj.contains_key("responses") {
            Shape::Ranked
        } else if r.obj.contains_key("completion") {
            Shape::Unpaired
        } else {
            match (r.obj.get("chosen"), r.obj.get("rejected")) {
                (Some(_), Some(_)) => Shape::Pairwise,
                (None, _) => return Err(r.error(
                    "chosen",
                    "missing (a row needs chosen/rejected, responses with ranks or scores, or completion with label)",
                )),
                (Some(_), None) => {
                    return Err(r.error("rejected", "missing (a preference pair needs `chosen` and `rejected`)"))
                }
            }
        };
    let format = match r.obj.get("prompt") {
        Some(Value::Array(_)) => DataFormat::Conversational,
        Some(Value::String(_)) => DataFormat::Standard,
        Some(other) => {
            return Err(r.error(
                "prompt",
                format!("expected a string or a list of messages, found {}", kind(other)),
            ))
        }
        None if shape == Shape::Pairwise => DataFormat::Hh,
        None => return Err(r.error("prompt", "missing")),
    };
    Ok((shape, format))
}

fn messages_of(r: &Record, field: &str, v: &Value) -> Result<Vec<Message>> {
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

fn number(r: &Record, field: &str) -> Result<Option<f64>> {
    match r.obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| r.error(field, format!("expected a number, found {}", kind(v)))),
    }
}

/// The raw response values of a record, with the field name of each (for errors).
fn response_values(r: &Record, shape: Shape) -> Result<Vec<(String, Value)>> {
    Ok(match shape {
        Shape::Pairwise => ["chosen", "rejected"]
            .iter()
            .map(|f| (f.to_string(), r.obj.get(*f).cloned().unwrap_or(Value::Null)))
            .collect(),
        Shape::Unpaired => vec![(
            "completion".into(),
            r.obj.get("completion").cloned().unwrap_or(Value::Null),
        )],
        Shape::Ranked => {
            let v = &r.obj["responses"];
            let arr = v
                .as_array()
                .ok_or_else(|| r.error("responses", format!("expected a list, found {}", kind(v))))?;
            if arr.len() < 2 {
                return Err(r.error(
                    "responses",
                    format!("a ranked list needs at least 2 responses, found {}", arr.len()),
                ));
            }
            arr.iter()
                .enumerate()
                .map(|(i, x)| (format!("responses[{i}]"), x.clone()))
                .collect()
        }
    })
}

fn meta(r: &Record, shape: Shape, n: usize) -> Result<ExampleMeta> {
    let annotator = match r.obj.get("annotator") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(v) => return Err(r.error("annotator", format!("expected a string or number, found {}", kind(v)))),
    };
    let mut m = ExampleMeta {
        annotator,
        ..ExampleMeta::new(shape)
    };
    match shape {
        Shape::Pairwise => {
            match (number(r, "chosen_score")?, number(r, "rejected_score")?) {
                (Some(c), Some(rj)) => m.scores = Some(vec![c, rj]),
                (None, None) => {}
                (Some(_), None) => return Err(r.error("rejected_score", "missing (chosen_score is given)")),
                (None, Some(_)) => return Err(r.error("chosen_score", "missing (rejected_score is given)")),
            }
            m.margin = number(r, "margin")?;
            if let Some(p) = number(r, "preference_strength")? {
                if !(0.0..=1.0).contains(&p) {
                    return Err(r.error("preference_strength", format!("{p} is outside [0, 1]")));
                }
                m.strength = Some(p);
            }
        }
        Shape::Unpaired => {
            m.label = Some(match r.obj.get("label") {
                Some(Value::Bool(b)) => *b,
                Some(v) => return Err(r.error("label", format!("expected true or false, found {}", kind(v)))),
                None => return Err(r.error("label", "missing (unpaired rows need a boolean label)")),
            });
        }
        Shape::Ranked => {
            let list = |field: &str| -> Result<Option<Vec<f64>>> {
                match r.obj.get(field) {
                    None => Ok(None),
                    Some(Value::Array(a)) if a.len() == n => a
                        .iter()
                        .map(|x| x.as_f64().ok_or_else(|| r.error(field, "expected numbers")))
                        .collect::<Result<Vec<_>>>()
                        .map(Some),
                    Some(_) => Err(r.error(field, format!("expected a list of {n} numbers (one per response)"))),
                }
            };
            m.scores = match (list("scores")?, list("ranks")?) {
                (Some(s), _) => Some(s),
                (None, Some(ranks)) => {
                    m.scores_from_ranks = true;
                    Some(ranks.iter().map(|x| (n as f64 - 1.0) - x).collect())
                }
                (None, None) => return Err(r.error("ranks", "missing (a ranked list needs `ranks` or `scores`)")),
            };
        }
    }
    Ok(m)
}

/// Parse one record of the given shape and format. `tok` renders conversational data.
pub fn parse_example(r: &Record, shape: Shape, format: DataFormat, tok: Option<&TextTokenizer>) -> Result<TextExample> {
    let values = response_values(r, shape)?;
    let mut meta = meta(r, shape, values.len())?;
    let (prompt, mut responses) = match format {
        DataFormat::Standard => {
            let prompt = r.string("prompt")?.to_string();
            let resp = values
                .iter()
                .map(|(f, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Null => Err(r.error(f, "missing")),
                    other => Err(r.error(f, format!("expected a string, found {}", kind(other)))),
                })
                .collect::<Result<Vec<_>>>()?;
            (prompt, resp)
        }
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
            (
                prompt.to_string(),
                vec![chosen[cut..].to_string(), rejected[cut..].to_string()],
            )
        }
        DataFormat::Conversational => {
            let tok = tok.ok_or_else(|| {
                r.error(
                    "prompt",
                    "conversational data needs a model's chat template (pass --model)",
                )
            })?;
            let prompt = messages_of(r, "prompt", &r.obj["prompt"])?;
            let prompt_text = tok
                .apply_chat_template(&prompt, true)
                .map_err(|e| r.error("prompt", e.to_string()))?;
            let resp = values
                .iter()
                .map(|(f, v)| {
                    let mut all = prompt.clone();
                    all.extend(messages_of(r, f, v)?);
                    let text = tok.apply_chat_template(&all, false).map_err(|e| r.error(f, e.to_string()))?;
                    text.strip_prefix(prompt_text.as_str()).map(str::to_string).ok_or_else(|| {
                        r.error(f, "the chat template renders prompt+completion with a different prefix than the prompt alone")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (prompt_text, resp)
        }
    };
    for ((field, _), text) in values.iter().zip(&responses) {
        if text.trim().is_empty() {
            return Err(r.error(field, "empty completion"));
        }
    }
    if shape == Shape::Ranked {
        // best first; a stable sort keeps file order among equal scores
        let scores = meta.scores.take().expect("ranked rows have scores");
        let mut order: Vec<usize> = (0..responses.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        responses = order.iter().map(|&i| responses[i].clone()).collect();
        meta.scores = Some(order.iter().map(|&i| scores[i]).collect());
    }
    Ok(TextExample {
        line: r.line,
        prompt,
        responses,
        meta,
    })
}
