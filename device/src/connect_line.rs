//! The handshake line a host client sends first: `CONNECT <port>\n`
//! (Firecracker's hybrid-vsock convention), `CONNECT <port> resumable\n`
//! (a resumable session), or `RESUME <token> <received>\n` (taking a
//! session up again; see `docs/resumable-sessions.md`).
//!
//! The device reads the line without consuming it (`MSG_PEEK`) until it is
//! complete, then takes exactly its bytes: bytes after the newline, even
//! from the same write, stay in the socket as stream data, and a partial
//! line stays there too, so a process that dies mid-line loses nothing.
//! [`find_line`] tells from the bytes peeked whether the line is complete.

use thiserror::Error;

use crate::session::Token;

/// Longest line accepted, newline included. `CONNECT 4294967295\n` is 19
/// bytes and the longest `RESUME` line 61.
pub const MAX_LINE_BYTES: usize = 64;

/// What a host client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// `CONNECT <port>`, or with `resumable`, a resumable session.
    Connect { port: u32, resumable: bool },
    /// `RESUME <token> <received>`.
    Resume { token: Token, received: u64 },
}

/// Why a handshake line was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LineError {
    /// No newline within [`MAX_LINE_BYTES`].
    #[error("handshake line longer than {MAX_LINE_BYTES} bytes")]
    TooLong,
    /// The line is none of the three.
    #[error("malformed handshake line {0:?} (expected \"CONNECT <port>\", \"CONNECT <port> resumable\" or \"RESUME <token> <received>\")")]
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

/// What a complete line (newline included, as [`find_line`] delimits it)
/// asks for.
pub fn parse(line: &[u8]) -> Result<Line, LineError> {
    parse_line(line.strip_suffix(b"\n").unwrap_or(line))
}

/// Parses a line without its newline (a trailing `\r` is allowed).
fn parse_line(line: &[u8]) -> Result<Line, LineError> {
    let malformed = || LineError::Malformed(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| malformed())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let mut words = text.split(' ');
    let parsed = match (words.next(), words.next(), words.next(), words.next()) {
        (Some("CONNECT"), Some(port), None, None) => decimal(port).map(|port| Line::Connect {
            port,
            resumable: false,
        }),
        (Some("CONNECT"), Some(port), Some("resumable"), None) => {
            decimal(port).map(|port| Line::Connect {
                port,
                resumable: true,
            })
        }
        (Some("RESUME"), Some(token), Some(received), None) => {
            match (Token::parse(token), decimal(received)) {
                (Some(token), Some(received)) => Some(Line::Resume { token, received }),
                _ => None,
            }
        }
        _ => None,
    };
    parsed.ok_or_else(malformed)
}

/// A decimal number: digits only, no sign, within `T`.
fn decimal<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(bytes: &[u8]) -> Result<Option<(u32, usize)>, LineError> {
        Ok(match find_line(bytes)? {
            Some(n) => match parse(&bytes[..n])? {
                Line::Connect {
                    port,
                    resumable: false,
                } => Some((port, n)),
                other => panic!("not a raw CONNECT: {other:?}"),
            },
            None => None,
        })
    }

    #[test]
    fn resumable_lines() {
        assert_eq!(
            parse(b"CONNECT 52 resumable\n"),
            Ok(Line::Connect {
                port: 52,
                resumable: true
            })
        );
        let token = "00112233445566778899aabbccddeeff";
        let line = format!("RESUME {token} 18446744073709551615\r\n");
        assert!(line.len() <= MAX_LINE_BYTES);
        assert_eq!(find_line(line.as_bytes()), Ok(Some(line.len())));
        assert_eq!(
            parse(line.as_bytes()),
            Ok(Line::Resume {
                token: Token::parse(token).unwrap(),
                received: u64::MAX
            })
        );
        for bad in [
            "CONNECT 52 resumable \n".to_string(),
            "CONNECT 52 Resumable\n".to_string(),
            "CONNECT 52 raw\n".to_string(),
            format!("RESUME {token}\n"),
            format!("RESUME {token} -1\n"),
            format!("RESUME {token} 18446744073709551616\n"),
            format!("RESUME {} 5\n", &token[1..]),
            format!("RESUME {token} 5 6\n"),
            "RESUME\n".to_string(),
        ] {
            assert!(
                matches!(parse(bad.as_bytes()), Err(LineError::Malformed(_))),
                "{bad:?}"
            );
        }
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
