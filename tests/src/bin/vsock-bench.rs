//! vsock-bench: measures vhost-user vsock backends side by side over the
//! virtual VMM (no VM boots) and prints a Markdown table of medians and
//! ratios, with a plain Unix socketpair as the ceiling.
//!
//! ```text
//! vsock-bench                       # vsockd, vsockd --no-keeper and the peer, 5 rounds
//! vsock-bench --backends vsockd     # vsockd alone
//! vsock-bench --workloads crash     # SIGKILLs with 1000 connections open
//! vsock-bench --workloads upgrade --backends vsockd   # live upgrades, 1000 open
//! ```
//!
//! Binaries: `$VSOCKD_BIN` (default target/release/vsockd) and
//! `$VSOCKD_PEER_BIN` (default: vhost-device-vsock on PATH).

use std::process::ExitCode;

use clap::Parser;
use vsockd_tests::bench::{self, procstat, Settings, Workload};
use vsockd_tests::qemu::temp_dir;
use vsockd_tests::BackendKind;

#[derive(Parser, Debug)]
#[command(
    name = "vsock-bench",
    about = "Compare vhost-user vsock backends over a virtual VMM"
)]
struct Args {
    /// Backends to measure, comma-separated, in table order: vsockd,
    /// vsockd-no-keeper (vsockd --no-keeper), peer.
    #[arg(long, value_delimiter = ',', default_value = "vsockd,vsockd-no-keeper,peer", value_parser = parse_kind)]
    backends: Vec<BackendKind>,
    /// Rounds; every row reports the median over them.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    rounds: u64,
    /// MiB moved by each throughput measurement.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=65536))]
    mib: u64,
    /// Connections of the parallel throughput rows.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..=256))]
    parallel: u64,
    /// Measured round trips per round.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    round_trips: u64,
    /// Connections opened and closed per setup-rate measurement.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    setups: u64,
    /// Idle connections held for the memory row.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(2..=20_000))]
    idle_conns: u64,
    /// Connections open through the kills of the crash workload (half
    /// opened by the guest, half by the host; 4 of them keep data moving).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(8..=20_000))]
    crash_conns: u64,
    /// SIGKILLs per backend and round in the crash workload: of vsockd's
    /// worker, or of the whole process of a backend without a keeper.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    kills: u64,
    /// Connections open through the upgrades of the upgrade workload
    /// (half opened by the guest, half by the host; 4 of them keep data
    /// moving).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(8..=20_000))]
    upgrade_conns: u64,
    /// `vsockd upgrade` calls per round in the upgrade workload (vsockd
    /// only; other backends have no live upgrade).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    upgrades: u64,
    /// Workloads to run, comma-separated: throughput, g2h, h2g, latency,
    /// setup, idle, crash, upgrade (default: all).
    #[arg(long, value_delimiter = ',', value_parser = parse_workload)]
    workloads: Vec<Workload>,
    /// Also print every round's values.
    #[arg(long)]
    raw: bool,
}

fn parse_kind(s: &str) -> Result<BackendKind, String> {
    BackendKind::from_name(s)
        .ok_or_else(|| format!("unknown backend {s:?} ({})", BackendKind::NAMES))
}

fn parse_workload(s: &str) -> Result<Workload, String> {
    Workload::parse(s).ok_or_else(|| format!("unknown workload {s:?} ({})", Workload::NAMES))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), Linux {kernel}")
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("vsock-bench: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let mut kinds: Vec<BackendKind> = Vec::new();
    for k in &args.backends {
        if !kinds.contains(k) {
            kinds.push(*k);
        }
    }
    for k in &kinds {
        if !k.binary().is_file() {
            eprintln!(
                "vsock-bench: {} binary {} not found (set {})",
                k.name(),
                k.binary().display(),
                match k {
                    BackendKind::Vsockd | BackendKind::VsockdNoKeeper =>
                        "VSOCKD_BIN, or run cargo build --release",
                    BackendKind::Peer => "VSOCKD_PEER_BIN, or leave peer out of --backends",
                }
            );
            return ExitCode::from(2);
        }
    }
    if let Err(e) = procstat::raise_fd_limit() {
        eprintln!("vsock-bench: cannot raise the open-file limit: {e}");
    }
    let mut s = Settings {
        rounds: args.rounds as usize,
        stream_bytes: args.mib << 20,
        parallel: args.parallel as usize,
        round_trips: args.round_trips as usize,
        setups: args.setups as usize,
        idle_conns: args.idle_conns as usize,
        crash_conns: args.crash_conns as usize,
        kills: args.kills as usize,
        upgrade_conns: args.upgrade_conns as usize,
        upgrades: args.upgrades as usize,
        ..Settings::default()
    };
    if !args.workloads.is_empty() {
        s.workloads = args.workloads.clone();
    }
    let dir = match temp_dir("bench") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vsock-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = bench::run(&s, &kinds, &dir, |m| eprintln!("vsock-bench: {m}"));
    let _ = std::fs::remove_dir_all(&dir);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vsock-bench: {e:?}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", report.table());
    println!("Medians of {} rounds; machine: {}.", s.rounds, machine());
    for k in &kinds {
        println!("{}: {}", k.name(), k.binary().display());
    }
    println!("{}.", report.ceiling_note());
    if let Some(note) = report.crash_note() {
        println!("{note}.");
    }
    if let Some(note) = report.upgrade_note() {
        println!("{note}.");
    }
    if args.raw {
        println!("\nEvery round:\n{}", report.raw());
    }
    ExitCode::SUCCESS
}
