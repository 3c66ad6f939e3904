//! The fake vsockd's own frame encoder and decoder, written from the
//! protocol document independently of the library's codec.

pub const HEADER_BYTES: usize = 24;
pub const MAX_DATA_BYTES: usize = 65536;
pub const MAX_ERROR_BYTES: usize = 256;

pub const DATA: u8 = 1;
pub const ACK: u8 = 2;
pub const END: u8 = 3;
pub const ERROR: u8 = 4;
pub const ABORT: u8 = 5;

/// A whole frame's bytes.
pub fn encode(kind: u8, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len());
    frame.push(kind);
    frame.push(0); // flags
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&offset.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&frame[..16]);
    crc.update(payload);
    frame.extend_from_slice(&crc.finalize().to_le_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// A header's fields, checked as vsockd checks a client's frames.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub kind: u8,
    pub len: usize,
    pub offset: u64,
    pub checksum: u32,
}

pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Header, String> {
    let kind = bytes[0];
    if bytes[1] != 0 || bytes[2] != 0 || bytes[3] != 0 || bytes[20..24] != [0, 0, 0, 0] {
        return Err(format!("non-zero flags or reserved bytes in {bytes:?}"));
    }
    let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&bytes[8..16]);
    let header = Header {
        kind,
        len,
        offset: u64::from_le_bytes(offset),
        checksum: u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]),
    };
    let len_ok = match kind {
        DATA => (1..=MAX_DATA_BYTES).contains(&len),
        ACK | END => len == 0,
        ABORT => len == 0 && header.offset == 0,
        ERROR => len <= MAX_ERROR_BYTES,
        _ => return Err(format!("unknown frame kind {kind}")),
    };
    if !len_ok {
        return Err(format!(
            "kind {kind} with len {len}, offset {}",
            header.offset
        ));
    }
    Ok(header)
}

pub fn checksum_ok(bytes: &[u8; HEADER_BYTES], header: &Header, payload: &[u8]) -> bool {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[..16]);
    crc.update(payload);
    crc.finalize() == header.checksum
}
