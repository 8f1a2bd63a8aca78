//! The control API: JSON lines over a Unix stream socket.
//!
//! `stasis boot|restore --api-sock PATH` serves [`ApiServer`] at `PATH`;
//! `stasis pause|resume|snapshot --api-sock PATH` talk to it through
//! [`send_request`]. The protocol is described in `docs/api.md`:
//!
//! ```text
//! client                                   server ("api-server" thread)
//!   {"op":"status"}\n            ───►        parse, forward an ApiCall to the VMM
//!   {"ok":true,"state":"running"}\n  ◄───    write the VMM's answer
//! ```
//!
//! Each request is one JSON object on one line (at most
//! [`MAX_REQUEST_BYTES`] bytes), each reply one JSON object on one line, and
//! a connection may carry several requests in turn.
//!
//! Threads: one accept thread, named "api-server", and one short-lived
//! thread per connection, named "api-conn", so a client waiting for a long
//! snapshot never holds up another client's `status` (or its "a snapshot is
//! already in progress" answer). The accept thread sleeps in `poll(2)` on the
//! listener and on a wake-up socket; dropping the [`ApiServer`] closes the
//! wake-up socket, shuts down the read side of every open connection, and
//! joins every thread before the socket file is removed.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde_json::{Map, Value};

use crate::content::ContentId;

pub mod fuzzing;

/// The longest request line the server reads, newline excluded.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The longest reply line the client reads, newline excluded.
const MAX_REPLY_BYTES: usize = 1024 * 1024;

/// How long the client waits for a reply: snapshots of big VMs take time.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Connections served at once; more are answered with an error and closed.
const MAX_CONNECTIONS: usize = 16;

/// How long a connection must have been idle before a new client, finding
/// every place taken, closes it to take its place.
const IDLE_EVICTABLE: Duration = Duration::from_secs(1);

/// The reply a connection closed to make room for a new one gets.
const EVICTED: &str = "this API connection sent no request for a while and was closed to serve a new one \
     (every connection was taken); connect again";

/// How long a write to a client may block before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a connection waiting for the VMM checks for shutdown.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// The answer to a snapshot request while another snapshot runs.
const SNAPSHOT_BUSY: &str = "a snapshot is already in progress";

/// Errors of the control socket, on the server and on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Looking at what already exists at the socket path failed.
    #[error("cannot inspect {}", .0.display())]
    InspectPath(PathBuf, #[source] io::Error),
    /// The socket path holds something other than a socket.
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    /// A live server answers at the socket path.
    #[error("another process is already serving {}", .0.display())]
    InUse(PathBuf),
    /// Connecting to an existing socket file to see if it is live failed oddly.
    #[error("cannot tell whether {} is in use", .0.display())]
    ProbeSocket(PathBuf, #[source] io::Error),
    /// Removing a stale socket file failed.
    #[error("cannot remove the stale socket {}", .0.display())]
    RemoveStale(PathBuf, #[source] io::Error),
    /// Binding the listening socket failed.
    #[error("cannot listen on {}", .0.display())]
    Bind(PathBuf, #[source] io::Error),
    /// Restricting the socket file to its owner failed.
    #[error("cannot restrict {} to mode 0600", .0.display())]
    SetPermissions(PathBuf, #[source] io::Error),
    /// Making the listener non-blocking or creating the wake-up socket failed.
    #[error("cannot set up the API socket")]
    SetupSocket(#[source] io::Error),
    /// Spawning the server thread failed.
    #[error("cannot start the API server thread")]
    SpawnThread(#[source] io::Error),
    /// The client found no socket file.
    #[error("no API socket at {}: is the VMM running with --api-sock {}?", .0.display(), .0.display())]
    NoSocket(PathBuf),
    /// The client found a socket file nobody listens on.
    #[error("nothing is listening on {}: the VMM that created it has exited", .0.display())]
    NotListening(PathBuf),
    /// The client may not connect.
    #[error("permission denied on {}: the socket is mode 0600, run as the user that started the VMM", .0.display())]
    PermissionDenied(PathBuf),
    /// The client could not connect for another reason.
    #[error("cannot connect to {}", .0.display())]
    Connect(PathBuf, #[source] io::Error),
    /// Making a relative snapshot directory absolute failed.
    #[error("cannot resolve the relative path {}", .0.display())]
    ResolvePath(PathBuf, #[source] io::Error),
    /// A path the JSON protocol cannot carry.
    #[error("{} is not valid UTF-8, which the API cannot carry", .0.display())]
    NonUtf8Path(PathBuf),
    /// Writing the request failed.
    #[error("cannot send the request")]
    SendRequest(#[source] io::Error),
    /// Reading the reply failed.
    #[error("cannot read the reply")]
    ReceiveReply(#[source] io::Error),
    /// The VMM did not answer in time.
    #[error("the VMM did not answer within {} seconds", .0.as_secs())]
    Timeout(Duration),
    /// The VMM closed the connection before answering.
    #[error("the VMM closed the connection without replying")]
    ClosedWithoutReply,
    /// The reply is not what the protocol says.
    #[error("the VMM sent a malformed reply: {0}")]
    ParseReply(String),
    /// The VMM answered `{"ok":false,"error":...}`.
    #[error("{0}")]
    Refused(String),
}

/// What the VMM does once a snapshot is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AfterSnapshot {
    /// Let the vCPUs run again.
    #[default]
    Resume,
    /// Stop the VM and exit the VMM.
    Exit,
}

impl AfterSnapshot {
    /// The name used on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            AfterSnapshot::Resume => "resume",
            AfterSnapshot::Exit => "exit",
        }
    }
}

/// A request to the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// Stop every vCPU.
    Pause,
    /// Let every vCPU run again.
    Resume,
    /// Report the VM's state.
    Status,
    /// Write a snapshot into the directory `out` (an absolute path).
    Snapshot {
        /// The snapshot directory.
        out: PathBuf,
        /// What to do once it is written.
        then: AfterSnapshot,
        /// For an incremental snapshot: the VM's latest snapshot, which it
        /// builds on (an absolute path).
        parent: Option<PathBuf>,
        /// Keep the vCPUs paused while memory is written (always so with
        /// `then: exit`); otherwise the guest runs on while it is written.
        stop_the_world: bool,
    },
    /// Back the VM up into the backup store `to` (`docs/backups.md`).
    Backup {
        /// The store (an absolute path).
        to: PathBuf,
        /// Copy everything, not only what changed since the latest backup.
        full: bool,
        /// The VM's state directory, for its retired record (an absolute
        /// path); `None`: the default one.
        state_dir: Option<PathBuf>,
    },
    /// Grant content IDs to the VM (`docs/content.md`).
    Grant {
        /// The IDs.
        ids: Vec<ContentId>,
        /// Requests each grant serves; `None`: any number.
        uses: Option<u64>,
        /// Seconds until each grant expires; `None`: never.
        expires_s: Option<u64>,
    },
    /// Take content grants away.
    Revoke {
        /// The IDs.
        ids: Vec<ContentId>,
    },
    /// List the VM's content grants.
    Grants,
}

/// What the VMM answers: Ok(fields to merge into {"ok":true}) or Err(message).
pub type ApiReply = Result<Map<String, Value>, String>;

/// One request on its way to the VMM, with where to send the answer.
#[derive(Debug)]
pub struct ApiCall {
    /// The parsed request.
    pub request: ApiRequest,
    /// Where the answer goes; the connection waits on the other end.
    pub reply: Sender<ApiReply>,
}

impl ApiCall {
    /// Sends the answer back; a client that has gone away is not an error.
    pub fn respond(self, reply: ApiReply) {
        if self.reply.send(reply).is_err() {
            debug!("API connection closed before its {:?} reply", self.request);
        }
    }
}

/// A listening control socket, served until this is dropped.
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket file we bound, so drop removes only ours.
    identity: (u64, u64),
    shared: Arc<Shared>,
    /// Dropping this wakes the accept thread.
    wake: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `path` (fails clearly if it exists and a live server answers
    /// there; removes a stale socket file otherwise), chmod 0600, and serves
    /// it on a named thread ("api-server"), forwarding each parsed request as
    /// an [`ApiCall`] through `calls` and writing the reply back.
    ///
    /// While a snapshot request is being handled, another snapshot request
    /// gets "a snapshot is already in progress" at once without reaching the
    /// VMM. If the VMM side is gone, requests get an error reply.
    pub fn start<T: From<ApiCall> + Send + 'static>(path: &Path, calls: Sender<T>) -> Result<ApiServer, ApiError> {
        clear_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(|e| ApiError::Bind(path.to_owned(), e))?;
        // Bind creates the file with the process umask; a client that
        // connects before this chmod is still refused by the peer-credential
        // check in `accept_loop`.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ApiError::SetPermissions(path.to_owned(), e))?;
        let metadata = std::fs::symlink_metadata(path).map_err(|e| ApiError::InspectPath(path.to_owned(), e))?;
        let identity = (metadata.dev(), metadata.ino());
        // Non-blocking so a connection that vanishes between poll and accept
        // cannot block the accept thread.
        listener.set_nonblocking(true).map_err(ApiError::SetupSocket)?;
        let (wake, woken) = UnixStream::pair().map_err(ApiError::SetupSocket)?;

        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("api-server".into())
            .spawn(move || {
                crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::Api);
                accept_loop(listener, woken, thread_shared, calls)
            })
            .map_err(ApiError::SpawnThread)?;
        info!("API server listening on {}", path.display());
        Ok(ApiServer { path: path.to_owned(), identity, shared, wake: Some(wake), thread: Some(thread) })
    }

    /// The socket path being served.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop();
        // Closing our end makes the accept thread's poll return.
        drop(self.wake.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("the API server thread panicked");
            }
        }
        // Remove the file only if it is still the socket we bound: another
        // process may have replaced it.
        match std::fs::symlink_metadata(&self.path) {
            Ok(metadata) if (metadata.dev(), metadata.ino()) == self.identity => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!("cannot remove the API socket {}: {e}", self.path.display());
                }
            }
            Ok(_) => debug!("{} was replaced; leaving it in place", self.path.display()),
            Err(e) => debug!("API socket {} already gone: {e}", self.path.display()),
        }
        debug!("API server on {} stopped", self.path.display());
    }
}

