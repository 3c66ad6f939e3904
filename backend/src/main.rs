//! vsockd: a vhost-user virtio-vsock device backend.

mod cli;
mod conn_store;
mod control;
mod error;
mod event_loop;
mod handler;
mod json;
mod keeper;
mod listen;
mod memory;
mod persistence;
mod signals;
mod status;
mod status_region;
mod unix_host;
mod worker_link;

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use log::info;

use crate::cli::{Args, Command, StatusArgs, UpgradeArgs};
use crate::control::ControlServer;
use crate::error::BackendError;
use crate::event_loop::{
    prepare_worker, serve, PreparedWorker, ServeConfig, StateRegion, StatusServer,
};
use crate::handler::DeviceConfig;
use crate::keeper::{Keeper, KeeperConfig, ResumeConfig};
use crate::unix_host::UnixHost;
use vsockd_persist::fdstore::well_known;
use vsockd_persist::{Channel, FdSet, Geometry, Kind, LAYOUT_VERSION};

/// Exit status for usage errors (as clap and sysexits' EX_USAGE-like tools).
const EXIT_USAGE: u8 = 2;
/// Exit status for failures while starting or serving.
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            // One line naming the problem.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("vsockd: {}", first.trim_start_matches("error: "));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(msg) = args.validate() {
        eprintln!("vsockd: {msg}");
        return ExitCode::from(EXIT_USAGE);
    }
    match &args.command {
        Some(Command::Status(status)) => return run_status(status),
        Some(Command::Upgrade(upgrade)) => return run_upgrade(upgrade),
        None => {}
    }
    if args.print_capabilities {
        println!("{}", cli::CAPABILITIES_JSON);
        return ExitCode::SUCCESS;
    }
    env_logger::Builder::new()
        .filter_level(args.log_level)
        .parse_env("VSOCKD_LOG")
        .format_timestamp_micros()
        .init();
    let result = match args.worker_link {
        Some(fd) => run_worker(&args, fd),
        None if args.no_keeper => run_alone(&args),
        None => match args.keeper_image {
            Some(fd) => run_resumed_keeper(&args, fd),
            None => run_keeper(&args),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr, whether or not logging goes there too.
            eprintln!("vsockd: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `vsockd status`: asks a running instance and prints its answer.
fn run_status(args: &StatusArgs) -> ExitCode {
    let answer = args
        .control_path()
        .map_err(|e| e.to_string())
        .and_then(|path| control::request_status(&path, args.json).map_err(|e| e.to_string()));
    match answer {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vsockd: status: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `vsockd upgrade`: asks a running instance to upgrade its worker, and
/// prints how it went.
fn run_upgrade(args: &UpgradeArgs) -> ExitCode {
    let answer = args
        .control_path()
        .map_err(|e| e.to_string())
        .and_then(|path| control::request_upgrade(&path, args.keeper).map_err(|e| e.to_string()));
    match answer {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vsockd: upgrade: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Unlinks socket paths when dropped.
struct RemoveOnDrop(Vec<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The two listening sockets (vhost-user and host), and their removal
/// when the caller returns.
fn listeners(args: &Args) -> Result<(UnixListener, UnixListener, RemoveOnDrop), BackendError> {
    let uds_path = args.uds_path.clone().unwrap_or_default();
    let vhost_listener = match (&args.socket_path, args.fd) {
        (Some(path), _) => listen::bind("vhost-user socket", path)?,
        (_, fd) => listen::adopt_fd(fd.unwrap_or(-1))?,
    };
    let host_listener = listen::bind("host socket (--uds-path)", &uds_path)?;
    // Remove the sockets we created when we leave, however we leave.
    let cleanup = RemoveOnDrop(
        [args.socket_path.clone(), Some(uds_path)]
            .into_iter()
            .flatten()
            .collect(),
    );
    Ok((vhost_listener, host_listener, cleanup))
}

/// The control socket's server, if the arguments give it a path.
fn control_server(args: &Args) -> Result<Option<ControlServer>, BackendError> {
    let Some(path) = args.control_path() else {
        return Ok(None);
    };
    let listener = listen::bind("control socket", &path)?;
    Ok(Some(ControlServer::new(listener, path)?))
}

/// How status names the vhost-user socket.
fn socket_label(args: &Args) -> String {
    args.socket_path.as_ref().map_or_else(
        || format!("fd {}", args.fd.unwrap_or(-1)),
        |p| p.display().to_string(),
    )
}

fn announce(args: &Args, mode: &str) {
    info!(
        "vsockd {} serving guest CID {} ({}), host socket {}, {mode}",
        env!("CARGO_PKG_VERSION"),
        args.guest_cid,
        socket_label(args),
        args.uds_path
            .as_deref()
            .unwrap_or(std::path::Path::new(""))
            .display(),
    );
}

fn serve_config(args: &Args) -> ServeConfig {
    ServeConfig {
        device: DeviceConfig {
            guest_cid: args.guest_cid,
            max_queue_size: args.queue_size,
        },
        buf_alloc: args.buf_alloc,
        max_connections: args.max_connections as usize,
        resume_grace: std::time::Duration::from_secs(args.resume_grace),
    }
}

/// `--no-keeper`: the worker alone.
fn run_alone(args: &Args) -> Result<(), BackendError> {
    let (vhost_listener, host_listener, _cleanup) = listeners(args)?;
    let uds_path = args.uds_path.clone().unwrap_or_default();
    let host = UnixHost::new(host_listener, uds_path).map_err(BackendError::Epoll)?;
    let status = control_server(args)?.map(|control| StatusServer {
        control,
        socket_label: socket_label(args),
        started_at: Instant::now(),
    });
    announce(args, "no keeper");
    serve(vhost_listener, host, serve_config(args), status)
}

/// The default: a keeper that runs the worker and restarts it.
fn run_keeper(args: &Args) -> Result<(), BackendError> {
    let (vhost_listener, host_listener, _cleanup) = listeners(args)?;
    let control = control_server(args)?;
    announce(args, &format!("keeper pid {}", std::process::id()));
    let config = KeeperConfig {
        worker_args: std::env::args_os().skip(1).collect(),
        geometry: geometry(args),
        control,
        socket_label: socket_label(args),
    };
    Keeper::new(vhost_listener, host_listener, config)?.run()
}

/// A keeper that re-executed itself (`vsockd upgrade --keeper`): it
/// carries on from its image, with the listeners it already had.
fn run_resumed_keeper(args: &Args, image_fd: i32) -> Result<(), BackendError> {
    let _cleanup = RemoveOnDrop(
        [args.socket_path.clone(), args.uds_path.clone()]
            .into_iter()
            .flatten()
            .collect(),
    );
    announce(
        args,
        &format!("keeper pid {}, re-executed", std::process::id()),
    );
    let config = ResumeConfig {
        geometry: geometry(args),
        control_path: args.control_path(),
        socket_label: socket_label(args),
    };
    Keeper::resume(image_fd, config)?.run()
}

/// The state region's geometry for these arguments.
fn geometry(args: &Args) -> Geometry {
    let page = vsockd_persist::page_size() as u64;
    Geometry {
        max_queue_size: args.queue_size,
        conn_slots: args.max_connections,
        conn_data_bytes: u64::from(args.buf_alloc).next_power_of_two().max(page),
    }
}

/// A keeper's worker, linked to it by inherited descriptor `fd`.
fn run_worker(args: &Args, fd: i32) -> Result<(), BackendError> {
    // SAFETY: the keeper passed this descriptor for us to own.
    let link = Channel::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
    if !args.standby {
        let (mut fds, _started) = FdSet::receive(&link).map_err(BackendError::Link)?;
        let state = StateRegion::open(take_state_region(&mut fds)?, geometry(args), true)?;
        return prepare_worker(link, state, worker_host(args), &serve_config(args), false)?
            .serve(fds);
    }
    // A standby tells the keeper why it cannot take over before it exits.
    let report = link.try_clone().map_err(BackendError::Link)?;
    let prepared = prepare_standby(args, link).inspect_err(|e| {
        let _ = report.send(Kind::Failed, 0, 0, e.to_string().as_bytes(), &[]);
    })?;
    // The full hand-over comes once the running worker has quiesced.
    let (mut fds, _started) = FdSet::receive(prepared.link()).map_err(BackendError::Link)?;
    drop(fds.take(well_known::STATE_REGION));
    info!("standby taking over");
    prepared.serve(fds)
}

/// A standby worker, before it takes over: its first hand-over carries the
/// state region alone, which it maps without writing and checks it can
/// read (a layout newer than this build knows is refused here, while the
/// running worker still serves); it then tells the keeper it stands by.
fn prepare_standby(args: &Args, link: Channel) -> Result<PreparedWorker, BackendError> {
    let (mut fds, _started) = FdSet::receive(&link).map_err(BackendError::Link)?;
    let state = StateRegion::open(take_state_region(&mut fds)?, geometry(args), false)?;
    let found = state.layout_version();
    let prepared = prepare_worker(link, state, worker_host(args), &serve_config(args), true)?;
    prepared
        .link()
        .send(Kind::Standby, LAYOUT_VERSION, u64::from(found), &[], &[])
        .map_err(BackendError::Link)?;
    if found == LAYOUT_VERSION {
        info!("standby worker ready to take over (state region layout {found})");
    } else {
        info!("standby worker ready to take over (state region layout {found}, migrated to {LAYOUT_VERSION} when it does)");
    }
    Ok(prepared)
}

fn take_state_region(fds: &mut FdSet) -> Result<OwnedFd, BackendError> {
    fds.take(well_known::STATE_REGION).ok_or_else(|| {
        BackendError::Link(std::io::Error::other(
            "the hand-over lacks the state region",
        ))
    })
}

/// A worker's host side: the keeper accepts host clients and hands each
/// over.
fn worker_host(args: &Args) -> UnixHost {
    UnixHost::without_listener(args.uds_path.clone().unwrap_or_default())
}
