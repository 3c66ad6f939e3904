//! Chaos-test support: a stream checker that tells lost bytes from
//! duplicated ones and carries on, the per-run report, and a small random
//! generator for kill instants.
//!
//! A worker killed between a host socket call and the record that follows
//! it may drop or repeat one chunk of a raw host stream (DESIGN.md, "Commit
//! points"). [`StreamCheck`] verifies a pattern stream (see `pattern`) and,
//! at a mismatch, finds where in the stream the bytes received really
//! belong, within [`RESYNC_WINDOW_BYTES`] either way: ahead means bytes
//! were lost, behind means bytes came twice. Anything it cannot place is
//! corruption, which no kill may cause.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use crate::pattern::{self, reply_seed};

/// How far from the expected offset a resynchronisation looks.
pub const RESYNC_WINDOW_BYTES: u64 = 2 * 1024 * 1024;
/// Bytes that must match to place received bytes in the stream.
const RESYNC_PROBE_BYTES: usize = 64;

/// One discontinuity found in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// Bytes `[at, at + n)` of the stream never arrived.
    Lost { at: u64, n: u64 },
    /// Bytes `[at - n, at)` arrived a second time.
    Duplicated { at: u64, n: u64 },
}

/// A verifier of one pattern stream that survives gaps.
#[derive(Debug, Clone)]
pub struct StreamCheck {
    seed: u64,
    /// Stream offset the next byte should have.
    next: u64,
    /// Bytes received after a mismatch, not yet placed.
    unplaced: Vec<u8>,
    pub gaps: Vec<Gap>,
    /// Received bytes that belong nowhere near where they arrived.
    pub corrupt: bool,
    pub received: u64,
}

impl StreamCheck {
    pub fn new(seed: u64) -> Self {
        StreamCheck {
            seed,
            next: 0,
            unplaced: Vec::new(),
            gaps: Vec::new(),
            corrupt: false,
            received: 0,
        }
    }

    /// Stream offset of the next byte expected: once the stream ended,
    /// how much of it arrived (gaps accounted for).
    pub fn offset(&self) -> u64 {
        self.next
    }

    /// Moves the expected offset to `offset` (the caller recorded why).
    pub fn skip_to(&mut self, offset: u64) {
        self.next = offset;
    }

    pub fn lost(&self) -> u64 {
        self.gaps
            .iter()
            .map(|g| match g {
                Gap::Lost { n, .. } => *n,
                Gap::Duplicated { .. } => 0,
            })
            .sum()
    }

    pub fn duplicated(&self) -> u64 {
        self.gaps
            .iter()
            .map(|g| match g {
                Gap::Duplicated { n, .. } => *n,
                Gap::Lost { .. } => 0,
            })
            .sum()
    }

    /// Records that the stream began with a repeated `n`-byte chunk that
    /// the caller removed (a handshake line sent twice).
    pub fn note_repeated_prefix(&mut self, n: u64) {
        self.gaps.push(Gap::Duplicated { at: 0, n });
    }

    /// Checks the next received bytes.
    pub fn feed(&mut self, mut buf: &[u8]) {
        self.received += buf.len() as u64;
        if self.corrupt {
            return;
        }
        while !buf.is_empty() {
            if !self.unplaced.is_empty() {
                let take = (RESYNC_PROBE_BYTES - self.unplaced.len()).min(buf.len());
                self.unplaced.extend_from_slice(&buf[..take]);
                buf = &buf[take..];
                if self.unplaced.len() < RESYNC_PROBE_BYTES {
                    return;
                }
                let probe = std::mem::take(&mut self.unplaced);
                if !self.place(&probe) {
                    self.corrupt = true;
                    return;
                }
                continue;
            }
            match pattern::check(self.seed, self.next, buf) {
                None => {
                    self.next += buf.len() as u64;
                    return;
                }
                Some(bad) => {
                    self.next += bad as u64;
                    self.unplaced.extend_from_slice(&buf[bad..]);
                    let rest = &buf[bad..];
                    buf = &[];
                    if rest.len() >= RESYNC_PROBE_BYTES {
                        self.unplaced.clear();
                        if !self.place(rest) {
                            self.corrupt = true;
                        }
                        return;
                    }
                }
            }
        }
    }

    /// Finds where `bytes` (starting with a mismatch at `self.next`)
    /// belong, records the gap and checks the rest from there.
    fn place(&mut self, bytes: &[u8]) -> bool {
        let probe = &bytes[..RESYNC_PROBE_BYTES];
        let lo = self.next.saturating_sub(RESYNC_WINDOW_BYTES);
        let hi = self.next + RESYNC_WINDOW_BYTES;
        let mut window = vec![0u8; (hi - lo) as usize + RESYNC_PROBE_BYTES];
        pattern::fill(self.seed, lo, &mut window);
        let Some(pos) = window.windows(RESYNC_PROBE_BYTES).position(|w| w == probe) else {
            return false;
        };
        let at = lo + pos as u64;
        self.gaps.push(if at > self.next {
            Gap::Lost {
                at: self.next,
                n: at - self.next,
            }
        } else {
            Gap::Duplicated {
                at: self.next,
                n: self.next - at,
            }
        });
        self.next = at;
        self.received -= bytes.len() as u64;
        self.feed(bytes);
        true
    }
}

