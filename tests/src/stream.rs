//! Verified stream exchanges over a connected socket, the same on the
//! host and in the guest, and the one-line results that report them.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use crate::chaos::StreamCheck;
use crate::errno::io_error_name;
use crate::pattern::{reply_seed, Generator, Verifier};
use crate::sock::Sock;

const CHUNK: usize = 64 * 1024;

/// What one side of a connection does with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Send BYTES of stream SEED, shut down writing, wait for the peer to
    /// close (EOF or reset, reported as `end=`).
    SendV { bytes: u64, seed: u64 },
    /// Receive and verify exactly BYTES of stream SEED, then EOF.
    RecvV { bytes: u64, seed: u64 },
    /// Send BYTES of stream SEED while receiving BYTES of stream
    /// `reply_seed(SEED)`; each side shuts down writing when done.
    BidiV { bytes: u64, seed: u64 },
    /// Send back whatever arrives until EOF, then shut down writing.
    Echo,
    /// Send BYTES of stream SEED, shut down writing, then receive and
    /// verify BYTES of stream `reply_seed(SEED)` until EOF.
    HalfcloseWriter { bytes: u64, seed: u64 },
    /// Receive and verify BYTES of stream SEED until EOF, then send BYTES
    /// of stream `reply_seed(SEED)` and shut down writing.
    HalfcloseReader { bytes: u64, seed: u64 },
    /// The connection attempt is expected to fail (connect only).
    ExpectError,
    /// Send TEXT as one line and read one line from the peer.
    Message { text: String },
    /// Send stream SEED until the peer half-closes, while receiving stream
    /// `reply_seed(SEED)` through a gap-tolerant checker; then shut down
    /// writing. For chaos tests, where a killed backend worker may drop or
    /// repeat one chunk of a raw host stream: the result reports the gaps
    /// and how far into the stream the bytes received reach (`offset=`).
    Chaos { seed: u64 },
}

impl Mode {
    /// Parses a mode from its words, e.g. `["sendv", "1024", "7"]`.
    pub fn parse(words: &[String]) -> Result<Mode, String> {
        let name = words.first().ok_or("missing MODE")?;
        let num = |i: usize| -> Result<u64, String> {
            let w = words
                .get(i)
                .ok_or_else(|| format!("{name}: missing argument {i}"))?;
            parse_u64(w).ok_or_else(|| format!("{name}: bad number {w:?}"))
        };
        let two = |f: fn(u64, u64) -> Mode| -> Result<Mode, String> {
            let m = f(num(1)?, num(2)?);
            if words.len() > 3 {
                return Err(format!("{name}: too many arguments"));
            }
            Ok(m)
        };
        let m = match name.as_str() {
            "sendv" => two(|bytes, seed| Mode::SendV { bytes, seed })?,
            "recvv" => two(|bytes, seed| Mode::RecvV { bytes, seed })?,
            "bidiv" => two(|bytes, seed| Mode::BidiV { bytes, seed })?,
            "halfclose-writer" => two(|bytes, seed| Mode::HalfcloseWriter { bytes, seed })?,
            "halfclose-reader" => two(|bytes, seed| Mode::HalfcloseReader { bytes, seed })?,
            "chaos" => {
                let m = Mode::Chaos { seed: num(1)? };
                if words.len() > 2 {
                    return Err(format!("{name}: too many arguments"));
                }
                m
            }
            "echo" => Mode::Echo,
            "expect-error" => Mode::ExpectError,
            "message" => Mode::Message {
                text: words[1..].join(" "),
            },
            other => return Err(format!("unknown MODE {other:?}")),
        };
        Ok(m)
    }

    /// The same mode for the i-th of several parallel connections: every
    /// connection carries its own seed, `SEED + i`.
    pub fn for_conn(&self, i: u64) -> Mode {
        let s = |seed: u64| seed.wrapping_add(i);
        match *self {
            Mode::SendV { bytes, seed } => Mode::SendV {
                bytes,
                seed: s(seed),
            },
            Mode::RecvV { bytes, seed } => Mode::RecvV {
                bytes,
                seed: s(seed),
            },
            Mode::BidiV { bytes, seed } => Mode::BidiV {
                bytes,
                seed: s(seed),
            },
            Mode::HalfcloseWriter { bytes, seed } => Mode::HalfcloseWriter {
                bytes,
                seed: s(seed),
            },
            Mode::HalfcloseReader { bytes, seed } => Mode::HalfcloseReader {
                bytes,
                seed: s(seed),
            },
            Mode::Chaos { seed } => Mode::Chaos { seed: s(seed) },
            ref m => m.clone(),
        }
    }
}

