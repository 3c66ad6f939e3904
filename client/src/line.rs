//! The request and reply lines that open a connection, before any stream
//! byte or frame: `CONNECT`, `RESUME`, and vsockd's `OK` / `ERR` answers.
//!
//! Replies are read one byte at a time, so nothing after the newline (the
//! first stream bytes or frames) is consumed.

use std::io::{self, Read};

use crate::error::ClientError;
use crate::token::Token;

/// Longest line either side sends, the newline included.
pub const MAX_LINE_BYTES: usize = 64;

/// `CONNECT <port>\n`: a raw stream.
pub fn raw_connect_request(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// `CONNECT <port> resumable\n`: a new resumable session.
pub fn session_connect_request(port: u32) -> String {
    format!("CONNECT {port} resumable\n")
}

/// `RESUME <token> <received>\n`: take a session over from offset
/// `received` of the guest's stream.
pub fn resume_request(token: &Token, received: u64) -> String {
    format!("RESUME {token} {received}\n")
}

/// Reads one reply line (without its `\n` and an optional `\r`). `request`
/// names the request in errors. When the stream has a read timeout and it
/// expires, `keep_waiting` decides whether to go on (`Ok`) or give up.
///
/// EOF before the newline is [`ClientError::NoReply`].
pub fn read_line(
    stream: &mut impl Read,
    request: &str,
    mut keep_waiting: impl FnMut() -> Result<(), ClientError>,
) -> Result<String, ClientError> {
    let mut line = Vec::with_capacity(MAX_LINE_BYTES);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(ClientError::NoReply {
                    request: request.to_owned(),
                })
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() >= MAX_LINE_BYTES {
                    return Err(bad_reply(request, &line, "line too long"));
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                keep_waiting()?
            }
            Err(source) => {
                return Err(ClientError::Io {
                    action: "reading vsockd's reply",
                    source,
                })
            }
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if !line.is_ascii() {
        return Err(bad_reply(request, &line, "not ASCII"));
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// `OK <host-port>`, the reply to a raw `CONNECT`.
pub fn parse_raw_connect_reply(request: &str, line: &str) -> Result<u32, ClientError> {
    parse_reply(request, line, |fields| match fields {
        [port] => parse_u32(port),
        _ => Err("expected `OK <host-port>`"),
    })
}

/// `OK <host-port> <token>`, the reply to `CONNECT <port> resumable`.
pub fn parse_session_connect_reply(request: &str, line: &str) -> Result<(u32, Token), ClientError> {
    parse_reply(request, line, |fields| match fields {
        [port, token] => {
            let port = parse_u32(port)?;
            let token = token.parse::<Token>().map_err(|_| "malformed token")?;
            Ok((port, token))
        }
        _ => Err("expected `OK <host-port> <token>`"),
    })
}

/// `OK <received>` or `OK <received> END`, the reply to `RESUME`: the h2g
/// offset vsockd has, and whether that includes the `END`.
pub fn parse_resume_reply(request: &str, line: &str) -> Result<(u64, bool), ClientError> {
    parse_reply(request, line, |fields| match fields {
        [received] => Ok((parse_u64(received)?, false)),
        ["0", "END"] => Err("an END at offset -1"),
        [received, "END"] => Ok((parse_u64(received)?, true)),
        _ => Err("expected `OK <received>` or `OK <received> END`"),
    })
}

/// `ERR <reason>` becomes [`ClientError::Refused`]; `OK <fields>` goes to
/// `parse_ok`; anything else is a bad reply.
fn parse_reply<T>(
    request: &str,
    line: &str,
    parse_ok: impl FnOnce(&[&str]) -> Result<T, &'static str>,
) -> Result<T, ClientError> {
    let request = request.trim_end();
    if line == "ERR" || line.starts_with("ERR ") {
        return Err(ClientError::Refused {
            request: request.to_owned(),
            reason: line[3..].trim().to_owned(),
        });
    }
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.split_first() {
        Some((&"OK", rest)) => {
            parse_ok(rest).map_err(|problem| bad_reply(request, line.as_bytes(), problem))
        }
        _ => Err(bad_reply(request, line.as_bytes(), "expected OK or ERR")),
    }
}

fn bad_reply(request: &str, line: &[u8], problem: &'static str) -> ClientError {
    ClientError::BadReply {
        request: request.trim_end().to_owned(),
        reply: String::from_utf8_lossy(line).into_owned(),
        problem,
    }
}

/// Decimal digits only: no sign, no spaces.
fn parse_u64(text: &str) -> Result<u64, &'static str> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a decimal number");
    }
    text.parse().map_err(|_| "number out of range")
}

fn parse_u32(text: &str) -> Result<u32, &'static str> {
    u32::try_from(parse_u64(text)?).map_err(|_| "number out of range")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never_wait() -> Result<(), ClientError> {
        panic!("no timeout expected")
    }

    #[test]
    fn requests_are_formatted_as_the_doc_says() {
        assert_eq!(raw_connect_request(1234), "CONNECT 1234\n");
        assert_eq!(session_connect_request(5), "CONNECT 5 resumable\n");
        let token = Token([0xab; 16]);
        assert_eq!(
            resume_request(&token, 77),
            format!("RESUME {} 77\n", "ab".repeat(16))
        );
        assert!(resume_request(&token, u64::MAX).len() <= MAX_LINE_BYTES);
    }

    #[test]
    fn reads_one_line_and_nothing_after_it() {
        let mut input: &[u8] = b"OK 1024\r\nstream bytes";
        let line = read_line(&mut input, "CONNECT 1", never_wait).unwrap();
        assert_eq!(line, "OK 1024");
        assert_eq!(input, b"stream bytes");
    }

    #[test]
    fn eof_before_the_newline_is_no_reply() {
        for input in [&b""[..], b"OK 12"] {
            let mut input = input;
            let err = read_line(&mut input, "CONNECT 1", never_wait).unwrap_err();
            assert!(matches!(err, ClientError::NoReply { .. }), "{err}");
        }
    }

    #[test]
    fn an_overlong_line_is_refused() {
        let long = format!("OK {}\n", "1".repeat(80));
        let err = read_line(&mut long.as_bytes(), "CONNECT 1", never_wait).unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
    }

    #[test]
    fn parses_the_three_ok_replies() {
        assert_eq!(
            parse_raw_connect_reply("CONNECT 1", "OK 1024").unwrap(),
            1024
        );
        let hex = "0123456789abcdef0123456789abcdef";
        let (port, token) =
            parse_session_connect_reply("CONNECT 1 resumable", &format!("OK 99 {hex}")).unwrap();
        assert_eq!(port, 99);
        assert_eq!(token.to_string(), hex);
        assert_eq!(
            parse_resume_reply("RESUME", "OK 18446744073709551615")
                .unwrap()
                .0,
            u64::MAX
        );
    }

    #[test]
    fn err_lines_become_refusals_with_their_reason() {
        let err = parse_resume_reply("RESUME x 0\n", "ERR no such session").unwrap_err();
        match &err {
            ClientError::Refused { request, reason } => {
                assert_eq!(request, "RESUME x 0");
                assert_eq!(reason, "no such session");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(matches!(
            parse_raw_connect_reply("CONNECT 1", "ERR"),
            Err(ClientError::Refused { .. })
        ));
    }

    #[test]
    fn malformed_replies_are_bad_replies() {
        for line in [
            "", "OK", "OK +5", "OK -5", "OK 5 6", "OK x", "KO 5", "OK  5", "ERRx",
        ] {
            let err = parse_raw_connect_reply("CONNECT 1", line).unwrap_err();
            assert!(
                matches!(err, ClientError::BadReply { .. }),
                "{line:?}: {err}"
            );
        }
        assert!(parse_raw_connect_reply("CONNECT 1", "OK 4294967296").is_err());
        assert!(parse_session_connect_reply("CONNECT 1 resumable", "OK 1 abc").is_err());
        assert!(parse_session_connect_reply("CONNECT 1 resumable", "OK 1").is_err());
        assert!(parse_resume_reply("RESUME", "OK 18446744073709551616").is_err());
        assert_eq!(parse_resume_reply("RESUME", "OK 8 END").unwrap(), (8, true));
        assert!(parse_resume_reply("RESUME", "OK 0 END").is_err());
        assert!(parse_resume_reply("RESUME", "OK 8 end").is_err());
    }
}
