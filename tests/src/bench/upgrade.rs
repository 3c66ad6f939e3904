//! The live-upgrade workload: vsockd with many open connections (half
//! opened by the guest, half by the host), a few of them moving data both
//! ways, is upgraded again and again with `vsockd upgrade` (to the binary
//! it runs: what is measured is the hand-over, not a change). Per upgrade
//! it measures
//!
//! * the pause, from outside vsockd: the longest stretch in which the
//!   device published no used element (see `gaps`) that overlaps the
//!   `vsockd upgrade` call, that is from the last packet the old worker
//!   served to the first the new one served;
//! * the pause vsockd reports (`pause:`, the keeper's own figure: from
//!   telling the old worker to quiesce to the new worker's READY);
//! * the same longest stretch over a quiet window just before the call,
//!   for scale: what the moving streams' pace and the machine's noise
//!   alone give;
//! * where the pause went, from vsockd's log (see `phases`);
//!
//! and after each upgrade, that every connection still carries a
//! verified message each way (the idle ones) or bytes written after the
//! upgrade (the moving ones). At the end the moving streams stop and
//! every byte written on them must have arrived exactly once, in order.
//!
//! Only vsockd with its keeper can upgrade; other backends have no such
//! rows ("n/a" in the table).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Barrier, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::chaos::Rng;
use crate::vmm::VirtualVm;
use crate::{Backend, BackendKind};

use super::fleet::{Fleet, SessionError, CHECK_BOUND};
use super::gaps::{self, Advances};
use super::movers::Drained;
use super::noise::{CpuMark, Noise};
use super::phases::{self, Breakdown, GapMicros, Timeline, WallClock};
use super::probe::Tally;
use super::workload::percentile;
use super::{Row, Settings, GUEST_CID};

/// Longest pause before an upgrade, so upgrades land at random points of
/// the moving streams.
const UPGRADE_JITTER_MAX_US: u64 = 10_000;
/// The quiet window sampled before each upgrade.
pub const QUIET_WINDOW: Duration = Duration::from_millis(100);
/// Longest wait, after `vsockd upgrade` returned, for the device to serve.
pub const PAUSE_BOUND: Duration = Duration::from_secs(10);
/// Longest wait for the moving streams to deliver what was written.
const DRAIN_BOUND: Duration = Duration::from_secs(10);
/// Host ports (see `Fleet::open`): apart from the crash workload's.
const PORT_BASE: u32 = 6100;
/// Seeds of the connections' streams.
const SEED_BASE: u64 = 2 << 32;
/// Log lines at warn or error level shown with a round.
const SHOWN_COMPLAINTS: usize = 10;
/// vsockd's log level here: info logs each step of an upgrade (a few
/// lines per upgrade, none per packet).
const LOG_LEVEL: &str = "info";

/// One `vsockd upgrade` and what it did to the device.
#[derive(Debug, Clone)]
pub struct Upgraded {
    /// What `vsockd upgrade` printed, or why it failed.
    pub answer: Result<String, String>,
    /// The longest stretch without service around the call, whether the
    /// upgrade succeeded or was rolled back: none if the device did not
    /// serve again within `PAUSE_BOUND` of its return.
    pub pause: Option<Duration>,
    /// How much longer it can have been (see `gaps`).
    pub slack: Duration,
    /// The same over the quiet window before the call.
    pub quiet: Duration,
    /// The pause's ends on the log's clock (microseconds since the
    /// epoch): inner, then outer bounds.
    pub gap_micros: Option<GapMicros>,
    /// Every advance seen from the call on, on the log's clock: the
    /// earliest and the latest it can have happened.
    pub advances_micros: Vec<(i64, i64)>,
    /// How long the call took.
    pub call: Duration,
    /// Every connection's condition after it.
    pub tally: Tally,
}

impl Upgraded {
    /// The pause vsockd reported (`pause: <ms> ms`).
    pub fn reported_pause(&self) -> Option<Duration> {
        reported_pause(self.answer.as_ref().ok()?)
    }
}

