//! The one thread of a device: an epoll loop over where control messages
//! come from, the queues' kick eventfds and the muxer's host events.
//!
//! Control messages come from the keeper's link (see `worker_link`), or,
//! with `--no-keeper`, straight from the vhost-user listener and the
//! frontend connection. Host clients likewise: a keeper's worker gets each
//! from the keeper, which accepted it and holds its stream; a worker
//! without a keeper accepts them itself (the muxer polls the host
//! listener).
//!
//! Each wakeup handles every ready event, then processes both queues once
//! (TX before RX, so that replies a TX packet causes go out in the same
//! wakeup). Sessions: at most one frontend at a time; while one is
//! connected the listener is not polled, so a second frontend waits in the
//! backlog until the first leaves. When the frontend disconnects every
//! connection is dropped and the listener is polled again: the socket path
//! stays valid for the next VMM.
//!
//! With `--no-keeper` the loop also serves the control socket (`vsockd
//! status`) from the device's own tables; it never blocks, so a status
//! request costs the datapath one snapshot, taken between two wakeups.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::{debug, info, warn};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use crate::conn_store::RegionStore;
use crate::control::{ControlServer, Requests};
use crate::error::BackendError;
use crate::handler::{kick_token, DeviceConfig, VsockDevice, RX_QUEUE, TX_QUEUE};
use crate::persistence::Persistence;
use crate::signals::ExitSignals;
use crate::status::{Mode, RestartLog, Snapshot, WorkerInfo, WorkerState};
use crate::unix_host::UnixHost;
use crate::worker_link::{KeeperLink, LinkEvent, QuiesceEnd};
use vsockd_device::{Muxer, MuxerConfig};
use vsockd_persist::channel::FLAG_CLOSE;
use vsockd_persist::fdstore::well_known;
use vsockd_persist::fdstore::well_known::{conn_uid, is_keeper_conn_uid, FIRST_WORKER_ID};
use vsockd_persist::{
    migrate, Channel, FdSet, Geometry, Kind, PersistError, Region, Stamp, LAYOUT_VERSION,
};

const LISTENER_TOKEN: u64 = 1;
const FRONTEND_TOKEN: u64 = 2;
const MUXER_TOKEN: u64 = 3;
const SIGNAL_TOKEN: u64 = 4;
const LINK_TOKEN: u64 = 5;
const CONTROL_TOKEN: u64 = 6;
const EVENTS_PER_WAIT: usize = 64;

type Handler = BackendReqHandler<Mutex<VsockDevice>>;

/// Everything `serve` needs.
pub struct ServeConfig {
    pub device: DeviceConfig,
    pub buf_alloc: u32,
    pub max_connections: usize,
    pub resume_grace: std::time::Duration,
}

fn lock(dev: &Mutex<VsockDevice>) -> MutexGuard<'_, VsockDevice> {
    // Only this thread ever locks it, so it cannot be poisoned by another
    // thread; take the guard either way.
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where control messages come from.
enum Control {
    /// `--no-keeper`: the vhost-user listener, and the frontend once one
    /// connected.
    Direct {
        listener: UnixListener,
        frontend: Option<Handler>,
    },
    /// The keeper's link.
    Keeper(KeeperLink),
}

/// The control socket of a worker without a keeper.
pub struct StatusServer {
    pub control: ControlServer,
    /// How status names the vhost-user socket.
    pub socket_label: String,
    pub started_at: Instant,
}

struct EventLoop {
    epoll: OwnedFd,
    control: Control,
    device: Arc<Mutex<VsockDevice>>,
    signals: ExitSignals,
    status: Option<StatusServer>,
    /// A keeper's worker: its generation (0 without a keeper).
    generation: u64,
}

impl EventLoop {
    fn ctl(&self, op: epoll::ControlOptions, fd: RawFd, token: u64) -> Result<(), BackendError> {
        let ev = epoll::Event::new(epoll::Events::EPOLLIN, token);
        epoll::ctl(self.epoll.as_raw_fd(), op, fd, ev).map_err(BackendError::Epoll)
    }

