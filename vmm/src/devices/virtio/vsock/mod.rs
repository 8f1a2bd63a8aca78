//! virtio-vsock (virtio 1.2, section 5.10) with a Unix-socket host side,
//! the convention Firecracker and Cloud Hypervisor users know: host
//! programs connect to one Unix socket and say `CONNECT <port>\n`; guest
//! connections to host port P go to the Unix socket `<path>_P`, or to a
//! [`HostService`] the VMM runs itself on that port.
//!
//! Queues: rx 0 (device to guest), tx 1 (guest to device), event 2.
//! Only stream sockets are served. [`connection`] holds one connection's
//! state and credit, [`muxer`] the sockets and what the guest is owed;
//! this file moves packets between them and the queues.
//!
//! Snapshots: connections do not survive a restore; the restored device
//! posts `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` so the guest drops them.
//! Taking a snapshot leaves the running VM's connections up.

pub mod connection;
pub mod muxer;
pub mod packet;

use std::io;
use std::os::unix::io::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::Bytes;

use self::muxer::{Muxer, RxNext};
use self::packet::{Header, EVENT_TRANSPORT_RESET, MAX_PKT_DATA, OP_RW};
use super::{device_type, features, ActivateError, DeviceState, QueueContext, VirtioDevice, WarnLimiter};

/// Queue indices.
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
/// Each queue's largest size.
const QUEUE_SIZES: [u16; 3] = [256; 3];
/// The largest guest CID: `u32::MAX` is `VMADDR_CID_ANY`.
const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Why the vsock device cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0–2 are reserved; CIDs are 32 bits in practice.
    #[error("guest CID {0} is invalid: guest CID must be at least 3 and at most {MAX_GUEST_CID}")]
    BadCid(u64),
    /// The socket's directory is missing.
    #[error("cannot create vsock socket {0}: its directory does not exist")]
    MissingDirectory(PathBuf),
    /// Another process listens on the socket.
    #[error("vsock socket {0} is already in use")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
    /// The socket file could not be examined.
    #[error("cannot check whether vsock socket {path} is in use")]
    Probe {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A stale socket file could not be removed.
    #[error("cannot remove stale vsock socket {path}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Listening failed.
    #[error("cannot listen on vsock socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The epoll or timer could not be created.
    #[error("cannot set up the vsock event loop")]
    EventLoop(#[source] io::Error),
}

/// A host port the VMM serves itself.
pub trait HostService: Send + Sync {
    /// A guest connected to the port: the VMM's end of a new stream to the
    /// service (the device sets it non-blocking). An error resets the
    /// guest's connection.
    fn connect(&self) -> io::Result<UnixStream>;
}

/// Host ports and the services on them.
pub type HostServices = Vec<(u32, Arc<dyn HostService>)>;

/// virtio-vsock state saved in a snapshot. Connections are not saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub guest_cid: u64,
}

