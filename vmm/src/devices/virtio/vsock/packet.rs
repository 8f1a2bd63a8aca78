//! The virtio-vsock packet header (virtio 1.2, section 5.10.6) as plain
//! values, and the constants of the stream protocol. Guest chains are
//! parsed by `virtio-vsock`; this is what the device builds and keeps.

use virtio_vsock::packet::PKT_HEADER_SIZE;

/// The host's CID.
pub const HOST_CID: u64 = 2;

/// `type`: a stream socket, the only kind served.
pub const TYPE_STREAM: u16 = 1;

/// `op`: connection request.
pub const OP_REQUEST: u16 = 1;
/// `op`: connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// `op`: the connection is reset (refused, or closed for good).
pub const OP_RST: u16 = 3;
/// `op`: half or full close.
pub const OP_SHUTDOWN: u16 = 4;
/// `op`: data.
pub const OP_RW: u16 = 5;
/// `op`: the sender's `buf_alloc`/`fwd_cnt` changed.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// `op`: the sender asks for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `SHUTDOWN` flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `SHUTDOWN` flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// The event queue's only event: every connection is gone.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// The largest payload of one packet, either way.
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// A packet header, host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever.
    pub fwd_cnt: u32,
}

impl Header {
    /// The header as it lies in a descriptor, little-endian.
    pub fn to_bytes(self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The reset that answers `self`: addresses swapped, no payload.
    pub fn rst_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes_are_little_endian_at_spec_offsets() {
        let h = Header { src_cid: 2, dst_cid: 3, src_port: 4, dst_port: 5, len: 6, type_: 1, op: 5, flags: 7, buf_alloc: 8, fwd_cnt: 9 };
        let b = h.to_bytes();
        assert_eq!(b.len(), 44);
        assert_eq!(b[0], 2);
        assert_eq!(b[8], 3);
        assert_eq!(b[16], 4);
        assert_eq!(b[20], 5);
        assert_eq!(b[24], 6);
        assert_eq!(b[28], 1);
        assert_eq!(b[30], 5);
        assert_eq!(b[32], 7);
        assert_eq!(b[36], 8);
        assert_eq!(b[40], 9);
    }
}
