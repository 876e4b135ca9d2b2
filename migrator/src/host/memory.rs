//! The daemon's own memory: what migrations allocate must not stay resident after them.

/// Allocations of at least this size get a mapping of their own, unmapped when freed.
pub const MMAP_THRESHOLD: usize = 1 << 20;

/// Makes the allocator (glibc) give large buffers mappings of their own, for the life of the
/// process.
///
/// By default glibc raises its mmap threshold to the size of every mapped block that is freed
/// (up to 32 MiB). So once the first migration had freed its 4 MiB frame buffers, later ones
/// came from the malloc arenas of whichever threads ran them, and each arena kept the freed
/// buffers at its top, resident: the daemon's own memory (RssAnon) grew by about 5 MiB with
/// every wave of eight concurrent migrations, to 60 MiB after ten waves, with under 1 MiB in
/// use (the load test's long variant measures it). A fixed threshold also fixes the trim
/// threshold at its 128 KiB default, so freed memory at an arena's top goes back too.
pub fn keep_large_buffers_mapped() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter (under the allocator's own lock); it
    // touches no memory of ours.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}
