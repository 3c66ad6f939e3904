//! The keeper: the process that owns the vhost-user connection and every fd
//! of the session, and keeps a worker running.
//!
//! It knows nothing of vsock. It reads each vhost-user message whole
//! (header, payload, fds) and forwards it as one frame to the worker; it
//! sends the worker's reply back to the frontend. It holds the fds the
//! worker deposits (see `vsockd_persist::fdstore`).
//!
//! Worker states, as the keeper sees them:
//!
//! ```text
//!   spawned --hand-over--> starting --READY--> ready
//!      ^                      |                  |
//!      |                      +------ dies ------+
//!      +--- at once, or after a back-off --------+
//! ```
//!
//! Control messages go one at a time: the message read last stays
//! `unacked` until the worker's reply for it arrives, and the frontend is
//! not read meanwhile. When a worker dies, the next one gets that message
//! again after its READY; the worker answers it from the state region if
//! its predecessor had already applied it. So the frontend sees every
//! message applied once and answered once, whatever instant the worker
//! died at.
//!
//! The end of a session (the frontend left) is owed to the workers until
//! one confirms it has recorded it: a worker that died before doing so
//! leaves the ended session in the region, and its successor, which
//! adopts it, is told to drop it before it serves the next frontend.
//!
//! Back-off: a worker that dies before READY, or while handling a message
//! that already went to two workers, is probably killed by what it is
//! given. Restarts then wait 10 ms, doubling up to 2 s; any other death
//! restarts at once.
//!
//! Host clients: the keeper, not the worker, accepts them on the host
//! listener (`--uds-path`), which it keeps to itself (it is not in the
//! store, so no worker ever holds it). Each client gets a uid from the
//! keeper's own range (see `vsockd_persist::fdstore::well_known`) and is
//! put in the store under `conn_stream(uid)` at once, *then* sent to the
//! worker in a `HostClient` frame. So a host client is in the keeper's
//! store from the instant it is accepted, and no worker death can lose it:
//! a worker that dies before recording it leaves it in the store, and the
//! next worker finds it in its hand-over with no record naming it and
//! takes it as a new client. The listener is polled only while a session
//! runs (a frontend is connected and no session end is owed to the
//! workers, which drop every connection when told of one), a worker is
//! ready, and every client accepted so far has gone to the worker; clients
//! wait in the listener's backlog meanwhile.
//! Each wake-up accepts at most `HOST_ACCEPTS_PER_WAKEUP`, so a flood of
//! clients does not starve the frontend and the worker's frames; frames go
//! without blocking, and those the link has no room for wait, in order.
//! When the session ends the store drops them with every other
//! connection's stream, as the worker closes every connection.
//!
//! Upgrades (`vsockd upgrade`): the keeper starts a standby worker from
//! the binary on disk and hands it the session once the running worker
//! has quiesced, or rolls back (see `upgrade`); with `--keeper` it then
//! re-executes itself from that binary (see `reexec` and `image`). Workers
//! are always started from the binary the serving worker came from, held
//! open, so a restart after a crash runs the same code whatever became of
//! the file.
//!
//! The keeper also serves the control socket (`vsockd status`), since it
//! outlives the workers and saw every restart: each death is recorded with
//! its time and cause, and connections and queues are read from the state
//! region (see `status_region`). Serving it never blocks (see `control`).

mod image;
mod process;
mod reexec;
mod upgrade;

pub use reexec::ResumeConfig;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info, warn};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vsockd_persist::channel::FLAG_CLOSE;
use vsockd_persist::fdstore::well_known::{self, conn_stream, FIRST_KEEPER_CONN_UID};
use vsockd_persist::{Channel, FdStore, Frame, Geometry, Kind, SharedMemory};

use crate::control::ControlServer;
use crate::error::BackendError;
use crate::signals::ExitSignals;
use crate::status::{KeeperInfo, Mode, Restart, RestartLog, Snapshot, WorkerInfo, WorkerState};
use crate::status_region::RegionReader;
use crate::unix_host::accept_nonblocking;

