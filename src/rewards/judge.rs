//! Pairwise judges (TRL's `judge` of the online DPO, Nash-MD and XPO trainers): instead of
//! scoring each completion, a judge compares the two completions of a prompt.
//!
//! `judge = "cmd:<command line>"` runs the command (by `sh -c`) once per step. It reads one JSON
//! object per pair on stdin (`prompt`, `completions`: the two texts, and the prompt row's other
//! columns) and writes one line per pair: the probability that the **first** completion is the
//! better one, a number in [0, 1] (`1` or `0` for a hard choice, `0.5` for a tie). Online DPO,
//! XPO and IPO-MD make the first completion chosen when it is ≥ 0.5; Nash-MD uses it as its
//! preference probability p. A crash, a wrong number of lines, or a value outside [0, 1] is an
//! error naming the command.

use super::command::run_lines;
use crate::error::{Error, Result};
use serde_json::{Map, Value};

/// One pair to judge.
pub struct Pair<'a> {
    pub prompt: &'a str,
    pub first: &'a str,
    pub second: &'a str,
    /// The prompt row's other columns (e.g. `answer`).
    pub columns: &'a Map<String, Value>,
}

pub struct Judge {
    cmd: String,
    timeout: f64,
}

impl Judge {
    /// The judge a config names: `cmd:<command line>`.
    pub fn new(spec: &str, timeout: f64) -> Result<Judge> {
        let cmd = spec.strip_prefix("cmd:").ok_or_else(|| {
            Error::Config(format!(
                "judge = \"{spec}\": a judge is a command, `cmd:<command line>` (it reads JSON lines with \
                 `prompt` and `completions` and writes the probability that the first is better)"
            ))
        })?;
        if cmd.trim().is_empty() {
            return Err(Error::Config("judge `cmd:` names no command".into()));
        }
        Ok(Judge {
            cmd: cmd.to_string(),
            timeout: if timeout > 0.0 { timeout } else { 600.0 },
        })
    }

    fn fail(&self, what: String) -> Error {
        Error::msg(format!("judge command `{}`: {what}", self.cmd))
    }

    /// For each pair, the probability that its first completion is the better one.
    pub fn judge(&mut self, pairs: &[Pair]) -> Result<Vec<f64>> {
        let mut input = String::new();
        for p in pairs {
            let mut row = p.columns.clone();
            row.insert("prompt".into(), Value::String(p.prompt.into()));
            row.insert(
                "completions".into(),
                Value::Array(vec![Value::String(p.first.into()), Value::String(p.second.into())]),
            );
            input.push_str(&Value::Object(row).to_string());
            input.push('\n');
        }
        let lines = run_lines(&self.cmd, &input, pairs.len(), "answers for", "pairs", self.timeout)
            .map_err(|e| self.fail(e))?;
        lines
            .iter()
            .enumerate()
            .map(
                |(i, l)| match serde_json::from_str::<Value>(l.trim()).ok().and_then(|v| v.as_f64()) {
                    Some(p) if (0.0..=1.0).contains(&p) => Ok(p),
                    _ => Err(self.fail(format!(
                        "line {}: `{l}` is not a probability in [0, 1] (that the first completion is better)",
                        i + 1
                    ))),
                },
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command sees both completions; its answers come back in order; bad answers and
    /// specs are clear errors.
    #[test]
    fn a_command_judges_pairs_and_fails_clearly() {
        let cols: Map<String, Value> = serde_json::from_str(r#"{"answer": "4"}"#).unwrap();
        let pairs = [
            Pair {
                prompt: "2+2=",
                first: "4",
                second: "5",
                columns: &cols,
            },
            Pair {
                prompt: "2+2=",
                first: "3",
                second: "4",
                columns: &cols,
            },
        ];
        // prefers the completion equal to the row's answer: reads `completions` and `answer`
        let script = r#"while read -r l; do case "$l" in *'"completions":["4"'*) echo 1;; *) echo 0.25;; esac; done"#;
        let mut j = Judge::new(&format!("cmd:{script}"), 10.0).unwrap();
        assert_eq!(j.judge(&pairs).unwrap(), vec![1.0, 0.25]);
        for (cmd, want) in [
            ("cat >/dev/null; echo 1", "wrote 1 answers for 2 pairs"),
            ("cat >/dev/null; echo 1; echo 2", "line 2: `2` is not a probability"),
            ("cat >/dev/null; echo 0; echo x", "line 2: `x`"),
            ("cat >/dev/null; echo no >&2; exit 2", "no"),
        ] {
            let e = Judge::new(&format!("cmd:{cmd}"), 5.0)
                .unwrap()
                .judge(&pairs)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("judge command"), "{cmd}: {e}");
        }
        let e = Judge::new("pairrm", 1.0).err().unwrap().to_string();
        assert!(e.contains("cmd:<command line>"), "{e}");
    }
}