/// The virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    /// Tx chains wait because too many control packets wait for rx buffers.
    tx_stalled: bool,
    /// A TRANSPORT_RESET event waits for an event buffer.
    event_pending: bool,
    /// Host data on its way to an rx buffer.
    rx_buf: Vec<u8>,
    warn: WarnLimiter,
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`, listening for host
    /// connections on the Unix socket `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        Vsock::with_host(guest_cid, Some(uds_path), Vec::new())
    }

    /// A device for a guest with CID `guest_cid`: host programs connect
    /// through `uds_path` when given, and guest connections to the ports
    /// of `services` reach those services.
    pub fn with_host(guest_cid: u64, uds_path: Option<&Path>, services: HostServices) -> Result<Self, VsockError> {
        if !(3..=MAX_GUEST_CID).contains(&guest_cid) {
            return Err(VsockError::BadCid(guest_cid));
        }
        Ok(Vsock {
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path, services)?,
            tx_stalled: false,
            event_pending: false,
            rx_buf: vec![0; MAX_PKT_DATA as usize],
            warn: WarnLimiter::new(),
        })
    }

    /// The device rebuilt from a snapshot, with no connections; call
    /// [`VirtioDevice::restored`] when it runs again.
    pub fn from_state(state: &VsockState, uds_path: &Path) -> Result<Self, VsockError> {
        Vsock::new(state.guest_cid, uds_path)
    }

    /// [`Vsock::from_state`] with the host side of [`Vsock::with_host`].
    pub fn from_state_with_host(
        state: &VsockState,
        uds_path: Option<&Path>,
        services: HostServices,
    ) -> Result<Self, VsockError> {
        Vsock::with_host(state.guest_cid, uds_path, services)
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Live connections (tests, diagnostics).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Moves packets both ways until neither side can make progress.
    fn run(&mut self, ctx: &mut QueueContext<'_>, read_tx: bool) {
        if read_tx {
            self.process_tx(ctx);
        }
        loop {
            self.fill_rx(ctx);
            if !self.tx_stalled || self.muxer.control_full() {
                break;
            }
            self.process_tx(ctx);
        }
    }

    /// Reads every packet the guest sent.
    fn process_tx(&mut self, ctx: &mut QueueContext<'_>) {
        let Some(queue) = ctx.queues.get_mut(TX_QUEUE) else { return };
        let mut used = false;
        self.tx_stalled = false;
        'drain: loop {
            // Errors here only mean a broken ring; the pops below fail too.
            let _ = queue.disable_notification(ctx.mem);
            while let Some(mut chain) = queue.pop_descriptor_chain(ctx.mem) {
                if self.muxer.control_full() {
                    queue.go_to_previous_position();
                    self.tx_stalled = true;
                    break 'drain;
                }
                let head = chain.head_index();
                match VsockPacket::from_tx_virtq_chain(ctx.mem, &mut chain, MAX_PKT_DATA) {
                    Ok(pkt) => {
                        let hdr = header_of(&pkt);
                        let mut data = Vec::new();
                        if hdr.op == OP_RW {
                            if let Some(slice) = pkt.data_slice() {
                                data.resize(slice.len(), 0);
                                slice.copy_to(&mut data[..]);
                            }
                        }
                        self.muxer.handle_guest_packet(&hdr, &data);
                    }
                    Err(e) => self.warn.warn(format_args!("vsock: dropped a bad tx chain: {e}")),
                }
                if let Err(e) = queue.add_used(ctx.mem, head, 0) {
                    self.warn.warn(format_args!("vsock: cannot return a tx chain: {e}"));
                }
                used = true;
            }
            match queue.enable_notification(ctx.mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if used {
            ctx.notify_used(TX_QUEUE);
        }
    }

    /// Puts what the guest is owed into its rx buffers.
    fn fill_rx(&mut self, ctx: &mut QueueContext<'_>) {
        let Some(queue) = ctx.queues.get_mut(RX_QUEUE) else { return };
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(mut chain) = queue.pop_descriptor_chain(ctx.mem) else {
                if let Ok(true) = queue.enable_notification(ctx.mem) {
                    continue;
                }
                // Wait for the guest to add buffers (process_queue(0)).
                self.muxer.set_rx_starved(true);
                break;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(ctx.mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => pkt,
                Err(e) => {
                    self.warn.warn(format_args!("vsock: dropped a bad rx chain: {e}"));
                    if let Err(e) = queue.add_used(ctx.mem, head, 0) {
                        self.warn.warn(format_args!("vsock: cannot return an rx chain: {e}"));
                    }
                    used = true;
                    continue;
                }
            };
            let room = pkt.data_slice().map_or(0, |s| s.len());
            let used_len = match self.muxer.next_rx(room, &mut self.rx_buf) {
                RxNext::Packet(hdr, n) => {
                    let written = pkt.set_header_from_raw(&hdr.to_bytes()).is_ok()
                        && (n == 0
                            || pkt
                                .data_slice()
                                .is_some_and(|s| s.write_slice(&self.rx_buf[..n], 0).is_ok()));
                    if !written {
                        self.warn.warn(format_args!("vsock: cannot write an rx packet"));
                    }
                    (PKT_HEADER_SIZE + n) as u32
                }
                RxNext::NoRoom => {
                    self.warn.warn(format_args!("vsock: dropped an rx buffer with no room for data"));
                    0
                }
                RxNext::Nothing => {
                    queue.go_to_previous_position();
                    break;
                }
            };
            if let Err(e) = queue.add_used(ctx.mem, head, used_len) {
                self.warn.warn(format_args!("vsock: cannot return an rx chain: {e}"));
            }
            used = true;
        }
        if used {
            ctx.notify_used(RX_QUEUE);
        }
    }

    /// Posts the pending TRANSPORT_RESET if the guest gave an event buffer.
    fn post_event(&mut self, ctx: &mut QueueContext<'_>) {
        if !self.event_pending {
            return;
        }
        let Some(queue) = ctx.queues.get_mut(EVENT_QUEUE) else { return };
        let Some(mut chain) = queue.pop_descriptor_chain(ctx.mem) else {
            // Have the guest tell us when it adds one.
            let _ = queue.enable_notification(ctx.mem);
            return;
        };
        let head = chain.head_index();
        let slot = chain.by_ref().find(|d| d.is_write_only() && d.len() >= 4).map(|d| d.addr());
        let len = match slot.map(|addr| ctx.mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), addr)) {
            Some(Ok(())) => {
                self.event_pending = false;
                4
            }
            _ => {
                self.warn.warn(format_args!("vsock: dropped a bad event buffer"));
                0
            }
        };
        if let Err(e) = queue.add_used(ctx.mem, head, len) {
            self.warn.warn(format_args!("vsock: cannot return an event buffer: {e}"));
        }
        ctx.notify_used(EVENT_QUEUE);
    }
}

