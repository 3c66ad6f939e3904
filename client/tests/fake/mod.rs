//! A fake vsockd for the client's tests: the server side of the hybrid
//! socket (raw `CONNECT`, resumable sessions, `RESUME`), with in-memory
//! guests and fault injection.
//!
//! Guests, by port:
//! - [`PATTERN_PORT`]: sends `g2h_bytes` of `pattern(G2H_SEED, offset)`
//!   then `END`, and checks every host byte against
//!   `pattern(H2G_SEED, offset)`;
//! - [`ECHO_PORT`]: sends back what it receives, and `END` after the
//!   host's `END`;
//! - [`RAW_ECHO_PORT`] / [`RAW_GREETING_PORT`]: raw `CONNECT` echo (the
//!   latter sends `GREETING` in the same write as its `OK` line);
//! - any other port: refused (the socket is closed without a reply).
//!
//! Faults: each connection can be cut after a random number of bytes read
//! and written (seeded), also in the middle of a frame either way; a `DATA`
//! frame's payload can be corrupted under a correct-looking header; a test
//! can cut a session's socket, reset its guest, or take the listener away.
//! Whatever a correct client never does is recorded in
//! [`Stats::violations`].

#![allow(dead_code)]

mod conn;
pub mod wire;

use std::collections::HashMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub const PATTERN_PORT: u32 = 5000;
pub const ECHO_PORT: u32 = 5001;
pub const RAW_ECHO_PORT: u32 = 7;
pub const RAW_GREETING_PORT: u32 = 8;
pub const GREETING: &[u8] = b"WELCOME\n";
pub const G2H_SEED: u64 = 0x6732_6820_7365_6564;
pub const H2G_SEED: u64 = 0x6832_6720_7365_6564;
/// Guest bytes the fake sends beyond the client's last `ACK` at most
/// (vsockd's `--buf-alloc` default).
pub const WINDOW_BYTES: u64 = 1 << 20;
/// Longest any wait in a test may take before the test fails as hung.
pub const HANG_LIMIT: Duration = Duration::from_secs(120);

/// Byte `offset` of the stream named by `seed`: no short period, so a
/// repeated or skipped run of bytes shows.
pub fn pattern(seed: u64, offset: u64) -> u8 {
    let word = splitmix(seed ^ (offset / 8));
    (word >> ((offset % 8) * 8)) as u8
}

pub fn fill_pattern(seed: u64, start: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = pattern(seed, start + i as u64);
    }
}

pub fn pattern_bytes(seed: u64, start: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    fill_pattern(seed, start, &mut bytes);
    bytes
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A small seeded generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// What the fake does wrong on purpose.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Cut each new connection after a random number of bytes (read plus
    /// written) in this range.
    pub break_after_bytes: Option<(u64, u64)>,
    /// Corrupt a payload byte of one `DATA` frame in this many (the header
    /// and checksum stay those of the right payload).
    pub corrupt_one_in: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Bytes the pattern guest sends.
    pub g2h_bytes: u64,
    /// Bytes the pattern guest expects.
    pub h2g_bytes: u64,
    pub seed: u64,
    pub faults: Faults,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            g2h_bytes: 1 << 20,
            h2g_bytes: 1 << 20,
            seed: 1,
            faults: Faults::default(),
        }
    }
}

/// Counters over the fake's life.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub connections: u64,
    pub sessions_opened: u64,
    pub resumes: u64,
    /// `RESUME`s of sessions that had ended.
    pub resumes_after_end: u64,
    pub refusals: Vec<String>,
    pub injected_breaks: u64,
    pub corrupted_frames: u64,
    pub aborts: u64,
    pub completed: u64,
    /// Things a correct client never does.
    pub violations: Vec<String>,
}

