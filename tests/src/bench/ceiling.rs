//! The ceiling: the same bytes through a plain Unix socketpair, with the
//! write and read sizes of the vsock run, in the same process and round.
//! Nothing a vhost-user backend does can beat one copy in and one copy
//! out of a kernel socket buffer, so this bounds every throughput row.

use std::io;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Instant;

use super::workload::{receive_count, send_count, Transfer};

/// Moves `bytes` over one socketpair: writes of `write_size`, reads of
/// `read_size`, one thread each.
pub fn socketpair(bytes: u64, write_size: usize, read_size: usize) -> io::Result<Transfer> {
    let (a, b) = UnixStream::pair()?;
    let chunk = vec![0x5au8; write_size];
    let t0 = Instant::now();
    let (sent, received) = thread::scope(|s| {
        let writer = s.spawn(|| send_count(&a, bytes, &chunk));
        let received = receive_count(&b, bytes, read_size);
        let sent = writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer panicked")));
        (sent, received)
    });
    let elapsed = t0.elapsed();
    sent?;
    received?;
    Ok(Transfer {
        bytes,
        elapsed,
        backend_cpu_seconds: 0.0,
    })
}
