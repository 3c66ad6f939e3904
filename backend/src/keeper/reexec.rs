//! The keeper's own upgrade (`vsockd upgrade --keeper`): once its worker
//! was upgraded (which proves the new binary starts, reads the state
//! region and takes over), the keeper re-executes itself from that same
//! binary, in the same process, keeping every descriptor (see `image`).
//!
//! ```text
//!   worker upgraded --at rest--> image written, execve --> new keeper
//!                                       |                  answers the
//!                                   execve fails           waiting client
//!                                       v
//!                          old keeper carries on, answers the error
//! ```
//!
//! At rest means a ready worker, no control message in flight, no
//! upgrade under way and no retired worker left to reap; meanwhile the
//! keeper reads neither the frontend nor the host listener. The worker
//! serves throughout: the datapath never goes through the keeper.

use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use log::{error, info, warn};
use vsockd_persist::fdstore::well_known;
use vsockd_persist::{Channel, FdStore, Geometry};

use super::image::{own, set_cloexec, Image, WorkerImage};
use super::process::WorkerProcess;
use super::{Keeper, Worker};
use crate::control::ControlServer;
use crate::error::BackendError;
use crate::signals::ExitSignals;
use crate::status::RestartLog;
use crate::status_region::RegionReader;

/// What a re-executed keeper takes from its command line rather than its
/// image.
pub struct ResumeConfig {
    /// The state region's geometry.
    pub geometry: Geometry,
    /// The control socket's path (its listener is in the image).
    pub control_path: Option<PathBuf>,
    /// How status names the vhost-user socket.
    pub socket_label: String,
}

impl Keeper {
    /// Re-executes the keeper if one is due and it is at rest.
    pub(super) fn try_reexec(&mut self) {
        let Some(answer) = self.keeper_exec.clone() else {
            return;
        };
        let at_rest = self.unacked.is_none()
            && self.upgrade.is_none()
            && self.retiring.is_empty()
            && self.worker.as_ref().is_some_and(|w| w.ready);
        if !at_rest {
            return;
        }
        self.keeper_exec = None;
        let Err(e) = self.reexec(&answer);
        error!("the keeper cannot re-execute itself: {e}; it carries on from the binary it runs");
        self.answer_upgrade(Err(format!(
            "the worker was upgraded, but the keeper could not re-execute itself: {e}; it runs the binary it started from"
        )));
    }

    /// Writes the image and execs the worker binary as the keeper; returns
    /// only if that failed, with everything as it was.
    fn reexec(&mut self, answer: &str) -> Result<Infallible, String> {
        let w = self
            .worker
            .as_ref()
            .ok_or_else(|| "no worker".to_string())?;
        let (control, waiting) = match &self.control {
            Some(c) => {
                let (listener, waiting) = c.exec_fds();
                (Some(listener), waiting)
            }
            None => (None, Vec::new()),
        };
        let restarts = self.restarts.kept();
        let image = Image {
            worker_args: self.worker_args.clone(),
            binary_path: self.binary_path.clone(),
            listener: self.listener.as_raw_fd(),
            host_listener: self.host_listener.as_raw_fd(),
            control,
            frontend: self.frontend.as_ref().map(AsRawFd::as_raw_fd),
            worker_exe: self.worker_exe.as_raw_fd(),
            worker: WorkerImage {
                pid: w.child.id(),
                number: w.number,
                generation: w.generation,
                link: w.link.as_raw_fd(),
                uptime: w.started_at.elapsed(),
            },
            store: self.store.raw_fds(),
            waiting,
            next_client_uid: self.next_client_uid,
            unsent_clients: self.unsent_clients.iter().copied().collect(),
            session_end_owed: self.session_end_owed,
            next_seq: self.next_seq,
            started: self.started,
            standbys_started: self.standbys_started,
            quick_deaths: self.quick_deaths,
            uptime: self.started_at.elapsed(),
            restarts_total: self.restarts.total(),
            restarts,
            answer: answer.to_string(),
        };
        let written = image
            .write()
            .map_err(|e| format!("cannot write the keeper image: {e}"))?;
        let fds = image.fds();
        set_cloexec(&fds, false).map_err(|e| format!("cannot keep the descriptors: {e}"))?;
        info!(
            "keeper re-executing itself from {} with {} descriptors",
            self.binary_path.display(),
            fds.len()
        );
        let e = Command::new(format!("/proc/self/fd/{}", self.worker_exe.as_raw_fd()))
            .args(&self.worker_args)
            .arg("--keeper-image")
            .arg(written.as_raw_fd().to_string())
            .exec();
        if let Err(e) = set_cloexec(&fds, true) {
            warn!("cannot restore close-on-exec on the keeper's descriptors: {e}");
        }
        Err(format!("execve: {e}"))
    }

