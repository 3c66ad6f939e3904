//! The measured workloads. Each runs against one backend and one virtual
//! VM, on its own ports, and leaves no connection behind except
//! [`idle_connections`], whose connections live as long as the value it
//! returns.
//!
//! Streams are counted, not verified: content is the integration tests'
//! job, and checking it here would be part of what is timed. The counts
//! are exact, so a backend that loses or invents bytes fails the run.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::hybrid::{hybrid_connect, HostListener};
use crate::vmm::{VStream, VirtualVm};

use super::procstat::tree_cpu_seconds;

/// Limit for any single accept or connect in a workload.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    GuestToHost,
    HostToGuest,
}

/// One bulk transfer's time and the backend's CPU time during it.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub bytes: u64,
    pub elapsed: Duration,
    pub backend_cpu_seconds: f64,
}

impl Transfer {
    pub fn mib_per_second(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64()
    }

    pub fn cpu_seconds_per_gib(&self) -> f64 {
        self.backend_cpu_seconds / (self.bytes as f64 / (1u64 << 30) as f64)
    }
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// Writes `count` bytes from `chunk`, repeated.
pub(super) fn send_count(mut w: impl Write, count: u64, chunk: &[u8]) -> io::Result<()> {
    let mut left = count;
    while left > 0 {
        let n = (chunk.len() as u64).min(left) as usize;
        w.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads exactly `count` bytes in reads of up to `chunk` bytes.
pub(super) fn receive_count(mut r: impl Read, count: u64, chunk: usize) -> io::Result<()> {
    let mut buf = vec![0u8; chunk];
    let mut got = 0u64;
    while got < count {
        let want = (chunk as u64).min(count - got) as usize;
        match r.read(&mut buf[..want]) {
            Ok(0) => return Err(other(format!("stream ended after {got} of {count} bytes"))),
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens `conns` connections between the guest and the host: the guest
/// connects to host port `port` (guest to host) or the host connects to
/// guest port `port` (host to guest). Returns them in pairs.
pub(super) fn open_pairs(
    vm: &VirtualVm,
    uds: &Path,
    port: u32,
    conns: usize,
    dir: Direction,
) -> io::Result<Vec<(VStream, UnixStream)>> {
    let mut pairs = Vec::with_capacity(conns);
    match dir {
        Direction::GuestToHost => {
            let l = HostListener::bind(uds, port)?;
            for _ in 0..conns {
                let g = vm.connect(port)?;
                let h = l.accept_timeout(STEP_TIMEOUT)?;
                pairs.push((g, h));
            }
        }
        Direction::HostToGuest => {
            let l = vm.listen(port)?;
            for _ in 0..conns {
                let (h, _) = hybrid_connect(uds, port)?;
                let g = l.accept(STEP_TIMEOUT)?;
                pairs.push((g, h));
            }
        }
    }
    Ok(pairs)
}

/// Moves `bytes` in all over `conns` parallel connections, writes of
/// `write_size` bytes on the sending side and reads of `read_size` on the
/// receiving side. Times from the first write to the last byte read, and
/// samples the backend's CPU time (`backend_pid` and its descendants)
/// around it.
#[allow(clippy::too_many_arguments)]
pub fn transfer(
    vm: &VirtualVm,
    uds: &Path,
    backend_pid: u32,
    port: u32,
    dir: Direction,
    conns: usize,
    bytes: u64,
    write_size: usize,
    read_size: usize,
) -> io::Result<Transfer> {
    let pairs = open_pairs(vm, uds, port, conns, dir)?;
    let per = bytes / conns as u64;
    let chunk = vec![0x5au8; write_size];
    let cpu0 = tree_cpu_seconds(backend_pid)?;
    let t0 = Instant::now();
    let results: Vec<io::Result<()>> = thread::scope(|s| {
        let mut handles = Vec::new();
        for (g, h) in &pairs {
            let chunk = &chunk;
            handles.push(s.spawn(move || match dir {
                Direction::GuestToHost => receive_count(h, per, read_size),
                Direction::HostToGuest => receive_count(g, per, read_size),
            }));
            handles.push(s.spawn(move || match dir {
                Direction::GuestToHost => send_count(g, per, chunk),
                Direction::HostToGuest => send_count(h, per, chunk),
            }));
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(other("a transfer thread panicked".into())))
            })
            .collect()
    });
    let elapsed = t0.elapsed();
    let cpu1 = tree_cpu_seconds(backend_pid)?;
    for r in results {
        r?;
    }
    Ok(Transfer {
        bytes: per * conns as u64,
        elapsed,
        backend_cpu_seconds: cpu1 - cpu0,
    })
}

/// Round trips of `size`-byte messages: the host writes one, a guest
/// thread echoes it, the host reads it back. Returns `count` round-trip
/// times, sorted, after `warmup` unmeasured ones.
pub fn round_trips(
    vm: &VirtualVm,
    uds: &Path,
    port: u32,
    size: usize,
    warmup: usize,
    count: usize,
) -> io::Result<Vec<Duration>> {
    let mut pairs = open_pairs(vm, uds, port, 1, Direction::HostToGuest)?;
    let (g, mut h) = pairs.pop().ok_or_else(|| other("no connection".into()))?;
    let total = warmup + count;
    let mut times = Vec::with_capacity(count);
    let echo: io::Result<()> = thread::scope(|s| {
        let g = &g;
        let echo = s.spawn(move || -> io::Result<()> {
            let mut buf = vec![0u8; size];
            let mut reader: &VStream = g;
            for _ in 0..total {
                reader.read_exact(&mut buf)?;
                g.write_all(&buf)?;
            }
            Ok(())
        });
        let host = (|| -> io::Result<()> {
            let msg = vec![0xa5u8; size];
            let mut back = vec![0u8; size];
            for i in 0..total {
                let t = Instant::now();
                h.write_all(&msg)?;
                h.read_exact(&mut back)?;
                if i >= warmup {
                    times.push(t.elapsed());
                }
                if back != msg {
                    return Err(other(format!("round trip {i} came back altered")));
                }
            }
            Ok(())
        })();
        if host.is_err() {
            // Unblock the echo thread.
            let _ = h.shutdown(std::net::Shutdown::Both);
        }
        let e = echo
            .join()
            .unwrap_or_else(|_| Err(other("the echo thread panicked".into())));
        host.and(e)
    });
    echo?;
    times.sort();
    Ok(times)
}

/// The `p`-th percentile (0 to 100) of sorted samples, nearest rank
/// (`T::default()` for none).
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Opens and closes `count` connections one after another, the host
/// connecting (`HostToGuest`) or the guest (`GuestToHost`); a thread on
/// the other side accepts and closes each. Returns connections per second.
pub fn setup_rate(
    vm: &VirtualVm,
    uds: &Path,
    port: u32,
    dir: Direction,
    count: usize,
) -> io::Result<f64> {
    let elapsed = match dir {
        Direction::HostToGuest => {
            let l = vm.listen(port)?;
            connect_and_close(
                count,
                || l.accept(STEP_TIMEOUT).map(drop),
                || hybrid_connect(uds, port).map(drop),
            )?
        }
        Direction::GuestToHost => {
            let l = HostListener::bind(uds, port)?;
            connect_and_close(
                count,
                || l.accept_timeout(STEP_TIMEOUT).map(drop),
                || vm.connect(port).map(drop),
            )?
        }
    };
    Ok(count as f64 / elapsed.as_secs_f64())
}

/// Runs `connect` `count` times while a second thread runs `accept` as
/// often; returns the time from the first connect to the last accept.
fn connect_and_close(
    count: usize,
    accept: impl Fn() -> io::Result<()> + Sync,
    mut connect: impl FnMut() -> io::Result<()>,
) -> io::Result<Duration> {
    thread::scope(|s| {
        let acceptor = s.spawn(|| (0..count).try_for_each(|_| accept()));
        let start = Instant::now();
        let connected = (0..count).try_for_each(|_| connect());
        let accepted = acceptor
            .join()
            .unwrap_or_else(|_| Err(other("the acceptor panicked".into())));
        let elapsed = start.elapsed();
        connected.and(accepted).map(|()| elapsed)
    })
}

/// Connections held open; dropping closes them.
pub struct IdleConnections {
    _pairs: Vec<(VStream, UnixStream)>,
}

/// Opens `count` idle connections, half from each side, on ports `port`
/// (guest-initiated) and `port + 1` (host-initiated).
pub fn idle_connections(
    vm: &VirtualVm,
    uds: &Path,
    port: u32,
    count: usize,
) -> io::Result<IdleConnections> {
    let from_guest = count / 2;
    let mut pairs = open_pairs(vm, uds, port, from_guest, Direction::GuestToHost)?;
    pairs.extend(open_pairs(
        vm,
        uds,
        port + 1,
        count - from_guest,
        Direction::HostToGuest,
    )?);
    Ok(IdleConnections { _pairs: pairs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_micros(100));
        assert_eq!(percentile(&v[..1], 99.0), Duration::from_micros(1));
        assert_eq!(percentile::<Duration>(&[], 50.0), Duration::ZERO);
        assert_eq!(percentile(&[1.0, f64::INFINITY], 99.0), f64::INFINITY);
    }

    #[test]
    fn counted_streams_fail_when_short() {
        let (a, b) = UnixStream::pair().expect("pair");
        let w = thread::spawn(move || send_count(&a, 10_000, &[1u8; 3000]));
        receive_count(&b, 10_000, 4096).expect("all of it");
        w.join().expect("writer").expect("written");
        let (a, b) = UnixStream::pair().expect("pair");
        send_count(&a, 100, &[1u8; 64]).expect("written");
        drop(a);
        let e = receive_count(&b, 101, 64).expect_err("one byte short");
        assert!(e.to_string().contains("after 100 of 101"), "{e}");
    }
}
