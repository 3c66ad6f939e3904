//! SIGTERM and SIGINT as an event-loop event (a signalfd), so vsockd exits
//! cleanly between two requests, never in the middle of one.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A signalfd for SIGTERM and SIGINT, which are blocked for normal delivery.
pub struct ExitSignals {
    fd: OwnedFd,
}

impl ExitSignals {
    /// Blocks SIGTERM and SIGINT and opens a signalfd for them.
    pub fn new() -> io::Result<Self> {
        // SAFETY: `set` is a local sigset_t initialised by sigemptyset before
        // use; the calls only read and write it and the thread's mask.
        let fd = unsafe {
            let mut set: libc::sigset_t = mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that we own.
        Ok(ExitSignals {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The descriptor to poll.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads the pending signal, if any: its name.
    pub fn take(&self) -> Option<&'static str> {
        // SAFETY: signalfd_siginfo is plain data; all zeroes is valid.
        let mut info: libc::signalfd_siginfo = unsafe { mem::zeroed() };
        let size = mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`.
        let n = unsafe {
            libc::read(
                self.fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n as usize != size {
            return None;
        }
        Some(match info.ssi_signo as i32 {
            libc::SIGTERM => "SIGTERM",
            libc::SIGINT => "SIGINT",
            _ => "a signal",
        })
    }
}
