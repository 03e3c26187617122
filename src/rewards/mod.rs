//! Rewards for sampled completions: a reward is `(prompt, completion, the row's other columns)
//! -> Option<f64>` (`None` skips the sample, as TRL's reward functions returning `None` do).
//!
//! Built in, by name: `accuracy` (the completion's final answer equals the row's `answer` or
//! `solution`), `format` (a regular expression matches), `length` (a penalty past a target
//! length). `cmd:<command line>` runs a command that reads JSON lines (`prompt`, `completion`
//! and the row's columns) on stdin and writes one score (a number or `null`) per line: the way
//! to plug in Python without prefer embedding it.

pub mod answer;
pub mod command;
pub mod judge;
pub mod model;

use crate::error::{Error, Result};
use serde_json::{Map, Value};

/// One completion to score.
#[derive(Clone, Copy, Debug)]
pub struct RewardInput<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
    /// Tokens of the completion.
    pub completion_tokens: usize,
    /// Whether it ended on a stop token (EOS) rather than at `max_completion_length`.
    pub stopped: bool,
    /// The prompt row's other columns (e.g. `answer`).
    pub columns: &'a Map<String, Value>,
}

/// A reward function.
pub trait Reward: Send {
    /// The name its metrics are logged under (`rewards/<name>/mean`).
    fn name(&self) -> &str;
    /// One score per input, in order.
    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<Option<f64>>>;
}

/// What the built-in rewards read besides the completion.
#[derive(Clone, Debug, Default)]
pub struct RewardOptions {
    /// `format`'s regular expression (matched anywhere in the completion unless anchored).
    pub format_regex: Option<String>,
    /// `length`'s target, in completion tokens.
    pub length_target: usize,
    /// Seconds a `cmd:` reward may take for one batch.
    pub command_timeout: f64,
}

/// 1 when the completion's final answer equals the row's `answer` (or `solution`), else 0.
/// Both sides are parsed the same way ([`answer::final_answer`]).
pub struct Accuracy;

impl Reward for Accuracy {
    fn name(&self) -> &str {
        "accuracy"
    }

    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<Option<f64>>> {
        batch
            .iter()
            .map(|x| {
                let gold = ["answer", "solution"]
                    .iter()
                    .find_map(|k| x.columns.get(*k))
                    .ok_or_else(|| {
                        Error::msg("reward `accuracy` needs an `answer` or `solution` column in the prompt rows")
                    })?;
                let gold = match gold {
                    Value::String(s) => answer::final_answer(s),
                    Value::Number(n) => Some(answer::normalize(&n.to_string())),
                    _ => None,
                };
                Ok(Some(match (gold, answer::final_answer(x.completion)) {
                    (Some(g), Some(a)) if g == a => 1.0,
                    _ => 0.0,
                }))
            })
            .collect()
    }
}

/// 1 when the completion matches the regular expression, else 0.
pub struct Format(regex::Regex);

impl Reward for Format {
    fn name(&self) -> &str {
        "format"
    }

    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<Option<f64>>> {
        Ok(batch
            .iter()
            .map(|x| Some(self.0.is_match(x.completion) as u8 as f64))
            .collect())
    }
}

/// 0 up to `target` completion tokens, then −(tokens − target)/target.
pub struct Length(pub usize);

impl Reward for Length {
    fn name(&self) -> &str {
        "length"
    }

    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<Option<f64>>> {
        let t = self.0.max(1) as f64;
        Ok(batch
            .iter()
            .map(|x| Some(-((x.completion_tokens as f64 - t).max(0.0)) / t))
            .collect())
    }
}

/// The reward named `name`: `accuracy`, `format`, `length`, `cmd:<command line>`, or a reward
/// model's path (`model:<path>`, or a path that exists).
pub fn by_name(name: &str, opts: &RewardOptions) -> Result<Box<dyn Reward>> {
    if let Some(cmd) = name.strip_prefix("cmd:") {
        return Ok(Box::new(command::Command::new(cmd, opts.command_timeout)?));
    }
    if let Some(path) = name.strip_prefix("model:") {
        return Ok(Box::new(model::RewardModel::load(std::path::Path::new(path))?));
    }
    if !matches!(name, "accuracy" | "format" | "length") && std::path::Path::new(name).exists() {
        return Ok(Box::new(model::RewardModel::load(std::path::Path::new(name))?));
    }
    match name {
        "accuracy" => Ok(Box::new(Accuracy)),
        "format" => {
            let re = opts
                .format_regex
                .as_deref()
                .ok_or_else(|| Error::Config("reward `format` needs reward_format_regex".into()))?;
            let re = regex::Regex::new(re)
                .map_err(|e| Error::Config(format!("reward_format_regex `{re}` is not a regular expression: {e}")))?;
            Ok(Box::new(Format(re)))
        }
        "length" => {
            if opts.length_target == 0 {
                return Err(Error::Config("reward `length` needs reward_length_target > 0".into()));
            }
            Ok(Box::new(Length(opts.length_target)))
        }
        other => Err(Error::Config(crate::util::text::not_one_of(
            other,
            &[
                "accuracy",
                "format",
                "length",
                "cmd:<command line>",
                "model:<path of a reward model>",
            ],
            &["accuracy", "format", "length"],
        ))),
    }
}

