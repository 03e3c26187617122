//! Small helpers shared across layers: atomic file writes, a stable hash, a seeded RNG.

use crate::error::{Error, Result};
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

pub fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

pub fn create_dir_all(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

/// 64-bit FNV-1a: a stable, dependency-free content hash (cache keys, not security).
#[derive(Clone, Copy, Debug)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn update_u32s(&mut self, xs: &[u32]) {
        for x in xs {
            self.update(&x.to_le_bytes());
        }
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// SplitMix64: a tiny seeded generator whose whole state is one u64, so it is trivially
/// saved in a checkpoint and gives the same stream on every platform and version.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }
}

/// Keep freed memory inside the process (glibc): a training step allocates and frees the same
/// large activation buffers every step, and by default glibc returns them to the kernel and
/// gets them back as fresh pages that the kernel must zero, which measured ~15% of a DPO step
/// as system time. No trimming, and no separate mappings even for the largest buffers (the
/// log-prob head's `[rows, vocab]` gradient, packed bf16 weights: 5–12 % of a step measured),
/// make every buffer reusable.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called once at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Debug aid: with `PREFER_MEMTRACE` set, print current and peak RSS with a label.
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
    eprintln!(
        "memtrace {label}: rss {:.3} GiB, peak {:.3} GiB",
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

/// Levenshtein distance, for "did you mean" suggestions.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (ca != cb) as usize).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate to `word`, if any is reasonably close.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 2).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Tests run several test threads; give candle's pool one thread each so nothing spins on an
/// oversubscribed core (measured 7x slowdowns otherwise). Call at the top of heavy tests.
pub fn set_threads_for_tests() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var("RAYON_NUM_THREADS").is_err() {
            // SAFETY: called once, before any candle op spawns its thread pool.
            unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
        }
    });
}

/// A text histogram of `xs` in `bins` equal-width bins, bars up to `width` characters.
pub fn text_histogram(xs: &[usize], bins: usize, width: usize) -> String {
    let (Some(&lo), Some(&hi)) = (xs.iter().min(), xs.iter().max()) else {
        return String::new();
    };
    let span = (hi - lo + 1).div_ceil(bins).max(1);
    let mut counts = vec![0usize; bins];
    for &x in xs {
        counts[((x - lo) / span).min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    let mut s = String::new();
    for (i, c) in counts.iter().enumerate() {
        let a = lo + i * span;
        if a > hi {
            break;
        }
        let bar = "#".repeat((c * width).div_ceil(top));
        s.push_str(&format!("  {:>6}-{:<6} {:>6} {bar}\n", a, a + span - 1, c));
    }
    s
}

/// `log σ(x)` in f64, stable for large |x| (the scalar twin of `objectives::log_sigmoid`).
pub fn log_sigmoid(x: f64) -> f64 {
    if x < 0.0 {
        x - x.exp().ln_1p()
    } else {
        -(-x).exp().ln_1p()
    }
}

/// `log Φ(z)`, the log of the standard normal CDF, in f64: `log(erfc(−z/√2)/2)`, and for
/// z < −35 (erfc underflows near −38) the asymptotic series
/// `−z²/2 − log(−z) − ½log 2π + log(1 − 1/z² + 3/z⁴ − 15/z⁶ + 105/z⁸)`.
pub fn log_ndtr(z: f64) -> f64 {
    if z < -35.0 {
        let u = 1.0 / (z * z);
        let series = 1.0 - u * (1.0 - u * (3.0 - u * (15.0 - 105.0 * u)));
        -0.5 * z * z - (-z).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln() + series.ln()
    } else if z > 6.0 {
        // Φ(z) = 1 − Φ(−z), with Φ(−z) tiny
        (-0.5 * libm::erfc(z / std::f64::consts::SQRT_2)).ln_1p()
    } else {
        (0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)).ln()
    }
}

/// P(r_w > r_l) for independent r_w ~ N(μ_w, e^{lv_w}), r_l ~ N(μ_l, e^{lv_l}):
/// Φ((μ_w − μ_l)/√(σ_w² + σ_l²)).
pub fn gaussian_preference_probability(mean_w: f64, log_var_w: f64, mean_l: f64, log_var_l: f64) -> f64 {
    log_ndtr((mean_w - mean_l) / (log_var_w.exp() + log_var_l.exp()).sqrt()).exp()
}

/// `d/dz log Φ(z) = φ(z) / Φ(z)` (the inverse Mills ratio of −z), stable in both tails.
pub fn d_log_ndtr(z: f64) -> f64 {
    (-0.5 * z * z - 0.5 * (2.0 * std::f64::consts::PI).ln() - log_ndtr(z)).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ndtr_matches_known_values_and_its_derivative() {
        // Φ(0) = ½; Φ(1.959963984540054) = 0.975; Φ(−1) = 0.15865525393145707
        assert!((log_ndtr(0.0) - 0.5f64.ln()).abs() < 1e-15);
        assert!((log_ndtr(1.959963984540054) - 0.975f64.ln()).abs() < 1e-12);
        assert!((log_ndtr(-1.0) - 0.15865525393145707f64.ln()).abs() < 1e-13);
        // log Φ(−30) and log Φ(−50), computed with mpmath at 30 digits
        assert!(
            (log_ndtr(-30.0) + 454.321_243_956_343_2).abs() < 1e-9,
            "{}",
            log_ndtr(-30.0)
        );
        assert!(
            (log_ndtr(-50.0) + 1_254.831_361_139_42).abs() < 1e-9,
            "{}",
            log_ndtr(-50.0)
        );
        // continuity where the two branches meet, and a saturating upper tail
        assert!((log_ndtr(-35.0 - 1e-12) - log_ndtr(-35.0)).abs() < 1e-9);
        assert!(log_ndtr(60.0) <= 0.0 && log_ndtr(60.0) > -1e-300);
        for z in [-60.0, -36.0, -34.0, -19.0, -3.0, -0.5, 0.0, 0.7, 4.0, 8.0] {
            let h = 1e-5 * (1.0 + f64::abs(z));
            let fd = (log_ndtr(z + h) - log_ndtr(z - h)) / (2.0 * h);
            assert!(
                (fd - d_log_ndtr(z)).abs() < 1e-6 * (1.0 + fd.abs()),
                "z {z}: fd {fd} vs {}",
                d_log_ndtr(z)
            );
        }
    }

    #[test]
    fn rng_is_reproducible_and_shuffles_all() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut v: Vec<usize> = (0..100).collect();
        Rng::new(1).shuffle(&mut v);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn closest_suggests_typos() {
        let keys = ["learning_rate", "beta", "max_length"];
        assert_eq!(closest("learnig_rate", keys), Some("learning_rate"));
        assert_eq!(closest("max_lenght", keys), Some("max_length"));
        assert_eq!(closest("zzzzzzzzzzzz", keys), None);
    }

    #[test]
    fn fnv_known_value() {
        let mut h = Fnv64::default();
        h.update(b"a");
        assert_eq!(h.finish(), 0xaf63dc4c8601ec8c);
    }
}
