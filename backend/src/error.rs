//! Errors of the backend binary.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// What stops vsockd from starting or serving.
#[derive(Debug, Error)]
pub enum BackendError {
    /// A socket path is already served by another process.
    #[error("{what} {path} is in use by another process")]
    SocketInUse { what: &'static str, path: PathBuf },
    /// A path exists and is not a socket, so it will not be replaced.
    #[error("{what} {path} exists and is not a socket; remove it or choose another path")]
    NotASocket { what: &'static str, path: PathBuf },
    /// Binding a listening socket failed.
    #[error("cannot listen on {what} {path}: {source}")]
    Bind {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The inherited descriptor is not a listening Unix socket.
    #[error("--fd {fd} is not a listening Unix stream socket: {source}")]
    BadFd {
        fd: i32,
        #[source]
        source: io::Error,
    },
    /// The event loop's epoll set failed.
    #[error("epoll: {0}")]
    Epoll(#[source] io::Error),
    /// The keeper-worker link failed.
    #[error("keeper link: {0}")]
    Link(#[source] io::Error),
    /// The state region could not be created or adopted.
    #[error(transparent)]
    Persist(#[from] vsockd_persist::PersistError),
    /// The vsock device could not be created.
    #[error(transparent)]
    Device(#[from] vsockd_device::DeviceError),
    /// A re-executed keeper cannot read what its predecessor left it.
    #[error("keeper image: {0}")]
    KeeperImage(String),
    /// The control socket could not be served.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
}
