//! What each kind of thread may ask of the kernel, and why.
//!
//! A thread gets the calls of [`EVERY_THREAD`], of [`SPAWNS_THREADS`] when
//! it starts threads of its own, and of its kind's list. A call on no list
//! ends the process (`--seccomp enforce`), or is named first (`trap`), or
//! is named and let through (`log`, for finding what a list lacks).
//!
//! Filters stack: a thread started by a confined thread keeps its parent's
//! filter under its own. The forked snapshot writer runs under the main
//! thread's filter and the writer's; API connection threads under the API
//! thread's; the content service's connection threads under the device
//! filter of the vsock device that starts them.

/// One system call a thread may make, with the reason it needs it.
pub(super) struct Allowed {
    pub nr: i64,
    /// For the reader (and a test that each call has one).
    #[allow(dead_code)]
    pub why: &'static str,
}

macro_rules! allow {
    ($($name:ident: $why:literal,)*) => {
        &[$(Allowed { nr: libc::$name, why: $why }),*]
    };
}

/// Every thread: memory, locks, signals, time, logging, ending.
pub(super) const EVERY_THREAD: &[Allowed] = allow! {
    SYS_read: "eventfds, pipes, files and sockets the thread owns",
    SYS_write: "eventfds, pipes, log lines on stderr",
    SYS_writev: "log lines written in pieces",
    SYS_close: "dropping descriptors",
    SYS_futex: "mutexes, condition variables, channels, thread joins",
    SYS_mmap: "the allocator; thread stacks",
    SYS_munmap: "the allocator; thread stacks",
    SYS_mremap: "the allocator growing a buffer",
    SYS_madvise: "the allocator returning memory",
    SYS_mprotect: "the allocator's arenas; stack guard pages",
    SYS_brk: "the allocator",
    SYS_rt_sigprocmask: "signal masks around thread starts and exits",
    SYS_rt_sigreturn: "returning from a signal handler (the vCPU kick, SIGSYS)",
    SYS_sigaltstack: "the signal stack every Rust thread sets up and removes",
    SYS_restart_syscall: "a call restarted after a signal",
    SYS_sched_yield: "spinning locks",
    SYS_clock_gettime: "time, when the vDSO cannot answer",
    SYS_clock_nanosleep: "sleeps and timed waits",
    SYS_nanosleep: "sleeps",
    SYS_getrandom: "hash map keys",
    SYS_gettid: "thread ids in messages",
    SYS_getpid: "process id in messages",
    SYS_exit: "a thread ending",
    SYS_exit_group: "the process ending",
};

/// Threads that start threads (std's spawn).
pub(super) const SPAWNS_THREADS: &[Allowed] = allow! {
    SYS_clone3: "starting a thread",
    SYS_clone: "starting a thread where clone3 is missing",
    SYS_set_robust_list: "the new thread's setup, under its parent's filter",
    SYS_rseq: "the new thread's setup, under its parent's filter",
    SYS_sched_getaffinity: "how many threads to start",
    SYS_prctl: "naming the new thread",
};

