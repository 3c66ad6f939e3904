//! Listening sockets: bind a path (replacing a stale socket left by a dead
//! process, refusing one that is alive or a path that is not a socket), or
//! adopt an inherited descriptor.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::error::BackendError;

/// Binds `path`, naming it `what` in errors.
pub fn bind(what: &'static str, path: &Path) -> Result<UnixListener, BackendError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BackendError::NotASocket {
                what,
                path: path.to_owned(),
            });
        }
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(BackendError::SocketInUse {
                    what,
                    path: path.to_owned(),
                })
            }
            // Nobody listens: a stale socket from a process that died.
            Err(_) => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    UnixListener::bind(path).map_err(|source| BackendError::Bind {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Adopts an inherited listening Unix stream socket.
pub fn adopt_fd(fd: RawFd) -> Result<UnixListener, BackendError> {
    let bad = |source| BackendError::BadFd { fd, source };
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(bad(io::Error::last_os_error()));
    }
    if val == 0 {
        return Err(bad(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not listening",
        )));
    }
    let mut domain: libc::c_int = 0;
    // SAFETY: as above.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 || domain != libc::AF_UNIX {
        return Err(bad(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a Unix socket",
        )));
    }
    // SAFETY: the descriptor was inherited for us to own, and it is a
    // listening Unix socket as checked above.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}
