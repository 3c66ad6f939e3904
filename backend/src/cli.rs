//! Command line, following the "Backend program conventions" of QEMU's
//! docs/interop/vhost-user.rst (--socket-path, --fd, --print-capabilities).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Default credit advertised to the guest per connection: 1 MiB. The
/// guest may have this many bytes on their way to one host stream; with
/// Linux's 256 KiB a single stream stalls on credit updates (vsock-bench
/// measured about 45% of a Unix socketpair's throughput against about 70%
/// with 1 MiB). vsockd holds that much for a host reader that falls behind,
/// and only while it is behind.
pub const DEFAULT_BUF_ALLOC_BYTES: u32 = 1024 * 1024;
/// Default for `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;
/// Default grace period of a detached resumable session, in seconds.
pub const DEFAULT_RESUME_GRACE_SECS: u64 = 30;

/// vsockd: a vhost-user virtio-vsock device backend that bridges guest
/// AF_VSOCK connections to host Unix sockets (Firecracker's hybrid vsock).
///
/// Host to guest: connect to --uds-path and send "CONNECT <port>\n"; the
/// reply is "OK <host-side port>\n", then bytes flow. Guest to host: a guest
/// connect to CID 2 port P is bridged to the listener at "<uds-path>_P".
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// vhost-user socket to create and listen on for the VMM.
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Inherited file descriptor of an already listening vhost-user socket
    /// (instead of --socket-path).
    #[arg(long, value_name = "FD")]
    pub fd: Option<i32>,

    /// Print this backend's capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// The guest's context ID, reported to the driver (3 to 4294967294).
    #[arg(long, value_name = "CID", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(3..=0xFFFF_FFFE))]
    pub guest_cid: u64,

    /// Host-side Unix socket for hybrid vsock: host clients connect here;
    /// guest connects to port P go to "<PATH>_P".
    #[arg(long, value_name = "PATH")]
    pub uds_path: Option<PathBuf>,

    /// Largest virtqueue size accepted from the VMM (a power of two up to 32768).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Receive buffer advertised to the guest per connection, in bytes
    /// (4096 to 67108864): the most vsockd buffers for one slow host reader.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_BUF_ALLOC_BYTES,
          value_parser = clap::value_parser!(u32).range(4096..=64 * 1024 * 1024))]
    pub buf_alloc: u32,

    /// Most connections open at once (1 to 65536), host clients still
    /// sending their CONNECT line included; each has a slot in the state
    /// region. Beyond it a guest's connect is reset and a host client
    /// closed.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,

    /// How long a resumable host session stays open with no client
    /// attached, in seconds (1 to 86400): the guest connection waits that
    /// long for a RESUME before it is reset.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_RESUME_GRACE_SECS,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub resume_grace: u64,

    /// Control socket that `vsockd status` asks (default: "<socket-path>.ctl";
    /// with --fd, none unless this is given).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Run the worker alone, without the keeper process: no survival of a
    /// worker crash (for debugging, and to measure what survival costs).
    #[arg(long)]
    pub no_keeper: bool,

    /// Internal: run as the worker of a keeper, linked to it by this
    /// inherited descriptor.
    #[arg(long, value_name = "FD", hide = true)]
    pub worker_link: Option<i32>,

    /// Internal, with --worker-link: start as a standby for an upgrade,
    /// ready to take over from the running worker when it has quiesced.
    #[arg(long, hide = true, requires = "worker_link")]
    pub standby: bool,

    /// Internal: carry on as a keeper that re-executed itself, from the
    /// image in this inherited descriptor.
    #[arg(long, value_name = "FD", hide = true, conflicts_with = "worker_link")]
    pub keeper_image: Option<i32>,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print how a running vsockd is doing: its processes, worker restarts
    /// and their causes, whether a VMM is connected, open connections and
    /// where each virtqueue stands.
    Status(StatusArgs),
    /// Replace the running worker with one started from the vsockd binary
    /// now on disk (where the instance was started from), keeping every
    /// connection: the old worker stops serving between two packets, the
    /// new one takes its state over, and the old one exits. If the new
    /// worker cannot start or take over, the old one serves on and this
    /// exits non-zero with the reason.
    Upgrade(UpgradeArgs),
}

/// Which running instance a subcommand asks.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The instance's vhost-user socket: its control socket "<PATH>.ctl"
    /// is asked.
    #[arg(long, value_name = "PATH", conflicts_with = "control_socket")]
    pub socket_path: Option<PathBuf>,

    /// The instance's control socket (as given to its --control-socket).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
}