/// The main thread: the VMM's event loop, snapshots and backups (their
/// files, the forked writer and its watcher), pausing (kicking the vCPU
/// threads), the terminal, the end of the run.
pub(super) const MAIN: &[Allowed] = allow! {
    SYS_ioctl: "KVM VM state in snapshots; the terminal's mode",
    SYS_openat: "snapshot and backup files, staging files, /proc/self/pagemap",
    SYS_open: "files, on libcs that still use open",
    SYS_mkdir: "snapshot and backup directories",
    SYS_mkdirat: "snapshot and backup directories",
    SYS_rename: "publishing a finished snapshot or backup",
    SYS_renameat: "publishing a finished snapshot or backup",
    SYS_renameat2: "publishing a finished snapshot or backup",
    SYS_unlink: "removing a failed snapshot's files; the API socket",
    SYS_unlinkat: "removing a failed snapshot's directory",
    SYS_rmdir: "removing a failed snapshot's directory",
    SYS_getdents64: "listing a directory being removed or checked",
    SYS_link: "hard links of disk images",
    SYS_linkat: "hard links of disk images",
    SYS_symlink: "links in a snapshot directory",
    SYS_readlink: "resolving paths",
    SYS_readlinkat: "resolving paths",
    SYS_getcwd: "resolving relative paths",
    SYS_fstat: "file sizes and identities",
    SYS_newfstatat: "file sizes and identities",
    SYS_statx: "file sizes and identities",
    SYS_lstat: "file types",
    SYS_stat: "file types",
    SYS_statfs: "free space",
    SYS_fstatfs: "free space",
    SYS_access: "checking paths",
    SYS_faccessat: "checking paths",
    SYS_faccessat2: "checking paths",
    SYS_lseek: "file positions",
    SYS_pread64: "disk images and checkpoints",
    SYS_pwrite64: "disk images and checkpoints",
    SYS_preadv: "disk images and checkpoints",
    SYS_pwritev: "disk images and checkpoints",
    SYS_ftruncate: "sizing sparse staging files",
    SYS_fallocate: "sizing and punching staging files",
    SYS_fsync: "making snapshot and backup files durable",
    SYS_fdatasync: "making snapshot and backup files durable",
    SYS_sync_file_range: "flushing written files",
    SYS_copy_file_range: "copying disk images",
    SYS_sendfile: "copying disk images",
    SYS_fadvise64: "read-ahead hints on checkpoints",
    SYS_flock: "the backup store's lock",
    SYS_fcntl: "descriptor flags; duplicating descriptors",
    SYS_dup: "duplicating descriptors",
    SYS_dup3: "duplicating descriptors",
    SYS_pipe2: "the forked writer's report pipe",
    SYS_eventfd2: "wake-up events",
    SYS_memfd_create: "shared block-state maps",
    SYS_poll: "waiting on descriptors",
    SYS_ppoll: "waiting on descriptors",
    SYS_epoll_create1: "waiting on descriptors",
    SYS_epoll_ctl: "waiting on descriptors",
    SYS_epoll_wait: "waiting on descriptors",
    SYS_epoll_pwait: "waiting on descriptors",
    SYS_wait4: "reaping the forked writer",
    SYS_waitid: "reaping the forked writer",
    SYS_pidfd_open: "watching the forked writer",
    SYS_kill: "stopping the forked writer",
    SYS_tgkill: "kicking vCPU threads out of KVM_RUN to pause them",
    SYS_rt_sigaction: "signal handlers",
    SYS_getppid: "the forked writer checking its parent",
    SYS_getuid: "messages about permissions",
    SYS_geteuid: "messages about permissions",
    SYS_uname: "the kernel version in messages",
    SYS_socket: "the API socket",
    SYS_bind: "the API socket",
    SYS_listen: "the API socket",
    SYS_shutdown: "closing connections",
    SYS_setsockopt: "socket timeouts",
    SYS_getsockopt: "socket errors",
    SYS_socketpair: "wake-up channels",
    SYS_seccomp: "confining the forked writer under its own filter",
};

/// The API thread and its connection threads: the control socket only.
pub(super) const API: &[Allowed] = allow! {
    SYS_accept4: "accepting clients",
    SYS_accept: "accepting clients",
    SYS_poll: "waiting for a client or the stop signal",
    SYS_ppoll: "waiting for a client or the stop signal",
    SYS_recvfrom: "reading requests",
    SYS_recvmsg: "reading requests",
    SYS_sendto: "writing replies",
    SYS_sendmsg: "writing replies",
    SYS_shutdown: "closing connections",
    SYS_setsockopt: "read and write timeouts",
    SYS_getsockopt: "socket errors; the peer's credentials (SO_PEERCRED)",
    SYS_geteuid: "only clients of the VMM's own user are served",
    SYS_fcntl: "non-blocking sockets; duplicating descriptors",
    SYS_ioctl: "non-blocking sockets (FIONBIO)",
    SYS_socketpair: "wake-up channels",
    SYS_unlink: "removing the socket file",
    SYS_newfstatat: "checking the socket file is ours",
    SYS_statx: "checking the socket file is ours",
    SYS_fstat: "checking the socket file is ours",
};

/// vCPU threads: KVM_RUN, the vCPU's state, port and MMIO exits.
pub(super) const VCPU: &[Allowed] = allow! {
    SYS_ioctl: "KVM_RUN and the vCPU's state: only the requests of VCPU_IOCTLS",
    SYS_rt_sigaction: "the kick signal",
    SYS_tgkill: "passing a kick on",
    SYS_timerfd_settime: "vsock's connection timers, when an MMIO write reaches the device",
    SYS_timerfd_gettime: "vsock's connection timers, when an MMIO write reaches the device",
    SYS_statx: "a failed VM entry's message checks for /sys/module/kvm_pvm",
    SYS_newfstatat: "a failed VM entry's message checks for /sys/module/kvm_pvm",
};

