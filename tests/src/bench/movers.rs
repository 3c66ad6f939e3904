//! Connections that keep data moving through kills: on each, the guest
//! and the host both write a pattern stream at a steady pace, and both
//! read the other's through a gap-tolerant checker (a kill may cost a raw
//! host stream one chunk, see DESIGN.md), so the device always has
//! packets to serve and a recovery shows at once.
//!
//! A moving connection still works after a kill when, both ways, bytes
//! written after the kill arrive. Every socket call has a short timeout,
//! so the threads notice when to stop even on a dead device.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::chaos::StreamCheck;
use crate::pattern::{self, reply_seed};
use crate::vmm::VStream;

use super::probe::{Fate, Tally};

/// Bytes one writer sends per step.
pub const MOVER_CHUNK_BYTES: usize = 4096;
/// Time between two steps of a writer.
pub const MOVER_PERIOD: Duration = Duration::from_millis(2);
/// Timeout of every socket call of a mover.
const MOVER_IO_SLICE: Duration = Duration::from_millis(50);
/// How often a check looks at the counters.
const CHECK_POLL: Duration = Duration::from_micros(500);

/// Fate codes kept in an atomic.
const FATE_NONE: u8 = 0;
const FATE_RESET: u8 = 1;
const FATE_ALTERED: u8 = 2;

/// One direction of a moving connection.
#[derive(Default)]
struct Flow {
    /// Bytes the writer has handed to its socket.
    sent: AtomicU64,
    /// Stream offset the reader has reached (gaps included).
    received: AtomicU64,
    /// Bytes the reader found lost or repeated.
    gap_bytes: AtomicU64,
    fate: AtomicU8,
}

impl Flow {
    fn fail(&self, fate: Fate) {
        let code = match fate {
            Fate::Altered => FATE_ALTERED,
            _ => FATE_RESET,
        };
        let _ = self
            .fate
            .compare_exchange(FATE_NONE, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    fn fate(&self) -> Option<Fate> {
        match self.fate.load(Ordering::SeqCst) {
            FATE_NONE => None,
            FATE_ALTERED => Some(Fate::Altered),
            _ => Some(Fate::Reset),
        }
    }
}

/// Both ends of a moving connection.
struct Ends {
    guest: VStream,
    host: UnixStream,
}

/// A socket end a mover thread writes or reads.
#[derive(Clone, Copy)]
enum Side {
    Guest,
    Host,
}

impl Ends {
    fn write(&self, side: Side, buf: &[u8]) -> io::Result<usize> {
        match side {
            Side::Guest => self.guest.write(buf),
            Side::Host => (&self.host).write(buf),
        }
    }

    fn read(&self, side: Side, buf: &mut [u8]) -> io::Result<usize> {
        match side {
            Side::Guest => self.guest.read(buf),
            Side::Host => (&self.host).read(buf),
        }
    }
}

/// Whether an error is only a call's timeout.
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Counters sampled right after a kill.
#[derive(Debug, Clone)]
pub struct Mark(Vec<u64>);

/// How the moving streams ended (see [`Movers::drain`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Streams (two per connection) that delivered every byte written,
    /// once and in order.
    pub exact: usize,
    /// Streams that did not: reset, altered, short of what was written
    /// when the deadline came, or with bytes lost or repeated.
    pub inexact: usize,
    /// Bytes written on all the streams.
    pub bytes: u64,
    /// Bytes the readers found lost or repeated.
    pub gap_bytes: u64,
}

/// The moving connections and their threads; dropping stops them.
pub struct Movers {
    flows: Vec<Arc<Flow>>,
    /// Tells the writers to stop.
    stop_writing: Arc<AtomicBool>,
    /// Tells the readers (and the writers) to stop.
    stop: Arc<AtomicBool>,
    writers: Vec<JoinHandle<()>>,
    readers: Vec<JoinHandle<()>>,
}

impl Movers {
    /// Starts moving data on every pair; connection `i` uses seed
    /// `seed_base + i` guest to host and its reply seed host to guest.
    pub fn start(pairs: Vec<(VStream, UnixStream)>, seed_base: u64) -> io::Result<Movers> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_writing = Arc::new(AtomicBool::new(false));
        let mut movers = Movers {
            flows: Vec::new(),
            stop_writing: stop_writing.clone(),
            stop: stop.clone(),
            writers: Vec::new(),
            readers: Vec::new(),
        };
        for (i, (guest, host)) in pairs.into_iter().enumerate() {
            guest.set_read_timeout(Some(MOVER_IO_SLICE));
            guest.set_write_timeout(Some(MOVER_IO_SLICE));
            host.set_read_timeout(Some(MOVER_IO_SLICE))?;
            host.set_write_timeout(Some(MOVER_IO_SLICE))?;
            let ends = Arc::new(Ends { guest, host });
            let seed = seed_base + i as u64;
            for (from, to, seed) in [
                (Side::Guest, Side::Host, seed),
                (Side::Host, Side::Guest, reply_seed(seed)),
            ] {
                let flow = Arc::new(Flow::default());
                movers.flows.push(flow.clone());
                let (e, f, s) = (ends.clone(), flow.clone(), stop_writing.clone());
                movers.writers.push(
                    thread::Builder::new()
                        .name("bench-mover-write".into())
                        .spawn(move || write_paced(&e, from, seed, &f, &s))?,
                );
                let (e, s) = (ends.clone(), stop.clone());
                movers.readers.push(
                    thread::Builder::new()
                        .name("bench-mover-read".into())
                        .spawn(move || read_checked(&e, to, seed, &flow, &s))?,
                );
            }
        }
        Ok(movers)
    }

