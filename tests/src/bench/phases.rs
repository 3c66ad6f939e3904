//! Where an upgrade's pause goes, from vsockd's log at info level and the
//! gap seen from outside. The keeper, the old worker and the standby
//! write to the same log, each line stamped to the microsecond (UTC), and
//! the steps of an upgrade each log a line (see
//! backend/src/keeper/upgrade.rs). The log is split at each "standby
//! worker N started" line (the keeper logs it first, before "upgrade
//! requested"); a step that logs a line per ring is timed at its last
//! line. The old worker's "quiesced" line is not used: it is written after
//! QUIESCED is sent, and often after the keeper has logged receiving it.
//!
//! The gap measured from outside (see `gaps`) is put on the log's clock
//! with a [`WallClock`], which gives the two ends of the pause that no
//! log line marks: from the last packet served to the keeper telling the
//! old worker to quiesce (negative when the old worker served on while
//! it finished its wakeup), and from the new worker's adoption to the
//! first packet it serves. The stretches from the last packet to the
//! first add up to the pause from outside. The keeper's own figure ends
//! when it hears READY, which may come after the new worker has served.

use std::fmt;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::report::median;

/// A step of an upgrade, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The keeper started the standby worker.
    StandbyStarted,
    /// The keeper heard STANDBY; it stops reading the frontend and tells
    /// the old worker to quiesce (where the pause vsockd reports starts).
    StandsBy,
    /// The keeper heard QUIESCED and hands every fd to the standby.
    HandOver,
    /// The standby has received the hand-over.
    TakingOver,
    /// The standby adopted the rings.
    RingsAdopted,
    /// The standby adopted the connections.
    ConnsAdopted,
    /// The standby adopted the whole session; READY follows.
    SessionAdopted,
    /// The keeper heard READY (where the pause vsockd reports ends).
    Done,
}

/// The steps, in order, and texts that the line each logs has, all of
/// them.
const STEPS: [(Step, &[&str]); 8] = [
    (
        Step::StandbyStarted,
        &["upgrade: standby worker ", " started (pid "],
    ),
    (Step::StandsBy, &["upgrade: standby worker ", " stands by "]),
    (
        Step::HandOver,
        &["upgrade: worker generation ", " quiesced; handing "],
    ),
    (Step::TakingOver, &["standby taking over"]),
    (Step::RingsAdopted, &["queue ", " adopted: next_avail "]),
    (Step::ConnsAdopted, &[" connections adopted"]),
    (
        Step::SessionAdopted,
        &["worker generation ", ": session adopted"],
    ),
    (Step::Done, &["upgrade done: "]),
];

/// A point of an upgrade's timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// The last used element published before the pause (from outside).
    LastServed,
    Step(Step),
    /// The first used element published after it (from outside).
    FirstServed,
}

/// The stretches reported, each between two points: the standby's start
/// (the old worker serves meanwhile), then the pause from its last packet
/// to the first the new worker serves, then when the keeper heard READY.
pub const STRETCHES: [(&str, Point, Point); 9] = [
    (
        "standby start (old worker serving)",
        Point::Step(Step::StandbyStarted),
        Point::Step(Step::StandsBy),
    ),
    (
        "last packet to quiesce sent",
        Point::LastServed,
        Point::Step(Step::StandsBy),
    ),
    (
        "old worker quiesces",
        Point::Step(Step::StandsBy),
        Point::Step(Step::HandOver),
    ),
    (
        "fds handed over",
        Point::Step(Step::HandOver),
        Point::Step(Step::TakingOver),
    ),
    (
        "rings adopted",
        Point::Step(Step::TakingOver),
        Point::Step(Step::RingsAdopted),
    ),
    (
        "connections adopted",
        Point::Step(Step::RingsAdopted),
        Point::Step(Step::ConnsAdopted),
    ),
    (
        "rest of the session adopted",
        Point::Step(Step::ConnsAdopted),
        Point::Step(Step::SessionAdopted),
    ),
    (
        "adopted to first packet",
        Point::Step(Step::SessionAdopted),
        Point::FirstServed,
    ),
    (
        "(adopted to READY heard by the keeper",
        Point::Step(Step::SessionAdopted),
        Point::Step(Step::Done),
    ),
];