/// The pause in an answer of `vsockd upgrade` (`pause: <ms> ms`).
pub fn reported_pause(answer: &str) -> Option<Duration> {
    let ms: f64 = answer
        .lines()
        .find_map(|l| l.strip_prefix("pause: "))?
        .strip_suffix(" ms")?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs_f64(ms / 1e3))
}

/// One round of upgrades.
#[derive(Debug, Clone, Default)]
pub struct UpgradeRound {
    /// Connections open through the upgrades.
    pub conns: usize,
    pub upgrades: Vec<Upgraded>,
    /// Each upgrade's steps, from vsockd's log, with the pause's ends
    /// when the log has one upgrade per call.
    pub timelines: Vec<Timeline>,
    /// How the moving streams ended.
    pub drained: Drained,
    /// vsockd's log lines at warn or error level (or why the log could
    /// not be read).
    pub complaints: Vec<String>,
    /// How busy the machine was with other work through the upgrades.
    pub noise: Option<Noise>,
}

/// Milliseconds, sorted.
fn sorted_ms(v: impl Iterator<Item = Duration>) -> Vec<f64> {
    let mut ms: Vec<f64> = v.map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    ms
}

/// p50, p99 and max of sorted values (infinite for none).
fn spread(sorted: &[f64]) -> [f64; 3] {
    if sorted.is_empty() {
        return [f64::INFINITY; 3];
    }
    [
        percentile(sorted, 50.0),
        percentile(sorted, 99.0),
        sorted[sorted.len() - 1],
    ]
}

impl UpgradeRound {
    /// Upgrades that `vsockd upgrade` reported as failed.
    pub fn failed(&self) -> usize {
        self.upgrades.iter().filter(|u| u.answer.is_err()).count()
    }

    /// Pauses in ms from outside, sorted; an upgrade after which the
    /// device never served counts as infinite.
    pub fn pauses_ms(&self) -> Vec<f64> {
        let mut ms = sorted_ms(self.upgrades.iter().filter_map(|u| u.pause));
        let never = self.upgrades.iter().filter(|u| u.pause.is_none()).count();
        ms.extend(std::iter::repeat(f64::INFINITY).take(never));
        ms
    }

    /// Pauses in ms as vsockd reported them, sorted.
    pub fn reported_ms(&self) -> Vec<f64> {
        sorted_ms(self.upgrades.iter().filter_map(Upgraded::reported_pause))
    }

    /// The upgrade with the longest pause from outside and its timeline,
    /// when the log has one per call.
    fn slowest(&self) -> Option<(usize, &Timeline)> {
        if self.timelines.len() != self.upgrades.len() {
            return None;
        }
        let (k, _) = self
            .upgrades
            .iter()
            .enumerate()
            .filter_map(|(k, u)| u.pause.map(|p| (k, p)))
            .max_by_key(|(_, p)| *p)?;
        Some((k, &self.timelines[k]))
    }

    /// The round's values of the upgrade rows.
    pub fn rows(&self) -> Vec<(Row, f64)> {
        let [p50, p99, max] = spread(&self.pauses_ms());
        let [r50, r99, rmax] = spread(&self.reported_ms());
        let kept = self
            .upgrades
            .iter()
            .map(|u| u.tally.kept)
            .min()
            .unwrap_or(0);
        vec![
            (Row::UpgradePause(Source::Outside, Stat::P50), p50),
            (Row::UpgradePause(Source::Outside, Stat::P99), p99),
            (Row::UpgradePause(Source::Outside, Stat::Max), max),
            (Row::UpgradePause(Source::Reported, Stat::P50), r50),
            (Row::UpgradePause(Source::Reported, Stat::P99), r99),
            (Row::UpgradePause(Source::Reported, Stat::Max), rmax),
            (Row::UpgradeConnsKept, kept as f64),
            (Row::UpgradeStreamsExact, self.drained.exact as f64),
            (Row::UpgradesFailed, self.failed() as f64),
        ]
    }
}

/// Which pause: measured from outside, or reported by vsockd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Outside,
    Reported,
}

/// Which figure over a round's upgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stat {
    P50,
    P99,
    Max,
}

