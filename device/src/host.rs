//! What the device needs from the host side, as traits: a listener that
//! hands over new host clients, a way to reach a host service for a guest's
//! connect, and streams it can poll, read, write and half-close. The backend
//! wires these to Unix sockets; tests wire them to socket pairs.

use std::io;
use std::os::fd::AsRawFd;

/// A connected, non-blocking host stream.
pub trait HostStream: AsRawFd {
    /// Half-closes the writing side: the host client reads EOF.
    fn shutdown_write(&self) -> io::Result<()>;
}

/// The host side of the device.
pub trait Host {
    /// The stream type of host connections.
    type Stream: HostStream;

    /// The listening socket host clients connect to, for polling. `None`
    /// when the device takes no host-initiated connections.
    fn listener_fd(&self) -> Option<std::os::fd::RawFd>;

    /// Accepts one pending host client, non-blocking: `Ok(None)` when none.
    fn accept(&mut self) -> io::Result<Option<Self::Stream>>;

    /// A stream for a guest's connect to port `port`, not connected yet.
    /// The device keeps it for a successor before connecting it, so that
    /// a connect is never made twice.
    fn open(&mut self, port: u32) -> io::Result<Self::Stream>;

    /// Connects `stream` (from [`Host::open`]) to the host service for
    /// guest port `port`, without blocking. `Ok` also when it is connected
    /// already (a successor repeating the call after a crash). An error
    /// means nobody listens there: the guest gets an RST.
    fn connect(&mut self, stream: &Self::Stream, port: u32) -> io::Result<()>;
}

impl HostStream for std::os::unix::net::UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}
