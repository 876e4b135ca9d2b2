//! The VMM: KVM partitions running guest images at CPL 3 under guest ABI v1.

pub mod cpu;
pub mod dirty;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod pace;
pub mod partition;
pub mod sampler;
pub mod snapshot;
pub mod state;
pub mod status;
pub mod throttle;
pub mod vcpu;

pub use memory::{GuestAddress, GuestMemory, MemoryDigest};
pub use partition::{GuestImage, Partition, PartitionConfig, PartitionError};
pub use snapshot::PartitionSnapshot;
pub use status::{AwaitingHandover, PartitionState, PartitionStatus, PostcopyPaused};