/// What the fake knows of one session.
#[derive(Clone, Debug)]
pub struct SessionReport {
    pub port: u32,
    /// Host bytes received (exactly once, in order: a gap or overlap is a
    /// violation).
    pub h2g_len: u64,
    pub h2g_end: bool,
    /// The first offset where a host byte differed from the pattern.
    pub h2g_mismatch: Option<u64>,
    /// The client's last `ACK`.
    pub g2h_acked: u64,
    pub g2h_len: u64,
    pub attached: bool,
    /// Why it ended: "complete", "aborted", "guest reset".
    pub ended: Option<String>,
}

enum Guest {
    Pattern { h2g_expected: u64 },
    Echo,
}

/// The fake's record of a session.
struct FakeSession {
    port: u32,
    guest: Guest,
    /// The guest's stream so far.
    g2h: Vec<u8>,
    g2h_end: Option<u64>,
    g2h_acked: u64,
    /// Highest offset ever put on the wire (the `END` counts one).
    g2h_sent_max: u64,
    h2g_len: u64,
    /// The highest host-stream `ACK` written to any client socket: a
    /// client sends nothing past it plus the window.
    h2g_ack_sent: u64,
    h2g_end: bool,
    h2g_end_acked: bool,
    h2g_mismatch: Option<u64>,
    /// The attached connection: its id and socket.
    attached: Option<(u64, UnixStream)>,
    /// On the attached connection: next guest offset to send, `END` sent.
    conn_wire: u64,
    conn_end_sent: bool,
    /// An `ERROR` frame the writer sends before closing.
    error_to_send: Option<String>,
    ended: Option<String>,
}

impl FakeSession {
    fn report(&self) -> SessionReport {
        SessionReport {
            port: self.port,
            h2g_len: self.h2g_len,
            h2g_end: self.h2g_end,
            h2g_mismatch: self.h2g_mismatch,
            g2h_acked: self.g2h_acked,
            g2h_len: self.g2h.len() as u64,
            attached: self.attached.is_some(),
            ended: self.ended.clone(),
        }
    }

    fn is_complete(&self) -> bool {
        self.h2g_end
            && self.h2g_end_acked
            && self.g2h_end.is_some_and(|end| self.g2h_acked == end + 1)
    }

    fn detach(&mut self) {
        if let Some((_, stream)) = self.attached.take() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

struct ListenerControl {
    paused: bool,
    listening: bool,
    stop: bool,
}

struct State {
    sessions: HashMap<String, FakeSession>,
    rng: Rng,
    faults: Faults,
    stats: Stats,
    listener: ListenerControl,
}

struct Shared {
    path: PathBuf,
    config: Config,
    next_conn: AtomicU64,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait_timeout(guard, Duration::from_millis(200))
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
    }

    fn violation(&self, what: String) {
        eprintln!("fake vsockd: client violation: {what}");
        self.lock().stats.violations.push(what);
        self.changed.notify_all();
    }
}

/// The fake server. Dropping it stops it and removes its directory.
pub struct FakeVsockd {
    dir: PathBuf,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

static SERVERS: AtomicU64 = AtomicU64::new(0);

impl FakeVsockd {
    pub fn start(config: Config) -> FakeVsockd {
        let dir = std::env::temp_dir().join(format!(
            "vsockd-client-test-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let path = dir.join("vsock.sock");
        let shared = Arc::new(Shared {
            path: path.clone(),
            next_conn: AtomicU64::new(1),
            state: Mutex::new(State {
                sessions: HashMap::new(),
                rng: Rng::new(config.seed),
                faults: config.faults.clone(),
                stats: Stats::default(),
                listener: ListenerControl {
                    paused: false,
                    listening: false,
                    stop: false,
                },
            }),
            changed: Condvar::new(),
            config,
        });
        let accept = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || accept_loop(shared))
        };
        let server = FakeVsockd {
            dir,
            shared,
            accept: Some(accept),
        };
        server.wait_listener(true);
        server
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().faults = faults;
    }

