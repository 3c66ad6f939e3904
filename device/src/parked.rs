//! TX chains parked on a connection: guest payload the host stream has not
//! taken yet, left in guest memory instead of being copied out.
//!
//! When a `writev` from guest memory to the host stream is short, the chain
//! is not returned to the guest: it waits here with the count of its bytes
//! already written, and later `writev`s continue from guest memory. Every
//! payload byte is therefore copied once, by the kernel, even when the host
//! reader is slower than the guest writer. The guest sees backpressure as
//! TX chains that come back later, as with any device.
//!
//! States of one parked chain: parked (some payload unwritten) → written
//! (its head joins the completed list the backend returns to the used
//! ring). Two ways out skip the writing: [`Parked::copy_out`] copies what
//! is left into the connection's [`TxBuf`] (before guest memory is
//! remapped or the ring stops), and [`Parked::abandon`] gives the heads
//! back unwritten (the connection is gone).
//!
//! Invariants: chains leave in the order they came (bytes reach the host
//! in guest order); `bytes()` is the sum of what every parked chain has
//! left; a head is handed back exactly once.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use crate::iov::{GuestIovs, IovWindow, IOV_MAX};
use crate::txbuf::TxBuf;

/// One parked chain.
struct ParkedTx {
    head: u16,
    /// The payload still to write when parked, as iovecs into guest memory.
    iovs: Vec<libc::iovec>,
    /// Bytes of `iovs` written since.
    done: usize,
    len: usize,
}

impl ParkedTx {
    fn left(&self) -> usize {
        self.len - self.done
    }

    fn guest(&self) -> GuestIovs<'_> {
        // SAFETY: `Parked::push`'s contract keeps these buffers mapped and
        // untouched by the guest until the head is handed back, which
        // happens only when this chain leaves the list.
        unsafe { GuestIovs::new(&self.iovs) }
    }
}

/// The parked chains of one connection, oldest first.
#[derive(Default)]
pub(crate) struct Parked {
    chains: VecDeque<ParkedTx>,
    bytes: usize,
    /// iovec vectors of chains that left, reused by the next ones.
    spare: Vec<Vec<libc::iovec>>,
}

impl Parked {
    /// Chains parked.
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Payload bytes parked chains still have to write.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Parks chain `head`, whose bytes `[offset, offset + len)` of `pkt`
    /// are still to be written. False (nothing parked) when they span more
    /// than [`IOV_MAX`] buffers: the caller copies them instead.
    ///
    /// # Safety
    ///
    /// `pkt`'s buffers must stay mapped, and the guest must not reuse them,
    /// until `head` is handed back by [`Parked::write_to`],
    /// [`Parked::copy_out`] or [`Parked::abandon`]. A virtio driver does
    /// not reuse a chain before the device returns it; the backend keeps
    /// the mapping by calling `copy_out` before it changes.
    pub unsafe fn push(
        &mut self,
        head: u16,
        pkt: &GuestIovs<'_>,
        offset: usize,
        len: usize,
    ) -> bool {
        let mut iovs = self.spare.pop().unwrap_or_default();
        iovs.clear();
        if pkt.append_window(offset, len, &mut iovs) != len {
            self.spare.push(iovs);
            return false;
        }
        self.chains.push_back(ParkedTx {
            head,
            iovs,
            done: 0,
            len,
        });
        self.bytes += len;
        true
    }

    fn retire(&mut self, completed: &mut Vec<u16>) {
        if let Some(c) = self.chains.pop_front() {
            self.bytes -= c.left();
            completed.push(c.head);
            self.spare.push(c.iovs);
        }
    }

    /// Writes parked payload to `fd`, several chains per `writev`, until
    /// the stream is full or nothing is parked; heads of chains fully
    /// written are appended to `completed`. Returns the bytes written.
    pub fn write_to(
        &mut self,
        fd: RawFd,
        scratch: &mut Vec<libc::iovec>,
        completed: &mut Vec<u16>,
    ) -> io::Result<usize> {
        let mut total = 0;
        while !self.chains.is_empty() {
            scratch.clear();
            let mut len = 0;
            for c in &self.chains {
                if scratch.len() == IOV_MAX {
                    break;
                }
                len += c.guest().append_window(c.done, c.left(), scratch);
            }
            if len == 0 {
                break;
            }
            let n = match IovWindow::gathered(scratch, len).writev_to(fd) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    break
                }
                Err(e) => return Err(e),
            };
            total += n;
            let mut left = n;
            while left > 0 {
                let Some(c) = self.chains.front_mut() else {
                    break;
                };
                let step = left.min(c.left());
                c.done += step;
                self.bytes -= step;
                left -= step;
                if c.left() == 0 {
                    self.retire(completed);
                }
            }
            if n < len {
                // Short write: the stream is full.
                break;
            }
        }
        Ok(total)
    }

    /// Copies what every parked chain has left to the front of `txbuf`
    /// (parked bytes precede buffered ones) and hands every head back.
    /// The caller guarantees the room: parked plus buffered bytes never
    /// exceed the credit, which is the buffer's capacity.
    /// `end` is the connection's `rx_cnt`, where the buffered bytes end.
    pub fn copy_out(
        &mut self,
        txbuf: &mut TxBuf,
        completed: &mut Vec<u16>,
        end: u32,
    ) -> Result<(), ()> {
        for c in self.chains.iter().rev() {
            txbuf.push_front_guest(&c.guest(), c.done, c.left(), end)?;
        }
        while !self.chains.is_empty() {
            self.retire(completed);
        }
        Ok(())
    }

    /// Hands every head back unwritten (the connection is gone).
    pub fn abandon(&mut self, completed: &mut Vec<u16>) {
        while !self.chains.is_empty() {
            self.retire(completed);
        }
    }
}
