//! What `vsockd status` reports, and its two renderings: plain text (one
//! `key: value` per line) and JSON. The keeper and the `--no-keeper` worker
//! each fill a [`Snapshot`] from what they hold; the formatting is shared.
//!
//! Where the figures come from:
//! * keeper mode: processes and restarts from the keeper itself;
//!   connections and queues from the state region, which the keeper maps
//!   read-only. It has no guest memory mapped, so queue positions are those
//!   the worker recorded: for RX and TX the inflight log's used index (the
//!   last used index the worker published) plus the heads it shows in
//!   flight; for the event queue, which the device never takes buffers
//!   from, the base it started at. A ring that is not running stands at
//!   its recorded base (everything was returned before it stopped).
//! * `--no-keeper`: everything from the worker's own tables.
//!
//! Text keys mirror the JSON document's paths (`worker.pid` is
//! `.worker.pid`), and an unknown value is `none` in text, `null` in JSON.

use std::collections::VecDeque;
use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vsockd_device::ConnCounts;

use crate::json::Json;

/// Restarts kept with their cause; older ones are only counted.
pub const MAX_RESTARTS_KEPT: usize = 16;
/// Queue names, in virtqueue order (virtio 1.2, 5.10.2).
pub const QUEUE_NAMES: [&str; 3] = ["rx", "tx", "event"];
/// Digits after the point of durations in seconds (milliseconds).
const SECONDS_DIGITS: usize = 3;

/// How vsockd runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A keeper that restarts the worker.
    Keeper,
    /// `--no-keeper`: the worker alone.
    Alone,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Keeper => "keeper",
            Mode::Alone => "no-keeper",
        }
    }
}

/// The keeper process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeeperInfo {
    pub pid: u32,
    pub uptime: Duration,
}

/// Where the worker is in its life, as the keeper sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Started, not yet READY (adopting the session).
    Starting,
    /// Serving.
    Ready,
    /// Dead; the next one starts at once or after a back-off.
    Restarting,
}

impl WorkerState {
    fn name(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Restarting => "restarting",
        }
    }
}

/// The worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerInfo {
    pub pid: Option<u32>,
    /// The generation it took the state region over as (from its READY;
    /// none before it, and with `--no-keeper`).
    pub generation: Option<u64>,
    pub state: WorkerState,
    pub uptime: Option<Duration>,
}

/// One worker death and the restart that followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    /// When the keeper noticed the death.
    pub at: SystemTime,
    /// Which worker died, counting from 1 in the keeper's life.
    pub worker: u64,
    pub pid: u32,
    /// Its generation, if it had reported one (it died after READY).
    pub generation: Option<u64>,
    /// "killed by signal 9 (SIGKILL)", "exited with status 1", ...
    pub cause: String,
}

/// Every restart counted, the last [`MAX_RESTARTS_KEPT`] kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestartLog {
    total: u64,
    recent: VecDeque<Restart>,
}

impl RestartLog {
    /// Counts `r` and keeps it, forgetting the oldest kept if full.
    pub fn record(&mut self, r: Restart) {
        self.total += 1;
        if self.recent.len() == MAX_RESTARTS_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(r);
    }

    /// A log of `total` restarts of which `recent` are kept (as a keeper
    /// re-executing itself hands it on).
    pub fn from_parts(total: u64, recent: Vec<Restart>) -> Self {
        let keep = recent.len().min(MAX_RESTARTS_KEPT);
        let skip = recent.len() - keep;
        RestartLog {
            total: total.max(keep as u64),
            recent: recent.into_iter().skip(skip).collect(),
        }
    }

    /// The kept restarts, oldest first.
    pub fn kept(&self) -> Vec<Restart> {
        self.recent.iter().cloned().collect()
    }

    /// Restarts since the keeper started.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The kept restarts, oldest first, with their number (from 1).
    pub fn recent(&self) -> impl Iterator<Item = (u64, &Restart)> {
        let first = self.total - self.recent.len() as u64 + 1;
        (first..).zip(self.recent.iter())
    }
}