/// Makes `path` free to bind: nothing there, or a socket nobody answers on.
fn clear_stale_socket(path: &Path) -> Result<(), ApiError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ApiError::InspectPath(path.to_owned(), e)),
    };
    if !metadata.file_type().is_socket() {
        return Err(ApiError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiError::InUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!("removing stale API socket {}", path.display());
            std::fs::remove_file(path).map_err(|e| ApiError::RemoveStale(path.to_owned(), e))
        }
        Err(e) => Err(ApiError::ProbeSocket(path.to_owned(), e)),
    }
}

/// State shared by the server handle, the accept thread and the connections.
#[derive(Default)]
struct Shared {
    stopping: AtomicBool,
    /// Set while a snapshot request waits for the VMM's answer.
    snapshot_busy: AtomicBool,
    connections: Mutex<Connections>,
}

/// The open connections, so a shutdown can wake their readers and a new
/// client can take the place of an idle one.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: HashMap<u64, Open>,
}

/// One open connection.
struct Open {
    stream: UnixStream,
    /// When its last request was answered (or it connected).
    idle_since: Instant,
    /// Whether a request of it is being handled.
    busy: bool,
}

impl Shared {
    fn connections(&self) -> MutexGuard<'_, Connections> {
        // The map stays consistent even if a holder panicked.
        self.connections.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Marks the server as stopping and wakes every connection blocked on a
    /// read. Only the read side is shut: a reply the VMM sent just before
    /// stopping (e.g. after a snapshot with `then: exit`) still gets written.
    fn stop(&self) {
        let connections = self.connections();
        self.stopping.store(true, Ordering::SeqCst);
        for open in connections.open.values() {
            if let Err(e) = open.stream.shutdown(std::net::Shutdown::Read) {
                debug!("cannot shut down an API connection: {e}");
            }
        }
    }

    /// Records a new connection, unless the server is stopping or full.
    fn register(&self, stream: &UnixStream) -> Result<u64, &'static str> {
        let mut connections = self.connections();
        if self.stopping() {
            return Err("the VMM is shutting down");
        }
        if connections.open.len() >= MAX_CONNECTIONS {
            // The connection idle the longest makes room, if it has been
            // idle a while: clients that connect and send nothing, or
            // stop, cannot lock the others out.
            let idlest = connections
                .open
                .iter()
                .filter(|(_, open)| !open.busy && open.idle_since.elapsed() >= IDLE_EVICTABLE)
                .min_by_key(|(_, open)| open.idle_since)
                .map(|(&id, _)| id);
            let Some(idlest) = idlest else {
                return Err("too many API connections are busy; try again later");
            };
            if let Some(open) = connections.open.remove(&idlest) {
                info!("closing the API connection idle the longest to serve a new one");
                // Saying so first: a client that was slow to send its request
                // (a busy machine) then reads why, not a reset connection.
                let _ = write_reply(&mut &open.stream, Err(EVICTED.to_owned()));
                let _ = open.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        let clone = stream.try_clone().map_err(|e| {
            warn!("cannot register an API connection: {e}");
            "the API server cannot take this connection"
        })?;
        let id = connections.next_id;
        connections.next_id += 1;
        connections.open.insert(id, Open { stream: clone, idle_since: Instant::now(), busy: false });
        Ok(id)
    }

    /// Marks connection `id` as handling a request, or as idle from now.
    fn set_busy(&self, id: u64, busy: bool) {
        if let Some(open) = self.connections().open.get_mut(&id) {
            open.busy = busy;
            open.idle_since = Instant::now();
        }
    }

    fn unregister(&self, id: u64) {
        self.connections().open.remove(&id);
    }
}

/// Holds the "snapshot in progress" flag; clears it when dropped.
struct SnapshotGuard<'a>(&'a AtomicBool);

impl<'a> SnapshotGuard<'a> {
    fn acquire(flag: &'a AtomicBool) -> Option<Self> {
        flag.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).ok().map(|_| SnapshotGuard(flag))
    }
}

impl Drop for SnapshotGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// What woke the accept thread.
enum Wakeup {
    Connection,
    Stop,
}