/// When the host side of a chaos connection stops sending.
#[derive(Debug, Clone, Copy)]
pub enum SendUntil<'a> {
    /// After this many bytes.
    Bytes(u64),
    /// Once the flag is set.
    Flag(&'a AtomicBool),
}

/// The host side of one guest `chaos` connection (`stream::Mode::Chaos`).
#[derive(Debug)]
pub struct HostChaos {
    /// The stream the guest sends; the host sent `reply_seed(seed)`.
    pub seed: u64,
    /// Bytes the host sent.
    pub sent: u64,
    /// The guest's stream as received.
    pub check: StreamCheck,
}

/// Bytes read ahead to tell which stream a guest sends.
const IDENTIFY_BYTES: usize = 8;
/// Bytes per host write.
const HOST_CHUNK_BYTES: usize = 64 * 1024;

/// Runs the host side of a guest `chaos` connection on `s`: tells from
/// its first bytes which of the streams `base..base + count` the guest
/// sends, sends `reply_seed` of it until `until`, half-closes, and reads
/// the guest's stream to EOF through a [`StreamCheck`].
///
/// `ok_line` is the hybrid `OK` line this host connection already read:
/// a kill between writing it and recording that may send it twice, so a
/// stream that begins with it again has it removed and counted as a
/// repeated chunk. `Ok(None)`: the connection ended before any byte (what
/// the first of a guest connect made twice would do; the callers fail on
/// it).
pub fn host_chaos(
    s: &UnixStream,
    base: u64,
    count: u64,
    ok_line: Option<&str>,
    until: SendUntil<'_>,
) -> io::Result<Option<HostChaos>> {
    let prefix = ok_line.map_or(&[][..], str::as_bytes);
    let mut head = Vec::new();
    let mut buf = vec![0u8; HOST_CHUNK_BYTES];
    let mut r = s;
    while head.len() < prefix.len() + IDENTIFY_BYTES {
        match r.read(&mut buf)? {
            0 if head.is_empty() => return Ok(None),
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let mut data = &head[..];
    let mut repeated_line = 0;
    if !prefix.is_empty() {
        if let Some(rest) = data.strip_prefix(prefix) {
            repeated_line = prefix.len() as u64;
            data = rest;
        }
    }
    let first: [u8; IDENTIFY_BYTES] = data
        .get(..IDENTIFY_BYTES)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the guest's stream ended after {} bytes", data.len()),
            )
        })?;
    let seed = pattern::identify(&first, base, count).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("first bytes {first:02x?} start none of streams {base:#x}+0..{count}"),
        )
    })?;
    let mut check = StreamCheck::new(seed);
    if repeated_line > 0 {
        check.note_repeated_prefix(repeated_line);
    }
    check.feed(data);
    thread::scope(|sc| {
        let writer = sc.spawn(|| send_reply(s, reply_seed(seed), until));
        let read = loop {
            match r.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => check.feed(&buf[..n]),
                Err(e) => break Err(e),
            }
        };
        if read.is_err() {
            // Unblock the writer.
            let _ = s.shutdown(Shutdown::Both);
        }
        let sent = writer
            .join()
            .map_err(|_| io::Error::other("host writer panicked"))??;
        read?;
        Ok(Some(HostChaos { seed, sent, check }))
    })
}

/// Writes stream `seed` until `until`, then half-closes.
fn send_reply(mut w: &UnixStream, seed: u64, until: SendUntil<'_>) -> io::Result<u64> {
    let mut buf = vec![0u8; HOST_CHUNK_BYTES];
    let mut sent = 0u64;
    loop {
        let n = match until {
            SendUntil::Bytes(total) => (total - sent).min(buf.len() as u64) as usize,
            SendUntil::Flag(stop) if stop.load(Ordering::Relaxed) => 0,
            SendUntil::Flag(_) => buf.len(),
        };
        if n == 0 {
            break;
        }
        pattern::fill(seed, sent, &mut buf[..n]);
        w.write_all(&buf[..n])?;
        sent += n as u64;
    }
    w.shutdown(Shutdown::Write)?;
    Ok(sent)
}

/// A small xorshift generator: kill instants differ from run to run (print
/// the seed, to replay a failure).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock.
    pub fn from_clock() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Rng(t | 1)
    }

    pub fn seed(&self) -> u64 {
        self.0
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// File, in a test's temporary directory, that every chaos run appends its
/// report to: test output is captured, and the test command prints this
/// file at the end.
pub const REPORTS_FILE: &str = "chaos-reports.txt";

/// Prints a chaos run's report line and appends it to `dir/REPORTS_FILE`.
pub fn publish_report(dir: &std::path::Path, test: &str, line: &str) {
    eprintln!("{test}: {line}");
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(REPORTS_FILE))
        .and_then(|mut f| writeln!(f, "{test}: {line}"));
    if let Err(e) = appended {
        eprintln!(
            "{test}: cannot append to {}: {e}",
            dir.join(REPORTS_FILE).display()
        );
    }
}

