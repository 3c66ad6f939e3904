//! A small socket type over a raw fd, covering AF_VSOCK (guest side) and
//! AF_UNIX (host side) stream sockets alike.

use std::io::{self, Read, Write};
use std::mem;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn retry<T, F: FnMut() -> io::Result<T>>(mut f: F) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_vm = unsafe { mem::zeroed() };
    sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    sa.svm_cid = cid;
    sa.svm_port = port;
    sa
}

fn new_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is owned below.
    let fd = cvt(unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket() and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A connected stream socket.
#[derive(Debug)]
pub struct Sock {
    fd: OwnedFd,
}

impl Sock {
    /// Connects an AF_VSOCK stream socket to `(cid, port)`.
    pub fn vsock_connect(cid: u32, port: u32) -> io::Result<Sock> {
        let fd = new_socket(libc::AF_VSOCK)?;
        let sa = vsock_addr(cid, port);
        retry(|| {
            // SAFETY: sa is a valid sockaddr_vm of the given length.
            cvt(unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    &sa as *const libc::sockaddr_vm as *const libc::sockaddr,
                    mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                )
            })
        })?;
        Ok(Sock { fd })
    }

    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: plain syscall on an owned fd.
        cvt(unsafe { libc::shutdown(self.fd.as_raw_fd(), how) }).map(|_| ())
    }

    /// A second handle on the same socket (for a reader and a writer
    /// thread).
    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(Sock {
            fd: self.fd.try_clone()?,
        })
    }

    /// Sets SO_RCVTIMEO and SO_SNDTIMEO (None: block forever).
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        let tv = match t {
            Some(d) => libc::timeval {
                tv_sec: d.as_secs() as libc::time_t,
                tv_usec: d.subsec_micros() as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: tv is a valid timeval of the given length.
            cvt(unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    &tv as *const libc::timeval as *const libc::c_void,
                    mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            })?;
        }
        Ok(())
    }
}

impl From<UnixStream> for Sock {
    fn from(s: UnixStream) -> Sock {
        Sock { fd: s.into() }
    }
}

impl From<Sock> for OwnedFd {
    fn from(s: Sock) -> OwnedFd {
        s.fd
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Read for &Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        retry(|| {
            // SAFETY: buf is valid for writes of buf.len() bytes.
            cvt_size(unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            })
        })
    }
}

impl Write for &Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        retry(|| {
            // SAFETY: buf is valid for reads of buf.len() bytes.
            cvt_size(unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    buf.as_ptr() as *const libc::c_void,
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            })
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening AF_VSOCK stream socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Binds to `(VMADDR_CID_ANY, port)` and listens.
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        let fd = new_socket(libc::AF_VSOCK)?;
        let sa = vsock_addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: sa is a valid sockaddr_vm of the given length.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_vm as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: plain syscall on an owned fd.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
        Ok(VsockListener { fd })
    }

    /// Accepts one connection; returns it with the peer's (cid, port).
    pub fn accept(&self) -> io::Result<(Sock, u32, u32)> {
        // SAFETY: zeroed sockaddr_vm is valid; lengths match.
        let mut sa: libc::sockaddr_vm = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        let fd = retry(|| {
            // SAFETY: sa and len describe a writable sockaddr buffer.
            cvt(unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    &mut sa as *mut libc::sockaddr_vm as *mut libc::sockaddr,
                    &mut len,
                    libc::SOCK_CLOEXEC,
                )
            })
        })?;
        // SAFETY: fd was just returned by accept4 and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok((Sock { fd }, sa.svm_cid, sa.svm_port))
    }
}

/// The local CID of this machine, from /dev/vsock.
pub fn local_cid() -> io::Result<u32> {
    // IOCTL_VM_SOCKETS_GET_LOCAL_CID = _IO(7, 0xb9)
    const GET_LOCAL_CID: libc::c_ulong = 0x7b9;
    let f = std::fs::File::open("/dev/vsock")?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 to the given pointer.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), GET_LOCAL_CID as _, &mut cid as *mut u32) })?;
    Ok(cid)
}