    fn accept_frontend(&mut self) -> Result<(), BackendError> {
        let Control::Direct { listener, frontend } = &mut self.control else {
            return Ok(());
        };
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => {
                warn!("accepting a frontend failed: {e}");
                return Ok(());
            }
        };
        if let Err(e) = stream.set_nonblocking(false) {
            warn!("frontend socket: {e}");
            return Ok(());
        }
        info!("frontend connected: session starts");
        let fd = stream.as_raw_fd();
        *frontend = Some(BackendReqHandler::from_stream(stream, self.device.clone()));
        let lfd = listener.as_raw_fd();
        self.ctl(epoll::ControlOptions::EPOLL_CTL_DEL, lfd, LISTENER_TOKEN)?;
        self.ctl(epoll::ControlOptions::EPOLL_CTL_ADD, fd, FRONTEND_TOKEN)
    }

    fn end_session(&mut self) -> Result<(), BackendError> {
        let Control::Direct { listener, frontend } = &mut self.control else {
            return Ok(());
        };
        let lfd = listener.as_raw_fd();
        if let Some(handler) = frontend.take() {
            let _ = epoll::ctl(
                self.epoll.as_raw_fd(),
                epoll::ControlOptions::EPOLL_CTL_DEL,
                handler.as_raw_fd(),
                epoll::Event::new(epoll::Events::empty(), 0),
            );
        }
        lock(&self.device).end_session();
        info!("session ended; waiting for the next frontend");
        self.ctl(epoll::ControlOptions::EPOLL_CTL_ADD, lfd, LISTENER_TOKEN)
    }

    fn frontend_request(&mut self) -> Result<(), BackendError> {
        let Control::Direct {
            frontend: Some(handler),
            ..
        } = &mut self.control
        else {
            return Ok(());
        };
        match handler.handle_request() {
            Ok(()) => Ok(()),
            Err(VhostError::Disconnected | VhostError::PartialMessage) => {
                info!("frontend disconnected");
                self.end_session()
            }
            Err(e) => {
                warn!("frontend request failed, closing the session: {e}");
                self.end_session()
            }
        }
    }

    /// Answers the control socket's clients.
    fn serve_status(&mut self) {
        let Some(status) = &mut self.status else {
            return;
        };
        let frontend_connected = matches!(
            self.control,
            Control::Direct {
                frontend: Some(_),
                ..
            }
        );
        let device = &self.device;
        let (socket, started_at) = (&status.socket_label, status.started_at);
        let mut snapshot = || Snapshot {
            socket: socket.clone(),
            mode: Mode::Alone,
            keeper: None,
            worker: WorkerInfo {
                pid: Some(std::process::id()),
                generation: None,
                state: WorkerState::Ready,
                uptime: Some(started_at.elapsed()),
            },
            restarts: RestartLog::default(),
            frontend_connected,
            source: "worker",
            device: lock(device).status_figures(),
        };
        status.control.handle_events(&mut AloneRequests {
            snapshot: &mut snapshot,
        });
    }

    fn run(&mut self) -> Result<(), BackendError> {
        let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); EVENTS_PER_WAIT];
        loop {
            let n = match epoll::wait(self.epoll.as_raw_fd(), -1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BackendError::Epoll(e)),
            };
            for ev in &events[..n] {
                match ev.data {
                    LISTENER_TOKEN => self.accept_frontend()?,
                    FRONTEND_TOKEN => self.frontend_request()?,
                    LINK_TOKEN => {
                        let Control::Keeper(link) = &mut self.control else {
                            continue;
                        };
                        match link.on_readable(&self.device) {
                            LinkEvent::Idle => {}
                            LinkEvent::KeeperGone => {
                                info!("the keeper is gone: exiting");
                                return Ok(());
                            }
                            LinkEvent::Quiesce => {
                                // Between two handlers nothing is half
                                // done: the events not handled yet (and
                                // the queues) are left to the successor,
                                // or to this worker after a resume.
                                lock(&self.device).quiesce_sessions();
                                let signals = self.signals.fd();
                                match link.quiesce(&self.device, self.generation, signals) {
                                    QuiesceEnd::Exit => {
                                        info!("worker retired: exiting");
                                        return Ok(());
                                    }
                                    QuiesceEnd::Resume => break,
                                }
                            }
                        }
                    }
                    MUXER_TOKEN => lock(&self.device).process_host_events(),
                    CONTROL_TOKEN => self.serve_status(),
                    SIGNAL_TOKEN => {
                        if let Some(sig) = self.signals.take() {
                            if let Control::Keeper(_) = self.control {
                                // The session is the keeper's to end: leave
                                // it as it is, for the next worker.
                                info!("{sig} received: worker exiting");
                                return Ok(());
                            }
                            info!("{sig} received: exiting");
                            lock(&self.device).end_session();
                            return Ok(());
                        }
                    }
                    t => {
                        let dev = lock(&self.device);
                        for q in [RX_QUEUE, TX_QUEUE] {
                            if t == kick_token(q) {
                                dev.ack_kick(q);
                            }
                        }
                    }
                }
            }
            lock(&self.device).process_queues();
        }
    }
}

