//! Rows from files that are not JSONL: JSON arrays, Parquet files, and the directories
//! Hugging Face `datasets` writes (`Dataset.save_to_disk`: Arrow IPC stream files
//! `data-00000-of-0000N.arrow`; a hub download: `*.parquet` shards). Each row becomes the same
//! [`Record`] a JSONL line does (nested lists and structs as JSON lists and objects), numbered
//! from 1 in file order, so every data error still names the file, the row and the field.

use super::jsonl::{kind, Record};
use crate::error::{Error, Result};
use arrow_array::RecordBatch;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Rows of Arrow record batches as records of `path`, numbered from `first`.
fn batches_to_records(path: &Path, batches: &[RecordBatch], first: usize) -> Result<Vec<Result<Record>>> {
    let mut buf = Vec::new();
    {
        let mut w = arrow_json::ArrayWriter::new(&mut buf);
        let refs: Vec<&RecordBatch> = batches.iter().collect();
        w.write_batches(&refs)
            .map_err(|e| Error::model(path, format!("cannot turn its rows into JSON: {e}")))?;
        w.finish()
            .map_err(|e| Error::model(path, format!("cannot turn its rows into JSON: {e}")))?;
    }
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<Value> =
        serde_json::from_slice(&buf).map_err(|e| Error::model(path, format!("rows as JSON: {e}")))?;
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(i, v)| record(path, first + i, v))
        .collect())
}

fn record(path: &Path, line: usize, v: Value) -> Result<Record> {
    match v {
        Value::Object(obj) => Ok(Record {
            path: path.to_path_buf(),
            line,
            obj,
        }),
        other => Err(Error::Data {
            path: path.to_path_buf(),
            line,
            field: "<row>".into(),
            msg: format!("expected an object, found {}", kind(&other)),
        }),
    }
}

/// The rows of a JSON file holding one array of objects.
pub fn read_json_array(path: &Path, bytes: &[u8]) -> Result<Vec<Result<Record>>> {
    let v: Vec<Value> = serde_json::from_slice(bytes).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        line: e.line(),
        field: "<file>".into(),
        msg: format!("malformed JSON array: {e}"),
    })?;
    Ok(v.into_iter().enumerate().map(|(i, v)| record(path, i + 1, v)).collect())
}

/// The rows of a Parquet file.
pub fn read_parquet(path: &Path) -> Result<Vec<Result<Record>>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| Error::model(path, format!("not a readable Parquet file: {e}")))?;
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::model(path, format!("reading Parquet rows: {e}")))?;
    batches_to_records(path, &batches, 1)
}

/// The rows of an Arrow IPC file (the stream format `datasets` writes, or the file format).
pub fn read_arrow(path: &Path) -> Result<Vec<Result<Record>>> {
    let open = || std::fs::File::open(path).map_err(|e| Error::io(path, e));
    let batches: Vec<RecordBatch> = match arrow_ipc::reader::StreamReader::try_new(open()?, None) {
        Ok(r) => r.collect::<std::result::Result<_, _>>(),
        Err(_) => match arrow_ipc::reader::FileReader::try_new(open()?, None) {
            Ok(r) => r.collect::<std::result::Result<_, _>>(),
            Err(e) => return Err(Error::model(path, format!("not a readable Arrow file: {e}"))),
        },
    }
    .map_err(|e| Error::model(path, format!("reading Arrow rows: {e}")))?;
    batches_to_records(path, &batches, 1)
}

/// The files of one extension in `dir`, sorted.
fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().and_then(|e| e.to_str()) == Some(ext))
        .collect();
    v.sort();
    v
}

/// The split a hub shard belongs to: `train` of `train-00000-of-00002.parquet`.
fn shard_split(file: &Path) -> Option<&str> {
    let stem = file.file_stem()?.to_str()?;
    let (split, rest) = stem.split_once('-')?;
    let (n, of) = rest.split_once("-of-")?;
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    (digits(n) && digits(of) && !split.is_empty()).then_some(split)
}

/// The Parquet shards of a hub download: in `dir`, else in `dir/data`.
fn parquet_shards(dir: &Path) -> Vec<PathBuf> {
    let here = files_with(dir, "parquet");
    if here.is_empty() {
        files_with(&dir.join("data"), "parquet")
    } else {
        here
    }
}

/// The splits of a dataset directory, in order: a `DatasetDict`'s (`dataset_dict.json`), or
/// the split names of a hub download's shards (`data/train-00000-of-00001.parquet`, ...).
/// Empty for a single `Dataset` (or any other directory).
pub fn splits(dir: &Path) -> Vec<String> {
    let dict = dir.join("dataset_dict.json");
    if dict.is_file() {
        return std::fs::read_to_string(&dict)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["splits"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
    }
    let mut out: Vec<String> = Vec::new();
    for f in parquet_shards(dir) {
        match shard_split(&f) {
            Some(s) if !out.iter().any(|o| o == s) => out.push(s.to_string()),
            Some(_) => {}
            // a shard without a split in its name: the folder is one split
            None => return Vec::new(),
        }
    }
    out
}

/// The shards of `path` when it is a virtual split path (`DIR/train` where `DIR` holds
/// `train-*.parquet` shards and no `train` entry).
fn virtual_split(path: &Path) -> Option<Vec<PathBuf>> {
    if path.exists() {
        return None;
    }
    let (dir, split) = (path.parent()?, path.file_name()?.to_str()?);
    let shards: Vec<PathBuf> = parquet_shards(dir)
        .into_iter()
        .filter(|f| shard_split(f) == Some(split))
        .collect();
    (!shards.is_empty()).then_some(shards)
}

/// Whether `path` names something [`read_records`](super::jsonl::read_records) reads as a
/// dataset directory (a real one, or one split of a hub download).
pub fn is_dataset_path(path: &Path) -> bool {
    path.is_dir() || virtual_split(path).is_some()
}

/// The rows of a directory `datasets` wrote: one split (a `Dataset` saved to disk, or a folder
/// of Parquet shards), or `DIR/<split>` of a hub download. A directory with several splits
/// must be narrowed to one (`dataset_train_split`, or the split's path).
pub fn read_dataset_dir(dir: &Path) -> Result<Vec<Result<Record>>> {
    let files = match virtual_split(dir) {
        Some(shards) => shards,
        None => {
            let splits = splits(dir);
            if dir.join("dataset_dict.json").is_file() || splits.len() > 1 {
                let example = splits
                    .first()
                    .map(|s| dir.join(s).display().to_string())
                    .unwrap_or_default();
                return Err(Error::model(
                    dir,
                    format!(
                        "a dataset with splits {splits:?}: choose one with dataset_train_split (train) or \
                         dataset_test_split (eval), or give its path, e.g. train_file = \"{example}\""
                    ),
                ));
            }
            // save_to_disk's Arrow files, else Parquet shards
            let arrow = files_with(dir, "arrow");
            if arrow.is_empty() {
                parquet_shards(dir)
            } else {
                arrow
            }
        }
    };
    if files.is_empty() {
        return Err(Error::model(
            dir,
            "no data here: a data directory holds the .arrow files of Dataset.save_to_disk or .parquet shards",
        ));
    }
    let mut out = Vec::new();
    for f in files {
        let rows = match f.extension().and_then(|e| e.to_str()) {
            Some("arrow") => read_arrow(&f)?,
            _ => read_parquet(&f)?,
        };
        out.extend(rows);
    }
    Ok(out)
}
