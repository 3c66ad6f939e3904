//! The hybrid-vsock handshake line a host client sends first:
//! `CONNECT <port>\n` (Firecracker's convention).
//!
//! The parser is fed whatever each read returned, so a line split across
//! several writes works. Bytes after the newline are not part of the line:
//! [`LineParser::feed`] reports where the line ended so the caller keeps the
//! rest as stream data.

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

/// Accumulates a handshake line across reads.
#[derive(Debug, Default)]
pub struct LineParser {
    buf: Vec<u8>,
}

impl LineParser {
    /// Feeds bytes just read. Returns `Ok(None)` while the line is
    /// incomplete, or `Ok(Some((port, used)))` when it is complete, where
    /// `used` bytes of `data` belonged to the line and the rest is stream data.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<(u32, usize)>, LineError> {
        match data.iter().position(|&b| b == b'\n') {
            None => {
                if self.buf.len() + data.len() >= MAX_LINE_BYTES {
                    return Err(LineError::TooLong);
                }
                self.buf.extend_from_slice(data);
                Ok(None)
            }
            Some(nl) => {
                if self.buf.len() + nl + 1 > MAX_LINE_BYTES {
                    return Err(LineError::TooLong);
                }
                self.buf.extend_from_slice(&data[..nl]);
                let port = parse_line(&self.buf)?;
                Ok(Some((port, nl + 1)))
            }
        }
    }
}

impl LineParser {
    /// The bytes of the line received so far.
    pub fn partial(&self) -> &[u8] {
        &self.buf
    }

    /// A parser that already received `partial` (a line cut short by a
    /// process restart).
    pub fn resume(partial: &[u8]) -> Result<Self, LineError> {
        if partial.len() >= MAX_LINE_BYTES || partial.contains(&b'\n') {
            return Err(LineError::TooLong);
        }
        Ok(LineParser {
            buf: partial.to_vec(),
        })
    }
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

    #[test]
    fn whole_line() {
        let mut p = LineParser::default();
        assert_eq!(p.feed(b"CONNECT 1234\n"), Ok(Some((1234, 13))));
    }

    #[test]
    fn payload_after_newline_is_not_consumed() {
        let mut p = LineParser::default();
        assert_eq!(p.feed(b"CONNECT 52\nhello"), Ok(Some((52, 11))));
    }

    #[test]
    fn split_across_reads() {
        let mut p = LineParser::default();
        assert_eq!(p.feed(b"CONN"), Ok(None));
        assert_eq!(p.feed(b"ECT 4"), Ok(None));
        assert_eq!(p.feed(b"2\r\nxy"), Ok(Some((42, 3))));
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
        ] {
            let mut p = LineParser::default();
            assert!(
                matches!(p.feed(line), Err(LineError::Malformed(_))),
                "{line:?}"
            );
        }
    }

    #[test]
    fn max_port() {
        let mut p = LineParser::default();
        assert_eq!(p.feed(b"CONNECT 4294967295\n"), Ok(Some((u32::MAX, 19))));
    }

    #[test]
    fn over_long_line_without_newline() {
        let mut p = LineParser::default();
        assert_eq!(p.feed(&[b'C'; 40]), Ok(None));
        assert_eq!(p.feed(&[b'C'; 40]), Err(LineError::TooLong));
    }

    #[test]
    fn over_long_line_with_newline() {
        let mut p = LineParser::default();
        let mut line = vec![b'9'; MAX_LINE_BYTES];
        line.push(b'\n');
        assert_eq!(p.feed(&line), Err(LineError::TooLong));
    }
}