/// What a worker without a keeper answers on its control socket.
struct AloneRequests<'a> {
    snapshot: &'a mut dyn FnMut() -> Snapshot,
}

impl Requests for AloneRequests<'_> {
    fn snapshot(&mut self) -> Snapshot {
        (self.snapshot)()
    }

    fn start_upgrade(&mut self, _keeper: bool) -> Result<(), String> {
        Err("this instance runs without a keeper (--no-keeper), so it cannot be upgraded in place; restart it instead".into())
    }
}

/// What every loop has: its epoll set (already polling the exit signals
/// and the muxer), the device and the signals.
struct Parts {
    epoll: OwnedFd,
    device: Arc<Mutex<VsockDevice>>,
    signals: ExitSignals,
}

impl Parts {
    fn into_loop(self, control: Control) -> EventLoop {
        EventLoop {
            epoll: self.epoll,
            control,
            device: self.device,
            signals: self.signals,
            status: None,
            generation: 0,
        }
    }
}

/// The device, and an epoll set polling the exit signals and its muxer.
fn build(host: UnixHost, cfg: &ServeConfig) -> Result<Parts, BackendError> {
    let signals = ExitSignals::new().map_err(BackendError::Epoll)?;
    let fd = epoll::create(true).map_err(BackendError::Epoll)?;
    // SAFETY: `epoll::create` returned a new descriptor that we own.
    let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
    let muxer = Muxer::new(
        MuxerConfig {
            guest_cid: cfg.device.guest_cid,
            buf_alloc: cfg.buf_alloc,
            max_connections: cfg.max_connections,
            resume_grace: cfg.resume_grace,
        },
        host,
    )?;
    let muxer_fd = muxer.epoll_fd();
    let device = VsockDevice::new(cfg.device, epoll.as_raw_fd(), muxer);
    // The vhost crate's handler takes an `Arc`; the device never leaves this
    // thread (its chains hold raw pointers into guest memory).
    #[allow(clippy::arc_with_non_send_sync)]
    let device = Arc::new(Mutex::new(device));
    for (fd, token) in [(signals.fd(), SIGNAL_TOKEN), (muxer_fd, MUXER_TOKEN)] {
        let ev = epoll::Event::new(epoll::Events::EPOLLIN, token);
        epoll::ctl(
            epoll.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_ADD,
            fd,
            ev,
        )
        .map_err(BackendError::Epoll)?;
    }
    Ok(Parts {
        epoll,
        device,
        signals,
    })
}

