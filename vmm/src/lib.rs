//! stasis: a KVM micro-VMM that boots Linux guests, checkpoints a running VM
//! and resumes it later, lazily.

pub mod checkpoint;