impl Stat {
    pub fn label(self) -> &'static str {
        match self {
            Stat::P50 => "p50",
            Stat::P99 => "p99",
            Stat::Max => "max",
        }
    }
}

impl std::fmt::Display for UpgradeRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [p50, p99, max] = spread(&self.pauses_ms());
        let [r50, r99, rmax] = spread(&self.reported_ms());
        let [q50, q99, qmax] = spread(&sorted_ms(self.upgrades.iter().map(|u| u.quiet)));
        let [c50, _, cmax] = spread(&sorted_ms(self.upgrades.iter().map(|u| u.call)));
        let [s50, _, smax] = spread(&sorted_ms(
            self.upgrades
                .iter()
                .filter(|u| u.pause.is_some())
                .map(|u| u.slack),
        ));
        write!(
            f,
            "{} upgrades with {} connections open, {} failed; pause from outside p50 {p50:.2} p99 \
             {p99:.2} max {max:.2} ms (each up to p50 {s50:.2} max {smax:.2} ms longer at most), \
             as vsockd reports it p50 {r50:.2} p99 {r99:.2} max {rmax:.2} ms; longest stretch \
             without service in {QUIET_WINDOW:?} without an upgrade p50 {q50:.2} p99 {q99:.2} max \
             {qmax:.2} ms; vsockd upgrade took p50 {c50:.1} max {cmax:.1} ms",
            self.upgrades.len(),
            self.conns,
            self.failed(),
        )?;
        let most = |g: fn(&Tally) -> usize| self.upgrades.iter().map(|u| g(&u.tally)).max();
        write!(
            f,
            "; after an upgrade at least {} connections kept, at most {} reset, {} silent, {} \
             altered; moving streams: {} of {} byte-exact, {} bytes, {} lost or repeated",
            self.upgrades
                .iter()
                .map(|u| u.tally.kept)
                .min()
                .unwrap_or(0),
            most(|t| t.reset).unwrap_or(0),
            most(|t| t.silent).unwrap_or(0),
            most(|t| t.altered).unwrap_or(0),
            self.drained.exact,
            self.drained.exact + self.drained.inexact,
            self.drained.bytes,
            self.drained.gap_bytes,
        )?;
        if let Some(noise) = &self.noise {
            write!(f, "; meanwhile {noise}")?;
        }
        if let Some(b) = Breakdown::of(&self.timelines) {
            write!(
                f,
                "\n  where the pause went (medians over {} upgrades in vsockd's log): {b}",
                b.upgrades
            )?;
        }
        if self.timelines.len() != self.upgrades.len() {
            write!(
                f,
                "\n  vsockd's log has {} upgrades for {} calls: the pauses are not set against it",
                self.timelines.len(),
                self.upgrades.len()
            )?;
        }
        if let Some((k, t)) = self.slowest() {
            let values = phases::STRETCHES.iter().map(|(_, a, b)| t.between(*a, *b));
            write!(
                f,
                "\n  the slowest, #{k}: {}",
                phases::stretches_text(values)
            )?;
        }
        let misses: Vec<(usize, String)> = self
            .timelines
            .iter()
            .enumerate()
            .filter_map(|(k, t)| t.miss().map(|why| (k, why)))
            .collect();
        for (k, why) in misses.iter().take(SHOWN_COMPLAINTS) {
            write!(f, "\n  upgrade #{k}: {why}")?;
        }
        for (k, u) in self.upgrades.iter().enumerate() {
            if let Err(why) = &u.answer {
                write!(f, "\n  upgrade #{k} failed: {why}")?;
            }
        }
        if !self.complaints.is_empty() {
            write!(
                f,
                "\n  vsockd logged {} warnings or errors; the first ones:",
                self.complaints.len()
            )?;
            for line in self.complaints.iter().take(SHOWN_COMPLAINTS) {
                write!(f, "\n    {line}")?;
            }
        }
        Ok(())
    }
}

/// vsockd, its virtual VM and the connections under test. Fields drop in
/// order: the movers' threads first, the backend last.
struct Session {
    fleet: Fleet,
    vm: VirtualVm,
    backend: Backend,
    /// Puts the pauses on the log's clock.
    clock: WallClock,
}

