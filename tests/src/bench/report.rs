//! Samples of every round, their medians, and the table vsock-bench
//! prints (Markdown, ready for BENCHMARKS.md).
//!
//! Columns: the row, one per backend, then the ratio of two backends
//! (vsockd against the peer), the ratio of vsockd to `vsockd --no-keeper`
//! when both ran (what surviving a crash costs), which way is better,
//! the socketpair ceiling and the first backend's share of it. A value
//! that never came (a device that never served again) prints "never"; an
//! upgrade row of a backend that has no live upgrade prints "n/a".

use std::fmt::Write as _;

use crate::BackendKind;

use super::workload::Direction;
use super::{Row, Settings, Subject};

/// Everything measured in one invocation.
#[derive(Debug, Clone)]
pub struct Report {
    pub settings: Settings,
    pub kinds: Vec<BackendKind>,
    samples: Vec<(Subject, Option<Row>, f64)>,
}

/// The median of `v` (the mean of the middle two for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

impl Report {
    pub fn new(settings: Settings, kinds: Vec<BackendKind>) -> Report {
        Report {
            settings,
            kinds,
            samples: Vec::new(),
        }
    }

    /// Records one round's value of a row (no row for the ceiling).
    pub fn add(&mut self, who: Subject, row: Option<Row>, value: f64) {
        self.samples.push((who, row, value));
    }

