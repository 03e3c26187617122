//! File helpers: atomic writes and reads/dir creation with the path in the error.

use crate::error::{Error, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` atomically: write a temp file beside it, fsync, rename over.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The temp name used by [`write_atomic`]: `name.tmp` in the same directory.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// A text file's contents, without the UTF-8 byte-order mark some editors put first.
pub fn read_to_string(path: &Path) -> Result<String> {
    let mut text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    if text.starts_with('\u{feff}') {
        text.drain(..3);
    }
    Ok(text)
}

pub fn create_dir_all(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

/// Append one JSON record as a line.
pub fn append_jsonl(path: &Path, rec: &Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{rec}").map_err(|e| Error::io(path, e))
}

/// Drop the records (JSON lines with a `step`) past `step` (written after the checkpoint a run resumes from), or all
/// of them for a fresh run.
pub fn truncate_jsonl_after_step(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_some_and(|s| (s as usize) <= step)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    write_atomic(path, body.as_bytes())
}

/// An exclusive hold on a run's output directory: `.prefer.lock` in it, locked with `flock`,
/// which the kernel releases when the holder ends, however it ends (a crash or SIGKILL leaves
/// no stale lock). A second run pointed at the same directory is refused.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Creates `dir` if needed and takes the lock; an error names the directory and says why.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::msg(format!(
                "output_dir {}: cannot create it ({e}); choose a writable output_dir",
                dir.display()
            ))
        })?;
        let path = dir.join(".prefer.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                Error::msg(format!(
                    "output_dir {}: cannot write in it ({e}); choose a writable output_dir",
                    dir.display()
                ))
            })?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            let try_lock = || unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
            // A lock just released can look held for a moment: a process that forks (to run a
            // reward command) copies every open descriptor into the child until it execs, and
            // the copy holds the lock meanwhile. So a refusal is only believed after a second.
            let mut locked = try_lock();
            for _ in 0..50 {
                if locked {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                locked = try_lock();
            }
            if !locked {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(Error::msg(format!(
                    "output_dir {}: another run is writing to it ({}); wait for it to end, stop it, or choose another output_dir",
                    dir.display(),
                    holder.trim()
                )));
            }
        }
        // who holds it, for the message above
        let _ = file.set_len(0).and_then(|_| write!(file, "pid {}", std::process::id()));
        Ok(DirLock { _file: file })
    }
}
