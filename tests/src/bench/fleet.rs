//! Many connections held open through a disruption (a kill, an upgrade):
//! half opened by the guest, half by the host, a few of them moving data
//! both ways (see `movers`), the rest idle and probed (see `probe`).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::vmm::VirtualVm;

use super::movers::{Mark, Movers};
use super::probe::{ProbeSet, Tally};
use super::workload::{open_pairs, Direction};

/// What stopped a session of a disruption workload (kills, upgrades),
/// with the cause kept.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot create {}: {source}", path.display())]
    Dir { path: PathBuf, source: io::Error },
    #[error("{what}: {source}")]
    Harness { what: String, source: crate::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("before any {before}, {tally} (of {total} connections)")]
    NotReady {
        before: &'static str,
        tally: Tally,
        total: usize,
    },
}

/// How long checking the connections may take after a disruption.
pub const CHECK_BOUND: Duration = Duration::from_secs(10);

/// Connections of a fleet that keep data moving (half opened each way).
pub const MOVING_CONNS: usize = 4;

/// A step of opening a fleet that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct FleetError {
    pub what: String,
    pub source: io::Error,
}

/// The connections; fields drop in order, the movers' threads first.
pub struct Fleet {
    pub movers: Movers,
    pub idle: ProbeSet,
}

impl Fleet {
    /// Checks, before the first disruption (`before`: "kill",
    /// "upgrade"), that all `total` connections work.
    pub fn check_ready(&mut self, total: usize, before: &'static str) -> Result<(), SessionError> {
        let mark = self.movers.mark();
        let tally = self.check(&mark, CHECK_BOUND);
        if tally.kept != total {
            return Err(SessionError::NotReady {
                before,
                tally,
                total,
            });
        }
        Ok(())
    }
    /// Opens `total` connections (at least `MOVING_CONNS`) through `vm`
    /// and the hybrid socket `uds`, on host or guest ports `port_base` to
    /// `port_base + 3` (guest-initiated idle, host-initiated idle, then
    /// the same for the moving ones), and starts moving data. Idle
    /// connection `i` uses seed `seed_base + i`, the moving ones the
    /// seeds after `seed_base + total`.
    pub fn open(
        vm: &VirtualVm,
        uds: &Path,
        total: usize,
        port_base: u32,
        seed_base: u64,
    ) -> Result<Fleet, FleetError> {
        let open = |port: u32, n: usize, dir: Direction| {
            open_pairs(vm, uds, port, n, dir).map_err(|source| FleetError {
                what: format!("opening {n} connections {dir:?}"),
                source,
            })
        };
        let idle_conns = total.saturating_sub(MOVING_CONNS);
        let from_guest = idle_conns / 2;
        let mut idle = open(port_base, from_guest, Direction::GuestToHost)?;
        idle.extend(open(
            port_base + 1,
            idle_conns - from_guest,
            Direction::HostToGuest,
        )?);
        let mut moving = open(port_base + 2, MOVING_CONNS / 2, Direction::GuestToHost)?;
        moving.extend(open(
            port_base + 3,
            MOVING_CONNS - MOVING_CONNS / 2,
            Direction::HostToGuest,
        )?);
        let movers =
            Movers::start(moving, seed_base + total as u64).map_err(|source| FleetError {
                what: "starting the moving streams".into(),
                source,
            })?;
        Ok(Fleet {
            movers,
            idle: ProbeSet::new(idle, seed_base),
        })
    }

    /// Connections in the fleet.
    pub fn len(&self) -> usize {
        self.idle.len() + self.movers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every connection's condition, within `bound`: the idle ones are
    /// probed, the moving ones must carry bytes written after `mark`.
    pub fn check(&mut self, mark: &Mark, bound: Duration) -> Tally {
        let deadline = Instant::now() + bound;
        let mut t = self.idle.probe(deadline);
        let m = self.movers.check(mark, deadline);
        t.kept += m.kept;
        t.reset += m.reset;
        t.silent += m.silent;
        t.altered += m.altered;
        t
    }
}
