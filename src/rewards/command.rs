//! `cmd:<command line>` rewards: the command (run by `sh -c`) reads one JSON object per
//! completion on stdin (`prompt`, `completion` and the row's columns) and writes one score per
//! line on stdout: a number, or `null` to skip the completion. A crash, a wrong number of
//! lines, a line that is not a number, or a run past the timeout is an error naming the command.

use super::{Reward, RewardInput};
use crate::error::{Error, Result};
use serde_json::Value;
use std::io::{Read, Write};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

pub struct Command {
    cmd: String,
    name: String,
    timeout: f64,
}

impl Command {
    pub fn new(cmd: &str, timeout: f64) -> Result<Command> {
        if cmd.trim().is_empty() {
            return Err(Error::Config("reward `cmd:` names no command".into()));
        }
        Ok(Command {
            cmd: cmd.to_string(),
            name: format!("cmd:{cmd}"),
            timeout: if timeout > 0.0 { timeout } else { 600.0 },
        })
    }

    fn fail(&self, what: String) -> Error {
        Error::msg(format!("reward command `{}`: {what}", self.cmd))
    }
}

impl Reward for Command {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&mut self, batch: &[RewardInput]) -> Result<Vec<Option<f64>>> {
        let mut input = String::new();
        for x in batch {
            let mut row = x.columns.clone();
            row.insert("prompt".into(), Value::String(x.prompt.into()));
            row.insert("completion".into(), Value::String(x.completion.into()));
            input.push_str(&Value::Object(row).to_string());
            input.push('\n');
        }
        let lines = run_lines(
            &self.cmd,
            &input,
            batch.len(),
            "scores for",
            "completions",
            self.timeout,
        )
        .map_err(|e| self.fail(e))?;
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| match serde_json::from_str::<Value>(l.trim()) {
                Ok(Value::Null) => Ok(None),
                Ok(Value::Number(n)) => Ok(n.as_f64()),
                _ => Err(self.fail(format!("line {}: `{l}` is not a number or null", i + 1))),
            })
            .collect()
    }
}

/// Run `cmd` with `sh -c`, `input` on its stdin, and return its `n` non-blank output lines; or
/// what went wrong (it did not start, exited with an error (with the end of its stderr), wrote
/// another number of lines, or ran past `timeout` seconds). `what` and `per` name the lines in
/// that message ("wrote 3 scores for 4 completions").
pub(crate) fn run_lines(
    cmd: &str,
    input: &str,
    n: usize,
    what: &str,
    per: &str,
    timeout: f64,
) -> std::result::Result<Vec<String>, String> {
    let mut child = Process::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let (mut out, mut err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let reader = std::thread::spawn(move || {
        let (mut o, mut e) = (String::new(), String::new());
        let _ = out.read_to_string(&mut o);
        let _ = err.read_to_string(&mut e);
        (o, e)
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if start.elapsed().as_secs_f64() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no answer within {timeout} s (reward_timeout)"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = writer.join();
    let (stdout, stderr) = reader.join().unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!("exited with {status}: {}", tail.join("\n")));
    }
    let lines: Vec<String> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect();
    if lines.len() != n {
        return Err(format!("wrote {} {what} {n} {per} (one line each)", lines.len()));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    #[test]
    fn command_rewards_read_and_fail_clearly() {
        let cols: Map<String, Value> = serde_json::from_str(r#"{"answer": "4"}"#).unwrap();
        let xs = [
            RewardInput {
                prompt: "p",
                completion: "abc",
                completion_tokens: 1,
                stopped: true,
                columns: &cols,
            },
            RewardInput {
                prompt: "p",
                completion: "x",
                completion_tokens: 1,
                stopped: true,
                columns: &cols,
            },
        ];
        // the length of each completion, via the JSON the command reads; null skips
        let mut c = Command::new(
            r#"while read -r l; do case "$l" in *'"abc"'*) echo 3;; *) echo null;; esac; done"#,
            10.0,
        )
        .unwrap();
        assert_eq!(c.score(&xs).unwrap(), vec![Some(3.0), None]);
        for (cmd, want) in [
            ("echo 1", "wrote 1 scores for 2 completions"),
            ("cat >/dev/null; echo 1; echo x", "line 2: `x` is not a number"),
            ("cat >/dev/null; echo boom >&2; exit 3", "boom"),
            ("sleep 5", "no answer within 0.2 s"),
        ] {
            let e = Command::new(cmd, 0.2).unwrap().score(&xs).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(cmd), "{cmd}: {e}");
        }
    }
}
