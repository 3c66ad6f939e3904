//! The crash-recovery workload: a device with many open connections
//! (half opened by the guest, half by the host), a few of them moving
//! data, is SIGKILLed again and again. Per kill it measures
//!
//! * recovery: from the signal to the first used element the device
//!   publishes after it (see `recovery`), and
//! * connections kept: how many still carry a verified message each way
//!   (the idle ones, see `probe`) or bytes written after the kill (the
//!   moving ones, see `movers`), and how many were reset.
//!
//! A backend with a keeper (vsockd) loses its worker, and the same
//! device and connections go through every kill. A backend without one
//! (the peer, `vsockd --no-keeper`) is the process killed: its device is
//! gone, which the virtual VMM sees as the vhost-user socket closing, so
//! its recovery is "never" and no bound is waited out. Such a backend is
//! started afresh, with its virtual VM and connections, for each kill.

use std::path::Path;
use std::thread;
use std::time::Duration;

use crate::chaos::Rng;
use crate::recovery::{wait_for_service, Recovery};
use crate::vmm::VirtualVm;
use crate::{Backend, BackendKind};

use super::fleet::{Fleet, SessionError, CHECK_BOUND};
use super::probe::Tally;
use super::workload::percentile;
use super::{Row, Settings};

/// Longest pause before a kill, so kills land at random points of the
/// moving streams.
const KILL_JITTER_MAX_US: u64 = 10_000;
/// Longest wait for a killed process to be dead.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Longest wait for the device to serve again: past it, "never".
pub const RECOVERY_BOUND: Duration = Duration::from_secs(10);
/// Host ports: guest-initiated idle connections, host-initiated idle
/// ones, then the same for moving connections.
const PORT_BASE: u32 = 6000;
/// Seeds of the idle connections' streams; the moving ones follow them.
const SEED_BASE: u64 = 1 << 32;

/// One backend's kills in one round.
#[derive(Debug, Clone, Default)]
pub struct CrashRound {
    pub recoveries: Vec<Recovery>,
    /// Every connection's condition after each kill.
    pub tallies: Vec<Tally>,
    /// Bytes the moving streams found lost or repeated, over all kills.
    pub gap_bytes: u64,
}

impl CrashRound {
    /// The round's values of the crash rows: recovery percentiles in ms
    /// (infinite for "never"), the fewest connections kept after a kill
    /// and the most reset.
    pub fn rows(&self) -> Vec<(Row, f64)> {
        let mut ms: Vec<f64> = self
            .recoveries
            .iter()
            .map(|r| r.time().map_or(f64::INFINITY, |d| d.as_secs_f64() * 1e3))
            .collect();
        ms.sort_by(f64::total_cmp);
        let kept = self.tallies.iter().map(|t| t.kept).min().unwrap_or(0);
        let reset = self.tallies.iter().map(|t| t.reset).max().unwrap_or(0);
        vec![
            (Row::RecoveryP50, percentile(&ms, 50.0)),
            (Row::RecoveryP99, percentile(&ms, 99.0)),
            (Row::ConnsKept, kept as f64),
            (Row::ConnsReset, reset as f64),
        ]
    }
}

impl std::fmt::Display for CrashRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let served: Vec<f64> = self
            .recoveries
            .iter()
            .filter_map(|r| r.time().map(|d| d.as_secs_f64() * 1e3))
            .collect();
        let gone = self
            .recoveries
            .iter()
            .filter(|r| **r == Recovery::DeviceGone)
            .count();
        let late = self.recoveries.len() - served.len() - gone;
        write!(
            f,
            "{} kills: served again after {}",
            self.recoveries.len(),
            served.len()
        )?;
        if let (Some(lo), Some(hi)) = (
            served.iter().copied().reduce(f64::min),
            served.iter().copied().reduce(f64::max),
        ) {
            write!(f, " ({lo:.1} to {hi:.1} ms)")?;
        }
        write!(
            f,
            ", device gone after {gone}, nothing served within {RECOVERY_BOUND:?} after {late}"
        )?;
        let most = |g: fn(&Tally) -> usize| self.tallies.iter().map(g).max().unwrap_or(0);
        let fewest_kept = self.tallies.iter().map(|t| t.kept).min().unwrap_or(0);
        write!(
            f,
            "; after a kill at least {fewest_kept} connections kept, at most {} reset, {} silent, {} altered; \
             moving streams: {} bytes lost or repeated",
            most(|t| t.reset),
            most(|t| t.silent),
            most(|t| t.altered),
            self.gap_bytes
        )
    }
}