    /// Every round's value for a subject and row.
    pub fn values(&self, who: Subject, row: Option<Row>) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|(w, r, _)| *w == who && *r == row)
            .map(|s| s.2)
            .collect()
    }

    /// The median over rounds.
    pub fn median(&self, who: Subject, row: Option<Row>) -> Option<f64> {
        median(&self.values(who, row))
    }

    /// `a / b` for the median of two backends on a row (none for a row
    /// without ratios, or a value that is zero or never came).
    pub fn ratio(&self, row: Row, a: BackendKind, b: BackendKind) -> Option<f64> {
        if !row.has_ratio() {
            return None;
        }
        let x = self.median(Subject::Backend(a), Some(row))?;
        let y = self.median(Subject::Backend(b), Some(row))?;
        (y != 0.0 && x.is_finite() && y.is_finite()).then(|| x / y)
    }

    /// Whether both vsockd and `vsockd --no-keeper` ran: the keeper's
    /// ratio gets a column of its own.
    fn keeper_pair(&self) -> Option<(BackendKind, BackendKind)> {
        let (v, n) = (BackendKind::Vsockd, BackendKind::VsockdNoKeeper);
        (self.kinds.contains(&v) && self.kinds.contains(&n)).then_some((v, n))
    }

    /// The two backends of the main ratio column: the first two measured,
    /// leaving out `vsockd --no-keeper` when it has its own column.
    fn main_pair(&self) -> Option<(BackendKind, BackendKind)> {
        let own_column = self.keeper_pair().is_some();
        let mut kinds = self
            .kinds
            .iter()
            .copied()
            .filter(|k| !(own_column && *k == BackendKind::VsockdNoKeeper));
        Some((kinds.next()?, kinds.next()?))
    }

    /// The Markdown table (see the module's documentation).
    pub fn table(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        let mut head = vec!["row".to_string()];
        head.extend(self.kinds.iter().map(|k| k.name().to_string()));
        let pairs: Vec<(BackendKind, BackendKind)> = self
            .main_pair()
            .into_iter()
            .chain(self.keeper_pair())
            .collect();
        for (a, b) in &pairs {
            head.push(if Some((*a, *b)) == self.keeper_pair() {
                format!("{}/no-keeper", a.name())
            } else {
                format!("{}/{}", a.name(), b.name())
            });
        }
        if !pairs.is_empty() {
            head.push("better".into());
        }
        let first = self.kinds.first().copied();
        head.push("socketpair ceiling".into());
        if let Some(f) = first {
            head.push(format!("{}/ceiling", f.name()));
        }
        let _ = writeln!(out, "| {} |", head.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            head.iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        );
        for row in self.rows() {
            let mut cells = vec![row.label(s)];
            for k in &self.kinds {
                cells.push(if row.is_upgrade() && !k.has_live_upgrade() {
                    "n/a".into()
                } else {
                    fmt_row_value(row, self.median(Subject::Backend(*k), Some(row)))
                });
            }
            for (a, b) in &pairs {
                cells.push(match self.ratio(row, *a, *b) {
                    Some(r) => format!("{r:.2}"),
                    None => "-".into(),
                });
            }
            if !pairs.is_empty() {
                cells.push(if row.higher_is_better() {
                    "higher".into()
                } else {
                    "lower".into()
                });
            }
            let ceiling = row
                .ceiling()
                .and_then(|d| self.median(Subject::Ceiling(d), None));
            cells.push(fmt_value(ceiling));
            if let Some(f) = first {
                let own = self.median(Subject::Backend(f), Some(row));
                cells.push(match (own, ceiling) {
                    (Some(o), Some(c)) if c > 0.0 && o.is_finite() => {
                        format!("{:.0}%", 100.0 * o / c)
                    }
                    _ => "-".into(),
                });
            }
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        out
    }

    /// Rows with at least one value.
    fn rows(&self) -> Vec<Row> {
        Row::all(&self.settings)
            .into_iter()
            .filter(|r| self.samples.iter().any(|(_, x, _)| *x == Some(*r)))
            .collect()
    }

    /// What the ceiling columns are, for under the table.
    pub fn ceiling_note(&self) -> String {
        let s = &self.settings;
        let r = |d| super::ceiling_read_bytes(s, d);
        format!(
            "socketpair ceiling: {} MiB through one AF_UNIX socketpair, writes of {} bytes, \
             reads of {} bytes (guest to host) and {} bytes (host to guest, one RX buffer)",
            s.stream_bytes >> 20,
            s.write_bytes,
            r(Direction::GuestToHost),
            r(Direction::HostToGuest),
        )
    }

    /// What the crash rows are, for under the table, if they ran.
    pub fn crash_note(&self) -> Option<String> {
        let s = &self.settings;
        self.rows().iter().any(Row::is_crash).then(|| {
            format!(
                "crash rows: {} SIGKILLs per backend and round (vsockd: its worker; a backend \
                 without a keeper: its process, started again for each kill) with {} connections \
                 open, {} of them moving data; recovery is from the signal to the first used \
                 element published, \"never\" when the vhost-user socket closed or nothing came \
                 within {:?}; kept is the fewest connections carrying a verified exchange after \
                 a kill, reset the most that were reset",
                s.kills,
                s.crash_conns,
                super::fleet::MOVING_CONNS,
                super::crash::RECOVERY_BOUND,
            )
        })
    }

    /// What the upgrade rows are, for under the table, if they ran.
    pub fn upgrade_note(&self) -> Option<String> {
        let s = &self.settings;
        self.rows().iter().any(Row::is_upgrade).then(|| {
            format!(
                "upgrade rows: {} `vsockd upgrade` calls per round with {} connections open, {} of \
                 them moving data; the pause is the longest stretch without a used element \
                 published that overlaps the call (from the last packet the old worker served to \
                 the first the new one served, the used indices read every {:?}); vsockd's \
                 figure is its keeper's, from quiesce sent to the new worker's READY; kept is the \
                 fewest connections carrying a verified exchange after an upgrade; n/a: the \
                 backend has no live upgrade",
                s.upgrades,
                s.upgrade_conns,
                super::fleet::MOVING_CONNS,
                super::gaps::SAMPLE_INTERVAL,
            )
        })
    }

    /// Every round's values, for the record.
    pub fn raw(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        for d in [Direction::GuestToHost, Direction::HostToGuest] {
            let _ = writeln!(
                out,
                "ceiling {d:?}: {}",
                fmt_list(None, &self.values(Subject::Ceiling(d), None))
            );
        }
        for row in self.rows() {
            for k in &self.kinds {
                if row.is_upgrade() && !k.has_live_upgrade() {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "{} {}: {}",
                    k.name(),
                    row.label(s),
                    fmt_list(row, &self.values(Subject::Backend(*k), Some(row)))
                );
            }
        }
        out
    }
}

fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.is_infinite() => "never".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.3}"),
    }
}

/// A value of `row`: counts without decimals (a median of two may end
/// in .5).
fn fmt_row_value(row: impl Into<Option<Row>>, v: Option<f64>) -> String {
    match (row.into(), v) {
        (Some(r), Some(x)) if r.is_count() && x.is_finite() => format!("{x}"),
        _ => fmt_value(v),
    }
}