/// Parses decimal, `0x` hex, or a size with a K/M/G suffix (binary).
pub fn parse_u64(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x") {
        return u64::from_str_radix(h, 16).ok();
    }
    let (num, mul) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1u64 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1u64 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

/// A failed operation: which one and its errno name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub op: String,
    pub errno: String,
}

impl OpError {
    pub fn new(op: &str, e: &io::Error) -> OpError {
        OpError {
            op: op.to_string(),
            errno: io_error_name(e),
        }
    }
}

/// What happened on one connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub sent: u64,
    pub received: u64,
    pub first_bad: Option<u64>,
    pub error: Option<OpError>,
    pub ok: bool,
    /// The text received in `message` mode.
    pub message: Option<String>,
    /// How the peer ended the connection after this side finished
    /// sending (`sendv`): "eof" or "reset".
    pub end: Option<&'static str>,
    /// What a gap-tolerant receive saw (`chaos`).
    pub gaps: Option<GapReport>,
}

/// The discontinuities a `chaos` receiver found in its stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GapReport {
    /// The stream this side sent; it received `reply_seed(seed)`.
    pub seed: u64,
    /// Stream offset the bytes received reach, gaps accounted for.
    pub offset: u64,
    pub gaps: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub corrupt: bool,
}

impl GapReport {
    pub fn of(c: &StreamCheck, seed: u64) -> GapReport {
        GapReport {
            seed,
            offset: c.offset(),
            gaps: c.gaps.len() as u64,
            lost: c.lost(),
            duplicated: c.duplicated(),
            corrupt: c.corrupt,
        }
    }
}

impl Outcome {
    /// The `RESULT ...` line for connection `conn`.
    pub fn result_line(&self, conn: u64) -> String {
        let gaps = self.gaps.map_or(String::new(), |g| {
            format!(
                " seed={} offset={} gaps={} lost={} dup={} corrupt={}",
                g.seed,
                g.offset,
                g.gaps,
                g.lost,
                g.duplicated,
                if g.corrupt { "yes" } else { "no" }
            )
        });
        format!(
            "RESULT conn={conn} sent={} received={} ok={} first_bad={} errno={} op={} end={}{gaps}",
            self.sent,
            self.received,
            if self.ok { "yes" } else { "no" },
            self.first_bad.map_or(-1, |b| b as i64),
            self.error.as_ref().map_or("-", |e| e.errno.as_str()),
            self.error.as_ref().map_or("-", |e| e.op.as_str()),
            self.end.unwrap_or("-"),
        )
    }

    /// The `ERROR ...` line for connection `conn`, if it failed with an
    /// error.
    pub fn error_line(&self, conn: u64) -> Option<String> {
        self.error.as_ref().map(|e| {
            format!(
                "ERROR conn={conn} errno={} op={} sent={} received={}",
                e.errno, e.op, self.sent, self.received
            )
        })
    }
}

/// Writes `bytes` bytes of stream `seed`. Returns how many were written
/// and the error that stopped it early, if any.
pub fn send_pattern(mut w: &Sock, seed: u64, bytes: u64) -> (u64, Option<io::Error>) {
    let mut gen = Generator::new(seed);
    let mut buf = vec![0u8; CHUNK];
    while gen.offset() < bytes {
        let n = ((bytes - gen.offset()) as usize).min(CHUNK);
        let start = gen.offset();
        gen.next_into(&mut buf[..n]);
        let mut done = 0;
        while done < n {
            match w.write(&buf[done..n]) {
                Ok(0) => {
                    return (
                        start + done as u64,
                        Some(io::Error::from(io::ErrorKind::WriteZero)),
                    )
                }
                Ok(k) => done += k,
                Err(e) => return (start + done as u64, Some(e)),
            }
        }
    }
    (gen.offset(), None)
}

