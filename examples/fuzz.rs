//! The fuzz driver of `scripts/fuzz.sh`: runs one target (or all) of `prefer::testing::fuzz`
//! for many seeded inputs, with an allocator that records the largest single allocation of
//! each input, and prints one JSON line per target: executions, panics, slow inputs, the
//! largest allocation. Failing inputs are written to `target/fuzz-failures/`.
//!
//!   cargo run --release --features testing --example fuzz -- --target gguf --iterations 1000000

use prefer::testing::fuzz::{run, targets};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, recording the largest allocation since the last reset.
struct Recording;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Recording = Recording;

/// An allocation this much larger than the input is taken for one sized by an unchecked field.
fn allocation_bound(input: usize) -> usize {
    (64 << 20) + 64 * input
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let iterations: u64 = arg("--iterations").and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let seed: u64 = arg("--seed").and_then(|v| v.parse().ok()).unwrap_or(1);
    let only = arg("--target");
    let all = targets();
    if let Some(t) = &only {
        if !all.iter().any(|x| x.name == t) {
            let names: Vec<&str> = all.iter().map(|x| x.name).collect();
            eprintln!("no target `{t}`; targets: {}", names.join(", "));
            std::process::exit(2);
        }
    }
    let failures = std::path::Path::new("target/fuzz-failures");
    let mut failed = false;
    for t in all.iter().filter(|t| only.as_deref().is_none_or(|o| o == t.name)) {
        let started = std::time::Instant::now();
        let mut largest = 0usize;
        LARGEST.store(0, Ordering::Relaxed);
        let r = run(t, iterations, seed, |input| {
            let big = LARGEST.swap(0, Ordering::Relaxed);
            largest = largest.max(big);
            (big > allocation_bound(input.len()))
                .then(|| format!("an allocation of {big} bytes for an input of {}", input.len()))
        });
        let bad: Vec<&Vec<u8>> = r
            .panics
            .iter()
            .map(|p| &p.0)
            .chain(r.slow.iter().map(|s| &s.0))
            .collect();
        if !bad.is_empty() {
            failed = true;
            std::fs::create_dir_all(failures).ok();
            for (i, b) in bad.iter().enumerate() {
                std::fs::write(failures.join(format!("{}-{seed}-{i}", t.name)), b).ok();
            }
        }
        println!(
            "{}",
            serde_json::json!({
                "target": t.name, "executions": r.executions, "seed": seed,
                "panics": r.panic_count, "panic_messages": r.panics.iter().map(|p| p.1.clone()).collect::<Vec<_>>(),
                "slow_inputs": r.slow.len(), "slowest_ms": r.slowest.as_secs_f64() * 1e3,
                "largest_allocation_bytes": largest, "seconds": started.elapsed().as_secs_f64(),
            })
        );
    }
    if failed {
        eprintln!("failing inputs are in {}", failures.display());
        std::process::exit(1);
    }
}