/// Sleeps until the listener has a connection or the wake-up socket closes.
fn wait_for_wakeup(listener: &UnixListener, woken: &UnixStream) -> io::Result<Wakeup> {
    let mut fds = [
        libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: woken.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: `fds` is an array of two initialised pollfd that lives for
        // the whole call, and nfds is its length; both descriptors are open
        // because we borrow their owners.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc >= 0 {
            break;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    // Any event on the wake-up socket (hang-up when its peer is dropped) stops.
    if fds[1].revents != 0 {
        return Ok(Wakeup::Stop);
    }
    Ok(Wakeup::Connection)
}

/// The uid of the process at the other end of `stream`.
fn peer_uid(stream: &UnixStream) -> io::Result<libc::uid_t> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, which we
    // own and which is exactly `len` bytes; the descriptor is open.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Only our own user (and root, whom mode 0600 does not stop) may connect.
fn peer_allowed(stream: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    match peer_uid(stream) {
        Ok(uid) if uid == own || uid == 0 => true,
        Ok(uid) => {
            warn!("refusing an API connection from uid {uid}");
            false
        }
        Err(e) => {
            warn!("cannot read the credentials of an API client: {e}");
            false
        }
    }
}

/// The "api-server" thread: accepts connections until the server is dropped,
/// then waits for every connection thread.
fn accept_loop<T: From<ApiCall> + Send + 'static>(
    listener: UnixListener,
    woken: UnixStream,
    shared: Arc<Shared>,
    calls: Sender<T>,
) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    loop {
        match wait_for_wakeup(&listener, &woken) {
            Ok(Wakeup::Stop) => break,
            Ok(Wakeup::Connection) => {}
            Err(e) => {
                warn!("API server cannot wait for connections: {e}");
                thread::sleep(SHUTDOWN_POLL);
                continue;
            }
        }
        if shared.stopping() {
            break;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            Err(e) => {
                // E.g. out of descriptors: back off instead of spinning.
                warn!("API server cannot accept a connection: {e}");
                thread::sleep(SHUTDOWN_POLL);
                continue;
            }
        };
        workers.retain(|worker| !worker.is_finished());
        if let Some(worker) = spawn_connection(stream, &shared, &calls) {
            workers.push(worker);
        }
    }
    drop(calls);
    for worker in workers {
        if worker.join().is_err() {
            warn!("an API connection thread panicked");
        }
    }
}

/// Checks, registers and starts serving one accepted connection.
fn spawn_connection<T: From<ApiCall> + Send + 'static>(
    stream: UnixStream,
    shared: &Arc<Shared>,
    calls: &Sender<T>,
) -> Option<JoinHandle<()>> {
    if !peer_allowed(&stream) {
        return None;
    }
    // Accepted sockets do not inherit O_NONBLOCK on Linux; be explicit.
    if let Err(e) = stream.set_nonblocking(false).and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT))) {
        warn!("cannot configure an API connection: {e}");
        return None;
    }
    let id = match shared.register(&stream) {
        Ok(id) => id,
        Err(message) => {
            let mut stream = stream;
            let _ = write_reply(&mut stream, Err(message.to_owned()));
            return None;
        }
    };
    let thread_shared = Arc::clone(shared);
    let calls = calls.clone();
    let spawned = thread::Builder::new().name("api-conn".into()).spawn(move || {
        serve_connection(stream, id, &thread_shared, &calls);
        thread_shared.unregister(id);
    });
    match spawned {
        Ok(worker) => Some(worker),
        Err(e) => {
            warn!("cannot start a thread for an API connection: {e}");
            shared.unregister(id);
            None
        }
    }
}

/// One line read from a stream.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line ended by a newline (the newline is not included).
    Complete(Vec<u8>),
    /// The last bytes before end of stream, with no newline.
    Unterminated(Vec<u8>),
    /// The line is longer than the bound.
    TooLong,
    /// End of stream before any byte.
    End,
}

/// Reads one line of at most `max` bytes (newline excluded) without ever
/// buffering more than that.
fn read_line_bounded(reader: &mut impl BufRead, max: usize) -> io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if line.is_empty() { Line::End } else { Line::Unterminated(line) });
        }
        if let Some(newline) = available.iter().position(|&b| b == b'\n') {
            if line.len() + newline > max {
                return Ok(Line::TooLong);
            }
            line.extend_from_slice(&available[..newline]);
            reader.consume(newline + 1);
            return Ok(Line::Complete(line));
        }
        let taken = available.len();
        if line.len() + taken > max {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(available);
        reader.consume(taken);
    }
}

/// Serves the requests of one connection in order until it closes.
fn serve_connection<T: From<ApiCall>>(stream: UnixStream, id: u64, shared: &Shared, calls: &Sender<T>) {
    let writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(e) => {
            warn!("cannot split an API connection: {e}");
            return;
        }
    };
    serve_stream(BufReader::new(stream), writer, id, shared, calls);
}

/// The connection loop over any byte stream (a socket; bytes in memory
/// when fuzzed): reads bounded lines, answers each in turn.
fn serve_stream<T: From<ApiCall>>(mut reader: impl BufRead, mut writer: impl Write, id: u64, shared: &Shared, calls: &Sender<T>) {
    loop {
        let (line, last) = match read_line_bounded(&mut reader, MAX_REQUEST_BYTES) {
            Ok(Line::Complete(line)) => (line, false),
            Ok(Line::Unterminated(line)) => (line, true),
            Ok(Line::End) => return,
            Ok(Line::TooLong) => {
                // The rest of the line cannot be told apart from the next
                // request, so the connection ends after this reply.
                let message = format!("the request is longer than {MAX_REQUEST_BYTES} bytes; closing the connection");
                let _ = write_reply(&mut writer, Err(message));
                return;
            }
            Err(e) => {
                debug!("API connection read failed: {e}");
                return;
            }
        };
        if !line.trim_ascii().is_empty() {
            shared.set_busy(id, true);
            let reply = handle_line(&line, shared, calls);
            let written = write_reply(&mut writer, reply);
            shared.set_busy(id, false);
            if let Err(e) = written {
                debug!("cannot write an API reply: {e}");
                return;
            }
        }
        if last {
            return;
        }
    }
}