/// Writes stream `seed` until `stop` is set. Returns how many bytes were
/// written and the error that stopped it early, if any.
pub fn send_pattern_until(mut w: &Sock, seed: u64, stop: &AtomicBool) -> (u64, Option<io::Error>) {
    let mut gen = Generator::new(seed);
    let mut buf = vec![0u8; CHUNK];
    while !stop.load(Ordering::Relaxed) {
        let start = gen.offset();
        gen.next_into(&mut buf);
        if let Err(e) = w.write_all(&buf) {
            // write_all does not say how much of the chunk went out.
            return (start, Some(e));
        }
    }
    (gen.offset(), None)
}

/// Reads until EOF through a gap-tolerant checker. Returns the error that
/// stopped it before EOF, if any.
pub fn recv_check(mut r: &Sock, c: &mut StreamCheck) -> Option<io::Error> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => c.feed(&buf[..n]),
            Err(e) => return Some(e),
        }
    }
}

/// Reads until EOF (or until `limit` bytes when given), feeding the
/// verifier. Returns the error that stopped it before EOF, if any.
pub fn recv_verify(mut r: &Sock, v: &mut Verifier, limit: Option<u64>) -> Option<io::Error> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let want = match limit {
            Some(l) if v.received() >= l => return None,
            Some(l) => ((l - v.received()) as usize).min(CHUNK),
            None => CHUNK,
        };
        match r.read(&mut buf[..want]) {
            Ok(0) => return None,
            Ok(n) => v.feed(&buf[..n]),
            Err(e) => return Some(e),
        }
    }
}

/// Reads until EOF, counting bytes. Returns the count and the error that
/// stopped it early, if any.
pub fn drain(mut r: &Sock) -> (u64, Option<io::Error>) {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (total, None),
            Ok(n) => total += n as u64,
            Err(e) => return (total, Some(e)),
        }
    }
}

/// Whether an error means the peer reset or dropped the connection.
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNRESET) | Some(libc::ENOTCONN) | Some(libc::EPIPE)
    )
}

fn verify_outcome(o: &mut Outcome, v: &Verifier) {
    o.received = v.received();
    o.first_bad = v.first_bad();
}

/// Sends with `send` on a clone of `sock`, in a thread that then shuts
/// down writing, while `recv` reads `sock`; records in `o` the bytes sent
/// and the first error (the read's before the write's). A failed read
/// shuts the socket down both ways, to unblock the writer.
fn duplex<S, R>(sock: &Sock, o: &mut Outcome, send: S, recv: R)
where
    S: FnOnce(&Sock) -> (u64, Option<io::Error>) + Send + 'static,
    R: FnOnce() -> Option<io::Error>,
{
    let writer = match sock.try_clone() {
        Ok(w) => w,
        Err(e) => {
            o.error = Some(OpError::new("dup", &e));
            return;
        }
    };
    let t = thread::spawn(move || {
        let (sent, err) = send(&writer);
        if let Some(e) = err {
            return (sent, Some(OpError::new("write", &e)));
        }
        match writer.shutdown(Shutdown::Write) {
            Ok(()) => (sent, None),
            Err(e) => (sent, Some(OpError::new("shutdown", &e))),
        }
    });
    if let Some(e) = recv() {
        o.error = Some(OpError::new("read", &e));
        let _ = sock.shutdown(Shutdown::Both);
    }
    let (sent, werr) = t.join().unwrap_or((
        0,
        Some(OpError {
            op: "write".into(),
            errno: "PANIC".into(),
        }),
    ));
    o.sent = sent;
    if o.error.is_none() {
        o.error = werr;
    }
}