/// One virtqueue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStatus {
    /// Descriptors (0: not set up).
    pub size: u32,
    pub enabled: bool,
    /// Started by its kick fd and not stopped since.
    pub started: bool,
    /// The next available index the device pops.
    pub last_avail_idx: Option<u16>,
    /// The used index the device published last.
    pub used_idx: Option<u16>,
}

/// Connections and queues, or why they are not known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceFigures {
    Known {
        connections: ConnCounts,
        queues: [QueueStatus; 3],
    },
    /// Not readable now (the reason).
    Unknown(String),
}

/// Everything `vsockd status` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The vhost-user socket (a path, or "fd N").
    pub socket: String,
    pub mode: Mode,
    pub keeper: Option<KeeperInfo>,
    pub worker: WorkerInfo,
    pub restarts: RestartLog,
    pub frontend_connected: bool,
    /// "state region" or "worker": where `device` was read.
    pub source: &'static str,
    pub device: DeviceFigures,
}

fn seconds(d: Duration) -> String {
    format!("{:.SECONDS_DIGITS$}", d.as_secs_f64())
}

fn seconds_json(d: Duration) -> Json {
    Json::Fixed {
        value: d.as_secs_f64(),
        digits: SECONDS_DIGITS,
    }
}

fn or_none<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "none".to_string(), |v| v.to_string())
}

impl Snapshot {
    /// Plain text: one `key: value` per line.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut line = |key: &str, value: &dyn std::fmt::Display| {
            let _ = writeln!(out, "{key}: {value}");
        };
        line("version", &env!("CARGO_PKG_VERSION"));
        line("socket", &self.socket);
        line("mode", &self.mode.name());
        line("keeper.pid", &or_none(self.keeper.map(|k| k.pid)));
        line(
            "keeper.uptime_s",
            &or_none(self.keeper.map(|k| seconds(k.uptime))),
        );
        line("worker.pid", &or_none(self.worker.pid));
        line("worker.generation", &or_none(self.worker.generation));
        line("worker.state", &self.worker.state.name());
        line("worker.uptime_s", &or_none(self.worker.uptime.map(seconds)));
        line("restarts.total", &self.restarts.total());
        for (n, r) in self.restarts.recent() {
            line(
                &format!("restarts.{n}"),
                &format!(
                    "{} worker {} (pid {}, generation {}): {}",
                    rfc3339_utc(r.at),
                    r.worker,
                    r.pid,
                    or_none(r.generation),
                    r.cause
                ),
            );
        }
        line("frontend.connected", &self.frontend_connected);
        line("source", &self.source);
        match &self.device {
            DeviceFigures::Unknown(why) => {
                line("connections.total", &"none");
                line("unknown_because", why);
            }
            DeviceFigures::Known {
                connections: c,
                queues,
            } => {
                line("connections.total", &c.total());
                line("connections.handshake", &c.handshake);
                line("connections.connecting", &c.connecting);
                line("connections.established", &c.established);
                line("connections.closing", &c.closing);
                if c.unknown > 0 {
                    line("connections.unknown", &c.unknown);
                }
                for (name, q) in QUEUE_NAMES.iter().zip(queues) {
                    line(&format!("queues.{name}.size"), &q.size);
                    line(&format!("queues.{name}.enabled"), &q.enabled);
                    line(&format!("queues.{name}.started"), &q.started);
                    line(
                        &format!("queues.{name}.last_avail_idx"),
                        &or_none(q.last_avail_idx),
                    );
                    line(&format!("queues.{name}.used_idx"), &or_none(q.used_idx));
                }
            }
        }
        out
    }

    /// The JSON document (same fields as the text).
    pub fn to_json(&self) -> Json {
        let keeper = self.keeper.map_or(Json::Null, |k| {
            Json::Object(vec![
                ("pid", Json::Int(k.pid.into())),
                ("uptime_s", seconds_json(k.uptime)),
            ])
        });
        let w = &self.worker;
        let worker = Json::Object(vec![
            ("pid", Json::opt_int(w.pid)),
            ("generation", Json::opt_int(w.generation)),
            ("state", Json::Str(w.state.name().into())),
            ("uptime_s", w.uptime.map_or(Json::Null, seconds_json)),
        ]);
        let recent = self
            .restarts
            .recent()
            .map(|(n, r)| {
                Json::Object(vec![
                    ("number", Json::Int(n.into())),
                    ("time", Json::Str(rfc3339_utc(r.at))),
                    ("unix_ms", Json::Int(unix_ms(r.at))),
                    ("worker", Json::Int(r.worker.into())),
                    ("pid", Json::Int(r.pid.into())),
                    ("generation", Json::opt_int(r.generation)),
                    ("cause", Json::Str(r.cause.clone())),
                ])
            })
            .collect();
        let restarts = Json::Object(vec![
            ("total", Json::Int(self.restarts.total().into())),
            ("recent", Json::Array(recent)),
        ]);
        let mut doc = vec![
            ("version", Json::Str(env!("CARGO_PKG_VERSION").into())),
            ("socket", Json::Str(self.socket.clone())),
            ("mode", Json::Str(self.mode.name().into())),
            ("keeper", keeper),
            ("worker", worker),
            ("restarts", restarts),
            (
                "frontend",
                Json::Object(vec![("connected", Json::Bool(self.frontend_connected))]),
            ),
            ("source", Json::Str(self.source.into())),
        ];
        match &self.device {
            DeviceFigures::Unknown(why) => {
                doc.push(("connections", Json::Null));
                doc.push(("queues", Json::Null));
                doc.push(("unknown_because", Json::Str(why.clone())));
            }
            DeviceFigures::Known {
                connections: c,
                queues,
            } => {
                let n = |v: usize| Json::Int(v as i128);
                let mut conns = vec![
                    ("total", n(c.total())),
                    ("handshake", n(c.handshake)),
                    ("connecting", n(c.connecting)),
                    ("established", n(c.established)),
                    ("closing", n(c.closing)),
                ];
                if c.unknown > 0 {
                    conns.push(("unknown", n(c.unknown)));
                }
                doc.push(("connections", Json::Object(conns)));
                let queues = QUEUE_NAMES
                    .iter()
                    .zip(queues)
                    .map(|(&name, q)| {
                        let fields = vec![
                            ("size", Json::Int(q.size.into())),
                            ("enabled", Json::Bool(q.enabled)),
                            ("started", Json::Bool(q.started)),
                            ("last_avail_idx", Json::opt_int(q.last_avail_idx)),
                            ("used_idx", Json::opt_int(q.used_idx)),
                        ];
                        (name, Json::Object(fields))
                    })
                    .collect();
                doc.push(("queues", Json::Object(queues)));
            }
        }
        Json::Object(doc)
    }
}

