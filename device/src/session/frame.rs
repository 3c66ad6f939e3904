//! The frames of a resumable host session (`docs/resumable-sessions.md`,
//! "Frames"): a 24-byte little-endian header, then `len` payload bytes,
//! checked by a CRC-32 over the first 16 header bytes and the payload.
//!
//! A header is parsed once, from bytes copied out of the socket, into a
//! [`Frame`]; the payload is checked where it lands (guest memory or the
//! session's staging buffer) with [`Checksum`].

use thiserror::Error;
use vm_memory::ByteValued;

/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 24;
/// Most payload bytes of a `DATA` frame.
pub const MAX_DATA_PAYLOAD_BYTES: usize = 64 * 1024;
/// Most payload bytes of an `ERROR` frame.
pub const MAX_ERROR_PAYLOAD_BYTES: usize = 256;
/// Header bytes the checksum covers (all before the checksum field).
const CHECKSUMMED_HEADER_BYTES: usize = 16;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Stream bytes at `offset`.
    Data,
    /// The other stream is received up to `offset`.
    Ack,
    /// The sender's stream ends at `offset`.
    End,
    /// vsockd to client: a message, then the socket closes.
    Error,
    /// Client to vsockd: end the session now.
    Abort,
}

impl Kind {
    /// The `kind` byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            Kind::Data => 1,
            Kind::Ack => 2,
            Kind::End => 3,
            Kind::Error => 4,
            Kind::Abort => 5,
        }
    }

    fn from_code(code: u8) -> Option<Kind> {
        Some(match code {
            1 => Kind::Data,
            2 => Kind::Ack,
            3 => Kind::End,
            4 => Kind::Error,
            5 => Kind::Abort,
            _ => return None,
        })
    }
}

/// The header as it lies on the wire (little-endian fields).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct WireHeader {
    kind: u8,
    flags: u8,
    reserved: u16,
    len: u32,
    offset: u64,
    checksum: u32,
    reserved2: u32,
}

// SAFETY: `repr(C)`: two u8, a u16, a u32, a u64 and two u32, each at its
// natural alignment, 24 bytes with no padding; every byte pattern is valid.
unsafe impl ByteValued for WireHeader {}

const _: () = assert!(std::mem::size_of::<WireHeader>() == FRAME_HEADER_BYTES);

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub len: u32,
    pub offset: u64,
    /// The checksum the header carries.
    pub checksum: u32,
    /// The first 16 header bytes, which the checksum covers.
    covered: [u8; CHECKSUMMED_HEADER_BYTES],
}

/// Why a frame header is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("a {0:?} frame is not sent by a host client")]
    WrongSender(Kind),
    #[error("frame flags or reserved bytes are not zero")]
    Reserved,
    #[error("a {kind:?} frame of {len} payload bytes (at most {max})")]
    Length { kind: Kind, len: u32, max: usize },
}

impl Frame {
    /// A header for a frame we send; its checksum is set by
    /// [`Frame::seal`].
    pub fn new(kind: Kind, offset: u64, len: u32) -> Frame {
        let wire = WireHeader {
            kind: kind.code(),
            len: len.to_le(),
            offset: offset.to_le(),
            ..Default::default()
        };
        let mut covered = [0u8; CHECKSUMMED_HEADER_BYTES];
        covered.copy_from_slice(&wire.as_slice()[..CHECKSUMMED_HEADER_BYTES]);
        Frame {
            kind,
            len,
            offset,
            checksum: 0,
            covered,
        }
    }

    /// Parses a header a host client sent: a kind a client may send, zero
    /// flags and reserved bytes, and a length within the kind's limits.
    pub fn parse_from_client(bytes: &[u8; FRAME_HEADER_BYTES]) -> Result<Frame, FrameError> {
        let mut wire = WireHeader::default();
        wire.as_mut_slice().copy_from_slice(bytes);
        let kind = Kind::from_code(wire.kind).ok_or(FrameError::UnknownKind(wire.kind))?;
        if wire.flags != 0 || wire.reserved != 0 || wire.reserved2 != 0 {
            return Err(FrameError::Reserved);
        }
        let len = u32::from_le(wire.len);
        let max = match kind {
            Kind::Data => MAX_DATA_PAYLOAD_BYTES,
            Kind::Ack | Kind::End | Kind::Abort => 0,
            Kind::Error => return Err(FrameError::WrongSender(kind)),
        };
        if len as usize > max || (kind == Kind::Data && len == 0) {
            return Err(FrameError::Length { kind, len, max });
        }
        let mut covered = [0u8; CHECKSUMMED_HEADER_BYTES];
        covered.copy_from_slice(&bytes[..CHECKSUMMED_HEADER_BYTES]);
        Ok(Frame {
            kind,
            len,
            offset: u64::from_le(wire.offset),
            checksum: u32::from_le(wire.checksum),
            covered,
        })
    }