impl Session {
    /// Starts vsockd in `dir`, logging at info, and opens `s.upgrade_conns`
    /// connections; every one must work before the first upgrade.
    fn open(s: &Settings, dir: &Path) -> Result<Session, SessionError> {
        let kind = BackendKind::Vsockd;
        std::fs::create_dir_all(dir).map_err(|source| SessionError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let harness = |what: &str| {
            let what = format!("{}: {what}", kind.name());
            move |source| SessionError::Harness { what, source }
        };
        let backend = Backend::start_logging(
            kind,
            &dir.join("vhost.sock"),
            &dir.join("vsock.sock"),
            &dir.join(format!("{}.log", kind.name())),
            GUEST_CID,
            Some(LOG_LEVEL),
        )
        .map_err(harness("start"))?;
        let vm = VirtualVm::start(backend.socket(), super::vm_options(s))
            .map_err(|e| backend.attach(crate::Error::new(e.to_string())))
            .map_err(harness("virtual VM start"))?;
        let fleet = Fleet::open(&vm, backend.uds(), s.upgrade_conns, PORT_BASE, SEED_BASE)
            .map_err(|e| SessionError::Io {
                what: format!("{}: {}", kind.name(), e.what),
                source: e.source,
            })?;
        let mut session = Session {
            fleet,
            vm,
            backend,
            clock: WallClock::now(),
        };
        session.fleet.check_ready(s.upgrade_conns, "upgrade")?;
        Ok(session)
    }

    /// Samples the device through a quiet window and one `vsockd
    /// upgrade`, then checks every connection.
    fn upgrade(&mut self, k: usize) -> Result<Upgraded, SessionError> {
        let end = OnceLock::new();
        let ready = Barrier::new(2);
        let (vm, backend) = (&self.vm, &self.backend);
        let (advances, t0, t1, out) = thread::scope(|sc| {
            let sampler = sc.spawn(|| gaps::sample(vm, &ready, &end, PAUSE_BOUND));
            ready.wait();
            thread::sleep(QUIET_WINDOW);
            let t0 = Instant::now();
            let out = backend.upgrade();
            let t1 = Instant::now();
            let _ = end.set(t1);
            (sampler.join(), t0, t1, out)
        });
        let advances: Advances = advances.map_err(|_| SessionError::Io {
            what: format!("upgrade #{k}"),
            source: io::Error::other("the used-index sampler panicked"),
        })?;
        let out = out.map_err(|source| SessionError::Harness {
            what: format!("upgrade #{k}"),
            source,
        })?;
        let answer = if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        };
        let mark = self.fleet.movers.mark();
        let tally = self.fleet.check(&mark, CHECK_BOUND);
        let gap = advances.longest_gap_around(t0, t1);
        let c = &self.clock;
        Ok(Upgraded {
            answer,
            pause: gap.map(|g| g.len()),
            slack: gap.map_or(Duration::ZERO, |g| g.outer_len() - g.len()),
            quiet: advances.longest_gap_within(advances.started, t0),
            gap_micros: gap.map(|g| GapMicros {
                from: c.micros(g.from),
                to: c.micros(g.to),
                outer_from: c.micros(g.outer_from),
                outer_to: c.micros(g.outer_to),
            }),
            advances_micros: advances
                .advances
                .iter()
                .filter(|a| a.seen >= t0)
                .map(|a| (c.micros(a.after), c.micros(a.seen)))
                .collect(),
            call: t1 - t0,
            tally,
        })
    }

    /// Stops the moving streams (checking every byte written) and ends
    /// the session; returns how the streams ended and vsockd's log.
    fn close(self) -> (Drained, PathBuf) {
        let Session {
            fleet, vm, backend, ..
        } = self;
        let Fleet { movers, idle } = fleet;
        let drained = movers.drain(Instant::now() + DRAIN_BOUND);
        let log = backend.log_path().to_path_buf();
        drop((idle, vm, backend));
        (drained, log)
    }
}

