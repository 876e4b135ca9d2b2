//! The CPU a guest is given: the CPUID KVM supports on the host it launches on, and that
//! host's TSC rate. A snapshot keeps the CPU's vendor, the registers of CPUID that announce
//! features, and the TSC rate; a restore refuses a host that cannot give the guest the same,
//! in the spirit of Firecracker's check of the CPU vendor on restore.
//!
//! The guest reads the TSC rate once, from its boot info, and paces itself and reads time with
//! `rdtsc` from then on; a TSC ticking at another rate after a move would make its clock and
//! its rates wrong without any error.

use std::num::NonZeroU32;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::Serialize;
use thiserror::Error;

/// A register of one CPUID leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Register {
    fn name(self) -> &'static str {
        match self {
            Self::Eax => "EAX",
            Self::Ebx => "EBX",
            Self::Ecx => "ECX",
            Self::Edx => "EDX",
        }
    }

    fn of(self, entry: &kvm_cpuid_entry2) -> u32 {
        match self {
            Self::Eax => entry.eax,
            Self::Ebx => entry.ebx,
            Self::Ecx => entry.ecx,
            Self::Edx => entry.edx,
        }
    }

    fn of_mut(self, entry: &mut kvm_cpuid_entry2) -> &mut u32 {
        match self {
            Self::Eax => &mut entry.eax,
            Self::Ebx => &mut entry.ebx,
            Self::Ecx => &mut entry.ecx,
            Self::Edx => &mut entry.edx,
        }
    }
}

/// One CPUID register whose bits announce features: `(leaf, subleaf, register)`.
pub type FeatureRegister = (u32, u32, Register);

/// The CPUID registers a snapshot keeps, in this order. Each bit set is a feature a guest may
/// have seen and used; a destination must offer it too.
pub const FEATURE_REGISTERS: [FeatureRegister; 14] = [
    (0x1, 0, Register::Ecx),         // SSE3 .. AVX, RDRAND, hypervisor
    (0x1, 0, Register::Edx),         // FPU .. SSE2
    (0x7, 0, Register::Ebx),         // BMI, AVX2, AVX-512F ..
    (0x7, 0, Register::Ecx),         // AVX-512 VBMI, GFNI, VAES ..
    (0x7, 0, Register::Edx),         // FSRM, AVX-512 VP2INTERSECT ..
    (0x7, 1, Register::Eax),         // AVX-VNNI, AVX-512 BF16 ..
    (0xd, 0, Register::Eax),         // XSAVE components (XCR0, low half)
    (0xd, 0, Register::Edx),         // XSAVE components (XCR0, high half)
    (0xd, 1, Register::Eax),         // XSAVEOPT, XSAVEC, XGETBV1, XSAVES
    (0x8000_0001, 0, Register::Ecx), // LAHF, ABM, SSE4A ..
    (0x8000_0001, 0, Register::Edx), // syscall, NX, RDTSCP, long mode ..
    (0x8000_0007, 0, Register::Edx), // invariant TSC
    (0x8000_0008, 0, Register::Ebx), // CLZERO, WBNOINVD, RDPRU ..
    (0x4000_0001, 0, Register::Eax), // KVM's paravirtual features
];

/// The leaves whose EBX, EDX, ECX spell the vendor.
const VENDOR_LEAF: u32 = 0;