/// The gap measured from outside (see `gaps::Gap`), in microseconds
/// since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GapMicros {
    /// The last packet before it was seen by then.
    pub from: i64,
    /// The first packet after it was not yet seen then.
    pub to: i64,
    /// The earliest the last packet before it can have been served.
    pub outer_from: i64,
    /// The latest the first packet after it can have been served.
    pub outer_to: i64,
}

/// One upgrade's timeline: microseconds since the epoch of each step
/// logged, and of the gap's ends once known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    steps: [Option<i64>; STEPS.len()],
    /// The gap measured from outside.
    pub gap: Option<GapMicros>,
    /// Every used-index advance seen from the call on: the earliest and
    /// the latest it can have happened.
    pub advances: Vec<(i64, i64)>,
}

impl Timeline {
    fn at(&self, p: Point) -> Option<i64> {
        match p {
            Point::LastServed => self.gap.map(|g| g.from),
            Point::FirstServed => self.gap.map(|g| g.to),
            Point::Step(step) => {
                let i = STEPS.iter().position(|(s, _)| *s == step)?;
                self.steps[i]
            }
        }
    }

    /// Milliseconds from one point to another (negative if logged the
    /// other way round), if both are known.
    pub fn between(&self, from: Point, to: Point) -> Option<f64> {
        Some((self.at(to)? - self.at(from)?) as f64 / 1e3)
    }

    /// Whether the gap from outside (its outer bounds) spans the time
    /// when no worker can serve: from the keeper hearing QUIESCED to the
    /// standby having adopted the session. If not, the gap measured is
    /// not the upgrade's.
    pub fn gap_spans_hand_over(&self) -> Option<bool> {
        let g = self.gap?;
        let (h, d) = (
            self.at(Point::Step(Step::HandOver))?,
            self.at(Point::Step(Step::SessionAdopted))?,
        );
        Some(g.outer_from <= h && d <= g.outer_to)
    }

    /// The advances that can have happened within the hand-over, when no
    /// worker should serve: the earliest and latest each can have
    /// happened, in ms from quiesce sent. A sampler held off the CPU
    /// brackets an advance widely: then one made before the hand-over
    /// (or after) is among them too.
    pub fn advances_in_hand_over(&self) -> Vec<(f64, f64)> {
        let (Some(s), Some(h), Some(d)) = (
            self.at(Point::Step(Step::StandsBy)),
            self.at(Point::Step(Step::HandOver)),
            self.at(Point::Step(Step::SessionAdopted)),
        ) else {
            return Vec::new();
        };
        let ms = |t: i64| (t - s) as f64 / 1e3;
        self.advances
            .iter()
            .filter(|(after, seen)| *after < d && *seen > h)
            .map(|(after, seen)| (ms(*after), ms(*seen)))
            .collect()
    }

    /// Why the gap from outside does not span the hand-over, if it does
    /// not: where each lies, in ms from quiesce sent, and the advances
    /// seen within the hand-over.
    pub fn miss(&self) -> Option<String> {
        if self.gap_spans_hand_over()? {
            return None;
        }
        let step = Point::Step;
        let rel = |p| self.between(step(Step::StandsBy), p);
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.2}"));
        Some(format!(
            "the longest gap, {} to {} ms from quiesce sent, misses the hand-over, {} to {} ms; \
             advances that can have been within it (earliest, latest): {:.2?} ms",
            ms(rel(Point::LastServed)),
            ms(rel(Point::FirstServed)),
            ms(rel(step(Step::HandOver))),
            ms(rel(step(Step::SessionAdopted))),
            self.advances_in_hand_over(),
        ))
    }
}

/// Splits a log into upgrades and times their steps.
pub fn parse(log: &str) -> Vec<Timeline> {
    let mut upgrades: Vec<Timeline> = Vec::new();
    for line in log.lines() {
        let Some((at, msg)) = stamp_and_message(line) else {
            continue;
        };
        let Some(i) = STEPS
            .iter()
            .position(|(_, texts)| texts.iter().all(|t| msg.contains(t)))
        else {
            continue;
        };
        if i == 0 {
            upgrades.push(Timeline::default());
        }
        if let Some(p) = upgrades.last_mut() {
            p.steps[i] = Some(at);
        }
    }
    upgrades
}

