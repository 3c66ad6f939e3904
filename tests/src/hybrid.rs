//! Host side of the hybrid vsock convention: `CONNECT <port>\n` through
//! the backend's Unix socket, and listeners on `<uds>_<port>` for
//! connections the guest opens to the host.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sock::Sock;
use crate::stream::{run_mode, Mode, Outcome};

/// Default time allowed for a handshake or an accept.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the backend's `OK <n>\n` reply byte by byte, so that no stream
/// byte after it is consumed. Returns `n`.
pub fn read_ok_line(s: &mut UnixStream) -> io::Result<u32> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!(
                        "backend closed the connection during the handshake after {:?}",
                        String::from_utf8_lossy(&line)
                    ),
                ))
            }
            Ok(_) => {
                if b[0] == b'\n' {
                    break;
                }
                line.push(b[0]);
                if line.len() > 64 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "handshake reply too long: {:?}",
                            String::from_utf8_lossy(&line)
                        ),
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let text = String::from_utf8_lossy(&line);
    text.strip_prefix("OK ")
        .and_then(|n| n.trim().parse::<u32>().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected handshake reply {text:?}"),
            )
        })
}

/// Connects to the backend's Unix socket `uds` and asks for guest port
/// `port`. Returns the stream, positioned just after the `OK` line, and
/// the number the backend replied with.
pub fn hybrid_connect(uds: impl AsRef<Path>, port: u32) -> io::Result<(UnixStream, u32)> {
    hybrid_connect_timeout(uds, port, DEFAULT_TIMEOUT)
}

/// `hybrid_connect` with a time limit for the handshake.
pub fn hybrid_connect_timeout(
    uds: impl AsRef<Path>,
    port: u32,
    timeout: Duration,
) -> io::Result<(UnixStream, u32)> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let n = read_ok_line(&mut s)?;
    s.set_read_timeout(None)?;
    Ok((s, n))
}

/// Waits until `fd` is readable (or `timeout` passes).
pub fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: p is one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(r > 0);
    }
}

/// A host listener on `<uds>_<port>`, where the backend delivers guest
/// connections to host port `port`. The socket file is removed on drop.
#[derive(Debug)]
pub struct HostListener {
    listener: UnixListener,
    path: PathBuf,
}

impl HostListener {
    /// Binds `<uds>_<port>` (replacing a stale file).
    pub fn bind(uds: impl AsRef<Path>, port: u32) -> io::Result<HostListener> {
        let mut p = uds.as_ref().as_os_str().to_owned();
        p.push(format!("_{port}"));
        let path = PathBuf::from(p);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        Ok(HostListener { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one connection within `timeout`.
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<UnixStream> {
        if !wait_readable(&self.listener, timeout)? {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no connection on {} within {timeout:?}",
                    self.path.display()
                ),
            ));
        }
        let (s, _) = self.listener.accept()?;
        Ok(s)
    }

    /// Accepts one connection within the default time limit.
    pub fn accept(&self) -> io::Result<UnixStream> {
        self.accept_timeout(DEFAULT_TIMEOUT)
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs a verified mode over a host stream, with `timeout` on every read
/// and write.
pub fn run_on_stream(s: UnixStream, mode: &Mode, timeout: Duration) -> Outcome {
    let sock = Sock::from(s);
    let _ = sock.set_timeouts(Some(timeout));
    run_mode(&sock, mode)
}

/// Writes `bytes` bytes of stream `seed` to `s`.
pub fn write_verified(s: &UnixStream, seed: u64, bytes: u64) -> io::Result<()> {
    write_verified_at(s, seed, 0, bytes)
}

/// Writes the stream bytes `[offset, offset + bytes)` of stream `seed`.
pub fn write_verified_at(mut s: &UnixStream, seed: u64, offset: u64, bytes: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut k = offset;
    let end = offset + bytes;
    while k < end {
        let n = ((end - k) as usize).min(buf.len());
        crate::pattern::fill(seed, k, &mut buf[..n]);
        s.write_all(&buf[..n])?;
        k += n as u64;
    }
    Ok(())
}

/// What a verified read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReport {
    /// Bytes received.
    pub received: u64,
    /// Offset of the first byte that did not match, if any.
    pub first_bad: Option<u64>,
    /// Whether the stream ended with EOF (as opposed to reaching the limit).
    pub eof: bool,
}

/// Reads from `s` until EOF, or until `limit` bytes if given, checking
/// every byte against stream `seed`. An error (a timeout, a reset) is
/// returned with what had been received before it in its message.
pub fn read_verified(s: &UnixStream, seed: u64, limit: Option<u64>) -> io::Result<ReadReport> {
    read_verified_at(s, seed, 0, limit)
}

/// `read_verified` for a stream whose next byte is at `offset`. `limit`
/// counts from the start of the stream.
pub fn read_verified_at(
    s: &UnixStream,
    seed: u64,
    offset: u64,
    limit: Option<u64>,
) -> io::Result<ReadReport> {
    read_verified_from(s, seed, offset, limit, 64 * 1024, None)
}

/// Reads from any stream until EOF or `limit` (counted from the stream's
/// start), in reads of at most `chunk` bytes with an optional pause after
/// each, verifying every byte against the pattern of `seed` from `offset`.
pub fn read_verified_from<R: Read>(
    mut r: R,
    seed: u64,
    offset: u64,
    limit: Option<u64>,
    chunk: usize,
    pause: Option<std::time::Duration>,
) -> io::Result<ReadReport> {
    let mut v = crate::pattern::Verifier::at(seed, offset);
    let mut buf = vec![0u8; chunk];
    loop {
        let want = match limit {
            Some(l) if v.received() >= l => {
                return Ok(ReadReport {
                    received: v.received(),
                    first_bad: v.first_bad(),
                    eof: false,
                })
            }
            Some(l) => ((l - v.received()) as usize).min(buf.len()),
            None => buf.len(),
        };
        match r.read(&mut buf[..want]) {
            Ok(0) => {
                return Ok(ReadReport {
                    received: v.received(),
                    first_bad: v.first_bad(),
                    eof: true,
                })
            }
            Ok(n) => v.feed(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{} after {} bytes (first bad offset {:?})",
                        e,
                        v.received(),
                        v.first_bad()
                    ),
                ))
            }
        }
        if let Some(p) = pause {
            std::thread::sleep(p);
        }
    }
}
