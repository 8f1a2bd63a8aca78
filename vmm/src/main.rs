//! The `stasis` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use stasis::api::{self, AfterSnapshot, ApiRequest};
use stasis::builder::{self, DiskSource, MemoryMode, RestoreOptions, WorkingSetMode};
use stasis::vmm::{GuestExit, RestoreReport};
use stasis::config::{parse_size, ConfigError, VmConfig};
use stasis::content::grants::parse_grant_spec;
use stasis::content::service::ContentConfig;
use stasis::content::store::Store;
use stasis::content::ContentId;
use stasis::error_chain;
use stasis::seccomp::Mode as SeccompMode;

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
    /// Resume a VM from a snapshot directory, in this process.
    Restore(RestoreArgs),
    /// Pause a running VM's vCPUs.
    Pause(SockArgs),
    /// Resume a paused VM's vCPUs.
    Resume(SockArgs),
    /// Snapshot a running VM into a directory (live unless --then exit or
    /// --stop-the-world), or work on snapshot directories.
    Snapshot(SnapshotCmd),
    /// Show a running VM's state.
    Status(SockArgs),
    /// Back a running VM up into a backup store (the first backup full,
    /// each next one what changed since), or work on backup stores.
    Backup(BackupCmd),
    /// Content for guests: a store of files by ID, and what a VM may fetch.
    Content {
        #[command(subcommand)]
        command: ContentCommand,
    },
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
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1 pci=off quiet"].
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    memory: String,
    /// Number of vCPUs (1 to 32).
    #[arg(long, value_name = "N", default_value = "1")]
    vcpus: String,
    /// Serve the control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// A disk image as a virtio-blk device; `,ro` makes it read-only.
    /// Repeatable (up to 8): the first is /dev/vda.
    #[arg(long, value_name = "PATH[,ro]")]
    disk: Vec<String>,
    /// A virtio-vsock device: the guest's CID (3 or more) and the Unix
    /// socket host programs connect to (`CONNECT <port>`); guest
    /// connections to host port P go to UDS_PATH_P.
    #[arg(long, value_name = "CID,UDS_PATH")]
    vsock: Option<String>,
    /// A virtio-rng entropy device, fed from the host's getrandom.
    #[arg(long, value_enum, default_value = "on")]
    rng: OnOff,
    #[command(flatten)]
    content: ContentArgs,
    #[command(flatten)]
    seccomp: SeccompArgs,
}

/// Seccomp options of `boot` and `restore` (docs/seccomp.md).
#[derive(Debug, clap::Args)]
struct SeccompArgs {
    /// What a VMM thread's system call outside its filter's list does:
    /// `enforce` kills the process, `trap` names the call and exits with
    /// status 1, `log` names it and lets it through, `off` has no filters
    /// [default: $STASIS_SECCOMP, else enforce].
    #[arg(long, value_name = "MODE", value_parser = ["enforce", "trap", "log", "off"])]
    seccomp: Option<String>,
    /// No seccomp filters (the same as `--seccomp off`), for debugging.
    #[arg(long, conflicts_with = "seccomp")]
    no_seccomp: bool,
}

impl SeccompArgs {
    /// Compiles the filters the VMM's threads will install.
    fn init(&self) -> Result<(), Box<dyn std::error::Error>> {
        let mode = if self.no_seccomp {
            SeccompMode::Off
        } else if let Some(mode) = &self.seccomp {
            mode.parse()?
        } else {
            match std::env::var("STASIS_SECCOMP") {
                Ok(mode) if !mode.is_empty() => mode.parse().map_err(|e| format!("STASIS_SECCOMP: {e}"))?,
                _ => SeccompMode::Enforce,
            }
        };
        stasis::seccomp::init(mode)?;
        Ok(())
    }
}