#[derive(Debug, Error)]
pub enum CpuError {
    #[error("KVM refused to report the CPUID it supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("this host's TSC rate cannot be read")]
    HostTsc(#[source] kvm_ioctls::Error),
    #[error("this host reports a TSC rate of 0 kHz")]
    HostTscZero,
    #[error("the guest ran on a CPU of vendor `{saved}`; this host's is `{host}`")]
    Vendor { saved: String, host: String },
    #[error(
        "the guest saw CPUID features this host lacks: leaf {leaf:#x}.{subleaf} {register}, bits {missing:#010x}"
    )]
    Features {
        leaf: u32,
        subleaf: u32,
        register: &'static str,
        missing: u32,
    },
    #[error(
        "the guest's TSC ran at {saved} kHz; this host's runs at {host} kHz and it cannot scale a guest's TSC (no KVM_CAP_TSC_CONTROL)"
    )]
    TscScaling { saved: u32, host: u32 },
    #[error(
        "the guest's TSC ran at {saved} kHz; this host's runs at {host} kHz and KVM refused to set the guest's"
    )]
    TscRate {
        saved: u32,
        host: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// KVM's default `tsc_tolerance_ppm`: a requested rate this close to the host's runs at the
/// host's, unscaled, and KVM accepts it as matched. Hosts of one model calibrate rates this
/// close to each other.
pub const TSC_TOLERANCE_PPM: u64 = 250;

/// How a host gives a guest its TSC rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscMatch {
    /// The host's own rate is the guest's, within [`TSC_TOLERANCE_PPM`].
    Native,
    /// The host scales the guest's TSC (KVM_CAP_TSC_CONTROL).
    Scaled,
}

/// Whether a host whose TSC runs at `host` kHz, scaling guests' TSCs or not, can give a guest
/// the rate `saved`.
///
/// Without scaling, KVM_SET_TSC_KHZ refuses a slower rate but accepts a faster one, which it
/// then only approximates by moving the guest's TSC forward at VM entries while it ticks at the
/// host's rate in between; that is refused here too. A refused KVM_SET_TSC_KHZ still leaves its
/// rate in what KVM_GET_TSC_KHZ reports, so `host` is read before anything is set.
pub fn tsc_match(saved: u32, host: u32, scaling: bool) -> Result<TscMatch, CpuError> {
    let tolerance = u64::from(host) * TSC_TOLERANCE_PPM / 1_000_000;
    if u64::from(saved.abs_diff(host)) <= tolerance {
        Ok(TscMatch::Native)
    } else if scaling {
        Ok(TscMatch::Scaled)
    } else {
        Err(CpuError::TscScaling { saved, host })
    }
}

/// What a guest was given of its CPU, as a snapshot keeps it (`vmm::state` writes it, and
/// reads it back checking the rate).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GuestCpu {
    /// The TSC rate the guest was told (its boot info) and its TSC runs at.
    pub tsc_khz: NonZeroU32,
    /// CPUID leaf 0's vendor string (EBX, EDX, ECX): `AuthenticAMD`, `GenuineIntel`.
    pub vendor: [u8; 12],
    /// The value of each of [`FEATURE_REGISTERS`], in order; 0 where the leaf was absent.
    pub features: [u32; FEATURE_REGISTERS.len()],
}

/// The CPUID KVM supports on this host: what a new guest is given.
pub fn host_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuError::SupportedCpuid)
}

/// This host's TSC rate, as KVM gives it to `vcpu` by default.
pub fn host_tsc_khz(vcpu: &VcpuFd) -> Result<NonZeroU32, CpuError> {
    let khz = vcpu.get_tsc_khz().map_err(CpuError::HostTsc)?;
    NonZeroU32::new(khz).ok_or(CpuError::HostTscZero)
}

fn entry(cpuid: &CpuId, leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == leaf && (e.index == subleaf || !is_indexed(e)))
}

/// Whether the entry's subleaf (ECX on input) matters.
fn is_indexed(entry: &kvm_cpuid_entry2) -> bool {
    entry.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0
}

fn vendor_of(cpuid: &CpuId) -> [u8; 12] {
    let mut vendor = [0; 12];
    if let Some(e) = entry(cpuid, VENDOR_LEAF, 0) {
        vendor[0..4].copy_from_slice(&e.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&e.edx.to_le_bytes());
        vendor[8..12].copy_from_slice(&e.ecx.to_le_bytes());
    }
    vendor
}

fn vendor_text(vendor: &[u8; 12]) -> String {
    String::from_utf8_lossy(vendor).into_owned()
}