impl Target {
    /// The control socket to ask (`command` names the subcommand in the
    /// error).
    pub fn control_path(&self, command: &str) -> Result<PathBuf, String> {
        match (&self.control_socket, &self.socket_path) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(s)) => Ok(crate::control::default_path(s)),
            (None, None) => Err(format!(
                "{command}: one of --socket-path or --control-socket is required"
            )),
        }
    }
}

/// `vsockd status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,

    /// Print one JSON document instead of "key: value" lines.
    #[arg(long)]
    pub json: bool,
}

impl StatusArgs {
    /// The control socket to ask.
    pub fn control_path(&self) -> Result<PathBuf, String> {
        self.target.control_path("status")
    }
}

/// `vsockd upgrade`.
#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub target: Target,

    /// Then re-execute the keeper itself from the new binary, keeping its
    /// descriptors (the vhost-user session, every connection): the whole
    /// instance then runs the new binary.
    #[arg(long)]
    pub keeper: bool,
}

impl UpgradeArgs {
    /// The control socket to ask.
    pub fn control_path(&self) -> Result<PathBuf, String> {
        self.target.control_path("upgrade")
    }
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if n == 0 || n > 32768 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two from 1 to 32768"));
    }
    Ok(n as u16)
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not one of error, warn, info, debug, trace, off"))
}

impl Args {
    /// Checks what clap cannot: which options go together.
    pub fn validate(&self) -> Result<(), String> {
        match &self.command {
            Some(Command::Status(status)) => return status.control_path().map(|_| ()),
            Some(Command::Upgrade(upgrade)) => return upgrade.control_path().map(|_| ()),
            None => {}
        }
        if self.print_capabilities {
            return Ok(());
        }
        if self.socket_path.is_none() && self.fd.is_none() {
            return Err("one of --socket-path or --fd is required".into());
        }
        if self.uds_path.is_none() {
            return Err("--uds-path is required".into());
        }
        Ok(())
    }

    /// The control socket to serve, if any.
    pub fn control_path(&self) -> Option<PathBuf> {
        self.control_socket.clone().or_else(|| {
            self.socket_path
                .as_deref()
                .map(crate::control::default_path)
        })
    }
}

/// The JSON --print-capabilities prints.
pub const CAPABILITIES_JSON: &str = "{\n  \"type\": \"vsock\"\n}";

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from([&["vsockd"], args].concat()).unwrap()
    }

    #[test]
    fn control_socket_defaults_next_to_the_vhost_user_socket() {
        let a = parse(&["--socket-path", "/r/v.sock", "--uds-path", "/r/h"]);
        assert_eq!(a.control_path(), Some(PathBuf::from("/r/v.sock.ctl")));
        let a = parse(&[
            "--socket-path",
            "/r/v.sock",
            "--control-socket",
            "/r/c",
            "--uds-path",
            "/r/h",
        ]);
        assert_eq!(a.control_path(), Some(PathBuf::from("/r/c")));
        // An inherited socket has no path to put one next to.
        let a = parse(&["--fd", "3", "--uds-path", "/r/h"]);
        assert_eq!(a.control_path(), None);
        let a = parse(&[
            "--fd",
            "3",
            "--control-socket",
            "/r/c",
            "--uds-path",
            "/r/h",
        ]);
        assert_eq!(a.control_path(), Some(PathBuf::from("/r/c")));
    }

    #[test]
    fn status_and_upgrade_take_one_of_two_paths() {
        let a = parse(&["status", "--socket-path", "/r/v.sock", "--json"]);
        let Some(Command::Status(s)) = &a.command else {
            panic!("{a:?}");
        };
        assert!(s.json);
        assert_eq!(s.control_path(), Ok(PathBuf::from("/r/v.sock.ctl")));
        assert!(a.validate().is_ok());
        let a = parse(&["status"]);
        assert!(a.validate().unwrap_err().contains("--socket-path"));
        let a = parse(&["upgrade", "--control-socket", "/r/c"]);
        let Some(Command::Upgrade(u)) = &a.command else {
            panic!("{a:?}");
        };
        assert_eq!(u.control_path(), Ok(PathBuf::from("/r/c")));
        let a = parse(&["upgrade"]);
        assert!(a.validate().unwrap_err().starts_with("upgrade: one of"));
        for bad in [
            &["status", "--socket-path", "/a", "--control-socket", "/b"][..],
            &["upgrade", "--socket-path", "/a", "--control-socket", "/b"],
            &["--standby", "--socket-path", "/a", "--uds-path", "/h"],
            &["--uds-path", "/h", "status", "--socket-path", "/a"],
        ] {
            assert!(
                Args::try_parse_from([&["vsockd"], bad].concat()).is_err(),
                "{bad:?}"
            );
        }
    }
}
