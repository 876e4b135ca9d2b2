//! The heatprobe eBPF object: tracepoint programs that count page faults per page.
//!
//! One file per tracepoint family: [`user_faults`] for a process's own faults, [`kvm_faults`]
//! for guest faults handled by KVM. Both feed [`counters::count`], which keeps every count in
//! kernel maps; nothing is sent to userspace per event.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod counters;
#[cfg(target_arch = "bpf")]
mod kvm_faults;
#[cfg(target_arch = "bpf")]
mod user_faults;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path, so a loaded
    // program never gets here.
    unsafe { core::hint::unreachable_unchecked() }
}

/// bpf_probe_read_kernel is GPL-only, so the programs must declare a GPL-compatible license.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// On the host this binary is an empty shell so `cargo build --workspace` and clippy work;
/// the real object is built for `bpfel-unknown-none` by `cargo xtask build`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
