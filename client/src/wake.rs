//! Waking the session's I/O thread out of `poll(2)`: a socket pair whose
//! read end the thread polls next to vsockd's socket. Application calls
//! write a byte to wake it when they leave it something to do (bytes to
//! send, an `ACK` to send, room in the receive buffer, a stop).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

/// Both ends of the wake-up channel.
pub struct Waker {
    sender: UnixStream,
    receiver: UnixStream,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        let (sender, receiver) = UnixStream::pair()?;
        sender.set_nonblocking(true)?;
        receiver.set_nonblocking(true)?;
        Ok(Waker { sender, receiver })
    }

    /// Makes the receiving end readable. A full channel already is, so
    /// `WouldBlock` is success; other errors cannot happen while both ends
    /// are open and are ignored.
    pub fn wake(&self) {
        let _ = (&self.sender).write(&[1]);
    }

    /// Empties the channel, so the next poll waits for the next wake-up.
    pub fn drain(&self) {
        let mut sink = [0u8; 64];
        while let Ok(count) = (&self.receiver).read(&mut sink) {
            if count < sink.len() {
                break;
            }
        }
    }

    /// The end to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.receiver.as_fd()
    }
}