/// A backend, its virtual VM and the connections under test. Fields drop
/// in order: the movers' threads first, the backend last.
struct Session {
    fleet: Fleet,
    vm: VirtualVm,
    backend: Backend,
}

impl Session {
    /// Starts `kind` in `dir` and opens `s.crash_conns` connections; every
    /// one must work before the first kill.
    fn open(kind: BackendKind, s: &Settings, dir: &Path) -> Result<Session, SessionError> {
        std::fs::create_dir_all(dir).map_err(|source| SessionError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let harness = |what: &str| {
            let what = format!("{}: {what}", kind.name());
            move |source| SessionError::Harness { what, source }
        };
        let backend = super::start_backend(kind, dir).map_err(harness("start"))?;
        let vm = VirtualVm::start(backend.socket(), super::vm_options(s))
            .map_err(|e| backend.attach(crate::Error::new(e.to_string())))
            .map_err(harness("virtual VM start"))?;
        let fleet =
            Fleet::open(&vm, backend.uds(), s.crash_conns, PORT_BASE, SEED_BASE).map_err(|e| {
                SessionError::Io {
                    what: format!("{}: {}", kind.name(), e.what),
                    source: e.source,
                }
            })?;
        let mut session = Session { fleet, vm, backend };
        session.fleet.check_ready(s.crash_conns, "kill")?;
        Ok(session)
    }

    /// SIGKILLs the worker (with a keeper) or the backend process, and
    /// measures what follows.
    fn kill(&mut self, k: usize) -> Result<(Recovery, Tally), SessionError> {
        let kind = self.backend.kind();
        let killed = if kind.has_keeper() {
            self.backend.kill_worker_now(KILL_WAIT)
        } else {
            self.backend.kill_now(KILL_WAIT)
        }
        .map_err(|source| SessionError::Harness {
            what: format!("{}: kill #{k}", kind.name()),
            source,
        })?;
        let mark = self.fleet.movers.mark();
        let recovery = wait_for_service(&self.vm, killed.at, RECOVERY_BOUND);
        Ok((recovery, self.fleet.check(&mark, CHECK_BOUND)))
    }

    /// Stops the moving streams and ends the session; returns the bytes
    /// they found lost or repeated.
    fn close(self) -> u64 {
        let Session { fleet, vm, backend } = self;
        let Fleet { movers, idle } = fleet;
        let gaps = movers.stop();
        drop((idle, vm, backend));
        gaps
    }
}

/// One round of kills against `kind`, in `dir`.
pub fn run(kind: BackendKind, s: &Settings, dir: &Path) -> Result<CrashRound, SessionError> {
    let mut rng = Rng::from_clock();
    let mut round = CrashRound::default();
    let mut session = None;
    for k in 0..s.kills {
        let sdir = dir.join(format!("crash-{k}"));
        let live = match session.take() {
            Some(live) => live,
            None => Session::open(kind, s, &sdir)?,
        };
        let live = session.insert(live);
        thread::sleep(Duration::from_micros(rng.below(KILL_JITTER_MAX_US)));
        let (recovery, tally) = live.kill(k)?;
        round.recoveries.push(recovery);
        round.tallies.push(tally);
        if !kind.has_keeper() {
            if let Some(dead) = session.take() {
                round.gap_bytes += dead.close();
            }
            let _ = std::fs::remove_dir_all(&sdir);
        }
    }
    if let Some(live) = session.take() {
        round.gap_bytes += live.close();
    }
    Ok(round)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_recovering_shows_as_infinite() {
        let kept = |k| Tally {
            kept: k,
            ..Tally::default()
        };
        let r = CrashRound {
            recoveries: vec![
                Recovery::Served(Duration::from_millis(4)),
                Recovery::Served(Duration::from_millis(2)),
                Recovery::DeviceGone,
            ],
            tallies: vec![kept(10), kept(8), kept(10)],
            gap_bytes: 0,
        };
        let rows = r.rows();
        assert_eq!(rows[0], (Row::RecoveryP50, 4.0));
        assert_eq!(rows[1], (Row::RecoveryP99, f64::INFINITY));
        assert_eq!(rows[2], (Row::ConnsKept, 8.0));
        assert_eq!(rows[3], (Row::ConnsReset, 0.0));
    }
}
