//! One stream connection between a guest port and a host Unix stream: its
//! state, its credit accounting both ways, and the guest data waiting for
//! the host socket to take it.
//!
//! Credit (virtio 1.2, 5.10.6.3): each side advertises `buf_alloc` (its
//! receive buffer) and `fwd_cnt` (bytes it has consumed, ever, wrapping).
//! A sender may have at most `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`
//! bytes in flight.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use super::packet::{Header, HOST_CID, OP_CREDIT_UPDATE, TYPE_STREAM};

/// What the device advertises as its receive buffer, per connection: guest
/// data buffered for a slow host socket never exceeds it.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// A CREDIT_UPDATE is sent once this many bytes were forwarded to the host
/// since the guest last heard our `fwd_cnt`. At most `BUF_ALLOC`, so a
/// guest that used all its credit always hears back.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more than the credit we gave it.
    #[error("the guest sent {0} bytes beyond its credit")]
    CreditExceeded(u32),
    /// The host stream failed.
    #[error("the host stream failed")]
    Stream(#[source] io::Error),
}

/// Where the connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The host connected and we sent the guest a REQUEST; waiting for
    /// its RESPONSE.
    AwaitingResponse,
    /// Data may flow.
    Established,
    /// The guest shut down both ways; the rest of its data is being
    /// written to the host, then the stream is closed and the guest gets
    /// a RST.
    Closing,
}

/// One connection.
pub struct Connection {
    /// The host end.
    pub stream: UnixStream,
    /// The host-side port.
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
    /// Where it is.
    pub state: State,
    /// The guest will receive nothing more (SHUTDOWN RCV).
    pub peer_shut_rcv: bool,
    /// The guest will send nothing more (SHUTDOWN SEND).
    pub peer_shut_send: bool,
    /// The host stream reached end of file.
    pub host_eof: bool,
    /// The host stream hung up (both ways).
    pub hup: bool,
    /// Queued in the muxer's list of streams to read.
    pub queued_readable: bool,
    /// Events currently registered in the muxer's epoll.
    pub registered: u32,
    /// The host stream was shut down for writing.
    host_write_shut: bool,
    /// Guest data the host stream has not taken yet.
    pending: VecDeque<u8>,
    /// Guest bytes written to the host stream, ever.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard.
    fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest, ever.
    tx_cnt: Wrapping<u32>,
    /// The guest's receive buffer.
    peer_buf_alloc: u32,
    /// What the guest has consumed of what we sent.
    peer_fwd_cnt: Wrapping<u32>,
}

