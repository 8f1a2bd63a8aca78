//! stasis: a KVM micro-VMM that boots Linux guests, checkpoints a running VM
//! and resumes it later, lazily.

pub mod acpi;
pub mod api;
pub mod backup;
pub mod boot;
pub mod builder;
pub mod checkpoint;
pub mod config;
pub mod content;
pub mod devices;
pub mod layout;
pub mod persist;
pub mod restore;
pub mod seccomp;
pub mod snapshot;
pub mod terminal;
pub mod vmm;
pub mod vstate;

/// An error and its sources on one line: `what failed: why: deeper why`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
