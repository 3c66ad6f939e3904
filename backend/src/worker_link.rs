//! The worker's end of the keeper link: control messages arrive whole, one
//! frame each, and are applied by the vhost crate's request handler.
//!
//! The handler reads a byte stream, so each forwarded message is written
//! into one end of a local socket pair (fds attached to its first byte) and
//! the handler reads it from the other; whatever it writes back is the
//! reply. After applying message `n` the worker writes the session record
//! (with `n` and the reply) and only then sends the reply to the keeper.
//! A message whose number the record already holds was applied by a
//! predecessor: its saved reply is sent and it is not applied again.
//!
//! The vhost crate's handler keeps the negotiated features itself; a new
//! worker primes a fresh handler by replaying GET_FEATURES, SET_FEATURES
//! and SET_PROTOCOL_FEATURES with the recorded values (the device applies
//! them idempotently).
//!
//! Host clients: the keeper accepts them, not the worker. Each arrives as
//! a `HostClient` frame whose stream the keeper already holds under the
//! uid the frame names, so it is in the keeper's store from the instant it
//! was accepted and no worker death loses it: a worker that dies before
//! recording it leaves it to its successor, which finds it in the
//! hand-over with no record naming it and takes it as a new client (see
//! `event_loop::serve_worker`). The worker records the connection before
//! it marks the uid taken in the state region, and withdraws the stream
//! like any connection's when it is done with it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use log::{debug, info, warn};
use vhost::vhost_user::BackendReqHandler;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vsockd_persist::channel::FLAG_CLOSE;
use vsockd_persist::fdstore::well_known::{conn_stream, is_keeper_conn_uid};
use vsockd_persist::{Channel, FdKeeper, Frame, Kind};

use crate::handler::VsockDevice;

type Handler = BackendReqHandler<Mutex<VsockDevice>>;

/// vhost-user requests replayed to prime a handler (vhost-user spec).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_PROTOCOL_FEATURES: u32 = 16;
/// Header flags: protocol version 1.
const VHOST_USER_VERSION: u32 = 1;
/// Largest reply read back from the handler.
const MAX_REPLY_BYTES: usize = 0x1000 + 12;

/// What the keeper asked for.
pub enum LinkEvent {
    /// Nothing more to read now.
    Idle,
    /// The keeper is gone: the worker must exit.
    KeeperGone,
    /// Stop serving for an upgrade (see [`KeeperLink::quiesce`]); frames
    /// after this one are left on the link.
    Quiesce,
}

/// How a quiesced worker's wait ended.
pub enum QuiesceEnd {
    /// The upgrade failed before anything else wrote the state region:
    /// serve again.
    Resume,
    /// A successor serves now, or the keeper is gone: exit without
    /// writing anything.
    Exit,
}

/// The link and the handler it feeds.
pub struct KeeperLink {
    link: Channel,
    local: UnixStream,
    handler: Handler,
}

fn lock(dev: &Mutex<VsockDevice>) -> std::sync::MutexGuard<'_, VsockDevice> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

fn new_handler(device: &Arc<Mutex<VsockDevice>>) -> io::Result<(UnixStream, Handler)> {
    let (local, remote) = UnixStream::pair()?;
    Ok((
        local,
        BackendReqHandler::from_stream(remote, device.clone()),
    ))
}

impl KeeperLink {
    pub fn new(link: Channel, device: &Arc<Mutex<VsockDevice>>) -> io::Result<Self> {
        let (local, handler) = new_handler(device)?;
        Ok(KeeperLink {
            link,
            local,
            handler,
        })
    }

    /// Sends a frame to the keeper.
    pub fn send(&self, kind: Kind, flags: u32, id: u64) -> io::Result<()> {
        self.link.send(kind, flags, id, &[], &[])
    }

    /// Replays the negotiated features into a fresh handler.
    pub fn prime(&mut self, features: u64, protocol_features: u64) {
        // GET_FEATURES always: the handler answers REPLY_ACK requests only
        // once it has offered PROTOCOL_FEATURES, whatever was acked since
        // (regression: a restart between GET_PROTOCOL_FEATURES and
        // SET_PROTOCOL_FEATURES left SET_OWNER unanswered). Frontends
        // negotiate protocol features before virtio features (QEMU sets
        // them right after GET_FEATURES, and SET_FEATURES only when the
        // driver starts), so either may be set alone.
        let mut msgs = vec![message(GET_FEATURES, &[])];
        if features != 0 {
            msgs.push(message(SET_FEATURES, &features.to_le_bytes()));
        }
        if protocol_features != 0 {
            msgs.push(message(
                SET_PROTOCOL_FEATURES,
                &protocol_features.to_le_bytes(),
            ));
        }
        for m in msgs {
            if let Err(e) = self.apply(&m, &[]) {
                warn!("priming the request handler failed: {e}");
            }
        }
    }

