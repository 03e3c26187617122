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

/// The data files of a `datasets` directory, in order: its Arrow files (`save_to_disk` of a
/// `Dataset`), else its Parquet files (also under `data/`, as a hub download has them).
fn data_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let list = |d: &Path, ext: &str| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(ext))
            .collect();
        v.sort();
        v
    };
    let arrow = list(dir, "arrow");
    if !arrow.is_empty() {
        return Ok(arrow);
    }
    let mut parquet = list(dir, "parquet");
    if parquet.is_empty() {
        parquet = list(&dir.join("data"), "parquet");
    }
    Ok(parquet)
}

/// The rows of a directory `datasets` wrote: one split (a `Dataset` saved to disk, or a folder
/// of Parquet shards). A `DatasetDict` (several splits) must be narrowed to one split's folder.
pub fn read_dataset_dir(dir: &Path) -> Result<Vec<Result<Record>>> {
    let dict = dir.join("dataset_dict.json");
    if dict.is_file() {
        let splits: Vec<String> = serde_json::from_str::<Value>(&crate::util::read_to_string(&dict)?)
            .ok()
            .and_then(|v| v["splits"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        let example = splits
            .first()
            .map(|s| dir.join(s).display().to_string())
            .unwrap_or_default();
        return Err(Error::model(
            dir,
            format!(
                "a DatasetDict with splits {splits:?}: give one split's directory, e.g. train_file = \"{example}\""
            ),
        ));
    }
    let files = data_files(dir)?;
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
