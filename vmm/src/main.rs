//! The `stasis` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "stasis", version, about = "Boot, checkpoint and lazily resume KVM guests")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checkpoint files: inspect, verify, pack, unpack.
    Checkpoint {
        #[command(subcommand)]
        command: stasis::checkpoint::cli::CheckpointCommand,
    },
}

/// Prints an error and its sources on one line.
fn report(err: &dyn std::error::Error) {
    let mut line = format!("stasis: error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{line}");
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Checkpoint { command } => {
            stasis::checkpoint::cli::run(command).map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(err.as_ref());
            ExitCode::FAILURE
        }
    }
}
