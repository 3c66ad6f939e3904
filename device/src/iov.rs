//! Guest buffers as iovecs, and the only raw I/O the device does on them.
//!
//! [`GuestIovs`] is created by the backend from a descriptor chain whose
//! every buffer was checked to lie inside mapped guest memory. The device
//! copies headers through volatile accesses ([`GuestIovs::read_at`],
//! [`GuestIovs::write_at`]) and moves payload with `readv`/`writev` on an
//! [`IovWindow`] of it, so the kernel does the one copy per byte.

use std::io;
use std::os::fd::RawFd;

use vm_memory::VolatileSlice;

/// A list of guest buffers valid for the lifetime `'a`.
#[derive(Clone, Copy)]
pub struct GuestIovs<'a> {
    iovs: &'a [libc::iovec],
    len: usize,
}

impl<'a> GuestIovs<'a> {
    /// Wraps iovecs that point into guest memory.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped and valid for
    /// reads and writes for `'a`, and that no Rust reference aliases (guest
    /// memory is shared with the guest, so it is only accessed volatilely or
    /// by the kernel).
    pub unsafe fn new(iovs: &'a [libc::iovec]) -> Self {
        let len = iovs.iter().map(|v| v.iov_len).sum();
        GuestIovs { iovs, len }
    }

    /// No buffers at all.
    pub fn empty() -> Self {
        GuestIovs { iovs: &[], len: 0 }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f` with each (slice, offset into `buf`) covering
    /// `[offset, offset + buf_len)` of these buffers; returns bytes covered.
    fn for_each_slice(
        &self,
        offset: usize,
        buf_len: usize,
        mut f: impl FnMut(VolatileSlice<'_>, usize),
    ) -> usize {
        let mut skip = offset;
        let mut done = 0;
        for iov in self.iovs {
            if done == buf_len {
                break;
            }
            if skip >= iov.iov_len {
                skip -= iov.iov_len;
                continue;
            }
            let take = (iov.iov_len - skip).min(buf_len - done);
            // SAFETY: `new`'s contract makes `iov` valid for `'a`; the range
            // `[skip, skip + take)` lies inside it.
            let slice = unsafe { VolatileSlice::new(iov.iov_base.cast::<u8>().add(skip), take) };
            f(slice, done);
            done += take;
            skip = 0;
        }
        done
    }

    /// Copies bytes starting at `offset` into `dst`; returns how many.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        let n = dst.len();
        self.for_each_slice(offset, n, |s, at| {
            s.copy_to(&mut dst[at..at + s.len()]);
        })
    }

    /// Copies `src` into these buffers starting at `offset`; returns how many.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> usize {
        self.for_each_slice(offset, src.len(), |s, at| {
            s.copy_from(&src[at..at + s.len()]);
        })
    }

    /// Calls `f` with the bytes of `[offset, offset + len)` in order, in
    /// chunks copied out of guest memory (a checksum over guest bytes
    /// reads them this way, never through a reference into shared
    /// memory). Returns the bytes covered.
    pub fn read_chunks(&self, offset: usize, len: usize, mut f: impl FnMut(&[u8])) -> usize {
        const CHUNK_BYTES: usize = 4096;
        let mut chunk = [0u8; CHUNK_BYTES];
        let mut done = 0;
        while done < len {
            let want = (len - done).min(CHUNK_BYTES);
            let got = self.read_at(offset + done, &mut chunk[..want]);
            f(&chunk[..got]);
            done += got;
            if got < want {
                break;
            }
        }
        done
    }

    /// Fills `out` with iovecs covering `[offset, offset + len)`, clipped to
    /// what exists and to [`IOV_MAX`] iovecs, and returns the window over
    /// them. The window's length is exactly what one `readv`/`writev` of it
    /// can move, so a short transfer always means the socket had no more.
    pub fn window<'w>(
        &self,
        offset: usize,
        len: usize,
        out: &'w mut Vec<libc::iovec>,
    ) -> IovWindow<'w>
    where
        'a: 'w,
    {
        out.clear();
        let len = self.append_window(offset, len, out);
        IovWindow { iovs: out, len }
    }

    /// Appends iovecs covering `[offset, offset + len)` to `out`, stopping
    /// when `out` holds [`IOV_MAX`]; returns the bytes appended. Windows of
    /// several buffers gathered this way make one `readv` fill them all.
    pub(crate) fn append_window(
        &self,
        offset: usize,
        len: usize,
        out: &mut Vec<libc::iovec>,
    ) -> usize {
        let mut total = 0;
        self.for_each_slice(offset, len, |s, _| {
            if out.len() == IOV_MAX {
                return;
            }
            out.push(libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            });
            total += s.len();
        });
        total
    }
}