/// Runs `mode` on a connected socket and reports what happened.
pub fn run_mode(sock: &Sock, mode: &Mode) -> Outcome {
    let mut o = Outcome::default();
    match *mode {
        Mode::SendV { bytes, seed } => {
            let (sent, err) = send_pattern(sock, seed, bytes);
            o.sent = sent;
            if let Some(e) = err {
                o.error = Some(OpError::new("write", &e));
                return o;
            }
            if let Err(e) = sock.shutdown(Shutdown::Write) {
                o.error = Some(OpError::new("shutdown", &e));
                return o;
            }
            // Every byte is written: the receiver verifies them. Whether
            // the peer then closes with EOF or with a reset is reported.
            let (got, err) = drain(sock);
            o.received = got;
            match err {
                None => o.end = Some("eof"),
                Some(e) if is_reset(&e) => o.end = Some("reset"),
                Some(e) => {
                    o.error = Some(OpError::new("read", &e));
                    return o;
                }
            }
            o.ok = o.sent == bytes && o.received == 0;
        }
        Mode::RecvV { bytes, seed } => {
            let mut v = Verifier::new(seed);
            let err = recv_verify(sock, &mut v, None);
            verify_outcome(&mut o, &v);
            if let Some(e) = err {
                o.error = Some(OpError::new("read", &e));
                return o;
            }
            o.ok = v.ok(bytes);
        }
        Mode::BidiV { bytes, seed } => {
            let mut v = Verifier::new(reply_seed(seed));
            let send = move |w: &Sock| send_pattern(w, seed, bytes);
            duplex(sock, &mut o, send, || recv_verify(sock, &mut v, None));
            verify_outcome(&mut o, &v);
            o.ok = o.error.is_none() && o.sent == bytes && v.ok(bytes);
        }
        Mode::Echo => {
            let mut buf = vec![0u8; CHUNK];
            let (mut r, mut w) = (sock, sock);
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        o.received += n as u64;
                        if let Err(e) = w.write_all(&buf[..n]) {
                            o.error = Some(OpError::new("write", &e));
                            return o;
                        }
                        o.sent += n as u64;
                    }
                    Err(e) => {
                        o.error = Some(OpError::new("read", &e));
                        return o;
                    }
                }
            }
            if let Err(e) = sock.shutdown(Shutdown::Write) {
                o.error = Some(OpError::new("shutdown", &e));
                return o;
            }
            o.ok = true;
        }
        Mode::HalfcloseWriter { bytes, seed } => {
            let (sent, err) = send_pattern(sock, seed, bytes);
            o.sent = sent;
            if let Some(e) = err {
                o.error = Some(OpError::new("write", &e));
                return o;
            }
            if let Err(e) = sock.shutdown(Shutdown::Write) {
                o.error = Some(OpError::new("shutdown", &e));
                return o;
            }
            let mut v = Verifier::new(reply_seed(seed));
            let err = recv_verify(sock, &mut v, None);
            verify_outcome(&mut o, &v);
            if let Some(e) = err {
                o.error = Some(OpError::new("read", &e));
                return o;
            }
            o.ok = o.sent == bytes && v.ok(bytes);
        }
        Mode::HalfcloseReader { bytes, seed } => {
            let mut v = Verifier::new(seed);
            let err = recv_verify(sock, &mut v, None);
            verify_outcome(&mut o, &v);
            if let Some(e) = err {
                o.error = Some(OpError::new("read-until-eof", &e));
                return o;
            }
            if !v.ok(bytes) {
                return o;
            }
            let (sent, err) = send_pattern(sock, reply_seed(seed), bytes);
            o.sent = sent;
            if let Some(e) = err {
                o.error = Some(OpError::new("write-after-eof", &e));
                return o;
            }
            if let Err(e) = sock.shutdown(Shutdown::Write) {
                o.error = Some(OpError::new("shutdown", &e));
                return o;
            }
            o.ok = o.sent == bytes;
        }
        Mode::Chaos { seed } => {
            let stop = Arc::new(AtomicBool::new(false));
            let stop_writer = stop.clone();
            let send = move |w: &Sock| send_pattern_until(w, seed, &stop_writer);
            let mut c = StreamCheck::new(reply_seed(seed));
            duplex(sock, &mut o, send, || {
                let err = recv_check(sock, &mut c);
                stop.store(true, Ordering::Relaxed);
                err
            });
            o.received = c.received;
            o.gaps = Some(GapReport::of(&c, seed));
            o.ok = o.error.is_none() && !c.corrupt;
        }
        Mode::ExpectError => {
            // Connected although an error was expected.
            o.ok = false;
        }
        Mode::Message { ref text } => {
            let mut w = sock;
            if let Err(e) = w.write_all(format!("{text}\n").as_bytes()) {
                o.error = Some(OpError::new("write", &e));
                return o;
            }
            o.sent = text.len() as u64 + 1;
            let mut got = Vec::new();
            let mut b = [0u8; 1];
            let mut r = sock;
            loop {
                match r.read(&mut b) {
                    Ok(0) => break,
                    Ok(_) if b[0] == b'\n' => break,
                    Ok(_) => got.push(b[0]),
                    Err(e) => {
                        o.error = Some(OpError::new("read", &e));
                        return o;
                    }
                }
            }
            o.received = got.len() as u64;
            o.message = Some(String::from_utf8_lossy(&got).into_owned());
            o.ok = true;
        }
    }
    o
}