const KVMIO: u64 = 0xae;

/// `_IO(KVMIO, nr)`.
const fn io(nr: u64) -> u64 {
    KVMIO << 8 | nr
}

/// `_IOC(dir, KVMIO, nr, size_of::<T>())`: dir 1 write, 2 read, 3 both.
const fn ioc<T>(dir: u64, nr: u64) -> u64 {
    dir << 30 | (std::mem::size_of::<T>() as u64) << 16 | KVMIO << 8 | nr
}

/// The only ioctls a vCPU thread may make (on its vCPU's descriptor):
/// running it, its state for snapshots, pausing its clock, and the
/// address translation of a failure message.
pub(super) const VCPU_IOCTLS: &[(u64, &str)] = {
    use kvm_bindings::*;
    &[
        (io(0x80), "KVM_RUN"),
        (ioc::<kvm_regs>(2, 0x81), "KVM_GET_REGS"),
        (ioc::<kvm_regs>(1, 0x82), "KVM_SET_REGS"),
        (ioc::<kvm_sregs>(2, 0x83), "KVM_GET_SREGS"),
        (ioc::<kvm_sregs>(1, 0x84), "KVM_SET_SREGS"),
        (ioc::<kvm_translation>(3, 0x85), "KVM_TRANSLATE"),
        (ioc::<kvm_msrs>(3, 0x88), "KVM_GET_MSRS"),
        (ioc::<kvm_msrs>(1, 0x89), "KVM_SET_MSRS"),
        (ioc::<kvm_fpu>(2, 0x8c), "KVM_GET_FPU"),
        (ioc::<kvm_fpu>(1, 0x8d), "KVM_SET_FPU"),
        (ioc::<kvm_lapic_state>(2, 0x8e), "KVM_GET_LAPIC"),
        (ioc::<kvm_lapic_state>(1, 0x8f), "KVM_SET_LAPIC"),
        (ioc::<kvm_cpuid2>(1, 0x90), "KVM_SET_CPUID2"),
        (ioc::<kvm_cpuid2>(3, 0x91), "KVM_GET_CPUID2"),
        (ioc::<kvm_mp_state>(2, 0x98), "KVM_GET_MP_STATE"),
        (ioc::<kvm_mp_state>(1, 0x99), "KVM_SET_MP_STATE"),
        (ioc::<kvm_vcpu_events>(2, 0x9f), "KVM_GET_VCPU_EVENTS"),
        (ioc::<kvm_vcpu_events>(1, 0xa0), "KVM_SET_VCPU_EVENTS"),
        (ioc::<kvm_debugregs>(2, 0xa1), "KVM_GET_DEBUGREGS"),
        (ioc::<kvm_debugregs>(1, 0xa2), "KVM_SET_DEBUGREGS"),
        (io(0xa2), "KVM_SET_TSC_KHZ"),
        (io(0xa3), "KVM_GET_TSC_KHZ"),
        (ioc::<kvm_xsave>(2, 0xa4), "KVM_GET_XSAVE"),
        (ioc::<kvm_xsave>(1, 0xa5), "KVM_SET_XSAVE"),
        (ioc::<kvm_xcrs>(2, 0xa6), "KVM_GET_XCRS"),
        (ioc::<kvm_xcrs>(1, 0xa7), "KVM_SET_XCRS"),
        (io(0xad), "KVM_KVMCLOCK_CTRL"),
        (ioc::<kvm_xsave>(2, 0xcf), "KVM_GET_XSAVE2"),
    ]
};

