//! TensorBoard event files (`report_to = ["tensorboard"]`), written without TensorFlow: each
//! log record becomes one `Event` protocol buffer of scalar summaries, framed as a TFRecord
//! (length, masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes). Tags follow
//! transformers' `TensorBoardCallback`: `train/loss`, `train/rewards/chosen`, ..., and
//! `eval/loss` for the `eval_` metrics. A resumed run starts a new file with a session START at
//! its step, so TensorBoard drops the first file's events after that step, as with transformers.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), as TFRecord frames use it.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data
        .iter()
        .fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// TFRecord's masked CRC.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// An `Event` with `wall_time`, `step` and one of: `file_version`, a summary of scalars, or a
/// session START.
fn event(wall_time: f64, step: i64, body: EventBody) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // field 1, fixed64: wall_time
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10); // field 2, varint: step
    varint(step as u64, &mut e);
    match body {
        EventBody::FileVersion => bytes_field(3, b"brain.Event:2", &mut e),
        EventBody::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut value = Vec::new();
                bytes_field(1, tag.as_bytes(), &mut value);
                value.push(0x15); // field 2, fixed32: simple_value
                value.extend_from_slice(&(*v as f32).to_le_bytes());
                bytes_field(1, &value, &mut summary);
            }
            bytes_field(5, &summary, &mut e);
        }
        EventBody::SessionStart => bytes_field(6, &[0x08, 0x01], &mut e), // SessionLog{status: START}
    }
    e
}

enum EventBody<'a> {
    FileVersion,
    Scalars(&'a [(String, f64)]),
    SessionStart,
}

/// One TFRecord frame of `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

/// transformers' tag of a log key: `eval_loss` → `eval/loss`, `loss` → `train/loss`.
pub fn tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(rest) => format!("eval/{rest}"),
        None => format!("train/{key}"),
    }
}

/// An open event file.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl EventWriter {
    /// A new event file in `dir` (`events.out.tfevents.<time>.<host>.<pid>.0`, as TensorBoard
    /// expects), starting at `step` (a resumed run's).
    pub fn create(dir: &Path, step: usize) -> Result<Self> {
        crate::util::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}.0",
            now() as u64,
            std::process::id()
        ));
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { path, file };
        w.write(&event(now(), step as i64, EventBody::FileVersion))?;
        if step > 0 {
            w.write(&event(now(), step as i64, EventBody::SessionStart))?;
        }
        Ok(w)
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.file
            .write_all(&record(data))
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// The numeric fields of a log record (but `step` and `epoch`, which TensorBoard has on its
    /// axis, `epoch` kept as `train/epoch` as transformers does) at `step`.
    pub fn log(&mut self, step: usize, record: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
        let values: Vec<(String, f64)> = record
            .iter()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| Some((tag(k), v.as_f64()?)))
            .collect();
        self.write(&event(now(), step as i64, EventBody::Scalars(&values)))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The records of a TFRecord file, each checked against both its CRCs (for tests and tools).
pub fn read_records(path: &Path) -> Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    let mut i = 0;
    let bad = |what: &str| Error::msg(format!("{}: {what}", path.display()));
    while i < bytes.len() {
        let head = bytes.get(i..i + 12).ok_or_else(|| bad("truncated record header"))?;
        let len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes")) as usize;
        if u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) != masked_crc(&head[..8]) {
            return Err(bad("length CRC mismatch"));
        }
        let data = bytes.get(i + 12..i + 12 + len).ok_or_else(|| bad("truncated record"))?;
        let crc = bytes
            .get(i + 12 + len..i + 16 + len)
            .ok_or_else(|| bad("truncated CRC"))?;
        if u32::from_le_bytes(crc.try_into().expect("4 bytes")) != masked_crc(data) {
            return Err(bad("data CRC mismatch"));
        }
        out.push(data.to_vec());
        i += 16 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // the CRC-32C check value of "123456789" (RFC 3720, iSCSI)
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn tags_follow_transformers() {
        assert_eq!(tag("loss"), "train/loss");
        assert_eq!(tag("rewards/chosen"), "train/rewards/chosen");
        assert_eq!(tag("eval_rewards/margins"), "eval/rewards/margins");
    }

    #[test]
    fn events_frame_and_encode_by_hand() {
        let e = event(1.5, 3, EventBody::Scalars(&[("train/loss".into(), 0.25)]));
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 3]);
        // summary (field 5) { value (field 1) { tag (1): "train/loss", simple_value (2): 0.25 } }
        let mut value = vec![0x0a, 10];
        value.extend_from_slice(b"train/loss");
        value.push(0x15);
        value.extend_from_slice(&0.25f32.to_le_bytes());
        let mut summary = vec![0x0a, value.len() as u8];
        summary.extend_from_slice(&value);
        want.push(0x2a);
        want.push(summary.len() as u8);
        want.extend_from_slice(&summary);
        assert_eq!(e, want);
        let dir = crate::testing::scratch_dir("tb-frames");
        let mut w = EventWriter::create(&dir, 0).unwrap();
        let rec = serde_json::json!({"step": 1, "loss": 0.5, "eval_loss": 0.7});
        w.log(1, rec.as_object().unwrap()).unwrap();
        let recs = read_records(w.path()).unwrap();
        assert_eq!(recs.len(), 2);
        assert!(recs[0].windows(13).any(|x| x == b"brain.Event:2"));
        assert!(recs[1].windows(9).any(|x| x == b"eval/loss"));
        // a flipped byte is caught
        let mut bytes = std::fs::read(w.path()).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(w.path(), bytes).unwrap();
        assert!(read_records(w.path()).is_err());
    }
}
