//! `stasis checkpoint …` subcommands.

use clap::Subcommand;

/// Work on checkpoint files.
#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Show what a checkpoint file holds.
    Inspect {
        /// The checkpoint file.
        file: std::path::PathBuf,
    },
}

/// Errors of the checkpoint subcommands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Not written yet.
    #[error("checkpoint commands are not available yet")]
    Unavailable,
}

/// Runs one checkpoint subcommand.
pub fn run(cmd: CheckpointCommand) -> Result<(), CliError> {
    let CheckpointCommand::Inspect { .. } = cmd;
    Err(CliError::Unavailable)
}
