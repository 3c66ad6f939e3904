//! Starting a vhost-user vsock backend for a test: vsockd itself (with
//! its keeper, or `--no-keeper`) or the peer implementation
//! (vhost-device-vsock), chosen with
//! `VSOCKD_E2E_BACKEND=vsockd|vsockd-no-keeper|peer`; and killing it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::error::{file_tail, Context, Error, Result};
use crate::image::target_dir;
use crate::pidfd::Pidfd;

/// Which backend implementation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// This project's `vsockd`: a keeper and a worker.
    Vsockd,
    /// `vsockd --no-keeper`: the worker alone.
    VsockdNoKeeper,
    /// vhost-device-vsock, the reference implementation.
    Peer,
}

impl BackendKind {
    /// From `VSOCKD_E2E_BACKEND` (default: vsockd).
    pub fn from_env() -> Result<BackendKind> {
        match std::env::var("VSOCKD_E2E_BACKEND").as_deref() {
            Err(_) | Ok("") => Ok(BackendKind::Vsockd),
            Ok(name) => BackendKind::from_name(name).ok_or_else(|| {
                Error::new(format!(
                    "VSOCKD_E2E_BACKEND={name:?}: expected {}",
                    BackendKind::NAMES
                ))
            }),
        }
    }

    /// Every kind's name, for messages.
    pub const NAMES: &'static str = "vsockd, vsockd-no-keeper or peer";

    /// The kind called `name` (see [`BackendKind::name`]).
    pub fn from_name(name: &str) -> Option<BackendKind> {
        match name {
            "vsockd" => Some(BackendKind::Vsockd),
            "vsockd-no-keeper" => Some(BackendKind::VsockdNoKeeper),
            "peer" => Some(BackendKind::Peer),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Vsockd => "vsockd",
            BackendKind::VsockdNoKeeper => "vsockd-no-keeper",
            BackendKind::Peer => "peer",
        }
    }

    /// Whether a process outlives the device's worker: only then can a
    /// SIGKILL of the worker leave the device alive.
    pub fn has_keeper(self) -> bool {
        self == BackendKind::Vsockd
    }

    /// Whether `vsockd upgrade` can replace the running worker: only a
    /// keeper can start the next one.
    pub fn has_live_upgrade(self) -> bool {
        self == BackendKind::Vsockd
    }

    /// The binary: `$VSOCKD_BIN` or `<target>/release/vsockd`;
    /// `$VSOCKD_PEER_BIN` or vhost-device-vsock on PATH or in
    /// /work/peer/bin.
    pub fn binary(self) -> PathBuf {
        match self {
            BackendKind::Vsockd | BackendKind::VsockdNoKeeper => std::env::var_os("VSOCKD_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| target_dir().join("release").join("vsockd")),
            BackendKind::Peer => std::env::var_os("VSOCKD_PEER_BIN")
                .map(PathBuf::from)
                .or_else(|| which("vhost-device-vsock"))
                .unwrap_or_else(|| PathBuf::from("/work/peer/bin/vhost-device-vsock")),
        }
    }
}

/// Installs binary `src` at `dst` as a package manager does: copied next
/// to it, then renamed over it, so a process running the old file keeps
/// its inode while the path names the new one.
pub fn install_binary(src: &Path, dst: &Path) -> Result<()> {
    let dir = dst
        .parent()
        .ok_or_else(|| Error::new(format!("{} has no parent directory", dst.display())))?;
    std::fs::create_dir_all(dir).context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.new",
        dst.file_name().and_then(|n| n.to_str()).unwrap_or("binary")
    ));
    std::fs::copy(src, &tmp)
        .context(|| format!("cannot copy {} to {}", src.display(), tmp.display()))?;
    std::fs::rename(&tmp, dst)
        .context(|| format!("cannot rename {} to {}", tmp.display(), dst.display()))?;
    Ok(())
}