/// The descriptor number the worker finds its link at.
pub const WORKER_LINK_FD: RawFd = 3;
/// Bytes of a vhost-user message header (vhost-user spec, "Message format").
const VHOST_USER_HEADER_BYTES: usize = 12;
/// Largest vhost-user payload accepted (the vhost crate's MAX_MSG_SIZE).
const MAX_VHOST_USER_PAYLOAD_BYTES: usize = 0x1000;
/// Most fds one vhost-user message carries (the vhost crate's limit).
const MAX_VHOST_USER_FDS: usize = 32;
/// First back-off delay, doubled per further quick death.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
/// Longest back-off delay.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Workers that got the same message and died with it before it counts as
/// the cause.
const POISON_FORWARDS: u32 = 2;
/// Crash points whose names start so are for the first standby worker
/// of an upgrade, not the first worker (see `vsockd_device::crash_point`).
const STANDBY_CRASH_POINT_PREFIX: &str = "standby-";
/// How long a worker gets to exit on SIGTERM before SIGKILL.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(1);
/// Host clients accepted per wake-up at most.
const HOST_ACCEPTS_PER_WAKEUP: usize = 64;
/// Pause in accepting after accept4 failed otherwise than for want of a
/// client (out of descriptors, say): the listener stays readable.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// When a host client frame could not go for another reason than a full
/// link, the wait before trying again.
const CLIENT_SEND_RETRY: Duration = Duration::from_millis(10);

/// A vhost-user message read from the frontend, kept until answered.
struct Pending {
    seq: u64,
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// Workers it was forwarded to.
    forwards: u32,
}

struct Worker {
    /// Its number: workers started before it, plus one.
    number: u64,
    child: process::WorkerProcess,
    link: Channel,
    ready: bool,
    started_at: Instant,
    /// The generation its READY reported.
    generation: Option<u64>,
}

/// What the keeper needs besides its listeners.
pub struct KeeperConfig {
    /// Command line arguments the worker gets (the keeper's own).
    pub worker_args: Vec<OsString>,
    /// The state region's geometry (to read it for status).
    pub geometry: Geometry,
    /// The control socket to serve, if any.
    pub control: Option<ControlServer>,
    /// How status names the vhost-user socket.
    pub socket_label: String,
}

/// Why a worker went away, for the log and `vsockd status`.
fn exit_cause(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = match sig {
            libc::SIGKILL => "SIGKILL",
            libc::SIGABRT => "SIGABRT (abort or panic)",
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGTERM => "SIGTERM",
            libc::SIGBUS => "SIGBUS",
            _ => "a signal",
        };
        format!(
            "killed by signal {sig} ({name}){}",
            if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            }
        )
    } else {
        match status.code() {
            Some(101) => "panicked (exit status 101)".to_string(),
            Some(c) => format!("exited with status {c}"),
            None => "ended".to_string(),
        }
    }
}

/// The keeper process.
pub struct Keeper {
    worker_args: Vec<OsString>,
    /// The binary workers are started from, held open: a restarted worker
    /// runs the very binary its predecessor came from, whatever became of
    /// the file since. An upgrade replaces it.
    worker_exe: OwnedFd,
    /// Where `vsockd upgrade` takes the new binary from: the path this
    /// keeper was started from.
    binary_path: PathBuf,
    /// The upgrade under way, if any.
    upgrade: Option<upgrade::Upgrade>,
    /// Workers an upgrade replaced, told to exit and not yet reaped.
    retiring: Vec<upgrade::Retiring>,
    /// The keeper re-executes itself once at rest (`vsockd upgrade
    /// --keeper`, after the worker's upgrade): the answer so far.
    keeper_exec: Option<String>,
    /// Standby workers started so far.
    standbys_started: u64,
    listener: UnixListener,
    /// The host listener (`--uds-path`), non-blocking.
    host_listener: UnixListener,
    /// The uid the next host client gets.
    next_client_uid: u64,
    /// Host clients in the store not yet sent to the ready worker, oldest
    /// first.
    unsent_clients: VecDeque<u64>,
    /// When to try sending them again; `None` with clients unsent: once
    /// the link has room.
    client_retry_at: Option<Instant>,
    /// Accepting host clients waits until then.
    accept_paused_until: Option<Instant>,
    frontend: Option<UnixStream>,
    store: FdStore,
    worker: Option<Worker>,
    restart_at: Option<Instant>,
    /// Workers started so far.
    started: u64,
    quick_deaths: u32,
    next_seq: u64,
    unacked: Option<Pending>,
    /// A session ended and no worker has confirmed it dropped it: the
    /// next ready worker is told first (it may have adopted the old
    /// session from the region).
    session_end_owed: bool,
    signals: ExitSignals,
    started_at: Instant,
    control: Option<ControlServer>,
    socket_label: String,
    region: RegionReader,
    restarts: RestartLog,
}