impl GuestCpu {
    /// The CPU of a guest given `cpuid` and a TSC at `tsc_khz`.
    pub fn new(cpuid: &CpuId, tsc_khz: NonZeroU32) -> Self {
        let features = FEATURE_REGISTERS.map(|(leaf, subleaf, register)| {
            entry(cpuid, leaf, subleaf).map_or(0, |e| register.of(e))
        });
        Self {
            tsc_khz,
            vendor: vendor_of(cpuid),
            features,
        }
    }

    /// Checks that `host` (the CPUID this host supports) is of the guest's vendor and has
    /// every feature the guest saw, then narrows its feature registers to the guest's, so the
    /// guest keeps seeing what it saw (and a later move back checks the same set).
    pub fn fit(&self, host: &mut CpuId) -> Result<(), CpuError> {
        let vendor = vendor_of(host);
        if vendor != self.vendor {
            return Err(CpuError::Vendor {
                saved: vendor_text(&self.vendor),
                host: vendor_text(&vendor),
            });
        }
        for (&(leaf, subleaf, register), &saw) in FEATURE_REGISTERS.iter().zip(&self.features) {
            let has = entry(host, leaf, subleaf).map_or(0, |e| register.of(e));
            let missing = saw & !has;
            if missing != 0 {
                return Err(CpuError::Features {
                    leaf,
                    subleaf,
                    register: register.name(),
                    missing,
                });
            }
        }
        for (&(leaf, subleaf, register), &saw) in FEATURE_REGISTERS.iter().zip(&self.features) {
            for e in host.as_mut_slice() {
                if e.function == leaf && (e.index == subleaf || !is_indexed(e)) {
                    *register.of_mut(e) &= saw;
                }
            }
        }
        Ok(())
    }