/// A line `[2026-11-21T15:14:41.123456Z INFO  target] message`: its
/// stamp in microseconds since the epoch, and its message.
fn stamp_and_message(line: &str) -> Option<(i64, &str)> {
    let rest = line.strip_prefix('[')?;
    let (stamp, rest) = rest.split_once(' ')?;
    let (_, msg) = rest.split_once("] ")?;
    Some((micros_since_epoch(stamp)?, msg))
}

/// `2026-11-21T15:14:41.123456Z` in microseconds since the epoch (UTC).
fn micros_since_epoch(stamp: &str) -> Option<i64> {
    let stamp = stamp.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(str::parse::<i64>);
    let (h, min, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let digits = frac.len().min(6);
    let micros = frac.get(..digits)?.parse::<i64>().ok()? * 10i64.pow(6 - digits as u32);
    let days = days_from_civil(y, m, day);
    Some(((days * 24 + h) * 60 + min) * 60_000_000 + s * 1_000_000 + micros)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Puts `Instant`s on the log's clock: one reading of both clocks, taken
/// together. Good to a few microseconds over a run (the wall clock may
/// be slewed, by parts per million).
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    at: Instant,
    micros: i64,
}

impl WallClock {
    pub fn now() -> WallClock {
        let at = Instant::now();
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        WallClock { at, micros }
    }

    /// `i` in microseconds since the epoch.
    pub fn micros(&self, i: Instant) -> i64 {
        match i.checked_duration_since(self.at) {
            Some(d) => self.micros + d.as_micros() as i64,
            None => self.micros - (self.at - i).as_micros() as i64,
        }
    }
}

/// Medians over upgrades of each stretch, in ms.
#[derive(Debug, Clone)]
pub struct Breakdown {
    pub upgrades: usize,
    /// Per stretch of `STRETCHES`: the median, if any upgrade had it.
    pub medians: Vec<Option<f64>>,
    /// Median of quiesce sent to READY heard, as the log has it.
    pub paused: Option<f64>,
    /// Upgrades whose gap from outside spans the hand-over, of those with
    /// both known.
    pub spanned: (usize, usize),
}

impl Breakdown {
    /// None if no upgrade was logged.
    pub fn of(timelines: &[Timeline]) -> Option<Breakdown> {
        if timelines.is_empty() {
            return None;
        }
        let med = |from, to| {
            let ms: Vec<f64> = timelines
                .iter()
                .filter_map(|t| t.between(from, to))
                .collect();
            median(&ms)
        };
        let spans: Vec<bool> = timelines
            .iter()
            .filter_map(Timeline::gap_spans_hand_over)
            .collect();
        Some(Breakdown {
            upgrades: timelines.len(),
            medians: STRETCHES.iter().map(|(_, a, b)| med(*a, *b)).collect(),
            paused: med(Point::Step(Step::StandsBy), Point::Step(Step::Done)),
            spanned: (spans.iter().filter(|s| **s).count(), spans.len()),
        })
    }
}

/// `name 1.23 ms, ...` for every stretch of `STRETCHES` with a value.
pub fn stretches_text(values: impl Iterator<Item = Option<f64>>) -> String {
    STRETCHES
        .iter()
        .zip(values)
        .map(|((name, _, _), v)| match v {
            Some(ms) => format!("{name} {ms:.2} ms"),
            None => format!("{name} -"),
        })
        .collect::<Vec<_>>()
        .join(", ")
        + ")"
}

impl fmt::Display for Breakdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; quiesce sent to READY heard {}; the gap from outside spans the hand-over (QUIESCED \
             heard to session adopted) in {} of {} upgrades",
            stretches_text(self.medians.iter().copied()),
            self.paused
                .map_or_else(|| "-".to_string(), |ms| format!("{ms:.2} ms")),
            self.spanned.0,
            self.spanned.1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        assert_eq!(micros_since_epoch("1970-01-01T00:00:00.000001Z"), Some(1));
        assert_eq!(
            micros_since_epoch("2000-03-01T01:02:03.5Z"),
            Some((951_868_800 + 3723) * 1_000_000 + 500_000)
        );
        assert_eq!(micros_since_epoch("garbage"), None);
    }

    #[test]
    fn wall_clock_maps_instants() {
        let c = WallClock::now();
        let later = c.at + std::time::Duration::from_millis(3);
        assert_eq!(c.micros(later) - c.micros(c.at), 3000);
    }

    #[test]
    fn splits_upgrades_and_times_steps() {
        let log = "\
[2026-11-21T23:59:59.990000Z INFO  vsockd::keeper::upgrade] upgrade: standby worker 2 started (pid 9) from /x
[2026-11-21T23:59:59.990050Z INFO  vsockd::control] control socket: upgrade requested
[2026-11-22T00:00:00.010000Z INFO  vsockd::keeper::upgrade] upgrade: standby worker 2 stands by (state region layout 3)
[2026-11-22T00:00:00.011000Z INFO  vsockd::keeper::upgrade] upgrade: worker generation 1 quiesced; handing 1006 fds to standby worker 2
[2026-11-22T00:00:00.011100Z INFO  vsockd::worker_link] quiesced for an upgrade: waiting for the keeper
[2026-11-22T00:00:00.015000Z INFO  vsockd] standby taking over
[2026-11-22T00:00:00.015100Z INFO  vsockd::handler::adopt] queue 0 adopted: next_avail 7 next_used 7
[2026-11-22T00:00:00.015200Z INFO  vsockd::handler::adopt] queue 1 adopted: next_avail 9 next_used 9, 0 chains in flight
[2026-11-22T00:00:00.016000Z INFO  vsockd_device::muxer::keep] 1000 connections adopted
[2026-11-22T00:00:00.016200Z INFO  vsockd::event_loop] worker generation 2: session adopted
[2026-11-22T00:00:00.016500Z INFO  vsockd::keeper::upgrade] upgrade done: worker 2 (pid 9, generation 2) from /x serves; worker 1 (pid 8) retired; paused 6.500 ms
[2026-11-22T00:00:00.017000Z INFO  vsockd::keeper] worker 3 started (pid 10), handing over 1006 fds
[2026-11-22T00:00:01.000000Z INFO  vsockd::keeper::upgrade] upgrade: standby worker 3 started (pid 11) from /x
[2026-11-22T00:00:01.002000Z ERROR vsockd::keeper::upgrade] upgrade failed: no
";
        let mut t = parse(log);
        assert_eq!(t.len(), 2);
        let step = Point::Step;
        assert_eq!(
            t[0].between(step(Step::StandbyStarted), step(Step::StandsBy)),
            Some(20.0)
        );
        assert_eq!(
            t[0].between(step(Step::StandsBy), step(Step::Done)),
            Some(6.5)
        );
        assert_eq!(
            t[0].between(step(Step::TakingOver), step(Step::RingsAdopted)),
            Some(0.2)
        );
        assert_eq!(t[1].between(step(Step::StandsBy), step(Step::Done)), None);
        let stands_by = t[0].at(step(Step::StandsBy)).expect("logged");
        t[0].gap = Some(GapMicros {
            from: stands_by - 500,
            to: stands_by + 7_000,
            outer_from: stands_by - 600,
            outer_to: stands_by + 7_100,
        });
        assert_eq!(
            t[0].between(Point::LastServed, step(Step::StandsBy)),
            Some(0.5)
        );
        assert_eq!(
            t[0].between(step(Step::SessionAdopted), Point::FirstServed),
            Some(0.8)
        );
        assert_eq!(t[0].gap_spans_hand_over(), Some(true));
        assert_eq!(t[0].miss(), None);
        let mut missed = t[0].clone();
        missed.gap = Some(GapMicros {
            from: stands_by - 3_000,
            to: stands_by - 500,
            outer_from: stands_by - 3_100,
            outer_to: stands_by - 400,
        });
        missed.advances = vec![(stands_by + 1_800, stands_by + 2_000)];
        assert_eq!(missed.advances_in_hand_over(), vec![(1.8, 2.0)]);
        let why = missed.miss().expect("missed");
        assert!(why.contains("-3.00 to -0.50 ms"), "{why}");
        assert!(why.contains("1.00 to 6.20 ms"), "{why}");
        let b = Breakdown::of(&t).expect("logged");
        assert_eq!(b.paused, Some(6.5));
        assert_eq!(b.spanned, (1, 1));
        let text = b.to_string();
        assert!(text.contains("fds handed over 4.00 ms"), "{text}");
        assert!(text.contains("adopted to first packet 0.80 ms"), "{text}");
    }
}
