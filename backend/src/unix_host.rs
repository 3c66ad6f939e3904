//! The host side over Unix sockets, Firecracker's hybrid vsock layout: host
//! clients connect to `<uds-path>`; a guest connect to port P reaches the
//! listener at `<uds-path>_P`.
//!
//! Who accepts host clients: a `--no-keeper` worker, here; a keeper's
//! worker has no listener ([`UnixHost::without_listener`]), since the
//! keeper accepts them and hands each over (`Muxer::add_host_client`).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vsockd_device::Host;

/// Host listener, if this process accepts host clients, plus the path
/// prefix of host services.
pub struct UnixHost {
    listener: Option<UnixListener>,
    uds_path: PathBuf,
}

impl UnixHost {
    /// Wraps a bound listener (made non-blocking here).
    pub fn new(listener: UnixListener, uds_path: PathBuf) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(UnixHost {
            listener: Some(listener),
            uds_path,
        })
    }

    /// A host side that accepts nobody: host clients come from the keeper.
    pub fn without_listener(uds_path: PathBuf) -> Self {
        UnixHost {
            listener: None,
            uds_path,
        }
    }
}

impl Host for UnixHost {
    type Stream = UnixStream;

    fn listener_fd(&self) -> Option<RawFd> {
        self.listener.as_ref().map(AsRawFd::as_raw_fd)
    }

    fn accept(&mut self) -> io::Result<Option<UnixStream>> {
        match &self.listener {
            Some(listener) => accept_nonblocking(listener),
            None => Ok(None),
        }
    }

    fn open(&mut self, _port: u32) -> io::Result<UnixStream> {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn connect(&mut self, stream: &UnixStream, port: u32) -> io::Result<()> {
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{port}"));
        connect_nonblocking(stream, Path::new(&path))
    }
}

/// Accepts one pending client, `Ok(None)` when none waits; the stream is
/// non-blocking and close-on-exec (accept4 sets both in the same call).
pub fn accept_nonblocking(listener: &UnixListener) -> io::Result<Option<UnixStream>> {
    // SAFETY: plain accept4(2) on a listening socket; no address is asked
    // for.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(Some(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) })))
}

/// Connects without ever blocking the event loop: a listener whose backlog
/// is full answers EAGAIN, which the guest sees as a refused connect. A
/// stream connected already (by a predecessor's call) answers EISCONN,
/// which is success.
fn connect_nonblocking(stream: &UnixStream, path: &Path) -> io::Result<()> {
    // SAFETY: `sockaddr_un` is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is too long", path.display()),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `addr` is a valid sockaddr_un of the given length.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EISCONN) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}
