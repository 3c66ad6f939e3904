//! Whether idle connections still work: each carries one small verified
//! message each way per probe, and what became of those that do not is
//! told apart (reset, silent, altered).
//!
//! Every connection has two pattern streams (see `pattern`), one each
//! way; probe `n` sends bytes `[n * PROBE_MESSAGE_BYTES, (n + 1) *
//! PROBE_MESSAGE_BYTES)` of them, so a byte lost or repeated at any
//! earlier probe shows as altered bytes. The steps run over all
//! connections at once (every host write, every guest write, then every
//! read), against one deadline for the whole probe.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::pattern::{self, reply_seed};
use crate::vmm::VStream;

/// Bytes each way per connection and probe.
pub const PROBE_MESSAGE_BYTES: usize = 32;

/// Shortest wait given to one step once the deadline is near (a Unix
/// socket refuses a zero timeout).
const MIN_STEP_WAIT: Duration = Duration::from_millis(1);

/// Why a connection stopped working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// An end was reset, closed or reached end of stream.
    Reset,
    /// Nothing arrived (or could be sent) before the deadline.
    Silent,
    /// Bytes arrived that were not the ones sent.
    Altered,
}

impl Fate {
    /// What an I/O error on a connection means.
    pub fn of(e: &io::Error) -> Fate {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof => Fate::Reset,
            _ => Fate::Silent,
        }
    }
}

/// How many connections are in each condition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub kept: usize,
    pub reset: usize,
    pub silent: usize,
    pub altered: usize,
}

impl Tally {
    /// Counts one connection.
    pub fn count(&mut self, fate: Option<Fate>) {
        match fate {
            None => self.kept += 1,
            Some(Fate::Reset) => self.reset += 1,
            Some(Fate::Silent) => self.silent += 1,
            Some(Fate::Altered) => self.altered += 1,
        }
    }

    pub fn total(&self) -> usize {
        self.kept + self.reset + self.silent + self.altered
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} kept, {} reset, {} silent, {} altered",
            self.kept, self.reset, self.silent, self.altered
        )
    }
}

/// One probed connection.
struct Probed {
    guest: VStream,
    host: UnixStream,
    /// Seed of the guest-to-host stream; host to guest is its reply seed.
    seed: u64,
    /// Set at the first failure, for good.
    fate: Option<Fate>,
}

/// Connections probed together.
pub struct ProbeSet {
    conns: Vec<Probed>,
    probes: u64,
}

impl ProbeSet {
    /// Takes the connections; connection `i` uses seed `seed_base + i`.
    pub fn new(pairs: Vec<(VStream, UnixStream)>, seed_base: u64) -> ProbeSet {
        let conns = pairs
            .into_iter()
            .enumerate()
            .map(|(i, (guest, host))| Probed {
                guest,
                host,
                seed: seed_base + i as u64,
                fate: None,
            })
            .collect();
        ProbeSet { conns, probes: 0 }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Sends the next message each way on every connection still working
    /// and checks what arrives, by `deadline`; counts every connection.
    pub fn probe(&mut self, deadline: Instant) -> Tally {
        let offset = self.probes * PROBE_MESSAGE_BYTES as u64;
        self.probes += 1;
        let wait = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(MIN_STEP_WAIT)
        };
        let message = |seed: u64| {
            let mut m = [0u8; PROBE_MESSAGE_BYTES];
            pattern::fill(seed, offset, &mut m);
            m
        };
        self.step(|c| {
            c.host.set_write_timeout(Some(wait()))?;
            (&c.host).write_all(&message(reply_seed(c.seed)))?;
            Ok(None)
        });
        self.step(|c| {
            c.guest.set_write_timeout(Some(wait()));
            c.guest.write_all(&message(c.seed))?;
            Ok(None)
        });
        self.step(|c| {
            let mut got = [0u8; PROBE_MESSAGE_BYTES];
            c.host.set_read_timeout(Some(wait()))?;
            (&c.host).read_exact(&mut got)?;
            Ok(pattern::check(c.seed, offset, &got).map(|_| Fate::Altered))
        });
        self.step(|c| {
            let mut got = [0u8; PROBE_MESSAGE_BYTES];
            c.guest.set_read_timeout(Some(wait()));
            (&c.guest).read_exact(&mut got)?;
            Ok(pattern::check(reply_seed(c.seed), offset, &got).map(|_| Fate::Altered))
        });
        let mut t = Tally::default();
        for c in &self.conns {
            t.count(c.fate);
        }
        t
    }

    /// Runs `f` on every connection still working; an error or a fate it
    /// returns is that connection's fate.
    fn step(&mut self, mut f: impl FnMut(&Probed) -> io::Result<Option<Fate>>) {
        for c in self.conns.iter_mut().filter(|c| c.fate.is_none()) {
            c.fate = match f(c) {
                Ok(fate) => fate,
                Err(e) => Some(Fate::of(&e)),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_fates() {
        let reset = io::Error::from(io::ErrorKind::BrokenPipe);
        assert_eq!(Fate::of(&reset), Fate::Reset);
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(Fate::of(&eof), Fate::Reset);
        let slow = io::Error::from(io::ErrorKind::WouldBlock);
        assert_eq!(Fate::of(&slow), Fate::Silent);
        let mut t = Tally::default();
        for f in [None, None, Some(Fate::Reset), Some(Fate::Altered)] {
            t.count(f);
        }
        assert_eq!(
            (t.kept, t.reset, t.silent, t.altered, t.total()),
            (2, 1, 0, 1, 4)
        );
        assert_eq!(t.to_string(), "2 kept, 1 reset, 0 silent, 1 altered");
    }
}
