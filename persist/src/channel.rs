//! The link between keeper and worker: a SOCK_SEQPACKET socket pair, so
//! every frame arrives whole or not at all, with its file descriptors.
//!
//! A frame is a 16-byte header `{u32 kind; u32 flags; u64 id}` (native
//! endian: both ends are the same machine) followed by a payload, with up
//! to [`MAX_FDS_PER_FRAME`] descriptors attached. What `id` and the payload
//! mean depends on the kind ([`Kind`]).
//!
//! Ordering rules the kinds rely on: frames arrive in the order they were
//! sent, and the keeper reads every frame a dead worker sent before it
//! notices the death. A [`Kind::HostClient`] frame only tells the worker
//! about a descriptor the keeper already holds (see `fdstore`): losing the
//! frame with a dying worker loses nothing, since the next worker gets the
//! descriptor in its hand-over.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vm_memory::ByteValued;

/// Most descriptors one frame carries (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS_PER_FRAME: usize = 250;
/// Largest frame: a vhost-user message (12-byte header, payload up to 4 KiB
/// in the vhost crate) or a batch of fd-store ids, with room to spare.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 16;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// Keeper to worker: a vhost-user message from the frontend, whole,
    /// with its fds. `id` is its sequence number.
    Forward = 1,
    /// Worker to keeper: the reply to message `id` (payload empty if it has
    /// none). Flag [`FLAG_CLOSE`]: the frontend must be disconnected.
    Reply = 2,
    /// Either way: fds under ids (payload: one u64 id per fd). Worker to
    /// keeper, a deposit; keeper to worker, the hand-over to a new worker.
    Fds = 3,
    /// Worker to keeper: forget these ids (payload: u64 ids).
    Withdraw = 4,
    /// Keeper to worker: the hand-over is complete. `id` is the number of
    /// workers started before this one.
    HandoverEnd = 5,
    /// Worker to keeper: adopted, serving. `id` is its generation.
    Ready = 6,
    /// Keeper to worker: the frontend disconnected; end the session.
    /// Worker to keeper: the end is recorded (until then the keeper tells
    /// every new worker again, since it may adopt the ended session).
    SessionEnd = 7,
    /// Keeper to worker: a host client the keeper accepted on the host
    /// listener, one fd attached (a non-blocking stream). `id` is the uid
    /// the keeper gave the connection (in its own range, see
    /// `fdstore::well_known`); the keeper holds the stream under
    /// `conn_stream(id)` already, so the worker must not deposit it again,
    /// and withdraws it as any connection's once done with it.
    HostClient = 8,
    /// Worker to keeper, from a standby worker (one started for an
    /// upgrade): it mapped the state region and can read its layout; it
    /// waits for the hand-over. `id` is the layout version it read.
    Standby = 9,
    /// Keeper to worker: stop serving for an upgrade. The worker finishes
    /// the wakeup it is in (every socket call it made is recorded by then),
    /// answers [`Kind::Quiesced`] and reads nothing but the link until
    /// [`Kind::Resume`] or [`Kind::Retire`].
    Quiesce = 10,
    /// Worker to keeper: quiesced; every frame it sent before this one is
    /// all it will send until resumed. `id` is its generation.
    Quiesced = 11,
    /// Keeper to worker: the upgrade failed before its successor wrote the
    /// state region; serve again.
    Resume = 12,
    /// Keeper to worker: a successor adopted the session; exit without
    /// writing anything.
    Retire = 13,
    /// Worker to keeper: why it cannot go on (payload: UTF-8 text), sent
    /// before it exits.
    Failed = 14,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Kind::Forward,
            2 => Kind::Reply,
            3 => Kind::Fds,
            4 => Kind::Withdraw,
            5 => Kind::HandoverEnd,
            6 => Kind::Ready,
            7 => Kind::SessionEnd,
            8 => Kind::HostClient,
            9 => Kind::Standby,
            10 => Kind::Quiesce,
            11 => Kind::Quiesced,
            12 => Kind::Resume,
            13 => Kind::Retire,
            14 => Kind::Failed,
            _ => return None,
        })
    }
}