/// The header of a parsed guest packet.
fn header_of<B: vm_memory::bitmap::BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Header {
    Header {
        src_cid: pkt.src_cid(),
        dst_cid: pkt.dst_cid(),
        src_port: pkt.src_port(),
        dst_port: pkt.dst_port(),
        len: pkt.len(),
        type_: pkt.type_(),
        op: pkt.op(),
        flags: pkt.flags(),
        buf_alloc: pkt.buf_alloc(),
        fwd_cnt: pkt.fwd_cnt(),
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| config.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), ActivateError> {
        if ctx.queues.len() < QUEUE_SIZES.len() {
            return Err(ActivateError::BadQueue(ctx.queues.len()));
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.muxer.reset();
        self.tx_stalled = false;
        self.event_pending = false;
    }

    fn process_queue(&mut self, index: usize, ctx: &mut QueueContext<'_>) {
        match index {
            RX_QUEUE => {
                self.muxer.set_rx_starved(false);
                self.run(ctx, self.tx_stalled);
            }
            TX_QUEUE => self.run(ctx, true),
            EVENT_QUEUE => self.post_event(ctx),
            _ => self.warn.warn(format_args!("vsock: notification for unknown queue {index}")),
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_backend(&mut self, ctx: &mut QueueContext<'_>) {
        self.muxer.process_events();
        self.run(ctx, false);
    }

    /// Connections stay up: the VM may go on running after the snapshot,
    /// and a restored one learns they are gone from TRANSPORT_RESET.
    fn prepare_snapshot(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn restored(&mut self, ctx: &mut QueueContext<'_>) {
        self.event_pending = true;
        self.post_event(ctx);
    }

    fn state(&self) -> DeviceState {
        DeviceState::Vsock(VsockState { guest_cid: self.guest_cid })
    }
}


#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Address, GuestAddress};
    use crate::vstate::memory::GuestMemoryMmap;

    use super::packet::*;
    use super::*;
    use crate::devices::virtio::test_utils::counting_interrupt;
    use crate::devices::virtio::Interrupt;

    const GUEST_CID: u64 = 3;
    const QUEUE_BASES: [u64; 3] = [0x0, 0x1_0000, 0x2_0000];
    const BUF_BASE: u64 = 0x10_0000;
    const MEM_SIZE: usize = 0x200_0000;
    const DESC_NEXT: u16 = 1;
    const DESC_WRITE: u16 = 2;

    /// A guest driver over mock queues: puts chains in, reads used ones.
    struct Guest {
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Interrupt,
        irq_count: std::sync::Arc<std::sync::atomic::AtomicU64>,
        rings: [(u64, u64, u64); 3],
        next_desc: [u16; 3],
        used_seen: [u16; 3],
        next_buf: u64,
        chains: HashMap<(usize, u16), Vec<(u64, u32)>>,
    }

    impl Guest {
        fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
            let mut queues = Vec::new();
            let mut rings = [(0, 0, 0); 3];
            for (i, base) in QUEUE_BASES.iter().enumerate() {
                let mock = MockSplitQueue::create(&mem, GuestAddress(*base), 256);
                queues.push(mock.create_queue::<Queue>().expect("queue"));
                rings[i] = (mock.desc_table_addr().0, mock.avail_addr().0, mock.used_addr().0);
            }
            let (irq, irq_count) = counting_interrupt();
            Guest {
                mem,
                queues,
                irq,
                irq_count,
                rings,
                next_desc: [0; 3],
                used_seen: [0; 3],
                next_buf: BUF_BASE,
                chains: HashMap::new(),
            }
        }

        fn ctx(&mut self) -> QueueContext<'_> {
            QueueContext {
                mem: &self.mem,
                queues: &mut self.queues,
                acked_features: features::VERSION_1,
                interrupt: &self.irq,
            }
        }

        fn alloc(&mut self, len: u32) -> u64 {
            let at = self.next_buf;
            self.next_buf += u64::from(len).max(1).next_multiple_of(16);
            at
        }

        /// Adds a chain of (address, length, flags) descriptors to queue `q`.
        fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) {
            let (desc_table, avail, _) = self.rings[q];
            let head = self.next_desc[q];
            for (i, (addr, len, flags)) in descs.iter().enumerate() {
                let index = self.next_desc[q];
                let next = index.wrapping_add(1) % 256;
                let last = i + 1 == descs.len();
                let flags = if last { *flags } else { *flags | DESC_NEXT };
                let at = GuestAddress(desc_table + 16 * u64::from(index));
                self.mem.write_obj(*addr, at).expect("desc");
                self.mem.write_obj(*len, at.unchecked_add(8)).expect("desc");
                self.mem.write_obj(flags, at.unchecked_add(12)).expect("desc");
                self.mem.write_obj(if last { 0 } else { next }, at.unchecked_add(14)).expect("desc");
                self.next_desc[q] = next;
            }
            let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).expect("avail idx");
            self.mem.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(idx % 256))).expect("avail ring");
            self.mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2)).expect("avail idx");
            self.chains.insert((q, head), descs.iter().map(|d| (d.0, d.1)).collect());
        }

        /// A packet on the tx queue.
        fn send(&mut self, hdr: Header, data: &[u8]) {
            let h = self.alloc(PKT_HEADER_SIZE as u32);
            self.mem.write_slice(&hdr.to_bytes(), GuestAddress(h)).expect("header");
            if data.is_empty() {
                self.add_chain(TX_QUEUE, &[(h, PKT_HEADER_SIZE as u32, 0)]);
            } else {
                let d = self.alloc(data.len() as u32);
                self.mem.write_slice(data, GuestAddress(d)).expect("data");
                self.add_chain(TX_QUEUE, &[(h, PKT_HEADER_SIZE as u32, 0), (d, data.len() as u32, 0)]);
            }
        }

        fn give_rx(&mut self, count: usize, size: u32) {
            for _ in 0..count {
                let h = self.alloc(PKT_HEADER_SIZE as u32);
                let d = self.alloc(size);
                self.add_chain(RX_QUEUE, &[(h, PKT_HEADER_SIZE as u32, DESC_WRITE), (d, size, DESC_WRITE)]);
            }
        }

        /// New used entries of queue `q`: (head, length).
        fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
            let (_, _, used) = self.rings[q];
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).expect("used idx");
            let mut out = Vec::new();
            while self.used_seen[q] != idx {
                let at = used + 4 + 8 * u64::from(self.used_seen[q] % 256);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used id");
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
                out.push((id as u16, len));
                self.used_seen[q] = self.used_seen[q].wrapping_add(1);
            }
            out
        }

        /// Packets the device put in rx buffers since the last look.
        fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
            let mut out = Vec::new();
            for (head, len) in self.used(RX_QUEUE) {
                let descs = self.chains[&(RX_QUEUE, head)].clone();
                let mut raw = [0u8; PKT_HEADER_SIZE];
                self.mem.read_slice(&mut raw, GuestAddress(descs[0].0)).expect("header");
                let hdr = parse_header(&raw);
                let mut data = vec![0u8; len as usize - PKT_HEADER_SIZE];
                self.mem.read_slice(&mut data, GuestAddress(descs[1].0)).expect("data");
                assert_eq!(hdr.len as usize, data.len());
                out.push((hdr, data));
            }
            out
        }
    }

    fn parse_header(b: &[u8; PKT_HEADER_SIZE]) -> Header {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().expect("2 bytes"));
        Header {
            src_cid: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            dst_cid: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// A header from the guest's `src_port` to host port `dst_port`.
    fn from_guest(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Header::default()
        }
    }

    fn rw(src_port: u32, dst_port: u32, data: &[u8]) -> Header {
        Header { len: data.len() as u32, ..from_guest(OP_RW, src_port, dst_port) }
    }

    fn pump(dev: &mut Vsock, g: &mut Guest) {
        for _ in 0..4 {
            dev.process_backend(&mut g.ctx());
        }
    }

    fn setup() -> (tempfile::TempDir, PathBuf, Vsock, Guest) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let dev = Vsock::new(GUEST_CID, &path).expect("vsock");
        (dir, path, dev, Guest::new())
    }

    fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).expect("read");
        buf
    }

    fn is_closed(s: &mut UnixStream) -> bool {
        s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    /// A guest connection to host port `port`, established; returns the
    /// host end.
    fn guest_connect(dev: &mut Vsock, g: &mut Guest, path: &Path, port: u32, guest_port: u32, buf_alloc: u32) -> UnixStream {
        let listener = UnixListener::bind(format!("{}_{port}", path.display())).expect("bind");
        g.send(Header { buf_alloc, ..from_guest(OP_REQUEST, guest_port, port) }, &[]);
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, OP_RESPONSE);
        listener.accept().expect("accept").0
    }

    #[test]
    fn host_connect_reaches_guest_and_data_flows_both_ways() {
        let (_dir, path, mut dev, mut g) = setup();
        g.give_rx(8, 4096);
        dev.process_queue(RX_QUEUE, &mut g.ctx());
        let mut host = UnixStream::connect(&path).expect("connect");
        host.write_all(b"CONNECT 52\n").expect("write");
        pump(&mut dev, &mut g);

        let got = g.received();
        assert_eq!(got.len(), 1);
        let req = got[0].0;
        assert_eq!((req.op, req.src_cid, req.dst_cid, req.dst_port, req.type_), (OP_REQUEST, 2, GUEST_CID, 52, TYPE_STREAM));
        assert_eq!(req.buf_alloc, connection::BUF_ALLOC);
        let host_port = req.src_port;

        g.send(from_guest(OP_RESPONSE, 52, host_port), &[]);
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        let ok = format!("OK {host_port}\n");
        assert_eq!(read_exact_timeout(&mut host, ok.len()), ok.as_bytes());

        host.write_all(b"hello").expect("write");
        pump(&mut dev, &mut g);
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.op, got[0].0.src_port, got[0].0.dst_port), (OP_RW, host_port, 52));
        assert_eq!(got[0].1, b"hello");

        g.send(rw(52, host_port, b"world"), b"world");
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        assert_eq!(read_exact_timeout(&mut host, 5), b"world");

        g.send(from_guest(OP_RST, 52, host_port), &[]);
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        assert!(is_closed(&mut host));
        assert_eq!(dev.connection_count(), 0);
        assert!(g.irq_count.load(Ordering::SeqCst) > 0);
    }

    /// A service that echoes what it reads, one thread per connection.
    struct Echo;

    impl HostService for Echo {
        fn connect(&self) -> io::Result<UnixStream> {
            let (ours, mut theirs) = UnixStream::pair()?;
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = theirs.read(&mut buf) {
                    if n == 0 || theirs.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
            Ok(ours)
        }
    }

    #[test]
    fn a_host_service_answers_its_port_on_a_device_without_a_socket() {
        let services: HostServices = vec![(5050, Arc::new(Echo))];
        let mut dev = Vsock::with_host(GUEST_CID, None, services).expect("vsock");
        let mut g = Guest::new();
        g.give_rx(8, 4096);
        g.send(Header { buf_alloc: 65536, ..from_guest(OP_REQUEST, 7000, 5050) }, &[]);
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, OP_RESPONSE, "the service took the connection");
        g.send(rw(7000, 5050, b"ping"), b"ping");
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut echoed = Vec::new();
        while echoed.len() < 4 && std::time::Instant::now() < deadline {
            pump(&mut dev, &mut g);
            for (hdr, data) in g.received() {
                assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (OP_RW, 5050, 7000));
                echoed.extend_from_slice(&data);
            }
        }
        assert_eq!(echoed, b"ping");
        // Any other port: nothing serves it, the guest gets a reset.
        g.send(Header { buf_alloc: 65536, ..from_guest(OP_REQUEST, 7001, 5051) }, &[]);
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, OP_RST);
    }

    #[test]
    fn guest_connect_to_listening_port_gets_response_and_data() {
        let (_dir, path, mut dev, mut g) = setup();
        g.give_rx(8, 4096);
        let mut host = guest_connect(&mut dev, &mut g, &path, 1234, 5000, 65536);
        g.send(rw(5000, 1234, b"ping"), b"ping");
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        assert_eq!(read_exact_timeout(&mut host, 4), b"ping");
        host.write_all(b"pong").expect("write");
        pump(&mut dev, &mut g);
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.op, got[0].0.src_port, got[0].0.dst_port), (OP_RW, 1234, 5000));
        assert_eq!(got[0].1, b"pong");
    }

    #[test]
    fn guest_connect_to_port_nobody_listens_on_gets_rst() {
        let (_dir, _path, mut dev, mut g) = setup();
        g.give_rx(2, 4096);
        g.send(from_guest(OP_REQUEST, 5000, 4321), &[]);
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.op, got[0].0.src_port, got[0].0.dst_port, got[0].0.dst_cid), (OP_RST, 4321, 5000, GUEST_CID));
        assert_eq!(dev.connection_count(), 0);
    }

    #[test]
    fn device_never_sends_beyond_guest_credit_and_resumes_after_credit_update() {
        let (_dir, path, mut dev, mut g) = setup();
        g.give_rx(16, 4096);
        let mut host = guest_connect(&mut dev, &mut g, &path, 7, 6000, 1000);
        host.write_all(&[9u8; 3000]).expect("write");
        pump(&mut dev, &mut g);
        pump(&mut dev, &mut g);
        let sent: usize = g.received().iter().map(|(_, d)| d.len()).sum();
        assert_eq!(sent, 1000);

        g.send(Header { buf_alloc: 1000, fwd_cnt: 1000, ..from_guest(OP_CREDIT_UPDATE, 6000, 7) }, &[]);
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        pump(&mut dev, &mut g);
        let sent: usize = g.received().iter().map(|(_, d)| d.len()).sum();
        assert_eq!(sent, 1000);
    }

    #[test]
    fn host_data_waits_for_rx_buffers_then_flows() {
        let (_dir, path, mut dev, mut g) = setup();
        g.give_rx(1, 4096);
        let mut host = guest_connect(&mut dev, &mut g, &path, 8, 6001, 65536);
        host.write_all(b"later").expect("write");
        pump(&mut dev, &mut g);
        assert!(g.received().is_empty());
        g.give_rx(1, 4096);
        dev.process_queue(RX_QUEUE, &mut g.ctx());
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, b"later");
    }

    #[test]
    fn credit_request_is_answered_with_credit_update() {
        let (_dir, path, mut dev, mut g) = setup();
        g.give_rx(4, 4096);
        let _host = guest_connect(&mut dev, &mut g, &path, 9, 6002, 65536);
        g.send(from_guest(OP_CREDIT_REQUEST, 6002, 9), &[]);
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.op, got[0].0.buf_alloc), (OP_CREDIT_UPDATE, connection::BUF_ALLOC));
    }

    #[test]
    fn guest_exceeding_credit_is_reset() {
        let (_dir, path, mut dev, mut g) = setup();
        g.give_rx(64, 4096);
        let _host = guest_connect(&mut dev, &mut g, &path, 10, 6003, 65536);
        // The host never reads: once its socket is full, guest data is
        // held, and the guest ignores that it has no credit left.
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..120 {
            g.send(rw(6003, 10, &chunk), &chunk);
        }
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        let got = g.received();
        assert!(got.iter().any(|(h, _)| h.op == OP_RST && h.dst_port == 6003), "{got:?}");
        assert_eq!(dev.connection_count(), 0);
    }

    #[test]
    fn guest_full_shutdown_closes_host_stream_then_resets() {
        let (_dir, path, mut dev, mut g) = setup();
        g.give_rx(4, 4096);
        let mut host = guest_connect(&mut dev, &mut g, &path, 11, 6004, 65536);
        g.send(Header { flags: SHUTDOWN_RCV | SHUTDOWN_SEND, ..from_guest(OP_SHUTDOWN, 6004, 11) }, &[]);
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        assert!(is_closed(&mut host));
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, OP_RST);
    }

    #[test]
    fn host_eof_sends_shutdown_to_guest() {
        let (_dir, path, mut dev, mut g) = setup();
        g.give_rx(4, 4096);
        let host = guest_connect(&mut dev, &mut g, &path, 12, 6005, 65536);
        host.shutdown(std::net::Shutdown::Write).expect("shutdown");
        pump(&mut dev, &mut g);
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.op, got[0].0.flags & SHUTDOWN_SEND), (OP_SHUTDOWN, SHUTDOWN_SEND));
    }

    #[test]
    fn host_closing_after_the_guest_shut_down_sending_ends_the_guest_side() {
        let (_dir, path, mut dev, mut g) = setup();
        g.give_rx(8, 4096);
        let mut host = guest_connect(&mut dev, &mut g, &path, 12, 6006, 65536);
        // The guest sends, then shuts down sending (stdin ended).
        g.send(rw(6006, 12, b"hello"), b"hello");
        g.send(Header { flags: SHUTDOWN_SEND, ..from_guest(OP_SHUTDOWN, 6006, 12) }, &[]);
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        pump(&mut dev, &mut g);
        host.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let mut got = Vec::new();
        host.read_to_end(&mut got).expect("host reads to the end");
        assert_eq!(got, b"hello");
        // The host closes its stream entirely: the guest must hear of it.
        drop(host);
        pump(&mut dev, &mut g);
        let got = g.received();
        assert!(
            got.iter().any(|(h, _)| h.op == OP_SHUTDOWN && h.flags & SHUTDOWN_SEND != 0 || h.op == OP_RST),
            "guest never told the host closed: {:?}",
            got.iter().map(|(h, _)| (h.op, h.flags)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn malformed_or_overlong_connect_line_closes_stream_without_touching_guest() {
        let (_dir, path, mut dev, mut g) = setup();
        g.give_rx(4, 4096);
        let mut bad = UnixStream::connect(&path).expect("connect");
        bad.write_all(b"HELLO 52\n").expect("write");
        let mut long = UnixStream::connect(&path).expect("connect");
        long.write_all(&[b'C'; 40]).expect("write");
        pump(&mut dev, &mut g);
        assert!(is_closed(&mut bad));
        assert!(is_closed(&mut long));
        assert!(g.received().is_empty());
        assert_eq!(dev.connection_count(), 0);
    }

    #[test]
    fn bad_tx_chains_are_dropped_and_returned() {
        let (_dir, _path, mut dev, mut g) = setup();
        g.give_rx(4, 4096);
        let h = g.alloc(64);
        g.mem.write_slice(&from_guest(OP_REQUEST, 1, 2).to_bytes(), GuestAddress(h)).expect("header");
        // Device-writable header.
        g.add_chain(TX_QUEUE, &[(h, 44, DESC_WRITE)]);
        // Header too short.
        g.add_chain(TX_QUEUE, &[(h, 10, 0)]);
        // Header outside guest memory.
        g.add_chain(TX_QUEUE, &[(MEM_SIZE as u64 + 0x1000, 44, 0)]);
        // `len` beyond the data buffer.
        let h2 = g.alloc(64);
        g.mem.write_slice(&Header { len: 100, ..from_guest(OP_RW, 1, 2) }.to_bytes(), GuestAddress(h2)).expect("header");
        let d = g.alloc(10);
        g.add_chain(TX_QUEUE, &[(h2, 44, 0), (d, 10, 0)]);
        // `len` beyond 64 KiB.
        let h3 = g.alloc(64);
        g.mem.write_slice(&Header { len: 65 * 1024, ..from_guest(OP_RW, 1, 2) }.to_bytes(), GuestAddress(h3)).expect("header");
        let d3 = g.alloc(65 * 1024);
        g.add_chain(TX_QUEUE, &[(h3, 44, 0), (d3, 65 * 1024, 0)]);
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        assert_eq!(g.used(TX_QUEUE).len(), 5);
        assert!(g.received().is_empty());
        assert_eq!(dev.connection_count(), 0);
    }

    #[test]
    fn packets_for_unknown_connections_or_cids_or_types_are_reset_or_dropped() {
        let (_dir, _path, mut dev, mut g) = setup();
        g.give_rx(8, 4096);
        g.send(rw(1, 2, b"x"), b"x");
        g.send(Header { dst_cid: 7, ..from_guest(OP_REQUEST, 3, 4) }, &[]);
        g.send(Header { type_: 2, ..from_guest(OP_REQUEST, 5, 6) }, &[]);
        g.send(Header { src_cid: 9, ..from_guest(OP_REQUEST, 7, 8) }, &[]);
        g.send(from_guest(OP_RST, 9, 10), &[]);
        dev.process_queue(TX_QUEUE, &mut g.ctx());
        let got: Vec<(u16, u32)> = g.received().iter().map(|(h, _)| (h.op, h.dst_port)).collect();
        assert_eq!(got, vec![(OP_RST, 1), (OP_RST, 3), (OP_RST, 5)]);
        assert_eq!(g.used(TX_QUEUE).len(), 5);
    }

    #[test]
    fn config_reads_cid_at_offset_zero_and_zero_elsewhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cid: u64 = 0x0102_0304_0506_0708;
        let dev = Vsock::new(0x1234_5678, &dir.path().join("v.sock")).expect("vsock");
        let expected = 0x1234_5678u64.to_le_bytes();
        assert!(cid > MAX_GUEST_CID);
        for offset in [0u64, 1, 4, 7, 8, 100, 0x1000, u64::MAX - 2, u64::MAX] {
            for len in [1usize, 2, 4, 8, 16] {
                let mut data = vec![0xffu8; len];
                dev.read_config(offset, &mut data);
                for (i, b) in data.iter().enumerate() {
                    let want = offset.checked_add(i as u64).and_then(|o| expected.get(o as usize).copied()).unwrap_or(0);
                    assert_eq!(*b, want, "offset {offset} byte {i}");
                }
            }
        }
    }

    #[test]
    fn restored_posts_transport_reset_when_an_event_buffer_is_there() {
        let (_dir, _path, mut dev, mut g) = setup();
        let e = g.alloc(8);
        g.mem.write_obj(0xffff_ffffu32, GuestAddress(e)).expect("poison");
        g.add_chain(EVENT_QUEUE, &[(e, 8, DESC_WRITE)]);
        let before = g.irq_count.load(Ordering::SeqCst);
        dev.restored(&mut g.ctx());
        assert_eq!(g.used(EVENT_QUEUE), vec![(0, 4)]);
        assert_eq!(g.mem.read_obj::<u32>(GuestAddress(e)).expect("event"), EVENT_TRANSPORT_RESET);
        assert!(g.irq_count.load(Ordering::SeqCst) > before);
    }

    #[test]
    fn restored_posts_transport_reset_once_the_guest_gives_a_buffer() {
        let (_dir, _path, mut dev, mut g) = setup();
        dev.restored(&mut g.ctx());
        assert!(g.used(EVENT_QUEUE).is_empty());
        let e = g.alloc(4);
        g.add_chain(EVENT_QUEUE, &[(e, 4, DESC_WRITE)]);
        dev.process_queue(EVENT_QUEUE, &mut g.ctx());
        assert_eq!(g.used(EVENT_QUEUE).len(), 1);
    }

    #[test]
    fn state_round_trips_and_restored_device_has_no_connections() {
        let (dir, path, mut dev, mut g) = setup();
        g.give_rx(4, 4096);
        let _host = guest_connect(&mut dev, &mut g, &path, 13, 6006, 65536);
        let DeviceState::Vsock(state) = dev.state() else { panic!("not a vsock state") };
        assert_eq!(state, VsockState { guest_cid: GUEST_CID });
        let bytes = bincode::serialize(&state).expect("serialize");
        let back: VsockState = bincode::deserialize(&bytes).expect("deserialize");
        drop(dev);
        let restored = Vsock::from_state(&back, &dir.path().join("v2.sock")).expect("restore");
        assert_eq!((restored.guest_cid(), restored.connection_count()), (GUEST_CID, 0));
    }

    #[test]
    fn reset_closes_all_connections() {
        let (_dir, path, mut dev, mut g) = setup();
        g.give_rx(4, 4096);
        let mut host = guest_connect(&mut dev, &mut g, &path, 14, 6007, 65536);
        dev.reset();
        assert_eq!(dev.connection_count(), 0);
        assert!(is_closed(&mut host));
    }

    #[test]
    fn uds_in_missing_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Vsock::new(GUEST_CID, &dir.path().join("nope/v.sock")).err().expect("refused");
        assert!(matches!(err, VsockError::MissingDirectory(_)));
        assert!(err.to_string().contains("nope/v.sock"));
    }

    #[test]
    fn uds_someone_listens_on_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let _other = UnixListener::bind(&path).expect("bind");
        let err = Vsock::new(GUEST_CID, &path).err().expect("refused");
        assert!(err.to_string().contains("already in use"), "{err}");
    }

    #[test]
    fn uds_that_is_not_a_socket_is_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        std::fs::write(&path, b"precious").expect("write");
        let err = Vsock::new(GUEST_CID, &path).err().expect("refused");
        assert!(err.to_string().contains("not a socket; not replacing it"), "{err}");
        assert_eq!(std::fs::read(&path).expect("read"), b"precious");
    }

    #[test]
    fn stale_uds_is_replaced_and_removed_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let dev = Vsock::new(GUEST_CID, &path).expect("replaces stale socket");
        UnixStream::connect(&path).expect("listening");
        drop(dev);
        assert!(!path.exists());
    }

    #[test]
    fn guest_cid_outside_3_to_u32_max_minus_1_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            let err = Vsock::new(cid, &dir.path().join("v.sock")).err().expect("refused");
            assert!(err.to_string().contains("guest CID must be at least 3"), "{err}");
        }
        assert!(Vsock::new(u64::from(u32::MAX) - 1, &dir.path().join("v.sock")).is_ok());
    }
}
