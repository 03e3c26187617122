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

/// Run `f` on a worker of the thread pool while the pool's other workers stay awake: each one
/// runs a job that takes the pool's pending jobs one at a time (`rayon::yield_now`) and spins
/// between them, until `f` returns. Decoding a token runs hundreds of small parallel regions,
/// and between two of them an idle worker would otherwise go to sleep and have to be woken by
/// the kernel for the next (a tenth of a decoding batch's profile on a 2-vCPU VM). The other
/// workers burn their cores meanwhile, as OpenMP's spinning threads do: use it where `f` is
/// all parallel work.
pub fn with_workers_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Lets the other workers go when `f` returns or panics.
    struct Release<'a>(&'a AtomicBool);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    rayon::scope(|_| {
        let runner = rayon::current_thread_index();
        let done = AtomicBool::new(false);
        rayon::in_place_scope(|s| {
            // one job per worker, each kept on its own worker; the runner's returns at once (it
            // runs it only while waiting for other jobs, or at the end of the scope)
            s.spawn_broadcast(|_, ctx| {
                if Some(ctx.index()) == runner {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
            let _release = Release(&done);
            f()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::with_workers_awake;
    use rayon::prelude::*;

    /// `f`'s value comes back, computed on a worker with the parallel regions inside it done by
    /// the pool; calls from several threads at once, nested ones, and a panicking `f` (which
    /// must release the other workers, not leave them spinning) all return.
    #[test]
    fn workers_kept_awake_run_the_work_and_let_go() {
        let sum = |n: u64| with_workers_awake(|| (0..n).into_par_iter().map(|i| i * i).sum::<u64>());
        assert_eq!(sum(1000), 332_833_500);
        assert!(with_workers_awake(|| rayon::current_thread_index().is_some()));
        let threads: Vec<_> = (0..4u64)
            .map(|t| std::thread::spawn(move || (0..50).map(|_| sum(1000 + t)).collect::<Vec<_>>()))
            .collect();
        for (t, h) in threads.into_iter().enumerate() {
            let want = (0..1000 + t as u64).map(|i| i * i).sum::<u64>();
            assert!(h.join().unwrap().iter().all(|&s| s == want));
        }
        assert_eq!(with_workers_awake(|| with_workers_awake(|| sum(10))), 285);
        let panicked = std::panic::catch_unwind(|| with_workers_awake(|| panic!("inside")));
        assert!(panicked.is_err());
        assert_eq!(sum(1000), 332_833_500);
    }
}
