//! stasis: a KVM micro-VMM that boots Linux guests, checkpoints a running VM
//! and resumes it later, lazily.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod builder;
pub mod checkpoint;
pub mod config;
pub mod devices;
pub mod layout;
pub mod terminal;
pub mod vstate;