    pub fn session(&self, token: &str) -> Option<SessionReport> {
        self.shared
            .lock()
            .sessions
            .get(token)
            .map(FakeSession::report)
    }

    /// The tokens of every session opened so far.
    pub fn tokens(&self) -> Vec<String> {
        self.shared.lock().sessions.keys().cloned().collect()
    }

    /// Waits until `done` holds for session `token`.
    pub fn wait_session(&self, token: &str, what: &str, done: impl Fn(&SessionReport) -> bool) {
        let start = Instant::now();
        let mut state = self.shared.lock();
        loop {
            if let Some(report) = state.sessions.get(token).map(FakeSession::report) {
                if done(&report) {
                    return;
                }
            }
            assert!(
                start.elapsed() < HANG_LIMIT,
                "fake vsockd: waited too long for {what}"
            );
            state = self.shared.wait(state);
        }
    }

    /// Cuts the socket carrying session `token`; returns whether one did.
    pub fn break_connection(&self, token: &str) -> bool {
        let mut state = self.shared.lock();
        let Some(session) = state.sessions.get_mut(token) else {
            return false;
        };
        let was = session.attached.is_some();
        session.detach();
        self.shared.changed.notify_all();
        was
    }

    /// The guest resets its connection: the session ends; an attached
    /// client gets an `ERROR` frame.
    pub fn reset_guest(&self, token: &str) {
        let mut state = self.shared.lock();
        if let Some(session) = state.sessions.get_mut(token) {
            session.ended = Some("guest reset".to_owned());
            if session.attached.is_some() {
                session.error_to_send =
                    Some("the guest reset its connection: the session ended".to_owned());
            }
        }
        self.shared.changed.notify_all();
    }

    /// Stops listening. The socket file stays, so connecting fails with
    /// `ECONNREFUSED`; with `remove_file` it is removed too (`ENOENT`).
    pub fn pause_listener(&self, remove_file: bool) {
        self.shared.lock().listener.paused = true;
        // Wake the accept call; the accept loop drops this connection.
        let _ = UnixStream::connect(self.path());
        self.wait_listener(false);
        if remove_file {
            std::fs::remove_file(self.path()).expect("remove the socket file");
        }
    }

    pub fn resume_listener(&self) {
        self.shared.lock().listener.paused = false;
        self.shared.changed.notify_all();
        self.wait_listener(true);
    }

    fn wait_listener(&self, listening: bool) {
        let start = Instant::now();
        let mut state = self.shared.lock();
        while state.listener.listening != listening {
            assert!(start.elapsed() < HANG_LIMIT, "fake vsockd: listener stuck");
            state = self.shared.wait(state);
        }
    }
}

impl Drop for FakeVsockd {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.listener.stop = true;
            for session in state.sessions.values_mut() {
                session.detach();
            }
        }
        self.shared.changed.notify_all();
        let _ = UnixStream::connect(self.path());
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn accept_loop(shared: Arc<Shared>) {
    loop {
        let _ = std::fs::remove_file(&shared.path);
        let listener = UnixListener::bind(&shared.path).expect("bind the fake vsockd socket");
        shared.lock().listener.listening = true;
        shared.changed.notify_all();
        for stream in listener.incoming() {
            let (stop, paused) = {
                let state = shared.lock();
                (state.listener.stop, state.listener.paused)
            };
            if stop {
                return;
            }
            if paused {
                break;
            }
            let Ok(stream) = stream else { continue };
            let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
            let shared = Arc::clone(&shared);
            thread::spawn(move || conn::handle(shared, stream, conn_id));
        }
        // Dropping the listener leaves the socket file: ECONNREFUSED.
        drop(listener);
        let mut state = shared.lock();
        state.listener.listening = false;
        shared.changed.notify_all();
        while state.listener.paused && !state.listener.stop {
            state = shared.wait(state);
        }
        if state.listener.stop {
            return;
        }
    }
}
