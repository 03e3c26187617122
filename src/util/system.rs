//! Process-level settings and measurements: the allocator, threads, resident memory.

/// Keep freed memory inside the process (glibc): a training step allocates and frees the same
/// large activation buffers every step, and by default glibc returns them to the kernel and
/// gets them back as fresh pages that the kernel must zero, which measured ~15% of a DPO step
/// as system time. No trimming, and no separate mappings even for the largest buffers (the
/// log-prob head's `[rows, vocab]` gradient, packed bf16 weights: 5–12 % of a step measured),
/// make every buffer reusable. One arena for every thread: training steps and sampling run on
/// a worker of the thread pool, whose own arena would hold its buffers in 64 MiB heaps that
/// neither fit the largest ones nor pack the rest well (GRPO's step on SmolLM2: 2.55 M page
/// faults and 31.8 s with per-thread arenas, 1.92 M and 27.6 s with one). `MALLOC_ARENA_MAX`
/// in the environment still decides, when set.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called once at start-up, before any
    // thread but the main one exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Debug aid: with `PREFER_MEMTRACE` set, print current and peak RSS with a label, and (glibc)
/// how much of the heap is in use and how much is free but kept.
pub fn memtrace(label: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var_os("PREFER_MEMTRACE").is_some()) {
        return;
    }
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |k: &str| -> f64 {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let heap = {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let m = unsafe { libc::mallinfo2() };
        format!(
            ", heap in use {:.3} GiB, free {:.3} GiB",
            m.uordblks as f64 / (1u64 << 30) as f64,
            m.fordblks as f64 / (1u64 << 30) as f64
        )
    };
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let heap = String::new();
    eprintln!(
        "memtrace {label}: rss {:.3} GiB, peak {:.3} GiB{heap}",
        kb("VmRSS:") / 1048576.0,
        kb("VmHWM:") / 1048576.0
    );
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