/// Scores of a batch: `None` where a reward skipped a completion.
pub type Scores = Vec<Option<f64>>;

/// Every reward's scores of a batch, and their weighted sum per completion (`None` where any
/// reward skipped it). `weights` defaults to 1 each.
pub fn score_all(
    rewards: &mut [Box<dyn Reward>],
    weights: Option<&[f64]>,
    batch: &[RewardInput],
) -> Result<(Vec<Scores>, Scores)> {
    if let Some(w) = weights {
        if w.len() != rewards.len() {
            return Err(Error::Config(format!(
                "reward_weights has {} entries for {} reward functions",
                w.len(),
                rewards.len()
            )));
        }
    }
    let mut per = Vec::with_capacity(rewards.len());
    for r in rewards.iter_mut() {
        let s = r.score(batch)?;
        if s.len() != batch.len() {
            return Err(Error::msg(format!(
                "reward `{}` returned {} scores for {} completions",
                r.name(),
                s.len(),
                batch.len()
            )));
        }
        per.push(s);
    }
    let total = (0..batch.len())
        .map(|i| {
            per.iter()
                .enumerate()
                .try_fold(0.0, |acc, (k, s)| s[i].map(|v| acc + weights.map_or(1.0, |w| w[k]) * v))
        })
        .collect();
    Ok((per, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(completion: &'a str, columns: &'a Map<String, Value>) -> RewardInput<'a> {
        RewardInput {
            prompt: "q",
            completion,
            completion_tokens: completion.split_whitespace().count(),
            stopped: true,
            columns,
        }
    }

    #[test]
    fn builtins_score_by_hand() {
        let gsm: Map<String, Value> =
            serde_json::from_str(r#"{"answer": "2 + 2 = <<2+2=4>>4 apples\n#### 1,024"}"#).unwrap();
        let mut acc = Accuracy;
        let xs = [
            input("so the answer is 1024.", &gsm),
            input("#### 1,024.00", &gsm),
            input("\\boxed{1024}", &gsm),
            input("it is 1023", &gsm),
            input("no number", &gsm),
        ];
        assert_eq!(
            acc.score(&xs).unwrap(),
            vec![Some(1.0), Some(1.0), Some(1.0), Some(0.0), Some(0.0)]
        );
        let opts = RewardOptions {
            format_regex: Some(r"^<think>.*</think>".into()),
            length_target: 4,
            command_timeout: 10.0,
        };
        let mut f = by_name("format", &opts).unwrap();
        let none = Map::new();
        assert_eq!(
            f.score(&[input("<think>a</think> b", &none), input("b", &none)])
                .unwrap(),
            vec![Some(1.0), Some(0.0)]
        );
        let mut l = by_name("length", &opts).unwrap();
        assert_eq!(
            l.score(&[input("a b c", &none), input("a b c d e f", &none)]).unwrap(),
            vec![Some(0.0), Some(-0.5)]
        );
        let e = by_name("acuracy", &opts).err().unwrap().to_string();
        assert!(e.contains("did you mean `accuracy`"), "{e}");
        let e = Accuracy.score(&[input("4", &none)]).unwrap_err().to_string();
        assert!(e.contains("`answer` or `solution` column"), "{e}");
        // weighted sum; a skipped score skips the completion
        let mut rs: Vec<Box<dyn Reward>> = vec![Box::new(Accuracy), Box::new(Length(4))];
        let (per, total) = score_all(&mut rs, Some(&[1.0, 0.5]), &[input("1024 a b c d e f g", &gsm)]).unwrap();
        assert_eq!(per, vec![vec![Some(1.0)], vec![Some(-1.0)]]);
        assert_eq!(total, vec![Some(0.5)]);
    }
}