    /// Gives a new `vcpu` the guest's TSC rate with KVM_SET_TSC_KHZ, or refuses a host that
    /// cannot match it (see [`tsc_match`]). A host whose own rate is the guest's is fine even
    /// if setting it fails.
    pub fn set_tsc(&self, kvm: &Kvm, vcpu: &VcpuFd) -> Result<(), CpuError> {
        let saved = self.tsc_khz.get();
        // A new vCPU's rate is the host's until it is set.
        let host = host_tsc_khz(vcpu)?.get();
        let how = tsc_match(saved, host, kvm.check_extension(Cap::TscControl))?;
        match (vcpu.set_tsc_khz(saved), how) {
            (Ok(()), _) | (Err(_), TscMatch::Native) => Ok(()),
            (Err(source), TscMatch::Scaled) => Err(CpuError::TscRate {
                saved,
                host,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 7 || function == 0xd {
                kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A made-up AMD host: "Auth" "enti" "cAMD" in EBX, EDX, ECX.
    fn host(leaf1_ecx: u32, leaf7_ebx: u32) -> CpuId {
        CpuId::from_entries(&[
            leaf(0, 0, [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            leaf(1, 0, [0xa00f11, 0x800, leaf1_ecx, 0x178b_fbff]),
            leaf(7, 0, [0, leaf7_ebx, 0x2, 0x10]),
            leaf(7, 1, [0x20, 0, 0, 0]),
            leaf(0x8000_0001, 0, [0, 0, 0x75c2_37ff, 0x2fd3_fbff]),
        ])
        .expect("a few entries fit")
    }

    fn khz(rate: u32) -> NonZeroU32 {
        NonZeroU32::new(rate).expect("non-zero")
    }

    #[test]
    fn a_tsc_rate_is_matched_natively_within_kvms_tolerance_or_by_scaling() {
        // This machine's rate; 250 ppm of it is 649 kHz.
        let host = 2_596_128;
        assert_eq!(tsc_match(host, host, false).unwrap(), TscMatch::Native);
        assert_eq!(
            tsc_match(host + 649, host, false).unwrap(),
            TscMatch::Native
        );
        assert_eq!(
            tsc_match(host - 649, host, false).unwrap(),
            TscMatch::Native
        );
        assert_eq!(tsc_match(host + 650, host, true).unwrap(), TscMatch::Scaled);
        assert_eq!(tsc_match(1_000_000, host, true).unwrap(), TscMatch::Scaled);
        for saved in [host + 650, host - 650, 1_000_000, u32::MAX] {
            assert!(
                matches!(
                    tsc_match(saved, host, false),
                    Err(CpuError::TscScaling { saved: s, host: h }) if s == saved && h == host
                ),
                "{saved}"
            );
        }
    }

    #[test]
    fn the_vendor_and_features_are_read_from_cpuid() {
        let cpu = GuestCpu::new(&host(0x7ed8_320b, 0xf1bf_97a9), khz(2_596_128));
        assert_eq!(&cpu.vendor, b"AuthenticAMD");
        assert_eq!(cpu.features[0], 0x7ed8_320b);
        assert_eq!(cpu.features[2], 0xf1bf_97a9);
        assert_eq!(cpu.features[5], 0x20, "leaf 7 subleaf 1 is its own entry");
        // No leaf 0xd or 0x8000_0007 on this host: nothing seen there.
        assert_eq!(cpu.features[6..9], [0, 0, 0]);
        assert_eq!(cpu.features[11..13], [0, 0]);
    }

    #[test]
    fn an_identical_host_fits_and_is_left_unchanged() {
        let cpu = GuestCpu::new(&host(0x7ed8_320b, 0xf1bf_97a9), khz(2_596_128));
        let mut same = host(0x7ed8_320b, 0xf1bf_97a9);
        cpu.fit(&mut same).expect("fits");
        assert_eq!(same.as_slice(), host(0x7ed8_320b, 0xf1bf_97a9).as_slice());
    }

    #[test]
    fn a_host_with_more_features_is_narrowed_to_the_guests() {
        let cpu = GuestCpu::new(&host(0x0000_320b, 0x1), khz(1));
        let mut bigger = host(0x7ed8_320b, 0xf1bf_97a9);
        cpu.fit(&mut bigger).expect("fits");
        assert_eq!(GuestCpu::new(&bigger, khz(1)), cpu);
    }

    #[test]
    fn another_vendor_is_refused() {
        let cpu = GuestCpu::new(&host(0, 0), khz(1));
        let mut intel = host(0, 0);
        // "Genu" "ineI" "ntel".
        let e = &mut intel.as_mut_slice()[0];
        (e.ebx, e.edx, e.ecx) = (0x756e_6547, 0x4965_6e69, 0x6c65_746e);
        let err = cpu.fit(&mut intel).expect_err("refused");
        assert!(
            matches!(&err, CpuError::Vendor { saved, host }
                if saved == "AuthenticAMD" && host == "GenuineIntel"),
            "{err:?}"
        );
    }

    #[test]
    fn a_feature_the_guest_saw_and_the_host_lacks_is_refused() {
        let cpu = GuestCpu::new(&host(0x7ed8_320b, 0xf1bf_97a9), khz(1));
        let mut smaller = host(0x7ed8_320b, 0xf1bf_97a9 & !(1 << 16));
        assert!(matches!(
            cpu.fit(&mut smaller),
            Err(CpuError::Features {
                leaf: 7,
                subleaf: 0,
                register: "EBX",
                missing: 0x1_0000,
            })
        ));
        // A host without leaf 7 subleaf 1 lacks what the guest saw there.
        let mut no_subleaf = CpuId::from_entries(
            &host(0x7ed8_320b, 0xf1bf_97a9)
                .as_slice()
                .iter()
                .filter(|e| !(e.function == 7 && e.index == 1))
                .copied()
                .collect::<Vec<_>>(),
        )
        .expect("fits");
        assert!(matches!(
            cpu.fit(&mut no_subleaf),
            Err(CpuError::Features {
                leaf: 7,
                subleaf: 1,
                ..
            })
        ));
    }
}
