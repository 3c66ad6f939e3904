//! End-to-end tests: a real Linux guest under QEMU (TCG) with a
//! vhost-user-vsock-pci device served by the backend under test
//! (`VSOCKD_E2E_BACKEND=vsockd|peer`, default vsockd).
//!
//! Every test checks content: streams are generated from a seed and the
//! receiving side verifies each byte at its offset (see `pattern`).
//! Guest CID is 3; the guest reaches the host at CID 2; host ports are the
//! hybrid socket `<uds>` (CONNECT) and `<uds>_<port>` (listeners).
//!
//! `VSOCKD_E2E_KEEP=1` keeps each test's directory (backend log, console
//! log); `VSOCKD_E2E_TRACE=1` also records every vhost-user message there.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vsockd_tests::chaos::{host_chaos, Gap, HostChaos, Rng, SendUntil};
use vsockd_tests::hybrid::{
    hybrid_connect, hybrid_connect_timeout, read_ok_line, read_verified, read_verified_at,
    run_on_stream, write_verified, write_verified_at, HostListener,
};
use vsockd_tests::pattern::{self, reply_seed};
use vsockd_tests::qemu::{temp_dir, CmdOutput, GuestJob};
use vsockd_tests::stream::{parse_results, Mode, ResultLine};
use vsockd_tests::trace::Proxy;
use vsockd_tests::{Backend, BackendKind, Error, GuestImage, Vm, VmConfig};

const CID: u32 = 3;
const MIB: u64 = 1 << 20;
/// Limit for any single wait in these tests.
const T: Duration = Duration::from_secs(90);
/// `--timeout` given to every guest probe (its own reads and writes).
const PROBE_TIMEOUT: u64 = 60;

/// One backend, one guest, one directory.
struct Rig {
    name: String,
    dir: PathBuf,
    // Field order: the VM goes before the backend.
    vm: Option<Vm>,
    backend: Backend,
    boots: u32,
    /// The vhost-user tracing proxy, with `VSOCKD_E2E_TRACE=1`.
    trace: Option<Proxy>,
}

impl Rig {
    fn new(name: &str) -> Rig {
        Rig::with_log_level(name, None)
    }

    /// A rig whose backend logs at `level` (default: debug, or
    /// `VSOCKD_E2E_LOG_LEVEL`).
    fn with_log_level(name: &str, level: Option<&str>) -> Rig {
        Rig::with_args(name, level, &[])
    }

    /// A rig whose backend gets `extra` arguments.
    fn with_args(name: &str, level: Option<&str>, extra: &[&str]) -> Rig {
        let image = GuestImage::get().unwrap_or_else(|e| panic!("guest image: {e}"));
        let dir = temp_dir(name).unwrap_or_else(|e| panic!("{e}"));
        let kind = BackendKind::from_env().unwrap_or_else(|e| panic!("{name}: {e}"));
        let backend = Backend::start_in(kind, &dir, CID, level, extra)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut rig = Rig {
            name: name.to_string(),
            dir,
            vm: None,
            backend,
            boots: 0,
            trace: None,
        };
        if std::env::var_os("VSOCKD_E2E_TRACE").is_some_and(|v| v != "0") {
            let p = Proxy::start(
                &rig.dir.join("trace.sock"),
                rig.backend.socket(),
                &rig.dir.join("vhost-user.trace"),
            );
            rig.trace = Some(rig.ok(p, "starting the vhost-user trace proxy"));
        }
        rig.boot(image);
        rig
    }

    fn boot(&mut self, image: &GuestImage) {
        let sock = match &self.trace {
            Some(p) => p.socket(),
            None => self.backend.socket(),
        };
        let mut cfg = VmConfig::new(sock);
        self.boots += 1;
        cfg.work_dir = Some(self.dir.join(format!("vm{}", self.boots)));
        let vm = Vm::boot(image, &cfg)
            .map_err(|e| self.backend.attach(e))
            .unwrap_or_else(|e| panic!("{}: boot with {}: {e}", self.name, self.kind()));
        eprintln!(
            "{}: guest booted in {:.1} s ({})",
            self.name,
            vm.boot_time().as_secs_f64(),
            vm.ready_line()
        );
        self.vm = Some(vm);
    }

    fn kind(&self) -> &'static str {
        self.backend.kind().name()
    }

    fn vm(&self) -> &Vm {
        self.vm.as_ref().expect("no VM")
    }

    fn uds(&self) -> &Path {
        self.backend.uds()
    }

    /// Fails the test with the backend's and the guest's logs attached.
    fn fail(&self, msg: impl std::fmt::Display) -> ! {
        let mut e = Error::new(format!("{} [backend {}]: {msg}", self.name, self.kind()));
        if let Some(vm) = &self.vm {
            e = e.with_context("guest console (tail)", &vm.console_tail(30));
        }
        panic!("{:?}", self.backend.attach(e))
    }

    fn ok<V, E: std::fmt::Display>(&self, r: Result<V, E>, what: &str) -> V {
        r.unwrap_or_else(|e| self.fail(format!("{what}: {e}")))
    }

    /// Starts `vsock-probe ARGS` in the background in the guest.
    fn probe(&self, args: &str) -> GuestJob {
        let cmd = format!("vsock-probe --timeout {PROBE_TIMEOUT} {args}");
        self.ok(self.vm().spawn(&cmd), &format!("starting {cmd:?}"))
    }

    /// Starts a listening probe and waits until it listens.
    fn probe_listen(&self, args: &str) -> GuestJob {
        let job = self.probe(&format!("listen {args}"));
        self.ok(
            job.wait_for_output("LISTENING", T),
            &format!("guest listener {args:?}"),
        );
        job
    }

    /// Waits for a probe and checks that it exited 0 with every RESULT ok.
    fn probe_ok(&self, job: &GuestJob, what: &str) -> CmdOutput {
        let out = self.ok(job.wait(T), what);
        let results = parse_results(&out.output);
        let all_ok = results
            .iter()
            .filter(|r| r.kind == "RESULT")
            .all(|r| r.ok());
        if out.status != 0 || results.is_empty() || !all_ok {
            self.fail(format!(
                "{what}: guest probe `{}` failed (exit {}):\n{}",
                job.command(),
                out.status,
                out.output
            ));
        }
        out
    }

    fn accept(&self, l: &HostListener, what: &str) -> UnixStream {
        let s = self.ok(l.accept_timeout(T), what);
        s.set_read_timeout(Some(T)).unwrap();
        s.set_write_timeout(Some(T)).unwrap();
        s
    }

    fn connect(&self, port: u32) -> UnixStream {
        let (s, _) = self.ok(
            hybrid_connect(self.uds(), port),
            &format!("hybrid CONNECT {port}"),
        );
        s.set_read_timeout(Some(T)).unwrap();
        s.set_write_timeout(Some(T)).unwrap();
        s
    }

    /// Fails the test if QEMU logged anything about vhost (a backend that
    /// went away, a failed message).
    fn no_vhost_errors_in_qemu_log(&self) {
        let log = self.vm().dir().join("qemu.log");
        let text = self.ok(std::fs::read_to_string(&log), "reading qemu.log");
        if let Some(line) = text.lines().find(|l| l.to_lowercase().contains("vhost")) {
            self.fail(format!("QEMU logged a vhost error: {line}"));
        }
    }

    /// The guest's vsock virtio device, e.g. `virtio1`.
    fn vsock_device(&self) -> String {
        let out = self.ok(
            self.vm()
                .sh("ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/ | grep '^virtio'"),
            "listing the vsock driver's devices",
        );
        let dev = out.output.trim().to_string();
        if !out.success() || dev.is_empty() {
            self.fail(format!(
                "no device bound to vmw_vsock_virtio_transport: {out:?}"
            ));
        }
        dev
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            drop(vm);
        }
        if !thread::panicking() && !vsockd_tests::qemu::keep_files() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("{}: files kept in {}", self.name, self.dir.display());
        }
    }
}

/// Reads exactly `bytes` of stream `seed` from `s` and checks them.
fn expect_stream(rig: &Rig, s: &UnixStream, seed: u64, bytes: u64, what: &str) {
    let r = rig.ok(read_verified(s, seed, Some(bytes)), what);
    if r.received != bytes || r.first_bad.is_some() {
        rig.fail(format!(
            "{what}: received {} of {bytes} bytes, first bad offset {:?}",
            r.received, r.first_bad
        ));
    }
}