/// Device threads (virtio block, vsock, rng; the console's input): their
/// queues, backing files and sockets. Vsock's host services (the content
/// service) run here too.
pub(super) const DEVICE: &[Allowed] = allow! {
    SYS_epoll_wait: "waiting on queue events",
    SYS_epoll_pwait: "waiting on queue events",
    SYS_epoll_ctl: "watching a backend socket",
    SYS_epoll_create1: "event loops",
    SYS_poll: "waiting on descriptors",
    SYS_ppoll: "waiting on descriptors",
    SYS_pread64: "block reads",
    SYS_pwrite64: "block writes; copying a block before the guest overwrites it",
    SYS_copy_file_range: "copying a disk block before the guest overwrites it",
    SYS_preadv: "block reads",
    SYS_pwritev: "block writes",
    SYS_lseek: "file positions",
    SYS_fsync: "block flushes",
    SYS_fdatasync: "block flushes",
    SYS_fallocate: "discard and write-zeroes",
    SYS_ftruncate: "sizing staging files",
    SYS_fstat: "file sizes",
    SYS_newfstatat: "file sizes; content store entries",
    SYS_statx: "file sizes; content store entries",
    SYS_openat: "content store files",
    SYS_getdents64: "listing the content store",
    SYS_ioctl: "non-blocking sockets (FIONBIO)",
    SYS_fcntl: "non-blocking sockets; duplicating descriptors",
    SYS_socket: "vsock connections to host sockets",
    SYS_connect: "vsock connections to host sockets",
    SYS_socketpair: "host services' connections",
    SYS_accept4: "host-initiated vsock connections",
    SYS_accept: "host-initiated vsock connections",
    SYS_bind: "vsock listening sockets",
    SYS_listen: "vsock listening sockets",
    SYS_recvfrom: "vsock data",
    SYS_recvmsg: "vsock data",
    SYS_sendto: "vsock data",
    SYS_sendmsg: "vsock data",
    SYS_shutdown: "closing vsock connections",
    SYS_getsockopt: "socket errors",
    SYS_setsockopt: "socket options",
    SYS_unlink: "removing stale vsock sockets",
    SYS_waitid: "checking whether the backup writer is alive",
    SYS_sendfile: "content replies",
    SYS_timerfd_create: "vsock's connection timers",
    SYS_timerfd_settime: "vsock's connection timers",
    SYS_timerfd_gettime: "vsock's connection timers",
};

/// The page-fault handler and memory loader threads of a lazy restore:
/// userfaultfd, the checkpoint file, saving a recorded working set.
pub(super) const PAGE_FAULT: &[Allowed] = allow! {
    SYS_ioctl: "UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE",
    SYS_setpriority: "background loading runs at a lower priority than faults",
    SYS_poll: "waiting on the userfaultfd and the stop event",
    SYS_ppoll: "waiting on the userfaultfd and the stop event",
    SYS_epoll_wait: "waiting on the userfaultfd and the stop event",
    SYS_epoll_pwait: "waiting on the userfaultfd and the stop event",
    SYS_pread64: "checkpoint blocks",
    SYS_preadv: "checkpoint blocks",
    SYS_lseek: "file positions",
    SYS_fadvise64: "read-ahead hints on the checkpoint",
    SYS_readahead: "read-ahead of the working set",
    SYS_fstat: "the checkpoint's size",
    SYS_newfstatat: "the checkpoint's size",
    SYS_statx: "the checkpoint's size",
    SYS_fcntl: "duplicating descriptors",
    SYS_openat: "saving the working set",
    SYS_rename: "publishing the working set",
    SYS_renameat: "publishing the working set",
    SYS_renameat2: "publishing the working set",
    SYS_unlink: "removing a partial working set",
    SYS_fsync: "making the working set durable",
    SYS_fdatasync: "making the working set durable",
};

/// The forked snapshot or backup writer: reads its copy of guest memory,
/// compresses with threads of its own, writes the checkpoint and disk
/// checkpoints.
pub(super) const WRITER: &[Allowed] = allow! {
    SYS_openat: "checkpoint files; /proc/self/pagemap; disk images",
    SYS_pread64: "/proc/self/pagemap; disk blocks",
    SYS_pwrite64: "checkpoint blocks",
    SYS_preadv: "disk blocks",
    SYS_pwritev: "checkpoint blocks",
    SYS_copy_file_range: "copying disk blocks into disk checkpoints",
    SYS_lseek: "file positions",
    SYS_ftruncate: "sizing the checkpoint",
    SYS_fallocate: "sizing the checkpoint",
    SYS_fsync: "making the checkpoint durable",
    SYS_fdatasync: "making the checkpoint durable",
    SYS_fstat: "file sizes",
    SYS_newfstatat: "file sizes",
    SYS_statx: "file sizes",
    SYS_fcntl: "duplicating descriptors",
    SYS_rename: "publishing a finished file",
    SYS_renameat: "publishing a finished file",
    SYS_renameat2: "publishing a finished file",
    SYS_unlink: "removing a partial file",
    SYS_fadvise64: "dropping written pages from the cache",
    SYS_sync_file_range: "flushing written pages",
    SYS_waitid: "checking the parent",
    SYS_getppid: "checking the parent",
};