impl Keeper {
    /// A keeper serving frontends on `listener` and accepting host clients
    /// on `host_listener`, with a new state memfd in its store.
    pub fn new(
        listener: UnixListener,
        host_listener: UnixListener,
        config: KeeperConfig,
    ) -> Result<Self, BackendError> {
        let state = SharedMemory::create_fd(c"vsockd-state").map_err(BackendError::Persist)?;
        let region = RegionReader::new(
            state.try_clone().map_err(BackendError::Epoll)?,
            config.geometry,
        );
        let mut store = FdStore::default();
        store.deposit(well_known::STATE_REGION, state);
        for l in [&listener, &host_listener] {
            l.set_nonblocking(true).map_err(BackendError::Epoll)?;
        }
        let worker_exe = std::fs::File::open("/proc/self/exe")
            .map(OwnedFd::from)
            .map_err(BackendError::Epoll)?;
        let binary_path = std::env::current_exe().map_err(BackendError::Epoll)?;
        Ok(Keeper {
            worker_args: config.worker_args,
            worker_exe,
            binary_path,
            upgrade: None,
            retiring: Vec::new(),
            keeper_exec: None,
            standbys_started: 0,
            listener,
            host_listener,
            next_client_uid: FIRST_KEEPER_CONN_UID,
            unsent_clients: VecDeque::new(),
            client_retry_at: None,
            accept_paused_until: None,
            frontend: None,
            store,
            worker: None,
            restart_at: Some(Instant::now()),
            started: 0,
            quick_deaths: 0,
            session_end_owed: false,
            next_seq: 1,
            unacked: None,
            signals: ExitSignals::new().map_err(BackendError::Epoll)?,
            started_at: Instant::now(),
            control: config.control,
            socket_label: config.socket_label,
            region,
            restarts: RestartLog::default(),
        })
    }

