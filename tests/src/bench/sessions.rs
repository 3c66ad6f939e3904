//! The cost of resumable host sessions in vsockd: bulk throughput over one
//! resumable session against one raw hybrid stream, each direction (the
//! difference is the copy into the state region, the framing and the
//! checksums), and the time a session takes to reattach: `stop()` then
//! `start()` on the same session (a new socket and a `RESUME` round
//! trip), and from a SIGKILL of the worker until the session is attached
//! again (the worker's restart, the detach, the client's reattach).
//!
//! Each round starts a fresh vsockd (with its keeper, logging at warn)
//! and virtual VM; rows report the median over rounds, and the reattach
//! percentiles over all rounds' samples.

use std::io;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use vsockd_client::{Options, Session};

use super::workload::{receive_count, send_count, transfer, Direction, STEP_TIMEOUT};
use super::{start_backend, vm_options, Settings, PORT_BASE};
use crate::error::{Error, Result};
use crate::vmm::VirtualVm;
use crate::BackendKind;

/// Bytes per write and read.
const IO_BYTES: usize = 64 << 10;

/// What one round measured.
#[derive(Debug, Default)]
pub struct Round {
    /// MiB/s: (direction, resumable) → rate.
    pub rates: Vec<(Direction, bool, f64)>,
    pub stop_start: Vec<Duration>,
    pub kill_to_attached: Vec<Duration>,
}

fn io_err(what: &str) -> impl Fn(io::Error) -> Error + '_ {
    move |e| Error::new(format!("{what}: {e}"))
}

/// Moves `bytes` over a resumable session in direction `dir`: MiB/s.
fn session_transfer(
    vm: &VirtualVm,
    uds: &Path,
    port: u32,
    dir: Direction,
    bytes: u64,
) -> Result<f64> {
    let l = vm.listen(port).map_err(io_err("guest listen"))?;
    let opts = Options {
        reattach_timeout: Duration::from_secs(30),
        ..Options::default()
    };
    let s = Session::connect(uds, port, opts)
        .map_err(|e| Error::new(format!("resumable CONNECT: {e}")))?;
    let g = l.accept(STEP_TIMEOUT).map_err(io_err("guest accept"))?;
    let chunk = vec![0x5au8; IO_BYTES];
    let t0 = Instant::now();
    let (a, b) = thread::scope(|sc| {
        let (w, r) = match dir {
            Direction::GuestToHost => (
                sc.spawn(|| send_count(&g, bytes, &chunk)),
                sc.spawn(|| receive_count(&s, bytes, IO_BYTES)),
            ),
            Direction::HostToGuest => (
                sc.spawn(|| send_count(&s, bytes, &chunk)),
                sc.spawn(|| receive_count(&g, bytes, IO_BYTES)),
            ),
        };
        (w.join(), r.join())
    });
    let elapsed = t0.elapsed();
    for r in [a, b] {
        r.map_err(|_| Error::new("a session transfer thread panicked"))?
            .map_err(io_err("session transfer"))?;
    }
    s.abort()
        .map_err(|e| Error::new(format!("ending the session: {e}")))?;
    Ok(bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64())
}

/// One round on a fresh vsockd and virtual VM.
pub fn run_round(s: &Settings, reattaches: usize, kills: usize, dir: &Path) -> Result<Round> {
    let backend = start_backend(BackendKind::Vsockd, dir)?;
    let pid = backend
        .pid()
        .ok_or_else(|| Error::new("vsockd is not running"))?;
    let vm = VirtualVm::start(backend.socket(), vm_options(s))
        .map_err(|e| backend.attach(Error::new(format!("virtual VM start: {e}"))))?;
    let uds = backend.uds().to_path_buf();
    let mut round = Round::default();
    let mut port = PORT_BASE + 100;
    for d in [Direction::GuestToHost, Direction::HostToGuest] {
        port += 2;
        let raw = transfer(
            &vm,
            &uds,
            pid,
            port,
            d,
            1,
            s.stream_bytes,
            IO_BYTES,
            IO_BYTES,
        )
        .map_err(|e| backend.attach(Error::new(format!("raw transfer: {e}"))))?;
        round.rates.push((d, false, raw.mib_per_second()));
        port += 2;
        let rate =
            session_transfer(&vm, &uds, port, d, s.stream_bytes).map_err(|e| backend.attach(e))?;
        round.rates.push((d, true, rate));
    }
    port += 2;
    let l = vm.listen(port).map_err(io_err("guest listen"))?;
    let session = Session::connect(&uds, port, Options::default())
        .map_err(|e| Error::new(format!("resumable CONNECT: {e}")))?;
    let _g = l.accept(STEP_TIMEOUT).map_err(io_err("guest accept"))?;
    for _ in 0..reattaches {
        session.stop();
        let t0 = Instant::now();
        session
            .start()
            .map_err(|e| backend.attach(Error::new(format!("reattach: {e}"))))?;
        round.stop_start.push(t0.elapsed());
    }
    for k in 0..kills {
        let before = session.reattach_count();
        let killed = backend
            .kill_worker_now(STEP_TIMEOUT)
            .map_err(|e| Error::new(format!("kill #{k}: {e}")))?;
        while session.reattach_count() == before || !session.is_attached() {
            if killed.at.elapsed() > STEP_TIMEOUT {
                return Err(backend.attach(Error::new(format!(
                    "the session did not reattach within {STEP_TIMEOUT:?} of kill #{k}"
                ))));
            }
            thread::sleep(Duration::from_micros(100));
        }
        round.kill_to_attached.push(killed.at.elapsed());
    }
    Ok(round)
}

/// The median of `v`.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// The Markdown table of `rounds`.
pub fn table(rounds: &[Round]) -> String {
    let mut out = String::from("| row | raw | resumable | resumable / raw |\n|---|---|---|---|\n");
    for (d, name) in [
        (Direction::GuestToHost, "guest to host, 1 connection, MiB/s"),
        (Direction::HostToGuest, "host to guest, 1 connection, MiB/s"),
    ] {
        let rate = |resumable: bool| {
            median(
                rounds
                    .iter()
                    .flat_map(|r| r.rates.iter())
                    .filter(|(rd, rr, _)| *rd == d && *rr == resumable)
                    .map(|(_, _, v)| *v)
                    .collect(),
            )
        };
        let (raw, res) = (rate(false), rate(true));
        out.push_str(&format!(
            "| {name} | {raw:.0} | {res:.0} | {:.2} |\n",
            res / raw
        ));
    }
    let pct = |mut v: Vec<Duration>| {
        v.sort();
        if v.is_empty() {
            return "-".to_string();
        }
        let at = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
        format!(
            "p50 {}, p99 {}, max {} ({} samples)",
            ms(at(0.5)),
            ms(at(0.99)),
            ms(at(1.0)),
            v.len()
        )
    };
    out.push_str(&format!(
        "\n| reattach | time |\n|---|---|\n| `stop()` then `start()` (new socket, `RESUME`) | {} |\n| worker SIGKILL to attached again | {} |\n",
        pct(rounds.iter().flat_map(|r| r.stop_start.iter().copied()).collect()),
        pct(rounds.iter().flat_map(|r| r.kill_to_attached.iter().copied()).collect()),
    ));
    out
}
