//! Seccomp filters: each thread of a running VMM confines itself to the
//! system calls its kind needs (`allowlist.rs`, with a reason for each)
//! before it touches anything the guest controls.
//!
//! [`init`] compiles every kind's filter once, at startup, so a thread (or
//! the forked writer) only installs a ready program. Modes:
//! - `enforce` (the default): a call on no list kills the process
//!   (SIGSYS; the kernel logs it as audit type 1326);
//! - `trap`: the same call prints one line naming the thread, its filter,
//!   the call and its first arguments, then the process exits with status 1;
//! - `log`: the line is printed once per filter and call, and the call is
//!   made anyway: for finding what a list lacks;
//! - `off` (`--no-seccomp`): no filters.
//!
//! `log` makes a forbidden call from the SIGSYS handler through one fixed
//! `syscall` instruction (`stasis_seccomp_syscall`) that its filters let through by
//! address. Calls that change the signal mask or start threads cannot be
//! made from a handler; every filter allows them (`EVERY_THREAD`) or the
//! kinds that need them (`SPAWNS_THREADS`), so `log` never has to.

mod allowlist;
mod names;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use allowlist::Allowed;

/// What a call on no list does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Trap,
    Log,
    Off,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "trap" => Ok(Mode::Trap),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("unknown seccomp mode {s:?}: expected enforce, trap, log or off")),
        }
    }
}

/// The kinds of thread, each with a filter of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The VMM's event loop: snapshots, backups, pausing.
    Main,
    /// The control socket's threads.
    Api,
    /// A vCPU.
    Vcpu,
    /// A device's queues and backend (and the console's input).
    Device,
    /// A lazy restore's page-fault handler and memory loaders.
    PageFault,
    /// The forked snapshot or backup writer.
    Writer,
}

