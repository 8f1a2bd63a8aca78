//! The host side of virtio-vsock: a Unix listener for host-initiated
//! connections, Unix streams for every connection, and the packets the
//! guest is owed.
//!
//! Host to guest: a host program connects to the listener and writes
//! `CONNECT <port>\n` (at most 32 bytes, within [`CONNECT_TIMEOUT`]); the
//! guest gets a REQUEST from a host port allocated here, and when it
//! answers RESPONSE the host program reads `OK <host port>\n`. Guest to
//! host: a REQUEST to host port P connects to the Unix socket
//! `<uds_path>_P`; RESPONSE if someone listens there, RST otherwise.
//! A port the VMM serves itself ([`HostService`], e.g. content
//! provisioning) is handed to that service instead, with or without a
//! Unix socket; a device with no socket refuses every other port.
//!
//! Everything waits on one level-triggered epoll ([`Muxer::epoll_fd`]).
//! A stream is watched for input only while the guest has credit for it
//! and the rx queue has buffers, so a guest that stops reading never
//! makes the device thread spin.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, State};
use super::packet::{
    Header, HOST_CID, MAX_PKT_DATA, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::{HostService, HostServices, VsockError};
use crate::devices::virtio::WarnLimiter;

/// Connections, established or still sending their CONNECT line, at most.
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets queued for the guest beyond which the tx queue is not
/// read until the guest gives rx buffers.
pub const MAX_QUEUED_CONTROL: usize = 2048;
/// The longest CONNECT line, newline included.
pub const MAX_CONNECT_LINE: usize = 32;
/// How long a host program has to send its CONNECT line.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The first host port handed to host-initiated connections.
const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;
/// Epoll events handled per wake-up; the rest stay pending (level-triggered).
const EVENTS_PER_WAIT: usize = 64;

/// (host port, guest port).
type ConnKey = (u32, u32);

/// The listener host programs connect to, and where it is.
struct HostSocket {
    uds_path: PathBuf,
    listener: UnixListener,
}

/// A host stream that has not finished its CONNECT line.
struct PendingConnect {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// The next packet for the guest's rx queue.
#[derive(Debug, PartialEq, Eq)]
pub enum RxNext {
    /// A header, with that many bytes of payload at the start of the buffer.
    Packet(Header, usize),
    /// Data waits, but the rx buffer has no room for any.
    NoRoom,
    /// Nothing to send.
    Nothing,
}

/// The host side.
pub struct Muxer {
    guest_cid: u64,
    /// The Unix socket for host programs, if the device has one.
    host: Option<HostSocket>,
    /// Host ports the VMM serves itself.
    services: HashMap<u32, Arc<dyn HostService>>,
    epoll: Epoll,
    timer: TimerFd,
    pending: HashMap<RawFd, PendingConnect>,
    conns: HashMap<ConnKey, Connection>,
    fd_keys: HashMap<RawFd, ConnKey>,
    ctrl: VecDeque<Header>,
    readable: VecDeque<ConnKey>,
    rx_starved: bool,
    next_port: u32,
    warn: WarnLimiter,
}

impl Muxer {
    /// Listens on `uds_path` (when given) for a guest with CID
    /// `guest_cid`, and hands guest connections to the ports of `services`
    /// to them.
    pub fn new(guest_cid: u64, uds_path: Option<&Path>, services: HostServices) -> Result<Self, VsockError> {
        let host = match uds_path {
            Some(path) => Some(HostSocket { uds_path: path.to_path_buf(), listener: bind_listener(path)? }),
            None => None,
        };
        let epoll = Epoll::new().map_err(VsockError::EventLoop)?;
        let timer = TimerFd::new()
            .map_err(|e| VsockError::EventLoop(io::Error::from_raw_os_error(e.errno())))?;
        let listener_fd = host.as_ref().map(|h| h.listener.as_raw_fd());
        for fd in listener_fd.into_iter().chain([timer.as_raw_fd()]) {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd as u64))
                .map_err(VsockError::EventLoop)?;
        }
        Ok(Muxer {
            guest_cid,
            host,
            services: services.into_iter().collect(),
            epoll,
            timer,
            pending: HashMap::new(),
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            ctrl: VecDeque::new(),
            readable: VecDeque::new(),
            rx_starved: false,
            next_port: FIRST_EPHEMERAL_PORT,
            warn: WarnLimiter::new(),
        })
    }

    /// The one fd the device thread waits on.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Established or half-open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Too many control packets wait for rx buffers to read more guest
    /// packets.
    pub fn control_full(&self) -> bool {
        self.ctrl.len() >= MAX_QUEUED_CONTROL
    }

    /// Whether something may be waiting for the rx queue.
    pub fn has_rx(&self) -> bool {
        !self.ctrl.is_empty() || !self.readable.is_empty()
    }

    /// Closes every connection and forgets every packet owed to the guest.
    pub fn reset(&mut self) {
        self.conns.clear();
        self.fd_keys.clear();
        self.pending.clear();
        self.ctrl.clear();
        self.readable.clear();
        self.rx_starved = false;
        self.rearm_timer();
    }

    /// The rx queue ran out of buffers (`true`) or got some (`false`):
    /// stop or resume watching the streams' input.
    pub fn set_rx_starved(&mut self, starved: bool) {
        if self.rx_starved == starved {
            return;
        }
        self.rx_starved = starved;
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.update_interest(key);
        }
    }

    /// Handles what the epoll reports: new host connections, CONNECT
    /// lines, their timeouts, and streams ready for reading or writing.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENTS_PER_WAIT];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                self.warn.warn(format_args!("vsock: epoll_wait failed: {e}"));
                return;
            }
        };
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            if self.host.as_ref().is_some_and(|h| h.listener.as_raw_fd() == fd) {
                self.accept_all();
            } else if fd == self.timer.as_raw_fd() {
                self.expire_pending();
            } else if self.pending.contains_key(&fd) {
                self.read_connect_line(fd);
            } else if let Some(&key) = self.fd_keys.get(&fd) {
                self.stream_event(key, ev.event_set());
            }
        }
    }

    /// A packet the guest sent on its tx queue. `data` is the payload of
    /// an RW packet.
    pub fn handle_guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            self.warn.warn(format_args!(
                "vsock: dropped a packet from CID {} (the guest is CID {})",
                hdr.src_cid, self.guest_cid
            ));
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            self.warn.warn(format_args!(
                "vsock: reset a packet to CID {} of type {}",
                hdr.dst_cid, hdr.type_
            ));
            self.reply_rst(hdr);
            return;
        }
        if hdr.op == OP_REQUEST {
            self.guest_connect(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let guest_cid = self.guest_cid;
        let Some(conn) = self.conns.get_mut(&key) else {
            self.reply_rst(hdr);
            return;
        };
        conn.update_peer_credit(hdr);
        match hdr.op {
            OP_RST => {
                self.remove(key);
                return;
            }
            OP_RESPONSE if conn.state == State::AwaitingResponse => {
                let line = format!("OK {}\n", conn.local_port);
                match conn.stream.write(line.as_bytes()) {
                    Ok(n) if n == line.len() => conn.state = State::Established,
                    _ => {
                        self.reset_conn(key);
                        return;
                    }
                }
            }
            OP_RW if conn.state == State::Established && !conn.peer_shut_send => {
                if let Err(e) = conn.push_guest_data(data) {
                    self.warn.warn(format_args!("vsock: reset connection {key:?}: {e}"));
                    self.reset_conn(key);
                    return;
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                let h = conn.credit_update(guest_cid);
                self.ctrl.push_back(h);
            }
            OP_SHUTDOWN => {
                conn.peer_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                conn.peer_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
                if conn.peer_shut_rcv && conn.peer_shut_send {
                    conn.state = State::Closing;
                }
            }
            _ => {
                self.reset_conn(key);
                return;
            }
        }
        self.after_change(key);
    }

    /// The next packet for an rx buffer with `room` bytes of payload space;
    /// host data goes to `buf`.
    pub fn next_rx(&mut self, room: usize, buf: &mut [u8]) -> RxNext {
        if let Some(h) = self.ctrl.pop_front() {
            return RxNext::Packet(h, 0);
        }
        let room = room.min(buf.len()).min(MAX_PKT_DATA as usize);
        if room == 0 {
            return if self.readable.is_empty() { RxNext::Nothing } else { RxNext::NoRoom };
        }
        let guest_cid = self.guest_cid;
        while let Some(key) = self.readable.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            conn.queued_readable = false;
            if !conn.wants_host_data() {
                continue;
            }
            match conn.read_host(&mut buf[..room]) {
                Ok(0) => {
                    conn.host_eof = true;
                    let mut h = conn.header(guest_cid, OP_SHUTDOWN);
                    h.flags = SHUTDOWN_SEND | if conn.hup { SHUTDOWN_RCV } else { 0 };
                    self.update_interest(key);
                    return RxNext::Packet(h, 0);
                }
                Ok(n) => {
                    conn.record_sent(n as u32);
                    let mut h = conn.header(guest_cid, OP_RW);
                    h.len = n as u32;
                    conn.queued_readable = true;
                    self.readable.push_back(key);
                    self.update_interest(key);
                    return RxNext::Packet(h, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.reset_conn(key);
                    if let Some(h) = self.ctrl.pop_front() {
                        return RxNext::Packet(h, 0);
                    }
                }
            }
        }
        RxNext::Nothing
    }

    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op != OP_RST {
            self.ctrl.push_back(hdr.rst_reply());
        }
    }

    fn guest_connect(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) {
            // A second REQUEST on a live connection: the guest lost track.
            self.remove(key);
            self.reply_rst(hdr);
            return;
        }
        if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
            self.warn.warn(format_args!("vsock: refused a guest connection: too many connections"));
            self.reply_rst(hdr);
            return;
        }
        let stream = match self.connect_host_side(hdr.dst_port) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("vsock: guest connection to host port {}: {e}", hdr.dst_port);
                self.reply_rst(hdr);
                return;
            }
        };
        let mut conn = Connection::new(stream, hdr.dst_port, hdr.src_port, State::Established);
        conn.update_peer_credit(hdr);
        let response = conn.header(self.guest_cid, OP_RESPONSE);
        if self.insert(key, conn) {
            self.ctrl.push_back(response);
        } else {
            self.reply_rst(hdr);
        }
    }

    /// The host end of a guest connection to host port `port`: the
    /// VMM's own service on that port, else the Unix socket
    /// `<uds_path>_<port>`.
    fn connect_host_side(&self, port: u32) -> io::Result<UnixStream> {
        let stream = if let Some(service) = self.services.get(&port) {
            service.connect()?
        } else if let Some(host) = &self.host {
            let mut path = OsString::from(host.uds_path.as_os_str());
            path.push(format!("_{port}"));
            UnixStream::connect(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", Path::new(&path).display())))?
        } else {
            return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "nothing serves this port"));
        };
        stream.set_nonblocking(true)?;
        Ok(stream)
    }

    fn insert(&mut self, key: ConnKey, conn: Connection) -> bool {
        let fd = conn.stream.as_raw_fd();
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::empty(), fd as u64)) {
            self.warn.warn(format_args!("vsock: cannot watch a stream: {e}"));
            return false;
        }
        self.fd_keys.insert(fd, key);
        self.conns.insert(key, conn);
        self.update_interest(key);
        true
    }

    fn remove(&mut self, key: ConnKey) -> Option<Connection> {
        let conn = self.conns.remove(&key)?;
        let fd = conn.stream.as_raw_fd();
        self.fd_keys.remove(&fd);
        if !conn.hup {
            // Closing the stream removes it from the epoll anyway.
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        Some(conn)
    }

    /// Closes the host stream, then tells the guest.
    fn reset_conn(&mut self, key: ConnKey) {
        if let Some(mut conn) = self.remove(key) {
            let h = conn.header(self.guest_cid, OP_RST);
            drop(conn);
            self.ctrl.push_back(h);
        }
    }

    /// After anything changed on a connection: finish a close, half-close
    /// the host stream, owe a credit update, fix what the epoll watches.
    fn after_change(&mut self, key: ConnKey) {
        let guest_cid = self.guest_cid;
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if conn.state == State::Closing && conn.pending_len() == 0 {
            self.reset_conn(key);
            return;
        }
        conn.shutdown_host_write_if_done();
        if conn.needs_credit_update() && !conn.peer_shut_send {
            let h = conn.credit_update(guest_cid);
            self.ctrl.push_back(h);
        }
        if conn.hup && conn.wants_host_data() && !conn.queued_readable {
            conn.queued_readable = true;
            self.readable.push_back(key);
        }
        self.update_interest(key);
    }

    fn update_interest(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if conn.hup {
            return;
        }
        let mut want = EventSet::empty();
        if !self.rx_starved && conn.wants_host_data() {
            want |= EventSet::IN;
        }
        if conn.pending_len() > 0 {
            want |= EventSet::OUT;
        }
        if want.bits() == conn.registered {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        match self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(want, fd as u64)) {
            Ok(()) => conn.registered = want.bits(),
            Err(e) => self.warn.warn(format_args!("vsock: cannot watch a stream: {e}")),
        }
    }

    fn stream_event(&mut self, key: ConnKey, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) && !conn.hup {
            conn.hup = true;
            let fd = conn.stream.as_raw_fd();
            // Nothing more will happen on it; stop hearing that it hung up.
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            if conn.state != State::Established || conn.pending_len() > 0 || conn.peer_shut_rcv {
                self.reset_conn(key);
                return;
            }
            // What the host wrote before closing still goes to the guest,
            // then a SHUTDOWN.
            self.after_change(key);
            return;
        }
        if events.contains(EventSet::OUT) {
            if let Err(e) = conn.flush() {
                log::debug!("vsock: connection {key:?}: {e}");
                self.reset_conn(key);
                return;
            }
            self.after_change(key);
        }
        if events.contains(EventSet::IN) {
            if let Some(conn) = self.conns.get_mut(&key) {
                if !conn.queued_readable {
                    conn.queued_readable = true;
                    self.readable.push_back(key);
                }
            }
        }
    }

    fn accept_all(&mut self) {
        let Some(host) = &self.host else { return };
        loop {
            match host.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
                        self.warn.warn(format_args!("vsock: refused a host connection: too many connections"));
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd as u64)).is_err() {
                        continue;
                    }
                    let deadline = Instant::now() + CONNECT_TIMEOUT;
                    self.pending.insert(fd, PendingConnect { stream, line: Vec::new(), deadline });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.warn.warn(format_args!("vsock: accept on {} failed: {e}", host.uds_path.display()));
                    break;
                }
            }
        }
        self.rearm_timer();
    }

    fn drop_pending(&mut self, fd: RawFd) {
        if let Some(p) = self.pending.remove(&fd) {
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            drop(p);
        }
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else { return };
        // One byte at a time: what follows the newline is data for the
        // guest and stays in the socket.
        let mut byte = [0u8; 1];
        loop {
            match p.stream.read(&mut byte) {
                Ok(0) => return self.drop_pending(fd),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => {
                    p.line.push(byte[0]);
                    if p.line.len() >= MAX_CONNECT_LINE {
                        log::debug!("vsock: host connection sent an overlong CONNECT line");
                        return self.drop_pending(fd);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.drop_pending(fd),
            }
        }
        let port = parse_connect_line(&p.line);
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some(p) = self.pending.remove(&fd) else { return };
        self.rearm_timer();
        let Some(port) = port else {
            log::debug!("vsock: host connection sent a malformed CONNECT line");
            return;
        };
        let local = self.allocate_port(port);
        let mut conn = Connection::new(p.stream, local, port, State::AwaitingResponse);
        let request = conn.header(self.guest_cid, OP_REQUEST);
        if self.insert((local, port), conn) {
            self.ctrl.push_back(request);
        }
    }

    fn allocate_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_EPHEMERAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    fn expire_pending(&mut self) {
        // The timer's count is of no interest; reading it clears readiness.
        let _ = self.timer.wait();
        let now = Instant::now();
        let expired: Vec<RawFd> =
            self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(&fd, _)| fd).collect();
        for fd in expired {
            log::debug!("vsock: host connection sent no CONNECT line in time");
            self.drop_pending(fd);
        }
        self.rearm_timer();
    }

    fn rearm_timer(&mut self) {
        let result = match self.pending.values().map(|p| p.deadline).min() {
            Some(deadline) => {
                let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            self.warn.warn(format_args!("vsock: cannot arm the CONNECT timer: {e}"));
        }
    }
}

impl Drop for HostSocket {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.uds_path) {
            log::debug!("cannot remove {}: {e}", self.uds_path.display());
        }
    }
}

/// `CONNECT <port>` (the newline already stripped) → the port.
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Binds the listener at `path`, replacing a stale socket file nobody
/// listens on, and refusing anything else that is there.
fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(VsockError::MissingDirectory(path.to_path_buf()));
    }
    match fs::symlink_metadata(path) {
        Ok(md) if !md.file_type().is_socket() => return Err(VsockError::NotASocket(path.to_path_buf())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(VsockError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                fs::remove_file(path)
                    .map_err(|source| VsockError::RemoveStale { path: path.to_path_buf(), source })?;
            }
            Err(source) => return Err(VsockError::Probe { path: path.to_path_buf(), source }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(VsockError::Probe { path: path.to_path_buf(), source }),
    }
    let listener =
        UnixListener::bind(path).map_err(|source| VsockError::Bind { path: path.to_path_buf(), source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| VsockError::Bind { path: path.to_path_buf(), source })?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parses_port() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
    }

    #[test]
    fn connect_line_rejects_garbage() {
        for bad in [&b"CONNECT"[..], b"CONNECT ", b"CONNECT -1", b"CONNECT 4294967296", b"connect 5", b"CONNECT 5 6", b"\xff"] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }
}