    pub fn len(&self) -> usize {
        self.flows.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// What every writer has sent so far: take it right after a kill.
    pub fn mark(&self) -> Mark {
        Mark(
            self.flows
                .iter()
                .map(|f| f.sent.load(Ordering::SeqCst))
                .collect(),
        )
    }

    /// Waits, until `deadline`, for bytes written after `mark` to arrive
    /// both ways on every moving connection; counts each connection.
    pub fn check(&self, mark: &Mark, deadline: Instant) -> Tally {
        let moved = |i: usize| self.flows[i].received.load(Ordering::SeqCst) > mark.0[i];
        let settled = |i: usize| moved(i) || self.flows[i].fate().is_some();
        while !(0..self.flows.len()).all(settled) && Instant::now() < deadline {
            thread::sleep(CHECK_POLL);
        }
        let mut t = Tally::default();
        for pair in (0..self.flows.len()).collect::<Vec<_>>().chunks(2) {
            let fate = pair.iter().find_map(|&i| {
                self.flows[i]
                    .fate()
                    .or_else(|| (!moved(i)).then_some(Fate::Silent))
            });
            t.count(fate);
        }
        t
    }

    /// Stops every thread; returns the bytes lost or repeated on all the
    /// streams.
    pub fn stop(mut self) -> u64 {
        self.join();
        self.flows
            .iter()
            .map(|f| f.gap_bytes.load(Ordering::SeqCst))
            .sum()
    }

    /// Stops the writers, waits until `deadline` for every byte written
    /// to arrive, then stops the readers; says which streams came through
    /// byte-exact.
    pub fn drain(mut self, deadline: Instant) -> Drained {
        self.stop_writing.store(true, Ordering::SeqCst);
        for t in self.writers.drain(..) {
            let _ = t.join();
        }
        let arrived = |f: &Flow| f.received.load(Ordering::SeqCst) >= f.sent.load(Ordering::SeqCst);
        while !self.flows.iter().all(|f| arrived(f) || f.fate().is_some())
            && Instant::now() < deadline
        {
            thread::sleep(CHECK_POLL);
        }
        self.join();
        let mut d = Drained::default();
        for f in &self.flows {
            let sent = f.sent.load(Ordering::SeqCst);
            let gaps = f.gap_bytes.load(Ordering::SeqCst);
            d.bytes += sent;
            d.gap_bytes += gaps;
            let exact =
                f.fate().is_none() && gaps == 0 && f.received.load(Ordering::SeqCst) == sent;
            if exact {
                d.exact += 1;
            } else {
                d.inexact += 1;
            }
        }
        d
    }

    fn join(&mut self) {
        self.stop_writing.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        for t in self.writers.drain(..).chain(self.readers.drain(..)) {
            let _ = t.join();
        }
    }
}

impl Drop for Movers {
    fn drop(&mut self) {
        self.join();
    }
}

/// Writes `MOVER_CHUNK_BYTES` of stream `seed` every `MOVER_PERIOD`.
fn write_paced(ends: &Ends, side: Side, seed: u64, flow: &Flow, stop: &AtomicBool) {
    let mut chunk = vec![0u8; MOVER_CHUNK_BYTES];
    let mut offset = 0u64;
    while !stop.load(Ordering::SeqCst) {
        pattern::fill(seed, offset, &mut chunk);
        let mut done = 0;
        while done < chunk.len() && !stop.load(Ordering::SeqCst) {
            match ends.write(side, &chunk[done..]) {
                Ok(n) => {
                    done += n;
                    flow.sent.fetch_add(n as u64, Ordering::SeqCst);
                }
                Err(e) if timed_out(&e) => {}
                Err(_) => return flow.fail(Fate::Reset),
            }
        }
        offset += done as u64;
        thread::sleep(MOVER_PERIOD);
    }
}

/// Reads stream `seed` through a gap-tolerant checker until stopped.
fn read_checked(ends: &Ends, side: Side, seed: u64, flow: &Flow, stop: &AtomicBool) {
    let mut buf = vec![0u8; 4 * MOVER_CHUNK_BYTES];
    let mut check = StreamCheck::new(seed);
    while !stop.load(Ordering::SeqCst) {
        match ends.read(side, &mut buf) {
            Ok(0) => return flow.fail(Fate::Reset),
            Ok(n) => {
                check.feed(&buf[..n]);
                if check.corrupt {
                    return flow.fail(Fate::Altered);
                }
                flow.received.store(check.offset(), Ordering::SeqCst);
                flow.gap_bytes
                    .store(check.lost() + check.duplicated(), Ordering::SeqCst);
            }
            Err(e) if timed_out(&e) => {}
            Err(_) => return flow.fail(Fate::Reset),
        }
    }
}
