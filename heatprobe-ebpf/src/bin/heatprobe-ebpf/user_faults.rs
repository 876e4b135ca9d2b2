//! `exceptions:page_fault_user`: a tracked process's own page faults, by virtual page.
//!
//! Two programs, one attached: the raw tracepoint reads the event's `TP_PROTO` arguments
//! `(address, regs, error_code)` directly, skipping the record the classic tracepoint builds
//! for every event, which measured about 2.5 times cheaper per fault (docs/BENCHMARKS.md).
//! The classic tracepoint, with offsets from the format file, is the fallback where raw
//! tracepoints cannot attach.

use aya_ebpf::{
    cty::c_long,
    helpers::bpf_get_current_pid_tgid,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use heatprobe_ebpf::{PAGE_SHIFT, PF_PRESENT, PF_WRITE};

use crate::counters::{PROCESS_TARGETS, count, field, offset_of_field, read_error};

/// The tracked target of the current process, if it is tracked: the one lookup an untracked
/// process pays.
#[inline(always)]
fn current_process_target() -> Option<u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let target = PROCESS_TARGETS.get_ptr(&tgid)?;
    // SAFETY: a non-null pointer to a live u32 map value.
    Some(unsafe { *target })
}

#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault_user(ctx: RawTracePointContext) -> i32 {
    let Some(target) = current_process_target() else {
        return 0;
    };
    let address: u64 = ctx.arg(0);
    let error_code: u64 = ctx.arg(2);
    count(
        &ctx,
        target,
        address >> PAGE_SHIFT,
        error_code & PF_WRITE != 0,
        error_code & PF_PRESENT != 0,
    );
    0
}

#[tracepoint(category = "exceptions", name = "page_fault_user")]
pub fn page_fault_user_record(ctx: TracePointContext) -> u32 {
    if try_page_fault_user_record(&ctx).is_err() {
        read_error(&ctx);
    }
    0
}

fn try_page_fault_user_record(ctx: &TracePointContext) -> Result<(), c_long> {
    let Some(target) = current_process_target() else {
        return Ok(());
    };
    let address: u64 = field(ctx, offset_of_field!(user_fault_address))?;
    let error_code: u64 = field(ctx, offset_of_field!(user_fault_error_code))?;
    count(
        ctx,
        target,
        address >> PAGE_SHIFT,
        error_code & PF_WRITE != 0,
        error_code & PF_PRESENT != 0,
    );
    Ok(())
}