    /// A checksum started over the header's covered bytes: feed it the
    /// payload, then compare or seal.
    pub fn checksum_start(&self) -> Checksum {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.covered);
        Checksum(h)
    }

    /// Sets the checksum from one computed over the payload.
    pub fn seal(&mut self, sum: Checksum) {
        self.checksum = sum.0.finalize();
    }

    /// True when `sum`, fed the payload, matches the header's checksum.
    pub fn verify(&self, sum: Checksum) -> bool {
        sum.0.finalize() == self.checksum
    }

    /// The header bytes to send.
    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_BYTES] {
        let mut out = [0u8; FRAME_HEADER_BYTES];
        out[..CHECKSUMMED_HEADER_BYTES].copy_from_slice(&self.covered);
        out[CHECKSUMMED_HEADER_BYTES..CHECKSUMMED_HEADER_BYTES + 4]
            .copy_from_slice(&self.checksum.to_le_bytes());
        out
    }

    /// A complete frame with no payload, sealed.
    pub fn bare(kind: Kind, offset: u64) -> Frame {
        let mut f = Frame::new(kind, offset, 0);
        let sum = f.checksum_start();
        f.seal(sum);
        f
    }
}

/// A CRC-32 (zlib's) being computed over a frame.
pub struct Checksum(crc32fast::Hasher);

impl Checksum {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// An `ERROR` frame carrying `message` (cut to the limit on a character
/// boundary), as bytes ready to send.
pub fn error_frame(message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_ERROR_PAYLOAD_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let payload = &message.as_bytes()[..end];
    let mut f = Frame::new(Kind::Error, 0, payload.len() as u32);
    let mut sum = f.checksum_start();
    sum.update(payload);
    f.seal(sum);
    let mut out = f.to_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(kind: u8, len: u32, offset: u64, payload: &[u8]) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0] = kind;
        b[4..8].copy_from_slice(&len.to_le_bytes());
        b[8..16].copy_from_slice(&offset.to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..16]);
        h.update(payload);
        b[16..20].copy_from_slice(&h.finalize().to_le_bytes());
        b
    }

    #[test]
    fn the_checksum_is_zlibs_crc32() {
        let mut h = crc32fast::Hasher::new();
        h.update(b"123456789");
        assert_eq!(h.finalize(), 0xCBF4_3926);
    }

    #[test]
    fn a_client_data_frame_parses_and_verifies() {
        let payload = b"hello, guest";
        let bytes = client_frame(1, payload.len() as u32, 1 << 40, payload);
        let f = Frame::parse_from_client(&bytes).unwrap();
        assert_eq!((f.kind, f.len, f.offset), (Kind::Data, 12, 1 << 40));
        let mut sum = f.checksum_start();
        sum.update(payload);
        assert!(f.verify(sum));
        let mut sum = f.checksum_start();
        sum.update(b"hello, guesT");
        assert!(!f.verify(sum), "a changed payload byte");
        // The header is covered too.
        let mut moved = bytes;
        moved[8] ^= 1;
        let g = Frame::parse_from_client(&moved).unwrap();
        let mut sum = g.checksum_start();
        sum.update(payload);
        assert!(!g.verify(sum), "a changed offset");
    }

    #[test]
    fn bad_client_headers_are_refused() {
        let ok = client_frame(2, 0, 5, b"");
        assert!(Frame::parse_from_client(&ok).is_ok());
        let mut b = ok;
        b[0] = 9;
        assert_eq!(
            Frame::parse_from_client(&b),
            Err(FrameError::UnknownKind(9))
        );
        b = ok;
        b[0] = 4;
        assert_eq!(
            Frame::parse_from_client(&b),
            Err(FrameError::WrongSender(Kind::Error))
        );
        for i in [1, 2, 3, 20, 23] {
            b = ok;
            b[i] = 1;
            assert_eq!(
                Frame::parse_from_client(&b),
                Err(FrameError::Reserved),
                "byte {i}"
            );
        }
        assert!(Frame::parse_from_client(&client_frame(1, 0, 0, b"")).is_err());
        assert!(Frame::parse_from_client(&client_frame(1, 65537, 0, b"")).is_err());
        assert!(Frame::parse_from_client(&client_frame(1, 65536, 0, b"")).is_ok());
        assert!(Frame::parse_from_client(&client_frame(2, 1, 0, b"")).is_err());
    }

    #[test]
    fn frames_we_send_round_trip() {
        let payload = [7u8; 300];
        let mut f = Frame::new(Kind::Data, 99, 300);
        let mut sum = f.checksum_start();
        sum.update(&payload);
        f.seal(sum);
        let bytes = f.to_bytes();
        assert_eq!(bytes, client_frame(1, 300, 99, &payload));
        let ack = Frame::bare(Kind::Ack, 1234).to_bytes();
        assert_eq!(ack, client_frame(2, 0, 1234, b""));
        let e = error_frame(&"é".repeat(200));
        assert_eq!(e[0], 4);
        let len = u32::from_le_bytes(e[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, 256, "cut on a character boundary");
        assert_eq!(e.len(), 24 + len);
        assert!(std::str::from_utf8(&e[24..]).is_ok());
    }
}
