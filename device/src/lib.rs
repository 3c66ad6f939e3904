//! The virtio-vsock device: wire format, connection state machine, credit
//! flow control and the host-side hybrid muxer (Firecracker's convention:
//! host clients connect to a Unix socket and send `CONNECT <port>\n`; guest
//! connects to port P reach `<uds-path>_P`).
//!
//! It knows nothing of vhost-user or of how descriptor chains are found: the
//! backend hands it guest buffers as [`GuestIovs`] and host sockets through
//! the [`Host`] traits.

mod conn;
pub mod connect_line;
pub mod crash_point;
mod host;
mod iov;
mod muxer;
pub mod packet;
mod parked;
mod phase;
pub mod session;
pub mod store;
mod txbuf;

use std::fmt;

pub use conn::MAX_RX_BATCH;
pub use host::{Host, HostStream};
pub use iov::GuestIovs;
pub use muxer::{Adopted, Muxer, MuxerConfig, MuxerStats, TxChain};
pub use phase::{ConnCounts, ConnPhase};
pub use store::ConnStore;

/// Errors of the device layer.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device's epoll set could not be created or changed.
    #[error("epoll: {0}")]
    Epoll(#[source] std::io::Error),
    /// The grace-period timer could not be created.
    #[error("cannot create the resumable sessions' timer: {0}")]
    Timer(#[source] std::io::Error),
}

/// A connection's identity: our (host-side) port and the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    /// Host-side port: the port a guest connected to, or the one we
    /// allocated for a host client.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
}

impl ConnKey {
    /// The key of the connection a guest packet belongs to.
    pub fn of_guest_packet(hdr: &packet::PacketHeader) -> Self {
        ConnKey {
            local_port: hdr.dst_port(),
            peer_port: hdr.src_port(),
        }
    }
}

impl fmt::Display for ConnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn(host:{} guest:{})", self.local_port, self.peer_port)
    }
}

#[cfg(test)]
mod tests;
