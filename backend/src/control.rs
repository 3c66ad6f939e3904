//! The control socket: `vsockd status` asks a running instance how it
//! is doing.
//!
//! Protocol: an AF_UNIX stream socket, by default `<socket-path>.ctl`. A
//! client connects and sends one request line, at most
//! [`MAX_REQUEST_BYTES`] bytes with its newline (the end of its writing
//! side also ends the line):
//!
//! ```text
//!   status        ->  ok\n, then the status as text (key: value lines)
//!   status json   ->  ok\n, then the status as one JSON document
//!   upgrade       ->  ok\n, then what the upgrade did, once it is done
//!                     or error: <why>\n (the old worker serves on)
//!   upgrade keeper -> the same, and the keeper then re-executes itself
//!                     from the new binary before it answers
//!   anything else ->  error: <why>\n
//! ```
//!
//! and the server closes the connection after the answer. One request per
//! connection.
//!
//! A client, as the server sees it:
//!
//! ```text
//!   accepted --request line--> answering --all written--> closed
//!      |            |               |
//!      |         upgrade            |
//!      |            v               |
//!      |         waiting --the upgrade ended--> answering
//!      |            |               |
//!      +--- junk, too long, -------+--- past its deadline ---> closed
//!           (error line first)
//! ```
//!
//! A waiting client's deadline is [`UPGRADE_DEADLINE`], longer than any
//! upgrade may take; one that leaves meanwhile does not stop the upgrade.
//!
//! Invariants, so that serving this socket never holds up the vhost-user
//! messages or the datapath of the loop it runs in:
//! * nothing blocks: the listener and every client are non-blocking, and
//!   the loop polls one descriptor for all of them (the server's own epoll
//!   set, which also holds a timer for deadlines);
//! * each call of [`ControlServer::handle_events`] does the work of one
//!   `epoll_wait` of at most [`EVENTS_PER_CALL`] events;
//! * memory is bounded: at most [`MAX_CLIENTS`] clients (a new one evicts
//!   the oldest), each holding at most [`MAX_REQUEST_BYTES`] of request
//!   and one answer;
//! * a client is closed [`CLIENT_DEADLINE`] after it connected, whatever
//!   it did or did not send or read.
//!
//! Junk, over-long requests, evictions and expired clients are logged at
//! warn; a client that connects and closes without a byte (as a liveness
//! probe does) is not.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use thiserror::Error;

use crate::status::Snapshot;

/// Longest request line, newline included.
pub const MAX_REQUEST_BYTES: usize = 128;
/// Clients served at once.
pub const MAX_CLIENTS: usize = 16;
/// How long a client may stay connected.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(5);
/// Events handled per call.
pub const EVENTS_PER_CALL: usize = 32;
/// Longest answer the client reads.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// How long `vsockd status` waits for each read or write.
pub const CLIENT_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waiting for an upgrade's answer may stay.
pub const UPGRADE_DEADLINE: Duration = Duration::from_secs(60);
/// Bytes read and dropped from a client being closed.
const MAX_DISCARDED_BYTES: usize = 64 * 1024;
/// Characters of a bad request quoted back in the error line and the log.
const QUOTED_REQUEST_CHARS: usize = 40;

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;
const FIRST_CLIENT_TOKEN: u64 = 2;

