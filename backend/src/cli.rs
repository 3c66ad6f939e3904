//! Command line, following the "Backend program conventions" of QEMU's
//! docs/interop/vhost-user.rst (--socket-path, --fd, --print-capabilities).

use std::path::PathBuf;

use clap::Parser;

/// Default credit advertised to the guest per connection: 1 MiB. The
/// guest may have this many bytes on their way to one host stream; with
/// Linux's 256 KiB a single stream stalls on credit updates (vsock-bench
/// measured about 45% of a Unix socketpair's throughput against about 70%
/// with 1 MiB). vsockd holds that much for a host reader that falls behind,
/// and only while it is behind.
pub const DEFAULT_BUF_ALLOC_BYTES: u32 = 1024 * 1024;

/// vsockd: a vhost-user virtio-vsock device backend that bridges guest
/// AF_VSOCK connections to host Unix sockets (Firecracker's hybrid vsock).
///
/// Host to guest: connect to --uds-path and send "CONNECT <port>\n"; the
/// reply is "OK <host-side port>\n", then bytes flow. Guest to host: a guest
/// connect to CID 2 port P is bridged to the listener at "<uds-path>_P".
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
pub struct Args {
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

    /// Run the worker alone, without the keeper process: no survival of a
    /// worker crash (for debugging, and to measure what survival costs).
    #[arg(long)]
    pub no_keeper: bool,

    /// Internal: run as the worker of a keeper, linked to it by this
    /// inherited descriptor.
    #[arg(long, value_name = "FD", hide = true)]
    pub worker_link: Option<i32>,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
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
}

/// The JSON --print-capabilities prints.
pub const CAPABILITIES_JSON: &str = "{\n  \"type\": \"vsock\"\n}";
