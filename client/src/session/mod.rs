//! Resumable sessions: a guest connection that survives breaks of the
//! socket to vsockd (its worker restarting, a live upgrade, this process
//! restarting), with every byte delivered exactly once each way.
//!
//! A [`Session`] is a handle on shared state ([`state`]) and a background
//! I/O thread, the *stub* ([`stub`]), which owns the socket: it sends
//! `DATA` from the resend buffer, `ACK`s for what the application has read,
//! `END` and `ABORT`; it receives frames into the receive buffer; and after
//! any break it reattaches with `RESUME` ([`attach`]). The frames of one
//! socket are handled by a [`link`].
//!
//! The application only ever copies bytes in and out of the buffers and
//! waits on the state's condition variable; it wakes the stub through a
//! wake-up channel when it leaves it work.

mod attach;
mod finish;
mod io;
mod link;
mod state;
mod stub;

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::ClientError;
use crate::options::Options;
use crate::token::Token;
use crate::wake::Waker;

use attach::ReattachEnd;
use link::Link;
use state::{Lifecycle, Shared, State};

pub use state::RECEIVE_BUFFER_BYTES;

/// What the stub tells the `on_disconnect` callback about a break.
#[derive(Clone, Debug)]
pub struct Disconnect {
    /// What happened: EOF, an I/O error, vsockd's `ERROR` message, or what
    /// was wrong with a frame from vsockd.
    pub reason: String,
    /// How long the socket that broke had carried the session.
    pub attached_for: Duration,
    /// Guest-to-host offset the application had consumed (what the
    /// `RESUME` that follows asks from).
    pub received: u64,
    /// Host-to-guest offset after the last byte the application wrote.
    pub sent: u64,
    /// Host-to-guest bytes vsockd had acknowledged.
    pub acknowledged: u64,
    /// 1 for the session's first break, 2 for the next, and so on.
    pub break_number: u64,
}

/// A resumable session with a guest port.
///
/// `&Session` implements `Read` and `Write` (as `&TcpStream` does), so one
/// thread may read while another writes. Dropping the session stops it
/// without ending it, as if the process had died: vsockd keeps it for its
/// grace period, and [`Session::resume`] can take it over.
pub struct Session {
    shared: Arc<Shared>,
}

impl Session {
    /// Opens a new session to guest port `port` through vsockd's hybrid
    /// socket `uds_path`. Blocks until the guest accepts.
    pub fn connect(
        uds_path: impl AsRef<Path>,
        port: u32,
        opts: Options,
    ) -> Result<Session, ClientError> {
        let uds_path = uds_path.as_ref();
        let (stream, host_port, token) = attach::open(uds_path, port)?;
        let shared = new_shared(uds_path, token, Some(host_port), opts, State::new)?;
        let link = {
            let mut state = shared.lock();
            state.attached_since = Some(Instant::now());
            Link::new(stream, &state).map_err(|source| ClientError::Io {
                action: "preparing the session's socket",
                source,
            })?
        };
        let session = Session { shared };
        session.spawn_stub(0, link)?;
        Ok(session)
    }

    /// Takes over session `token`, for a process that restarted, having
    /// consumed the guest's stream up to `received` (a value of
    /// [`Session::received`] it stored). Retries while vsockd cannot be
    /// reached, up to `opts.reattach_timeout`.
    ///
    /// The host-to-guest stream continues at [`Session::peer_received`], the
    /// offset vsockd reported: the application must write the bytes from
    /// that offset on.
    pub fn resume(
        uds_path: impl AsRef<Path>,
        token: Token,
        received: u64,
        opts: Options,
    ) -> Result<Session, ClientError> {
        let shared = new_shared(uds_path.as_ref(), token, None, opts, |opts| {
            let mut state = State::new(opts);
            state.g2h.consumed = received;
            if let Some(confirmed) = &mut state.g2h.confirmed {
                *confirmed = received;
            }
            state
        })?;
        let link = match attach::reattach(&shared, 0, true, false) {
            Ok(link) => link,
            Err(ReattachEnd::Failed(failure)) => return Err(failure.into()),
            Err(ReattachEnd::Stopped | ReattachEnd::Finished) => return Err(ClientError::Ended),
        };
        let session = Session { shared };
        session.spawn_stub(0, link)?;
        Ok(session)
    }

    /// The session's token. Keep it secret.
    pub fn token(&self) -> Token {
        self.shared.token
    }

    /// The host-side port from vsockd's reply to `CONNECT`; `None` for a
    /// session taken over with [`Session::resume`].
    pub fn host_port(&self) -> Option<u32> {
        self.shared.host_port
    }

    /// With [`Options::acknowledge_on_read`] off: the application has
    /// recorded its progress up to g2h offset `offset` (at most
    /// [`Session::received`]), so the session may acknowledge that far.
    /// Does nothing when the session acknowledges on read.
    pub fn acknowledge(&self, offset: u64) {
        let mut state = self.shared.lock();
        let consumed = state.g2h.consumed_offset();
        let Some(confirmed) = &mut state.g2h.confirmed else {
            return;
        };
        if offset.min(consumed) > *confirmed {
            *confirmed = offset.min(consumed);
            state.g2h.ack_wanted = true;
            self.shared.wake_stub(&mut state);
        }
    }

