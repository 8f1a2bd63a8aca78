//! Staged checkpoint files (being written).

pub mod cli;