/// Content provisioning options of `boot` and `restore`.
#[derive(Debug, clap::Args)]
struct ContentArgs {
    /// Serve content from this store to the guest over vsock
    /// (docs/content.md); adds a vsock device (guest CID 3, no host
    /// socket) when --vsock is not given.
    #[arg(long, value_name = "DIR")]
    content_store: Option<PathBuf>,
    /// Let the guest fetch this content ID, N times at most and/or for
    /// SECONDS. Repeatable. Grants are not saved in snapshots.
    #[arg(long, value_name = "ID[,uses=N][,expires=SECONDS]", requires = "content_store")]
    grant: Vec<String>,
    /// The vsock host port the content service listens on.
    #[arg(long, value_name = "PORT", default_value_t = stasis::content::service::DEFAULT_PORT, requires = "content_store")]
    content_port: u32,
    /// The largest item the guest may fetch, e.g. 64M.
    #[arg(long, value_name = "SIZE", requires = "content_store")]
    content_max_size: Option<String>,
    /// Content requests per second the guest may make (0: no limit).
    #[arg(long, value_name = "N", default_value_t = stasis::content::service::DEFAULT_RATE, requires = "content_store")]
    content_rate: u32,
}

impl ContentArgs {
    /// The content service these options ask for.
    fn config(&self) -> Result<Option<ContentConfig>, Box<dyn std::error::Error>> {
        let Some(store) = &self.content_store else { return Ok(None) };
        let mut config = ContentConfig::new(store.clone());
        config.port = self.content_port;
        config.rate = self.content_rate;
        config.max_size = match &self.content_max_size {
            Some(size) => Some(parse_size(size).map_err(|e| format!("invalid --content-max-size: {e}"))?),
            None => None,
        };
        config.grants = self.grant.iter().map(|g| parse_grant_spec(g)).collect::<Result<_, _>>()?;
        Ok(Some(config))
    }
}

