//! The host terminal while a guest owns the console: raw mode while the VM
//! runs, and the saved settings restored on every way out (normal return,
//! panic, and the signals that end the process).

use std::sync::OnceLock;

/// The settings to put back, readable from a signal handler.
static SAVED: OnceLock<libc::termios> = OnceLock::new();

const STDIN: libc::c_int = libc::STDIN_FILENO;

/// Errors while switching the terminal mode.
#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    /// tcgetattr failed.
    #[error("cannot read the terminal settings")]
    GetAttr(#[source] std::io::Error),
    /// tcsetattr failed.
    #[error("cannot switch the terminal to raw mode")]
    SetAttr(#[source] std::io::Error),
    /// sigaction failed.
    #[error("cannot install the signal handler that restores the terminal")]
    Signal(#[source] std::io::Error),
}

fn restore_saved() {
    if let Some(saved) = SAVED.get() {
        // SAFETY: tcsetattr only reads the termios we pass; it is
        // async-signal-safe, so this may run in a signal handler.
        unsafe { libc::tcsetattr(STDIN, libc::TCSANOW, saved) };
    }
}

extern "C" fn restore_and_exit(signal: libc::c_int) {
    restore_saved();
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(128 + signal) };
}

/// Raw mode on stdin for as long as this lives, when stdin is a terminal.
pub struct RawTerminal {
    _private: (),
}

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal; `None` if it is not.
    pub fn enter() -> Result<Option<Self>, TerminalError> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(STDIN) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; all-zero is a valid value that
        // tcgetattr overwrites.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into the termios we own.
        if unsafe { libc::tcgetattr(STDIN, &mut termios) } != 0 {
            return Err(TerminalError::GetAttr(std::io::Error::last_os_error()));
        }
        let _ = SAVED.set(termios);
        install_handlers()?;
        let mut raw = termios;
        // SAFETY: cfmakeraw only edits the termios we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr only reads the termios we pass.
        if unsafe { libc::tcsetattr(STDIN, libc::TCSANOW, &raw) } != 0 {
            return Err(TerminalError::SetAttr(std::io::Error::last_os_error()));
        }
        Ok(Some(RawTerminal { _private: () }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_saved();
    }
}

fn install_handlers() -> Result<(), TerminalError> {
    for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGINT] {
        // SAFETY: sigaction is plain data; zeroed is a valid empty action.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = restore_and_exit as *const () as usize;
        // SAFETY: we install a handler that only calls async-signal-safe
        // functions.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(TerminalError::Signal(std::io::Error::last_os_error()));
        }
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_saved();
        previous(info);
    }));
    Ok(())
}