/// Parses one request line, hands it to the VMM and waits for the answer.
fn handle_line<T: From<ApiCall>>(line: &[u8], shared: &Shared, calls: &Sender<T>) -> ApiReply {
    let request = parse_request(line)?;
    debug!("API request {request:?}");
    if shared.stopping() {
        return Err("the VMM is shutting down".to_owned());
    }
    let _snapshot = match request {
        ApiRequest::Snapshot { .. } | ApiRequest::Backup { .. } => {
            Some(SnapshotGuard::acquire(&shared.snapshot_busy).ok_or_else(|| SNAPSHOT_BUSY.to_owned())?)
        }
        _ => None,
    };
    let (reply, answer) = mpsc::channel();
    if calls.send(T::from(ApiCall { request, reply })).is_err() {
        warn!("API request arrived after the VMM stopped taking requests");
        return Err("the VMM is no longer taking requests".to_owned());
    }
    // The snapshot guard lives until the VMM answers, even if the client
    // has gone away meanwhile: the snapshot is still running.
    loop {
        match answer.recv_timeout(SHUTDOWN_POLL) {
            Ok(reply) => return reply,
            Err(RecvTimeoutError::Disconnected) => {
                warn!("the VMM dropped an API request without answering");
                return Err("the VMM dropped the request without answering".to_owned());
            }
            Err(RecvTimeoutError::Timeout) if shared.stopping() => {
                // An answer sent just before the stop is still delivered.
                return answer.try_recv().unwrap_or_else(|_| Err("the VMM is shutting down".to_owned()));
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// Writes `{"ok":true,...}` or `{"ok":false,"error":...}` and a newline.
fn write_reply(writer: &mut impl Write, reply: ApiReply) -> io::Result<()> {
    let object = match reply {
        Ok(mut fields) => {
            fields.insert("ok".to_owned(), Value::Bool(true));
            fields
        }
        Err(message) => {
            debug!("API request refused: {message}");
            let mut fields = Map::new();
            fields.insert("ok".to_owned(), Value::Bool(false));
            fields.insert("error".to_owned(), Value::String(message));
            fields
        }
    };
    let mut line = Value::Object(object).to_string();
    line.push('\n');
    writer.write_all(line.as_bytes())?;
    writer.flush()
}

/// Parses one request line; the error is the sentence sent to the client.
fn parse_request(line: &[u8]) -> Result<ApiRequest, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("the request is not valid JSON ({e})"))?;
    let Value::Object(mut fields) = value else {
        return Err(r#"a request must be a JSON object such as {"op":"status"}"#.to_owned());
    };
    let op = match fields.remove("op") {
        Some(Value::String(op)) => op,
        Some(_) => return Err(r#"the "op" field must be a string"#.to_owned()),
        None => return Err(r#"the request has no "op" field"#.to_owned()),
    };
    let request = match op.as_str() {
        "pause" => ApiRequest::Pause,
        "resume" => ApiRequest::Resume,
        "status" => ApiRequest::Status,
        "snapshot" => {
            let out = match fields.remove("out") {
                Some(Value::String(out)) => PathBuf::from(out),
                Some(_) => return Err(r#"the "out" field must be a string naming a directory"#.to_owned()),
                None => {
                    return Err(r#"a snapshot request needs an "out" field naming the directory to write"#.to_owned())
                }
            };
            // The VMM's working directory is not the client's: only an
            // absolute path means the same to both.
            if !out.is_absolute() {
                return Err(format!(
                    r#"the "out" directory must be an absolute path, not {:?}"#,
                    out.display().to_string()
                ));
            }
            let then = match fields.remove("then") {
                None => AfterSnapshot::Resume,
                Some(Value::String(then)) if then == "resume" => AfterSnapshot::Resume,
                Some(Value::String(then)) if then == "exit" => AfterSnapshot::Exit,
                Some(_) => return Err(r#"the "then" field must be "resume" or "exit""#.to_owned()),
            };
            let parent = match fields.remove("parent") {
                None | Some(Value::Null) => None,
                Some(Value::String(p)) if Path::new(&p).is_absolute() => Some(PathBuf::from(p)),
                Some(Value::String(p)) => {
                    return Err(format!(r#"the "parent" directory must be an absolute path, not {p:?}"#))
                }
                Some(_) => return Err(r#"the "parent" field must be a string naming a snapshot directory"#.to_owned()),
            };
            let stop_the_world = match fields.remove("stop_the_world") {
                None => false,
                Some(Value::Bool(b)) => b,
                Some(_) => return Err(r#"the "stop_the_world" field must be true or false"#.to_owned()),
            };
            ApiRequest::Snapshot { out, then, parent, stop_the_world }
        }
        "backup" => {
            let to = match fields.remove("to") {
                Some(Value::String(to)) if Path::new(&to).is_absolute() => PathBuf::from(to),
                Some(Value::String(to)) => return Err(format!(r#"the "to" store must be an absolute path, not {to:?}"#)),
                Some(_) => return Err(r#"the "to" field must be a string naming a backup store"#.to_owned()),
                None => return Err(r#"a backup request needs a "to" field naming the backup store"#.to_owned()),
            };
            let full = match fields.remove("full") {
                None => false,
                Some(Value::Bool(b)) => b,
                Some(_) => return Err(r#"the "full" field must be true or false"#.to_owned()),
            };
            let state_dir = match fields.remove("state_dir") {
                None | Some(Value::Null) => None,
                Some(Value::String(d)) if Path::new(&d).is_absolute() => Some(PathBuf::from(d)),
                Some(Value::String(d)) => return Err(format!(r#"the "state_dir" directory must be an absolute path, not {d:?}"#)),
                Some(_) => return Err(r#"the "state_dir" field must be a string naming a directory"#.to_owned()),
            };
            ApiRequest::Backup { to, full, state_dir }
        }
        "grant" => {
            let ids = parse_ids(&mut fields, "grant")?;
            let uses = optional_count(&mut fields, "uses")?;
            if uses == Some(0) {
                return Err(r#"the "uses" field must be at least 1"#.to_owned());
            }
            let expires_s = optional_count(&mut fields, "expires_s")?;
            ApiRequest::Grant { ids, uses, expires_s }
        }
        "revoke" => ApiRequest::Revoke { ids: parse_ids(&mut fields, "revoke")? },
        "grants" => ApiRequest::Grants,
        other => {
            return Err(format!(
                "unknown op {other:?}: expected pause, resume, status, snapshot, backup, grant, revoke or grants"
            ))
        }
    };
    if let Some(unknown) = fields.keys().next() {
        return Err(format!("unknown field {unknown:?} in a {op} request"));
    }
    Ok(request)
}

/// The `ids` field of a grant or revoke request: a non-empty array of
/// content IDs.
fn parse_ids(fields: &mut Map<String, Value>, op: &str) -> Result<Vec<ContentId>, String> {
    let Some(Value::Array(values)) = fields.remove("ids") else {
        return Err(format!(r#"a {op} request needs an "ids" field: an array of content IDs ("sha256:<64 hex digits>")"#));
    };
    if values.is_empty() {
        return Err(r#"the "ids" array is empty"#.to_owned());
    }
    values
        .iter()
        .map(|v| match v {
            Value::String(s) => s.parse::<ContentId>().map_err(|e| e.to_string()),
            _ => Err(r#"each of "ids" must be a string"#.to_owned()),
        })
        .collect()
}

/// An optional whole-number field.
fn optional_count(fields: &mut Map<String, Value>, name: &str) -> Result<Option<u64>, String> {
    match fields.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| format!("the {name:?} field must be a whole number")),
    }
}

/// The wire form of a request.
fn request_json(request: &ApiRequest) -> Result<Value, ApiError> {
    let mut fields = Map::new();
    let op = match request {
        ApiRequest::Pause => "pause",
        ApiRequest::Resume => "resume",
        ApiRequest::Status => "status",
        ApiRequest::Snapshot { out, then, parent, stop_the_world } => {
            fields.insert("out".to_owned(), Value::String(absolute_utf8(out)?));
            fields.insert("then".to_owned(), Value::String(then.as_str().to_owned()));
            if let Some(parent) = parent {
                fields.insert("parent".to_owned(), Value::String(absolute_utf8(parent)?));
            }
            if *stop_the_world {
                fields.insert("stop_the_world".to_owned(), Value::Bool(true));
            }
            "snapshot"
        }
        ApiRequest::Backup { to, full, state_dir } => {
            fields.insert("to".to_owned(), Value::String(absolute_utf8(to)?));
            if *full {
                fields.insert("full".to_owned(), Value::Bool(true));
            }
            if let Some(dir) = state_dir {
                fields.insert("state_dir".to_owned(), Value::String(absolute_utf8(dir)?));
            }
            "backup"
        }
        ApiRequest::Grant { ids, uses, expires_s } => {
            fields.insert("ids".to_owned(), ids.iter().map(|id| Value::String(id.to_string())).collect());
            if let Some(uses) = uses {
                fields.insert("uses".to_owned(), Value::from(*uses));
            }
            if let Some(expires_s) = expires_s {
                fields.insert("expires_s".to_owned(), Value::from(*expires_s));
            }
            "grant"
        }
        ApiRequest::Revoke { ids } => {
            fields.insert("ids".to_owned(), ids.iter().map(|id| Value::String(id.to_string())).collect());
            "revoke"
        }
        ApiRequest::Grants => "grants",
    };
    fields.insert("op".to_owned(), Value::String(op.to_owned()));
    Ok(Value::Object(fields))
}

/// `path` made absolute against this process's working directory, as text.
fn absolute_utf8(path: &Path) -> Result<String, ApiError> {
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| ApiError::ResolvePath(path.to_path_buf(), e))?.join(path)
    };
    path.to_str().map(str::to_owned).ok_or(ApiError::NonUtf8Path(path.clone()))
}

/// Client side, for `stasis pause|resume|snapshot --api-sock PATH`: connects,
/// sends one request, waits for the reply (up to [`CLIENT_TIMEOUT`]), and
/// returns the reply's fields (without `ok`) on success, or
/// [`ApiError::Refused`] with the VMM's message on `{"ok":false}`.
///
/// A relative snapshot directory is made absolute against this process's
/// working directory before it is sent.
pub fn send_request(path: &Path, request: &ApiRequest) -> Result<Map<String, Value>, ApiError> {
    send_request_with_timeout(path, request, CLIENT_TIMEOUT)
}

fn send_request_with_timeout(
    path: &Path,
    request: &ApiRequest,
    timeout: Duration,
) -> Result<Map<String, Value>, ApiError> {
    let mut line = request_json(request)?.to_string();
    line.push('\n');
    let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ApiError::NoSocket(path.to_owned()),
        io::ErrorKind::ConnectionRefused => ApiError::NotListening(path.to_owned()),
        io::ErrorKind::PermissionDenied => ApiError::PermissionDenied(path.to_owned()),
        _ => ApiError::Connect(path.to_owned(), e),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(ApiError::ReceiveReply)?;
    stream.set_write_timeout(Some(timeout)).map_err(ApiError::SendRequest)?;
    (&stream).write_all(line.as_bytes()).map_err(ApiError::SendRequest)?;
    let mut reader = BufReader::new(&stream);
    let reply = match read_line_bounded(&mut reader, MAX_REPLY_BYTES) {
        Ok(Line::Complete(reply) | Line::Unterminated(reply)) => reply,
        Ok(Line::End) => return Err(ApiError::ClosedWithoutReply),
        Ok(Line::TooLong) => {
            return Err(ApiError::ParseReply(format!("the reply is longer than {MAX_REPLY_BYTES} bytes")))
        }
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            return Err(ApiError::Timeout(timeout))
        }
        Err(e) => return Err(ApiError::ReceiveReply(e)),
    };
    parse_reply(&reply)
}

/// Splits a reply line into its fields or the VMM's error message.
fn parse_reply(line: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(line).map_err(|e| ApiError::ParseReply(e.to_string()))?;
    let Value::Object(mut fields) = value else {
        return Err(ApiError::ParseReply("it is not a JSON object".to_owned()));
    };
    match fields.remove("ok") {
        Some(Value::Bool(true)) => Ok(fields),
        Some(Value::Bool(false)) => match fields.remove("error") {
            Some(Value::String(message)) => Err(ApiError::Refused(message)),
            _ => Err(ApiError::Refused("the VMM refused the request without saying why".to_owned())),
        },
        _ => Err(ApiError::ParseReply(r#"it has no boolean "ok" field"#.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::Receiver;
    use std::time::Instant;

    fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("api.sock")
    }

    /// A VMM stand-in: answers every call with `answer` and returns the
    /// requests it saw once every sender is gone.
    fn fake_vmm(
        calls: Receiver<ApiCall>,
        answer: impl Fn(&ApiRequest) -> ApiReply + Send + 'static,
    ) -> JoinHandle<Vec<ApiRequest>> {
        thread::spawn(move || {
            let mut seen = Vec::new();
            for call in calls {
                let reply = answer(&call.request);
                seen.push(call.request.clone());
                call.respond(reply);
            }
            seen
        })
    }

    fn fields(pairs: &[(&str, Value)]) -> Map<String, Value> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
    }

    fn echo_op(request: &ApiRequest) -> ApiReply {
        let op = match request {
            ApiRequest::Pause => "pause",
            ApiRequest::Resume => "resume",
            ApiRequest::Status => "status",
            ApiRequest::Snapshot { .. } => "snapshot",
            ApiRequest::Backup { .. } => "backup",
            ApiRequest::Grant { .. } => "grant",
            ApiRequest::Revoke { .. } => "revoke",
            ApiRequest::Grants => "grants",
        };
        Ok(fields(&[("did", Value::from(op))]))
    }

    /// A started server with an echoing fake VMM.
    fn echo_server(dir: &tempfile::TempDir) -> (ApiServer, JoinHandle<Vec<ApiRequest>>) {
        let (tx, rx) = mpsc::channel();
        let server = ApiServer::start(&socket_in(dir), tx).expect("start server");
        (server, fake_vmm(rx, echo_op))
    }

    /// A raw client connection that sends lines and reads reply objects.
    struct RawClient {
        reader: BufReader<UnixStream>,
        writer: UnixStream,
    }

    impl RawClient {
        fn connect(path: &Path) -> Self {
            let stream = UnixStream::connect(path).expect("connect");
            stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
            let writer = stream.try_clone().expect("clone");
            RawClient { reader: BufReader::new(stream), writer }
        }

        fn send(&mut self, bytes: &[u8]) {
            self.writer.write_all(bytes).expect("write request");
        }

        fn reply(&mut self) -> Map<String, Value> {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("read reply");
            assert!(line.ends_with('\n'), "reply not newline-terminated: {line:?}");
            match serde_json::from_str(&line).expect("reply is JSON") {
                Value::Object(map) => map,
                other => panic!("reply is not an object: {other}"),
            }
        }

        fn ask(&mut self, line: &str) -> Map<String, Value> {
            self.send(format!("{line}\n").as_bytes());
            self.reply()
        }

        /// True when the server closed the connection: end of stream, or a
        /// reset when it closed with some of our bytes unread.
        fn closed(&mut self) -> bool {
            let mut rest = Vec::new();
            match self.reader.read_until(b'\n', &mut rest) {
                Ok(0) => true,
                Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            }
        }
    }

    fn error_of(reply: &Map<String, Value>) -> &str {
        assert_eq!(reply.get("ok"), Some(&Value::Bool(false)), "expected an error reply: {reply:?}");
        reply.get("error").and_then(Value::as_str).expect("error message")
    }

    fn stop(server: ApiServer, vmm: JoinHandle<Vec<ApiRequest>>) -> Vec<ApiRequest> {
        drop(server);
        vmm.join().expect("fake VMM")
    }

    #[test]
    fn pause_round_trips_through_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let reply = send_request(server.path(), &ApiRequest::Pause).expect("pause");
        assert_eq!(reply, fields(&[("did", Value::from("pause"))]));
        assert_eq!(stop(server, vmm), vec![ApiRequest::Pause]);
    }

    #[test]
    fn resume_round_trips_through_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let reply = send_request(server.path(), &ApiRequest::Resume).expect("resume");
        assert_eq!(reply, fields(&[("did", Value::from("resume"))]));
        assert_eq!(stop(server, vmm), vec![ApiRequest::Resume]);
    }

    #[test]
    fn status_round_trips_with_the_vmm_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel();
        let server = ApiServer::start(&socket_in(&dir), tx).expect("start");
        let vmm = fake_vmm(rx, |_| Ok(fields(&[("state", Value::from("running")), ("vcpus", Value::from(2))])));
        let reply = send_request(server.path(), &ApiRequest::Status).expect("status");
        assert_eq!(reply, fields(&[("state", Value::from("running")), ("vcpus", Value::from(2))]));
        assert_eq!(stop(server, vmm), vec![ApiRequest::Status]);
    }

    #[test]
    fn snapshot_round_trips_with_out_and_then() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let request = ApiRequest::Snapshot { out: PathBuf::from("/var/snap/one"), then: AfterSnapshot::Exit, parent: None, stop_the_world: false };
        let reply = send_request(server.path(), &request).expect("snapshot");
        assert_eq!(reply, fields(&[("did", Value::from("snapshot"))]));
        assert_eq!(stop(server, vmm), vec![request]);
    }

    #[test]
    fn server_forwards_into_a_vmm_event_type() {
        enum Event {
            Api(ApiCall),
        }
        impl From<ApiCall> for Event {
            fn from(call: ApiCall) -> Self {
                Event::Api(call)
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel::<Event>();
        let server = ApiServer::start(&socket_in(&dir), tx).expect("start");
        let vmm = thread::spawn(move || {
            for Event::Api(call) in rx {
                call.respond(Ok(Map::new()));
            }
        });
        assert_eq!(send_request(server.path(), &ApiRequest::Status).expect("status"), Map::new());
        drop(server);
        vmm.join().expect("fake VMM");
    }

    #[test]
    fn snapshot_then_defaults_to_resume() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        let reply = client.ask(r#"{"op":"snapshot","out":"/tmp/snap"}"#);
        assert_eq!(reply.get("ok"), Some(&Value::Bool(true)));
        drop(client);
        let expected = ApiRequest::Snapshot { out: PathBuf::from("/tmp/snap"), then: AfterSnapshot::Resume, parent: None, stop_the_world: false };
        assert_eq!(stop(server, vmm), vec![expected]);
    }

    #[test]
    fn incremental_and_stop_the_world_snapshots_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let request = ApiRequest::Snapshot {
            out: PathBuf::from("/s/b"),
            then: AfterSnapshot::Resume,
            parent: Some(PathBuf::from("/s/a")),
            stop_the_world: true,
        };
        send_request(server.path(), &request).expect("snapshot");
        assert_eq!(stop(server, vmm), vec![request]);
    }

    #[test]
    fn bad_parent_and_stop_the_world_fields_get_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        let reply = client.ask(r#"{"op":"snapshot","out":"/tmp/s","parent":"rel/a"}"#);
        assert_eq!(error_of(&reply), r#"the "parent" directory must be an absolute path, not "rel/a""#);
        let reply = client.ask(r#"{"op":"snapshot","out":"/tmp/s","parent":7}"#);
        assert_eq!(error_of(&reply), r#"the "parent" field must be a string naming a snapshot directory"#);
        let reply = client.ask(r#"{"op":"snapshot","out":"/tmp/s","stop_the_world":"yes"}"#);
        assert_eq!(error_of(&reply), r#"the "stop_the_world" field must be true or false"#);
        drop(client);
        assert!(stop(server, vmm).is_empty(), "a bad request reached the VMM");
    }

    #[test]
    fn client_sends_a_relative_out_as_absolute() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let request = ApiRequest::Snapshot { out: PathBuf::from("snaps/a"), then: AfterSnapshot::Resume, parent: None, stop_the_world: false };
        send_request(server.path(), &request).expect("snapshot");
        let cwd = std::env::current_dir().expect("cwd");
        let expected = ApiRequest::Snapshot { out: cwd.join("snaps/a"), then: AfterSnapshot::Resume, parent: None, stop_the_world: false };
        assert_eq!(stop(server, vmm), vec![expected]);
    }

    #[test]
    fn one_connection_carries_several_requests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        client.send(b"{\"op\":\"pause\"}\n{\"op\":\"status\"}\n");
        assert_eq!(client.reply().get("did"), Some(&Value::from("pause")));
        assert_eq!(client.reply().get("did"), Some(&Value::from("status")));
        assert_eq!(client.ask(r#"{"op":"resume"}"#).get("did"), Some(&Value::from("resume")));
        drop(client);
        assert_eq!(stop(server, vmm), vec![ApiRequest::Pause, ApiRequest::Status, ApiRequest::Resume]);
    }

    #[test]
    fn last_request_without_newline_is_answered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        client.send(br#"{"op":"status"}"#);
        client.writer.shutdown(std::net::Shutdown::Write).expect("half-close");
        assert_eq!(client.reply().get("did"), Some(&Value::from("status")));
        assert!(client.closed());
        drop(client);
        assert_eq!(stop(server, vmm), vec![ApiRequest::Status]);
    }

    #[test]
    fn blank_lines_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        client.send(b"\n  \r\n{\"op\":\"status\"}\r\n");
        assert_eq!(client.reply().get("did"), Some(&Value::from("status")));
        drop(client);
        assert_eq!(stop(server, vmm), vec![ApiRequest::Status]);
    }

    #[test]
    fn malformed_json_gets_an_error_and_the_connection_stays_usable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        let reply = client.ask(r#"{"op":"status""#);
        assert!(error_of(&reply).starts_with("the request is not valid JSON"), "{reply:?}");
        let reply = client.ask("\u{00ff}\u{00fe}garbage");
        assert!(error_of(&reply).starts_with("the request is not valid JSON"), "{reply:?}");
        assert_eq!(client.ask(r#"{"op":"status"}"#).get("ok"), Some(&Value::Bool(true)));
        drop(client);
        assert_eq!(stop(server, vmm), vec![ApiRequest::Status]);
    }

    #[test]
    fn invalid_utf8_gets_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        client.send(b"{\"op\":\"\xff\xfe\"}\n");
        assert!(error_of(&client.reply()).starts_with("the request is not valid JSON"));
        drop(client);
        assert!(stop(server, vmm).is_empty());
    }

    #[test]
    fn non_object_request_gets_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        assert!(error_of(&client.ask(r#"["status"]"#)).starts_with("a request must be a JSON object"));
        drop(client);
        assert!(stop(server, vmm).is_empty());
    }

    #[test]
    fn unknown_op_gets_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        let reply = client.ask(r#"{"op":"reboot"}"#);
        assert_eq!(error_of(&reply), r#"unknown op "reboot": expected pause, resume, status, snapshot, backup, grant, revoke or grants"#);
        drop(client);
        assert!(stop(server, vmm).is_empty());
    }

    #[test]
    fn missing_or_mistyped_op_gets_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        assert_eq!(error_of(&client.ask("{}")), r#"the request has no "op" field"#);
        assert_eq!(error_of(&client.ask(r#"{"op":3}"#)), r#"the "op" field must be a string"#);
        drop(client);
        assert!(stop(server, vmm).is_empty());
    }

    #[test]
    fn snapshot_without_out_gets_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        let reply = client.ask(r#"{"op":"snapshot","then":"exit"}"#);
        assert_eq!(error_of(&reply), r#"a snapshot request needs an "out" field naming the directory to write"#);
        drop(client);
        assert!(stop(server, vmm).is_empty());
    }

    #[test]
    fn snapshot_with_mistyped_fields_gets_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        let reply = client.ask(r#"{"op":"snapshot","out":42}"#);
        assert_eq!(error_of(&reply), r#"the "out" field must be a string naming a directory"#);
        let reply = client.ask(r#"{"op":"snapshot","out":"/tmp/s","then":"pause"}"#);
        assert_eq!(error_of(&reply), r#"the "then" field must be "resume" or "exit""#);
        let reply = client.ask(r#"{"op":"snapshot","out":"/tmp/s","then":null}"#);
        assert_eq!(error_of(&reply), r#"the "then" field must be "resume" or "exit""#);
        drop(client);
        assert!(stop(server, vmm).is_empty());
    }

    #[test]
    fn snapshot_with_relative_out_gets_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        let reply = client.ask(r#"{"op":"snapshot","out":"snap"}"#);
        assert!(error_of(&reply).starts_with(r#"the "out" directory must be an absolute path"#), "{reply:?}");
        let reply = client.ask(r#"{"op":"snapshot","out":""}"#);
        assert!(error_of(&reply).starts_with(r#"the "out" directory must be an absolute path"#), "{reply:?}");
        drop(client);
        assert!(stop(server, vmm).is_empty());
    }

    #[test]
    fn unknown_field_gets_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        let reply = client.ask(r#"{"op":"pause","force":true}"#);
        assert_eq!(error_of(&reply), r#"unknown field "force" in a pause request"#);
        drop(client);
        assert!(stop(server, vmm).is_empty());
    }

    #[test]
    fn clients_that_send_nothing_fill_no_place_for_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        // Every place taken by a client that sends nothing.
        let mut silent: Vec<RawClient> = (0..MAX_CONNECTIONS).map(|_| RawClient::connect(server.path())).collect();
        thread::sleep(IDLE_EVICTABLE + Duration::from_millis(200));
        // A new client is served: the idlest silent one made room.
        let mut client = RawClient::connect(server.path());
        assert_eq!(client.ask(r#"{"op":"status"}"#).get("did"), Some(&Value::from("status")));
        // The one closed reads why, then the end of the connection.
        let closed: Vec<usize> = silent
            .iter_mut()
            .enumerate()
            .filter_map(|(i, c)| {
                c.reader.get_ref().set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
                let mut line = String::new();
                c.reader.read_line(&mut line).ok().filter(|&n| n > 0)?;
                assert!(line.contains("closed to serve a new one"), "{line}");
                assert!(c.closed(), "a line, then the end");
                Some(i)
            })
            .collect();
        assert_eq!(closed.len(), 1, "exactly one idle client was closed: {closed:?}");
        drop((client, silent));
        assert_eq!(stop(server, vmm), vec![ApiRequest::Status]);
    }

    #[test]
    fn half_lines_deaf_clients_and_many_clients_do_not_hold_up_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        // Half a request, then gone.
        let mut half = RawClient::connect(server.path());
        half.send(br#"{"op":"sta"#);
        drop(half);
        // A client that sends requests and never reads its replies: its
        // own connection stalls, then is dropped after the write timeout.
        let deaf = UnixStream::connect(server.path()).expect("connect");
        let deaf_writer = {
            let mut deaf = deaf.try_clone().expect("clone");
            thread::spawn(move || {
                let line = b"{\"op\":\"status\"}\n".repeat(1024);
                for _ in 0..512 {
                    if deaf.write_all(&line).is_err() {
                        break;
                    }
                }
            })
        };
        // Meanwhile, eight clients at once, twenty requests each.
        let path = server.path().to_path_buf();
        let started = Instant::now();
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                thread::spawn(move || {
                    let mut client = RawClient::connect(&path);
                    (0..20).filter(|_| client.ask(r#"{"op":"pause"}"#).get("did") == Some(&Value::from("pause"))).count()
                })
            })
            .collect();
        let answered: usize = workers.into_iter().map(|w| w.join().expect("client")).sum();
        assert_eq!(answered, 160, "every request of the well-behaved clients was answered");
        assert!(started.elapsed() < WRITE_TIMEOUT, "the well-behaved clients waited for the deaf one");
        deaf.shutdown(std::net::Shutdown::Both).expect("shutdown");
        deaf_writer.join().expect("deaf writer");
        let seen = stop(server, vmm);
        assert_eq!(seen.iter().filter(|r| **r == ApiRequest::Pause).count(), 160);
    }

    #[test]
    fn overlong_line_gets_an_error_then_the_connection_closes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mut client = RawClient::connect(server.path());
        let padding = "x".repeat(MAX_REQUEST_BYTES);
        // The server may close before reading all of it; a failed write is fine.
        let _ = client.writer.write_all(format!(r#"{{"op":"status","pad":"{padding}"}}"#).as_bytes());
        let reply = client.reply();
        assert!(error_of(&reply).starts_with("the request is longer than 65536 bytes"), "{reply:?}");
        assert!(client.closed());
        drop(client);
        assert!(stop(server, vmm).is_empty());
    }

    #[test]
    fn line_of_exactly_the_bound_is_accepted() {
        let mut reader = io::Cursor::new(format!("{}\n", "a".repeat(16)).into_bytes());
        assert_eq!(read_line_bounded(&mut reader, 16).expect("read"), Line::Complete(vec![b'a'; 16]));
        let mut reader = io::Cursor::new(format!("{}\n", "a".repeat(17)).into_bytes());
        assert_eq!(read_line_bounded(&mut reader, 16).expect("read"), Line::TooLong);
    }

    #[test]
    fn snapshot_while_snapshot_runs_is_busy_and_status_still_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel::<ApiCall>();
        let server = ApiServer::start(&socket_in(&dir), tx).expect("start");
        let (held_tx, held_rx) = mpsc::channel::<ApiCall>();
        // The VMM hands the first call (the snapshot) to the test, which
        // answers it later, and answers everything else at once.
        let vmm = thread::spawn(move || {
            let mut seen = Vec::new();
            for call in rx {
                seen.push(call.request.clone());
                if seen.len() == 1 {
                    held_tx.send(call).expect("hand over the snapshot");
                } else {
                    call.respond(Ok(Map::new()));
                }
            }
            seen
        });
        let path = server.path().to_owned();
        let first = thread::spawn(move || {
            send_request(&path, &ApiRequest::Snapshot { out: "/tmp/a".into(), then: AfterSnapshot::Resume, parent: None, stop_the_world: false })
        });
        let held = held_rx.recv().expect("first snapshot reached the VMM");
        assert!(matches!(held.request, ApiRequest::Snapshot { .. }));

        let second =
            send_request(server.path(), &ApiRequest::Snapshot { out: "/tmp/b".into(), then: AfterSnapshot::Exit, parent: None, stop_the_world: false });
        assert!(matches!(&second, Err(ApiError::Refused(m)) if m == SNAPSHOT_BUSY), "{second:?}");
        assert_eq!(send_request(server.path(), &ApiRequest::Status).expect("status"), Map::new());

        held.respond(Ok(fields(&[("bytes", Value::from(4096))])));
        let first = first.join().expect("first client").expect("first snapshot");
        assert_eq!(first, fields(&[("bytes", Value::from(4096))]));
        // The flag is cleared: a new snapshot goes through.
        send_request(server.path(), &ApiRequest::Snapshot { out: "/tmp/c".into(), then: AfterSnapshot::Resume, parent: None, stop_the_world: false })
            .expect("third snapshot");
        drop(server);
        let seen = vmm.join().expect("fake VMM");
        assert_eq!(seen.len(), 3, "the busy snapshot must not reach the VMM: {seen:?}");
        assert_eq!(seen[1], ApiRequest::Status);
    }

    #[test]
    fn socket_file_has_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let mode = std::fs::metadata(server.path()).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        stop(server, vmm);
    }

    #[test]
    fn stale_socket_file_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_in(&dir);
        // A listener dropped without unlinking leaves a stale socket file.
        drop(UnixListener::bind(&path).expect("bind stale"));
        assert!(std::fs::symlink_metadata(&path).expect("stale file").file_type().is_socket());
        let (tx, rx) = mpsc::channel();
        let server = ApiServer::start(&path, tx).expect("start over stale socket");
        let vmm = fake_vmm(rx, echo_op);
        assert_eq!(send_request(&path, &ApiRequest::Status).expect("status").get("did"), Some(&Value::from("status")));
        stop(server, vmm);
    }

    #[test]
    fn live_server_path_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        let (tx, _rx) = mpsc::channel::<ApiCall>();
        let second = ApiServer::start(server.path(), tx);
        assert!(matches!(second, Err(ApiError::InUse(_))), "{:?}", second.err());
        // The first server still works and still owns its file.
        assert!(send_request(server.path(), &ApiRequest::Status).is_ok());
        stop(server, vmm);
    }

    #[test]
    fn regular_file_at_the_path_is_refused_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_in(&dir);
        std::fs::write(&path, b"precious").expect("write file");
        let (tx, _rx) = mpsc::channel::<ApiCall>();
        let result = ApiServer::start(&path, tx);
        assert!(matches!(result, Err(ApiError::NotASocket(_))), "{:?}", result.err());
        assert_eq!(std::fs::read(&path).expect("file kept"), b"precious");
    }

    #[test]
    fn missing_parent_directory_fails_to_bind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, _rx) = mpsc::channel::<ApiCall>();
        let result = ApiServer::start(&dir.path().join("no/such/dir/api.sock"), tx);
        assert!(matches!(result, Err(ApiError::Bind(..))), "{:?}", result.err());
    }

    #[test]
    fn client_reports_a_missing_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let result = send_request(&socket_in(&dir), &ApiRequest::Status);
        assert!(matches!(result, Err(ApiError::NoSocket(_))), "{result:?}");
        let message = result.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("--api-sock"), "{message}");
    }

    #[test]
    fn client_reports_a_socket_nobody_listens_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_in(&dir);
        drop(UnixListener::bind(&path).expect("bind stale"));
        let result = send_request(&path, &ApiRequest::Status);
        assert!(matches!(result, Err(ApiError::NotListening(_))), "{result:?}");
    }

    #[test]
    fn client_returns_the_vmm_error_as_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel();
        let server = ApiServer::start(&socket_in(&dir), tx).expect("start");
        let vmm = fake_vmm(rx, |_| Err("the VM is already paused".to_owned()));
        let result = send_request(server.path(), &ApiRequest::Pause);
        assert!(matches!(&result, Err(ApiError::Refused(m)) if m == "the VM is already paused"), "{result:?}");
        stop(server, vmm);
    }

    #[test]
    fn client_times_out_when_the_vmm_never_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel::<ApiCall>();
        let server = ApiServer::start(&socket_in(&dir), tx).expect("start");
        let result = send_request_with_timeout(server.path(), &ApiRequest::Status, Duration::from_millis(200));
        assert!(matches!(result, Err(ApiError::Timeout(_))), "{result:?}");
        // The VMM still holds the call unanswered while the server stops.
        let held = rx.recv().expect("call reached the VMM");
        drop(server);
        drop(held);
    }

    #[test]
    fn vmm_gone_gets_an_error_reply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel::<ApiCall>();
        let server = ApiServer::start(&socket_in(&dir), tx).expect("start");
        drop(rx);
        let result = send_request(server.path(), &ApiRequest::Status);
        assert!(
            matches!(&result, Err(ApiError::Refused(m)) if m == "the VMM is no longer taking requests"),
            "{result:?}"
        );
    }

    #[test]
    fn vmm_dropping_the_reply_gets_an_error_and_clears_the_snapshot_flag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel::<ApiCall>();
        let server = ApiServer::start(&socket_in(&dir), tx).expect("start");
        let vmm = thread::spawn(move || rx.into_iter().count());
        let snapshot = ApiRequest::Snapshot { out: "/tmp/s".into(), then: AfterSnapshot::Resume, parent: None, stop_the_world: false };
        let result = send_request(server.path(), &snapshot);
        let expected = "the VMM dropped the request without answering";
        assert!(matches!(&result, Err(ApiError::Refused(m)) if m == expected), "{result:?}");
        let again = send_request(server.path(), &snapshot);
        assert!(matches!(&again, Err(ApiError::Refused(m)) if m == expected), "{again:?}");
        drop(server);
        assert_eq!(vmm.join().expect("fake VMM"), 2);
    }

    #[test]
    fn reply_sent_just_before_the_server_is_dropped_still_arrives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel::<ApiCall>();
        let server = ApiServer::start(&socket_in(&dir), tx).expect("start");
        let path = server.path().to_owned();
        // Like `then: exit`: answer, then stop serving at once.
        let vmm = thread::spawn(move || {
            let call = rx.recv().expect("call");
            call.respond(Ok(fields(&[("exiting", Value::Bool(true))])));
            drop(server);
        });
        let request = ApiRequest::Snapshot { out: "/tmp/s".into(), then: AfterSnapshot::Exit, parent: None, stop_the_world: false };
        let reply = send_request(&path, &request).expect("snapshot reply");
        assert_eq!(reply, fields(&[("exiting", Value::Bool(true))]));
        vmm.join().expect("fake VMM");
    }

    #[test]
    fn dropping_the_server_removes_the_file_and_ends_its_threads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::channel::<ApiCall>();
        let server = ApiServer::start(&socket_in(&dir), tx).expect("start");
        let path = server.path().to_owned();
        // An idle client keeps a connection thread blocked on a read.
        let mut idle = RawClient::connect(&path);
        assert_eq!(idle.ask(r#"{"op":"nope"}"#).get("ok"), Some(&Value::Bool(false)));

        let (done_tx, done) = mpsc::channel();
        thread::spawn(move || {
            drop(server);
            let _ = done_tx.send(());
        });
        done.recv_timeout(Duration::from_secs(10)).expect("drop returned");

        assert!(!path.exists(), "socket file left behind");
        assert!(idle.closed(), "idle connection not closed");
        // Every thread holding a sender is gone.
        let started = Instant::now();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).err(), Some(RecvTimeoutError::Disconnected));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn dropping_the_server_keeps_a_file_that_replaced_its_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, vmm) = echo_server(&dir);
        std::fs::remove_file(server.path()).expect("remove socket");
        std::fs::write(server.path(), b"someone else's").expect("write file");
        let path = server.path().to_owned();
        stop(server, vmm);
        assert_eq!(std::fs::read(&path).expect("file kept"), b"someone else's");
    }

    #[test]
    fn reply_fields_cannot_override_ok() {
        let mut out = Vec::new();
        write_reply(&mut out, Ok(fields(&[("ok", Value::Bool(false)), ("n", Value::from(1))]))).expect("write");
        let value: Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(value, serde_json::json!({"ok": true, "n": 1}));
        assert_eq!(out.last(), Some(&b'\n'));
    }

    #[test]
    fn reply_without_ok_is_malformed() {
        let result = parse_reply(br#"{"state":"running"}"#);
        assert!(matches!(result, Err(ApiError::ParseReply(_))), "{result:?}");
    }

    #[test]
    fn content_requests_parse_and_round_trip() {
        let id = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let line = format!(r#"{{"op":"grant","ids":["{id}"],"uses":2,"expires_s":60}}"#);
        let request = parse_request(line.as_bytes()).expect("grant");
        let ids = vec![id.parse::<ContentId>().expect("id")];
        assert_eq!(request, ApiRequest::Grant { ids: ids.clone(), uses: Some(2), expires_s: Some(60) });
        let wire = request_json(&request).expect("json").to_string();
        assert_eq!(parse_request(wire.as_bytes()).expect("again"), request);
        let revoke = ApiRequest::Revoke { ids };
        let wire = request_json(&revoke).expect("json").to_string();
        assert_eq!(parse_request(wire.as_bytes()).expect("revoke"), revoke);
        assert_eq!(parse_request(br#"{"op":"grants"}"#).expect("grants"), ApiRequest::Grants);
        for (bad, says) in [
            (r#"{"op":"grant"}"#.to_owned(), "needs an \"ids\" field"),
            (r#"{"op":"grant","ids":[]}"#.to_owned(), "empty"),
            (r#"{"op":"grant","ids":["../etc/passwd"]}"#.to_owned(), "is not a content ID"),
            (r#"{"op":"grant","ids":[7]}"#.to_owned(), "must be a string"),
            (format!(r#"{{"op":"grant","ids":["{id}"],"uses":0}}"#), "at least 1"),
            (format!(r#"{{"op":"grant","ids":["{id}"],"uses":-1}}"#), "whole number"),
            (format!(r#"{{"op":"revoke","ids":["{id}"],"uses":1}}"#), "unknown field"),
        ] {
            let err = parse_request(bad.as_bytes()).expect_err(&bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