    /// The keeper a re-executed process carries on as, from the image in
    /// inherited descriptor `image_fd`.
    pub fn resume(image_fd: i32, config: ResumeConfig) -> Result<Keeper, BackendError> {
        // SAFETY: the keeper that re-executed passed it for us to own.
        let image = Image::read(unsafe { own(image_fd) }).map_err(BackendError::KeeperImage)?;
        set_cloexec(&image.fds(), true).map_err(BackendError::Epoll)?;
        // SAFETY (each `own` below): the image names descriptors this
        // process inherited for the keeper to own, each once.
        let listener = UnixListener::from(unsafe { own(image.listener) });
        let host_listener = UnixListener::from(unsafe { own(image.host_listener) });
        let frontend = image
            .frontend
            .map(|fd| UnixStream::from(unsafe { own(fd) }));
        let worker_exe = unsafe { own(image.worker_exe) };
        let mut store = FdStore::default();
        for &(id, fd) in &image.store {
            store.deposit(id, unsafe { own(fd) });
        }
        let control_listener = image
            .control
            .map(|fd| UnixListener::from(unsafe { own(fd) }));
        let waiting: Vec<UnixStream> = image
            .waiting
            .iter()
            .map(|&fd| UnixStream::from(unsafe { own(fd) }))
            .collect();
        let link = Channel::from_fd(unsafe { own(image.worker.link) });
        let mut control = match (control_listener, config.control_path) {
            (Some(l), Some(path)) => Some(ControlServer::new(l, path)?),
            _ => None,
        };
        for stream in waiting {
            if let Some(c) = &mut control {
                c.adopt_waiting(stream);
            }
        }
        let state = store.dup(well_known::STATE_REGION).ok_or_else(|| {
            BackendError::KeeperImage("the image's store lacks the state region".into())
        })?;
        let now = Instant::now();
        let worker = Worker {
            number: image.worker.number,
            child: WorkerProcess::from_pid(image.worker.pid),
            link,
            ready: true,
            started_at: now.checked_sub(image.worker.uptime).unwrap_or(now),
            generation: image.worker.generation,
        };
        let mut keeper = Keeper {
            worker_args: image.worker_args,
            worker_exe,
            binary_path: image.binary_path,
            upgrade: None,
            retiring: Vec::new(),
            keeper_exec: None,
            standbys_started: image.standbys_started,
            listener,
            host_listener,
            next_client_uid: image.next_client_uid,
            unsent_clients: image.unsent_clients.into_iter().collect(),
            client_retry_at: None,
            accept_paused_until: None,
            frontend,
            store,
            worker: Some(worker),
            restart_at: None,
            started: image.started,
            quick_deaths: image.quick_deaths,
            next_seq: image.next_seq,
            unacked: None,
            session_end_owed: image.session_end_owed,
            signals: ExitSignals::new().map_err(BackendError::Epoll)?,
            started_at: now.checked_sub(image.uptime).unwrap_or(now),
            control,
            socket_label: config.socket_label,
            region: RegionReader::new(state, config.geometry),
            restarts: RestartLog::from_parts(image.restarts_total, image.restarts),
        };
        for l in [&keeper.listener, &keeper.host_listener] {
            l.set_nonblocking(true).map_err(BackendError::Epoll)?;
        }
        let line = format!(
            "keeper: pid {} re-executed from {}",
            std::process::id(),
            keeper.binary_path.display()
        );
        info!("{line}; worker {} serves on", image.worker.number);
        keeper.answer_upgrade(Ok(format!("{}{line}\n", image.answer)));
        Ok(keeper)
    }
}