/// The default control socket of a vhost-user socket path.
pub fn default_path(socket_path: &Path) -> PathBuf {
    let mut p = socket_path.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// Errors of the control socket's server.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The listener could not be made non-blocking.
    #[error("control socket {path}: {source}")]
    Listener {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The server's epoll set failed.
    #[error("control socket epoll: {0}")]
    Epoll(#[source] io::Error),
    /// The deadline timer failed.
    #[error("control socket timer: {0}")]
    Timer(#[source] io::Error),
}

/// Errors of `vsockd status` and `vsockd upgrade`, the clients.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Nothing listens there (not running, or another path).
    #[error("{path}: cannot connect: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The exchange failed or timed out.
    #[error("{path}: {source}")]
    Exchange {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The instance answered with an error line.
    #[error("{path} answered: {message}")]
    Refused { path: PathBuf, message: String },
    /// The answer was not one of ours.
    #[error("{path}: unexpected answer: {what}")]
    Protocol { path: PathBuf, what: String },
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Text,
    Json,
    /// `upgrade`, or `upgrade keeper` (true).
    Upgrade(bool),
}

/// What the process serving the control socket does for its requests.
pub trait Requests {
    /// What `vsockd status` reports now.
    fn snapshot(&mut self) -> Snapshot;
    /// Starts an upgrade of the worker, and then of the keeper itself if
    /// `keeper`; its end is told with [`ControlServer::finish_upgrade`].
    /// An error is answered at once.
    fn start_upgrade(&mut self, keeper: bool) -> Result<(), String>;
}

/// Parses a request line (without its newline).
fn parse_request(line: &[u8]) -> Result<Request, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match line {
        b"status" => Ok(Request::Text),
        b"status json" => Ok(Request::Json),
        b"upgrade" => Ok(Request::Upgrade(false)),
        b"upgrade keeper" => Ok(Request::Upgrade(true)),
        other => {
            let text = String::from_utf8_lossy(other);
            let quoted: String = text.chars().take(QUOTED_REQUEST_CHARS).collect();
            Err(format!(
                "unknown request {quoted:?}{}; expected \"status\", \"status json\" or \"upgrade\"",
                if text.chars().count() > QUOTED_REQUEST_CHARS {
                    " (cut)"
                } else {
                    ""
                }
            ))
        }
    }
}

/// The answer to a status request, or to a request that failed, as sent
/// (`snapshot` is called only for a status request).
fn answer(request: Result<Request, String>, snapshot: &mut dyn FnMut() -> Snapshot) -> Vec<u8> {
    match request {
        Ok(Request::Text) => format!("ok\n{}", snapshot().to_text()).into_bytes(),
        Ok(Request::Json) => format!("ok\n{}", snapshot().to_json().pretty()).into_bytes(),
        Ok(Request::Upgrade(_)) => b"error: no upgrade to answer\n".to_vec(),
        Err(why) => error_answer(&why),
    }
}

/// An error answer: one line.
fn error_answer(why: &str) -> Vec<u8> {
    format!("error: {}\n", why.replace('\n', "; ")).into_bytes()
}

enum Phase {
    /// Reading the request line.
    Reading(Vec<u8>),
    /// Waiting for the upgrade it asked for to end.
    Waiting,
    /// Writing the answer; bytes written so far.
    Answering { bytes: Vec<u8>, written: usize },
}

struct Client {
    stream: UnixStream,
    accepted: Instant,
    phase: Phase,
}

/// What a client event leads to.
enum Next {
    Keep,
    /// Close it (the reason, logged at warn if any).
    Close(Option<String>),
    /// A complete request line (or its parse error) to answer.
    Answer(Result<Request, String>),
}

/// The control socket's server.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    epoll: OwnedFd,
    timer: OwnedFd,
    clients: HashMap<u64, Client>,
    next_token: u64,
    /// How long a client may stay ([`CLIENT_DEADLINE`]).
    deadline: Duration,
}

impl ControlServer {
    /// Serves the bound `listener` at `path` (removed when the server is
    /// dropped).
    pub fn new(listener: UnixListener, path: PathBuf) -> Result<Self, ControlError> {
        listener
            .set_nonblocking(true)
            .map_err(|source| ControlError::Listener {
                path: path.clone(),
                source,
            })?;
        let fd = epoll::create(true).map_err(ControlError::Epoll)?;
        // SAFETY: `epoll::create` returned a new descriptor that we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: timerfd_create(2) with constant flags; the result is
        // checked before it is owned.
        let tfd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if tfd < 0 {
            return Err(ControlError::Timer(io::Error::last_os_error()));
        }
        // SAFETY: `tfd` is a new descriptor that we own.
        let timer = unsafe { OwnedFd::from_raw_fd(tfd) };
        let server = ControlServer {
            listener,
            path,
            epoll,
            timer,
            clients: HashMap::new(),
            next_token: FIRST_CLIENT_TOKEN,
            deadline: CLIENT_DEADLINE,
        };
        server.watch(
            epoll::ControlOptions::EPOLL_CTL_ADD,
            server.listener.as_raw_fd(),
            LISTENER_TOKEN,
            epoll::Events::EPOLLIN,
        )?;
        server.watch(
            epoll::ControlOptions::EPOLL_CTL_ADD,
            server.timer.as_raw_fd(),
            TIMER_TOKEN,
            epoll::Events::EPOLLIN,
        )?;
        info!("control socket {} ready", server.path.display());
        Ok(server)
    }

    /// The descriptor to poll: readable when [`ControlServer::handle_events`]
    /// has work.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn watch(
        &self,
        op: epoll::ControlOptions,
        fd: RawFd,
        token: u64,
        events: epoll::Events,
    ) -> Result<(), ControlError> {
        epoll::ctl(
            self.epoll.as_raw_fd(),
            op,
            fd,
            epoll::Event::new(events, token),
        )
        .map_err(ControlError::Epoll)
    }

    /// Accepts, reads and answers what is ready now, without blocking;
    /// `requests.snapshot` is called at most once, and only if a status
    /// request is to be answered.
    pub fn handle_events(&mut self, requests: &mut dyn Requests) {
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); EVENTS_PER_CALL];
        let n = match epoll::wait(self.epoll.as_raw_fd(), 0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                warn!("control socket: epoll_wait failed: {e}");
                0
            }
        };
        let mut taken: Option<Snapshot> = None;
        for ev in &events[..n] {
            match ev.data {
                LISTENER_TOKEN => self.accept_all(),
                TIMER_TOKEN => self.drain_timer(),
                token => {
                    let next = self.on_client(token);
                    self.apply(token, next, requests, &mut taken);
                }
            }
        }
        self.expire(Instant::now());
    }

    /// The listener's and the waiting clients' descriptors, for a keeper
    /// that re-executes itself (it keeps them across the execve).
    pub fn exec_fds(&self) -> (RawFd, Vec<RawFd>) {
        let waiting = self
            .clients
            .values()
            .filter(|c| matches!(c.phase, Phase::Waiting))
            .map(|c| c.stream.as_raw_fd())
            .collect();
        (self.listener.as_raw_fd(), waiting)
    }

    /// Takes a client that waits for an upgrade's answer (one a keeper
    /// had before it re-executed itself).
    pub fn adopt_waiting(&mut self, stream: UnixStream) {
        self.add_client(stream, Phase::Waiting);
    }

    /// Answers the clients waiting for the upgrade that just ended.
    pub fn finish_upgrade(&mut self, result: &Result<String, String>) {
        let bytes = match result {
            Ok(text) => format!("ok\n{text}").into_bytes(),
            Err(why) => error_answer(why),
        };
        let waiting: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Waiting))
            .map(|(&t, _)| t)
            .collect();
        for token in waiting {
            self.start_answer(token, bytes.clone());
        }
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("control socket: accept failed: {e}");
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                self.evict_oldest();
            }
            self.add_client(
                stream,
                Phase::Reading(Vec::with_capacity(MAX_REQUEST_BYTES)),
            );
        }
    }

    /// Serves `stream`, a client in `phase`.
    fn add_client(&mut self, stream: UnixStream, phase: Phase) {
        if let Err(e) = stream.set_nonblocking(true) {
            warn!("control socket: client dropped: {e}");
            return;
        }
        let token = self.next_token;
        self.next_token += 1;
        let added = self.watch(
            epoll::ControlOptions::EPOLL_CTL_ADD,
            stream.as_raw_fd(),
            token,
            epoll::Events::EPOLLIN,
        );
        if let Err(e) = added {
            warn!("control socket: client dropped: {e}");
            return;
        }
        self.clients.insert(
            token,
            Client {
                stream,
                accepted: Instant::now(),
                phase,
            },
        );
    }

    fn evict_oldest(&mut self) {
        let oldest = self
            .clients
            .iter()
            .min_by_key(|(_, c)| c.accepted)
            .map(|(&t, _)| t);
        if let Some(token) = oldest {
            self.close(
                token,
                Some(format!(
                    "{MAX_CLIENTS} clients connected: the oldest is closed for a new one"
                )),
            );
        }
    }

    fn drain_timer(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a local buffer from our
        // non-blocking timerfd.
        unsafe { libc::read(self.timer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }

    /// Reads or writes what client `token` allows now.
    fn on_client(&mut self, token: u64) -> Next {
        let Some(client) = self.clients.get_mut(&token) else {
            return Next::Keep;
        };
        match &mut client.phase {
            Phase::Reading(request) => read_request(&mut client.stream, request),
            Phase::Waiting => watch_waiting(&mut client.stream),
            Phase::Answering { bytes, written } => write_answer(&mut client.stream, bytes, written),
        }
    }

    fn apply(
        &mut self,
        token: u64,
        next: Next,
        requests: &mut dyn Requests,
        taken: &mut Option<Snapshot>,
    ) {
        match next {
            Next::Keep => {}
            Next::Close(why) => self.close(token, why),
            Next::Answer(Ok(Request::Upgrade(keeper))) => match requests.start_upgrade(keeper) {
                Ok(()) => {
                    info!("control socket: upgrade requested");
                    if let Some(client) = self.clients.get_mut(&token) {
                        client.phase = Phase::Waiting;
                    }
                }
                Err(why) => {
                    warn!("control socket: upgrade refused: {why}");
                    self.start_answer(token, error_answer(&why));
                }
            },
            Next::Answer(request) => {
                if let Err(why) = &request {
                    warn!("control socket: {why}; closing that client");
                }
                let bytes = answer(request, &mut || {
                    taken.get_or_insert_with(|| requests.snapshot()).clone()
                });
                self.start_answer(token, bytes);
            }
        }
    }

    /// Writes what it can of `bytes` to client `token`, and the rest as it
    /// becomes writable; closes it once all is written.
    fn start_answer(&mut self, token: u64, bytes: Vec<u8>) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        let mut written = 0;
        let next = write_answer(&mut client.stream, &bytes, &mut written);
        if let Next::Keep = next {
            client.phase = Phase::Answering { bytes, written };
            let fd = client.stream.as_raw_fd();
            let res = self.watch(
                epoll::ControlOptions::EPOLL_CTL_MOD,
                fd,
                token,
                epoll::Events::EPOLLOUT,
            );
            if let Err(e) = res {
                self.close(token, Some(e.to_string()));
            }
        } else {
            self.close(token, None);
        }
    }

    fn close(&mut self, token: u64, why: Option<String>) {
        if let Some(mut client) = self.clients.remove(&token) {
            if let Some(why) = why {
                warn!("control socket: client closed: {why}");
            }
            discard_input(&mut client.stream);
            // Closing the descriptor takes it out of the epoll set.
            drop(client);
        }
    }

    /// Closes clients past their deadline and arms the timer for the next.
    fn expire(&mut self, now: Instant) {
        let base = self.deadline;
        let deadline = |c: &Client| {
            let allowed = match c.phase {
                Phase::Waiting => base.max(UPGRADE_DEADLINE),
                _ => base,
            };
            (c.accepted + allowed, allowed)
        };
        let late: Vec<(u64, Duration)> = self
            .clients
            .iter()
            .map(|(&t, c)| (t, deadline(c)))
            .filter(|(_, (at, _))| now >= *at)
            .map(|(t, (_, allowed))| (t, allowed))
            .collect();
        for (token, allowed) in late {
            self.close(
                token,
                Some(format!("no complete exchange within {allowed:?}")),
            );
        }
        let next = self
            .clients
            .values()
            .map(|c| deadline(c).0.saturating_duration_since(now))
            .min();
        if let Err(e) = self.arm_timer(next) {
            warn!("control socket: cannot arm the deadline timer: {e}");
        }
    }

    fn arm_timer(&self, after: Option<Duration>) -> io::Result<()> {
        // A zero it_value disarms; a due deadline fires after 1 ns.
        let after = after.map(|d| d.max(Duration::from_nanos(1)));
        let value = after.map_or(
            libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            |d| libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
        );
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: timerfd_settime(2) on our timerfd with a local,
        // initialised itimerspec.
        let rc = unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut())
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads what the client sent: the request once its line is complete.
fn read_request(stream: &mut UnixStream, request: &mut Vec<u8>) -> Next {
    let mut buf = [0u8; MAX_REQUEST_BYTES];
    loop {
        match stream.read(&mut buf[..MAX_REQUEST_BYTES - request.len()]) {
            Ok(0) if request.is_empty() => {
                debug!("control socket: a client closed without a request");
                return Next::Close(None);
            }
            // The end of its writing side ends the line.
            Ok(0) => return Next::Answer(parse_request(request)),
            Ok(n) => {
                request.extend_from_slice(&buf[..n]);
                if let Some(end) = request.iter().position(|&b| b == b'\n') {
                    return Next::Answer(parse_request(&request[..end]));
                }
                if request.len() >= MAX_REQUEST_BYTES {
                    return Next::Answer(Err(format!(
                        "request longer than {MAX_REQUEST_BYTES} bytes"
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Next::Close(Some(format!("read failed: {e}"))),
        }
    }
}

/// A client waiting for an upgrade's answer: closed if it left (the
/// upgrade goes on); what else it sends is dropped.
fn watch_waiting(stream: &mut UnixStream) -> Next {
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                info!("control socket: the client that asked for the upgrade left; it goes on");
                return Next::Close(None);
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Next::Close(Some(format!("read failed: {e}"))),
        }
    }
}

/// Reads and drops what the client sent beyond its request (at most
/// [`MAX_DISCARDED_BYTES`]): a Unix socket closed with unread bytes resets
/// the connection, and the client would read an error instead of the end
/// of the answer.
fn discard_input(stream: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    let mut left = MAX_DISCARDED_BYTES;
    while left > 0 {
        let want = left.min(buf.len());
        match stream.read(&mut buf[..want]) {
            Ok(0) => return,
            Ok(n) => left -= n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// Writes what is left of an answer: `Keep` until all of it is written.
fn write_answer(stream: &mut UnixStream, bytes: &[u8], written: &mut usize) -> Next {
    while *written < bytes.len() {
        match stream.write(&bytes[*written..]) {
            Ok(n) => *written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                debug!("control socket: client gone before the answer: {e}");
                return Next::Close(None);
            }
        }
    }
    Next::Close(None)
}

/// `vsockd status`: asks the instance at control socket `path`.
pub fn request_status(path: &Path, json: bool) -> Result<String, ClientError> {
    let line: &[u8] = if json { b"status json\n" } else { b"status\n" };
    request(path, line, CLIENT_IO_TIMEOUT)
}

/// `vsockd upgrade`: asks the instance at control socket `path` to
/// upgrade its worker (and its keeper if `keeper`), and waits for the
/// outcome.
pub fn request_upgrade(path: &Path, keeper: bool) -> Result<String, ClientError> {
    let line: &[u8] = if keeper {
        b"upgrade keeper\n"
    } else {
        b"upgrade\n"
    };
    request(path, line, UPGRADE_DEADLINE)
}

/// Sends one request line and reads the answer, waiting at most
/// `timeout` for each read or write.
fn request(path: &Path, request: &[u8], timeout: Duration) -> Result<String, ClientError> {
    let mut stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let exchange = |source| ClientError::Exchange {
        path: path.to_owned(),
        source,
    };
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(exchange)?;
    stream.write_all(request).map_err(exchange)?;
    let mut bytes = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(exchange)?;
    let protocol = |what: String| ClientError::Protocol {
        path: path.to_owned(),
        what,
    };
    if bytes.len() > MAX_ANSWER_BYTES {
        return Err(protocol(format!("longer than {MAX_ANSWER_BYTES} bytes")));
    }
    let text = String::from_utf8(bytes).map_err(|_| protocol("not UTF-8".into()))?;
    let (first, rest) = text.split_once('\n').unwrap_or((text.as_str(), ""));
    if first == "ok" {
        return Ok(rest.to_string());
    }
    if let Some(message) = first.strip_prefix("error: ") {
        return Err(ClientError::Refused {
            path: path.to_owned(),
            message: message.to_string(),
        });
    }
    let quoted: String = first.chars().take(QUOTED_REQUEST_CHARS).collect();
    Err(protocol(format!("{quoted:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::snapshot;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// Requests answered from the fixed test snapshot.
    #[derive(Default)]
    struct Fake {
        /// Refuse upgrades with this.
        refuse_upgrade: Option<String>,
        upgrades: u32,
        /// Fail the test if a snapshot is taken.
        no_snapshot: bool,
    }

    impl Requests for Fake {
        fn snapshot(&mut self) -> Snapshot {
            assert!(!self.no_snapshot, "no snapshot expected");
            snapshot()
        }

        fn start_upgrade(&mut self, _keeper: bool) -> Result<(), String> {
            self.upgrades += 1;
            self.refuse_upgrade.clone().map_or(Ok(()), Err)
        }
    }

    fn server(name: &str) -> (ControlServer, PathBuf) {
        let dir = std::env::temp_dir().join(format!("vsockd-ctl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock.ctl");
        let listener = UnixListener::bind(&path).unwrap();
        (ControlServer::new(listener, path.clone()).unwrap(), path)
    }

    /// Runs the server until `client` has read its whole answer.
    fn exchange(server: &mut ControlServer, client: &mut UnixStream) -> String {
        exchange_with(server, client, &mut Fake::default())
    }

    fn exchange_with(
        server: &mut ControlServer,
        client: &mut UnixStream,
        requests: &mut Fake,
    ) -> String {
        client.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            server.handle_events(requests);
            let mut buf = [0u8; 4096];
            match client.read(&mut buf) {
                Ok(0) => return String::from_utf8(got).unwrap(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("client read: {e}"),
            }
            assert!(Instant::now() < deadline, "no answer; got {got:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn requests_are_parsed_strictly() {
        assert_eq!(parse_request(b"status"), Ok(Request::Text));
        assert_eq!(parse_request(b"status\r"), Ok(Request::Text));
        assert_eq!(parse_request(b"status json"), Ok(Request::Json));
        assert_eq!(parse_request(b"upgrade"), Ok(Request::Upgrade(false)));
        assert_eq!(parse_request(b"upgrade keeper"), Ok(Request::Upgrade(true)));
        for junk in [
            &b"STATUS"[..],
            b"status  json",
            b"",
            b"\xff\xfe",
            b"status xml",
            b"upgrade now",
        ] {
            assert!(parse_request(junk).is_err(), "{junk:?}");
        }
        let long = parse_request(&[b'a'; 100]).unwrap_err();
        assert!(long.contains("(cut)") && !long.contains('\n'), "{long}");
    }

    #[test]
    fn answers_text_and_json_then_closes() {
        let (mut server, path) = server("answers");
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"status\n").unwrap();
        let text = exchange(&mut server, &mut c);
        assert_eq!(text, format!("ok\n{}", snapshot().to_text()));
        let mut c = UnixStream::connect(&path).unwrap();
        // The end of the writing side ends the line.
        c.write_all(b"status json").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let json = exchange(&mut server, &mut c);
        assert_eq!(json, format!("ok\n{}", snapshot().to_json().pretty()));
        assert!(server.clients.is_empty());
    }

    #[test]
    fn junk_gets_one_error_line_and_the_next_client_is_served() {
        let (mut server, path) = server("junk");
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"\x00\x01 GET / HTTP/1.0\r\n\r\n").unwrap();
        let answer = exchange(&mut server, &mut c);
        assert!(answer.starts_with("error: unknown request"), "{answer:?}");
        assert_eq!(answer.lines().count(), 1, "{answer:?}");
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(&[b'x'; MAX_REQUEST_BYTES + 10]).unwrap();
        let answer = exchange(&mut server, &mut c);
        assert_eq!(
            answer,
            format!("error: request longer than {MAX_REQUEST_BYTES} bytes\n")
        );
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"status\n").unwrap();
        assert!(exchange(&mut server, &mut c).starts_with("ok\nversion: "));
    }

    #[test]
    fn silent_clients_are_evicted_and_expire() {
        let (mut server, path) = server("silent");
        let mut silent: Vec<UnixStream> = (0..MAX_CLIENTS + 2)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        for _ in 0..10 {
            server.handle_events(&mut Fake::default());
        }
        assert_eq!(server.clients.len(), MAX_CLIENTS);
        // The two oldest were closed to make room.
        let mut b = [0u8; 1];
        for c in &mut silent[..2] {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(c.read(&mut b).unwrap(), 0);
        }
        // A request still gets through while the others say nothing.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"status\n").unwrap();
        assert!(exchange(&mut server, &mut c).starts_with("ok\n"));
        server.expire(Instant::now() + CLIENT_DEADLINE);
        assert!(server.clients.is_empty());
        for c in &mut silent[2..] {
            assert_eq!(c.read(&mut b).unwrap(), 0);
        }
    }

    /// The deadline timer wakes a poll of the server's descriptor by
    /// itself: a silent client is closed with nothing else happening.
    #[test]
    fn the_timer_closes_a_silent_client() {
        let (mut server, path) = server("timer");
        server.deadline = Duration::from_millis(50);
        let mut silent = UnixStream::connect(&path).unwrap();
        silent.set_nonblocking(true).unwrap();
        let t0 = Instant::now();
        let mut b = [0u8; 1];
        loop {
            let mut pfd = libc::pollfd {
                fd: server.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) over one local pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert_eq!(n, 1, "the server's descriptor never became readable");
            server.handle_events(&mut Fake::default());
            match silent.read(&mut b) {
                Ok(0) => break,
                Ok(_) => panic!("a silent client got an answer"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "never closed");
        }
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert!(server.clients.is_empty());
    }

    #[test]
    fn a_probe_that_closes_at_once_is_closed_quietly() {
        let (mut server, path) = server("probe");
        drop(UnixStream::connect(&path).unwrap());
        for _ in 0..10 {
            server.handle_events(&mut Fake {
                no_snapshot: true,
                ..Fake::default()
            });
        }
        assert!(server.clients.is_empty());
    }

    #[test]
    fn client_reads_the_answer_and_names_the_path_on_errors() {
        let (mut server, path) = server("client");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                server.handle_events(&mut Fake::default());
                std::thread::sleep(Duration::from_millis(1));
            }
            server
        });
        let text = request_status(&path, false).unwrap();
        assert_eq!(text, snapshot().to_text());
        let json = request_status(&path, true).unwrap();
        assert_eq!(json, snapshot().to_json().pretty());
        stop.store(true, Ordering::Relaxed);
        drop(thread.join().unwrap());
        assert!(!path.exists(), "the socket is removed with the server");
        let e = request_status(&path, false).unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    /// Polls the server with `requests` until `client` is answered or
    /// `rounds` polls passed; returns what it read.
    fn poll_answer(
        server: &mut ControlServer,
        client: &mut UnixStream,
        requests: &mut Fake,
        rounds: u32,
    ) -> Vec<u8> {
        client.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        for _ in 0..rounds {
            server.handle_events(requests);
            let mut buf = [0u8; 256];
            match client.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    }

    #[test]
    fn an_upgrade_is_answered_when_it_ends_and_a_refusal_at_once() {
        let (mut server, path) = server("upgrade");
        let mut fake = Fake::default();
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"upgrade\n").unwrap();
        // Started, not answered: the client waits, past the status
        // deadline too.
        assert!(poll_answer(&mut server, &mut c, &mut fake, 20).is_empty());
        assert_eq!(fake.upgrades, 1);
        server.expire(Instant::now() + CLIENT_DEADLINE);
        assert_eq!(server.clients.len(), 1);
        // A status request meanwhile is answered.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"status\n").unwrap();
        assert!(exchange_with(&mut server, &mut s, &mut fake).starts_with("ok\n"));
        server.finish_upgrade(&Ok("upgraded\n".into()));
        let text = exchange_with(&mut server, &mut c, &mut fake);
        assert_eq!(text, "ok\nupgraded\n");
        // One that fails.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"upgrade\n").unwrap();
        assert!(poll_answer(&mut server, &mut c, &mut fake, 20).is_empty());
        server.finish_upgrade(&Err("the new worker died\nof SIGABRT".into()));
        let text = exchange_with(&mut server, &mut c, &mut fake);
        assert_eq!(text, "error: the new worker died; of SIGABRT\n");
        // One refused at once.
        fake.refuse_upgrade = Some("no worker is ready".into());
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"upgrade\n").unwrap();
        let text = exchange_with(&mut server, &mut c, &mut fake);
        assert_eq!(text, "error: no worker is ready\n");
        assert_eq!(fake.upgrades, 3);
        // A waiting client is closed at the upgrade deadline.
        fake.refuse_upgrade = None;
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"upgrade\n").unwrap();
        assert!(poll_answer(&mut server, &mut c, &mut fake, 20).is_empty());
        server.expire(Instant::now() + UPGRADE_DEADLINE);
        assert!(server.clients.is_empty());
    }

    #[test]
    fn default_path_appends_ctl() {
        assert_eq!(
            default_path(Path::new("/run/vm/vhost.sock")),
            PathBuf::from("/run/vm/vhost.sock.ctl")
        );
    }
}
