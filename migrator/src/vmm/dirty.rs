//! The KVM dirty log of a partition's memory slot.
//!
//! kvm-ioctls offers KVM_GET_DIRTY_LOG in its classic form, which returns the dirty bitmap and
//! write-protects the slot again in one step (manual-protect mode needs KVM_CLEAR_DIRTY_LOG,
//! which it does not wrap). Two users fetch it: the migration, which needs every dirty bit, and
//! the heat sampler, which fetches only to re-arm write faults. So fetched bits accumulate here
//! until the migration takes them.

use kvm_ioctls::VmFd;

pub struct DirtyLog {
    pending: Vec<u64>,
}

impl DirtyLog {
    pub fn new(frames: u64) -> Self {
        Self {
            pending: vec![0; frames.div_ceil(64) as usize],
        }
    }

    /// Fetches the kernel's bitmap into the pending bits (re-arming write protection).
    pub fn accumulate(&mut self, vm: &VmFd, mem_size: u64) -> Result<(), kvm_ioctls::Error> {
        let bitmap = vm.get_dirty_log(0, mem_size as usize)?;
        for (pending, fresh) in self.pending.iter_mut().zip(bitmap) {
            *pending |= fresh;
        }
        Ok(())
    }

    /// Everything dirtied since the last fetch.
    pub fn fetch(&mut self, vm: &VmFd, mem_size: u64) -> Result<Vec<u64>, kvm_ioctls::Error> {
        self.accumulate(vm, mem_size)?;
        let empty = vec![0; self.pending.len()];
        Ok(std::mem::replace(&mut self.pending, empty))
    }
}

/// The frame numbers set in a dirty bitmap.
pub fn dirty_frames(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(i, &word)| {
        (0..64)
            .filter(move |bit| word & (1 << bit) != 0)
            .map(move |bit| i as u64 * 64 + bit)
    })
}