#[derive(Debug, Subcommand)]
enum ContentCommand {
    /// Import files into a content store (created if missing); prints
    /// each file's ID.
    Add {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// The files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// List a content store's items and sizes.
    List {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
    },
    /// Let a running VM fetch content IDs.
    Grant {
        /// The VM's control socket.
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
        /// Each grant serves this many requests, then it is gone.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        uses: Option<u64>,
        /// Each grant is gone after this many seconds.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        expires: Option<u64>,
        /// The IDs (sha256:<64 hex digits>).
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
    /// Take content grants away from a running VM.
    Revoke {
        /// The VM's control socket.
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
        /// The IDs.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
    /// Show a running VM's content grants.
    Grants {
        /// The VM's control socket.
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DiskSourceArg {
    /// A working copy of the snapshot's disk copies.
    Copy,
    /// The images the VM had when snapshotted, if unchanged since.
    Original,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MemoryArg {
    /// Load memory on demand while the VM runs.
    Lazy,
    /// Load all memory, then run.
    Eager,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum WorkingSetArg {
    Auto,
    Record,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum WorkingSetLoadArg {
    Before,
    During,
}

#[derive(Debug, clap::Args)]
struct RestoreArgs {
    /// Snapshot directory.
    dir: PathBuf,
    /// How guest memory comes back.
    #[arg(long, value_enum, default_value = "lazy")]
    memory: MemoryArg,
    /// Load the rest of memory in the background after resume (lazy only).
    #[arg(long, value_enum, default_value = "on")]
    prefetch: OnOff,
    /// The snapshot's working set (the memory blocks a restored guest
    /// needs first; lazy only): `auto` loads the one saved in the snapshot
    /// directory first and records one when there is none (or it cannot be
    /// used: a warning says why); `record` records a new one; `off` does
    /// neither.
    #[arg(long, value_enum, default_value = "auto")]
    working_set: WorkingSetArg,
    /// Load the working set `before` the vCPUs start (no faults on its
    /// blocks), or `during` their first moments (faults served first).
    #[arg(long, value_enum, default_value = "before")]
    working_set_load: WorkingSetLoadArg,
    /// How long a recording of the working set lasts, in milliseconds
    /// after memory is set up; background prefetch waits for its end.
    #[arg(long, value_name = "MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    working_set_window: u64,
    /// Serve the control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Print the restore report as JSON on stderr when the VM ends.
    #[arg(long)]
    json: bool,
    /// Where the disks come from: working copies of the snapshot's copies
    /// (the snapshot stays as it is), or the original images if they did
    /// not change since the snapshot.
    #[arg(long, value_enum, default_value = "copy")]
    disk_source: DiskSourceArg,
    /// Keep the working copies of the disks in this (new or empty)
    /// directory; without it they go to a temporary directory removed when
    /// the VM ends.
    #[arg(long, value_name = "DIR")]
    disk_dir: Option<PathBuf>,
    /// The vsock device's host socket, instead of the one saved.
    #[arg(long, value_name = "UDS_PATH")]
    vsock_uds: Option<PathBuf>,
    #[command(flatten)]
    content: ContentArgs,
    #[command(flatten)]
    seccomp: SeccompArgs,
}

#[derive(Debug, clap::Args)]
struct SockArgs {
    /// The VM's control socket.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ThenArg {
    /// Let the VM run on.
    Resume,
    /// End the VM once the snapshot is written.
    Exit,
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct SnapshotCmd {
    #[command(subcommand)]
    command: Option<SnapshotSub>,
    #[command(flatten)]
    take: SnapshotArgs,
}

#[derive(Debug, Subcommand)]
enum SnapshotSub {
    /// Merge a snapshot and the chain of parents it builds on into one
    /// self-contained snapshot.
    Flatten {
        /// The (incremental) snapshot directory.
        dir: PathBuf,
        /// Where to write the self-contained snapshot.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct SnapshotArgs {
    /// The VM's control socket.
    #[arg(long, value_name = "PATH", required = true)]
    api_sock: Option<PathBuf>,
    /// Snapshot directory to write (created, or replaced if it holds a
    /// snapshot).
    #[arg(long, value_name = "DIR", required = true)]
    out: Option<PathBuf>,
    /// What the VM does after the snapshot.
    #[arg(long, value_enum, default_value = "resume")]
    then: ThenArg,
    /// Write only the memory changed since PARENT_DIR, the VM's latest
    /// snapshot (an incremental snapshot; restoring it needs PARENT_DIR).
    #[arg(long, value_name = "PARENT_DIR")]
    parent: Option<PathBuf>,
    /// Keep the guest paused until memory is written, as `--then exit`
    /// does (by default the guest runs on while memory is written).
    #[arg(long)]
    stop_the_world: bool,
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct BackupCmd {
    #[command(subcommand)]
    command: Option<BackupSub>,
    #[command(flatten)]
    take: BackupArgs,
}

#[derive(Debug, Subcommand)]
enum BackupSub {
    /// List a store's backups.
    List {
        /// The backup store.
        store: PathBuf,
    },
    /// Check every backup of a store: chain links and every block's checksum.
    Verify {
        /// The backup store.
        store: PathBuf,
    },
    /// Keep the newest N backups: fold the older ones into the oldest kept
    /// one, which becomes full. Safe to kill at any point.
    Merge {
        /// The backup store.
        store: PathBuf,
        /// How many backups to keep (at least 1).
        #[arg(long, value_name = "N")]
        keep: usize,
    },
}

#[derive(Debug, clap::Args)]
struct BackupArgs {
    /// The VM's control socket.
    #[arg(long, value_name = "PATH", required = true)]
    api_sock: Option<PathBuf>,
    /// The backup store (created if missing or empty).
    #[arg(long, value_name = "STORE", required = true)]
    to: Option<PathBuf>,
    /// Copy everything, not only what changed since the store's latest
    /// backup.
    #[arg(long)]
    full: bool,
    /// The VM's state directory, where the retired record of its latest
    /// backup is kept (default: $STASIS_STATE_DIR/VM_ID, else
    /// $XDG_STATE_HOME/stasis/vms/VM_ID, else ~/.local/state/stasis/vms/VM_ID).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// Errors of the command line itself.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("invalid --vcpus {0:?}: expected a whole number")]
    Vcpus(String),
    #[error("invalid --memory")]
    Memory(#[source] ConfigError),
}

fn exit_for(exit: GuestExit) -> ExitCode {
    match exit {
        GuestExit::PowerOff => log::info!("guest powered off"),
        GuestExit::Reset => log::info!("guest rebooted; a microVM ends on reboot"),
        GuestExit::Snapshotted => log::info!("snapshot taken; VM ended"),
    }
    ExitCode::SUCCESS
}

/// A progress bar on stderr for snapshots, when stderr is a terminal.
fn progress_bar() -> Box<dyn FnMut(u64, u64) + Send> {
    if !std::io::stderr().is_terminal() {
        return Box::new(|_, _| {});
    }
    let mut last = u64::MAX;
    Box::new(move |done, total| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if pct == last {
            return;
        }
        last = pct;
        let filled = (pct / 4) as usize;
        // The terminal is in raw mode while the VM runs: return the
        // carriage ourselves.
        eprint!("\r\x1b[Ksnapshot [{}{}] {pct:3}%", "#".repeat(filled), "-".repeat(25 - filled));
        if done >= total {
            eprint!("\r\n");
        }
    })
}

fn boot(args: BootArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let memory = parse_size(&args.memory).map_err(CliError::Memory)?;
    let vcpus: u64 = args.vcpus.trim().parse().map_err(|_| CliError::Vcpus(args.vcpus.clone()))?;
    let mut config = VmConfig::new(args.kernel, args.initrd, args.cmdline, memory, vcpus)?.with_devices(
        &args.disk,
        args.vsock.as_deref(),
        matches!(args.rng, OnOff::On),
    )?;
    config.content = args.content.config()?;
    args.seccomp.init()?;
    let mut vmm = builder::build_microvm_for_boot(&config)?;
    vmm.set_snapshot_progress(progress_bar());
    let (result, _) = vmm.run(args.api_sock.as_deref());
    Ok(exit_for(result?))
}

/// A figure, or `-` when there is none.
fn dash(value: Option<u64>) -> String {
    value.map_or("-".to_string(), |v| v.to_string())
}

fn print_restore_report(report: Option<RestoreReport>, json: bool) {
    let Some(report) = report else { return };
    if json {
        if let Ok(text) = serde_json::to_string(&report) {
            eprintln!("{text}");
        }
        return;
    }
    let mut line = format!(
        "stasis: restore: memory={} latency_ms={:.1}",
        report.memory, report.restore_latency_ms
    );
    if let Some(l) = report.loader {
        line.push_str(&format!(
            " faults={} blocks_on_fault={} blocks_prefetched={} resident_after_ms={} fault_p50_us={} fault_p99_us={}",
            l.faults,
            l.blocks_on_fault,
            l.blocks_prefetched,
            dash(l.resident_after_ms),
            dash(l.fault_p50_us),
            dash(l.fault_p99_us),
        ));
        let ws = l.working_set;
        line.push_str(&format!(
            " working_set={} working_set_blocks={} blocks_working_set={} working_set_ms={}",
            serde_json::to_value(ws.state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
            ws.blocks,
            l.blocks_working_set,
            dash(ws.loaded_ms),
        ));
    }
    eprintln!("{line}");
}

fn restore(args: RestoreArgs, start: Instant) -> Result<ExitCode, Box<dyn std::error::Error>> {
    builder::restore_phase(start, "command line read");
    let memory = match args.memory {
        MemoryArg::Lazy => MemoryMode::Lazy {
            prefetch: matches!(args.prefetch, OnOff::On),
            working_set: match args.working_set {
                WorkingSetArg::Auto => WorkingSetMode::Auto,
                WorkingSetArg::Record => WorkingSetMode::Record,
                WorkingSetArg::Off => WorkingSetMode::Off,
            },
            working_set_before: matches!(args.working_set_load, WorkingSetLoadArg::Before),
            working_set_window: Duration::from_millis(args.working_set_window),
        },
        MemoryArg::Eager => MemoryMode::Eager,
    };
    let disks = match args.disk_source {
        DiskSourceArg::Copy => DiskSource::Copy { dir: args.disk_dir },
        DiskSourceArg::Original => DiskSource::Original,
    };
    let options = RestoreOptions { memory, disks, vsock_uds: args.vsock_uds, content: args.content.config()? };
    args.seccomp.init()?;
    builder::restore_phase(start, "seccomp filters compiled");
    let mut vmm = builder::build_microvm_from_snapshot(&args.dir, &options, start)?;
    vmm.set_snapshot_progress(progress_bar());
    let (result, report) = vmm.run(args.api_sock.as_deref());
    print_restore_report(report, args.json);
    Ok(exit_for(result?))
}

/// Sends one control request and prints the reply as JSON on stdout.
fn control(sock: PathBuf, request: ApiRequest) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let reply = api::send_request(&sock, &request)?;
    println!("{}", serde_json::Value::Object(reply));
    Ok(ExitCode::SUCCESS)
}

/// Content IDs from the command line.
fn parse_ids(ids: &[String]) -> Result<Vec<ContentId>, Box<dyn std::error::Error>> {
    Ok(ids.iter().map(|id| id.parse::<ContentId>()).collect::<Result<_, _>>()?)
}

/// `stasis content ...`.
fn content(command: ContentCommand) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match command {
        ContentCommand::Add { store, files } => {
            let store = Store::create_or_open(&store)?;
            for file in files {
                let imported = store.add(&file)?;
                println!("{}  {}", imported.id, file.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        ContentCommand::List { store } => {
            for (id, size) in Store::open(&store)?.list()? {
                println!("{id} {size}");
            }
            Ok(ExitCode::SUCCESS)
        }
        ContentCommand::Grant { api_sock, uses, expires, ids } => {
            control(api_sock, ApiRequest::Grant { ids: parse_ids(&ids)?, uses, expires_s: expires })
        }
        ContentCommand::Revoke { api_sock, ids } => control(api_sock, ApiRequest::Revoke { ids: parse_ids(&ids)? }),
        ContentCommand::Grants { api_sock } => control(api_sock, ApiRequest::Grants),
    }
}

/// `stasis snapshot flatten DIR --out NEW`.
fn flatten(dir: &std::path::Path, out: &std::path::Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let report = stasis::snapshot::flatten_snapshot(dir, out)?;
    println!("{}", report);
    Ok(ExitCode::SUCCESS)
}

/// Parses the command line. `stasis restore` is on the resume latency path,
/// and building the parser of every subcommand costs it about 60 ms in the
/// emulated test host (0.3 ms natively), so a well-formed `restore` command
/// line is read by a parser of that subcommand alone. Anything that parser
/// does not accept, `--help` included, goes through the whole command line's
/// parser, which gives the same messages as always.
fn parse_command_line(args: Vec<std::ffi::OsString>) -> Result<Cli, clap::Error> {
    if args.get(1).is_some_and(|a| a == "restore") {
        use clap::{Args, FromArgMatches};
        let parser = RestoreArgs::augment_args(clap::Command::new("restore"));
        if let Ok(args) = parser.try_get_matches_from(&args[1..]).and_then(|m| RestoreArgs::from_arg_matches(&m)) {
            return Ok(Cli { command: Command::Restore(args) });
        }
    }
    Cli::try_parse_from(args)
}

fn main() -> ExitCode {
    let start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    log::debug!("stasis started: logging set up {:.1} ms into main", start.elapsed().as_secs_f64() * 1000.0);
    let cli = parse_command_line(std::env::args_os().collect()).unwrap_or_else(|e| e.exit());
    let result: Result<ExitCode, Box<dyn std::error::Error>> = match cli.command {
        Command::Boot(args) => boot(args),
        Command::Restore(args) => restore(args, start),
        Command::Pause(args) => control(args.api_sock, ApiRequest::Pause),
        Command::Resume(args) => control(args.api_sock, ApiRequest::Resume),
        Command::Status(args) => control(args.api_sock, ApiRequest::Status),
        Command::Snapshot(SnapshotCmd { command: Some(SnapshotSub::Flatten { dir, out }), .. }) => flatten(&dir, &out),
        Command::Snapshot(SnapshotCmd { command: None, take }) => {
            let then = match take.then {
                ThenArg::Resume => AfterSnapshot::Resume,
                ThenArg::Exit => AfterSnapshot::Exit,
            };
            // clap requires both when there is no subcommand.
            match (take.api_sock, take.out) {
                (Some(sock), Some(out)) => control(
                    sock,
                    ApiRequest::Snapshot { out, then, parent: take.parent, stop_the_world: take.stop_the_world },
                ),
                _ => Err("stasis snapshot needs --api-sock and --out".into()),
            }
        }
        Command::Backup(BackupCmd { command: Some(sub), .. }) => {
            let mut out = std::io::stdout();
            match sub {
                BackupSub::List { store } => stasis::backup::list(&store, &mut out),
                BackupSub::Verify { store } => stasis::backup::verify(&store, &mut out),
                BackupSub::Merge { store, keep } => stasis::backup::merge::merge(&store, keep).and_then(|report| {
                    let line = serde_json::json!({ "merge": report }).to_string();
                    std::io::Write::write_all(&mut out, format!("{line}\n").as_bytes()).map_err(|e| e.to_string())
                }),
            }
            .map(|()| ExitCode::SUCCESS)
            .map_err(Into::into)
        }
        Command::Backup(BackupCmd { command: None, take }) => match (take.api_sock, take.to) {
            (Some(sock), Some(to)) => control(sock, ApiRequest::Backup { to, full: take.full, state_dir: take.state_dir }),
            _ => Err("stasis backup needs --api-sock and --to".into()),
        },
        Command::Content { command } => content(command),
        Command::Checkpoint { command } => stasis::checkpoint::cli::run(command)
            .map(|()| ExitCode::SUCCESS)
            .map_err(Into::into),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("stasis: error: {}", error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<std::ffi::OsString> {
        line.split_whitespace().map(Into::into).collect()
    }

    #[test]
    fn restore_fast_path_reads_what_the_whole_parser_reads() {
        for line in [
            "stasis restore DIR",
            "stasis restore --memory eager DIR --api-sock /s --json",
            "stasis restore DIR --memory lazy --prefetch off --working-set record --working-set-window 4000",
            "stasis restore --working-set-load during --disk-source original DIR --vsock-uds /v --seccomp trap",
            "stasis restore DIR --disk-dir /d --no-seccomp",
        ] {
            let fast = parse_command_line(words(line)).expect(line);
            let whole = Cli::try_parse_from(words(line)).expect(line);
            assert!(matches!(fast.command, Command::Restore(_)), "{line}");
            assert_eq!(format!("{fast:?}"), format!("{whole:?}"), "{line}");
        }
    }

    #[test]
    fn restore_lines_the_fast_path_refuses_get_the_whole_parsers_answer() {
        for line in [
            "stasis restore",
            "stasis restore DIR --bogus",
            "stasis restore DIR --memory sideways",
            "stasis restore DIR --working-set-window 0",
            "stasis restore DIR --seccomp off --no-seccomp",
            "stasis restore --help",
        ] {
            let fast = parse_command_line(words(line)).expect_err(line);
            let whole = Cli::try_parse_from(words(line)).expect_err(line);
            assert_eq!(fast.kind(), whole.kind(), "{line}");
            assert_eq!(fast.to_string(), whole.to_string(), "{line}");
        }
    }

    #[test]
    fn other_commands_parse_as_before() {
        let cli = parse_command_line(words("stasis status --api-sock /s")).expect("status");
        assert!(matches!(cli.command, Command::Status(_)));
        assert!(parse_command_line(words("stasis restor DIR")).is_err());
    }
}