    /// Starts a worker process from binary `exe`: a standby for an
    /// upgrade, or one that adopts at once. Its hand-over is the caller's.
    fn spawn(&self, exe: &OwnedFd, standby: bool, number: u64) -> io::Result<Worker> {
        let (keeper_end, worker_end) = Channel::pair()?;
        let fd = worker_end.as_raw_fd();
        let mut cmd = Command::new(format!("/proc/self/fd/{}", exe.as_raw_fd()));
        cmd.args(&self.worker_args)
            .arg("--worker-link")
            .arg(WORKER_LINK_FD.to_string());
        if standby {
            cmd.arg("--standby");
        }
        // A crash point is for the first worker, or for the first standby
        // if it is a standby's: the next one carries on.
        let point = std::env::var(vsockd_device::crash_point::CRASH_POINT_ENV).unwrap_or_default();
        let standby_point = point.starts_with(STANDBY_CRASH_POINT_PREFIX);
        let first = if standby {
            self.standbys_started == 0
        } else {
            self.started == 0
        };
        if !first || standby != standby_point {
            cmd.env_remove(vsockd_device::crash_point::CRASH_POINT_ENV);
        }
        // SAFETY: the closure runs in the child between fork and exec and
        // only makes async-signal-safe calls (dup2, fcntl, sigprocmask).
        unsafe {
            cmd.pre_exec(move || {
                if fd == WORKER_LINK_FD {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(fd, WORKER_LINK_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The keeper takes SIGTERM and SIGINT through a signalfd;
                // the worker must not inherit them blocked.
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTERM);
                libc::sigaddset(&mut set, libc::SIGINT);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = process::WorkerProcess::from_child(cmd.spawn()?);
        drop(worker_end);
        Ok(Worker {
            number,
            child,
            link: keeper_end,
            ready: false,
            started_at: Instant::now(),
            generation: None,
        })
    }

    fn spawn_worker(&mut self) -> io::Result<()> {
        let worker = self.spawn(&self.worker_exe, false, self.started + 1)?;
        self.started += 1;
        info!(
            "worker {} started (pid {}), handing over {} fds",
            worker.number,
            worker.child.id(),
            self.store.len()
        );
        // Every host client in the store goes with the hand-over: none may
        // follow in a frame too.
        self.unsent_clients.clear();
        self.client_retry_at = None;
        // A worker that dies during the hand-over is noticed on the link.
        if let Err(e) = self.store.hand_over(&worker.link, self.started - 1) {
            warn!("hand-over to worker {} failed: {e}", worker.number);
        }
        self.worker = Some(worker);
        Ok(())
    }

    /// Runs until SIGTERM or SIGINT.
    pub fn run(&mut self) -> Result<(), BackendError> {
        loop {
            if let Some(at) = self.restart_at {
                if Instant::now() >= at {
                    self.restart_at = None;
                    if let Err(e) = self.spawn_worker() {
                        error!("cannot start a worker: {e}; retrying");
                        self.schedule_restart(true);
                    }
                }
            }
            if self.client_retry_at.is_some_and(|at| Instant::now() >= at) {
                self.send_host_clients();
            }
            if self
                .accept_paused_until
                .is_some_and(|at| Instant::now() >= at)
            {
                self.accept_paused_until = None;
            }
            let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(6);
            let mut push_events = |fd: RawFd, events: libc::c_short| {
                pfds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
                pfds.len() - 1
            };
            let wait_for_room = !self.unsent_clients.is_empty() && self.client_retry_at.is_none();
            let link_events = if wait_for_room {
                libc::POLLIN | libc::POLLOUT
            } else {
                libc::POLLIN
            };
            let accepting = self.accepting();
            let sig_i = push_events(self.signals.fd(), libc::POLLIN);
            let link_i = self
                .worker
                .as_ref()
                .map(|w| push_events(w.link.as_raw_fd(), link_events));
            let host_i =
                accepting.then(|| push_events(self.host_listener.as_raw_fd(), libc::POLLIN));
            let mut push = |fd: RawFd| push_events(fd, libc::POLLIN);
            let listener_i = self
                .frontend
                .is_none()
                .then(|| push(self.listener.as_raw_fd()));
            let serving = self.worker.as_ref().is_some_and(|w| w.ready)
                && self.unacked.is_none()
                && !self.upgrade_holds_the_worker();
            let frontend_i = match (&self.frontend, serving) {
                (Some(f), true) => Some(push(f.as_raw_fd())),
                _ => None,
            };
            let control_i = self.control.as_ref().map(|c| push(c.fd()));
            let standby_i = self
                .upgrade
                .as_ref()
                .map(|u| push(u.standby.link.as_raw_fd()));
            let (retiring_from, retiring_polled) = (pfds.len(), self.retiring.len());
            for r in &self.retiring {
                pfds.push(libc::pollfd {
                    fd: r.worker.link.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let wake_at = [
                self.restart_at,
                self.client_retry_at,
                self.accept_paused_until,
                self.upgrade.as_ref().and_then(|u| u.deadline),
                self.retiring.iter().map(|r| r.kill_at).min(),
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout = wake_at.map_or(-1, |at| {
                at.saturating_duration_since(Instant::now()).as_millis() as i32 + 1
            });
            // SAFETY: poll(2) over a local array of pollfd.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(BackendError::Epoll(e));
            }
            let ready = |i: usize| pfds[i].revents != 0;
            let readable = |i: usize| pfds[i].revents & !libc::POLLOUT != 0;
            let writable = |i: usize| pfds[i].revents & libc::POLLOUT != 0;
            if ready(sig_i) {
                if let Some(sig) = self.signals.take() {
                    info!("{sig} received: stopping the worker and exiting");
                    self.stop_workers();
                    return Ok(());
                }
            }
            if link_i.is_some_and(readable) {
                self.on_worker_readable();
            }
            if link_i.is_some_and(writable) {
                self.send_host_clients();
            }
            if host_i.is_some_and(ready) {
                self.accept_host_clients();
            }
            if listener_i.is_some_and(ready) {
                self.accept_frontend();
            }
            if frontend_i.is_some_and(ready) {
                self.on_frontend_readable();
            }
            if control_i.is_some_and(ready) {
                self.serve_control();
            }
            if standby_i.is_some_and(ready) {
                self.on_standby_readable();
            }
            // Polled before anything above could add to the list.
            let retired: Vec<usize> = (0..retiring_polled)
                .filter(|&i| pfds[retiring_from + i].revents != 0)
                .collect();
            self.reap_retired(&retired);
            self.upgrade_timers();
            self.try_reexec();
        }
    }

    /// Whether to accept host clients now (see the module doc).
    fn accepting(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| w.ready)
            && !self.upgrade_holds_the_worker()
            && self.frontend.is_some()
            && !self.session_end_owed
            && self.unsent_clients.is_empty()
            && self.accept_paused_until.is_none()
    }

    /// Accepts the host clients waiting (a bounded number): each goes in
    /// the store first, then to the worker.
    fn accept_host_clients(&mut self) {
        // The worker may have died since the poll: clients accepted now
        // would go to its successor twice, by hand-over and by frame.
        if !self.accepting() {
            return;
        }
        for _ in 0..HOST_ACCEPTS_PER_WAKEUP {
            match accept_nonblocking(&self.host_listener) {
                Ok(Some(stream)) => {
                    let uid = self.next_client_uid;
                    self.next_client_uid += 1;
                    self.store.deposit(conn_stream(uid), OwnedFd::from(stream));
                    self.unsent_clients.push_back(uid);
                    debug!("host client {uid} accepted");
                }
                Ok(None) => break,
                // A client that left while queued, or a signal.
                Err(e)
                    if e.raw_os_error() == Some(libc::ECONNABORTED)
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    continue
                }
                Err(e) => {
                    warn!(
                        "accepting a host client failed: {e}; accepting again in {ACCEPT_PAUSE:?}"
                    );
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    break;
                }
            }
        }
        self.send_host_clients();
    }

    /// Sends the ready worker the host clients not yet sent, in order,
    /// without blocking: what the link has no room for waits (their
    /// streams stay in the store whatever happens to the worker).
    fn send_host_clients(&mut self) {
        let retrying = self.client_retry_at.take().is_some();
        if self.upgrade_holds_the_worker() {
            // After the upgrade, to whichever worker serves.
            return;
        }
        let Some(w) = self.worker.as_ref().filter(|w| w.ready) else {
            return;
        };
        while let Some(&uid) = self.unsent_clients.front() {
            let Some(fd) = self.store.raw_fd(conn_stream(uid)) else {
                // Dropped with its session.
                self.unsent_clients.pop_front();
                continue;
            };
            match w.link.try_send(Kind::HostClient, 0, uid, &[], &[fd]) {
                Ok(()) => {
                    self.unsent_clients.pop_front();
                }
                // Polled for room.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // A dying worker's link says so soon; anything else
                    // (too many fds in flight, say) passes.
                    if retrying {
                        debug!("host client {uid} still cannot go to the worker: {e}");
                    } else {
                        warn!(
                            "cannot send host client {uid} to worker {}: {e}; trying again in {CLIENT_SEND_RETRY:?}",
                            w.number
                        );
                    }
                    self.client_retry_at = Some(Instant::now() + CLIENT_SEND_RETRY);
                    return;
                }
            }
        }
    }

    /// Answers the control socket's clients.
    fn serve_control(&mut self) {
        let Some(mut control) = self.control.take() else {
            return;
        };
        control.handle_events(self);
        self.control = Some(control);
    }

    /// What `vsockd status` reports now.
    fn snapshot(&mut self) -> Snapshot {
        let now = Instant::now();
        let worker = match &self.worker {
            Some(w) => WorkerInfo {
                pid: Some(w.child.id()),
                generation: w.generation,
                state: if w.ready {
                    WorkerState::Ready
                } else {
                    WorkerState::Starting
                },
                uptime: Some(now.saturating_duration_since(w.started_at)),
            },
            None => WorkerInfo {
                pid: None,
                generation: None,
                state: WorkerState::Restarting,
                uptime: None,
            },
        };
        Snapshot {
            socket: self.socket_label.clone(),
            mode: Mode::Keeper,
            keeper: Some(KeeperInfo {
                pid: std::process::id(),
                uptime: now.saturating_duration_since(self.started_at),
            }),
            worker,
            restarts: self.restarts.clone(),
            frontend_connected: self.frontend.is_some(),
            source: "state region",
            device: self.region.figures(),
        }
    }

    fn accept_frontend(&mut self) {
        match self.listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = stream.set_nonblocking(false) {
                    warn!("frontend socket: {e}");
                    return;
                }
                info!("frontend connected: session starts");
                self.frontend = Some(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => warn!("accepting a frontend failed: {e}"),
        }
    }

    /// The frontend went away or must be dropped: forget the session.
    fn end_session(&mut self, why: &str) {
        if self.frontend.take().is_none() {
            return;
        }
        info!("{why}: session ended; waiting for the next frontend");
        self.unacked = None;
        // Host clients too: the worker closes every connection.
        self.store.clear_session();
        self.unsent_clients.clear();
        self.session_end_owed = true;
        self.send_session_end();
    }

    /// Tells a ready worker the session ended; it confirms with a
    /// SessionEnd frame once it has recorded that.
    fn send_session_end(&self) {
        if let Some(w) = self.worker.as_ref().filter(|w| w.ready) {
            if let Err(e) = w.link.send(Kind::SessionEnd, 0, 0, &[], &[]) {
                warn!("cannot tell the worker the session ended: {e}");
            }
        }
    }

    fn on_frontend_readable(&mut self) {
        let Some(stream) = &self.frontend else { return };
        match read_vhost_user_message(stream) {
            Ok(Some((bytes, fds))) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.unacked = Some(Pending {
                    seq,
                    bytes,
                    fds,
                    forwards: 0,
                });
                self.forward_unacked();
            }
            Ok(None) => self.end_session("frontend disconnected"),
            Err(e) => {
                warn!("bad message from the frontend, closing the session: {e}");
                self.end_session("frontend sent a bad message");
            }
        }
    }

    fn forward_unacked(&mut self) {
        let (Some(p), Some(w)) = (&mut self.unacked, &self.worker) else {
            return;
        };
        if !w.ready {
            return;
        }
        p.forwards += 1;
        let request = p
            .bytes
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes);
        debug!(
            "forwarding control message {} (request {request}) to worker {}, attempt {}",
            p.seq, w.number, p.forwards
        );
        let fds: Vec<RawFd> = p.fds.iter().map(AsRawFd::as_raw_fd).collect();
        if let Err(e) = w.link.send(Kind::Forward, 0, p.seq, &p.bytes, &fds) {
            // The worker is dying; the link will say so.
            warn!("cannot forward message {} to the worker: {e}", p.seq);
        }
    }

    fn on_worker_readable(&mut self) {
        loop {
            let Some(w) = &self.worker else { return };
            let frame = match w.link.try_recv() {
                Ok(Some(f)) => f,
                Ok(None) => return self.on_worker_death(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    warn!("bad frame from the worker, ignored: {e}");
                    continue;
                }
                Err(_) => return self.on_worker_death(),
            };
            match self.store.apply(frame) {
                Ok(None) => {}
                Ok(Some(frame)) => self.on_worker_frame(frame),
                Err(e) => warn!("bad fd-store frame from the worker, ignored: {e}"),
            }
        }
    }

    fn on_worker_frame(&mut self, frame: Frame) {
        match frame.kind {
            Kind::Ready => {
                if let Some(w) = &mut self.worker {
                    info!("worker {} ready (generation {})", w.number, frame.id);
                    w.ready = true;
                    w.generation = Some(frame.id);
                }
                self.worker_ready(frame.flags);
            }
            Kind::Reply => {
                if self.unacked.as_ref().map(|p| p.seq) != Some(frame.id) {
                    debug!("reply to control message {} is stale, dropped", frame.id);
                    return;
                }
                self.unacked = None;
                if !frame.payload.is_empty() {
                    if let Some(stream) = &self.frontend {
                        let fds: Vec<RawFd> = frame.fds.iter().map(AsRawFd::as_raw_fd).collect();
                        if let Err(e) = write_all_with_fds(stream, &frame.payload, &fds) {
                            warn!("cannot reply to the frontend: {e}");
                            self.end_session("frontend write failed");
                            return;
                        }
                    }
                }
                if frame.flags & FLAG_CLOSE != 0 {
                    self.end_session("the worker refused a request");
                }
            }
            Kind::SessionEnd => self.session_end_owed = false,
            Kind::Quiesced => self.on_quiesced(frame.id),
            other => warn!("unexpected {other:?} frame from the worker, ignored"),
        }
    }

    /// The worker now in `self.worker` reported READY with `flags`.
    fn worker_ready(&mut self, flags: u32) {
        if self.session_end_owed || self.frontend.is_none() {
            // The session it adopted is one that ended (while no worker
            // was ready, or before the last one recorded the end): whether
            // or not it could adopt it, it drops it before serving the
            // frontend now connected.
            self.session_end_owed = true;
            self.send_session_end();
        } else if flags & FLAG_CLOSE != 0 {
            self.end_session("the worker could not adopt the session");
        }
        self.forward_unacked();
        self.send_host_clients();
    }

    fn on_worker_death(&mut self) {
        let Some(mut w) = self.worker.take() else {
            return;
        };
        if self.worker_died_in_upgrade(&mut w) {
            return;
        }
        // Host clients not sent yet stay in the store, as do those sent
        // and not recorded: the next worker gets them in its hand-over.
        self.unsent_clients.clear();
        self.client_retry_at = None;
        let cause = match w.child.wait() {
            Ok(status) => exit_cause(status),
            Err(e) => format!("unknown ({e})"),
        };
        let poisoned = self
            .unacked
            .as_ref()
            .is_some_and(|p| p.forwards >= POISON_FORWARDS);
        let quick = !w.ready || poisoned;
        warn!(
            "worker {} (pid {}) {cause}{}; restarting it",
            w.number,
            w.child.id(),
            if w.ready { "" } else { " before it was ready" }
        );
        self.restarts.record(Restart {
            at: SystemTime::now(),
            worker: w.number,
            pid: w.child.id(),
            generation: w.generation,
            cause,
        });
        self.schedule_restart(quick);
    }

    fn schedule_restart(&mut self, quick: bool) {
        self.quick_deaths = if quick { self.quick_deaths + 1 } else { 0 };
        let delay = match self.quick_deaths {
            0 | 1 => Duration::ZERO,
            n => (BACKOFF_FIRST * 2u32.saturating_pow(n - 2)).min(BACKOFF_MAX),
        };
        if !delay.is_zero() {
            warn!("backing off {delay:?} before the next worker");
        }
        self.restart_at = Some(Instant::now() + delay);
    }

    /// Stops every worker process (SIGTERM, then SIGKILL after a grace).
    fn stop_workers(&mut self) {
        if let Some(u) = self.upgrade.take() {
            stop(u.standby);
        }
        for r in std::mem::take(&mut self.retiring) {
            stop(r.worker);
        }
        if let Some(w) = self.worker.take() {
            stop(w);
        }
    }
}

impl crate::control::Requests for Keeper {
    fn snapshot(&mut self) -> Snapshot {
        Keeper::snapshot(self)
    }

    fn start_upgrade(&mut self, keeper: bool) -> Result<(), String> {
        Keeper::start_upgrade(self, keeper)
    }
}

/// Stops a worker process: SIGTERM, then SIGKILL after a grace.
fn stop(mut w: Worker) {
    let _ = w.child.signal(libc::SIGTERM);
    let deadline = Instant::now() + WORKER_EXIT_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = w.child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = w.child.kill();
    let _ = w.child.wait();
}

/// Reads one vhost-user message whole: `Ok(None)` at EOF.
fn read_vhost_user_message(stream: &UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut bytes = vec![0u8; VHOST_USER_HEADER_BYTES];
    let mut raw_fds = [-1 as RawFd; MAX_VHOST_USER_FDS];
    let mut iov = [libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: VHOST_USER_HEADER_BYTES,
    }];
    // SAFETY: the iovec points at `bytes`, valid for its length.
    let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        // SAFETY: the kernel gave us these descriptors; we own them now.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    if n < VHOST_USER_HEADER_BYTES {
        read_exact(stream, &mut bytes[n..])?;
    }
    let size = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if size > MAX_VHOST_USER_PAYLOAD_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message payload of {size} bytes"),
        ));
    }
    bytes.resize(VHOST_USER_HEADER_BYTES + size, 0);
    read_exact(stream, &mut bytes[VHOST_USER_HEADER_BYTES..])?;
    Ok(Some((bytes, fds)))
}

fn read_exact(stream: &UnixStream, buf: &mut [u8]) -> io::Result<()> {
    use std::io::Read;
    let mut s = stream;
    s.read_exact(buf)
}

/// Writes a reply with its fds attached to the first bytes.
fn write_all_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    use std::io::Write;
    let n = stream
        .send_with_fds(&[bytes], fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let mut s = stream;
    s.write_all(&bytes[n..])
}
