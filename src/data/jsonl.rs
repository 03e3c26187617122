//! Reading rows that never loses track of where a value came from: JSONL line by line, and
//! (through [`super::tables`]) JSON arrays, Parquet files and Hugging Face `datasets`
//! directories, whose rows are numbered from 1 in place of lines.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// One JSON object and where it was read.
#[derive(Clone, Debug)]
pub struct Record {
    pub path: PathBuf,
    /// 1-based line number.
    pub line: usize,
    pub obj: Map<String, Value>,
}

impl Record {
    pub fn error(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::Data {
            path: self.path.clone(),
            line: self.line,
            field: field.into(),
            msg: msg.into(),
        }
    }

    /// A required string field.
    pub fn string(&self, field: &str) -> Result<&str> {
        match self.obj.get(field) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(self.error(field, format!("expected a string, found {}", kind(other)))),
            None => Err(self.error(field, "missing")),
        }
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Read the rows of a data file: JSONL (by default), a JSON array (`.json` whose first
/// non-blank byte is `[`), Parquet (`.parquet`), or a directory saved by `datasets`
/// (`save_to_disk`'s Arrow files, or Parquet shards as a hub download leaves them), or one
/// split of such a directory, `DIR/<split>`.
pub fn read_records(path: &Path) -> Result<Vec<Result<Record>>> {
    if super::tables::is_dataset_path(path) {
        return super::tables::read_dataset_dir(path);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => super::tables::read_parquet(path),
        Some("arrow") => super::tables::read_arrow(path),
        Some("json") => {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
            match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
                Some(b'[') => super::tables::read_json_array(path, bytes),
                _ => read_jsonl(path),
            }
        }
        _ => read_jsonl(path),
    }
}

/// [`read_records`] with columns renamed: each `(field, column)` pair reads the dataset's
/// `column` as prefer's `field` (`columns = {prompt = "question"}`).
pub fn read_records_renamed(path: &Path, columns: &[(String, String)]) -> Result<Vec<Result<Record>>> {
    let mut rows = read_records(path)?;
    if columns.is_empty() {
        return Ok(rows);
    }
    for r in rows.iter_mut().flatten() {
        for (field, column) in columns {
            if let Some(v) = r.obj.remove(column) {
                r.obj.insert(field.clone(), v);
            }
        }
    }
    Ok(rows)
}

/// Read every non-blank line of a JSONL file. Each line yields a record or an error that
/// names the file and line (malformed JSON, non-UTF-8, not an object). A UTF-8 byte-order
/// mark at the start (Windows editors and some exporters write one) is skipped.
pub fn read_jsonl(path: &Path) -> Result<Vec<Result<Record>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let err = |msg: String| Error::Data {
            path: path.to_path_buf(),
            line,
            field: "<line>".into(),
            msg,
        };
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t.trim_end_matches('\r'),
            Err(e) => {
                out.push(Err(err(format!(
                    "not valid UTF-8 (byte {} of the line)",
                    e.valid_up_to()
                ))));
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        out.push(match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(obj)) => Ok(Record {
                path: path.to_path_buf(),
                line,
                obj,
            }),
            Ok(other) => Err(err(format!("expected a JSON object, found {}", kind(&other)))),
            Err(e) => Err(err(format!("malformed JSON: {e}"))),
        });
    }
    Ok(out)
}
