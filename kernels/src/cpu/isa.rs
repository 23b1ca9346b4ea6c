//! Which instruction set the CPU kernels use: [`CpuIsa`], a level the host is known to support, chosen once from
//! configuration (`FERRITE_CPU_ISA` / `--cpu-isa`) and passed by value to every dispatching kernel.
//!
//! A [`CpuIsa`] can only be made by checking the host ([`CpuIsa::host`], [`CpuIsa::capped`]), so a kernel that
//! receives one may call the matching `#[target_feature]` code: that is what keeps those `unsafe` calls sound.

use std::fmt;
use std::str::FromStr;

/// An instruction-set level, as a user names it (`scalar`, `avx2`, `avx2-vnni`, `avx512`); ordered from least to
/// most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IsaLevel {
    /// Portable Rust, no SIMD intrinsics.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX2's set plus AVX-VNNI (`vpdpwssd` on 256-bit vectors: Alder Lake and later, Zen 5): the int16 GEMM fuses
    /// each multiply-add pair into one instruction. Integer sums are exact, so results are bit-identical to `avx2`.
    Avx2Vnni,
    /// AVX2's set plus avx512f, avx512bw and gfni (GFNI also rules out the Skylake-era parts whose 512-bit
    /// instructions lower the clock).
    Avx512,
}

impl IsaLevel {
    /// Every level, lowest first.
    pub const ALL: [IsaLevel; 4] = [IsaLevel::Scalar, IsaLevel::Avx2, IsaLevel::Avx2Vnni, IsaLevel::Avx512];

    /// The name a user writes.
    pub fn name(self) -> &'static str {
        match self {
            IsaLevel::Scalar => "scalar",
            IsaLevel::Avx2 => "avx2",
            IsaLevel::Avx2Vnni => "avx2-vnni",
            IsaLevel::Avx512 => "avx512",
        }
    }

    /// True if this CPU can run the level's code.
    pub fn host_supports(self) -> bool {
        match self {
            IsaLevel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            IsaLevel::Avx2 => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            IsaLevel::Avx2Vnni => IsaLevel::Avx2.host_supports() && std::is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            IsaLevel::Avx512 => {
                IsaLevel::Avx2.host_supports()
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("gfni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

impl fmt::Display for IsaLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of choosing an instruction set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IsaError {
    #[error("unknown CPU instruction set {0:?} (expected one of: scalar, avx2, avx2-vnni, avx512)")]
    Unknown(String),
    #[error("this CPU does not support the {requested} instruction set (the best it supports is {best})")]
    Unsupported { requested: IsaLevel, best: IsaLevel },
}

impl FromStr for IsaLevel {
    type Err = IsaError;

    fn from_str(s: &str) -> Result<Self, IsaError> {
        IsaLevel::ALL.into_iter().find(|l| l.name().eq_ignore_ascii_case(s.trim())).ok_or_else(|| IsaError::Unknown(s.to_string()))
    }
}

/// An instruction-set level this host supports (the only way to make one is to check).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuIsa(IsaLevel);

impl CpuIsa {
    /// The best level this host supports.
    pub fn host() -> Self {
        let best = IsaLevel::ALL.into_iter().rev().find(|l| l.host_supports()).unwrap_or(IsaLevel::Scalar);
        CpuIsa(best)
    }

    /// Exactly `level`, or [`IsaError::Unsupported`] if the host lacks it (no silent fallback: a user who asks to
    /// measure the AVX-512 path must not get numbers from another one).
    pub fn capped(level: IsaLevel) -> Result<Self, IsaError> {
        if level.host_supports() { Ok(CpuIsa(level)) } else { Err(IsaError::Unsupported { requested: level, best: Self::host().0 }) }
    }

    /// [`CpuIsa::capped`] for `Some` cap, [`CpuIsa::host`] for `None`.
    pub fn from_cap(cap: Option<IsaLevel>) -> Result<Self, IsaError> {
        cap.map_or(Ok(Self::host()), Self::capped)
    }

    /// Every level this host supports, lowest first (what tests iterate over).
    pub fn supported() -> Vec<CpuIsa> {
        IsaLevel::ALL.into_iter().filter(|l| l.host_supports()).map(CpuIsa).collect()
    }

    pub fn level(self) -> IsaLevel {
        self.0
    }

    /// True if AVX2 + FMA + F16C code may run.
    #[inline]
    pub(crate) fn has_avx2(self) -> bool {
        self.0 >= IsaLevel::Avx2
    }

    /// True if the AVX2 kernels may use AVX-VNNI (only at that level: at `avx512` the AVX-512 kernels run).
    #[inline]
    pub(crate) fn has_avx2_vnni(self) -> bool {
        self.0 == IsaLevel::Avx2Vnni
    }

    /// True if AVX-512 (f, bw, gfni) code may run.
    #[inline]
    pub(crate) fn has_avx512(self) -> bool {
        self.0 >= IsaLevel::Avx512
    }
}

impl fmt::Display for CpuIsa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_unknown() {
        assert_eq!("avx2".parse::<IsaLevel>(), Ok(IsaLevel::Avx2));
        assert_eq!("AVX512".parse::<IsaLevel>(), Ok(IsaLevel::Avx512));
        assert_eq!("avx2-vnni".parse::<IsaLevel>(), Ok(IsaLevel::Avx2Vnni));
        assert_eq!("scalar".parse::<IsaLevel>(), Ok(IsaLevel::Scalar));
        assert_eq!("sse4".parse::<IsaLevel>(), Err(IsaError::Unknown("sse4".into())));
        for l in IsaLevel::ALL {
            assert_eq!(l.name().parse::<IsaLevel>(), Ok(l));
        }
    }

    #[test]
    fn cap_is_checked_against_the_host() {
        let host = CpuIsa::host();
        assert!(host.level().host_supports());
        assert_eq!(CpuIsa::from_cap(None), Ok(host));
        for l in IsaLevel::ALL {
            match CpuIsa::capped(l) {
                Ok(isa) => assert!(l <= host.level() && isa.level() == l),
                Err(e) => assert_eq!(e, IsaError::Unsupported { requested: l, best: host.level() }),
            }
        }
        assert_eq!(CpuIsa::supported().last(), Some(&host));
        assert_eq!(CpuIsa::supported()[0].level(), IsaLevel::Scalar);
    }
}
