//! `stasis-vsock`: a guest's end of a virtio-vsock stream, piped to stdin and
//! stdout (like `socat - VSOCK-CONNECT:CID:PORT`). Installed as
//! /bin/stasis-vsock in the default guest's initramfs and disk image; built
//! static by guest-images/build. `stasis-vsock --help` says how to use it.

mod args;
mod pipe;
mod vsock;

use std::io;
use std::os::fd::AsFd;
use std::process::ExitCode;

use args::Command;
use pipe::{PipeError, Side};

/// An io::Error as a short phrase: "Connection reset by peer", without
/// std's " (os error 104)".
fn phrase(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

fn pipe_error(what: &str, err: &PipeError) -> String {
    let side = match err.side {
        Side::Input => "reading stdin",
        Side::Output => "writing stdout",
        Side::Socket => what,
    };
    format!("{side}: {}", phrase(&err.error))
}

/// Pipes stdin and stdout through `sock`; `what` names the connection.
fn serve(sock: &std::os::fd::OwnedFd, what: &str, input_done: &mut bool) -> Result<(), String> {
    let stdin = io::stdin();
    let stdout = io::stdout();
    pipe::pipe(stdin.as_fd(), stdout.as_fd(), sock.as_fd(), input_done)
        .map_err(|e| pipe_error(what, &e))
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Help => {
            println!("{}", args::USAGE);
            Ok(())
        }
        Command::Connect { cid, port } => {
            let what = format!("connection to {cid}:{port}");
            let sock = vsock::connect(cid, port)
                .map_err(|e| format!("connect to {cid}:{port}: {}", phrase(&e)))?;
            serve(&sock, &what, &mut false)
        }
        Command::Listen { port, count } => {
            let listener = vsock::listen(port)
                .map_err(|e| format!("listen on port {port}: {}", phrase(&e)))?;
            let mut input_done = false;
            let mut served = 0u64;
            while count.is_none_or(|n| served < n) {
                let (sock, cid, peer_port) = vsock::accept(&listener)
                    .map_err(|e| format!("accept on port {port}: {}", phrase(&e)))?;
                let what = format!("connection from {cid}:{peer_port}");
                serve(&sock, &what, &mut input_done)?;
                served += 1;
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let command = match args::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stasis-vsock: {e} (see stasis-vsock --help)");
            return ExitCode::from(2);
        }
    };
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("stasis-vsock: {msg}");
            ExitCode::FAILURE
        }
    }
}