fn unix_ms(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i128,
        Err(e) => -(e.duration().as_millis() as i128),
    }
}

/// `t` as RFC 3339 in UTC with milliseconds: `2024-02-29T13:05:09.042Z`.
pub fn rfc3339_utc(t: SystemTime) -> String {
    const MS_PER_DAY: i128 = 86_400_000;
    let ms = unix_ms(t);
    let days = ms.div_euclid(MS_PER_DAY);
    let in_day = ms.rem_euclid(MS_PER_DAY);
    let (y, m, d) = civil_from_days(days as i64);
    let (h, rest) = (in_day / 3_600_000, in_day % 3_600_000);
    let (min, rest) = (rest / 60_000, rest % 60_000);
    let (s, milli) = (rest / 1000, rest % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// Year, month and day of the proleptic Gregorian calendar for a day
/// count since 1970-01-01. Days are counted in 400-year eras of 146097
/// days starting on 0000-03-01, so that the leap day ends each year.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    const DAYS_PER_ERA: i64 = 146_097;
    // 1970-01-01 is day 719468 after 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(DAYS_PER_ERA);
    let day_of_era = z.rem_euclid(DAYS_PER_ERA);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months from March: 0 is March, 11 is February.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn at(secs: u64, ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(secs * 1000 + ms)
    }

    #[test]
    fn dates_in_utc() {
        assert_eq!(rfc3339_utc(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(
            rfc3339_utc(at(1_709_164_800, 0)),
            "2024-02-29T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339_utc(at(1_234_567_890, 999)),
            "2009-02-13T23:31:30.999Z"
        );
        assert_eq!(
            rfc3339_utc(at(4_102_444_800, 0)),
            "2100-01-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH - Duration::from_secs(1)),
            "1969-12-31T23:59:59.000Z"
        );
    }

    fn restart(worker: u64) -> Restart {
        Restart {
            at: at(1_700_000_000, 0),
            worker,
            pid: 100 + worker as u32,
            generation: Some(worker),
            cause: "killed by signal 9 (SIGKILL)".into(),
        }
    }

    #[test]
    fn restart_log_keeps_the_last_ones_and_counts_all() {
        let mut log = RestartLog::default();
        for w in 1..=MAX_RESTARTS_KEPT as u64 + 3 {
            log.record(restart(w));
        }
        assert_eq!(log.total(), MAX_RESTARTS_KEPT as u64 + 3);
        let kept: Vec<(u64, u64)> = log.recent().map(|(n, r)| (n, r.worker)).collect();
        assert_eq!(kept.len(), MAX_RESTARTS_KEPT);
        assert_eq!(kept[0], (4, 4));
        assert_eq!(kept.last(), Some(&(19, 19)));
    }

    /// A snapshot with a bit of everything, for tests here and elsewhere.
    pub(crate) fn snapshot() -> Snapshot {
        let mut restarts = RestartLog::default();
        restarts.record(restart(1));
        let q = QueueStatus {
            size: 128,
            enabled: true,
            started: true,
            last_avail_idx: Some(7),
            used_idx: Some(5),
        };
        Snapshot {
            socket: "/run/v \"x\".sock".into(),
            mode: Mode::Keeper,
            keeper: Some(KeeperInfo {
                pid: 10,
                uptime: Duration::from_millis(61_500),
            }),
            worker: WorkerInfo {
                pid: Some(11),
                generation: Some(2),
                state: WorkerState::Ready,
                uptime: Some(Duration::from_millis(1_250)),
            },
            restarts,
            frontend_connected: true,
            source: "state region",
            device: DeviceFigures::Known {
                connections: ConnCounts {
                    established: 2,
                    closing: 1,
                    ..Default::default()
                },
                queues: [q, q, QueueStatus::default()],
            },
        }
    }

    #[test]
    fn text_is_one_key_value_per_line() {
        let text = snapshot().to_text();
        for want in [
            "mode: keeper",
            "keeper.pid: 10",
            "keeper.uptime_s: 61.500",
            "worker.generation: 2",
            "worker.state: ready",
            "restarts.total: 1",
            "restarts.1: 2023-11-14T22:13:20.000Z worker 1 (pid 101, generation 1): killed by signal 9 (SIGKILL)",
            "frontend.connected: true",
            "connections.total: 3",
            "connections.established: 2",
            "queues.tx.last_avail_idx: 7",
            "queues.tx.used_idx: 5",
            "queues.event.size: 0",
            "queues.event.used_idx: none",
        ] {
            assert!(text.lines().any(|l| l == want), "{want:?} missing in\n{text}");
        }
        assert!(text.lines().all(|l| l.split_once(": ").is_some()), "{text}");
        assert!(!text.contains("connections.unknown"));
    }

    #[test]
    fn json_has_the_same_values() {
        let json = snapshot().to_json().pretty();
        for want in [
            "\"socket\": \"/run/v \\\"x\\\".sock\"",
            "\"uptime_s\": 61.500",
            "\"generation\": 2",
            "\"total\": 3",
            "\"cause\": \"killed by signal 9 (SIGKILL)\"",
            "\"unix_ms\": 1700000000000",
            "\"last_avail_idx\": 7",
            "\"used_idx\": null",
        ] {
            assert!(json.contains(want), "{want:?} missing in\n{json}");
        }
    }

    #[test]
    fn unknown_figures_say_why() {
        let mut s = snapshot();
        s.device = DeviceFigures::Unknown("not formatted".into());
        s.keeper = None;
        let text = s.to_text();
        assert!(text.contains("connections.total: none\n"), "{text}");
        assert!(text.contains("unknown_because: not formatted\n"), "{text}");
        assert!(text.contains("keeper.pid: none\n"), "{text}");
        assert!(!text.contains("queues."), "{text}");
        let json = s.to_json().pretty();
        assert!(json.contains("\"queues\": null"), "{json}");
        assert!(json.contains("\"keeper\": null"), "{json}");
    }
}