    /// Applies one message through the handler; returns its reply.
    fn apply(&mut self, bytes: &[u8], fds: &[RawFd]) -> Result<(Vec<u8>, Vec<OwnedFd>), String> {
        let sent = self
            .local
            .send_with_fds(&[bytes], fds)
            .map_err(|e| format!("local send: {e}"))?;
        if sent < bytes.len() {
            use std::io::Write;
            (&self.local)
                .write_all(&bytes[sent..])
                .map_err(|e| format!("local send: {e}"))?;
        }
        let result = self.handler.handle_request();
        let reply = self
            .drain_reply()
            .map_err(|e| format!("local reply: {e}"))?;
        match result {
            Ok(()) => Ok(reply),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Whatever the handler wrote back, without waiting.
    fn drain_reply(&mut self) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let mut out = Vec::new();
        let mut fds = Vec::new();
        loop {
            let mut buf = vec![0u8; MAX_REPLY_BYTES];
            let mut raw = [-1 as RawFd; 8];
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            self.local.set_nonblocking(true)?;
            // SAFETY: the iovec points at `buf`, valid for its length.
            let r = unsafe { self.local.recv_with_fds(&mut iov, &mut raw) };
            self.local.set_nonblocking(false)?;
            match r {
                Ok((0, _)) => return Ok((out, fds)),
                Ok((n, nfds)) => {
                    out.extend_from_slice(&buf[..n]);
                    // SAFETY: the kernel gave us these descriptors.
                    fds.extend(
                        raw[..nfds]
                            .iter()
                            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
                Err(e) if e.errno() == libc::EAGAIN => return Ok((out, fds)),
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
            }
        }
    }

    /// Reads and handles every frame waiting on the link.
    pub fn on_readable(&mut self, device: &Arc<Mutex<VsockDevice>>) -> LinkEvent {
        loop {
            let frame = match self.link.try_recv() {
                Ok(Some(f)) => f,
                Ok(None) => return LinkEvent::KeeperGone,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LinkEvent::Idle,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    warn!("bad frame from the keeper, ignored: {e}");
                    continue;
                }
                Err(e) => {
                    warn!("keeper link: {e}");
                    return LinkEvent::KeeperGone;
                }
            };
            match frame.kind {
                Kind::Forward => self.forward(frame, device),
                Kind::SessionEnd => self.end_session(device),
                Kind::HostClient => self.host_client(frame, device),
                Kind::Quiesce => return LinkEvent::Quiesce,
                other => warn!("unexpected {other:?} frame from the keeper, ignored"),
            }
        }
    }

    /// Quiesces for an upgrade: called between two wakeups, when every
    /// socket call the worker made is recorded in the state region and no
    /// RX batch is pending. Tells the keeper (after every deposit and
    /// withdrawal sent so far, since the link keeps frames in order), then
    /// reads nothing but the link, blocking, until the keeper says how the
    /// upgrade ended. Frames other than those the keeper may send now are
    /// kept for after a resume.
    pub fn quiesce(
        &mut self,
        device: &Arc<Mutex<VsockDevice>>,
        generation: u64,
        signal_fd: RawFd,
    ) -> QuiesceEnd {
        if let Err(e) = self.send(Kind::Quiesced, 0, generation) {
            warn!("cannot tell the keeper this worker quiesced: {e}");
            return QuiesceEnd::Exit;
        }
        info!("quiesced for an upgrade: waiting for the keeper");
        let mut deferred = Vec::new();
        let end = loop {
            let mut pfds = [
                libc::pollfd {
                    fd: self.link.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: signal_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll(2) over a local array of pollfd.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("waiting while quiesced: {e}");
                break QuiesceEnd::Exit;
            }
            if pfds[1].revents != 0 {
                info!("signal received while quiesced: worker exiting");
                break QuiesceEnd::Exit;
            }
            match self.link.try_recv() {
                Ok(Some(frame)) => match frame.kind {
                    Kind::Resume => break QuiesceEnd::Resume,
                    Kind::Retire => break QuiesceEnd::Exit,
                    Kind::Quiesce => {}
                    other => {
                        warn!("{other:?} frame while quiesced: handled after a resume");
                        deferred.push(frame);
                    }
                },
                Ok(None) => break QuiesceEnd::Exit,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    warn!("bad frame from the keeper, ignored: {e}");
                }
                Err(e) => {
                    warn!("keeper link: {e}");
                    break QuiesceEnd::Exit;
                }
            }
        };
        if let QuiesceEnd::Resume = end {
            info!("the upgrade was called off: serving again");
            for frame in deferred {
                match frame.kind {
                    Kind::Forward => self.forward(frame, device),
                    Kind::SessionEnd => self.end_session(device),
                    Kind::HostClient => self.host_client(frame, device),
                    other => warn!("unexpected {other:?} frame from the keeper, ignored"),
                }
            }
        }
        end
    }

    /// A host client the keeper accepted (and holds under `frame.id`):
    /// the device takes it; the event loop processes the queues after.
    fn host_client(&mut self, frame: Frame, device: &Arc<Mutex<VsockDevice>>) {
        let uid = frame.id;
        let mut fds = frame.fds.into_iter();
        if !is_keeper_conn_uid(uid) {
            // It would share a uid with a connection of the worker's own.
            warn!("host client frame with uid {uid}, outside the keeper's range: dropped");
            return;
        }
        let Some(fd) = fds.next() else {
            warn!("host client frame {uid} without its stream: telling the keeper to close it");
            if let Err(e) = self.link.withdraw(&[conn_stream(uid)]) {
                warn!("cannot tell the keeper to close host client {uid}: {e}");
            }
            return;
        };
        if fds.next().is_some() {
            warn!("host client frame {uid} carries more than one fd: the others are closed");
        }
        vsockd_device::crash_point::hit("host-client");
        debug!("host client {uid} from the keeper");
        lock(device)
            .muxer
            .add_host_client(UnixStream::from(fd), uid);
    }

    fn end_session(&mut self, device: &Arc<Mutex<VsockDevice>>) {
        let mut dev = lock(device);
        dev.end_session();
        let seq = dev.persistence().map_or(0, |p| p.msg_seq);
        dev.commit_session(seq, &[]);
        drop(dev);
        match new_handler(device) {
            Ok((local, handler)) => {
                self.local = local;
                self.handler = handler;
                self.prime(0, 0);
            }
            Err(e) => warn!("cannot renew the request handler: {e}"),
        }
        // Recorded: the keeper need not tell the next worker.
        if let Err(e) = self.send(Kind::SessionEnd, 0, 0) {
            warn!("cannot confirm the end of the session to the keeper: {e}");
        }
    }

    fn forward(&mut self, frame: Frame, device: &Arc<Mutex<VsockDevice>>) {
        let seq = frame.id;
        // The message being applied names the fds it deposits.
        let saved = lock(device).persistence().and_then(|p| {
            p.msg_seq = seq;
            p.saved_reply(seq)
        });
        if let Some(reply) = saved {
            debug!("control message {seq} was applied before the restart: saved reply");
            self.reply(seq, 0, &reply, &[]);
            return;
        }
        let fds: Vec<RawFd> = frame.fds.iter().map(AsRawFd::as_raw_fd).collect();
        let (reply, reply_fds, flags) = match self.apply(&frame.payload, &fds) {
            Ok((reply, reply_fds)) => (reply, reply_fds, 0),
            Err(e) => {
                warn!("frontend request failed, closing the session: {e}");
                (Vec::new(), Vec::new(), FLAG_CLOSE)
            }
        };
        lock(device).commit_session(seq, &reply);
        let raw: Vec<RawFd> = reply_fds.iter().map(AsRawFd::as_raw_fd).collect();
        self.reply(seq, flags, &reply, &raw);
    }

    fn reply(&self, seq: u64, flags: u32, reply: &[u8], fds: &[RawFd]) {
        if let Err(e) = self.link.send(Kind::Reply, flags, seq, reply, fds) {
            warn!("cannot send the reply to control message {seq}: {e}");
        }
    }
}

/// A vhost-user request message: header and payload.
fn message(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + payload.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&VHOST_USER_VERSION.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}