/// Serves frontends on `listener`, bridging to `host`, and `status`'s
/// control socket if any, until SIGTERM or SIGINT (`--no-keeper`).
pub fn serve(
    listener: UnixListener,
    host: UnixHost,
    cfg: ServeConfig,
    status: Option<StatusServer>,
) -> Result<(), BackendError> {
    listener
        .set_nonblocking(true)
        .map_err(BackendError::Epoll)?;
    let lfd = listener.as_raw_fd();
    let mut el = build(host, &cfg)?.into_loop(Control::Direct {
        listener,
        frontend: None,
    });
    el.ctl(epoll::ControlOptions::EPOLL_CTL_ADD, lfd, LISTENER_TOKEN)?;
    if let Some(status) = status {
        el.ctl(
            epoll::ControlOptions::EPOLL_CTL_ADD,
            status.control.fd(),
            CONTROL_TOKEN,
        )?;
        el.status = Some(status);
    }
    el.run()
}

/// A keeper's worker built and linked, before it takes the session over:
/// what a standby worker prepares while the worker it replaces still
/// serves.
pub struct PreparedWorker {
    parts: Parts,
    link: Channel,
    state: StateRegion,
    /// A standby: the worker it replaces quiesced for it (an upgrade),
    /// so resumable sessions stay attached.
    handover: bool,
}

/// The state region a keeper's worker starts with.
pub enum StateRegion {
    /// In this build's layout, mapped.
    Mapped(Region),
    /// In an older layout this build migrates from: migrated into a copy
    /// when the worker takes over (see `vsockd_persist::migrate`).
    Older { fd: OwnedFd, geometry: Geometry },
}

impl StateRegion {
    /// The state region in memfd `fd`: formatted if it is new and
    /// `format` allows (a standby never formats), left for migration if
    /// it is older, refused if this build cannot read it.
    pub fn open(fd: OwnedFd, geometry: Geometry, format: bool) -> Result<Self, BackendError> {
        let stamp = Stamp::read(&fd).map_err(PersistError::Io)?;
        if stamp.version != 0 && migrate::needs_migration(&fd, &geometry)?.is_some() {
            return Ok(StateRegion::Older { fd, geometry });
        }
        if format {
            return Ok(StateRegion::Mapped(Region::open(fd, geometry)?.0));
        }
        Ok(StateRegion::Mapped(Region::open_existing(fd, geometry)?))
    }

    /// Its layout version.
    pub fn layout_version(&self) -> u32 {
        match self {
            StateRegion::Mapped(_) => LAYOUT_VERSION,
            StateRegion::Older { fd, .. } => Stamp::read(fd).map_or(0, |s| s.version),
        }
    }

    /// The region mapped in this build's layout: an older one is migrated
    /// into a new memfd, which the keeper gets under the state region's
    /// id (it keeps the old one until this worker is ready).
    fn into_region(self, link: &Channel) -> Result<Region, BackendError> {
        match self {
            StateRegion::Mapped(r) => Ok(r),
            StateRegion::Older { fd, geometry } => {
                let copy = migrate::migrate(&fd, &geometry)?;
                link.send_fds(&[(well_known::STATE_REGION, copy.as_raw_fd())])
                    .map_err(BackendError::Link)?;
                Ok(Region::open_existing(copy, geometry)?)
            }
        }
    }
}

/// Builds a keeper's worker over `state` (not yet written).
pub fn prepare_worker(
    link: Channel,
    state: StateRegion,
    host: UnixHost,
    cfg: &ServeConfig,
    handover: bool,
) -> Result<PreparedWorker, BackendError> {
    let parts = build(host, cfg)?;
    Ok(PreparedWorker {
        parts,
        link,
        state,
        handover,
    })
}

impl PreparedWorker {
    /// The link to the keeper.
    pub fn link(&self) -> &Channel {
        &self.link
    }

