//! Restoring guest memory from a checkpoint: lazily through userfaultfd,
//! or eagerly before the VM runs.

pub mod uffd;
