//! The migrator: KVM partitions and their live migration. Built out by later issues.