impl Connection {
    /// A connection over `stream` in `state`; the guest's credit is
    /// unknown (zero) until it tells us.
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            peer_shut_rcv: false,
            peer_shut_send: false,
            host_eof: false,
            hup: false,
            queued_readable: false,
            registered: 0,
            host_write_shut: false,
            pending: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
        }
    }

    /// A header from us to the guest on this connection, carrying our
    /// current credit (which the guest now knows).
    pub fn header(&mut self, guest_cid: u64, op: u16) -> Header {
        self.fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
            ..Header::default()
        }
    }

    /// Takes the guest's credit fields from any packet it sent.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Counts `n` bytes sent to the guest.
    pub fn record_sent(&mut self, n: u32) {
        self.tx_cnt += Wrapping(n);
    }

    /// Whether data from the host may be read now (given rx buffers).
    pub fn wants_host_data(&self) -> bool {
        // A stream that hung up is still read: what the host wrote before
        // closing goes to the guest, then the end of file as a SHUTDOWN.
        self.state == State::Established && !self.host_eof && !self.peer_shut_rcv && self.peer_credit() > 0
    }

    /// Guest data still waiting for the host stream.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Takes guest data for the host: written at once when nothing is
    /// queued before it, the rest kept for [`Connection::flush`]. Refused
    /// when the guest overran the credit it was given.
    pub fn push_guest_data(&mut self, data: &[u8]) -> Result<(), ConnError> {
        let held = self.pending.len() + data.len();
        if held > BUF_ALLOC as usize {
            return Err(ConnError::CreditExceeded((held - BUF_ALLOC as usize) as u32));
        }
        let mut rest = data;
        if self.pending.is_empty() {
            let n = write_some(&mut self.stream, rest)?;
            self.fwd_cnt += Wrapping(n as u32);
            rest = &rest[n..];
        }
        self.pending.extend(rest);
        Ok(())
    }

    /// Writes what the host stream takes of the queued guest data.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let n = write_some(&mut self.stream, front)?;
            if n == 0 {
                break;
            }
            self.pending.drain(..n);
            self.fwd_cnt += Wrapping(n as u32);
        }
        Ok(())
    }

    /// Whether the guest should hear our `fwd_cnt` now.
    pub fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// A CREDIT_UPDATE for the guest.
    pub fn credit_update(&mut self, guest_cid: u64) -> Header {
        self.header(guest_cid, OP_CREDIT_UPDATE)
    }

    /// Reads host data for the guest into `buf`, at most its credit.
    /// `Ok(0)` is end of file.
    pub fn read_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = buf.len().min(self.peer_credit() as usize);
        let n = self.stream.read(&mut buf[..max])?;
        Ok(n)
    }

    /// The guest sends no more and everything it sent was written: tell
    /// the host stream (half-close).
    pub fn shutdown_host_write_if_done(&mut self) {
        if self.peer_shut_send && self.pending.is_empty() && !self.host_write_shut {
            self.host_write_shut = true;
            // The host may already be gone; nothing else to tell it.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }
}

/// Writes what `w` takes now; `WouldBlock` is zero bytes.
fn write_some(w: &mut impl Write, data: &[u8]) -> Result<usize, ConnError> {
    if data.is_empty() {
        return Ok(0);
    }
    loop {
        match w.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ConnError::Stream(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        (Connection::new(a, 1000, 2000, State::Established), b)
    }

    #[test]
    fn peer_credit_is_buf_alloc_minus_in_flight() {
        let (mut c, _peer) = conn();
        c.update_peer_credit(&Header { buf_alloc: 100, fwd_cnt: 0, ..Header::default() });
        c.record_sent(60);
        assert_eq!(c.peer_credit(), 40);
        c.update_peer_credit(&Header { buf_alloc: 100, fwd_cnt: 50, ..Header::default() });
        assert_eq!(c.peer_credit(), 90);
    }

    #[test]
    fn peer_credit_survives_counter_wrap() {
        let (mut c, _peer) = conn();
        c.record_sent(u32::MAX - 9);
        c.update_peer_credit(&Header { buf_alloc: 100, fwd_cnt: u32::MAX - 9, ..Header::default() });
        c.record_sent(30);
        assert_eq!(c.peer_credit(), 70);
    }

    #[test]
    fn guest_data_beyond_buf_alloc_is_refused() {
        let (mut c, _peer) = conn();
        // The peer never reads: the socket buffer fills, the rest is held.
        let chunk = vec![7u8; 64 * 1024];
        let mut refused = false;
        for _ in 0..64 {
            if let Err(ConnError::CreditExceeded(_)) = c.push_guest_data(&chunk) {
                refused = true;
                break;
            }
        }
        assert!(refused);
        assert!(c.pending_len() <= BUF_ALLOC as usize);
    }

    #[test]
    fn held_guest_data_is_flushed_in_order_and_counted() {
        let (mut c, mut peer) = conn();
        let data: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
        c.push_guest_data(&data[..200_000]).expect("within credit");
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        peer.set_nonblocking(true).expect("nonblocking");
        let mut sent = 200_000;
        while got.len() < data.len() {
            match peer.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.flush().expect("flush");
                    if c.pending_len() == 0 && sent < data.len() {
                        let end = (sent + 100_000).min(data.len());
                        c.push_guest_data(&data[sent..end]).expect("within credit");
                        sent = end;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, data);
        assert!(c.needs_credit_update());
        let h = c.credit_update(3);
        assert_eq!(h.fwd_cnt, 400_000);
        assert!(!c.needs_credit_update());
    }
}