/// One round of upgrades of vsockd, in `dir`.
pub fn run(s: &Settings, dir: &Path) -> Result<UpgradeRound, SessionError> {
    let mut rng = Rng::from_clock();
    let mut session = Session::open(s, &dir.join("upgrade"))?;
    let mut round = UpgradeRound {
        conns: session.fleet.len(),
        ..UpgradeRound::default()
    };
    let keeper = session.backend.pid();
    let cpu = |pid: Option<u32>| pid.and_then(|p| CpuMark::now(p).ok());
    let cpu_start = cpu(keeper);
    for k in 0..s.upgrades {
        thread::sleep(Duration::from_micros(rng.below(UPGRADE_JITTER_MAX_US)));
        round.upgrades.push(session.upgrade(k)?);
    }
    if let (Some(a), Some(b)) = (cpu_start, cpu(keeper)) {
        round.noise = Some(a.until(&b));
    }
    let (drained, log) = session.close();
    round.drained = drained;
    match std::fs::read_to_string(&log) {
        Ok(text) => {
            round.timelines = phases::parse(&text);
            round.complaints = complaints(&text);
        }
        Err(e) => round
            .complaints
            .push(format!("cannot read vsockd's log {}: {e}", log.display())),
    }
    if round.timelines.len() == round.upgrades.len() {
        for (t, u) in round.timelines.iter_mut().zip(&round.upgrades) {
            t.gap = u.gap_micros;
            t.advances = u.advances_micros.clone();
        }
    }
    Ok(round)
}

/// The lines of a vsockd log at warn or error level.
fn complaints(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|level| level == "WARN" || level == "ERROR")
        })
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_reported_pause() {
        let answer = "worker: 3 (pid 12, generation 4)\nbinary: /x/vsockd\nretired: worker 2 \
                      (pid 11)\npause: 12.345 ms\n";
        assert_eq!(
            reported_pause(answer),
            Some(Duration::from_secs_f64(0.012345))
        );
        assert_eq!(reported_pause("pause: none\n"), None);
    }

    #[test]
    fn picks_warnings_and_errors() {
        let log = "[2026-11-21T15:14:41.000001Z INFO  vsockd] fine\n\
                   [2026-11-21T15:14:41.000002Z WARN  vsockd::keeper] odd\n\
                   [2026-11-21T15:14:41.000003Z ERROR vsockd::keeper::upgrade] upgrade failed: x\n\
                   vsockd: a WARN on stderr\n";
        let c = complaints(log);
        assert_eq!(c.len(), 2);
        assert!(c[1].ends_with("upgrade failed: x"));
    }

    #[test]
    fn rows_of_a_round() {
        let up = |ms: Option<u64>, kept| Upgraded {
            answer: Ok(format!("pause: {}.000 ms\n", ms.unwrap_or(1))),
            pause: ms.map(Duration::from_millis),
            slack: Duration::ZERO,
            quiet: Duration::from_millis(1),
            gap_micros: None,
            advances_micros: Vec::new(),
            call: Duration::from_millis(50),
            tally: Tally {
                kept,
                ..Tally::default()
            },
        };
        let r = UpgradeRound {
            conns: 10,
            upgrades: vec![up(Some(4), 10), up(Some(8), 9), up(None, 10)],
            timelines: Vec::new(),
            drained: Drained {
                exact: 8,
                ..Drained::default()
            },
            complaints: Vec::new(),
            noise: None,
        };
        let rows = r.rows();
        assert_eq!(
            rows[0],
            (Row::UpgradePause(Source::Outside, Stat::P50), 8.0)
        );
        assert_eq!(
            rows[2],
            (Row::UpgradePause(Source::Outside, Stat::Max), f64::INFINITY)
        );
        assert_eq!(
            rows[3],
            (Row::UpgradePause(Source::Reported, Stat::P50), 4.0)
        );
        assert_eq!(rows[6], (Row::UpgradeConnsKept, 9.0));
        assert_eq!(rows[7], (Row::UpgradeStreamsExact, 8.0));
        assert_eq!(rows[8], (Row::UpgradesFailed, 0.0));
    }
}