/// Reads stream `seed` from `s` until EOF and checks it is exactly
/// `bytes` long.
fn expect_stream_then_eof(rig: &Rig, s: &UnixStream, seed: u64, bytes: u64, what: &str) {
    let r = rig.ok(read_verified(s, seed, None), what);
    if r.received != bytes || r.first_bad.is_some() || !r.eof {
        rig.fail(format!(
            "{what}: received {} of {bytes} bytes (eof {}), first bad offset {:?}",
            r.received, r.eof, r.first_bad
        ));
    }
}

// 1. Bulk transfer, both directions, every byte verified.
#[test]
fn bulk_64mib_each_way() {
    let rig = Rig::new("bulk");
    assert_eq!(rig.vm().cid(), Some(CID), "guest CID");
    let bytes = 64 * MIB;

    // Guest to host: the guest connects to (CID 2, port 6001).
    let l = rig.ok(HostListener::bind(rig.uds(), 6001), "bind host listener");
    let t0 = Instant::now();
    let job = rig.probe(&format!("connect 2 6001 sendv {bytes} 11"));
    let s = rig.accept(&l, "guest connection to host port 6001");
    expect_stream(&rig, &s, 11, bytes, "guest to host stream");
    drop(s);
    rig.probe_ok(&job, "guest to host sender");
    eprintln!(
        "bulk: 64 MiB guest to host in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // Host to guest: CONNECT to a guest listener on port 6002.
    let job = rig.probe_listen(&format!("6002 recvv {bytes} 12"));
    let t0 = Instant::now();
    let s = rig.connect(6002);
    rig.ok(write_verified(&s, 12, bytes), "host to guest write");
    drop(s);
    rig.probe_ok(&job, "host to guest receiver");
    eprintln!(
        "bulk: 64 MiB host to guest in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

// 2. Half-close each way: after one side's shutdown(SHUT_WR) the other
// side reads EOF, and the other direction still carries data.
#[test]
fn half_close_each_way() {
    let rig = Rig::new("halfclose");
    let bytes = MIB;

    // The guest shuts down writing first.
    let l = rig.ok(HostListener::bind(rig.uds(), 6101), "bind host listener");
    let job = rig.probe(&format!("connect 2 6101 halfclose-writer {bytes} 21"));
    let s = rig.accept(&l, "guest connection to host port 6101");
    expect_stream_then_eof(
        &rig,
        &s,
        21,
        bytes,
        "host reading the guest's stream up to EOF after the guest's SHUT_WR",
    );
    rig.ok(
        write_verified(&s, reply_seed(21), bytes),
        "host writing after the guest's SHUT_WR",
    );
    rig.ok(s.shutdown(Shutdown::Write), "host shutdown");
    rig.probe_ok(&job, "guest half-close writer");

    // The host shuts down writing first.
    let job = rig.probe_listen(&format!("6102 halfclose-reader {bytes} 22"));
    let s = rig.connect(6102);
    let o = run_on_stream(s, &Mode::HalfcloseWriter { bytes, seed: 22 }, T);
    if !o.ok {
        let guest = job.wait(T).map(|o| o.output).unwrap_or_default();
        rig.fail(format!(
            "host half-close writer: {}\nguest said:\n{guest}",
            o.result_line(0)
        ));
    }
    rig.probe_ok(&job, "guest half-close reader");
}

// 3. A guest connect to a host port nobody listens on is refused with a
// reset at once.
#[test]
fn connect_to_missing_host_listener_is_reset() {
    let rig = Rig::new("refused");
    let job = rig.probe("connect 2 6201 expect-error");
    let out = rig.ok(job.wait(T), "guest connect to a port without listener");
    let results = parse_results(&out.output);
    let errno = results
        .iter()
        .find(|r| r.kind == "RESULT")
        .and_then(|r| r.get("errno"))
        .unwrap_or("none");
    if errno != "ECONNRESET" {
        rig.fail(format!(
            "guest connect to a host port without listener: expected ECONNRESET, got {errno}:\n{}",
            out.output
        ));
    }
}

// 4. Bytes the host sends before the guest calls accept() arrive.
#[test]
fn data_sent_before_accept_is_delivered() {
    let rig = Rig::new("preaccept");
    let bytes = 64 * 1024;
    let job = rig.probe_listen(&format!("6301 --delay-accept 3000 recvv {bytes} 31"));
    let s = rig.connect(6301);
    rig.ok(write_verified(&s, 31, bytes), "host write before accept");
    let out = rig.ok(job.output(), "guest output");
    if out.contains("ACCEPTED") {
        rig.fail("the guest accepted before the host finished writing: cannot test");
    }
    rig.ok(job.wait_for_output("ACCEPTED", T), "guest accept");
    drop(s);
    rig.probe_ok(&job, "guest receiver of bytes sent before accept");
}

// 5. The CONNECT line with stream bytes in the same write, and a CONNECT
// line split across two writes.
#[test]
fn connect_line_with_payload_and_split() {
    let rig = Rig::new("connectline");
    let bytes = 200_000u64;

    // Payload in the same write as the CONNECT line.
    let job = rig.probe_listen(&format!("6401 recvv {bytes} 41"));
    let mut s = rig.ok(
        UnixStream::connect(rig.uds()),
        "connect to the hybrid socket",
    );
    s.set_read_timeout(Some(T)).unwrap();
    let head = 1000usize;
    let mut first = b"CONNECT 6401\n".to_vec();
    let start = first.len();
    first.resize(start + head, 0);
    pattern::fill(41, 0, &mut first[start..]);
    rig.ok(s.write_all(&first), "write CONNECT line with payload");
    rig.ok(read_ok_line(&mut s), "OK reply to CONNECT with payload");
    rig.ok(
        write_verified_at(&s, 41, head as u64, bytes - head as u64),
        "write the rest of the stream",
    );
    drop(s);
    rig.probe_ok(
        &job,
        "guest receiver (stream bytes sent in the CONNECT write)",
    );

    // CONNECT line split across two writes.
    let job = rig.probe_listen(&format!("6402 recvv {bytes} 42"));
    let mut s = rig.ok(
        UnixStream::connect(rig.uds()),
        "connect to the hybrid socket",
    );
    s.set_read_timeout(Some(T)).unwrap();
    rig.ok(s.write_all(b"CONN"), "first half of CONNECT");
    thread::sleep(Duration::from_millis(300));
    rig.ok(s.write_all(b"ECT 6402\n"), "second half of CONNECT");
    rig.ok(read_ok_line(&mut s), "OK reply to a split CONNECT");
    rig.ok(write_verified(&s, 42, bytes), "write the stream");
    drop(s);
    rig.probe_ok(&job, "guest receiver (split CONNECT line)");
}

// 6. 64 concurrent connections, 1 MiB each, each way.
#[test]
fn sixty_four_concurrent_connections() {
    let rig = Rig::new("parallel");
    let n = 64u64;
    let bytes = MIB;
    let base = 0x6000u64;

    // Guest to host: 64 guest connections, connection i sends stream
    // base+i; the host tells them apart by their first word.
    let l = rig.ok(HostListener::bind(rig.uds(), 6501), "bind host listener");
    let job = rig.probe(&format!(
        "connect 2 6501 --parallel {n} sendv {bytes} {base}"
    ));
    let mut readers = Vec::new();
    for i in 0..n {
        let s = rig.accept(&l, &format!("guest connection {i} of {n}"));
        readers.push(thread::spawn(move || -> Result<u64, String> {
            let mut first = [0u8; 8];
            (&s).read_exact(&mut first).map_err(|e| e.to_string())?;
            let seed = pattern::identify(&first, base, n)
                .ok_or_else(|| format!("first word {first:02x?} matches no stream"))?;
            let r = read_verified_at(&s, seed, 8, Some(bytes)).map_err(|e| e.to_string())?;
            if r.received != bytes || r.first_bad.is_some() {
                return Err(format!(
                    "stream {}: received {} of {bytes}, first bad offset {:?}",
                    seed - base,
                    r.received,
                    r.first_bad
                ));
            }
            Ok(seed)
        }));
    }
    let mut seen = Vec::new();
    for r in readers {
        match r.join().expect("reader thread") {
            Ok(seed) => seen.push(seed),
            Err(e) => rig.fail(format!("guest to host connection: {e}")),
        }
    }
    seen.sort();
    seen.dedup();
    if seen.len() as u64 != n {
        rig.fail(format!(
            "only {} distinct streams of {n} arrived",
            seen.len()
        ));
    }
    rig.probe_ok(&job, "64 guest senders");

    // Host to guest: 64 host connections to one guest listener.
    let job = rig.probe_listen(&format!("6502 --count {n} recvv {bytes} {base}"));
    let uds = rig.uds().to_path_buf();
    let writers: Vec<_> = (0..n)
        .map(|_| {
            let uds = uds.clone();
            thread::spawn(move || -> Result<(), String> {
                let (s, _) = hybrid_connect(&uds, 6502).map_err(|e| e.to_string())?;
                s.set_write_timeout(Some(T)).unwrap();
                write_verified(&s, base, bytes).map_err(|e| e.to_string())
            })
        })
        .collect();
    for (i, w) in writers.into_iter().enumerate() {
        if let Err(e) = w.join().expect("writer thread") {
            rig.fail(format!("host to guest connection {i}: {e}"));
        }
    }
    let out = rig.probe_ok(&job, "guest listener for 64 connections");
    let ok = parse_results(&out.output)
        .iter()
        .filter(|r| r.kind == "RESULT" && r.ok())
        .count() as u64;
    assert_eq!(ok, n, "guest verified {ok} of {n} streams:\n{}", out.output);
}

// 7. VM stop and resume over QMP with traffic in both directions, and the
// host writing while the VM is stopped.
#[test]
fn stop_and_resume_with_traffic() {
    let mut rig = Rig::new("stopcont");
    let bytes = 16 * MIB;
    let chunk = 64 * 1024;

    // Host to guest.
    let rx_job = rig.probe_listen(&format!("6601 recvv {bytes} 71"));
    let s = rig.connect(6601);
    s.set_write_timeout(None).unwrap();
    // The host writes the first part while the VM runs, waits until the
    // VM is stopped, then writes the rest (blocking once buffers fill).
    let first_part = 4 * MIB;
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    let (stopped_tx, stopped_rx) = std::sync::mpsc::channel::<()>();
    let writer = thread::spawn(move || -> Result<(), String> {
        let mut off = 0;
        while off < bytes {
            if off == first_part {
                stopped_rx
                    .recv_timeout(T)
                    .map_err(|_| "VM never stopped".to_string())?;
            }
            write_verified_at(&s, 71, off, chunk).map_err(|e| format!("at {off}: {e}"))?;
            off += chunk;
            w.store(off, Ordering::SeqCst);
        }
        Ok(())
    });
    // Guest to host.
    let l = rig.ok(HostListener::bind(rig.uds(), 6602), "bind host listener");
    let tx_job = rig.probe(&format!("connect 2 6602 sendv {bytes} 72"));
    let g = rig.accept(&l, "guest connection to host port 6602");
    g.set_read_timeout(None).unwrap();
    let read = Arc::new(AtomicU64::new(0));
    let r = read.clone();
    let reader = thread::spawn(move || -> Result<(), String> {
        let mut off = 0;
        while off < bytes {
            let rep = read_verified_at(&g, 72, off, Some(off + chunk))
                .map_err(|e| format!("at {off}: {e}"))?;
            if let Some(bad) = rep.first_bad {
                return Err(format!("first bad offset {bad}"));
            }
            if rep.eof {
                return Err(format!("EOF after {} bytes", rep.received));
            }
            off = rep.received;
            r.store(off, Ordering::SeqCst);
        }
        Ok(())
    });

    // Let traffic flow, then pause.
    let deadline = Instant::now() + T;
    while (written.load(Ordering::SeqCst) < first_part || read.load(Ordering::SeqCst) < 2 * MIB)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(10));
    }
    rig.ok(rig.vm().stop(), "QMP stop");
    let before = written.load(Ordering::SeqCst);
    let _ = stopped_tx.send(());
    thread::sleep(Duration::from_millis(1500));
    let during = written.load(Ordering::SeqCst);
    let status = rig.ok(
        rig.vm().qmp(r#"{"execute":"query-status"}"#),
        "QMP query-status",
    );
    eprintln!(
        "stopcont: {status}; host wrote {} KiB while the VM was stopped",
        (during - before) / 1024
    );
    if !rig.backend.is_running() {
        rig.fail("backend exited while the VM was stopped");
    }
    if during == before {
        rig.fail("the host could not write anything while the VM was stopped");
    }
    rig.ok(rig.vm().cont(), "QMP cont");

    // Both streams must finish; fail early when they stop moving.
    let mut last = (0, 0, Instant::now());
    while written.load(Ordering::SeqCst) < bytes || read.load(Ordering::SeqCst) < bytes {
        if writer.is_finished() && written.load(Ordering::SeqCst) < bytes {
            break;
        }
        if reader.is_finished() && read.load(Ordering::SeqCst) < bytes {
            break;
        }
        let now = (written.load(Ordering::SeqCst), read.load(Ordering::SeqCst));
        if now != (last.0, last.1) {
            last = (now.0, now.1, Instant::now());
        } else if last.2.elapsed() > Duration::from_secs(20) {
            let running = rig.backend.is_running();
            rig.fail(format!(
                "traffic stalled after cont: host wrote {} of {bytes}, read {} of {bytes}; \
                 backend {}",
                now.0,
                now.1,
                if running { "still running" } else { "exited" }
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
    if let Err(e) = writer.join().expect("writer thread") {
        rig.fail(format!("host to guest across stop/cont: {e}"));
    }
    if let Err(e) = reader.join().expect("reader thread") {
        rig.fail(format!("guest to host across stop/cont: {e}"));
    }
    rig.probe_ok(&tx_job, "guest sender across stop/cont");
    rig.probe_ok(&rx_job, "guest receiver across stop/cont");
    if !rig.backend.is_running() {
        rig.fail("backend exited after stop/cont");
    }
}

/// A new connection each way carries 1 MiB, verified.
fn fresh_connections_work(rig: &Rig, port: u32, seed: u64, what: &str) {
    let bytes = MIB;
    let l = rig.ok(HostListener::bind(rig.uds(), port), "bind host listener");
    let job = rig.probe(&format!("connect 2 {port} sendv {bytes} {seed}"));
    let s = rig.accept(&l, &format!("{what}: guest connection"));
    expect_stream(rig, &s, seed, bytes, &format!("{what}: guest to host"));
    drop(s);
    rig.probe_ok(&job, &format!("{what}: guest sender"));

    let job = rig.probe_listen(&format!("{} recvv {bytes} {}", port + 1, seed + 1));
    let s = rig.connect(port + 1);
    rig.ok(
        write_verified(&s, seed + 1, bytes),
        &format!("{what}: host to guest"),
    );
    drop(s);
    rig.probe_ok(&job, &format!("{what}: guest receiver"));
}

// 8. Guest driver unbind and bind (a device reset), then new connections
// work both ways.
#[test]
fn driver_unbind_and_bind() {
    let rig = Rig::new("rebind");
    fresh_connections_work(&rig, 6701, 81, "before unbind");
    let dev = rig.vsock_device();
    let drv = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport";
    rig.ok(
        rig.vm().sh_ok(&format!("echo {dev} > {drv}/unbind")),
        "driver unbind",
    );
    rig.ok(
        rig.vm().sh_ok(&format!("echo {dev} > {drv}/bind")),
        "driver bind",
    );
    let again = rig.vsock_device();
    assert_eq!(again, dev, "device after rebind");
    let cid = rig.ok(rig.vm().sh_ok("vsock-probe cid"), "CID after rebind");
    assert!(
        cid.contains(&format!("CID {CID}")),
        "CID after rebind: {cid}"
    );
    fresh_connections_work(&rig, 6711, 91, "after unbind and bind");
}

// 9. The VMM exits and a second QEMU connects to the same running backend.
#[test]
fn second_vmm_on_same_backend() {
    let mut rig = Rig::new("revmm");
    fresh_connections_work(&rig, 6801, 101, "first VM");
    let vm = rig.vm.take().expect("VM");
    rig.ok(vm.shutdown(), "first VM shutdown");
    thread::sleep(Duration::from_millis(200));
    if !rig.backend.is_running() {
        rig.fail("backend exited when the first VMM went away");
    }
    let image = GuestImage::get().unwrap();
    rig.boot(image);
    fresh_connections_work(&rig, 6811, 111, "second VM");
}

// 10. vsockd's worker is SIGKILLed while the guest is idle, again while
// the VM is paused: QEMU keeps its vhost-user session (the keeper holds
// it), logs no vhost error, and new connections work both ways after
// every kill.
#[test]
fn worker_killed_the_device_carries_on() {
    let rig = Rig::new("worker-kill");
    if rig.backend.kind() != vsockd_tests::BackendKind::Vsockd {
        eprintln!("{}: SKIPPED: only vsockd has a keeper", rig.name);
        return;
    }
    fresh_connections_work(&rig, 6901, 121, "before the kills");
    for i in 0..3u32 {
        rig.ok(
            rig.backend.kill_worker(Duration::from_secs(10)),
            &format!("kill #{i}"),
        );
        fresh_connections_work(
            &rig,
            6911 + 10 * i,
            131 + 10 * u64::from(i),
            &format!("after kill #{i}"),
        );
    }
    rig.ok(rig.vm().stop(), "QEMU stop");
    rig.ok(
        rig.backend.kill_worker(Duration::from_secs(10)),
        "kill while paused",
    );
    rig.ok(rig.vm().cont(), "QEMU cont");
    fresh_connections_work(&rig, 6961, 171, "after a kill during a pause");
    rig.no_vhost_errors_in_qemu_log();
}

/// The traffic of the QEMU tests that repeat an event on a running
/// backend (a worker kill, a live upgrade) while a real guest moves
/// verified streams: 8 long connections (4 opened by the guest to a host
/// listener, 4 by host clients through `CONNECT`, all raw host streams)
/// carry a stream each way for the whole run, and in every round a new
/// connection each way opens after the event before (the guest opens its
/// next one when the host half-closes the last), carries a stream each
/// way through the round's event, and closes; a last round follows the
/// last event. One event in ten runs inside a VM stop and resume. Every
/// connection is a guest `chaos` stream with [`host_chaos`] on the host
/// side.
///
/// An event during either set-up of a round's connections must cost
/// nothing: the host client gets its `OK` once (`host_chaos` counts a
/// second one as repeated bytes), and the host service sees the guest's
/// connect once (a connection ending before any byte would be the first
/// of a connect made twice); [`Churn::run`] fails on either.
struct Churn<'r> {
    rig: &'r Rig,
    /// Rounds with an event; a last round without one follows.
    events: u32,
    /// Draws each round's delay; its seed is printed, to replay a run.
    rng: Rng,
    long_g: Group,
    long_h: Group,
    churn_g: Group,
    churn_h: Group,
    /// The guest's side of every group, named.
    guest_jobs: [(GuestJob, &'static str); 4],
    long_g_listener: HostListener,
    churn_g_listener: HostListener,
}

/// A group of a [`Churn`]'s streams: the port they connect to, and the
/// first of the seeds the guest sends in them.
#[derive(Debug, Clone, Copy)]
struct Group {
    port: u32,
    seed: u64,
}

/// A round of [`Churn::run`], as its event sees it.
struct Round<'a> {
    /// From 0.
    k: u32,
    /// `round K`, to begin messages with.
    what: &'a str,
    /// The VM is stopped around this round's event.
    paused: bool,
}

/// The connections of a [`Churn`], after [`Churn::finish`].
struct Churned {
    /// Host sides, paired or not.
    host_sides: usize,
    /// (what, the host side, the guest's `RESULT`) for every connection
    /// paired.
    connections: Vec<(String, HostChaos, ResultLine)>,
    /// Host sides without a guest result.
    problems: Vec<String>,
    /// Errors and resets the guest saw.
    resets: u32,
}

/// Ends every stream of a [`Churn::run`] when it leaves its scope, also
/// when it fails there (the scope waits for their threads).
struct StopOnDrop<'a>(&'a AtomicBool, &'a [AtomicBool]);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        for done in self.1 {
            done.store(true, Ordering::Relaxed);
        }
    }
}

impl<'r> Churn<'r> {
    /// Long connections opened from each side.
    const LONG: u64 = 4;
    /// Every this many events, one runs inside a VM stop and resume.
    const PAUSE_EVERY: u32 = 10;
    /// The guest probes run for the whole test.
    const PROBE_TIMEOUT_SECS: u64 = 900;

    /// How many events a test runs: `var` from the environment, else
    /// `default`.
    fn events_from_env(var: &str, default: u32) -> u32 {
        let events = std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default);
        assert!(
            events < 0xff,
            "seed ranges hold fewer than 256 short connections"
        );
        events
    }

    /// A rig whose backend logs at `VSOCKD_CHAOS_LOG` (default info), or
    /// `None` when the backend is not vsockd (the test is skipped, for the
    /// reason `skip`).
    fn rig(name: &str, skip: &str) -> Option<Rig> {
        let level = std::env::var("VSOCKD_CHAOS_LOG").unwrap_or_else(|_| "info".into());
        let rig = Rig::with_log_level(name, Some(&level));
        if rig.backend.kind() != BackendKind::Vsockd {
            eprintln!("{}: SKIPPED: {skip}", rig.name);
            return None;
        }
        Some(rig)
    }

    /// Starts `vsock-probe ARGS` in the guest, to run for the whole test.
    fn probe(rig: &Rig, args: &str) -> GuestJob {
        let cmd = format!("vsock-probe --timeout {} {args}", Self::PROBE_TIMEOUT_SECS);
        rig.ok(rig.vm().spawn(&cmd), &format!("starting {cmd:?}"))
    }

    /// [`Churn::probe`] of `listen ARGS`, once it listens.
    fn probe_listen(rig: &Rig, args: &str) -> GuestJob {
        let job = Self::probe(rig, &format!("listen {args}"));
        rig.ok(job.wait_for_output("LISTENING", T), "guest listener");
        job
    }

    /// Starts the guest's side of every connection and the host
    /// listeners. Ports `port..port + 4` serve the long connections from
    /// the guest, those from the host, the short ones from the guest and
    /// those from the host; the guest's streams in them start at seeds
    /// `seed`, `seed + 0x100`, `seed + 0x200` and `seed + 0x400`.
    fn start(rig: &'r Rig, events: u32, port: u32, seed: u64) -> Churn<'r> {
        let rng = Rng::from_clock();
        eprintln!("{}: random seed {}", rig.name, rng.seed());
        let group = |i: u32, seeds: u64| Group {
            port: port + i,
            seed: seed + seeds,
        };
        let (long_g, long_h) = (group(0, 0), group(1, 0x100));
        let (churn_g, churn_h) = (group(2, 0x200), group(3, 0x400));
        let (long, churns) = (Self::LONG, u64::from(events) + 1);
        let listen = |g: Group, n: u64| {
            let args = format!("{} --count {n} --seed-step 1 chaos {}", g.port, g.seed);
            Self::probe_listen(rig, &args)
        };
        let connect = |g: Group, how: String| {
            Self::probe(rig, &format!("connect 2 {} {how} chaos {}", g.port, g.seed))
        };
        let long_h_job = listen(long_h, long);
        let churn_h_job = listen(churn_h, churns);
        let long_g_listener = rig.ok(HostListener::bind(rig.uds(), long_g.port), "bind");
        let churn_g_listener = rig.ok(HostListener::bind(rig.uds(), churn_g.port), "bind");
        let long_g_job = connect(long_g, format!("--parallel {long}"));
        let churn_g_job = connect(churn_g, format!("--repeat {churns}"));
        let guest_jobs = [
            (long_g_job, "long connections from the guest"),
            (long_h_job, "long connections from the host"),
            (churn_g_job, "short connections from the guest"),
            (churn_h_job, "short connections from the host"),
        ];
        Churn {
            rig,
            events,
            rng,
            long_g,
            long_h,
            churn_g,
            churn_h,
            guest_jobs,
            long_g_listener,
            churn_g_listener,
        }
    }

    /// A host client's `CONNECT` to guest port `port`: the stream and the
    /// `OK` line it read.
    fn connect(rig: &Rig, port: u32, what: &str) -> (UnixStream, String) {
        let (s, local) = rig.ok(hybrid_connect_timeout(rig.uds(), port, T), what);
        s.set_read_timeout(Some(T)).unwrap();
        s.set_write_timeout(Some(T)).unwrap();
        (s, format!("OK {local}\n"))
    }

    /// Short connections each way: one a round.
    fn churns(&self) -> u64 {
        u64::from(self.events) + 1
    }

    /// Short connections, from both sides.
    fn short_connections(&self) -> u32 {
        2 * self.churns() as u32
    }

    /// Runs every round: once the round's new connections have started,
    /// a wait of `delay_ms(rng)`, then (in all but the last round)
    /// `event`, within a VM stop and resume when the round says so. Then
    /// the long streams end. Returns the host side of every connection,
    /// named.
    fn run(
        &mut self,
        mut delay_ms: impl FnMut(&mut Rng) -> u64,
        mut event: impl FnMut(Round<'_>),
    ) -> Vec<(String, HostChaos)> {
        let rig = self.rig;
        let (long, churns) = (Self::LONG, self.churns());
        let (long_g, long_h, churn_g, churn_h) =
            (self.long_g, self.long_h, self.churn_g, self.churn_h);
        let (long_g_listener, churn_g_listener) = (&self.long_g_listener, &self.churn_g_listener);
        let stop = AtomicBool::new(false);
        let round_done: Vec<AtomicBool> = (0..churns).map(|_| AtomicBool::new(false)).collect();
        // (what, the host side of a connection) for every connection.
        let mut host_sides: Vec<(String, HostChaos)> = Vec::new();
        thread::scope(|sc| {
            let _stop_on_drop = StopOnDrop(&stop, &round_done);
            let stop = &stop;
            let mut long_threads = Vec::new();
            for i in 0..long {
                let s = rig.accept(long_g_listener, &format!("long guest connection {i}"));
                long_threads.push(
                    sc.spawn(move || {
                        host_chaos(&s, long_g.seed, long, None, SendUntil::Flag(stop))
                    }),
                );
            }
            for _ in 0..long {
                let (s, line) = Self::connect(rig, long_h.port, "long host connection");
                long_threads.push(sc.spawn(move || {
                    host_chaos(&s, long_h.seed, long, Some(&line), SendUntil::Flag(stop))
                }));
            }

            for k in 0..=self.events {
                let what = format!("round {k}");
                // This round's new connections send until its event is
                // over.
                let done = &round_done[k as usize];
                let from_host = sc.spawn(|| {
                    let (s, line) = Self::connect(rig, churn_h.port, "short host CONNECT");
                    let until = SendUntil::Flag(done);
                    match host_chaos(&s, churn_h.seed, churns, Some(&line), until) {
                        Ok(Some(c)) => c,
                        Ok(None) => rig.fail("a short host connection ended before any byte"),
                        Err(e) => rig.fail(format!("short host connection: {e}")),
                    }
                });
                let from_guest = sc.spawn(|| {
                    let s = rig.accept(churn_g_listener, "short guest connection");
                    let until = SendUntil::Flag(done);
                    match host_chaos(&s, churn_g.seed, churns, None, until) {
                        Ok(Some(c)) => c,
                        Ok(None) => rig.fail(
                            "a short guest connection ended before any byte: its connect \
                             reached the host service twice",
                        ),
                        Err(e) => rig.fail(format!("short guest connection: {e}")),
                    }
                });
                thread::sleep(Duration::from_millis(delay_ms(&mut self.rng)));
                if k < self.events {
                    let paused = k % Self::PAUSE_EVERY == Self::PAUSE_EVERY - 1;
                    if paused {
                        rig.ok(rig.vm().stop(), &format!("{what}: QEMU stop"));
                        thread::sleep(Duration::from_millis(self.rng.below(50)));
                    }
                    event(Round {
                        k,
                        what: &what,
                        paused,
                    });
                    if paused {
                        rig.ok(rig.vm().cont(), &format!("{what}: QEMU cont"));
                    }
                }
                done.store(true, Ordering::Relaxed);
                for (dir, t) in [("host", from_host), ("guest", from_guest)] {
                    let c = t.join().expect("short connection thread");
                    host_sides.push((format!("{what}: short connection from the {dir}"), c));
                }
            }
            stop.store(true, Ordering::Relaxed);
            for (i, t) in long_threads.into_iter().enumerate() {
                let side = if (i as u64) < long { "guest" } else { "host" };
                let what = format!("long connection {i} from the {side}");
                match rig.ok(t.join().expect("long connection thread"), &what) {
                    Some(c) => host_sides.push((what, c)),
                    None => rig.fail(format!("long connection {i} ended before any byte")),
                }
            }
        });
        host_sides
    }

    /// Waits for the guest's side of every connection, and for the
    /// `extra` probes: each must exit 0 with every result free of error
    /// and reset (else `on_error` hears the count so far, and the test
    /// fails). Then pairs every host side with its guest result.
    fn finish(
        self,
        host_sides: Vec<(String, HostChaos)>,
        extra: &[(&GuestJob, &str)],
        on_error: impl FnOnce(u32),
    ) -> Churned {
        let rig = self.rig;
        let mut guest_sides: Vec<ResultLine> = Vec::new();
        let mut resets = 0u32;
        let ours = self.guest_jobs.iter().map(|(job, what)| (job, *what));
        for (job, what) in ours.chain(extra.iter().copied()) {
            let out = rig.ok(job.wait(T), what);
            let results = parse_results(&out.output);
            for r in &results {
                if r.kind != "RESULT" || r.get("errno") != Some("-") {
                    resets += 1;
                }
            }
            if out.status != 0 || resets > 0 {
                on_error(resets);
                rig.fail(format!(
                    "{what}: the guest saw an error (exit {}):\n{}",
                    out.status, out.output
                ));
            }
            guest_sides.extend(results.into_iter().filter(|r| r.get("seed").is_some()));
        }
        let expected = 2 * (Self::LONG + self.churns()) as usize;
        if guest_sides.len() != expected || host_sides.len() != expected {
            rig.fail(format!(
                "{} guest results and {} host sides for {expected} connections",
                guest_sides.len(),
                host_sides.len()
            ));
        }
        let mut connections = Vec::new();
        let mut problems = Vec::new();
        let count = host_sides.len();
        for (what, host) in host_sides {
            match guest_sides
                .iter()
                .find(|g| g.num("seed") == Some(host.seed as i64))
            {
                Some(g) => connections.push((what, host, g.clone())),
                None => problems.push(format!(
                    "{what}: no guest result for stream {:#x}",
                    host.seed
                )),
            }
        }
        Churned {
            host_sides: count,
            connections,
            problems,
            resets,
        }
    }
}

// 11. Chaos with a real guest: the worker is SIGKILLed at random instants
// (30 times, or `VSOCKD_QEMU_CHAOS_KILLS`) during a `Churn`'s traffic,
// one kill in ten inside a VM stop and resume. Passes when QEMU logs no
// vhost error, the guest sees no reset, every stream arrives complete and
// in order apart from the chunk a kill may drop or repeat on a raw host
// stream (DESIGN.md, "Commit points"; counted here, and at most one chunk
// per kill), and every new connection works, with no handshake lost or
// made twice.
#[test]
fn chaos_worker_killed_30_times_with_a_real_guest() {
    use vsockd_tests::chaos::{percentile, publish_report, ChaosReport};

    /// Longest random wait between starting a round's short connections
    /// and its kill.
    const KILL_DELAY_MAX_MS: u64 = 250;
    /// Largest chunk a kill may drop or repeat: one RX read of 16 buffers
    /// of 4 KiB toward the guest; one write of what the guest may send
    /// within its credit (vsockd's default buf_alloc) toward the host.
    const CHUNK_TO_GUEST_BYTES: u64 = 64 * 1024;
    const CHUNK_TO_HOST_BYTES: u64 = MIB;
    /// The churn's first port and seed (see `Churn::start`).
    const PORT: u32 = 7101;
    const SEED: u64 = 0x7000;
    const PING_PORT: u32 = 7105;

    let kills = Churn::events_from_env("VSOCKD_QEMU_CHAOS_KILLS", 30);
    let Some(rig) = Churn::rig("qemu-chaos", "only vsockd has a keeper") else {
        return;
    };
    let rig = &rig;
    let mut churn = Churn::start(rig, kills, PORT, SEED);
    let ping_job = Churn::probe_listen(rig, &format!("{PING_PORT} echo"));
    let ping = rig.connect(PING_PORT);
    // Sends `byte` and reads its echo. The echo of the ping before may
    // come again first: its write to the host is the chunk a kill before
    // the worker's record of it repeats. Returns the bytes repeated.
    let echo_once = |s: &UnixStream, byte: u8, what: &str| -> u64 {
        let mut echo = [0u8; 1];
        let mut repeated = 0;
        rig.ok((&*s).write_all(&[byte]), &format!("{what}: ping"));
        loop {
            rig.ok((&*s).read_exact(&mut echo), &format!("{what}: echo"));
            match echo[0] {
                b if b == byte => return repeated,
                b if b == byte.wrapping_sub(1) && repeated == 0 => repeated = 1,
                b => rig.fail(format!("{what}: echo {b} for ping {byte}")),
            }
        }
    };
    let mut ping_repeated = 0u64;
    let mut ping_rtt = Vec::new();
    let mut report = ChaosReport::default();

    let host_sides = churn.run(
        |rng| rng.below(KILL_DELAY_MAX_MS),
        |Round { k, what, paused }| {
            if paused {
                rig.ok(
                    rig.backend.kill_worker(T),
                    &format!("{what}: kill in a pause"),
                );
            } else {
                // Kill to the first packet served, and back: one byte
                // through the guest's echo. The same round trip just
                // before the kill tells what of it the kill added.
                let t0 = Instant::now();
                ping_repeated += echo_once(&ping, 2 * k as u8, what);
                ping_rtt.push(t0.elapsed());
                let t0 = Instant::now();
                rig.ok(rig.backend.kill_worker(T), &format!("{what}: kill"));
                ping_repeated += echo_once(&ping, 2 * k as u8 + 1, what);
                report.recovery.push(t0.elapsed());
            }
        },
    );
    report.kills = kills;
    report.connections_churned = churn.short_connections();
    rig.ok(
        ping.shutdown(Shutdown::Write),
        "closing the ping connection",
    );
    let churned = churn.finish(host_sides, &[(&ping_job, "echo")], |resets| {
        report.resets = resets;
        eprintln!("{}: {report}", rig.name);
    });
    report.resets = churned.resets;

    // Each connection both ways: complete, in order, gaps bounded.
    let (mut to_guest, mut to_host) = (0u64, 0u64);
    let mut problems = churned.problems;
    for (what, h, g) in &churned.connections {
        let num = |k: &str| g.num(k).unwrap_or(-1);
        // Guest to host.
        let c = &h.check;
        if c.corrupt || c.offset() as i64 != num("sent") {
            problems.push(format!(
                "{what}: guest to host: the guest sent {} bytes, the host's stream reaches {} (corrupt {})",
                num("sent"),
                c.offset(),
                c.corrupt
            ));
        }
        for gap in &c.gaps {
            let n = match gap {
                Gap::Lost { n, .. } | Gap::Duplicated { n, .. } => *n,
            };
            if n > CHUNK_TO_HOST_BYTES {
                problems.push(format!("{what}: guest to host: {gap:?} exceeds one chunk"));
            }
        }
        to_host += c.lost() + c.duplicated();
        report.bytes_lost += c.lost();
        report.bytes_duplicated += c.duplicated();
        report.gaps += c.gaps.len() as u32;
        report.bytes_verified += c.offset();
        // Host to guest, as the guest's probe reported it.
        if g.get("corrupt") != Some("no") || num("offset") != h.sent as i64 {
            problems.push(format!(
                "{what}: host to guest: the host sent {} bytes, the guest's stream reaches {} (corrupt {:?})",
                h.sent,
                num("offset"),
                g.get("corrupt")
            ));
        }
        let (lost, dup, gaps) = (num("lost"), num("dup"), num("gaps"));
        if lost < 0
            || dup < 0
            || gaps < 0
            || (lost + dup) as u64 > gaps as u64 * CHUNK_TO_GUEST_BYTES
        {
            problems.push(format!(
                "{what}: host to guest: {gaps} gaps of {lost} lost, {dup} repeated bytes"
            ));
        }
        to_guest += (lost + dup).max(0) as u64;
        report.bytes_lost += lost.max(0) as u64;
        report.bytes_duplicated += dup.max(0) as u64;
        report.gaps += gaps.max(0) as u32;
        report.bytes_verified += num("offset").max(0) as u64;
    }
    to_host += ping_repeated;
    report.bytes_duplicated += ping_repeated;
    report.gaps += ping_repeated as u32;
    ping_rtt.sort();
    publish_report(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "chaos, QEMU guest",
        &format!(
            "{report}; recovery is kill to an echo through the guest, whose round trip \
             without a kill took p50 {:.1} ms, max {:.1} ms",
            percentile(&ping_rtt, 0.5).as_secs_f64() * 1e3,
            ping_rtt.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        ),
    );
    if to_guest > u64::from(kills) * CHUNK_TO_GUEST_BYTES {
        problems.push(format!(
            "{to_guest} bytes toward the guest lost or repeated in {kills} kills"
        ));
    }
    if to_host > u64::from(kills) * CHUNK_TO_HOST_BYTES {
        problems.push(format!(
            "{to_host} bytes toward the host lost or repeated in {kills} kills"
        ));
    }
    if !problems.is_empty() {
        rig.fail(problems.join("\n"));
    }
    rig.no_vhost_errors_in_qemu_log();

    // `vsockd status` tells the same story: every kill a restart.
    let out = rig.ok(rig.backend.status(false), "vsockd status");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(": "))
            .unwrap_or("<missing>")
    };
    let restarts: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("restarts.") && !l.starts_with("restarts.total"))
        .collect();
    let gen = (kills + 1).to_string();
    if !out.status.success()
        || field("worker.generation") != gen
        || field("restarts.total") != kills.to_string()
        || field("frontend.connected") != "true"
        || restarts.is_empty()
        || !restarts.iter().all(|l| l.contains("SIGKILL"))
        || field("queues.tx.used_idx").parse::<u16>().is_err()
    {
        rig.fail(format!(
            "vsockd status after {kills} kills (exit {}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
}

/// The fields of a `key: value` answer (`vsockd status`, `vsockd
/// upgrade`).
fn answer_fields(text: &str) -> std::collections::BTreeMap<&str, &str> {
    text.lines().filter_map(|l| l.split_once(": ")).collect()
}

/// Live upgrades with a real guest: `vsockd upgrade` 20 times (or
/// `VSOCKD_QEMU_UPGRADES`) at random instants during a [`Churn`]'s
/// traffic, one upgrade in ten inside a VM stop and resume, half the
/// upgrades within 10 ms of the round's new connections, to catch their
/// set-ups. Passes when every upgrade succeeds, reports its pause and
/// hands over to the next worker generation; every stream, each way,
/// arrives complete with no byte lost, repeated or corrupt (unlike a
/// kill, an upgrade must cost nothing, not even one chunk of a raw host
/// stream); neither the guest nor the host sees an error or a reset; every
/// host client gets its `OK` once and every guest connect reaches its host
/// service once; QEMU logs no vhost error; and `vsockd status` counts no
/// worker restart.
#[test]
fn upgrades_20_times_during_verified_transfers_with_a_real_guest() {
    use vsockd_tests::chaos::{percentile, publish_report};

    /// Longest random wait between starting a round's short connections
    /// and its upgrade.
    const UPGRADE_DELAY_MAX_MS: u64 = 250;
    /// The same for the half of the upgrades that come at once.
    const SETUP_DELAY_MAX_MS: u64 = 10;
    /// The churn's first port and seed (see `Churn::start`).
    const PORT: u32 = 7201;
    const SEED: u64 = 0x8000;

    let upgrades = Churn::events_from_env("VSOCKD_QEMU_UPGRADES", 20);
    let Some(rig) = Churn::rig("qemu-upgrade", "only vsockd with its keeper upgrades") else {
        return;
    };
    let rig = &rig;
    let mut churn = Churn::start(rig, upgrades, PORT, SEED);

    // Runs one `vsockd upgrade`: the pause it reports. Worker generation
    // `generation` must serve after it.
    let upgrade = |generation: u32, what: &str| -> Duration {
        let out = rig.ok(
            rig.backend.upgrade(),
            &format!("{what}: run vsockd upgrade"),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            rig.fail(format!(
                "{what}: vsockd upgrade failed ({}): {}{stdout}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let fields = answer_fields(&stdout);
        let worker = fields.get("worker").copied().unwrap_or("<missing>");
        if !worker.ends_with(&format!(", generation {generation})")) {
            rig.fail(format!(
                "{what}: the upgrade answered worker {worker:?}, not generation {generation}:\n{stdout}"
            ));
        }
        let pause = fields
            .get("pause")
            .and_then(|p| p.strip_suffix(" ms"))
            .and_then(|ms| ms.parse::<f64>().ok())
            .unwrap_or_else(|| rig.fail(format!("{what}: no pause in the answer:\n{stdout}")));
        Duration::from_secs_f64(pause / 1e3)
    };
    let mut pauses = Vec::new();

    let host_sides = churn.run(
        // Half the upgrades come at once, to catch the round's
        // connections in their set-up.
        |rng| {
            let delay_max = if rng.below(2) == 0 {
                SETUP_DELAY_MAX_MS
            } else {
                UPGRADE_DELAY_MAX_MS
            };
            rng.below(delay_max)
        },
        |Round { k, what, paused }| {
            // The first worker is generation 1; each upgrade's standby
            // takes the next.
            let generation = k + 2;
            if paused {
                pauses.push(upgrade(generation, &format!("{what}: upgrade in a pause")));
            } else {
                pauses.push(upgrade(generation, what));
            }
        },
    );
    let churned = churn.finish(host_sides, &[], |_| {});

    // Each connection both ways: complete, in order, not a byte lost or
    // repeated.
    let (mut verified, mut lost, mut repeated) = (0u64, 0u64, 0u64);
    let mut problems = churned.problems;
    for (what, h, g) in &churned.connections {
        let num = |k: &str| g.num(k).unwrap_or(-1);
        // Guest to host.
        let c = &h.check;
        if c.corrupt || !c.gaps.is_empty() || c.offset() as i64 != num("sent") {
            problems.push(format!(
                "{what}: guest to host: the guest sent {} bytes, the host's stream reaches {} \
                 with gaps {:?} (corrupt {})",
                num("sent"),
                c.offset(),
                c.gaps,
                c.corrupt
            ));
        }
        lost += c.lost();
        repeated += c.duplicated();
        verified += c.offset();
        // Host to guest, as the guest's probe reported it.
        let sent = h.sent as i64;
        if g.get("corrupt") != Some("no")
            || num("offset") != sent
            || num("received") != sent
            || num("gaps") != 0
        {
            problems.push(format!(
                "{what}: host to guest: the host sent {} bytes, the guest received {} reaching \
                 {} with {} gaps of {} lost, {} repeated bytes (corrupt {:?})",
                h.sent,
                num("received"),
                num("offset"),
                num("gaps"),
                num("lost"),
                num("dup"),
                g.get("corrupt")
            ));
        }
        lost += num("lost").max(0) as u64;
        repeated += num("dup").max(0) as u64;
        verified += num("offset").max(0) as u64;
    }
    pauses.sort();
    publish_report(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "upgrade, QEMU guest",
        &format!(
            "upgrades {} | bytes verified {verified} on {} connections | bytes lost {lost} | \
             bytes repeated {repeated} | resets seen by the guest {} | pause (quiesce \
             to ready) p50 {:.1} ms, max {:.1} ms",
            pauses.len(),
            churned.host_sides,
            churned.resets,
            percentile(&pauses, 0.5).as_secs_f64() * 1e3,
            pauses.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        ),
    );
    if !problems.is_empty() {
        rig.fail(problems.join("\n"));
    }
    rig.no_vhost_errors_in_qemu_log();

    // `vsockd status`: the last upgrade's worker serves, and an upgrade is
    // not a restart.
    let out = rig.ok(rig.backend.status(false), "vsockd status");
    let text = String::from_utf8_lossy(&out.stdout);
    let fields = answer_fields(&text);
    let field = |k: &str| fields.get(k).copied().unwrap_or("<missing>");
    if !out.status.success()
        || field("restarts.total") != "0"
        || field("worker.generation") != (upgrades + 1).to_string()
        || field("frontend.connected") != "true"
    {
        rig.fail(format!(
            "vsockd status after {upgrades} upgrades (exit {}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
}

// 13. Resumable host sessions with a real guest: the worker killed 30
// times during verified transfers, and the host client process itself
// killed and started again 10 times mid-transfer.

/// Session options for the guest tests: patient reattachment (a restart
/// under TCG takes a while), quick retries.
fn session_opts() -> vsockd_client::Options {
    vsockd_client::Options {
        reattach_timeout: Duration::from_secs(60),
        retry_interval: Duration::from_millis(5),
        ..vsockd_client::Options::default()
    }
}

/// What one direction of a session carried, as its reader checked it.
fn session_check_line(
    what: &str,
    c: &vsockd_tests::chaos::StreamCheck,
    written: u64,
) -> Option<String> {
    let exact = !c.corrupt
        && c.offset() == written
        && c.lost() == 0
        && c.duplicated() == 0
        && c.gaps.is_empty();
    (!exact).then(|| {
        format!(
            "{what}: wrote {written}, read up to {}, lost {}, repeated {}, gaps {:?}, corrupt {}",
            c.offset(),
            c.lost(),
            c.duplicated(),
            c.gaps,
            c.corrupt
        )
    })
}

#[test]
fn resumable_sessions_exact_across_30_worker_kills_with_a_real_guest() {
    use vsockd_client::Session;
    use vsockd_tests::chaos::{publish_report, StreamCheck};

    const SESSIONS: u64 = 4;
    const PORT: u32 = 7301;
    const SEED: u64 = 0x9000;
    /// Every this many kills, one lands inside a QEMU stop and cont.
    const PAUSE_EVERY: u32 = 10;
    let kills = Churn::events_from_env("VSOCKD_QEMU_RESUMABLE_KILLS", 30);
    let Some(rig) = Churn::rig(
        "qemu-resumable-kills",
        "only vsockd has resumable sessions and a keeper",
    ) else {
        return;
    };
    let rig = &rig;
    let mut rng = Rng::from_clock();
    eprintln!("{}: random seed {}", rig.name, rng.seed());
    // Each guest connection sends its seed's stream until the host ends
    // its own, and checks what it receives (reporting any gap).
    let guest = Churn::probe_listen(
        rig,
        &format!("{PORT} --count {SESSIONS} --seed-step 1 chaos {SEED}"),
    );
    let sessions: Vec<Session> = (0..SESSIONS)
        .map(|i| {
            rig.ok(
                Session::connect(rig.uds(), PORT, session_opts()),
                &format!("session {i}: resumable CONNECT"),
            )
        })
        .collect();
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let results = thread::scope(|sc| {
        let flows: Vec<_> = sessions
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let seed = SEED + i as u64;
                let stop = &stop;
                let writer = sc.spawn(move || -> std::io::Result<u64> {
                    let mut buf = vec![0u8; 32 * 1024];
                    let mut at = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        pattern::fill(reply_seed(seed), at, &mut buf);
                        (&*s).write_all(&buf)?;
                        at += buf.len() as u64;
                    }
                    s.shutdown_write().map_err(std::io::Error::other)?;
                    Ok(at)
                });
                let reader = sc.spawn(move || -> std::io::Result<StreamCheck> {
                    let mut c = StreamCheck::new(seed);
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match (&*s).read(&mut buf)? {
                            0 => return Ok(c),
                            n => c.feed(&buf[..n]),
                        }
                    }
                });
                (i, writer, reader)
            })
            .collect();
        for k in 0..kills {
            thread::sleep(Duration::from_millis(30 + rng.below(200)));
            if k % PAUSE_EVERY == PAUSE_EVERY - 1 {
                rig.ok(rig.vm().stop(), &format!("QEMU stop around kill #{k}"));
                rig.ok(
                    rig.backend.kill_worker(Duration::from_secs(10)),
                    &format!("kill #{k} in a pause"),
                );
                rig.ok(rig.vm().cont(), &format!("QEMU cont after kill #{k}"));
            } else {
                rig.ok(rig.backend.kill_worker_now(T), &format!("kill #{k}"));
            }
        }
        stop.store(true, Ordering::Relaxed);
        flows
            .into_iter()
            .map(|(i, w, r)| {
                (
                    i,
                    w.join().expect("session writer"),
                    r.join().expect("session reader"),
                )
            })
            .collect::<Vec<_>>()
    });
    let out = rig.ok(guest.wait(T), "guest probe");
    let guest_sides = parse_results(&out.output);
    let mut problems = Vec::new();
    if out.status != 0 {
        problems.push(format!(
            "the guest probe exited {}:\n{}",
            out.status, out.output
        ));
    }
    let (mut verified, mut reattached) = (0u64, 0u64);
    let (mut lost, mut repeated) = (0u64, 0u64);
    for (i, written, check) in results {
        let seed = SEED + i as u64;
        let g = guest_sides
            .iter()
            .find(|r| r.kind == "RESULT" && r.num("seed") == Some(seed as i64));
        let Some(g) = g else {
            problems.push(format!("session {i}: no guest result for seed {seed:#x}"));
            continue;
        };
        if g.get("errno") != Some("-") {
            problems.push(format!("session {i}: the guest saw an error: {g:?}"));
        }
        // Guest to host: what the guest sent, exactly.
        let guest_sent = g.num("sent").unwrap_or(-1) as u64;
        match check {
            Ok(c) => {
                verified += c.offset();
                lost += c.lost();
                repeated += c.duplicated();
                problems.extend(session_check_line(
                    &format!("session {i} guest to host"),
                    &c,
                    guest_sent,
                ));
            }
            Err(e) => problems.push(format!("session {i} guest to host: read failed: {e}")),
        }
        // Host to guest: what the host wrote, exactly (the guest counts
        // gaps in `lost` and `dup`).
        match written {
            Ok(w) => {
                verified += w;
                let (received, g_lost, g_dup) = (g.num("received"), g.num("lost"), g.num("dup"));
                lost += g_lost.unwrap_or(0).max(0) as u64;
                repeated += g_dup.unwrap_or(0).max(0) as u64;
                if received != Some(w as i64) || g_lost != Some(0) || g_dup != Some(0) {
                    problems.push(format!(
                        "session {i} host to guest: wrote {w}, the guest reports received {received:?} lost {g_lost:?} repeated {g_dup:?}"
                    ));
                }
            }
            Err(e) => problems.push(format!("session {i} host to guest: write failed: {e}")),
        }
        reattached += sessions[i].reattach_count();
        if sessions[i].reattach_count() == 0 {
            problems.push(format!("session {i} never reattached across {kills} kills"));
        }
    }
    let report = format!(
        "kills {kills} | sessions {SESSIONS} | bytes verified {verified} | bytes lost {lost} | bytes repeated {repeated} | reattachments {reattached} | {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if !problems.is_empty() {
        rig.fail(format!("{report}\n{}", problems.join("\n")));
    }
    publish_report(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "resumable sessions, worker kills, QEMU guest",
        &report,
    );
    for s in sessions {
        rig.ok(s.close(), "close a finished session");
    }
    rig.no_vhost_errors_in_qemu_log();
}

#[test]
fn the_host_client_process_killed_10_times_resumes_with_a_real_guest() {
    const PORT: u32 = 7311;
    const SEED: u64 = 0x9100;
    const BYTES: u64 = 24 * MIB;
    const RESTARTS: u64 = 10;
    let Some(rig) = Churn::rig(
        "qemu-resumable-client-restarts",
        "only vsockd has resumable sessions",
    ) else {
        return;
    };
    let rig = &rig;
    let mut rng = Rng::from_clock();
    let state = rig.dir.join("session-peer.state");
    let progress = || -> Option<u64> {
        let text = std::fs::read_to_string(&state).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    };
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_session-peer"))
            .arg(rig.uds())
            .arg(PORT.to_string())
            .arg(&state)
            .args([SEED.to_string(), BYTES.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
    };
    // The guest sends its stream and checks the reply, exactly, to EOF.
    let guest = rig.probe_listen(&format!("{PORT} bidiv {BYTES} {SEED}"));
    let mut child = rig.ok(spawn(), "start session-peer");
    for k in 0..RESTARTS {
        let mark = (k + 1) * BYTES / (RESTARTS + 2);
        let waited = Instant::now();
        while progress().is_none_or(|r| r < mark) {
            if let Ok(Some(status)) = child.try_wait() {
                rig.fail(format!("session-peer exited ({status}) before kill #{k}"));
            }
            if waited.elapsed() > T {
                rig.fail(format!(
                    "session-peer stuck below offset {mark} before kill #{k}"
                ));
            }
            thread::sleep(Duration::from_millis(2));
        }
        thread::sleep(Duration::from_micros(rng.below(20_000)));
        rig.ok(child.kill(), "kill session-peer");
        rig.ok(child.wait(), "reap session-peer");
        child = rig.ok(spawn(), "restart session-peer");
    }
    let waited = Instant::now();
    let status = loop {
        if let Some(status) = rig.ok(child.try_wait(), "wait for session-peer") {
            break status;
        }
        if waited.elapsed() > T {
            let _ = child.kill();
            rig.fail("session-peer did not finish after its last restart");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if !status.success() || !out.starts_with("DONE") {
        rig.fail(format!(
            "session-peer after {RESTARTS} restarts: {status}: {out}"
        ));
    }
    rig.probe_ok(&guest, "guest side of the restarted client's session");
    eprintln!(
        "{}: {RESTARTS} restarts of the client process, {BYTES} bytes each way exact",
        rig.name
    );
    rig.no_vhost_errors_in_qemu_log();
}

#[test]
fn vsock_connect_bridges_stdin_and_stdout_across_worker_kills_with_a_real_guest() {
    const PORT: u32 = 7321;
    const SEED: u64 = 0x9200;
    const BYTES: u64 = 16 * MIB;
    const KILLS: u32 = 3;
    let Some(rig) = Churn::rig(
        "qemu-vsock-connect",
        "only vsockd has resumable sessions and a keeper",
    ) else {
        return;
    };
    let rig = &rig;
    // The guest sends SEED's stream and checks the reply, exactly, to EOF;
    // vsock-connect's stdin is the reply, its stdout what the guest sent.
    let input = rig.dir.join("stdin.bin");
    let mut reply = vec![0u8; BYTES as usize];
    pattern::fill(reply_seed(SEED), 0, &mut reply);
    rig.ok(
        std::fs::write(&input, &reply),
        "write vsock-connect's input",
    );
    let guest = rig.probe_listen(&format!("{PORT} bidiv {BYTES} {SEED}"));
    let tool = vsockd_tests::image::target_dir()
        .join("release")
        .join("vsock-connect");
    let mut child = rig.ok(
        std::process::Command::new(&tool)
            .arg("--resumable")
            .arg(rig.uds())
            .arg(PORT.to_string())
            .stdin(rig.ok(std::fs::File::open(&input), "open the input"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn(),
        &format!("start {}", tool.display()),
    );
    let mut stdout = child.stdout.take().expect("piped stdout");
    let output = thread::scope(|sc| {
        let reader = sc.spawn(move || {
            let mut v = Vec::new();
            stdout.read_to_end(&mut v).map(|_| v)
        });
        for k in 0..KILLS {
            thread::sleep(Duration::from_millis(150));
            rig.ok(rig.backend.kill_worker_now(T), &format!("kill #{k}"));
        }
        reader.join().expect("stdout reader")
    });
    let output = rig.ok(output, "read vsock-connect's output");
    let status = rig.ok(child.wait(), "wait for vsock-connect");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    if !status.success() {
        rig.fail(format!("vsock-connect: {status}: {stderr}"));
    }
    if output.len() as u64 != BYTES || pattern::check(SEED, 0, &output).is_some() {
        rig.fail(format!(
            "vsock-connect printed {} bytes, expected the guest's {BYTES}; first wrong byte at {:?}",
            output.len(),
            pattern::check(SEED, 0, &output)
        ));
    }
    rig.probe_ok(&guest, "guest side of vsock-connect's session");
    rig.no_vhost_errors_in_qemu_log();
}

#[test]
fn a_resumable_session_nobody_resumes_resets_the_guest_after_the_grace_period() {
    use vsockd_client::Session;
    const PORT: u32 = 7331;
    const SEED: u64 = 0x9300;
    let rig = Rig::with_args("qemu-resume-grace", None, &["--resume-grace", "2"]);
    if rig.backend.kind() != BackendKind::Vsockd {
        eprintln!("{}: SKIPPED: only vsockd has resumable sessions", rig.name);
        return;
    }
    // The guest waits for more bytes than the client sends: its read ends
    // only when the connection does.
    let guest = rig.probe_listen(&format!("{PORT} recvv {} {SEED}", 2 * MIB));
    let s = rig.ok(
        Session::connect(rig.uds(), PORT, session_opts()),
        "resumable CONNECT",
    );
    let mut half = vec![0u8; MIB as usize];
    pattern::fill(SEED, 0, &mut half);
    rig.ok((&s).write_all(&half), "session write");
    rig.ok(
        s.flush_acknowledged(T),
        "the guest has the first MiB (acknowledged)",
    );
    let token = s.token();
    let received = s.received();
    let left = Instant::now();
    // The client goes away; the guest's connection stays open for the
    // grace period, then it is reset.
    s.stop();
    let out = rig.ok(guest.wait(T), "guest probe");
    let waited = left.elapsed();
    let results = parse_results(&out.output);
    let r = results
        .iter()
        .find(|r| r.kind == "RESULT")
        .unwrap_or_else(|| rig.fail(format!("no guest result:\n{}", out.output)));
    // Linux ends the guest's read at the RST as at an end of stream (or
    // with ECONNRESET): either way, after exactly the first MiB.
    if r.num("received") != Some(MIB as i64) || r.get("ok") != Some("no") {
        rig.fail(format!(
            "the guest should have read 1 MiB, then its connection end: {}",
            out.output
        ));
    }
    if waited < Duration::from_millis(1900) {
        rig.fail(format!(
            "the guest was reset {waited:?} after its client left, before the 2 s grace period"
        ));
    }
    match Session::resume(rig.uds(), token, received, session_opts()) {
        Err(e) if e.to_string().contains("unknown or expired token") => {}
        other => rig.fail(format!(
            "resuming the expired session: {:?}",
            other.map(|s| s.token())
        )),
    }
    rig.no_vhost_errors_in_qemu_log();
}
