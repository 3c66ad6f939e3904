//! vsock-bench's engine: runs the same workloads against each backend in
//! interleaved rounds (the order alternates every round, so slow drift of
//! a shared machine hits both alike), takes the median of every row over
//! the rounds, and sets each backend against the others and against a
//! plain Unix socketpair moving the same bytes.
//!
//! Every backend measurement starts a fresh backend process (logging at
//! warn, so that logging is not what is measured) and a fresh virtual VM;
//! the crash workload (`crash`) and the upgrade workload (`upgrade`, vsockd
//! only) start their own.

pub mod ceiling;
pub mod crash;
pub mod fleet;
pub mod gaps;
pub mod movers;
pub mod noise;
pub mod phases;
pub mod probe;
pub mod procstat;
pub mod report;
pub mod sessions;
pub mod upgrade;
pub mod workload;

use std::path::Path;
use std::time::Duration;

use crate::error::{Context, Error, Result};
use crate::vmm::{VirtualVm, VmOptions};
use crate::{Backend, BackendKind};

pub use report::Report;
use upgrade::{Source, Stat};
use workload::Direction;

/// Guest CID of the virtual VM.
const GUEST_CID: u32 = 3;

/// Host and guest ports of the workloads; each gets its own.
const PORT_BASE: u32 = 5000;

/// What to measure and how much.
#[derive(Debug, Clone)]
pub struct Settings {
    pub rounds: usize,
    /// Bytes moved by one throughput measurement, over all connections.
    pub stream_bytes: u64,
    /// Connections of the parallel throughput rows.
    pub parallel: usize,
    /// Largest guest TX packet payload, and the size of every write on
    /// either side.
    pub write_bytes: usize,
    /// Size of a guest RX buffer, header included.
    pub rx_buf_bytes: u32,
    /// Size of every read on either side.
    pub read_bytes: usize,
    /// Request and response size of the latency rows.
    pub message_bytes: usize,
    /// Measured round trips per round (after a warm-up of a tenth as many).
    pub round_trips: usize,
    /// Connections opened and closed per setup-rate measurement.
    pub setups: usize,
    /// Idle connections held for the memory row.
    pub idle_conns: usize,
    /// Connections open through the kills of the crash workload.
    pub crash_conns: usize,
    /// Kills per backend and round in the crash workload.
    pub kills: usize,
    /// Connections open through the upgrades of the upgrade workload.
    pub upgrade_conns: usize,
    /// Upgrades per round in the upgrade workload (vsockd only).
    pub upgrades: usize,
    /// Which workloads run (all by default).
    pub workloads: Vec<Workload>,
}

/// Groups of rows that can be run alone (for profiling one path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Both throughput directions and the CPU rows.
    Throughput,
    GuestToHost,
    HostToGuest,
    Latency,
    Setup,
    Idle,
    /// SIGKILLs with many connections open: recovery and connections kept.
    Crash,
    /// Live upgrades with many connections open: the pause (vsockd only).
    Upgrade,
}

impl Workload {
    pub const NAMES: &'static str = "throughput, g2h, h2g, latency, setup, idle, crash, upgrade";

    pub fn parse(s: &str) -> Option<Workload> {
        Some(match s {
            "throughput" => Workload::Throughput,
            "g2h" => Workload::GuestToHost,
            "h2g" => Workload::HostToGuest,
            "latency" => Workload::Latency,
            "setup" => Workload::Setup,
            "idle" => Workload::Idle,
            "crash" => Workload::Crash,
            "upgrade" => Workload::Upgrade,
            _ => return None,
        })
    }

    fn all() -> Vec<Workload> {
        vec![
            Workload::Throughput,
            Workload::Latency,
            Workload::Setup,
            Workload::Idle,
            Workload::Crash,
            Workload::Upgrade,
        ]
    }
}

impl Settings {
    fn runs(&self, w: Workload) -> bool {
        self.workloads.contains(&w)
    }

    /// Whether any workload runs on the backend started for the round
    /// (all but the crash and upgrade workloads, which start their own).
    fn runs_steady(&self) -> bool {
        self.workloads
            .iter()
            .any(|w| !matches!(w, Workload::Crash | Workload::Upgrade))
    }