    /// How far the application has consumed the guest's stream: the bytes
    /// read, plus one once a read returned 0 at the guest's `END` (the
    /// protocol counts the `END` as one offset). Store this to resume
    /// later.
    pub fn received(&self) -> u64 {
        self.shared.lock().g2h.consumed_offset()
    }

    /// The host-to-guest offset after the last byte the application wrote.
    pub fn sent(&self) -> u64 {
        self.shared.lock().h2g.written()
    }

    /// Host-to-guest bytes vsockd has acknowledged.
    pub fn acknowledged(&self) -> u64 {
        self.shared.lock().h2g.acknowledged
    }

    /// The host-to-guest offset vsockd reported at the last (re)attach.
    pub fn peer_received(&self) -> u64 {
        self.shared.lock().h2g.peer_received
    }

    /// Whether a socket to vsockd carries the session right now.
    pub fn is_attached(&self) -> bool {
        self.shared.lock().attached_since.is_some()
    }

    /// How many times the session was resumed on a new socket (after a
    /// break, or by [`Session::start`]).
    pub fn reattach_count(&self) -> u64 {
        self.shared.lock().reattach_count
    }

    /// Sets the function the stub calls, from its own thread, each time the
    /// connection to vsockd breaks (EOF, I/O error, `ERROR` frame, bad frame
    /// from vsockd), before it reattaches. It replaces any earlier one. It
    /// should return quickly; it may call this session's methods (even
    /// `stop()`), but not wait for its I/O.
    pub fn on_disconnect(&self, f: impl Fn(&Disconnect) + Send + Sync + 'static) {
        self.shared.lock().on_disconnect = Some(Arc::new(f));
    }

    /// Stops the stub: closes the socket (vsockd sees a break and keeps the
    /// session for its grace period) and keeps every buffer and offset.
    /// Reads and writes still use what is buffered, then wait until
    /// [`Session::start`]. Returns once the stub has exited (unless called
    /// from the `on_disconnect` callback, when it exits right after).
    pub fn stop(&self) {
        let stub = {
            let mut state = self.shared.lock();
            if state.lifecycle != Lifecycle::Running {
                return;
            }
            state.lifecycle = Lifecycle::Stopped;
            state.generation += 1;
            state.attached_since = None;
            state.stub.take()
        };
        self.shared.waker.wake();
        self.shared.notify();
        if let Some(stub) = stub {
            if stub.thread().id() != thread::current().id() {
                // A stub that panicked (in the callback) is gone all the same.
                let _ = stub.join();
            }
        }
    }

    /// Starts the stub again after [`Session::stop`]: reattaches with
    /// `RESUME` in the calling thread (retrying up to
    /// `Options::reattach_timeout`) and carries on. Does nothing if the stub
    /// runs; fails if the session ended or failed, or cannot reattach (which
    /// fails the session).
    pub fn start(&self) -> Result<(), ClientError> {
        let generation = {
            let mut state = self.shared.lock();
            match &state.lifecycle {
                Lifecycle::Running => return Ok(()),
                Lifecycle::Finished => return Err(ClientError::Ended),
                Lifecycle::Failed(failure) => return Err(failure.clone().into()),
                Lifecycle::Stopped => {}
            }
            state.lifecycle = Lifecycle::Running;
            state.generation += 1;
            state.generation
        };
        let link = match attach::reattach(&self.shared, generation, false, true) {
            Ok(link) => link,
            Err(ReattachEnd::Stopped) => return Ok(()),
            Err(ReattachEnd::Finished) => {
                let mut state = self.shared.lock();
                if state.generation == generation {
                    state.lifecycle = Lifecycle::Finished;
                }
                self.shared.notify();
                return Ok(());
            }
            Err(ReattachEnd::Failed(failure)) => {
                let mut state = self.shared.lock();
                if state.generation == generation {
                    state.lifecycle = Lifecycle::Failed(failure.clone());
                }
                self.shared.notify();
                return Err(failure.into());
            }
        };
        self.spawn_stub(generation, link)
    }

    fn spawn_stub(&self, generation: u64, link: Link) -> Result<(), ClientError> {
        let mut state = self.shared.lock();
        if state.generation != generation {
            // stop() came first: dropping the link closes its socket.
            return Ok(());
        }
        match stub::spawn(Arc::clone(&self.shared), generation, link) {
            Ok(handle) => {
                state.stub = Some(handle);
                Ok(())
            }
            Err(err) => {
                state.lifecycle = Lifecycle::Stopped;
                state.attached_since = None;
                Err(err)
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("token", &self.shared.token)
            .field("host_port", &self.shared.host_port)
            .finish_non_exhaustive()
    }
}

fn new_shared(
    uds_path: &Path,
    token: Token,
    host_port: Option<u32>,
    opts: Options,
    state: impl FnOnce(&Options) -> State,
) -> Result<Arc<Shared>, ClientError> {
    let waker = Waker::new().map_err(|source| ClientError::Io {
        action: "creating the session's wake-up channel",
        source,
    })?;
    let state = state(&opts);
    Ok(Arc::new(Shared::new(
        uds_path.to_owned(),
        token,
        host_port,
        opts,
        waker,
        state,
    )))
}
