//! The one thread of a device: an epoll loop over the vhost-user listener,
//! the frontend connection, the queues' kick eventfds and the muxer's host
//! events.
//!
//! Each wakeup handles every ready event, then processes both queues once
//! (TX before RX, so that replies a TX packet causes go out in the same
//! wakeup). Sessions: at most one frontend at a time; while one is
//! connected the listener is not polled, so a second frontend waits in the
//! backlog until the first leaves. When the frontend disconnects every
//! connection is dropped and the listener is polled again: the socket path
//! stays valid for the next VMM.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{info, warn};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use crate::error::BackendError;
use crate::handler::{kick_token, DeviceConfig, VsockDevice, RX_QUEUE, TX_QUEUE};
use crate::signals::ExitSignals;
use crate::unix_host::UnixHost;
use vsockd_device::{Muxer, MuxerConfig};

const LISTENER_TOKEN: u64 = 1;
const FRONTEND_TOKEN: u64 = 2;
const MUXER_TOKEN: u64 = 3;
const SIGNAL_TOKEN: u64 = 4;
const EVENTS_PER_WAIT: usize = 64;

type Handler = BackendReqHandler<Mutex<VsockDevice>>;

/// Everything `serve` needs.
pub struct ServeConfig {
    pub device: DeviceConfig,
    pub buf_alloc: u32,
}

fn lock(dev: &Mutex<VsockDevice>) -> MutexGuard<'_, VsockDevice> {
    // Only this thread ever locks it, so it cannot be poisoned by another
    // thread; take the guard either way.
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

struct EventLoop {
    epoll: OwnedFd,
    listener: UnixListener,
    device: Arc<Mutex<VsockDevice>>,
    frontend: Option<Handler>,
    signals: ExitSignals,
}

impl EventLoop {
    fn ctl(&self, op: epoll::ControlOptions, fd: RawFd, token: u64) -> Result<(), BackendError> {
        let ev = epoll::Event::new(epoll::Events::EPOLLIN, token);
        epoll::ctl(self.epoll.as_raw_fd(), op, fd, ev).map_err(BackendError::Epoll)
    }

    fn accept_frontend(&mut self) -> Result<(), BackendError> {
        let stream = match self.listener.accept() {
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
        self.frontend = Some(BackendReqHandler::from_stream(stream, self.device.clone()));
        self.ctl(
            epoll::ControlOptions::EPOLL_CTL_DEL,
            self.listener.as_raw_fd(),
            LISTENER_TOKEN,
        )?;
        self.ctl(epoll::ControlOptions::EPOLL_CTL_ADD, fd, FRONTEND_TOKEN)
    }

    fn end_session(&mut self) -> Result<(), BackendError> {
        if let Some(handler) = self.frontend.take() {
            let _ = epoll::ctl(
                self.epoll.as_raw_fd(),
                epoll::ControlOptions::EPOLL_CTL_DEL,
                handler.as_raw_fd(),
                epoll::Event::new(epoll::Events::empty(), 0),
            );
        }
        lock(&self.device).end_session();
        info!("session ended; waiting for the next frontend");
        self.ctl(
            epoll::ControlOptions::EPOLL_CTL_ADD,
            self.listener.as_raw_fd(),
            LISTENER_TOKEN,
        )
    }

    fn frontend_request(&mut self) -> Result<(), BackendError> {
        let Some(handler) = self.frontend.as_mut() else {
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
                    MUXER_TOKEN => lock(&self.device).process_host_events(),
                    SIGNAL_TOKEN => {
                        if let Some(sig) = self.signals.take() {
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

/// Serves frontends on `listener`, bridging to `host`, until SIGTERM or
/// SIGINT.
pub fn serve(listener: UnixListener, host: UnixHost, cfg: ServeConfig) -> Result<(), BackendError> {
    let signals = ExitSignals::new().map_err(BackendError::Epoll)?;
    let fd = epoll::create(true).map_err(BackendError::Epoll)?;
    // SAFETY: `epoll::create` returned a new descriptor that we own.
    let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
    listener
        .set_nonblocking(true)
        .map_err(BackendError::Epoll)?;
    let muxer = Muxer::new(
        MuxerConfig {
            guest_cid: cfg.device.guest_cid,
            buf_alloc: cfg.buf_alloc,
        },
        host,
    )?;
    let muxer_fd = muxer.epoll_fd();
    let device = VsockDevice::new(cfg.device, epoll.as_raw_fd(), muxer);
    // The vhost crate's handler takes an `Arc`; the device never leaves this
    // thread (its chains hold raw pointers into guest memory).
    #[allow(clippy::arc_with_non_send_sync)]
    let device = Arc::new(Mutex::new(device));
    let mut el = EventLoop {
        epoll,
        listener,
        device,
        frontend: None,
        signals,
    };
    el.ctl(
        epoll::ControlOptions::EPOLL_CTL_ADD,
        el.signals.fd(),
        SIGNAL_TOKEN,
    )?;
    el.ctl(
        epoll::ControlOptions::EPOLL_CTL_ADD,
        el.listener.as_raw_fd(),
        LISTENER_TOKEN,
    )?;
    el.ctl(epoll::ControlOptions::EPOLL_CTL_ADD, muxer_fd, MUXER_TOKEN)?;
    el.run()
}
