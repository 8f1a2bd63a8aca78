//! Restoring guest memory from a checkpoint: lazily through userfaultfd,
//! or eagerly before the VM runs; and the working set a lazy restore
//! loads first.

pub mod uffd;
pub mod working_set;
