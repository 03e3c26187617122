//! Conversions into prefer's data shapes.
//!
//! * OpenAssistant message trees (`oasst` export: nested `prompt` → `replies`, assistant
//!   siblings carrying a human `rank`, 0 = best) become ranked lists or pairs in the
//!   conversational format, one per prompter message with at least two ranked replies; the
//!   prompt is the conversation from the root to that message.
//! * Reward-augmented relabeling (Zhang et al. 2024, arXiv:2410.08067): each scored pair
//!   becomes two examples conditioned on a target score: (goal r_w: y_w ≻ y_l) and
//!   (goal r_l: y_l ≻ y_w).

use super::jsonl::{read_records, Record};
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OasstTarget {
    /// `{prompt, responses, ranks}`
    Lists,
    /// every (better, worse) combination as `{prompt, chosen, rejected}`
    Pairs,
}

fn message(role: &str, content: &str) -> Value {
    json!({"role": role, "content": content})
}

/// Convert an OpenAssistant tree file. Returns the JSONL lines.
pub fn oasst_trees(path: &Path, target: OasstTarget) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for rec in read_records(path)? {
        let r = rec?;
        let root = r
            .obj
            .get("prompt")
            .ok_or_else(|| r.error("prompt", "missing (not an OpenAssistant tree)"))?;
        walk(&r, root, &mut Vec::new(), target, &mut out)?;
    }
    Ok(out)
}

fn walk(r: &Record, node: &Value, path: &mut Vec<Value>, target: OasstTarget, out: &mut Vec<String>) -> Result<()> {
    let text = node
        .get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| r.error("text", "a message without text"))?;
    let role = match node.get("role").and_then(Value::as_str) {
        Some("prompter") => "user",
        Some("assistant") => "assistant",
        other => return Err(r.error("role", format!("unknown message role {other:?}"))),
    };
    path.push(message(role, text));
    let replies: Vec<&Value> = node
        .get("replies")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    if role == "user" {
        let mut ranked: Vec<(f64, &str)> = replies
            .iter()
            .filter(|m| !m.get("deleted").and_then(Value::as_bool).unwrap_or(false))
            .filter_map(|m| Some((m.get("rank")?.as_f64()?, m.get("text")?.as_str()?)))
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
        if ranked.len() >= 2 {
            let prompt = Value::Array(path.clone());
            match target {
                OasstTarget::Lists => out.push(
                    json!({
                        "prompt": prompt,
                        "responses": ranked.iter().map(|(_, t)| vec![message("assistant", t)]).collect::<Vec<_>>(),
                        "ranks": ranked.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                    })
                    .to_string(),
                ),
                OasstTarget::Pairs => {
                    for i in 0..ranked.len() {
                        for j in i + 1..ranked.len() {
                            if ranked[i].0 < ranked[j].0 {
                                out.push(
                                    json!({
                                        "prompt": prompt,
                                        "chosen": [message("assistant", ranked[i].1)],
                                        "rejected": [message("assistant", ranked[j].1)],
                                    })
                                    .to_string(),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    for reply in replies {
        walk(r, reply, path, target, out)?;
    }
    path.pop();
    Ok(())
}

/// The instruction that conditions a response on a target score.
pub fn score_goal(g: f64) -> String {
    format!("Generate a response whose overall quality score is {g} (on the scale of the preference data).")
}

/// Reward-augmented relabeling of pairwise rows with `chosen_score` and `rejected_score`.
/// Standard rows get the goal prepended to the prompt; conversational rows get it as a system
/// message (or prepended to an existing system message).
pub fn reward_augment(path: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for rec in read_records(path)? {
        let r = rec?;
        let num = |f: &str| -> Result<f64> {
            r.obj
                .get(f)
                .and_then(Value::as_f64)
                .ok_or_else(|| r.error(f, "missing or not a number (reward augmentation needs scored pairs)"))
        };
        let (rw, rl) = (num("chosen_score")?, num("rejected_score")?);
        let (chosen, rejected) = match (r.obj.get("chosen"), r.obj.get("rejected")) {
            (Some(c), Some(j)) => (c.clone(), j.clone()),
            _ => {
                return Err(r.error(
                    "chosen",
                    "reward augmentation needs pairwise rows with chosen and rejected",
                ))
            }
        };
        let prompt = r.obj.get("prompt").ok_or_else(|| r.error("prompt", "missing"))?;
        for (g, c, j) in [(rw, &chosen, &rejected), (rl, &rejected, &chosen)] {
            let p = conditioned(&r, prompt, g)?;
            out.push(json!({"prompt": p, "chosen": c, "rejected": j, "goal_score": g}).to_string());
        }
    }
    Ok(out)
}

fn conditioned(r: &Record, prompt: &Value, g: f64) -> Result<Value> {
    Ok(match prompt {
        Value::String(s) => Value::String(format!("{}\n\n{s}", score_goal(g))),
        Value::Array(msgs) => {
            let mut msgs = msgs.clone();
            match msgs.first_mut() {
                Some(m) if m.get("role").and_then(Value::as_str) == Some("system") => {
                    let old = m.get("content").and_then(Value::as_str).unwrap_or("").to_string();
                    m["content"] = Value::String(format!("{old}\n{}", score_goal(g)));
                }
                _ => msgs.insert(0, message("system", &score_goal(g))),
            }
            Value::Array(msgs)
        }
        _ => {
            return Err(Error::Data {
                path: r.path.clone(),
                line: r.line,
                field: "prompt".into(),
                msg: "expected a string or messages".into(),
            })
        }
    })
}

/// Flip the labels of a seeded random `flip_rate` fraction of pairwise rows (chosen ⇄ rejected,
/// and their scores), marking each flipped row with `"flipped": true`: a test bed with known
/// label noise. Returns the lines and how many were flipped.
pub fn corrupt_labels(path: &Path, flip_rate: f64, seed: u64) -> Result<(Vec<String>, usize)> {
    if !(0.0..=1.0).contains(&flip_rate) {
        return Err(Error::Config(format!("--flip-rate {flip_rate} is outside [0, 1]")));
    }
    let mut rng = crate::util::Rng::new(seed);
    let mut out = Vec::new();
    let mut flipped = 0;
    for rec in read_records(path)? {
        let r = rec?;
        let mut obj = r.obj.clone();
        if !(obj.contains_key("chosen") && obj.contains_key("rejected")) {
            return Err(r.error("chosen", "label flipping needs pairwise rows (chosen and rejected)"));
        }
        let flip = rng.uniform() < flip_rate;
        if flip {
            flipped += 1;
            for (a, b) in [("chosen", "rejected"), ("chosen_score", "rejected_score")] {
                if let (Some(x), Some(y)) = (obj.remove(a), obj.remove(b)) {
                    obj.insert(a.into(), y);
                    obj.insert(b.into(), x);
                }
            }
        }
        obj.insert("flipped".into(), Value::Bool(flip));
        out.push(Value::Object(obj).to_string());
    }
    Ok((out, flipped))
}
