//! `exceptions:page_fault_user`: a tracked process's own page faults, by virtual page.

use aya_ebpf::{
    cty::c_long, helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use heatprobe_ebpf::{PAGE_SHIFT, PF_PRESENT, PF_WRITE};

use crate::counters::{PROCESS_TARGETS, count, field, offset_of_field, read_error};

#[tracepoint(category = "exceptions", name = "page_fault_user")]
pub fn page_fault_user(ctx: TracePointContext) -> u32 {
    if try_page_fault_user(&ctx).is_err() {
        read_error(&ctx);
    }
    0
}

fn try_page_fault_user(ctx: &TracePointContext) -> Result<(), c_long> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // The one lookup an untracked process pays.
    let Some(target) = PROCESS_TARGETS.get_ptr(&tgid) else {
        return Ok(());
    };
    // SAFETY: a non-null pointer to a live u32 map value.
    let target = unsafe { *target };
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