fn fmt_list(row: impl Into<Option<Row>> + Copy, v: &[f64]) -> String {
    v.iter()
        .map(|x| fmt_row_value(row, Some(*x)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn table_has_ratios_and_ceiling_share() {
        let s = Settings {
            rounds: 2,
            ..Settings::default()
        };
        let (v, p) = (BackendKind::Vsockd, BackendKind::Peer);
        let mut r = Report::new(s.clone(), vec![v, p]);
        let g1 = Row::Throughput(Direction::GuestToHost, 1);
        for x in [100.0, 300.0] {
            r.add(Subject::Backend(v), Some(g1), x);
        }
        r.add(Subject::Backend(p), Some(g1), 100.0);
        r.add(Subject::Ceiling(Direction::GuestToHost), None, 400.0);
        r.add(Subject::Backend(v), Some(Row::LatencyP99), 50.0);
        r.add(Subject::Backend(p), Some(Row::LatencyP99), 200.0);
        assert_eq!(r.ratio(g1, v, p), Some(2.0));
        assert_eq!(r.ratio(Row::LatencyP99, v, p), Some(0.25));
        let t = r.table();
        let line = t
            .lines()
            .find(|l| l.contains("guest to host, 1 conn "))
            .expect("row");
        assert_eq!(
            line,
            "| throughput guest to host, 1 conn (MiB/s) | 200 | 100 | 2.00 | higher | 400 | 50% |"
        );
        let p99 = t.lines().find(|l| l.contains("p99")).expect("p99 row");
        assert!(p99.contains("| 0.25 | lower | - | - |"), "{p99}");
        // Only the rows measured.
        assert_eq!(t.lines().count(), 2 + 2);
    }

    #[test]
    fn keeper_column_and_crash_rows() {
        let s = Settings {
            rounds: 1,
            crash_conns: 40,
            ..Settings::default()
        };
        let (v, n, p) = (
            BackendKind::Vsockd,
            BackendKind::VsockdNoKeeper,
            BackendKind::Peer,
        );
        let mut r = Report::new(s, vec![v, n, p]);
        let h8 = Row::Throughput(Direction::HostToGuest, 8);
        for (k, x) in [(v, 950.0), (n, 1000.0), (p, 500.0)] {
            r.add(Subject::Backend(k), Some(h8), x);
        }
        r.add(Subject::Ceiling(Direction::HostToGuest), None, 2000.0);
        for (k, ms, kept) in [
            (v, 4.5, 40.0),
            (n, f64::INFINITY, 0.0),
            (p, f64::INFINITY, 0.0),
        ] {
            r.add(Subject::Backend(k), Some(Row::RecoveryP99), ms);
            r.add(Subject::Backend(k), Some(Row::ConnsKept), kept);
        }
        let t = r.table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "| row | vsockd | vsockd-no-keeper | peer | vsockd/peer | vsockd/no-keeper | better | \
             socketpair ceiling | vsockd/ceiling |"
        );
        assert_eq!(
            lines[2],
            "| throughput host to guest, 8 conns (MiB/s) | 950 | 1000 | 500 | 1.90 | 0.95 | higher | \
             2000 | 48% |"
        );
        assert_eq!(
            lines[3],
            "| recovery after SIGKILL, 40 conns, p99 (ms) | 4.500 | never | never | - | - | lower | - | - |"
        );
        assert_eq!(
            lines[4],
            "| connections kept per kill (of 40) | 40 | 0 | 0 | - | - | higher | - | - |"
        );
        assert!(r.crash_note().is_some());
        assert!(r
            .raw()
            .contains("peer recovery after SIGKILL, 40 conns, p99 (ms): never"));
    }

    #[test]
    fn upgrade_rows_are_na_without_live_upgrade() {
        use super::super::upgrade::{Source, Stat};
        let (v, p) = (BackendKind::Vsockd, BackendKind::Peer);
        let mut r = Report::new(Settings::default(), vec![v, p]);
        let p99 = Row::UpgradePause(Source::Outside, Stat::P99);
        r.add(Subject::Backend(v), Some(p99), 7.5);
        r.add(Subject::Backend(v), Some(Row::UpgradesFailed), 0.0);
        let t = r.table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[2],
            "| upgrade pause, 1000 conns, p99 (ms) | 7.500 | n/a | - | lower | - | - |"
        );
        assert_eq!(
            lines[3],
            "| upgrades failed (of 50) | 0 | n/a | - | lower | - | - |"
        );
        assert!(r.upgrade_note().is_some());
        assert!(!r.raw().contains("peer upgrade"));
    }

    #[test]
    fn keeper_ratio_alone_when_no_peer() {
        let mut r = Report::new(
            Settings::default(),
            vec![BackendKind::Vsockd, BackendKind::VsockdNoKeeper],
        );
        r.add(
            Subject::Backend(BackendKind::Vsockd),
            Some(Row::IdleRss),
            12.0,
        );
        r.add(
            Subject::Backend(BackendKind::VsockdNoKeeper),
            Some(Row::IdleRss),
            8.0,
        );
        let t = r.table();
        assert!(
            t.starts_with(
                "| row | vsockd | vsockd-no-keeper | vsockd/no-keeper | better | socketpair ceiling | \
                 vsockd/ceiling |"
            ),
            "{t}"
        );
        assert!(t.contains("| 12.0 | 8.000 | 1.50 | lower | - | - |"), "{t}");
        assert_eq!(r.crash_note(), None);
    }
}
