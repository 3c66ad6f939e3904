//! vsockd: a vhost-user virtio-vsock device backend.

mod cli;
mod error;
mod event_loop;
mod handler;
mod listen;
mod memory;
mod signals;
mod unix_host;

use std::process::ExitCode;

use clap::Parser;
use log::info;

use crate::cli::Args;
use crate::error::BackendError;
use crate::event_loop::{serve, ServeConfig};
use crate::handler::DeviceConfig;
use crate::unix_host::UnixHost;

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
    if args.print_capabilities {
        println!("{}", cli::CAPABILITIES_JSON);
        return ExitCode::SUCCESS;
    }
    env_logger::Builder::new()
        .filter_level(args.log_level)
        .parse_env("VSOCKD_LOG")
        .format_timestamp_micros()
        .init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr, whether or not logging goes there too.
            eprintln!("vsockd: {e}");
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

fn run(args: &Args) -> Result<(), BackendError> {
    // validate() made sure these are present.
    let Some(uds_path) = args.uds_path.clone() else {
        return Ok(());
    };
    let vhost_listener = match (&args.socket_path, args.fd) {
        (Some(path), _) => listen::bind("vhost-user socket", path)?,
        (None, Some(fd)) => listen::adopt_fd(fd)?,
        (None, None) => return Ok(()),
    };
    let host_listener = listen::bind("host socket (--uds-path)", &uds_path)?;
    // Remove the sockets we created when we leave, however we leave.
    let _cleanup = RemoveOnDrop(
        [args.socket_path.clone(), Some(uds_path.clone())]
            .into_iter()
            .flatten()
            .collect(),
    );
    let host = UnixHost::new(host_listener, uds_path.clone()).map_err(BackendError::Epoll)?;
    info!(
        "vsockd {} serving guest CID {} ({}), host socket {}",
        env!("CARGO_PKG_VERSION"),
        args.guest_cid,
        args.socket_path.as_ref().map_or_else(
            || format!("fd {}", args.fd.unwrap_or(-1)),
            |p| p.display().to_string()
        ),
        host.uds_path().display()
    );
    serve(
        vhost_listener,
        host,
        ServeConfig {
            device: DeviceConfig {
                guest_cid: args.guest_cid,
                max_queue_size: args.queue_size,
            },
            buf_alloc: args.buf_alloc,
        },
    )
}
