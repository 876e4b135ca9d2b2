//! On a fresh machine tracefs is not mounted; loading the probes mounts it. This test lives in
//! its own binary because it unmounts tracefs, which must not race other probe loads.

use std::{ffi::CString, path::Path};

use heatprobe::{Probes, probes::tracefs};
use heatprobe_tests::{bpf_unavailable, skip};

fn unmount_tracefs() -> std::io::Result<()> {
    let target = CString::new(tracefs::TRACEFS).expect("no NUL");
    // Unmount every stacked mount at the path, so the directory is really bare.
    while tracefs::is_mounted() {
        // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
        if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn loading_the_probes_mounts_tracefs() {
    if let Some(why) = bpf_unavailable() {
        return skip("loading_the_probes_mounts_tracefs", &why);
    }
    unmount_tracefs().expect("unmount tracefs to recreate a fresh machine");
    assert!(!Path::new(tracefs::TRACEFS).join("events").exists());
    let probes = Probes::load().expect("load probes without tracefs mounted");
    assert!(tracefs::is_mounted(), "tracefs was mounted");
    assert!(probes.is_attached(heatprobe::probes::PROCESS_EVENT));
}