/// A sub-range of guest buffers, ready for `readv`/`writev`.
pub struct IovWindow<'w> {
    iovs: &'w [libc::iovec],
    len: usize,
}

impl<'w> IovWindow<'w> {
    /// A window over iovecs gathered with [`GuestIovs::append_window`]
    /// (only such iovecs may be passed: they are what makes I/O on the
    /// window sound), `len` bytes in all.
    pub(crate) fn gathered(iovs: &'w [libc::iovec], len: usize) -> Self {
        IovWindow { iovs, len }
    }

    /// Bytes in the window.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `readv(2)` from `fd` into the window.
    pub fn readv_from(&self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: the iovecs come from a `GuestIovs`, whose contract keeps
        // them valid for writes while this window lives.
        let n = unsafe { libc::readv(fd, self.iovs.as_ptr(), iov_count(self.iovs)) };
        cvt(n)
    }

    /// `writev(2)` of the window to `fd`.
    pub fn writev_to(&self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: as in `readv_from`, the iovecs are valid for reads.
        let n = unsafe { libc::writev(fd, self.iovs.as_ptr(), iov_count(self.iovs)) };
        cvt(n)
    }
}

/// Most iovecs one `readv`/`writev` takes (Linux's UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;

fn iov_count(iovs: &[libc::iovec]) -> libc::c_int {
    iovs.len().min(IOV_MAX) as libc::c_int
}

fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `read(2)` that retries on EINTR.
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid, exclusively borrowed buffer of its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match cvt(n) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Bytes waiting to be read in socket `fd` (`FIONREAD`).
pub fn queued_fd(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer we pass.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// `recv(2)` with `MSG_PEEK`: the bytes at the head of socket `fd`'s
/// queue, left there. Retries on EINTR; never blocks.
pub fn peek_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid, exclusively borrowed buffer of its length.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match cvt(n) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Most slices one [`write_fd`] writes.
pub const MAX_WRITE_SLICES: usize = 4;

/// `writev(2)` of up to [`MAX_WRITE_SLICES`] plain byte slices, retrying
/// on EINTR, with MSG_NOSIGNAL semantics provided by the process ignoring
/// SIGPIPE.
pub fn write_fd(fd: RawFd, bufs: &[&[u8]]) -> io::Result<usize> {
    let iovs: [libc::iovec; MAX_WRITE_SLICES] = std::array::from_fn(|i| libc::iovec {
        iov_base: bufs
            .get(i)
            .map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut _),
        iov_len: bufs.get(i).map_or(0, |b| b.len()),
    });
    let count = bufs.len().min(MAX_WRITE_SLICES) as libc::c_int;
    loop {
        // SAFETY: the first `count` iovecs describe the borrowed slices.
        let n = unsafe { libc::writev(fd, iovs.as_ptr(), count) };
        match cvt(n) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iovs_of(bufs: &mut [Vec<u8>]) -> Vec<libc::iovec> {
        bufs.iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect()
    }

    #[test]
    fn read_and_write_across_buffers() {
        let mut bufs = vec![vec![0u8; 3], vec![0u8; 0], vec![0u8; 5]];
        let iovs = iovs_of(&mut bufs);
        // SAFETY: the buffers outlive `g` and are not otherwise accessed.
        let g = unsafe { GuestIovs::new(&iovs) };
        assert_eq!(g.len(), 8);
        assert_eq!(g.write_at(1, b"abcdefgh"), 7);
        let mut out = [0u8; 8];
        assert_eq!(g.read_at(0, &mut out), 8);
        assert_eq!(&out, b"\0abcdefg");
        let mut scratch = Vec::new();
        let w = g.window(2, 4, &mut scratch);
        assert_eq!(w.len(), 4);
        assert_eq!(scratch.len(), 2);
        assert_eq!(scratch[0].iov_len, 1);
        assert_eq!(scratch[1].iov_len, 3);
        let w = g.window(6, 100, &mut scratch);
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn window_stops_at_iov_max() {
        let mut bufs: Vec<Vec<u8>> = (0..IOV_MAX + 10).map(|_| vec![0u8; 2]).collect();
        let iovs = iovs_of(&mut bufs);
        // SAFETY: the buffers outlive `g` and are not otherwise accessed.
        let g = unsafe { GuestIovs::new(&iovs) };
        let mut scratch = Vec::new();
        let len = g.window(0, g.len(), &mut scratch).len();
        assert_eq!(scratch.len(), IOV_MAX);
        assert_eq!(len, 2 * IOV_MAX, "length of what one syscall moves");
    }
}