/// One `RESULT` (or `ERROR`) line parsed back into its fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResultLine {
    pub kind: String,
    pub fields: BTreeMap<String, String>,
}

impl ResultLine {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.fields.get(k).map(|s| s.as_str())
    }

    pub fn num(&self, k: &str) -> Option<i64> {
        self.get(k)?.parse().ok()
    }

    pub fn ok(&self) -> bool {
        self.get("ok") == Some("yes")
    }
}

/// All `RESULT` and `ERROR` lines of some output, in order.
pub fn parse_results(output: &str) -> Vec<ResultLine> {
    output
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let kind = words.next()?;
            if kind != "RESULT" && kind != "ERROR" {
                return None;
            }
            let fields = words
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Some(ResultLine {
                kind: kind.to_string(),
                fields,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Sock, Sock) {
        let (a, b) = UnixStream::pair().unwrap();
        (Sock::from(a), Sock::from(b))
    }

    fn both(ma: Mode, mb: Mode) -> (Outcome, Outcome) {
        let (a, b) = pair();
        let t = thread::spawn(move || run_mode(&b, &mb));
        let oa = run_mode(&a, &ma);
        (oa, t.join().unwrap())
    }

    #[test]
    fn sendv_recvv() {
        let (a, b) = both(
            Mode::SendV {
                bytes: 300_001,
                seed: 5,
            },
            Mode::RecvV {
                bytes: 300_001,
                seed: 5,
            },
        );
        assert!(a.ok && b.ok, "{a:?} {b:?}");
        let (_, b) = both(
            Mode::SendV {
                bytes: 1000,
                seed: 5,
            },
            Mode::RecvV {
                bytes: 1000,
                seed: 6,
            },
        );
        assert!(!b.ok);
        assert_eq!(b.first_bad, Some(0));
    }

    #[test]
    fn bidiv_and_halfclose() {
        let (a, b) = both(
            Mode::BidiV {
                bytes: 500_000,
                seed: 1,
            },
            Mode::BidiV {
                bytes: 500_000,
                seed: reply_seed(1),
            },
        );
        assert!(a.ok && b.ok, "{a:?} {b:?}");
        let (a, b) = both(
            Mode::HalfcloseWriter {
                bytes: 100_000,
                seed: 3,
            },
            Mode::HalfcloseReader {
                bytes: 100_000,
                seed: 3,
            },
        );
        assert!(a.ok && b.ok, "{a:?} {b:?}");
    }

    #[test]
    fn result_lines_round_trip() {
        let o = Outcome {
            sent: 10,
            received: 9,
            first_bad: Some(4),
            error: Some(OpError {
                op: "read".into(),
                errno: "ECONNRESET".into(),
            }),
            ok: false,
            message: None,
            end: None,
            gaps: Some(GapReport {
                seed: 77,
                offset: 5000,
                gaps: 2,
                lost: 300,
                duplicated: 40,
                corrupt: false,
            }),
        };
        let text = format!("junk\n{}\n{}\n", o.result_line(2), o.error_line(2).unwrap());
        let r = parse_results(&text);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].num("conn"), Some(2));
        assert_eq!(r[0].num("first_bad"), Some(4));
        assert_eq!(r[0].get("errno"), Some("ECONNRESET"));
        let gaps = ["seed", "offset", "gaps", "lost", "dup"].map(|k| r[0].num(k));
        assert_eq!(gaps, [77, 5000, 2, 300, 40].map(Some));
        assert_eq!(r[0].get("corrupt"), Some("no"));
        assert!(!r[0].ok());
        assert_eq!(r[1].kind, "ERROR");
    }

    #[test]
    fn parse_sizes() {
        assert_eq!(parse_u64("64M"), Some(64 << 20));
        assert_eq!(parse_u64("0x10"), Some(16));
        assert_eq!(parse_u64("12"), Some(12));
        assert_eq!(parse_u64("x"), None);
    }
}