    /// Takes the session in the region over with the fds handed over,
    /// takes the host clients no worker recorded, tells the keeper it is
    /// ready, and serves until the keeper goes away, retires it, or a
    /// signal comes.
    ///
    /// Taking the generation is the first write to the region: until
    /// then, the worker this one replaces may serve on (see `keeper`).
    ///
    /// A host client's stream in the hand-over under a keeper uid that no
    /// record named, above the region's host-client mark, was accepted by
    /// the keeper and never recorded by a dead worker (it died before the
    /// frame reached it, or before it wrote the record): it is taken as a
    /// new client. At or below the mark it belonged to a connection a
    /// worker recorded and then freed, and is withdrawn with every other
    /// id left.
    pub fn serve(self, mut fds: FdSet) -> Result<(), BackendError> {
        let PreparedWorker {
            parts,
            link,
            state,
            handover,
        } = self;
        let region = state.into_region(&link)?;
        let generation = region.next_generation();
        vsockd_device::crash_point::hit("standby-adopt");
        let keeper = link.try_clone().map_err(BackendError::Link)?;
        let link_fd = link.as_raw_fd();
        let marks = region.clone();
        let mut close = 0;
        let (features, protocol_features) = {
            let mut dev = lock(&parts.device);
            let store_link = keeper.try_clone().map_err(BackendError::Link)?;
            dev.muxer
                .set_store(Box::new(RegionStore::new(region.clone(), store_link)));
            let persistence = Persistence::new(region, keeper).ok_or_else(|| {
                BackendError::Link(io::Error::other("the state region has no TX inflight log"))
            })?;
            dev.set_persistence(persistence);
            match dev.adopt(&mut fds, handover) {
                Ok(true) => info!("worker generation {generation}: session adopted"),
                Ok(false) => info!("worker generation {generation}: no session to adopt"),
                Err(e) => {
                    warn!(
                        "worker generation {generation} cannot adopt the session, dropping it: {e}"
                    );
                    dev.end_session();
                    if let Some(p) = dev.persistence() {
                        p.free_conn_slots();
                    }
                    let seq = dev.persistence().map_or(0, |p| p.msg_seq);
                    dev.commit_session(seq, &[]);
                    close = FLAG_CLOSE;
                }
            }
            // After adoption, which raises the mark past the keeper uids
            // that records name.
            let recorded = marks.last_host_client_uid();
            let unrecorded = fds.take_where(|id| {
                conn_uid(id).is_some_and(|uid| is_keeper_conn_uid(uid) && uid > recorded)
            });
            if !unrecorded.is_empty() {
                info!(
                    "{} host clients the keeper accepted were never recorded: taking them",
                    unrecorded.len()
                );
            }
            for (id, fd) in unrecorded {
                let Some(uid) = conn_uid(id) else { continue };
                let stream = UnixStream::from(fd);
                if let Err(e) = stream.set_nonblocking(true) {
                    warn!("host client {uid}: {e}");
                }
                debug!("host client {uid}: taken from the hand-over (recorded up to {recorded})");
                dev.muxer.add_host_client(stream, uid);
            }
            let stale: Vec<u64> = fds
                .unreferenced()
                .into_iter()
                .filter(|&id| id >= FIRST_WORKER_ID)
                .collect();
            if let Some(p) = dev.persistence() {
                p.withdraw(&stale);
            }
            dev.features()
        };
        let mut keeper_link = KeeperLink::new(link, &parts.device).map_err(BackendError::Link)?;
        keeper_link.prime(features, protocol_features);
        keeper_link
            .send(Kind::Ready, close, generation)
            .map_err(BackendError::Link)?;
        let mut el = parts.into_loop(Control::Keeper(keeper_link));
        el.generation = generation;
        el.ctl(epoll::ControlOptions::EPOLL_CTL_ADD, link_fd, LINK_TOKEN)?;
        lock(&el.device).process_queues();
        el.run()
    }
}
