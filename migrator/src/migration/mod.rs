//! Live migration of a partition between two daemons.
//!
//! - `protocol`: the data frames, versioned; `transport`: sending and reading them, paced;
//! - `link`: opening the data connection (plain or TLS), its socket policy and TLS tunnel;
//! - `source`: plans (heat or address order), rounds of dirty pages, convergence, cutover;
//! - `destination`: sessions that receive pages, restore the partition, and in hybrid mode
//!   serve missing pages through userfaultfd;
//! - `report`: what a migration reports (names follow QEMU's query-migrate where they can).

pub mod destination;
pub mod link;
pub mod protocol;
pub mod report;
pub mod source;
pub mod transport;

pub use report::{MigrationProgress, MigrationReport, Mode, Strategy};