/// Percentiles of durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// What a chaos run saw.
#[derive(Debug, Default, Clone)]
pub struct ChaosReport {
    pub kills: u32,
    pub bytes_lost: u64,
    pub bytes_duplicated: u64,
    /// Discontinuities in raw host streams (each one chunk at most).
    pub gaps: u32,
    pub resets: u32,
    /// Short connections opened, used and closed during the run.
    pub connections_churned: u32,
    pub bytes_verified: u64,
    /// Kill to first packet served, per kill.
    pub recovery: Vec<Duration>,
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut r = self.recovery.clone();
        r.sort();
        write!(
            f,
            "kills {} | bytes lost {} | bytes duplicated {} | gaps {} | resets seen by the guest {} | \
             connections churned {} | bytes verified {} | recovery p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} measured)",
            self.kills,
            self.bytes_lost,
            self.bytes_duplicated,
            self.gaps,
            self.resets,
            self.connections_churned,
            self.bytes_verified,
            ms(percentile(&r, 0.5)),
            ms(percentile(&r, 0.99)),
            ms(r.last().copied().unwrap_or_default()),
            r.len()
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(seed: u64, from: u64, to: u64) -> Vec<u8> {
        let mut v = vec![0u8; (to - from) as usize];
        pattern::fill(seed, from, &mut v);
        v
    }

    #[test]
    fn intact_stream_in_odd_pieces() {
        let s = stream(5, 0, 100_000);
        let mut c = StreamCheck::new(5);
        for piece in s.chunks(777) {
            c.feed(piece);
        }
        assert_eq!(c.offset(), 100_000);
        assert!(c.gaps.is_empty() && !c.corrupt);
    }

    #[test]
    fn lost_and_duplicated_chunks_are_measured() {
        let mut s = stream(9, 0, 50_000);
        s.extend(stream(9, 70_000, 120_000)); // 20 000 lost
        s.extend(stream(9, 100_000, 150_000)); // 20 000 again
        let mut c = StreamCheck::new(9);
        for piece in s.chunks(30) {
            c.feed(piece);
        }
        assert_eq!(
            c.gaps,
            vec![
                Gap::Lost {
                    at: 50_000,
                    n: 20_000
                },
                Gap::Duplicated {
                    at: 120_000,
                    n: 20_000
                }
            ]
        );
        assert_eq!(
            (c.lost(), c.duplicated(), c.offset()),
            (20_000, 20_000, 150_000)
        );
        assert!(!c.corrupt);
    }

    #[test]
    fn guest_chaos_mode_against_the_host_side() {
        use crate::sock::Sock;
        use crate::stream::{run_mode, Mode};
        let (g, h) = UnixStream::pair().unwrap();
        let guest = thread::spawn(move || run_mode(&Sock::from(g), &Mode::Chaos { seed: 41 }));
        let host = host_chaos(&h, 40, 4, None, SendUntil::Bytes(300_000))
            .unwrap()
            .unwrap();
        let g = guest.join().unwrap();
        assert!(g.ok, "{g:?}");
        let gaps = g.gaps.unwrap();
        assert_eq!((gaps.seed, gaps.offset, gaps.gaps), (41, 300_000, 0));
        assert_eq!((host.seed, host.sent), (41, 300_000));
        assert_eq!(host.check.offset(), g.sent);
        assert!(host.check.gaps.is_empty() && !host.check.corrupt);
    }

    #[test]
    fn host_side_removes_a_repeated_ok_line() {
        let (g, h) = UnixStream::pair().unwrap();
        let mut bytes = b"OK 1025\n".to_vec();
        bytes.extend(stream(7, 0, 5000));
        (&g).write_all(&bytes).unwrap();
        g.shutdown(Shutdown::Write).unwrap();
        let host = host_chaos(&h, 7, 1, Some("OK 1025\n"), SendUntil::Bytes(10))
            .unwrap()
            .unwrap();
        assert_eq!((host.check.duplicated(), host.check.offset()), (8, 5000));
        let mut reply = Vec::new();
        (&g).read_to_end(&mut reply).unwrap();
        assert_eq!(reply, stream(reply_seed(7), 0, 10));
    }

    #[test]
    fn host_side_of_an_unused_connection() {
        let (g, h) = UnixStream::pair().unwrap();
        drop(g);
        assert!(host_chaos(&h, 7, 1, None, SendUntil::Bytes(10))
            .unwrap()
            .is_none());
    }

    #[test]
    fn foreign_bytes_are_corruption() {
        let mut s = stream(1, 0, 1000);
        s.extend(stream(2, 0, 1000));
        let mut c = StreamCheck::new(1);
        c.feed(&s);
        assert!(c.corrupt);
    }
}