const KINDS: [ThreadKind; 6] =
    [ThreadKind::Main, ThreadKind::Api, ThreadKind::Vcpu, ThreadKind::Device, ThreadKind::PageFault, ThreadKind::Writer];

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::PageFault => "page-fault",
            ThreadKind::Writer => "writer",
        }
    }

    /// Its place in [`KINDS`] (declaration order).
    fn index(self) -> usize {
        self as usize
    }

    /// Every call this kind may make.
    fn allowed(self) -> impl Iterator<Item = &'static Allowed> {
        let (own, spawns): (&[Allowed], bool) = match self {
            ThreadKind::Main => (allowlist::MAIN, true),
            ThreadKind::Api => (allowlist::API, true),
            ThreadKind::Vcpu => (allowlist::VCPU, false),
            ThreadKind::Device => (allowlist::DEVICE, true),
            ThreadKind::PageFault => (allowlist::PAGE_FAULT, true),
            ThreadKind::Writer => (allowlist::WRITER, true),
        };
        let spawning: &[Allowed] = if spawns { allowlist::SPAWNS_THREADS } else { &[] };
        allowlist::EVERY_THREAD.iter().chain(spawning).chain(own)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0} seccomp filter: {1}")]
    Build(&'static str, String),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("cannot install the {0} seccomp filter: {1}")]
    Apply(&'static str, String),
}

struct Filters {
    mode: Mode,
    programs: Vec<BpfProgram>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Compiles every kind's filter for `mode` and, for `trap` and `log`,
/// installs the SIGSYS handler. Threads confine themselves afterwards with
/// [`confine`]; before `init` (or with `Mode::Off`) that does nothing.
pub fn init(mode: Mode) -> Result<(), SeccompError> {
    if mode == Mode::Off {
        log::warn!("seccomp filters are off (--no-seccomp): the VMM's threads may make any system call");
        return Ok(());
    }
    let programs = KINDS.iter().map(|k| program(*k, mode)).collect::<Result<Vec<_>, _>>()?;
    if matches!(mode, Mode::Trap | Mode::Log) {
        install_sigsys_handler().map_err(SeccompError::Handler)?;
    }
    // A second init (tests) keeps the first one's filters.
    let _ = FILTERS.set(Filters { mode, programs });
    Ok(())
}

/// The BPF program for `kind` under `mode`.
fn program(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = kind.allowed().map(|a| (a.nr, Vec::new())).collect();
    if kind == ThreadKind::Vcpu {
        // ioctl by request number: the second argument, 32 bits as the
        // kernel reads it.
        let by_request = allowlist::VCPU_IOCTLS
            .iter()
            .map(|&(request, _)| {
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                    .and_then(|c| SeccompRule::new(vec![c]))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SeccompError::Build(kind.name(), e.to_string()))?;
        rules.insert(libc::SYS_ioctl, by_request);
    }
    let mismatch = match mode {
        Mode::Enforce | Mode::Off => SeccompAction::KillProcess,
        Mode::Trap | Mode::Log => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(kind.name(), e.to_string()))?;
    let program: BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| SeccompError::Build(kind.name(), e.to_string()))?;
    if mode != Mode::Log {
        return Ok(program);
    }
    // Let calls made by the SIGSYS handler's own `syscall` instruction
    // through: compare the instruction pointer after it, both halves.
    let ip = raw_syscall_return_address();
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let prefix = [
        sock_filter { code: LD_W_ABS, jt: 0, jf: 0, k: 8 },
        sock_filter { code: JEQ_K, jt: 0, jf: 3, k: ip as u32 },
        sock_filter { code: LD_W_ABS, jt: 0, jf: 0, k: 12 },
        sock_filter { code: JEQ_K, jt: 0, jf: 1, k: (ip >> 32) as u32 },
        sock_filter { code: RET_K, jt: 0, jf: 0, k: libc::SECCOMP_RET_ALLOW },
    ];
    Ok(prefix.into_iter().chain(program).collect())
}

thread_local! {
    /// This thread's name and filter, for the SIGSYS handler's messages.
    static CONFINED: Cell<([u8; 16], u8)> = const { Cell::new(([0; 16], u8::MAX)) };
}

/// Confines the calling thread to `kind`'s calls (and those of any filter
/// it already runs under). Does nothing before [`init`] or when filters
/// are off.
pub fn confine(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else { return Ok(()) };
    let mut name = [0u8; 16];
    let current = std::thread::current();
    let thread = current.name().unwrap_or("unnamed").as_bytes();
    let len = thread.len().min(name.len());
    name[..len].copy_from_slice(&thread[..len]);
    CONFINED.with(|c| c.set((name, kind.index() as u8)));
    seccompiler::apply_filter(&filters.programs[kind.index()]).map_err(|e| SeccompError::Apply(kind.name(), e.to_string()))
}

/// [`confine`] for a thread with no one to hand an error to: says why and
/// ends the process (running unconfined is not an option).
pub fn confine_or_exit(kind: ThreadKind) {
    if let Err(e) = confine(kind) {
        eprintln!("stasis: error: {e}");
        std::process::exit(1);
    }
}

// One `syscall` instruction at a known address, called by the SIGSYS
// handler in `log` mode: (nr, a0..a5) in the C calling convention.
std::arch::global_asm!(
    ".pushsection .text.stasis_seccomp_syscall, \"ax\"",
    ".globl stasis_seccomp_syscall",
    ".type stasis_seccomp_syscall, @function",
    "stasis_seccomp_syscall:",
    "mov rax, rdi",
    "mov rdi, rsi",
    "mov rsi, rdx",
    "mov rdx, rcx",
    "mov r10, r8",
    "mov r8, r9",
    "mov r9, [rsp + 8]",
    "syscall",
    ".globl stasis_seccomp_syscall_return",
    "stasis_seccomp_syscall_return:",
    "ret",
    ".popsection",
);

extern "C" {
    fn stasis_seccomp_syscall(nr: i64, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64;
    static stasis_seccomp_syscall_return: u8;
}

fn raw_syscall_return_address() -> u64 {
    std::ptr::addr_of!(stasis_seccomp_syscall_return) as u64
}

/// Which (filter, call) pairs `log` mode has named: 512 bits per filter,
/// one more row for unconfined threads.
static NAMED: [[AtomicU64; 8]; KINDS.len() + 1] = [const { [const { AtomicU64::new(0) }; 8] }; KINDS.len() + 1];

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler only reads its
    // arguments, thread-local plain data and atomics, and writes to stderr.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel hands a SIGSYS handler a siginfo whose union holds
    // `_sigsys` (call address at 16, call number at 24) and the ucontext of
    // the interrupted thread.
    let (nr, args, uc) = unsafe {
        let nr = *(info as *const u8).add(24).cast::<i32>() as i64;
        let uc = &mut *(context as *mut libc::ucontext_t);
        let g = &uc.uc_mcontext.gregs;
        let args = [libc::REG_RDI, libc::REG_RSI, libc::REG_RDX, libc::REG_R10, libc::REG_R8, libc::REG_R9]
            .map(|r| g[r as usize] as u64);
        (nr, args, uc)
    };
    let mode = FILTERS.get().map_or(Mode::Trap, |f| f.mode);
    let (name, kind) = CONFINED.with(Cell::get);
    let mut msg = Message::new();
    msg.push(b"stasis: seccomp: thread '");
    msg.push(name.split(|b| *b == 0).next().unwrap_or(&[]));
    msg.push(b"' (");
    msg.push(KINDS.get(kind as usize).map_or("no", |k| k.name()).as_bytes());
    msg.push(b" filter) made ");
    let call = usize::try_from(nr).ok().and_then(|i| names::NAMES.get(i)).copied().unwrap_or("");
    if call.is_empty() {
        msg.push(b"system call ");
    } else {
        msg.push(call.as_bytes());
        msg.push(b" ");
    }
    msg.push(b"(");
    msg.number(nr as u64, 10);
    msg.push(b"), arguments 0x");
    msg.number(args[0], 16);
    msg.push(b", 0x");
    msg.number(args[1], 16);
    if mode == Mode::Log {
        msg.push(b": not on its list; made anyway (--seccomp log)\n");
        let row = (kind as usize).min(KINDS.len());
        let bit = (nr as u64) & 511;
        let first = NAMED[row][(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Relaxed) & (1 << (bit % 64)) == 0;
        if first {
            msg.write();
        }
        // SAFETY: the call the thread asked for, with its own arguments,
        // made on its behalf; its result goes where the thread expects it.
        let result = unsafe { stasis_seccomp_syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) };
        uc.uc_mcontext.gregs[libc::REG_RAX as usize] = result;
        return;
    }
    msg.push(b": forbidden; stopping (--seccomp log lets such calls through and names them)\n");
    msg.write();
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(1) }
}

/// A line built without allocating, for the signal handler.
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Message {
    fn new() -> Self {
        Message { buf: [0; 256], len: 0 }
    }

    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn number(&mut self, mut value: u64, radix: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(value % radix) as usize];
            value /= radix;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn write(&self) {
        // SAFETY: writes bytes of a live buffer to stderr.
        unsafe { libc::write(2, self.buf.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_every_mode() {
        for mode in [Mode::Enforce, Mode::Trap, Mode::Log] {
            for kind in KINDS {
                let program = program(kind, mode).expect("program");
                assert!(program.len() > 10, "{kind:?} {mode:?}");
            }
        }
    }

    #[test]
    fn every_allowed_call_has_a_reason_and_a_name() {
        for kind in KINDS {
            for a in kind.allowed() {
                assert!(!a.why.is_empty(), "{kind:?}: call {} has no reason", a.nr);
                let name = names::NAMES.get(a.nr as usize).copied().unwrap_or("");
                assert!(!name.is_empty(), "{kind:?}: call {} has no name", a.nr);
            }
        }
    }

    #[test]
    fn no_kind_may_start_programs_or_trace() {
        for kind in KINDS {
            for forbidden in [libc::SYS_execve, libc::SYS_execveat, libc::SYS_ptrace, libc::SYS_process_vm_writev] {
                assert!(kind.allowed().all(|a| a.nr != forbidden), "{kind:?} allows {forbidden}");
            }
        }
    }

    /// Runs `body` in a forked child and returns its wait status and what
    /// it wrote on stderr.
    fn in_child(body: impl FnOnce()) -> (libc::c_int, String) {
        let mut fds = [0; 2];
        // SAFETY: pipe fills the array; the child only runs `body` and
        // leaves with _exit.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::dup2(fds[1], 2);
                body();
                libc::_exit(0);
            }
            libc::close(fds[1]);
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            let mut out = Vec::new();
            let mut buf = [0u8; 512];
            loop {
                let n = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n as usize]);
            }
            libc::close(fds[0]);
            (status, String::from_utf8_lossy(&out).into_owned())
        }
    }

    /// A vCPU thread asking to open a file: not on its list.
    fn forbidden_open() -> libc::c_int {
        // SAFETY: opens a path from a C string literal.
        unsafe { libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) }
    }

    #[test]
    fn enforce_kills_a_thread_making_a_call_off_its_list() {
        let (status, _) = in_child(|| {
            init(Mode::Enforce).expect("init");
            confine(ThreadKind::Vcpu).expect("confine");
            forbidden_open();
            // Not reached.
            // SAFETY: ends the forked child at once, as `in_child` expects.
            unsafe { libc::_exit(7) };
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn enforce_lets_the_calls_on_the_list_through() {
        let (status, _) = in_child(|| {
            init(Mode::Enforce).expect("init");
            confine(ThreadKind::Vcpu).expect("confine");
            // Allocation, a thread-safe channel and a log line: all listed.
            let (tx, rx) = std::sync::mpsc::channel();
            tx.send(vec![1u8; 1 << 20]).expect("send");
            eprintln!("got {}", rx.recv().expect("recv").len());
        });
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status:#x}");
    }

    #[test]
    fn a_vcpu_thread_may_not_make_other_ioctls() {
        // TIOCSTI (typing into a terminal): an ioctl, but not a vCPU's.
        let (status, stderr) = in_child(|| {
            init(Mode::Trap).expect("init");
            confine(ThreadKind::Vcpu).expect("confine");
            let byte = b'x';
            // SAFETY: TIOCSTI reads one byte, which `byte` is; the filter
            // stops the call before it runs anyway.
            unsafe { libc::ioctl(0, libc::TIOCSTI, &byte) };
            // SAFETY: ends the forked child at once, as `in_child` expects.
            unsafe { libc::_exit(7) };
        });
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 1, "status {status:#x}: {stderr}");
        assert!(stderr.contains("made ioctl (16), arguments 0x0, 0x5412"), "{stderr}");
    }

    #[test]
    fn vcpu_ioctl_numbers_match_the_kernel_headers() {
        let find = |name: &str| allowlist::VCPU_IOCTLS.iter().find(|(_, n)| *n == name).map(|(r, _)| *r);
        // From <linux/kvm.h> on x86_64.
        assert_eq!(find("KVM_RUN"), Some(0xae80));
        assert_eq!(find("KVM_GET_REGS"), Some(0x8090_ae81));
        assert_eq!(find("KVM_SET_SREGS"), Some(0x4138_ae84));
        assert_eq!(find("KVM_GET_MSRS"), Some(0xc008_ae88));
        assert_eq!(find("KVM_SET_CPUID2"), Some(0x4008_ae90));
        assert_eq!(find("KVM_GET_LAPIC"), Some(0x8400_ae8e));
        assert_eq!(find("KVM_GET_XSAVE"), Some(0x9000_aea4));
        assert_eq!(find("KVM_KVMCLOCK_CTRL"), Some(0xaead));
    }

    #[test]
    fn trap_names_the_call_and_exits_with_status_1() {
        let (status, stderr) = in_child(|| {
            init(Mode::Trap).expect("init");
            confine(ThreadKind::Vcpu).expect("confine");
            forbidden_open();
            // SAFETY: ends the forked child at once, as `in_child` expects.
            unsafe { libc::_exit(7) };
        });
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 1, "status {status:#x}: {stderr}");
        assert!(stderr.contains("(vcpu filter) made openat (257)") && stderr.contains("forbidden"), "{stderr}");
    }

    #[test]
    fn log_names_the_call_once_and_makes_it() {
        let (status, stderr) = in_child(|| {
            init(Mode::Log).expect("init");
            confine(ThreadKind::Vcpu).expect("confine");
            for _ in 0..3 {
                let fd = forbidden_open();
                if fd < 0 {
                    // SAFETY: ends the forked child at once, as `in_child` expects.
                    unsafe { libc::_exit(8) };
                }
                // SAFETY: `fd` was opened above and is closed once.
                unsafe { libc::close(fd) };
            }
        });
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status:#x}: {stderr}");
        assert_eq!(stderr.matches("made openat (257)").count(), 1, "{stderr}");
        assert!(stderr.contains("made anyway"), "{stderr}");
    }

    #[test]
    fn kinds_are_listed_in_declaration_order() {
        for (i, kind) in KINDS.iter().enumerate() {
            assert_eq!(kind.index(), i, "{kind:?}");
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!("enforce".parse::<Mode>(), Ok(Mode::Enforce));
        assert_eq!("log".parse::<Mode>(), Ok(Mode::Log));
        assert!("kill".parse::<Mode>().expect_err("not a mode").contains("enforce, trap, log or off"));
    }
}