/// vsockd built with feature `layout-next` (a state-region layout one
/// version past the current one), for the upgrade tests: built once, in
/// `<target>/layout-next`, by the cargo running the tests.
pub fn layout_next_binary() -> Result<PathBuf> {
    static BUILT: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = built.as_ref() {
        return Ok(p.clone());
    }
    let target = crate::image::target_dir().join("layout-next");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(["build", "--release", "--quiet", "-p", "vsockd"])
        .args(["--features", "layout-next", "--target-dir"])
        .arg(&target)
        .current_dir(crate::image::workspace_dir())
        .stdin(Stdio::null())
        .output()
        .context(|| "cannot run cargo to build vsockd with feature layout-next".to_string())?;
    if !out.status.success() {
        return Err(Error::new(format!(
            "building vsockd with feature layout-next failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let bin = target.join("release").join("vsockd");
    *built = Some(bin.clone());
    Ok(bin)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A running backend; killed on drop.
pub struct Backend {
    kind: BackendKind,
    child: Option<Child>,
    socket: PathBuf,
    uds: PathBuf,
    log: PathBuf,
    cid: u32,
}

impl Backend {
    /// Starts the backend chosen by `VSOCKD_E2E_BACKEND` in `dir`, with
    /// its vhost-user socket at `dir/vhost.sock` and its hybrid socket at
    /// `dir/vsock.sock`.
    pub fn start(dir: &Path, cid: u32) -> Result<Backend> {
        Backend::start_kind(BackendKind::from_env()?, dir, cid)
    }

    /// Starts a given backend kind in `dir`.
    pub fn start_kind(kind: BackendKind, dir: &Path, cid: u32) -> Result<Backend> {
        Backend::start_in(kind, dir, cid, None, &[])
    }

    /// Starts a given backend kind in `dir` (sockets and log named as by
    /// `start`), logging at `level` and with `extra` arguments.
    pub fn start_in(
        kind: BackendKind,
        dir: &Path,
        cid: u32,
        level: Option<&str>,
        extra: &[&str],
    ) -> Result<Backend> {
        Backend::start_in_env(kind, dir, cid, level, extra, &[])
    }

    /// `start_in` with environment variables for the backend
    /// (`VSOCKD_CRASH_POINT`, say).
    pub fn start_in_env(
        kind: BackendKind,
        dir: &Path,
        cid: u32,
        level: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Backend> {
        Backend::spawn(
            kind,
            &dir.join("vhost.sock"),
            &dir.join("vsock.sock"),
            &dir.join(format!("{}.log", kind.name())),
            cid,
            level,
            extra,
            env,
            None,
        )
    }

    /// `start_in_env` for vsockd run from binary `bin` (a copy that a
    /// test replaces before `vsockd upgrade`, say).
    pub fn start_from(
        bin: &Path,
        dir: &Path,
        cid: u32,
        level: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Backend> {
        let kind = BackendKind::Vsockd;
        Backend::spawn(
            kind,
            &dir.join("vhost.sock"),
            &dir.join("vsock.sock"),
            &dir.join(format!("{}.log", kind.name())),
            cid,
            level,
            &[],
            env,
            Some(bin),
        )
    }

    /// Starts a backend with explicit paths; returns once its vhost-user
    /// socket exists. Logs at debug level unless `VSOCKD_E2E_LOG_LEVEL`
    /// (vsockd) or `VSOCKD_E2E_PEER_LOG` / `RUST_LOG` (peer) say otherwise.
    pub fn start_at(
        kind: BackendKind,
        socket: &Path,
        uds: &Path,
        log: &Path,
        cid: u32,
    ) -> Result<Backend> {
        Backend::start_logging(kind, socket, uds, log, cid, None)
    }

    /// `start_at` with an explicit log level (`error`, `warn`, `info`,
    /// `debug`), as benchmarks need: per-packet debug logging would be
    /// what they measure.
    pub fn start_logging(
        kind: BackendKind,
        socket: &Path,
        uds: &Path,
        log: &Path,
        cid: u32,
        level: Option<&str>,
    ) -> Result<Backend> {
        Backend::start_with_args(kind, socket, uds, log, cid, level, &[])
    }

    /// `start_logging` with more arguments for the backend (vsockd's
    /// `--no-keeper`, say).
    pub fn start_with_args(
        kind: BackendKind,
        socket: &Path,
        uds: &Path,
        log: &Path,
        cid: u32,
        level: Option<&str>,
        extra: &[&str],
    ) -> Result<Backend> {
        Backend::spawn(kind, socket, uds, log, cid, level, extra, &[], None)
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        kind: BackendKind,
        socket: &Path,
        uds: &Path,
        log: &Path,
        cid: u32,
        level: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
        bin: Option<&Path>,
    ) -> Result<Backend> {
        let bin = bin.map_or_else(|| kind.binary(), Path::to_path_buf);
        if !bin.is_file() {
            return Err(Error::new(format!(
                "{} backend binary {} not found{}",
                kind.name(),
                bin.display(),
                match kind {
                    BackendKind::Vsockd | BackendKind::VsockdNoKeeper =>
                        " (run `cargo build --release`, or set VSOCKD_BIN)",
                    BackendKind::Peer => " (set VSOCKD_PEER_BIN)",
                }
            )));
        }
        let _ = std::fs::remove_file(socket);
        let logf =
            std::fs::File::create(log).context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(&bin);
        match kind {
            BackendKind::Vsockd | BackendKind::VsockdNoKeeper => {
                let level = level.map(str::to_string).unwrap_or_else(|| {
                    std::env::var("VSOCKD_E2E_LOG_LEVEL").unwrap_or_else(|_| "debug".to_string())
                });
                cmd.arg("--socket-path")
                    .arg(socket)
                    .arg("--guest-cid")
                    .arg(cid.to_string())
                    .arg("--uds-path")
                    .arg(uds)
                    .arg("--log-level")
                    .arg(level);
                if kind == BackendKind::VsockdNoKeeper {
                    cmd.arg("--no-keeper");
                }
            }
            BackendKind::Peer => {
                cmd.arg("--vm").arg(format!(
                    "guest-cid={cid},socket={},uds-path={}",
                    socket.display(),
                    uds.display()
                ));
                if let Some(level) = level {
                    cmd.env("RUST_LOG", level);
                } else if std::env::var_os("RUST_LOG").is_none() {
                    cmd.env(
                        "RUST_LOG",
                        std::env::var("VSOCKD_E2E_PEER_LOG").unwrap_or_else(|_| "debug".into()),
                    );
                }
            }
        }
        let child = cmd
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context(|| format!("cannot start {}", bin.display()))?;
        let mut b = Backend {
            kind,
            child: Some(child),
            socket: socket.to_path_buf(),
            uds: uds.to_path_buf(),
            log: log.to_path_buf(),
            cid,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !b.socket.exists() {
            if let Some(st) = b.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(b.attach(Error::new(format!(
                    "{} exited ({st}) before creating {}",
                    kind.name(),
                    b.socket.display()
                ))));
            }
            if Instant::now() > deadline {
                return Err(b.attach(Error::new(format!(
                    "{} did not create {} within 20 s",
                    kind.name(),
                    b.socket.display()
                ))));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(b)
    }

    /// Attaches the backend's log tail to an error.
    pub fn attach(&self, e: Error) -> Error {
        e.with_context(
            &format!("{} log (tail)", self.kind.name()),
            &file_tail(&self.log, 30),
        )
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// The vhost-user socket (for the VMM).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The hybrid vsock Unix socket (for host clients).
    pub fn uds(&self) -> &Path {
        &self.uds
    }

    pub fn cid(&self) -> u32 {
        self.cid
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log, lines)
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The pid of vsockd's worker (the keeper's child), if there is one now.
    pub fn worker_pid(&self) -> Option<u32> {
        let keeper = self.pid()?;
        let children =
            std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// SIGKILLs vsockd's worker and waits until the keeper has started the
    /// next one (not until it is ready: requests wait in the keeper).
    /// Returns the pid killed.
    pub fn kill_worker(&self, within: Duration) -> Result<u32> {
        let deadline = Instant::now() + within;
        let kill = self.kill_worker_now(within)?;
        self.wait_for_worker_after(kill.pid, deadline)
    }

    /// Sends `signal` to vsockd's worker and waits until the keeper has
    /// started the next one. Returns the pid signalled.
    pub fn signal_worker(&self, signal: libc::c_int, within: Duration) -> Result<u32> {
        let deadline = Instant::now() + within;
        let pid = self.worker_pid_within(deadline)?;
        let worker = Pidfd::open(pid).context(|| format!("pidfd_open of worker {pid}"))?;
        worker
            .signal(signal)
            .context(|| format!("signal {signal} to worker {pid}"))?;
        self.wait_for_worker_after(pid, deadline)
    }

    /// Waits until a worker other than `old` runs; returns `old`.
    fn wait_for_worker_after(&self, old: u32, deadline: Instant) -> Result<u32> {
        loop {
            match self.worker_pid() {
                Some(p) if p != old => return Ok(old),
                _ if Instant::now() > deadline => {
                    return Err(Error::new(format!(
                        "no new worker in time after worker {old} was signalled"
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// The worker's pid, waiting for one until `deadline`.
    fn worker_pid_within(&self, deadline: Instant) -> Result<u32> {
        loop {
            if let Some(p) = self.worker_pid() {
                return Ok(p);
            }
            if Instant::now() > deadline {
                return Err(Error::new("vsockd has no worker process"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGKILLs vsockd's worker and returns as soon as it is dead, before
    /// the keeper can have started the next one: from then on, whatever
    /// the device serves was served by a new worker.
    pub fn kill_worker_now(&self, within: Duration) -> Result<Killed> {
        let deadline = Instant::now() + within;
        let pid = self.worker_pid_within(deadline)?;
        let worker = Pidfd::open(pid).context(|| format!("pidfd_open of worker {pid}"))?;
        kill_and_wait(&worker, deadline)
    }

    /// SIGKILLs the backend process itself (for vsockd, the keeper or the
    /// lone worker) and returns as soon as it is dead; the process is
    /// reaped, and the backend is no longer running.
    pub fn kill_now(&mut self, within: Duration) -> Result<Killed> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| Error::new(format!("{} is not running", self.kind.name())))?;
        let pid = child.id();
        let killed = Pidfd::open(pid)
            .context(|| format!("pidfd_open of {pid}"))
            .and_then(|p| kill_and_wait(&p, Instant::now() + within));
        if killed.is_err() {
            let _ = child.kill();
        }
        let _ = child.wait();
        killed
    }

    /// Runs `vsockd status` (`--json` if asked) for this backend's
    /// vhost-user socket and returns what it printed and its exit status.
    pub fn status(&self, json: bool) -> Result<Output> {
        let mut cmd = Command::new(BackendKind::Vsockd.binary());
        cmd.arg("status").arg("--socket-path").arg(&self.socket);
        if json {
            cmd.arg("--json");
        }
        cmd.stdin(Stdio::null())
            .output()
            .context(|| "cannot run vsockd status".to_string())
    }

    /// Runs `vsockd upgrade` for this backend's vhost-user socket and
    /// returns what it printed and its exit status.
    pub fn upgrade(&self) -> Result<Output> {
        self.upgrade_with(&[])
    }

    /// `upgrade` with more arguments (`--keeper`).
    pub fn upgrade_with(&self, extra: &[&str]) -> Result<Output> {
        Command::new(BackendKind::Vsockd.binary())
            .arg("upgrade")
            .arg("--socket-path")
            .arg(&self.socket)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .context(|| "cannot run vsockd upgrade".to_string())
    }

    /// Stops the backend: SIGTERM, then SIGKILL after a second.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child process by its pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A process killed by [`Backend::kill_worker_now`] or
/// [`Backend::kill_now`].
#[derive(Debug, Clone, Copy)]
pub struct Killed {
    pub pid: u32,
    /// Just before the signal was sent.
    pub at: Instant,
}

/// SIGKILLs the process of `p` and waits, until `deadline`, for it to be
/// dead.
fn kill_and_wait(p: &Pidfd, deadline: Instant) -> Result<Killed> {
    let pid = p.pid();
    let at = Instant::now();
    p.signal(libc::SIGKILL)
        .context(|| format!("SIGKILL to {pid}"))?;
    let left = deadline.saturating_duration_since(Instant::now());
    match p.wait_exit(left) {
        Ok(true) => Ok(Killed { pid, at }),
        Ok(false) => Err(Error::new(format!(
            "{pid} still alive {left:?} after SIGKILL"
        ))),
        Err(e) => Err(Error::new(format!("waiting for {pid} to die: {e}"))),
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("{} log kept at {}", self.kind.name(), self.log.display());
        }
    }
}
