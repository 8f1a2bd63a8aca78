//! The `stasis` command line.

use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use stasis::builder::{self, GuestExit};
use stasis::config::{parse_size, ConfigError, VmConfig};

#[derive(Debug, Parser)]
#[command(name = "stasis", version, about = "Boot, checkpoint and lazily resume KVM guests")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a Linux kernel with its serial console on this terminal.
    Boot(BootArgs),
    /// Checkpoint files: inspect, verify, pack, unpack.
    Checkpoint {
        #[command(subcommand)]
        command: stasis::checkpoint::cli::CheckpointCommand,
    },
}

#[derive(Debug, clap::Args)]
struct BootArgs {
    /// Kernel image: ELF vmlinux or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1 quiet"].
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    memory: String,
    /// Number of vCPUs (1 to 32).
    #[arg(long, value_name = "N", default_value = "1")]
    vcpus: String,
}

/// Errors of the command line itself.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("invalid --vcpus {0:?}: expected a whole number")]
    Vcpus(String),
    #[error("invalid --memory")]
    Memory(#[source] ConfigError),
}

fn boot(args: BootArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let memory = parse_size(&args.memory).map_err(CliError::Memory)?;
    let vcpus: u64 = args.vcpus.trim().parse().map_err(|_| CliError::Vcpus(args.vcpus.clone()))?;
    let config = VmConfig::new(args.kernel, args.initrd, args.cmdline, memory, vcpus)?;
    match builder::boot_and_run(&config)? {
        GuestExit::PowerOff => log::info!("guest powered off"),
        GuestExit::Reset => log::info!("guest rebooted; a microVM ends on reboot"),
    }
    Ok(ExitCode::SUCCESS)
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
    let result: Result<ExitCode, Box<dyn std::error::Error>> = match cli.command {
        Command::Boot(args) => boot(args),
        Command::Checkpoint { command } => stasis::checkpoint::cli::run(command)
            .map(|()| ExitCode::SUCCESS)
            .map_err(Into::into),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            report(err.as_ref());
            ExitCode::FAILURE
        }
    }
}