/// [`Kind::Reply`] flag: close the frontend connection.
pub const FLAG_CLOSE: u32 = 1;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct FrameHeader {
    kind: u32,
    flags: u32,
    id: u64,
}

// SAFETY: `repr(C)`, integers without padding (16 bytes).
unsafe impl ByteValued for FrameHeader {}

/// A frame received.
#[derive(Debug)]
pub struct Frame {
    pub kind: Kind,
    pub flags: u32,
    pub id: u64,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Frame {
    /// The payload read as u64 ids.
    pub fn ids(&self) -> Vec<u64> {
        self.payload
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_ne_bytes(b)
            })
            .collect()
    }
}

impl Frame {
    /// The fds of an [`Kind::Fds`] frame with their ids; an error if the
    /// counts differ.
    pub fn into_fd_items(self) -> io::Result<Vec<(u64, OwnedFd)>> {
        let ids = self.ids();
        if ids.len() != self.fds.len() {
            return Err(invalid(format!(
                "{} ids with {} fds",
                ids.len(),
                self.fds.len()
            )));
        }
        Ok(ids.into_iter().zip(self.fds).collect())
    }
}

/// Encodes ids as a payload.
pub fn ids_payload(ids: &[u64]) -> Vec<u8> {
    ids.iter().flat_map(|i| i.to_ne_bytes()).collect()
}

