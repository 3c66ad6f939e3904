//! The two system calls std does not offer: `poll(2)` on the session's
//! socket and its wake-up channel, and a vectored send that cannot raise
//! `SIGPIPE` (a library must not depend on the program ignoring it).

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};

/// What to wait for on the socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    pub readable: bool,
    pub writable: bool,
}

/// What `wait` found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// The socket has bytes or EOF to read.
    pub socket_readable: bool,
    pub socket_writable: bool,
    /// The peer closed the socket, or it has an error pending: reported
    /// even when the socket was not polled for reading.
    pub socket_hung_up: bool,
    pub woken: bool,
}

/// Blocks until the socket is ready as `interest` asks or the wake-up
/// channel is readable. An interrupted wait returns with nothing ready.
pub fn wait(socket: BorrowedFd<'_>, interest: Interest, wake: BorrowedFd<'_>) -> io::Result<Ready> {
    let mut socket_events = 0;
    if interest.readable {
        socket_events |= libc::POLLIN;
    }
    if interest.writable {
        socket_events |= libc::POLLOUT;
    }
    let mut fds = [
        libc::pollfd {
            fd: socket.as_raw_fd(),
            events: socket_events,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid, writable array of two `pollfd`s that
    // outlives the call, and the count passed is its length. Both
    // descriptors are borrowed, so they stay open for the call.
    let result = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    if result < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(Ready::default());
        }
        return Err(err);
    }
    let socket_revents = fds[0].revents;
    Ok(Ready {
        socket_readable: socket_revents & libc::POLLIN != 0,
        socket_writable: socket_revents & libc::POLLOUT != 0,
        socket_hung_up: socket_revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0,
        woken: fds[1].revents & libc::POLLIN != 0,
    })
}

/// `sendmsg(2)` of `slices` with `MSG_NOSIGNAL`: a peer that closed the
/// socket yields `EPIPE`, never the signal. Returns the bytes sent.
pub fn send_vectored(socket: BorrowedFd<'_>, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero `msghdr` is valid (no name, no control data).
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is guaranteed ABI-compatible with `iovec` on Unix.
    message.msg_iov = slices.as_ptr() as *mut libc::iovec;
    message.msg_iovlen = slices.len() as _;
    // SAFETY: `message` points at `slices.len()` valid iovecs borrowed for
    // the call, which only reads them; the descriptor is borrowed, so open.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &message, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

/// Sends all of `bytes` on a blocking socket, without `SIGPIPE`.
pub fn send_all(socket: BorrowedFd<'_>, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match send_vectored(socket, &[IoSlice::new(bytes)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(count) => bytes = &bytes[count..],
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}
