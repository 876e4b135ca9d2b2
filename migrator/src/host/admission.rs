//! What one daemon may take on, and the check every launch and incoming migration passes.
//!
//! Usage is derived from what the inventory holds (live partitions, incoming sessions) plus
//! what is reserved for launches and migrations still starting, all read under the
//! inventory's one lock: two requests cannot both see room that only one of them fits in.

use thiserror::Error;

/// What one daemon may take on; past these, requests are refused with a clear error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Live partitions plus incoming migrations.
    pub max_partitions: usize,
    /// Guest memory of live partitions plus incoming migrations, in bytes.
    pub max_memory: u64,
    /// Outgoing migrations running at once.
    pub max_migrations: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_partitions: 64,
            max_memory: u64::MAX,
            max_migrations: 4,
        }
    }
}

/// Partitions and their guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub partitions: usize,
    pub memory: u64,
}

impl Usage {
    pub fn one(memory: u64) -> Self {
        Self {
            partitions: 1,
            memory,
        }
    }

    pub fn plus(self, other: Self) -> Self {
        Self {
            partitions: self.partitions.saturating_add(other.partitions),
            memory: self.memory.saturating_add(other.memory),
        }
    }

    pub fn minus(self, other: Self) -> Self {
        Self {
            partitions: self.partitions.saturating_sub(other.partitions),
            memory: self.memory.saturating_sub(other.memory),
        }
    }
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum AdmissionError {
    #[error("this daemon already hosts its maximum of {max} partitions")]
    Partitions { max: usize },
    #[error(
        "{} MiB more guest memory would exceed this daemon's limit of {} MiB ({} MiB in use)",
        .wanted >> 20, .limit >> 20, .used >> 20
    )]
    Memory { wanted: u64, limit: u64, used: u64 },
    #[error("this daemon already runs its maximum of {max} migrations")]
    Migrations { max: usize },
}

impl Limits {
    /// Whether one more partition of `memory` bytes fits beside `used` (hosted plus
    /// reserved).
    pub fn admit(&self, used: Usage, memory: u64) -> Result<(), AdmissionError> {
        if used.partitions >= self.max_partitions {
            return Err(AdmissionError::Partitions {
                max: self.max_partitions,
            });
        }
        if used.memory.saturating_add(memory) > self.max_memory {
            return Err(AdmissionError::Memory {
                wanted: memory,
                limit: self.max_memory,
                used: used.memory,
            });
        }
        Ok(())
    }

    /// Whether one more outgoing migration may start beside `running` ones.
    pub fn admit_migration(&self, running: usize) -> Result<(), AdmissionError> {
        if running >= self.max_migrations {
            return Err(AdmissionError::Migrations {
                max: self.max_migrations,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn limits(partitions: usize, memory: u64) -> Limits {
        Limits {
            max_partitions: partitions,
            max_memory: memory,
            max_migrations: 2,
        }
    }

    #[test]
    fn the_last_partition_that_fits_is_admitted() {
        let limits = limits(2, 96 * MIB);
        assert_eq!(limits.admit(Usage::default(), 64 * MIB), Ok(()));
        assert_eq!(limits.admit(Usage::one(64 * MIB), 32 * MIB), Ok(()));
        assert_eq!(
            limits.admit(Usage::one(64 * MIB), 33 * MIB),
            Err(AdmissionError::Memory {
                wanted: 33 * MIB,
                limit: 96 * MIB,
                used: 64 * MIB
            })
        );
        let two = Usage::one(MIB).plus(Usage::one(MIB));
        assert_eq!(
            limits.admit(two, MIB),
            Err(AdmissionError::Partitions { max: 2 })
        );
    }

    #[test]
    fn messages_say_which_limit() {
        let full = limits(2, 48 * MIB).admit(Usage::one(40 * MIB), 16 * MIB);
        let text = full.unwrap_err().to_string();
        assert!(
            text.contains("exceed this daemon's limit of 48 MiB"),
            "{text}"
        );
        assert!(text.contains("40 MiB in use"), "{text}");
        let text = limits(2, u64::MAX)
            .admit(Usage::one(1).plus(Usage::one(1)), 1)
            .unwrap_err()
            .to_string();
        assert!(text.contains("maximum of 2 partitions"), "{text}");
    }

    #[test]
    fn usage_arithmetic_saturates() {
        let huge = Usage {
            partitions: usize::MAX,
            memory: u64::MAX,
        };
        assert_eq!(huge.plus(Usage::one(1)), huge);
        assert_eq!(Usage::default().minus(Usage::one(5)), Usage::default());
        assert_eq!(
            limits(usize::MAX, u64::MAX).admit(Usage::one(u64::MAX), 1),
            Ok(())
        );
    }

    #[test]
    fn migrations_are_limited() {
        let limits = limits(1, 1);
        assert_eq!(limits.admit_migration(1), Ok(()));
        assert_eq!(
            limits.admit_migration(2),
            Err(AdmissionError::Migrations { max: 2 })
        );
    }
}
