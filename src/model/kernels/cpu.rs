//! Which instruction sets the kernels use: detected once at run time, and capped on purpose
//! with the environment variable `PREFER_KERNELS` (`portable`, `avx2`, `avx512`, `avx512bf16`
//! or `amx`), so that every path a CPU supports can be run and tested on it.
//!
//! Each path adds to the one before it:
//! - `portable`: plain Rust, what the crate is compiled for (x86-64 baseline or any other CPU);
//! - `avx2`: the row kernels (norms, softmax, SwiGLU, few-row products) in AVX2 + FMA;
//! - `avx512`: the few-row products of decoding in AVX-512;
//! - `avx512bf16`: bf16 matrix products with `vdpbf16ps` (AMD Zen 4/5, Intel Cooper Lake and
//!   later), f32 sums;
//! - `amx`: bf16 matrix products on AMX tiles (Intel Xeon 4th generation and later).
//!
//! The f32 GEMM of training comes from the `gemm` crate, which chooses its own kernels; the cap
//! does not reach it.

use std::sync::OnceLock;

/// A set of instructions the kernels may use, from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuPath {
    Portable,
    Avx2,
    Avx512,
    Avx512Bf16,
    Amx,
}

impl CpuPath {
    pub const ALL: [CpuPath; 5] = [
        CpuPath::Portable,
        CpuPath::Avx2,
        CpuPath::Avx512,
        CpuPath::Avx512Bf16,
        CpuPath::Amx,
    ];

    /// The name `PREFER_KERNELS` takes.
    pub fn name(self) -> &'static str {
        match self {
            CpuPath::Portable => "portable",
            CpuPath::Avx2 => "avx2",
            CpuPath::Avx512 => "avx512",
            CpuPath::Avx512Bf16 => "avx512bf16",
            CpuPath::Amx => "amx",
        }
    }

    pub fn parse(s: &str) -> Option<CpuPath> {
        CpuPath::ALL
            .into_iter()
            .find(|p| p.name() == s.trim().to_ascii_lowercase())
    }

    /// The most this CPU (and, for AMX, the operating system) supports.
    pub fn detected() -> CpuPath {
        static DETECTED: OnceLock<CpuPath> = OnceLock::new();
        *DETECTED.get_or_init(detect)
    }

    /// The paths this CPU can run, least first: the ones a test should try.
    pub fn supported() -> Vec<CpuPath> {
        CpuPath::ALL.into_iter().filter(|p| *p <= CpuPath::detected()).collect()
    }

    /// The path the kernels take: the detected one, capped by `PREFER_KERNELS`. A cap above
    /// what the CPU has is the CPU's own path; an unknown name is reported once and ignored.
    pub fn active() -> CpuPath {
        static ACTIVE: OnceLock<CpuPath> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let detected = CpuPath::detected();
            match std::env::var("PREFER_KERNELS") {
                Ok(v) if !v.is_empty() => match CpuPath::parse(&v) {
                    Some(cap) => cap.min(detected),
                    None => {
                        eprintln!(
                            "PREFER_KERNELS={v} is not a kernel path (portable, avx2, avx512, avx512bf16, amx): using {}",
                            detected.name()
                        );
                        detected
                    }
                },
                _ => detected,
            }
        })
    }

    /// Whether the kernels may use this path's instructions.
    pub fn allows(self) -> bool {
        CpuPath::active() >= self
    }

    /// The bf16 product kernel that beats the f32 GEMM here, if any: AMX tiles; or
    /// `vdpbf16ps` on AMD (Zen 4/5 run it at twice the f32 FMA rate: 2048³ at 400–425 GFLOP/s
    /// against 203–217 in f32 on a 2-vCPU EPYC, packing included) or when `PREFER_KERNELS`
    /// asks for it. Intel CPUs with AVX512-BF16 but no AMX (Cooper Lake, or a Sapphire Rapids
    /// guest whose hypervisor hides AMX) issue `vdpbf16ps` at half the rate of their two FMA
    /// ports: measured on a Xeon with AMX forced to this path, 180 GFLOP/s against 310 in f32.
    pub fn fast_bf16() -> Option<CpuPath> {
        static FAST: OnceLock<Option<CpuPath>> = OnceLock::new();
        *FAST.get_or_init(|| match CpuPath::active() {
            CpuPath::Amx => Some(CpuPath::Amx),
            CpuPath::Avx512Bf16 if amd() || std::env::var("PREFER_KERNELS").is_ok_and(|v| v.trim() == "avx512bf16") => {
                Some(CpuPath::Avx512Bf16)
            }
            _ => None,
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn amd() -> bool {
    let r = std::arch::x86_64::__cpuid(0);
    let vendor: Vec<u8> = [r.ebx, r.edx, r.ecx].iter().flat_map(|w| w.to_le_bytes()).collect();
    vendor == b"AuthenticAMD"
}

#[cfg(not(target_arch = "x86_64"))]
fn amd() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuPath {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        return CpuPath::Portable;
    }
    if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")) {
        return CpuPath::Avx2;
    }
    if !is_x86_feature_detected!("avx512bf16") {
        return CpuPath::Avx512;
    }
    if super::matmul::amx_permitted() {
        CpuPath::Amx
    } else {
        CpuPath::Avx512Bf16
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuPath {
    CpuPath::Portable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_paths_are_ordered() {
        for p in CpuPath::ALL {
            assert_eq!(CpuPath::parse(p.name()), Some(p));
        }
        assert_eq!(CpuPath::parse(" AVX2 "), Some(CpuPath::Avx2));
        assert_eq!(CpuPath::parse("sse"), None);
        assert!(CpuPath::Portable < CpuPath::Avx2 && CpuPath::Avx512Bf16 < CpuPath::Amx);
        let s = CpuPath::supported();
        assert_eq!(s[0], CpuPath::Portable);
        assert_eq!(*s.last().unwrap(), CpuPath::detected());
        assert!(CpuPath::active() <= CpuPath::detected());
        // a cap from the environment (the lower-path runs of the kernel tests) holds
        match std::env::var("PREFER_KERNELS").ok().and_then(|v| CpuPath::parse(&v)) {
            Some(cap) => assert_eq!(CpuPath::active(), cap.min(CpuPath::detected())),
            None => assert_eq!(CpuPath::active(), CpuPath::detected()),
        }
    }
}
