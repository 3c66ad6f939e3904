//! Samples of every round, their medians, and the table vsock-bench
//! prints (Markdown, ready for BENCHMARKS.md).

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

    /// `a / b` for the median of two backends on a row.
    pub fn ratio(&self, row: Row, a: BackendKind, b: BackendKind) -> Option<f64> {
        let x = self.median(Subject::Backend(a), Some(row))?;
        let y = self.median(Subject::Backend(b), Some(row))?;
        (y != 0.0).then(|| x / y)
    }

    /// The Markdown table: one column per backend, then for two backends
    /// the ratio first/second, then the ceiling and the first backend's
    /// share of it.
    pub fn table(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        let mut head = vec!["row".to_string()];
        head.extend(self.kinds.iter().map(|k| k.name().to_string()));
        let pair = match self.kinds.as_slice() {
            [a, b, ..] => Some((*a, *b)),
            _ => None,
        };
        if let Some((a, b)) = pair {
            head.push(format!("{}/{}", a.name(), b.name()));
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
                cells.push(fmt_value(self.median(Subject::Backend(*k), Some(row))));
            }
            if let Some((a, b)) = pair {
                cells.push(match self.ratio(row, a, b) {
                    Some(r) => format!("{r:.2}"),
                    None => "-".into(),
                });
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
                    (Some(o), Some(c)) if c > 0.0 => format!("{:.0}%", 100.0 * o / c),
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

    /// Every round's values, for the record.
    pub fn raw(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        for d in [Direction::GuestToHost, Direction::HostToGuest] {
            let _ = writeln!(
                out,
                "ceiling {d:?}: {}",
                fmt_list(&self.values(Subject::Ceiling(d), None))
            );
        }
        for row in self.rows() {
            for k in &self.kinds {
                let _ = writeln!(
                    out,
                    "{} {}: {}",
                    k.name(),
                    row.label(s),
                    fmt_list(&self.values(Subject::Backend(*k), Some(row)))
                );
            }
        }
        out
    }
}

fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.3}"),
    }
}

fn fmt_list(v: &[f64]) -> String {
    v.iter()
        .map(|x| fmt_value(Some(*x)))
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
}
