//! The frame codec: the 24-byte header both directions of a resumable
//! session use, with explicit little-endian encoding.
//!
//! | bytes | field | |
//! |---|---|---|
//! | 0 | `kind` | [`FrameKind`] |
//! | 1 | `flags` | 0 |
//! | 2..4 | reserved | 0 |
//! | 4..8 | `len` | payload bytes |
//! | 8..16 | `offset` | stream offset (meaning per kind) |
//! | 16..20 | `checksum` | CRC-32 (zlib's) of bytes 0..16, then the payload |
//! | 20..24 | reserved | 0 |

use std::fmt;

/// Bytes in a frame header.
pub const FRAME_HEADER_BYTES: usize = 24;
/// Leading header bytes the checksum covers (everything before it).
pub const CHECKSUMMED_HEADER_BYTES: usize = 16;
/// Largest `DATA` payload.
pub const MAX_DATA_PAYLOAD_BYTES: usize = 65536;
/// Largest `ERROR` payload (a UTF-8 message).
pub const MAX_ERROR_PAYLOAD_BYTES: usize = 256;
/// Largest whole frame on the wire.
pub const MAX_FRAME_BYTES: usize = FRAME_HEADER_BYTES + MAX_DATA_PAYLOAD_BYTES;
/// The client sends no byte at or past the last offset vsockd acknowledged
/// plus this (docs/resumable-sessions.md, "Flow and acknowledgement").
pub const H2G_WINDOW_BYTES: u64 = 256 << 10;

const KIND_AT: usize = 0;
const FLAGS_AT: usize = 1;
const RESERVED_A: std::ops::Range<usize> = 2..4;
const LEN_AT: usize = 4;
const OFFSET_AT: usize = 8;
const CHECKSUM_AT: usize = 16;
const RESERVED_B: std::ops::Range<usize> = 20..24;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Stream bytes; `offset` is the first one's.
    Data = 1,
    /// `offset`: how far the sender has the other stream.
    Ack = 2,
    /// `offset`: the stream's length; no more `DATA` follows.
    End = 3,
    /// vsockd to client: a UTF-8 message; the socket closes after it.
    Error = 4,
    /// Client to vsockd: end the session now.
    Abort = 5,
}

impl FrameKind {
    fn from_wire(kind: u8) -> Option<FrameKind> {
        match kind {
            1 => Some(FrameKind::Data),
            2 => Some(FrameKind::Ack),
            3 => Some(FrameKind::End),
            4 => Some(FrameKind::Error),
            5 => Some(FrameKind::Abort),
            _ => None,
        }
    }

    /// The payload lengths this kind allows.
    fn len_range(self) -> std::ops::RangeInclusive<usize> {
        match self {
            FrameKind::Data => 1..=MAX_DATA_PAYLOAD_BYTES,
            FrameKind::Error => 0..=MAX_ERROR_PAYLOAD_BYTES,
            FrameKind::Ack | FrameKind::End | FrameKind::Abort => 0..=0,
        }
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    /// Payload bytes.
    pub len: u32,
    pub offset: u64,
    pub checksum: u32,
}

/// Why a received frame was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameFault {
    UnknownKind(u8),
    NonZeroFlags(u8),
    NonZeroReserved,
    BadLength { kind: FrameKind, len: u32 },
    BadChecksum { computed: u32, received: u32 },
}

impl fmt::Display for FrameFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameFault::UnknownKind(kind) => write!(f, "unknown frame kind {kind}"),
            FrameFault::NonZeroFlags(flags) => write!(f, "non-zero frame flags {flags:#04x}"),
            FrameFault::NonZeroReserved => write!(f, "non-zero reserved header bytes"),
            FrameFault::BadLength { kind, len } => {
                write!(f, "{kind:?} frame with a payload of {len} bytes")
            }
            FrameFault::BadChecksum { computed, received } => write!(
                f,
                "frame checksum {received:#010x} does not match its contents ({computed:#010x})"
            ),
        }
    }
}

impl FrameHeader {
    /// A header for `payload`, split in up to two slices (a ring buffer's
    /// wrap), with its checksum computed.
    pub fn new(kind: FrameKind, offset: u64, payload: [&[u8]; 2]) -> FrameHeader {
        let len = payload[0].len() + payload[1].len();
        let mut header = FrameHeader {
            kind,
            // A payload is at most MAX_DATA_PAYLOAD_BYTES: the caller's job.
            len: u32::try_from(len).unwrap_or(u32::MAX),
            offset,
            checksum: 0,
        };
        header.checksum = checksum(&header.encode(), payload);
        header
    }

