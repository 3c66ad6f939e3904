//! vsock-bench end to end, small: every row is measured against vsockd
//! and `vsockd --no-keeper` and printed with a sane value (the crash rows
//! too: vsockd keeps every connection through its kills, the lone worker
//! never recovers; and the upgrade rows: vsockd keeps every connection and
//! byte through its upgrades, the lone worker has none); bad flags are
//! refused in one line.

use std::collections::HashMap;
use std::process::Command;

/// Connections and kills of the crash rows here.
const CRASH_CONNS: &str = "40";
const KILLS: &str = "2";
/// Connections and upgrades of the upgrade rows here.
const UPGRADE_CONNS: &str = "40";
const UPGRADES: &str = "3";

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vsock-bench"))
}

fn cells(line: &str) -> Vec<String> {
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

fn number(row: &HashMap<&str, &str>, column: &str) -> f64 {
    let v = row[column];
    v.parse()
        .unwrap_or_else(|_| panic!("row {:?}, {column}: {v:?} is not a number", row["row"]))
}

#[test]
fn every_row_is_measured_against_vsockd_with_and_without_keeper() {
    let out = bench()
        .args([
            "--backends",
            "vsockd,vsockd-no-keeper",
            "--rounds",
            "2",
            "--mib",
            "8",
            "--parallel",
            "4",
            "--round-trips",
            "50",
            "--setups",
            "20",
            "--idle-conns",
            "40",
            "--crash-conns",
            CRASH_CONNS,
            "--kills",
            KILLS,
            "--upgrade-conns",
            UPGRADE_CONNS,
            "--upgrades",
            UPGRADES,
        ])
        .output()
        .expect("run vsock-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<Vec<String>> = stdout
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(cells)
        .collect();
    let head = &lines[0];
    assert_eq!(
        head,
        &[
            "row",
            "vsockd",
            "vsockd-no-keeper",
            "vsockd/no-keeper",
            "better",
            "socketpair ceiling",
            "vsockd/ceiling"
        ]
    );
    let labels = [
        "throughput guest to host, 1 conn (MiB/s)",
        "throughput guest to host, 4 conns (MiB/s)",
        "throughput host to guest, 1 conn (MiB/s)",
        "throughput host to guest, 4 conns (MiB/s)",
        "64-byte round trip p50 (µs)",
        "64-byte round trip p99 (µs)",
        "connection setup, host-initiated (conn/s)",
        "connection setup, guest-initiated (conn/s)",
        "backend CPU guest to host (s/GiB)",
        "backend CPU host to guest (s/GiB)",
        "backend RSS, 40 idle conns (MiB)",
        "recovery after SIGKILL, 40 conns, p50 (ms)",
        "recovery after SIGKILL, 40 conns, p99 (ms)",
        "connections kept per kill (of 40)",
        "connections reset per kill (of 40)",
        "upgrade pause, 40 conns, p50 (ms)",
        "upgrade pause, 40 conns, p99 (ms)",
        "upgrade pause, 40 conns, max (ms)",
        "upgrade pause as vsockd reports it, p50 (ms)",
        "upgrade pause as vsockd reports it, p99 (ms)",
        "upgrade pause as vsockd reports it, max (ms)",
        "connections kept per upgrade (of 40)",
        "moving streams byte-exact after the upgrades (of 8)",
        "upgrades failed (of 3)",
    ];
    let body: Vec<HashMap<&str, &str>> = lines[2..]
        .iter()
        .map(|r| {
            head.iter()
                .map(String::as_str)
                .zip(r.iter().map(String::as_str))
                .collect()
        })
        .collect();
    assert_eq!(
        body.iter().map(|r| r["row"]).collect::<Vec<_>>(),
        labels,
        "{stdout}"
    );
    for r in &body {
        let label = r["row"];
        let upgrade = label.contains("upgrade");
        if upgrade {
            assert_eq!(r["vsockd-no-keeper"], "n/a", "{r:?}");
            if label.starts_with("upgrade pause") {
                assert!(number(r, "vsockd") > 0.0, "{r:?}");
            } else if label.starts_with("connections kept") {
                assert_eq!(r["vsockd"], UPGRADE_CONNS, "{r:?}");
            } else if label.starts_with("moving streams") {
                assert_eq!(r["vsockd"], "8", "{r:?}");
            } else {
                assert_eq!(r["vsockd"], "0", "{r:?}");
            }
        } else if label.starts_with("recovery") {
            assert!(number(r, "vsockd") > 0.0, "{r:?}");
            assert_eq!(r["vsockd-no-keeper"], "never", "{r:?}");
        } else if label.starts_with("connections kept") {
            assert_eq!(r["vsockd"], CRASH_CONNS, "{r:?}");
            assert_eq!(r["vsockd-no-keeper"], "0", "{r:?}");
        } else if label.starts_with("connections reset") {
            assert_eq!(r["vsockd"], "0", "{r:?}");
            assert!(number(r, "vsockd-no-keeper") > 0.0, "{r:?}");
        } else {
            for k in ["vsockd", "vsockd-no-keeper"] {
                // CPU time is counted in clock ticks: 8 MiB may take less
                // than one.
                if label.starts_with("backend CPU") {
                    assert!(number(r, k) >= 0.0, "{r:?}");
                } else {
                    assert!(number(r, k) > 0.0, "{r:?}");
                }
            }
        }
        let crash = label.starts_with("recovery") || label.starts_with("connections ");
        if crash || upgrade {
            assert_eq!(r["vsockd/no-keeper"], "-", "{r:?}");
        } else if !label.starts_with("backend CPU") {
            assert!(number(r, "vsockd/no-keeper") > 0.0, "{r:?}");
        }
        if label.starts_with("throughput") {
            assert!(number(r, "socketpair ceiling") > 0.0, "{r:?}");
            assert!(r["vsockd/ceiling"].ends_with('%'), "{r:?}");
        } else {
            assert_eq!(r["socketpair ceiling"], "-", "{r:?}");
        }
    }
    assert!(stdout.contains("Medians of 2 rounds"), "{stdout}");
    assert!(stdout.contains("crash rows: 2 SIGKILLs"), "{stdout}");
}

#[test]
fn bad_flags_get_one_line_and_exit_2() {
    for (args, needle) in [
        (vec!["--backends", "qemu"], "unknown backend \"qemu\""),
        (
            vec!["--backends", "vsockd,no-keeper"],
            "unknown backend \"no-keeper\"",
        ),
        (vec!["--workloads", "fast"], "unknown workload \"fast\""),
        (vec!["--rounds", "0"], "--rounds"),
        (vec!["--crash-conns", "0"], "--crash-conns"),
        (vec!["--crash-conns", "many"], "--crash-conns"),
        (vec!["--kills", "0"], "--kills"),
        (vec!["--kills=-3"], "--kills"),
    ] {
        let out = bench().args(&args).output().expect("run vsock-bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("vsock-bench: "), "{stderr}");
    }
}