    fn runs_direction(&self, d: Direction) -> bool {
        self.runs(Workload::Throughput)
            || self.runs(match d {
                Direction::GuestToHost => Workload::GuestToHost,
                Direction::HostToGuest => Workload::HostToGuest,
            })
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            rounds: 5,
            stream_bytes: 512 << 20,
            parallel: 8,
            write_bytes: 64 << 10,
            rx_buf_bytes: 4096,
            read_bytes: 64 << 10,
            message_bytes: 64,
            round_trips: 2000,
            setups: 500,
            idle_conns: 1000,
            crash_conns: 1000,
            kills: 20,
            upgrade_conns: 1000,
            upgrades: 50,
            workloads: Workload::all(),
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Row {
    /// MiB/s moved over `n` connections.
    Throughput(Direction, usize),
    LatencyP50,
    LatencyP99,
    /// Connections opened and closed per second.
    SetupRate(Direction),
    /// Backend CPU seconds per GiB over both throughput rows of a
    /// direction.
    CpuPerGib(Direction),
    /// Backend resident memory with the idle connections open, MiB.
    IdleRss,
    /// Kill to first packet served, ms over a round's kills (infinite:
    /// never).
    RecoveryP50,
    RecoveryP99,
    /// Connections still working after a kill, the fewest of a round.
    ConnsKept,
    /// Connections reset by a kill, the most of a round.
    ConnsReset,
    /// An upgrade's pause over a round's upgrades, ms (infinite: the
    /// device never served again).
    UpgradePause(Source, Stat),
    /// Connections still working after an upgrade, the fewest of a round.
    UpgradeConnsKept,
    /// Moving streams that delivered every byte exactly once, in order.
    UpgradeStreamsExact,
    /// Upgrades `vsockd upgrade` reported as failed, of a round's.
    UpgradesFailed,
}

impl Row {
    /// Rows in table order.
    pub fn all(s: &Settings) -> Vec<Row> {
        use Direction::*;
        vec![
            Row::Throughput(GuestToHost, 1),
            Row::Throughput(GuestToHost, s.parallel),
            Row::Throughput(HostToGuest, 1),
            Row::Throughput(HostToGuest, s.parallel),
            Row::LatencyP50,
            Row::LatencyP99,
            Row::SetupRate(HostToGuest),
            Row::SetupRate(GuestToHost),
            Row::CpuPerGib(GuestToHost),
            Row::CpuPerGib(HostToGuest),
            Row::IdleRss,
            Row::RecoveryP50,
            Row::RecoveryP99,
            Row::ConnsKept,
            Row::ConnsReset,
            Row::UpgradePause(Source::Outside, Stat::P50),
            Row::UpgradePause(Source::Outside, Stat::P99),
            Row::UpgradePause(Source::Outside, Stat::Max),
            Row::UpgradePause(Source::Reported, Stat::P50),
            Row::UpgradePause(Source::Reported, Stat::P99),
            Row::UpgradePause(Source::Reported, Stat::Max),
            Row::UpgradeConnsKept,
            Row::UpgradeStreamsExact,
            Row::UpgradesFailed,
        ]
    }

    pub fn label(&self, s: &Settings) -> String {
        let d = |d: &Direction| match d {
            Direction::GuestToHost => "guest to host",
            Direction::HostToGuest => "host to guest",
        };
        match self {
            Row::Throughput(dir, n) => format!(
                "throughput {}, {n} conn{} (MiB/s)",
                d(dir),
                if *n == 1 { "" } else { "s" }
            ),
            Row::LatencyP50 => format!("{}-byte round trip p50 (µs)", s.message_bytes),
            Row::LatencyP99 => format!("{}-byte round trip p99 (µs)", s.message_bytes),
            Row::SetupRate(Direction::HostToGuest) => {
                "connection setup, host-initiated (conn/s)".into()
            }
            Row::SetupRate(Direction::GuestToHost) => {
                "connection setup, guest-initiated (conn/s)".into()
            }
            Row::CpuPerGib(dir) => format!("backend CPU {} (s/GiB)", d(dir)),
            Row::IdleRss => format!("backend RSS, {} idle conns (MiB)", s.idle_conns),
            Row::RecoveryP50 => {
                format!("recovery after SIGKILL, {} conns, p50 (ms)", s.crash_conns)
            }
            Row::RecoveryP99 => {
                format!("recovery after SIGKILL, {} conns, p99 (ms)", s.crash_conns)
            }
            Row::ConnsKept => format!("connections kept per kill (of {})", s.crash_conns),
            Row::ConnsReset => format!("connections reset per kill (of {})", s.crash_conns),
            Row::UpgradePause(Source::Outside, stat) => format!(
                "upgrade pause, {} conns, {} (ms)",
                s.upgrade_conns,
                stat.label()
            ),
            Row::UpgradePause(Source::Reported, stat) => {
                format!("upgrade pause as vsockd reports it, {} (ms)", stat.label())
            }
            Row::UpgradeConnsKept => {
                format!("connections kept per upgrade (of {})", s.upgrade_conns)
            }
            Row::UpgradeStreamsExact => format!(
                "moving streams byte-exact after the upgrades (of {})",
                2 * fleet::MOVING_CONNS
            ),
            Row::UpgradesFailed => format!("upgrades failed (of {})", s.upgrades),
        }
    }

    pub fn higher_is_better(&self) -> bool {
        matches!(
            self,
            Row::Throughput(..)
                | Row::SetupRate(_)
                | Row::ConnsKept
                | Row::UpgradeConnsKept
                | Row::UpgradeStreamsExact
        )
    }

    /// Whether backends are compared by ratio on this row. The crash rows
    /// are not: a backend without a keeper never recovers and keeps no
    /// connection, so a ratio says nothing the values do not. Nor are the
    /// upgrade rows, which only vsockd has.
    pub fn has_ratio(&self) -> bool {
        !self.is_crash() && !self.is_upgrade()
    }

    pub fn is_upgrade(&self) -> bool {
        matches!(
            self,
            Row::UpgradePause(..)
                | Row::UpgradeConnsKept
                | Row::UpgradeStreamsExact
                | Row::UpgradesFailed
        )
    }

    pub fn is_crash(&self) -> bool {
        matches!(
            self,
            Row::RecoveryP50 | Row::RecoveryP99 | Row::ConnsKept | Row::ConnsReset
        )
    }

    /// Whether the values are counts (printed without decimals).
    pub fn is_count(&self) -> bool {
        matches!(
            self,
            Row::ConnsKept
                | Row::ConnsReset
                | Row::UpgradeConnsKept
                | Row::UpgradeStreamsExact
                | Row::UpgradesFailed
        )
    }

    /// The socketpair measurement bounding this row, if any.
    pub fn ceiling(&self) -> Option<Direction> {
        match self {
            Row::Throughput(dir, _) => Some(*dir),
            _ => None,
        }
    }
}

/// Who is measured: a backend, or the socketpair ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Backend(BackendKind),
    Ceiling(Direction),
}

/// Read size of the ceiling for a direction: host reads for guest to
/// host; for host to guest the backend reads into guest RX buffers, so
/// reads of one RX buffer's size.
fn ceiling_read_bytes(s: &Settings, dir: Direction) -> usize {
    match dir {
        Direction::GuestToHost => s.read_bytes,
        Direction::HostToGuest => s.rx_buf_bytes as usize,
    }
}

/// Runs every round and returns the samples.
pub fn run(
    s: &Settings,
    kinds: &[BackendKind],
    work_dir: &Path,
    mut progress: impl FnMut(&str),
) -> Result<Report> {
    let mut report = Report::new(s.clone(), kinds.to_vec());
    for round in 0..s.rounds {
        for dir in [Direction::GuestToHost, Direction::HostToGuest] {
            if !s.runs_direction(dir) {
                continue;
            }
            let t = ceiling::socketpair(s.stream_bytes, s.write_bytes, ceiling_read_bytes(s, dir))?;
            report.add(Subject::Ceiling(dir), None, t.mib_per_second());
        }
        let mut order = kinds.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for kind in order {
            progress(&format!(
                "round {}/{}: {}",
                round + 1,
                s.rounds,
                kind.name()
            ));
            let dir = work_dir.join(format!("{}-{round}", kind.name()));
            std::fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
            for (row, v) in measure(kind, s, &dir, &mut progress)? {
                report.add(Subject::Backend(kind), Some(row), v);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(report)
}

/// One backend, one round: every row.
fn measure(
    kind: BackendKind,
    s: &Settings,
    dir: &Path,
    progress: &mut impl FnMut(&str),
) -> Result<Vec<(Row, f64)>> {
    let mut rows = Vec::new();
    if s.runs_steady() {
        rows.extend(measure_steady(kind, s, dir)?);
    }
    if s.runs(Workload::Crash) {
        let round =
            crash::run(kind, s, dir).map_err(|e| Error::new(format!("crash workload: {e}")))?;
        progress(&format!("{}: {round}", kind.name()));
        rows.extend(round.rows());
    }
    if s.runs(Workload::Upgrade) && kind.has_live_upgrade() {
        let round =
            upgrade::run(s, dir).map_err(|e| Error::new(format!("upgrade workload: {e}")))?;
        progress(&format!("{}: {round}", kind.name()));
        rows.extend(round.rows());
    }
    Ok(rows)
}

/// Starts `kind` in `dir`, logging at warn.
fn start_backend(kind: BackendKind, dir: &Path) -> Result<Backend> {
    Backend::start_logging(
        kind,
        &dir.join("vhost.sock"),
        &dir.join("vsock.sock"),
        &dir.join(format!("{}.log", kind.name())),
        GUEST_CID,
        Some("warn"),
    )
}

/// The virtual VM of every measurement.
fn vm_options(s: &Settings) -> VmOptions {
    VmOptions {
        rx_buf_size: s.rx_buf_bytes,
        tx_max_payload: s.write_bytes,
        io_timeout: Some(Duration::from_secs(60)),
        ..VmOptions::default()
    }
}

/// Every row but the crash rows, on one backend and virtual VM.
fn measure_steady(kind: BackendKind, s: &Settings, dir: &Path) -> Result<Vec<(Row, f64)>> {
    let backend = start_backend(kind, dir)?;
    let pid = backend
        .pid()
        .ok_or_else(|| Error::new(format!("{} is not running", kind.name())))?;
    let vm = VirtualVm::start(backend.socket(), vm_options(s))
        .map_err(|e| backend.attach(Error::new(format!("virtual VM start: {e}"))))?;
    let uds = backend.uds().to_path_buf();
    let fail = |what: &str, e: std::io::Error| {
        backend.attach(
            Error::new(format!("{}: {what}: {e}", kind.name()))
                .with_context("virtual VM", &vm.describe()),
        )
    };
    let mut rows = Vec::new();
    let mut port = PORT_BASE;
    let mut next_port = || {
        port += 2;
        port
    };
    for dir in [Direction::GuestToHost, Direction::HostToGuest] {
        if !s.runs_direction(dir) {
            continue;
        }
        let (mut cpu, mut bytes) = (0.0, 0u64);
        for conns in [1, s.parallel] {
            let t = workload::transfer(
                &vm,
                &uds,
                pid,
                next_port(),
                dir,
                conns,
                s.stream_bytes,
                s.write_bytes,
                s.read_bytes,
            )
            .map_err(|e| fail(&format!("{dir:?} over {conns}"), e))?;
            rows.push((Row::Throughput(dir, conns), t.mib_per_second()));
            cpu += t.backend_cpu_seconds;
            bytes += t.bytes;
        }
        rows.push((
            Row::CpuPerGib(dir),
            cpu / (bytes as f64 / (1u64 << 30) as f64),
        ));
    }
    if s.runs(Workload::Latency) {
        latency(&vm, &uds, s, next_port(), &mut rows).map_err(|e| fail("round trips", e))?;
    }
    if s.runs(Workload::Setup) {
        for dir in [Direction::HostToGuest, Direction::GuestToHost] {
            let rate = workload::setup_rate(&vm, &uds, next_port(), dir, s.setups)
                .map_err(|e| fail(&format!("setup {dir:?}"), e))?;
            rows.push((Row::SetupRate(dir), rate));
        }
    }
    if s.runs(Workload::Idle) {
        let idle = workload::idle_connections(&vm, &uds, next_port(), s.idle_conns)
            .map_err(|e| fail("idle connections", e))?;
        // Let the backend settle (deferred frees, credit updates).
        std::thread::sleep(Duration::from_millis(200));
        let rss = procstat::tree_rss_bytes(pid)?;
        rows.push((Row::IdleRss, rss as f64 / (1 << 20) as f64));
        drop(idle);
    }
    drop(vm);
    drop(backend);
    Ok(rows)
}

fn latency(
    vm: &VirtualVm,
    uds: &Path,
    s: &Settings,
    port: u32,
    rows: &mut Vec<(Row, f64)>,
) -> std::io::Result<()> {
    let rtt = workload::round_trips(
        vm,
        uds,
        port,
        s.message_bytes,
        s.round_trips / 10,
        s.round_trips,
    )?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    rows.push((Row::LatencyP50, us(workload::percentile(&rtt, 50.0))));
    rows.push((Row::LatencyP99, us(workload::percentile(&rtt, 99.0))));
    Ok(())
}
