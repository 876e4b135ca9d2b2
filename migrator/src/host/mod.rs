//! What every server of partitions on a host shares, whether one daemon or a supervisor
//! with a process per partition: the admission limits, how heat is sampled, the allocator's
//! settings, and how partitions are named and remembered.

pub mod admission;
pub mod heat_sampling;
pub mod memory;

/// How many stopped partitions a daemon remembers (for `status` and `list`), and how many
/// committed sessions it remembers for a late abort.
pub const KEEP_STOPPED: usize = 128;

/// The `n`th partition id of this process: `p{n}-` and a salt of the process and the time,
/// so that ids differ across daemons and their restarts.
pub fn new_partition_id(n: u64) -> String {
    let salt = xxhash_rust::xxh3::xxh3_64(
        format!(
            "{}-{n}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        )
        .as_bytes(),
    );
    format!("p{n}-{:06x}", salt & 0xff_ffff)
}