    /// A header without payload (`ACK`, `END`, `ABORT`).
    pub fn control(kind: FrameKind, offset: u64) -> FrameHeader {
        FrameHeader::new(kind, offset, [&[], &[]])
    }

    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; FRAME_HEADER_BYTES] {
        let mut bytes = [0u8; FRAME_HEADER_BYTES];
        bytes[KIND_AT] = self.kind as u8;
        bytes[LEN_AT..LEN_AT + 4].copy_from_slice(&self.len.to_le_bytes());
        bytes[OFFSET_AT..OFFSET_AT + 8].copy_from_slice(&self.offset.to_le_bytes());
        bytes[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&self.checksum.to_le_bytes());
        bytes
    }

    /// Decodes and checks a header's fields (not its checksum, which needs
    /// the payload: see [`FrameHeader::verify`]).
    pub fn decode(bytes: &[u8; FRAME_HEADER_BYTES]) -> Result<FrameHeader, FrameFault> {
        let kind =
            FrameKind::from_wire(bytes[KIND_AT]).ok_or(FrameFault::UnknownKind(bytes[KIND_AT]))?;
        if bytes[FLAGS_AT] != 0 {
            return Err(FrameFault::NonZeroFlags(bytes[FLAGS_AT]));
        }
        if bytes[RESERVED_A]
            .iter()
            .chain(&bytes[RESERVED_B])
            .any(|&b| b != 0)
        {
            return Err(FrameFault::NonZeroReserved);
        }
        let len = u32::from_le_bytes(le_array(&bytes[LEN_AT..LEN_AT + 4]));
        if !kind.len_range().contains(&(len as usize)) {
            return Err(FrameFault::BadLength { kind, len });
        }
        Ok(FrameHeader {
            kind,
            len,
            offset: u64::from_le_bytes(le_array(&bytes[OFFSET_AT..OFFSET_AT + 8])),
            checksum: u32::from_le_bytes(le_array(&bytes[CHECKSUM_AT..CHECKSUM_AT + 4])),
        })
    }

    /// Checks the checksum against the header's first bytes and `payload`.
    pub fn verify(&self, payload: &[u8]) -> Result<(), FrameFault> {
        let computed = checksum(&self.encode(), [payload, &[]]);
        if computed == self.checksum {
            Ok(())
        } else {
            Err(FrameFault::BadChecksum {
                computed,
                received: self.checksum,
            })
        }
    }

    /// Header plus payload bytes.
    pub fn frame_bytes(&self) -> usize {
        FRAME_HEADER_BYTES + self.len as usize
    }
}

/// The frame checksum: CRC-32 of the header's first
/// [`CHECKSUMMED_HEADER_BYTES`], then the payload.
pub fn checksum(header: &[u8; FRAME_HEADER_BYTES], payload: [&[u8]; 2]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[..CHECKSUMMED_HEADER_BYTES]);
    hasher.update(payload[0]);
    hasher.update(payload[1]);
    hasher.finalize()
}

fn le_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut array = [0u8; N];
    array.copy_from_slice(bytes);
    array
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_zlibs() {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(b"123456789");
        assert_eq!(hasher.finalize(), 0xCBF4_3926);
    }

    #[test]
    fn encodes_fields_little_endian() {
        let header = FrameHeader::new(FrameKind::Data, 0x0102_0304_0506_0708, [b"abc", b"de"]);
        let bytes = header.encode();
        assert_eq!(bytes[0], 1);
        assert_eq!(&bytes[1..4], &[0, 0, 0]);
        assert_eq!(&bytes[4..8], &[5, 0, 0, 0]);
        assert_eq!(&bytes[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[20..24], &[0, 0, 0, 0]);
        // The checksum is over bytes 0..16 then the payload.
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&bytes[..16]);
        hasher.update(b"abcde");
        assert_eq!(&bytes[16..20], &hasher.finalize().to_le_bytes());
    }

    #[test]
    fn round_trips_and_verifies() {
        let header = FrameHeader::new(FrameKind::Data, 42, [b"hello", b""]);
        let decoded = FrameHeader::decode(&header.encode()).unwrap();
        assert_eq!(decoded, header);
        decoded.verify(b"hello").unwrap();
        assert_eq!(decoded.frame_bytes(), FRAME_HEADER_BYTES + 5);
        let err = decoded.verify(b"hellO").unwrap_err();
        assert!(matches!(err, FrameFault::BadChecksum { .. }), "{err}");
    }

    #[test]
    fn a_split_payload_has_the_same_checksum() {
        let whole = FrameHeader::new(FrameKind::Data, 7, [b"0123456789", b""]);
        let split = FrameHeader::new(FrameKind::Data, 7, [b"0123", b"456789"]);
        assert_eq!(whole, split);
    }

    #[test]
    fn control_frames_checksum_the_header_alone() {
        let ack = FrameHeader::control(FrameKind::Ack, 99);
        let bytes = ack.encode();
        assert_eq!(ack.checksum, crc32fast::hash(&bytes[..16]));
        FrameHeader::decode(&bytes).unwrap().verify(&[]).unwrap();
    }

    #[test]
    fn rejects_malformed_headers() {
        let good = FrameHeader::new(FrameKind::Data, 0, [b"x", b""]).encode();

        let mut bytes = good;
        bytes[0] = 9;
        assert_eq!(FrameHeader::decode(&bytes), Err(FrameFault::UnknownKind(9)));
        bytes[0] = 0;
        assert_eq!(FrameHeader::decode(&bytes), Err(FrameFault::UnknownKind(0)));

        let mut bytes = good;
        bytes[1] = 1;
        assert_eq!(
            FrameHeader::decode(&bytes),
            Err(FrameFault::NonZeroFlags(1))
        );

        for at in [2, 3, 20, 23] {
            let mut bytes = good;
            bytes[at] = 1;
            assert_eq!(
                FrameHeader::decode(&bytes),
                Err(FrameFault::NonZeroReserved)
            );
        }

        let with_len = |kind: FrameKind, len: u32| {
            let mut bytes = good;
            bytes[0] = kind as u8;
            bytes[4..8].copy_from_slice(&len.to_le_bytes());
            FrameHeader::decode(&bytes)
        };
        assert!(with_len(FrameKind::Data, 0).is_err());
        assert!(with_len(FrameKind::Data, 65536).is_ok());
        assert!(with_len(FrameKind::Data, 65537).is_err());
        assert!(with_len(FrameKind::Ack, 1).is_err());
        assert!(with_len(FrameKind::End, 1).is_err());
        assert!(with_len(FrameKind::Error, 256).is_ok());
        assert!(with_len(FrameKind::Error, 257).is_err());
    }
}
