//! Live migration of a partition between two daemons.
//!
//! - `control`: what the source asks of the destination, and how those calls fail;
//! - `protocol`: the data frames, versioned; `transport`: sending and reading them, paced;
//!   `compress`: compressing their pages (`--compress`);
//! - `link`: opening the data connection (plain or TLS), its socket policy and TLS tunnel;
//! - `source`: the source's phases, rounds of dirty pages, cutover and rollback;
//!   `order`: the page order (heat or address), kept current from the dirty log;
//!   `convergence`: when the rounds stop;
//! - `destination`: sessions that receive pages, restore the partition, and in hybrid mode
//!   serve missing pages through userfaultfd;
//! - `heat_file`: heat read from a file (`migrate --heat-file`), checked;
//! - `job`: a running migration as a job: its id, progress and an operator's steering;
//! - `report`: what a migration reports (names follow QEMU's query-migrate where they can).

pub mod compress;
pub mod control;
pub mod convergence;
pub mod destination;
pub mod heat_file;
pub mod job;
pub mod link;
pub mod order;
pub mod plan_choice;
pub mod protocol;
pub mod report;
pub mod source;
pub mod transport;

pub use report::{
    DowntimeBreakdown, MigrationProgress, MigrationReport, MigrationStatus, Mode, Strategy,
};
