//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and its constants.
//!
//! The header is copied out of guest memory exactly once per packet into a
//! [`PacketHeader`]; nothing reads the guest's copy again, so a guest that
//! rewrites it while we work cannot make us see two different headers.

use vm_memory::ByteValued;

/// Size of the header in bytes (virtio 1.2, 5.10.6).
pub const HEADER_SIZE_BYTES: usize = 44;
/// The host's CID, reserved by the vsock address family (virtio 1.2, 5.10.4).
pub const HOST_CID: u64 = 2;
/// Largest payload one packet carries: Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// Socket type: stream (virtio 1.2, 5.10.6).
pub const TYPE_STREAM: u16 = 1;

/// Operations (virtio 1.2, 5.10.6).
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data (virtio 1.2, 5.10.6.5).
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data (virtio 1.2, 5.10.6.5).
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// `struct virtio_vsock_hdr`, exactly as it lies in guest memory: packed,
/// little endian. Read its fields through the accessors.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub struct PacketHeader {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

// SAFETY: `PacketHeader` is `repr(C, packed)` and made only of integers, so it
// has no padding and every byte pattern is a valid value.
unsafe impl ByteValued for PacketHeader {}

const _: () = assert!(std::mem::size_of::<PacketHeader>() == HEADER_SIZE_BYTES);

macro_rules! accessors {
    ($($get:ident, $set:ident: $t:ty;)*) => {$(
        #[doc = concat!("The `", stringify!($get), "` field.")]
        pub fn $get(&self) -> $t {
            <$t>::from_le(self.$get)
        }
        #[doc = concat!("Sets the `", stringify!($get), "` field.")]
        pub fn $set(&mut self, v: $t) -> &mut Self {
            self.$get = v.to_le();
            self
        }
    )*};
}

#[allow(clippy::len_without_is_empty)] // `len` is the wire field's name.
impl PacketHeader {
    accessors! {
        src_cid, set_src_cid: u64;
        dst_cid, set_dst_cid: u64;
        src_port, set_src_port: u32;
        dst_port, set_dst_port: u32;
        len, set_len: u32;
        op, set_op: u16;
        flags, set_flags: u32;
        buf_alloc, set_buf_alloc: u32;
        fwd_cnt, set_fwd_cnt: u32;
    }

    /// The `type` field.
    pub fn type_(&self) -> u16 {
        u16::from_le(self.type_)
    }

    /// Sets the `type` field.
    pub fn set_type(&mut self, v: u16) -> &mut Self {
        self.type_ = v.to_le();
        self
    }

    /// Parses a header from its wire bytes.
    pub fn from_bytes(bytes: &[u8; HEADER_SIZE_BYTES]) -> Self {
        let mut hdr = PacketHeader::default();
        hdr.as_mut_slice().copy_from_slice(bytes);
        hdr
    }
}

impl std::fmt::Debug for PacketHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} -> {}:{} op={} type={} len={} flags={:#x} buf_alloc={} fwd_cnt={}",
            self.src_cid(),
            self.src_port(),
            self.dst_cid(),
            self.dst_port(),
            op_name(self.op()),
            self.type_(),
            self.len(),
            self.flags(),
            self.buf_alloc(),
            self.fwd_cnt()
        )
    }
}

/// A readable name for an op, for logs.
pub fn op_name(op: u16) -> &'static str {
    match op {
        OP_REQUEST => "REQUEST",
        OP_RESPONSE => "RESPONSE",
        OP_RST => "RST",
        OP_SHUTDOWN => "SHUTDOWN",
        OP_RW => "RW",
        OP_CREDIT_UPDATE => "CREDIT_UPDATE",
        OP_CREDIT_REQUEST => "CREDIT_REQUEST",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_little_endian() {
        let mut h = PacketHeader::default();
        h.set_src_cid(3)
            .set_dst_cid(HOST_CID)
            .set_src_port(0x1234_5678)
            .set_dst_port(80)
            .set_len(4096)
            .set_type(TYPE_STREAM)
            .set_op(OP_RW)
            .set_flags(SHUTDOWN_SEND)
            .set_buf_alloc(262_144)
            .set_fwd_cnt(7);
        let bytes: [u8; HEADER_SIZE_BYTES] = h.as_slice().try_into().unwrap();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[16..20], &0x1234_5678u32.to_le_bytes());
        assert_eq!(&bytes[28..30], &TYPE_STREAM.to_le_bytes());
        assert_eq!(&bytes[30..32], &OP_RW.to_le_bytes());
        assert_eq!(&bytes[40..44], &7u32.to_le_bytes());
        let back = PacketHeader::from_bytes(&bytes);
        assert_eq!(back.src_port(), 0x1234_5678);
        assert_eq!(back.len(), 4096);
        assert_eq!(back.buf_alloc(), 262_144);
        assert_eq!(back.op(), OP_RW);
    }
}
