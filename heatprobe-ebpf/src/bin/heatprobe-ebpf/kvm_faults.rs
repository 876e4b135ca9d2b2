//! KVM guest faults, by guest frame number, on the vCPU threads of tracked VMs.
//!
//! Which events fire depends on the host's MMU:
//! - TDP hosts (VMX/SVM with EPT/NPT): `kvm:kvm_page_fault` (error code) then
//!   `kvmmmu:kvm_mmu_spte_requested` (gfn) on the slow path, or `kvmmmu:fast_page_fault`
//!   alone when the fast path fixes a write-protected spte.
//! - Shadow-paging hosts: `kvmmmu:kvm_mmu_pagetable_walk` (error code) then
//!   `kvmmmu:kvm_mmu_spte_requested` (gfn).
//!
//! So the events carrying the error code stash it per thread, and the event carrying the gfn
//! counts, taking the stashed access kind. Each guest fault is counted exactly once.

use aya_ebpf::{
    cty::c_long, helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use heatprobe_ebpf::{PAGE_SHIFT, PF_PRESENT, PF_WRITE};

use crate::counters::{PENDING_ACCESS, VCPU_TARGETS, count, field, offset_of_field, read_error};

/// The tracked VM of the current thread, if it is a tracked vCPU thread.
#[inline(always)]
fn current_vcpu_target() -> Option<(u32, u32)> {
    let tid = bpf_get_current_pid_tgid() as u32;
    let target = VCPU_TARGETS.get_ptr(&tid)?;
    // SAFETY: a non-null pointer to a live u32 map value.
    Some((tid, unsafe { *target }))
}

#[tracepoint(category = "kvm", name = "kvm_page_fault")]
pub fn kvm_page_fault(ctx: TracePointContext) -> u32 {
    stash_error_code(&ctx, offset_of_field!(kvm_fault_error_code))
}

#[tracepoint(category = "kvmmmu", name = "kvm_mmu_pagetable_walk")]
pub fn kvm_mmu_pagetable_walk(ctx: TracePointContext) -> u32 {
    stash_error_code(&ctx, offset_of_field!(walk_pferr))
}

fn stash_error_code(ctx: &TracePointContext, offset: usize) -> u32 {
    if try_stash_error_code(ctx, offset).is_err() {
        read_error(ctx);
    }
    0
}

fn try_stash_error_code(ctx: &TracePointContext, offset: usize) -> Result<(), c_long> {
    let Some((tid, _)) = current_vcpu_target() else {
        return Ok(());
    };
    // `pferr` is a u32 and `error_code` a u64; the access bits live in the low word, and
    // x86 is little-endian, so reading a u32 at the field's offset works for both.
    let error_code: u32 = field(ctx, offset)?;
    PENDING_ACCESS.insert(&tid, &u64::from(error_code), 0)?;
    Ok(())
}

#[tracepoint(category = "kvmmmu", name = "kvm_mmu_spte_requested")]
pub fn kvm_mmu_spte_requested(ctx: TracePointContext) -> u32 {
    if try_kvm_mmu_spte_requested(&ctx).is_err() {
        read_error(&ctx);
    }
    0
}

fn try_kvm_mmu_spte_requested(ctx: &TracePointContext) -> Result<(), c_long> {
    let Some((tid, target)) = current_vcpu_target() else {
        return Ok(());
    };
    let gfn: u64 = field(ctx, offset_of_field!(spte_gfn))?;
    let error_code = match PENDING_ACCESS.get_ptr(&tid) {
        // SAFETY: a non-null pointer to a live u64 map value.
        Some(pending) => unsafe { *pending },
        None => 0,
    };
    let _ = PENDING_ACCESS.remove(&tid);
    count(
        ctx,
        target,
        gfn,
        error_code & PF_WRITE != 0,
        error_code & PF_PRESENT != 0,
    );
    Ok(())
}

#[tracepoint(category = "kvmmmu", name = "fast_page_fault")]
pub fn fast_page_fault(ctx: TracePointContext) -> u32 {
    if try_fast_page_fault(&ctx).is_err() {
        read_error(&ctx);
    }
    0
}

fn try_fast_page_fault(ctx: &TracePointContext) -> Result<(), c_long> {
    let Some((tid, target)) = current_vcpu_target() else {
        return Ok(());
    };
    let ret: u32 = field(ctx, offset_of_field!(fast_fault_ret))?;
    // Only a fault the fast path fixed ends here; otherwise the slow path counts it.
    if ret != offset_of_field!(fast_fault_fixed) as u32 {
        return Ok(());
    }
    let gpa: u64 = field(ctx, offset_of_field!(fast_fault_gpa))?;
    let error_code: u64 = field(ctx, offset_of_field!(fast_fault_error_code))?;
    let _ = PENDING_ACCESS.remove(&tid);
    count(
        ctx,
        target,
        gpa >> PAGE_SHIFT,
        error_code & PF_WRITE != 0,
        error_code & PF_PRESENT != 0,
    );
    Ok(())
}
