//! vsock-bench end to end, small: every row is measured against vsockd and
//! printed with a positive value; bad flags are refused in one line.

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vsock-bench"))
}

fn cells(line: &str) -> Vec<String> {
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

#[test]
fn every_row_is_measured_against_vsockd() {
    let out = bench()
        .args([
            "--backends",
            "vsockd",
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
        ])
        .output()
        .expect("run vsock-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let rows: Vec<Vec<String>> = stdout
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(cells)
        .collect();
    assert_eq!(
        rows[0],
        ["row", "vsockd", "socketpair ceiling", "vsockd/ceiling"]
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
    ];
    let body = &rows[2..];
    assert_eq!(
        body.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(),
        labels,
        "{stdout}"
    );
    for r in body {
        let v: f64 = r[1]
            .parse()
            .unwrap_or_else(|_| panic!("row {:?}: value {:?}", r[0], r[1]));
        // CPU time is counted in clock ticks: 8 MiB may take less than one.
        if r[0].starts_with("backend CPU") {
            assert!(v >= 0.0, "{r:?}");
        } else {
            assert!(v > 0.0, "{r:?}");
        }
        if r[0].starts_with("throughput") {
            let ceiling: f64 = r[2].parse().expect("ceiling value");
            assert!(ceiling > 0.0, "{r:?}");
            assert!(r[3].ends_with('%'), "{r:?}");
        } else {
            assert_eq!(r[2], "-", "{r:?}");
        }
    }
    assert!(stdout.contains("Medians of 2 rounds"), "{stdout}");
}

#[test]
fn bad_flags_get_one_line_and_exit_2() {
    for (args, needle) in [
        (vec!["--backends", "qemu"], "unknown backend \"qemu\""),
        (vec!["--workloads", "fast"], "unknown workload \"fast\""),
        (vec!["--rounds", "0"], "--rounds"),
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
