//! The hybrid-vsock handshake line a host client sends first:
//! `CONNECT <port>\n` (Firecracker's convention).
//!
//! The device reads the line without consuming it (`MSG_PEEK`) until it is
//! complete, then takes exactly its bytes: bytes after the newline, even
//! from the same write, stay in the socket as stream data, and a partial
//! line stays there too, so a process that dies mid-line loses nothing.
//! [`find_line`] tells from the bytes peeked whether the line is complete.

use thiserror::Error;

/// Longest line accepted, newline included. `CONNECT 4294967295\n` is 19
/// bytes; the margin leaves room for options added later.
pub const MAX_LINE_BYTES: usize = 64;

/// Why a handshake line was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LineError {
    /// No newline within [`MAX_LINE_BYTES`].
    #[error("handshake line longer than {MAX_LINE_BYTES} bytes")]
    TooLong,
    /// The line is not `CONNECT <port>`.
    #[error("malformed handshake line {0:?} (expected \"CONNECT <port>\")")]
    Malformed(String),
}

/// Looks for the line at the start of `peeked` (the first bytes the client
/// sent). `Ok(None)`: no newline yet, more bytes are needed.
/// `Ok(Some(n))`: the line is the first `n` bytes, newline included.
pub fn find_line(peeked: &[u8]) -> Result<Option<usize>, LineError> {
    match peeked.iter().position(|&b| b == b'\n') {
        Some(nl) if nl < MAX_LINE_BYTES => Ok(Some(nl + 1)),
        Some(_) => Err(LineError::TooLong),
        None if peeked.len() >= MAX_LINE_BYTES => Err(LineError::TooLong),
        None => Ok(None),
    }
}

/// The port a complete line (newline included, as [`find_line`] delimits
/// it) asks for.
pub fn line_port(line: &[u8]) -> Result<u32, LineError> {
    parse_line(line.strip_suffix(b"\n").unwrap_or(line))
}

/// Parses `CONNECT <port>` (without the newline; a trailing `\r` is allowed).
fn parse_line(line: &[u8]) -> Result<u32, LineError> {
    let malformed = || LineError::Malformed(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| malformed())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text.strip_prefix("CONNECT ").ok_or_else(malformed)?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    port.parse().map_err(|_| malformed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(bytes: &[u8]) -> Result<Option<(u32, usize)>, LineError> {
        Ok(match find_line(bytes)? {
            Some(n) => Some((line_port(&bytes[..n])?, n)),
            None => None,
        })
    }

    #[test]
    fn whole_line() {
        assert_eq!(whole(b"CONNECT 1234\n"), Ok(Some((1234, 13))));
    }

    #[test]
    fn payload_after_newline_is_not_part_of_the_line() {
        assert_eq!(whole(b"CONNECT 52\nhello"), Ok(Some((52, 11))));
    }

    #[test]
    fn incomplete_until_the_newline() {
        assert_eq!(whole(b"CONN"), Ok(None));
        assert_eq!(whole(b"CONNECT 4"), Ok(None));
        assert_eq!(whole(b"CONNECT 42\r\nxy"), Ok(Some((42, 12))));
    }

    #[test]
    fn malformed_lines() {
        for line in [
            &b"CONNECT\n"[..],
            b"CONNECT \n",
            b"connect 5\n",
            b"CONNECT -5\n",
            b"CONNECT 5x\n",
            b"CONNECT 4294967296\n",
            b"CONNECT  5\n",
            b"\xff\xfe\n",
            b"\n",
        ] {
            assert!(
                matches!(whole(line), Err(LineError::Malformed(_))),
                "{line:?}"
            );
        }
    }

    #[test]
    fn max_port() {
        assert_eq!(whole(b"CONNECT 4294967295\n"), Ok(Some((u32::MAX, 19))));
    }

    #[test]
    fn over_long_line_without_newline() {
        assert_eq!(find_line(&[b'C'; MAX_LINE_BYTES - 1]), Ok(None));
        assert_eq!(find_line(&[b'C'; MAX_LINE_BYTES]), Err(LineError::TooLong));
    }

    #[test]
    fn over_long_line_with_newline() {
        let mut line = vec![b'9'; MAX_LINE_BYTES];
        line.push(b'\n');
        assert_eq!(find_line(&line), Err(LineError::TooLong));
        let mut fits = vec![b'9'; MAX_LINE_BYTES - 1];
        fits.push(b'\n');
        assert_eq!(find_line(&fits), Ok(Some(MAX_LINE_BYTES)));
    }
}