/// One end of a keeper-worker link.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Channel {
    /// A connected pair (close-on-exec; clear it on the end a child keeps).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writes two descriptors into `fds`.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Wraps an inherited end.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Channel { fd }
    }

    /// Sends one frame, blocking until the socket takes it.
    pub fn send(
        &self,
        kind: Kind,
        flags: u32,
        id: u64,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<()> {
        self.send_flags(kind, flags, id, payload, fds, 0)
    }

    /// [`Channel::send`] without waiting, whatever the socket's mode:
    /// `WouldBlock` when the socket has no room for the frame now.
    pub fn try_send(
        &self,
        kind: Kind,
        flags: u32,
        id: u64,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<()> {
        self.send_flags(kind, flags, id, payload, fds, libc::MSG_DONTWAIT)
    }

    fn send_flags(
        &self,
        kind: Kind,
        flags: u32,
        id: u64,
        payload: &[u8],
        fds: &[RawFd],
        send_flags: libc::c_int,
    ) -> io::Result<()> {
        if fds.len() > MAX_FDS_PER_FRAME || payload.len() + FRAME_HEADER_BYTES > MAX_FRAME_BYTES {
            return Err(invalid(format!(
                "frame too large: {} bytes, {} fds",
                payload.len(),
                fds.len()
            )));
        }
        let header = FrameHeader {
            kind: kind as u32,
            flags,
            id,
        };
        let mut iov = [
            libc::iovec {
                iov_base: header.as_slice().as_ptr() as *mut libc::c_void,
                iov_len: FRAME_HEADER_BYTES,
            },
            libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            },
        ];
        let mut cmsg_buf = [0u64; cmsg_words(MAX_FDS_PER_FRAME)];
        // SAFETY: msghdr is plain data; all zeroes is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = 2;
        if !fds.is_empty() {
            let fd_bytes = std::mem::size_of_val(fds);
            // SAFETY: CMSG_* only compute sizes and pointers inside
            // `cmsg_buf`, which is large enough for MAX_FDS_PER_FRAME fds.
            unsafe {
                msg.msg_control = cmsg_buf.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(fd_bytes as u32) as _;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                    fds.len(),
                );
            }
        }
        loop {
            // SAFETY: `msg` points at live buffers set up above.
            let n = unsafe {
                libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | send_flags)
            };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receives one frame. `Ok(None)`: the other end closed, or nothing
    /// is waiting on a non-blocking channel (`WouldBlock` is returned as an
    /// error then).
    pub fn recv(&self) -> io::Result<Option<Frame>> {
        self.recv_flags(0)
    }

    /// [`Channel::recv`] without waiting, whatever the socket's mode:
    /// `WouldBlock` when no frame is waiting.
    pub fn try_recv(&self) -> io::Result<Option<Frame>> {
        self.recv_flags(libc::MSG_DONTWAIT)
    }

    fn recv_flags(&self, flags: libc::c_int) -> io::Result<Option<Frame>> {
        let mut header = FrameHeader::default();
        // Not zeroed: most frames are a header and a few bytes, and the
        // receive lies on the path of every host client.
        let mut payload: Vec<u8> = Vec::with_capacity(MAX_FRAME_BYTES);
        let mut iov = [
            libc::iovec {
                iov_base: header.as_mut_slice().as_mut_ptr().cast(),
                iov_len: FRAME_HEADER_BYTES,
            },
            libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: payload.capacity(),
            },
        ];
        let mut cmsg_buf = [0u64; cmsg_words(MAX_FDS_PER_FRAME + 3)];
        // SAFETY: msghdr is plain data; all zeroes is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = 2;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg_buf) as _;
        let n = loop {
            // SAFETY: `msg` points at live buffers set up above.
            let n = unsafe {
                libc::recvmsg(
                    self.fd.as_raw_fd(),
                    &mut msg,
                    libc::MSG_CMSG_CLOEXEC | flags,
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let fds = take_fds(&msg);
        if n == 0 {
            return Ok(None);
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(invalid("frame truncated".into()));
        }
        if n < FRAME_HEADER_BYTES {
            return Err(invalid(format!("frame of {n} bytes has no header")));
        }
        let kind = Kind::from_u32(header.kind)
            .ok_or_else(|| invalid(format!("unknown frame kind {}", header.kind)))?;
        // SAFETY: the frame was not truncated, so recvmsg wrote its `n`
        // bytes whole: the header, then `n - FRAME_HEADER_BYTES` bytes at
        // the start of `payload`'s buffer, which its capacity bounds.
        unsafe { payload.set_len(n - FRAME_HEADER_BYTES) };
        Ok(Some(Frame {
            kind,
            flags: header.flags,
            id: header.id,
            payload,
            fds,
        }))
    }

    /// Blocking or not.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: fcntl(2) on our own descriptor.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if nonblocking {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends fds with their ids, in as many frames as needed.
    pub fn send_fds(&self, items: &[(u64, RawFd)]) -> io::Result<()> {
        for chunk in items.chunks(MAX_FDS_PER_FRAME) {
            let ids: Vec<u64> = chunk.iter().map(|&(id, _)| id).collect();
            let fds: Vec<RawFd> = chunk.iter().map(|&(_, fd)| fd).collect();
            self.send(Kind::Fds, 0, 0, &ids_payload(&ids), &fds)?;
        }
        Ok(())
    }

    /// Another handle on the same end.
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(Channel {
            fd: self.fd.try_clone()?,
        })
    }

    /// Consumes the channel, returning its descriptor.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// u64 words of a control buffer for `fds` descriptors.
const fn cmsg_words(fds: usize) -> usize {
    // CMSG_SPACE: the aligned cmsghdr (16 bytes) plus the aligned data.
    (16 + (fds * 4).next_multiple_of(8)) / 8
}

/// Takes ownership of every descriptor in `msg`'s SCM_RIGHTS messages.
fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut out = Vec::new();
    // SAFETY: walks the control messages the kernel wrote into the buffer
    // `msg` describes; each SCM_RIGHTS payload is an array of new
    // descriptors that this process now owns.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    out.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn frames_arrive_whole_with_their_fds() {
        let (a, b) = Channel::pair().unwrap();
        let (mut r, mut w) = std::os::unix::net::UnixStream::pair().unwrap();
        a.send(Kind::Forward, 0, 7, b"hello", &[w.as_raw_fd()])
            .unwrap();
        a.send(Kind::Reply, FLAG_CLOSE, 8, &[], &[]).unwrap();
        let f = b.recv().unwrap().unwrap();
        assert_eq!(
            (f.kind, f.id, &f.payload[..]),
            (Kind::Forward, 7, &b"hello"[..])
        );
        assert_eq!(f.fds.len(), 1);
        // The fd received is the same socket.
        let mut got = std::fs::File::from(f.fds.into_iter().next().unwrap());
        got.write_all(b"x").unwrap();
        let mut buf = [0u8; 1];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"x");
        w.write_all(b"y").unwrap();
        let f = b.recv().unwrap().unwrap();
        assert_eq!(
            (f.kind, f.flags, f.id, f.payload.len()),
            (Kind::Reply, FLAG_CLOSE, 8, 0)
        );
        assert_eq!(b.try_recv().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        drop(a);
        assert!(b.recv().unwrap().is_none());
    }

    #[test]
    fn a_host_client_frame_carries_its_uid_and_stream() {
        let (keeper, worker) = Channel::pair().unwrap();
        let (client, accepted) = std::os::unix::net::UnixStream::pair().unwrap();
        let uid = crate::fdstore::well_known::FIRST_KEEPER_CONN_UID + 3;
        keeper
            .try_send(Kind::HostClient, 0, uid, &[], &[accepted.as_raw_fd()])
            .unwrap();
        // The keeper keeps its own copy; the worker gets another.
        drop(accepted);
        let f = worker.recv().unwrap().unwrap();
        assert_eq!((f.kind, f.id, f.payload.len()), (Kind::HostClient, uid, 0));
        assert_eq!(f.fds.len(), 1);
        let mut got = std::fs::File::from(f.fds.into_iter().next().unwrap());
        (&client).write_all(b"CONNECT 5\n").unwrap();
        let mut line = [0u8; 10];
        got.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"CONNECT 5\n");
        assert_eq!(Kind::from_u32(8), Some(Kind::HostClient));
        assert_eq!(Kind::from_u32(14), Some(Kind::Failed));
        assert_eq!(Kind::from_u32(15), None);
    }

    #[test]
    fn try_send_says_would_block_when_the_socket_is_full() {
        let (a, _b) = Channel::pair().unwrap();
        let payload = vec![0u8; 4096];
        let mut sent = 0;
        let e = loop {
            match a.try_send(Kind::Withdraw, 0, 0, &payload, &[]) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 100_000, "the socket never filled");
        };
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(sent > 0);
    }

    #[test]
    fn many_fds_go_in_batches() {
        let (a, b) = Channel::pair().unwrap();
        let files: Vec<std::fs::File> = (0..600)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let items: Vec<(u64, RawFd)> = files
            .iter()
            .enumerate()
            .map(|(i, f)| (i as u64 + 1000, f.as_raw_fd()))
            .collect();
        let t = std::thread::spawn(move || a.send_fds(&items).unwrap());
        let mut ids = Vec::new();
        while ids.len() < 600 {
            let f = b.recv().unwrap().unwrap();
            assert_eq!(f.kind, Kind::Fds);
            assert_eq!(f.ids().len(), f.fds.len());
            ids.extend(f.ids());
        }
        t.join().unwrap();
        assert_eq!(ids, (1000..1600).collect::<Vec<u64>>());
    }

    #[test]
    fn junk_is_an_error_not_a_panic() {
        let (a, b) = Channel::pair().unwrap();
        // SAFETY: send(2) of a local buffer on our own socket.
        unsafe { libc::send(a.as_raw_fd(), b"abc".as_ptr().cast(), 3, 0) };
        assert!(b.recv().is_err());
        let junk = FrameHeader {
            kind: 99,
            flags: 0,
            id: 0,
        };
        // SAFETY: as above.
        unsafe { libc::send(a.as_raw_fd(), junk.as_slice().as_ptr().cast(), 16, 0) };
        assert!(b.recv().is_err());
    }
}
