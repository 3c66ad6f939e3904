//! Tests over the virtual VMM: the backend under test
//! (`VSOCKD_E2E_BACKEND=vsockd|vsockd-no-keeper|peer`, default vsockd)
//! serves a virtio-vsock device whose VMM and guest driver are this
//! process, over real vhost-user and shared memory. No VM boots, so each test takes a fraction
//! of a second to a few seconds.
//!
//! Every stream is verified: bytes are generated from a seed and checked
//! at their offset on the receiving side (see `pattern`). Guest CID is 3;
//! host ports are the hybrid socket `<uds>` (CONNECT) and `<uds>_<port>`.
//!
//! Where the peer backend has a known bug that a scenario trips over, the
//! test says so and skips (the scenario or the one case) with
//! `VSOCKD_E2E_BACKEND=peer`. `driver_reset_when_both_rings_stopped_at_index_zero`
//! reproduces a vsockd bug and is ignored until it is fixed (run it with
//! `--ignored`). `VSOCKD_E2E_KEEP=1` keeps each test's directory and
//! backend log.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use vsockd_tests::backend::install_binary;
use vsockd_tests::chaos::{publish_report, Rng};
use vsockd_tests::hybrid::{
    hybrid_connect_timeout, read_ok_line, read_verified, read_verified_at, read_verified_from,
    write_verified, write_verified_at, HostListener, ReadReport,
};
use vsockd_tests::pattern::{self, reply_seed, Verifier};
use vsockd_tests::qemu::{keep_files, temp_dir};
use vsockd_tests::recovery::{wait_for_service, Recovery};
use vsockd_tests::vmm::packet::{
    Header, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH,
    TYPE_SEQPACKET,
};
use vsockd_tests::vmm::{
    ConnState, Link, RawDesc, TxLayout, VListener, VStream, VirtualVm, VmOptions, DESC_F_INDIRECT,
    RX, TX,
};
use vsockd_tests::{Backend, BackendKind};

mod resumable;
mod upgrade;

const CID: u32 = 3;
const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// Limit for any single wait.
const T: Duration = Duration::from_secs(20);

fn opts() -> VmOptions {
    VmOptions {
        io_timeout: Some(T),
        ..VmOptions::default()
    }
}

/// One backend and one virtual VM in a fresh directory.
struct Rig {
    name: String,
    // Field order: the VM goes before the backend.
    vm: Option<VirtualVm>,
    backend: Backend,
    dir: PathBuf,
}

impl Rig {
    fn new(name: &str) -> Rig {
        Rig::with(name, opts())
    }

    fn with(name: &str, o: VmOptions) -> Rig {
        Rig::with_log_level(name, o, None)
    }

    /// A rig whose backend logs at `level` (None: the default, debug):
    /// tests that time what they do want no per-packet logging.
    fn with_log_level(name: &str, o: VmOptions, level: Option<&str>) -> Rig {
        Rig::with_args(name, o, level, &[])
    }

    /// A rig whose backend gets `extra` arguments.
    fn with_args(name: &str, o: VmOptions, level: Option<&str>, extra: &[&str]) -> Rig {
        Rig::with_env(name, o, level, extra, &[])
    }

    /// A rig whose first worker kills itself at crash point `point`
    /// (`VSOCKD_CRASH_POINT`; see the device's `crash_point` module).
    fn with_crash_point(name: &str, point: &str) -> Rig {
        Rig::with_env(name, opts(), None, &[], &[("VSOCKD_CRASH_POINT", point)])
    }

    fn with_env(
        name: &str,
        o: VmOptions,
        level: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Rig {
        let kind = BackendKind::from_env().unwrap_or_else(|e| panic!("{name}: {e}"));
        Rig::start(name, o, |dir| {
            Backend::start_in_env(kind, dir, CID, level, extra, env)
        })
    }

    /// A rig whose backend, vsockd with its keeper, runs from a copy of
    /// the vsockd binary at `<dir>/bin/vsockd`, which the test may
    /// replace before an upgrade (see `Rig::install`).
    fn from_copy(name: &str, level: Option<&str>) -> Rig {
        Rig::start(name, opts(), |dir| {
            let bin = dir.join("bin").join("vsockd");
            install_binary(&BackendKind::Vsockd.binary(), &bin)?;
            Backend::start_from(&bin, dir, CID, level, &[])
        })
    }

    /// A rig with the backend `start` starts in the rig's directory.
    fn start(
        name: &str,
        o: VmOptions,
        start: impl FnOnce(&Path) -> vsockd_tests::error::Result<Backend>,
    ) -> Rig {
        let dir = temp_dir(&format!("vmm-{name}")).unwrap_or_else(|e| panic!("{e}"));
        let backend = start(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let vm = VirtualVm::start(backend.socket(), o).unwrap_or_else(|e| {
            panic!(
                "{:?}",
                backend.attach(format!("{name}: start: {e}").into_err())
            )
        });
        Rig {
            name: name.to_string(),
            vm: Some(vm),
            backend,
            dir,
        }
    }

    fn vm(&self) -> &VirtualVm {
        self.vm.as_ref().expect("no VM")
    }

    fn uds(&self) -> &Path {
        self.backend.uds()
    }

    fn is_peer(&self) -> bool {
        self.backend.kind() == BackendKind::Peer
    }

    /// True (and says why) when running against the peer, which has a
    /// known bug in what follows.
    fn skip_on_peer(&self, reason: &str) -> bool {
        if self.is_peer() {
            eprintln!("{}: SKIPPED with the peer backend: {reason}", self.name);
            true
        } else {
            false
        }
    }

    /// True (and says so) when the backend has no keeper: the tests that
    /// kill its worker need one.
    fn skip_without_keeper(&self) -> bool {
        if self.backend.kind().has_keeper() {
            return false;
        }
        eprintln!(
            "{}: SKIPPED with {}: no keeper, so a kill ends the device",
            self.name,
            self.backend.kind().name()
        );
        true
    }

    fn fail(&self, msg: impl std::fmt::Display) -> ! {
        let state = self.vm.as_ref().map(|v| v.describe()).unwrap_or_default();
        let e = format!(
            "{} [backend {}]: {msg}",
            self.name,
            self.backend.kind().name()
        )
        .into_err()
        .with_context("virtual VM", &state);
        panic!("{:?}", self.backend.attach(e))
    }

    fn ok<V, E: std::fmt::Display>(&self, r: Result<V, E>, what: &str) -> V {
        r.unwrap_or_else(|e| self.fail(format!("{what}: {e}")))
    }

    /// The device did nothing the driver found wrong, and the backend is
    /// alive.
    fn assert_clean(&mut self) {
        let mut a = self.vm().anomalies();
        if self.is_peer() {
            let all = a.len();
            a.retain(|m| !is_peer_empty_rx(m));
            if a.len() < all {
                eprintln!(
                    "{}: ignoring {} device anomalies from a known peer bug: {PEER_EMPTY_RX}",
                    self.name,
                    all - a.len()
                );
            }
        }
        if !a.is_empty() {
            self.fail(format!("device anomalies: {a:#?}"));
        }
        if !self.backend.is_running() {
            self.fail("the backend exited");
        }
    }

    /// A connected pair: guest-initiated (guest connects to `<uds>_port`)
    /// or host-initiated (host CONNECTs to a guest listener).
    fn pair(&self, port: u32, guest_initiated: bool) -> (VStream, UnixStream) {
        let vm = self.vm();
        let (g, h) = if guest_initiated {
            let hl = self.ok(HostListener::bind(self.uds(), port), "bind host listener");
            let g = self.ok(vm.connect(port), &format!("guest connect to {port}"));
            let h = self.ok(hl.accept_timeout(T), "host accept");
            (g, h)
        } else {
            let gl = self.ok(vm.listen(port), "guest listen");
            let (h, _) = self.ok(
                hybrid_connect_timeout(self.uds(), port, T),
                &format!("host CONNECT {port}"),
            );
            let g = self.ok(gl.accept(T), "guest accept");
            (g, h)
        };
        set_timeouts(&h);
        (g, h)
    }

    /// Checks that a connection still carries bytes both ways.
    fn check_pair(&self, g: &VStream, h: &UnixStream, seed: u64, what: &str) {
        let n = 3000;
        self.ok(guest_write(g, seed, 0, n), &format!("{what}: guest write"));
        let r = self.ok(
            read_verified(h, seed, Some(n)),
            &format!("{what}: host read"),
        );
        self.check_report(&r, n, false, &format!("{what}: guest to host"));
        self.ok(
            write_verified(h, reply_seed(seed), n),
            &format!("{what}: host write"),
        );
        let r = self.ok(
            guest_read(g, reply_seed(seed), 0, Some(n)),
            &format!("{what}: guest read"),
        );
        self.check_report(&r, n, false, &format!("{what}: host to guest"));
    }

    fn check_report(&self, r: &ReadReport, want: u64, eof: bool, what: &str) {
        if r.received != want || r.first_bad.is_some() || (eof && !r.eof) {
            self.fail(format!(
                "{what}: expected {want} bytes{}, got {r:?}",
                if eof { " then EOF" } else { "" }
            ));
        }
    }
}

const PEER_EMPTY_RX: &str = "vhost-device-vsock 0.3.0 returns an RX buffer as a 44-byte \
     packet without writing a header in it when an RX operation was queued for a connection \
     it has since removed (thread_backend.rs recv_pkt returns Ok for a missing connection), so \
     the guest reads whatever header the buffer held before";

/// Whether a device anomaly is the one `PEER_EMPTY_RX` describes.
fn is_peer_empty_rx(m: &str) -> bool {
    m.contains("but the used length 44 leaves 0 bytes")
        || m.starts_with("RX UNKNOWN from 0:0 to 0:0")
        || m == "RX packet of type 0"
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.vm = None;
        self.backend.stop();
        if !thread::panicking() && !keep_files() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("{}: files kept in {}", self.name, self.dir.display());
        }
    }
}

/// `Error` from a message (the harness type carries log tails).
trait IntoErr {
    fn into_err(self) -> vsockd_tests::Error;
}

impl IntoErr for String {
    fn into_err(self) -> vsockd_tests::Error {
        vsockd_tests::Error::new(self)
    }
}

fn set_timeouts(h: &UnixStream) {
    h.set_read_timeout(Some(T)).expect("read timeout");
    h.set_write_timeout(Some(T)).expect("write timeout");
}

/// Writes stream bytes `[offset, offset + bytes)` of `seed` from the guest.
fn guest_write(s: &VStream, seed: u64, offset: u64, bytes: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * KIB as usize];
    let mut k = offset;
    while k < offset + bytes {
        let n = ((offset + bytes - k) as usize).min(buf.len());
        pattern::fill(seed, k, &mut buf[..n]);
        s.write_all(&buf[..n])?;
        k += n as u64;
    }
    Ok(())
}

/// Reads in the guest until EOF or `limit` (counted from the stream's
/// start), verifying every byte.
fn guest_read(s: &VStream, seed: u64, offset: u64, limit: Option<u64>) -> io::Result<ReadReport> {
    guest_read_paced(s, seed, offset, limit, 64 * KIB as usize, None)
}

/// `guest_read` with reads of at most `chunk` bytes and a pause after each.
fn guest_read_paced(
    s: &VStream,
    seed: u64,
    offset: u64,
    limit: Option<u64>,
    chunk: usize,
    pause: Option<Duration>,
) -> io::Result<ReadReport> {
    read_verified_from(s, seed, offset, limit, chunk, pause)
}

/// Host reads with a pause after each chunk.
fn host_read_paced(
    mut h: &UnixStream,
    seed: u64,
    limit: u64,
    chunk: usize,
    pause: Duration,
) -> io::Result<ReadReport> {
    let mut v = Verifier::new(seed);
    let mut buf = vec![0u8; chunk];
    while v.received() < limit {
        let want = ((limit - v.received()) as usize).min(chunk);
        match h.read(&mut buf[..want])? {
            0 => break,
            n => v.feed(&buf[..n]),
        }
        thread::sleep(pause);
    }
    Ok(ReadReport {
        received: v.received(),
        first_bad: v.first_bad(),
        eof: false,
    })
}

/// Waits for EOF (or an error such as a reset) on a host socket; returns
/// what ended it.
fn host_wait_end(mut h: &UnixStream) -> io::Result<String> {
    let mut buf = [0u8; 4096];
    loop {
        match h.read(&mut buf) {
            Ok(0) => return Ok("EOF".into()),
            Ok(_) => continue,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return Err(e)
            }
            Err(e) => return Ok(format!("error {e}")),
        }
    }
}

// ----- handshake -----

#[test]
fn handshake_and_start_follow_qemu() {
    let mut rig = Rig::new("handshake");
    let vm = rig.vm();
    let n = vm.negotiated().expect("connected");
    assert_eq!(n.guest_cid, u64::from(CID), "GET_CONFIG guest CID");
    assert!(n.acked_features & (1 << 32) != 0, "VERSION_1 acked");
    assert!(n.acked_features & (1 << 30) != 0, "PROTOCOL_FEATURES acked");
    assert!(n.backend_queues.unwrap_or(0) >= 2, "GET_QUEUE_NUM: {n:?}");
    let reqs = vm.vhost_requests();
    let names: Vec<&str> = reqs
        .iter()
        .map(|r| r.split(' ').next().unwrap_or(""))
        .collect();
    let want = [
        "GET_FEATURES",
        "GET_PROTOCOL_FEATURES",
        "SET_PROTOCOL_FEATURES",
        "GET_QUEUE_NUM",
        "SET_OWNER",
        "GET_FEATURES",
        "GET_CONFIG",
        "SET_FEATURES",
        "SET_MEM_TABLE",
        "SET_VRING_NUM",
        "SET_VRING_BASE",
        "SET_VRING_ADDR",
        "SET_VRING_KICK",
        "SET_VRING_CALL",
        "SET_VRING_NUM",
        "SET_VRING_BASE",
        "SET_VRING_ADDR",
        "SET_VRING_KICK",
        "SET_VRING_CALL",
        "SET_VRING_ENABLE",
        "SET_VRING_ENABLE",
    ];
    assert_eq!(names, want, "{reqs:?}");
    // The device works.
    let (g, h) = rig.pair(5001, true);
    rig.check_pair(&g, &h, 1, "after the handshake");
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

// ----- bulk transfers, one per TX layout -----

/// 16 MiB each way at once on one connection, then a clean close.
fn bulk(name: &str, o: VmOptions, guest_initiated: bool, peer_bug: Option<&str>) {
    let mut rig = Rig::with(name, o);
    if let Some(why) = peer_bug {
        if rig.skip_on_peer(why) {
            return;
        }
    }
    let size = 16 * MIB;
    let (g, h) = rig.pair(6000, guest_initiated);
    let (up, down) = (0x5500, 0x5501);
    let start = Instant::now();
    thread::scope(|sc| {
        let host_reader = sc.spawn(|| read_verified(&h, up, Some(size)));
        let host_writer = sc.spawn(|| write_verified(&h, down, size));
        let guest_reader = sc.spawn(|| guest_read(&g, down, 0, Some(size)));
        rig.ok(guest_write(&g, up, 0, size), "guest write");
        let r = rig.ok(host_reader.join().expect("thread"), "host read");
        rig.check_report(&r, size, false, "guest to host");
        rig.ok(host_writer.join().expect("thread"), "host write");
        let r = rig.ok(guest_reader.join().expect("thread"), "guest read");
        rig.check_report(&r, size, false, "host to guest");
    });
    let took = start.elapsed();
    rig.ok(g.close(), "guest close");
    let end = rig.ok(host_wait_end(&h), "host sees the close");
    let s = rig.vm().stats();
    eprintln!(
        "{name}: 2 x 16 MiB in {:.2} s; {end}; tx {} packets, rx {} packets, calls {:?}, kicks {:?}",
        took.as_secs_f64(),
        s.tx_packets,
        s.rx_packets,
        s.calls,
        s.kicks
    );
    rig.assert_clean();
}

#[test]
fn bulk_16mib_header_and_payload_in_one_descriptor() {
    // Guest memory above 4 GiB and 256-entry queues, too.
    bulk(
        "bulk-single",
        VmOptions {
            tx_layout: TxLayout::Single,
            mem_base: 1 << 32,
            queue_size: 256,
            ..opts()
        },
        true,
        None,
    );
}

#[test]
fn bulk_16mib_header_then_payload_split_rx_buffers() {
    bulk(
        "bulk-two",
        VmOptions {
            tx_layout: TxLayout::HeaderThenPayload,
            rx_split_header: true,
            ..opts()
        },
        false,
        None,
    );
}

#[test]
fn bulk_16mib_without_event_idx() {
    bulk(
        "bulk-no-event-idx",
        VmOptions {
            event_idx: false,
            ..opts()
        },
        true,
        None,
    );
}

#[test]
fn bulk_16mib_payload_over_several_descriptors() {
    bulk(
        "bulk-scatter",
        VmOptions {
            tx_layout: TxLayout::PayloadSplit(7),
            ..opts()
        },
        true,
        Some(
            "vhost-device-vsock 0.3.0 (virtio-vsock 0.10) takes the payload from one \
             descriptor only: a packet whose payload spans several is dropped, its chain \
             never returned, and the stream stalls",
        ),
    );
}

#[test]
fn bulk_16mib_header_across_descriptors() {
    bulk(
        "bulk-header-split",
        VmOptions {
            tx_layout: TxLayout::HeaderSplit(20),
            ..opts()
        },
        false,
        Some(
            "vhost-device-vsock 0.3.0 (virtio-vsock 0.10) wants the whole header in the \
             first descriptor: such a packet is dropped and its chain never returned",
        ),
    );
}

// ----- stream semantics -----

const PEER_HALF_CLOSE: &str = "vhost-device-vsock 0.3.0 acts on a guest SHUTDOWN only when it \
     carries both flags and its buffer is empty (vsock_conn.rs send_pkt), so a guest \
     SHUT_WR never reaches the host as EOF and a guest close with bytes still buffered \
     is never answered";

#[test]
fn half_close_each_way() {
    let mut rig = Rig::new("half-close");
    if rig.skip_on_peer(PEER_HALF_CLOSE) {
        return;
    }
    // The guest shuts down writing while the backend still buffers its
    // bytes; the host reads them all, then EOF, and keeps writing.
    let (g, h) = rig.pair(6100, true);
    let size = 2 * MIB;
    thread::scope(|sc| {
        let w = sc.spawn(|| {
            guest_write(&g, 1, 0, size)?;
            g.shutdown_write()
        });
        thread::sleep(Duration::from_millis(300));
        let r = rig.ok(read_verified(&h, 1, None), "host read to EOF");
        rig.check_report(&r, size, true, "guest to host, then EOF");
        rig.ok(w.join().expect("thread"), "guest write and SHUT_WR");
    });
    rig.ok(
        write_verified(&h, 2, 300 * KIB),
        "host writes after guest EOF",
    );
    let r = rig.ok(guest_read(&g, 2, 0, Some(300 * KIB)), "guest read");
    rig.check_report(&r, 300 * KIB, false, "host to guest after half close");
    drop(h);
    let r = rig.ok(guest_read(&g, 2, 300 * KIB, None), "guest reads EOF");
    if !r.eof || r.received != 300 * KIB {
        rig.fail(format!("guest after host close: {r:?}"));
    }
    rig.ok(g.close(), "guest close");

    // The host shuts down writing; the guest reads EOF and keeps writing.
    let (g, h) = rig.pair(6101, false);
    rig.ok(write_verified(&h, 3, 70 * KIB), "host write");
    rig.ok(h.shutdown(Shutdown::Write), "host SHUT_WR");
    let r = rig.ok(guest_read(&g, 3, 0, None), "guest read to EOF");
    rig.check_report(&r, 70 * KIB, true, "host to guest, then EOF");
    thread::scope(|sc| {
        let reader = sc.spawn(|| read_verified(&h, 4, Some(MIB)));
        rig.ok(guest_write(&g, 4, 0, MIB), "guest writes after host EOF");
        let r = rig.ok(reader.join().expect("thread"), "host read");
        rig.check_report(&r, MIB, false, "guest to host after half close");
    });
    rig.ok(g.close(), "guest close");
    let r = rig.ok(read_verified_at(&h, 4, MIB, None), "host reads EOF");
    rig.check_report(&r, MIB, true, "host sees EOF after the guest close");
    rig.assert_clean();
}

#[test]
fn close_with_bytes_in_flight_each_way() {
    let mut rig = Rig::new("close-in-flight");
    if rig.skip_on_peer(PEER_HALF_CLOSE) {
        return;
    }
    // The guest closes while the backend holds bytes the host has not read:
    // every byte reaches the host before its EOF, and the close completes.
    let (g, h) = rig.pair(6150, true);
    let size = 2 * MIB;
    thread::scope(|sc| {
        let w = sc.spawn(|| {
            guest_write(&g, 5, 0, size)?;
            g.close()
        });
        thread::sleep(Duration::from_millis(300));
        let r = rig.ok(read_verified(&h, 5, None), "host read to EOF");
        rig.check_report(&r, size, true, "guest to host, then EOF");
        rig.ok(w.join().expect("thread"), "guest write and close");
    });
    // The host writes and closes at once: the guest gets every byte, then
    // EOF, and its writes fail.
    let (g, h) = rig.pair(6151, false);
    thread::scope(|sc| {
        sc.spawn(move || {
            let r = write_verified(&h, 6, size);
            drop(h);
            r
        });
        let r = rig.ok(guest_read(&g, 6, 0, None), "guest read to EOF");
        rig.check_report(&r, size, true, "host to guest, then EOF");
    });
    match g.write(b"late") {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        other => rig.fail(format!("guest write after host close: {other:?}")),
    }
    rig.ok(g.close(), "guest close");
    rig.assert_clean();
}

#[test]
fn host_bytes_sent_with_the_connect_line_arrive_first() {
    let mut rig = Rig::new("connect-line");
    if rig.skip_on_peer(
        "vhost-device-vsock 0.3.0 reads the CONNECT line through a BufReader it then drops \
         (vhu_vsock_thread.rs read_local_stream_port): bytes after the newline are lost",
    ) {
        return;
    }
    let gl = rig.ok(rig.vm().listen(6160), "listen");
    let mut h = rig.ok(UnixStream::connect(rig.uds()), "connect");
    set_timeouts(&h);
    let mut msg = b"CONNECT 6160\n".to_vec();
    let mut data = vec![0u8; 100 * KIB as usize];
    pattern::fill(7, 0, &mut data);
    msg.extend_from_slice(&data);
    rig.ok(h.write_all(&msg), "CONNECT line and data in one write");
    rig.ok(read_ok_line(&mut h), "OK line");
    let g = rig.ok(gl.accept(T), "accept");
    let r = rig.ok(guest_read(&g, 7, 0, Some(100 * KIB)), "guest read");
    rig.check_report(&r, 100 * KIB, false, "bytes after the CONNECT line");
    rig.check_pair(&g, &h, 8, "after the prefix");
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

#[test]
fn connect_to_a_port_nobody_listens_on_is_reset() {
    let mut rig = Rig::new("refused");
    if rig.skip_on_peer(
        "vhost-device-vsock 0.3.0 never answers a REQUEST it cannot connect with RST \
         (thread_backend.rs enq_rst is a TODO): the guest's connect times out",
    ) {
        return;
    }
    let t = Instant::now();
    match rig.vm().connect(6200) {
        Ok(_) => rig.fail("connect to a port without listener succeeded"),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => rig.fail(format!("connect: {e} ({:?}), expected a reset", e.kind())),
    }
    if t.elapsed() > Duration::from_secs(2) {
        rig.fail(format!("the reset took {:?}", t.elapsed()));
    }
    // A host CONNECT to a guest port without listener gets no OK.
    let r = hybrid_connect_timeout(rig.uds(), 6201, Duration::from_secs(5));
    if r.is_ok() {
        rig.fail("host CONNECT to an unbound guest port succeeded");
    }
    let (g, h) = rig.pair(6202, true);
    rig.check_pair(&g, &h, 5, "after the refusals");
    rig.assert_clean();
}

/// A host service that accepts and closes at once: the guest's connect
/// succeeds (the RESPONSE and the SHUTDOWN can arrive in one batch) and
/// its read sees end of stream. Regression test: the virtual driver failed
/// such connects as "closed while connecting".
#[test]
fn host_accepts_and_closes_at_once_many_times() {
    const ROUNDS: usize = 300;
    let mut rig = Rig::new("accept-close");
    let port = 6210;
    let hl = rig.ok(HostListener::bind(rig.uds(), port), "bind");
    thread::scope(|sc| {
        let acceptor = sc.spawn(|| -> io::Result<()> {
            for _ in 0..ROUNDS {
                drop(hl.accept_timeout(T)?);
            }
            Ok(())
        });
        for i in 0..ROUNDS {
            let g = rig.ok(rig.vm().connect(port), &format!("connect #{i}"));
            let mut b = [0u8; 1];
            match g.read(&mut b) {
                Ok(0) => {}
                Ok(_) => rig.fail(format!("connection #{i}: a byte from nowhere")),
                Err(e) => rig.fail(format!("connection #{i}: read: {e}, expected EOF")),
            }
        }
        rig.ok(acceptor.join().expect("acceptor"), "host accepts");
    });
    let (g, h) = rig.pair(6211, true);
    rig.check_pair(&g, &h, 6, "after the closes");
    rig.assert_clean();
}

// ----- ring and credit pressure -----

#[test]
fn full_rx_ring_then_everything_arrives() {
    // 32 RX buffers of 4 KiB hold less than the credit of one connection.
    let mut rig = Rig::with(
        "full-rx",
        VmOptions {
            queue_size: 32,
            ..opts()
        },
    );
    let vm = rig.vm();
    let pairs: Vec<(VStream, UnixStream)> =
        (0..3).map(|i| rig.pair(6300 + i, i % 2 == 0)).collect();
    vm.hold_rx_buffers(true);
    let size = 512 * KIB;
    thread::scope(|sc| {
        let writers: Vec<_> = pairs
            .iter()
            .enumerate()
            .map(|(i, (_, h))| sc.spawn(move || write_verified(h, 100 + i as u64, size)))
            .collect();
        if !vm.wait_rx_exhausted(T) {
            rig.fail("the device did not use up the RX buffers");
        }
        let used = vm.stats().used[0];
        thread::sleep(Duration::from_millis(300));
        if vm.stats().used[0] != used {
            rig.fail("RX buffers used while none were posted");
        }
        vm.hold_rx_buffers(false);
        for (i, (g, _)) in pairs.iter().enumerate() {
            let r = rig.ok(guest_read(g, 100 + i as u64, 0, Some(size)), "guest read");
            rig.check_report(&r, size, false, &format!("connection {i}"));
        }
        for w in writers {
            rig.ok(w.join().expect("thread"), "host write");
        }
    });
    for (i, (g, h)) in pairs.iter().enumerate() {
        rig.check_pair(g, h, 200 + i as u64, "after the RX ring ran dry");
    }
    rig.assert_clean();
}

#[test]
fn credit_guest_app_not_reading_blocks_the_host() {
    let mut rig = Rig::new("credit-guest");
    let vm = rig.vm();
    let (g, h) = rig.pair(6400, false);
    let size = 4 * MIB;
    let buf_alloc = u64::from(vm.options().buf_alloc);
    thread::scope(|sc| {
        let writer = sc.spawn(|| write_verified(&h, 7, size));
        // The guest reads nothing: the device may deliver at most buf_alloc.
        let deadline = Instant::now() + T;
        loop {
            let info = rig.ok(g.info(), "info");
            if u64::from(info.rx_buffered) >= buf_alloc {
                break;
            }
            if Instant::now() > deadline {
                rig.fail(format!("guest buffer never filled: {info:?}"));
            }
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(Duration::from_millis(500));
        let info = rig.ok(g.info(), "info");
        if u64::from(info.rx_buffered) > buf_alloc || vm.stats().credit_violations > 0 {
            rig.fail(format!("credit overrun: {info:?}"));
        }
        if writer.is_finished() {
            rig.fail("the host wrote 4 MiB into a guest that reads nothing");
        }
        let r = rig.ok(guest_read(&g, 7, 0, Some(size)), "guest read");
        rig.check_report(&r, size, false, "after the guest started reading");
        rig.ok(writer.join().expect("thread"), "host write");
    });
    rig.check_pair(&g, &h, 8, "after the credit stall");
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

#[test]
fn credit_host_not_reading_blocks_the_guest() {
    let mut rig = Rig::new("credit-host");
    let (g, h) = rig.pair(6500, true);
    let size = 4 * MIB;
    thread::scope(|sc| {
        let writer = sc.spawn(|| guest_write(&g, 9, 0, size));
        thread::sleep(Duration::from_millis(700));
        let info = rig.ok(g.info(), "info");
        if writer.is_finished() {
            rig.fail(format!(
                "the guest wrote 4 MiB to a host that reads nothing: {info:?}"
            ));
        }
        let in_flight = info.tx_cnt.wrapping_sub(info.peer_fwd_cnt);
        if in_flight > info.peer_buf_alloc {
            rig.fail(format!("guest sent beyond the credit: {info:?}"));
        }
        let r = rig.ok(read_verified(&h, 9, Some(size)), "host read");
        rig.check_report(&r, size, false, "after the host started reading");
        rig.ok(writer.join().expect("thread"), "guest write");
    });
    rig.check_pair(&g, &h, 10, "after the credit stall");
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

#[test]
fn guest_writes_while_its_receive_buffer_is_full() {
    // A guest application that sends a large request before reading the
    // reply the host already streams.
    let mut rig = Rig::new("write-while-full");
    if rig.skip_on_peer(
        "vhost-device-vsock 0.3.0 answers every chance to send to a guest without credit with a \
         CREDIT_REQUEST (vsock_conn.rs recv_pkt), a request/update storm during which the \
         guest's own stream stalls (its writes time out or the host misses the last bytes) \
         in about half the runs",
    ) {
        return;
    }
    let vm = rig.vm();
    let (g, h) = rig.pair(6550, true);
    let size = 2 * MIB;
    let buf_alloc = vm.options().buf_alloc;
    thread::scope(|sc| {
        let hw = sc.spawn(|| write_verified(&h, 13, size));
        let deadline = Instant::now() + T;
        while rig.ok(g.info(), "info").rx_buffered < buf_alloc {
            if Instant::now() > deadline {
                rig.fail("the guest receive buffer never filled");
            }
            thread::sleep(Duration::from_millis(5));
        }
        let hr = sc.spawn(|| read_verified(&h, 14, Some(size)));
        rig.ok(
            guest_write(&g, 14, 0, size),
            "guest write with a full receive buffer",
        );
        let r = rig.ok(hr.join().expect("thread"), "host read");
        rig.check_report(&r, size, false, "guest to host");
        let r = rig.ok(guest_read(&g, 13, 0, Some(size)), "guest read");
        rig.check_report(&r, size, false, "host to guest");
        rig.ok(hw.join().expect("thread"), "host write");
    });
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

#[test]
fn slow_readers_both_ways() {
    let mut rig = Rig::new("slow");
    let (g, h) = rig.pair(6600, true);
    let size = 2 * MIB;
    thread::scope(|sc| {
        let host_reader =
            sc.spawn(|| host_read_paced(&h, 11, size, 3000, Duration::from_micros(500)));
        let host_writer = sc.spawn(|| write_verified(&h, 12, size));
        let guest_reader = sc.spawn(|| {
            guest_read_paced(
                &g,
                12,
                0,
                Some(size),
                1500,
                Some(Duration::from_micros(300)),
            )
        });
        rig.ok(guest_write(&g, 11, 0, size), "guest write");
        let r = rig.ok(host_reader.join().expect("thread"), "slow host read");
        rig.check_report(&r, size, false, "guest to slow host");
        rig.ok(host_writer.join().expect("thread"), "host write");
        let r = rig.ok(guest_reader.join().expect("thread"), "slow guest read");
        rig.check_report(&r, size, false, "host to slow guest");
    });
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

// ----- many connections -----

const MANY: usize = 1000;

fn payload_len(i: usize) -> u64 {
    500 + (i as u64 * 37) % 1500
}

#[test]
fn thousand_connections_host_initiated() {
    let mut rig = Rig::new("many-host");
    let vm = rig.vm();
    let port = 6700;
    let gl = rig.ok(vm.listen(port), "listen");
    let base = 0x10_0000;
    let mut hosts = Vec::with_capacity(MANY);
    for i in 0..MANY {
        let (h, _) = rig.ok(
            hybrid_connect_timeout(rig.uds(), port, T),
            &format!("host CONNECT #{i}"),
        );
        set_timeouts(&h);
        rig.ok(
            write_verified(&h, base + i as u64, payload_len(i)),
            "host write",
        );
        hosts.push(h);
    }
    let mut guests = Vec::with_capacity(MANY);
    for i in 0..MANY {
        guests.push(rig.ok(gl.accept(T), &format!("guest accept #{i}")));
    }
    // Each guest stream tells its seed by its first bytes, and answers.
    for (k, g) in guests.iter().enumerate() {
        let mut first = [0u8; 8];
        let mut n = 0;
        while n < 8 {
            n += rig.ok(g.read(&mut first[n..]), "guest read");
        }
        let seed = pattern::identify(&first, base, MANY as u64)
            .unwrap_or_else(|| rig.fail(format!("guest stream {k}: unknown seed")));
        let i = (seed - base) as usize;
        let mut v = Verifier::new(seed);
        v.feed(&first);
        let r = rig.ok(guest_read(g, seed, 8, Some(payload_len(i))), "guest read");
        rig.check_report(&r, payload_len(i), false, &format!("host connection {i}"));
        rig.ok(
            guest_write(g, reply_seed(seed), 0, payload_len(i)),
            "guest reply",
        );
    }
    for (i, h) in hosts.iter().enumerate() {
        let r = rig.ok(
            read_verified(h, reply_seed(base + i as u64), Some(payload_len(i))),
            "host read",
        );
        rig.check_report(
            &r,
            payload_len(i),
            false,
            &format!("reply on connection {i}"),
        );
    }
    for g in guests {
        rig.ok(g.close(), "guest close");
    }
    for h in &hosts {
        rig.ok(host_wait_end(h), "host sees the close");
    }
    if rig.vm().conn_count() != 0 {
        rig.fail(format!("{} connections left", rig.vm().conn_count()));
    }
    rig.assert_clean();
}

#[test]
fn thousand_connections_guest_initiated() {
    let mut rig = Rig::new("many-guest");
    let vm = rig.vm();
    let port = 6800;
    let hl = rig.ok(HostListener::bind(rig.uds(), port), "bind");
    let base = 0x20_0000;
    thread::scope(|sc| {
        // The host accepts everything, identifies each stream by its first
        // bytes and answers it.
        let host = sc.spawn(|| -> Result<Vec<UnixStream>, String> {
            let mut hs = Vec::with_capacity(MANY);
            for i in 0..MANY {
                let h = hl
                    .accept_timeout(T)
                    .map_err(|e| format!("host accept #{i}: {e}"))?;
                set_timeouts(&h);
                hs.push(h);
            }
            for (k, mut h) in hs.iter().enumerate() {
                let mut first = [0u8; 8];
                h.read_exact(&mut first)
                    .map_err(|e| format!("host read #{k}: {e}"))?;
                let seed = pattern::identify(&first, base, MANY as u64)
                    .ok_or_else(|| format!("host stream {k}: unknown seed"))?;
                let i = (seed - base) as usize;
                let r = read_verified_at(h, seed, 8, Some(payload_len(i)))
                    .map_err(|e| format!("host read #{k}: {e}"))?;
                if r.received != payload_len(i) || r.first_bad.is_some() {
                    return Err(format!("guest connection {i}: {r:?}"));
                }
                write_verified(h, reply_seed(seed), payload_len(i))
                    .map_err(|e| format!("host write #{k}: {e}"))?;
            }
            Ok(hs)
        });
        let mut guests = Vec::with_capacity(MANY);
        for i in 0..MANY {
            let g = rig.ok(vm.connect(port), &format!("guest connect #{i}"));
            rig.ok(
                guest_write(&g, base + i as u64, 0, payload_len(i)),
                "guest write",
            );
            guests.push(g);
        }
        for (i, g) in guests.iter().enumerate() {
            let r = rig.ok(
                guest_read(g, reply_seed(base + i as u64), 0, Some(payload_len(i))),
                "guest read",
            );
            rig.check_report(
                &r,
                payload_len(i),
                false,
                &format!("reply on connection {i}"),
            );
        }
        let hs = rig.ok(host.join().expect("thread"), "host side");
        for g in guests {
            rig.ok(g.close(), "guest close");
        }
        for h in &hs {
            rig.ok(host_wait_end(h), "host sees the close");
        }
    });
    rig.assert_clean();
}

// ----- malformed input -----

#[test]
fn malformed_tx_chains_are_returned_and_connections_survive() {
    let mut rig = Rig::new("malformed");
    let vm = rig.vm();
    let (g, h) = rig.pair(6900, true);
    // A host listener the malformed REQUESTs aim at: none may connect.
    let spoof = rig.ok(HostListener::bind(rig.uds(), 6901), "bind");
    let cid = vm.guest_cid();
    let end = vm.memory_end();
    let qsize = vm.options().queue_size;
    let hdr = |op: u16, len: u32, sport: u32| Header {
        src_cid: cid,
        dst_cid: 2,
        src_port: sport,
        dst_port: 6999,
        len,
        type_: 1,
        op,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    };
    let bytes = |h: Header| h.to_bytes().to_vec();
    let fill = |n: usize| vec![0xa5u8; n];
    let mut cases: Vec<(&str, Vec<RawDesc>)> = vec![
        (
            "address past the end of memory",
            vec![RawDesc::at(end + 0x1000, 64)],
        ),
        (
            "buffer crossing the end of memory",
            vec![RawDesc::at(end - 16, 64)],
        ),
        (
            "address that overflows",
            vec![RawDesc::at(u64::MAX - 8, 64)],
        ),
        ("zero-length descriptor", vec![RawDesc::data(Vec::new())]),
        (
            "length 4 GiB - 1",
            vec![RawDesc::data(bytes(hdr(OP_RW, 0, 40001))).len(u32::MAX)],
        ),
        (
            "payload descriptor outside memory",
            vec![
                RawDesc::data(bytes(hdr(OP_RW, 100, 40002))),
                RawDesc::at(end + 0x10000, 100),
            ],
        ),
        (
            "two-descriptor loop",
            vec![
                RawDesc::data(bytes(hdr(OP_RW, 100, 40003))).link(Link::Entry(1)),
                RawDesc::data(fill(100)).link(Link::Entry(0)),
            ],
        ),
        (
            "descriptor chained to itself",
            vec![RawDesc::data(bytes(hdr(OP_REQUEST, 0, 40004))).link(Link::Entry(0))],
        ),
        (
            "next index out of range",
            vec![RawDesc::data(bytes(hdr(OP_REQUEST, 0, 40005))).link(Link::Index(qsize + 5))],
        ),
        (
            "device-writable descriptor on TX",
            vec![RawDesc::data(bytes(hdr(OP_REQUEST, 0, 40006))).writable()],
        ),
        (
            "readable header, writable payload",
            vec![
                RawDesc::data(bytes(hdr(OP_RW, 100, 40007))),
                RawDesc::data(fill(100)).writable(),
            ],
        ),
        (
            "indirect descriptor (not negotiated)",
            vec![RawDesc::data(fill(32)).flags(DESC_F_INDIRECT)],
        ),
        ("chain shorter than a header", vec![RawDesc::data(fill(20))]),
        (
            "header cut short over two descriptors",
            vec![
                RawDesc::data(bytes(hdr(OP_REQUEST, 0, 40008))[..20].to_vec()),
                RawDesc::data(bytes(hdr(OP_REQUEST, 0, 40008))[20..30].to_vec()),
            ],
        ),
        (
            "len 1000 with 10 bytes of payload",
            vec![
                RawDesc::data(bytes(hdr(OP_RW, 1000, 40009))),
                RawDesc::data(fill(10)),
            ],
        ),
        (
            "len 0 with 100 bytes of payload",
            vec![
                RawDesc::data(bytes(hdr(OP_RW, 0, 40010))),
                RawDesc::data(fill(100)),
            ],
        ),
        (
            "len over 64 KiB",
            vec![
                RawDesc::data(bytes(hdr(OP_RW, 70000, 40011))),
                RawDesc::data(fill(70000)),
            ],
        ),
        (
            "len 4 GiB - 1",
            vec![
                RawDesc::data(bytes(hdr(OP_RW, u32::MAX, 40012))),
                RawDesc::data(fill(16)),
            ],
        ),
        ("op 0", vec![RawDesc::data(bytes(hdr(0, 0, 40013)))]),
        ("op 99", vec![RawDesc::data(bytes(hdr(99, 0, 40014)))]),
        (
            "seqpacket REQUEST",
            vec![RawDesc::data(bytes(Header {
                type_: TYPE_SEQPACKET,
                dst_port: 6901,
                ..hdr(OP_REQUEST, 0, 40015)
            }))],
        ),
        (
            "type 99 REQUEST",
            vec![RawDesc::data(bytes(Header {
                type_: 99,
                dst_port: 6901,
                ..hdr(OP_REQUEST, 0, 40016)
            }))],
        ),
        (
            "REQUEST with a spoofed source CID",
            vec![RawDesc::data(bytes(Header {
                src_cid: 99,
                dst_port: 6901,
                ..hdr(OP_REQUEST, 0, 40017)
            }))],
        ),
        (
            "REQUEST to a CID other than the host",
            vec![RawDesc::data(bytes(Header {
                dst_cid: 5,
                dst_port: 6901,
                ..hdr(OP_REQUEST, 0, 40018)
            }))],
        ),
        (
            "RW for no connection",
            vec![
                RawDesc::data(bytes(hdr(OP_RW, 10, 40019))),
                RawDesc::data(fill(10)),
            ],
        ),
        (
            "RESPONSE for no connection",
            vec![RawDesc::data(bytes(hdr(OP_RESPONSE, 0, 40020)))],
        ),
        (
            "SHUTDOWN for no connection",
            vec![RawDesc::data(bytes(Header {
                flags: SHUTDOWN_BOTH,
                ..hdr(OP_SHUTDOWN, 0, 40021)
            }))],
        ),
        (
            "CREDIT_UPDATE for no connection",
            vec![RawDesc::data(bytes(hdr(OP_CREDIT_UPDATE, 0, 40022)))],
        ),
        (
            "header and payload in one descriptor, len too long",
            vec![RawDesc::data({
                let mut b = bytes(hdr(OP_RW, 500, 40023));
                b.extend(fill(50));
                b
            })],
        ),
    ];
    // vhost-device-vsock 0.3.0 drops a TX chain it cannot parse without
    // returning it to the used ring (vhu_vsock_thread.rs process_tx_queue:
    // `continue`), so these chains leak.
    let leaked = "vhost-device-vsock 0.3.0 never returns a TX chain it cannot parse";
    let peer_skips: &[(&str, &str)] = &[
        ("address past the end of memory", leaked),
        ("buffer crossing the end of memory", leaked),
        ("address that overflows", leaked),
        ("zero-length descriptor", leaked),
        ("payload descriptor outside memory", leaked),
        ("device-writable descriptor on TX", leaked),
        ("readable header, writable payload", leaked),
        ("indirect descriptor (not negotiated)", leaked),
        ("chain shorter than a header", leaked),
        ("header cut short over two descriptors", leaked),
        ("len 1000 with 10 bytes of payload", leaked),
        ("len over 64 KiB", leaked),
        ("len 4 GiB - 1", leaked),
        ("header and payload in one descriptor, len too long", leaked),
    ];
    for (k, (name, descs)) in cases.drain(..).enumerate() {
        if let Some((_, why)) = peer_skips.iter().find(|(n, _)| *n == name) {
            if rig.skip_on_peer(&format!("case {name:?}: {why}")) {
                continue;
            }
        }
        let inj = rig.ok(vm.inject_tx_raw(&descs), &format!("inject {name}"));
        if !inj.returned {
            rig.fail(format!(
                "malformed chain {name:?} was not returned to the used ring"
            ));
        }
        rig.check_pair(&g, &h, 0x7000 + k as u64, &format!("after {name:?}"));
    }
    // An available-ring entry naming no descriptor of the ring.
    rig.ok(vm.inject_head(TX, qsize + 3), "inject an out-of-range head");
    rig.check_pair(&g, &h, 0x7100, "after an out-of-range head");
    if spoof.accept_timeout(Duration::from_millis(200)).is_ok() {
        rig.fail("a malformed REQUEST reached a host listener");
    }
    let s = rig.vm().stats();
    eprintln!(
        "malformed: {} RST received for the malformed packets",
        s.rst_received
    );
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

#[test]
fn malformed_rx_buffers_are_returned_and_no_byte_is_lost() {
    // 32 RX buffers hold less than one connection's credit, so the host can
    // use them all up.
    let mut rig = Rig::with(
        "malformed-rx",
        VmOptions {
            queue_size: 32,
            ..opts()
        },
    );
    let vm = rig.vm();
    let (g, h) = rig.pair(6950, true);
    let end = vm.memory_end();
    let mut seed = 0x7200;
    let w = |n: usize| RawDesc::data(vec![0u8; n]).writable();
    let cases: Vec<(&str, Vec<RawDesc>)> = vec![
        ("read-only buffer", vec![RawDesc::data(vec![0u8; 4096])]),
        ("buffer smaller than a header", vec![w(10)]),
        ("zero-length buffer", vec![w(0)]),
        (
            "buffer outside guest memory",
            vec![RawDesc::at(end + 0x1000, 4096).writable()],
        ),
        (
            "two-descriptor loop",
            vec![w(100).link(Link::Entry(1)), w(100).link(Link::Entry(0))],
        ),
        (
            "writable then readable descriptor",
            vec![w(4096), RawDesc::data(vec![0u8; 100])],
        ),
        // Valid for the spec: the device may write the header across both.
        ("header across two descriptors", vec![w(20), w(4000)]),
    ];
    for (name, descs) in cases {
        if name == "two-descriptor loop"
            && rig.skip_on_peer(
                "case \"two-descriptor loop\": vhost-device-vsock 0.3.0 (virtio-vsock 0.10) does \
                 not see the loop and writes into the chain, the payload at the start of the \
                 second descriptor instead of right after the header, where the driver does \
                 not look for it",
            )
        {
            continue;
        }
        // Each case: one host stream of `sent` bytes with its own seed.
        seed += 2;
        let mut sent = 0u64;
        vm.hold_rx_buffers(true);
        // The host uses up every posted buffer.
        let deadline = Instant::now() + T;
        while vm.rx_posted() > 0 {
            if Instant::now() > deadline {
                rig.fail(format!("{name}: RX buffers never used up"));
            }
            rig.ok(write_verified_at(&h, seed, sent, 4000), "host write");
            sent += 4000;
            thread::sleep(Duration::from_millis(2));
        }
        let inj = thread::scope(|sc| {
            let inj = sc.spawn(|| vm.inject_raw(RX, &descs, Duration::from_secs(5)));
            thread::sleep(Duration::from_millis(20));
            rig.ok(write_verified_at(&h, seed, sent, 10), "host write");
            inj.join().expect("thread")
        });
        sent += 10;
        let inj = rig.ok(inj, &format!("inject {name}"));
        if !inj.returned {
            rig.fail(format!("malformed RX chain {name:?} was not returned"));
        }
        vm.hold_rx_buffers(false);
        let r = rig.ok(
            guest_read(&g, seed, 0, Some(sent)),
            &format!("guest read after {name:?}"),
        );
        rig.check_report(&r, sent, false, &format!("host to guest around {name:?}"));
        rig.check_pair(&g, &h, seed + 1, &format!("after {name:?}"));
    }
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

/// Regression: a driver reset was missed when both rings stopped at index 0
/// (65536 chains each, modulo 2^16), because only the base was compared; the
/// connections the guest forgot stayed open on the host. The ring addresses
/// are now compared too.
#[test]
fn driver_reset_when_both_rings_stopped_at_index_zero() {
    // One byte per TX packet and per RX buffer makes the ring indices easy
    // to steer.
    let mut rig = Rig::with(
        "reset-wrap",
        VmOptions {
            rx_buf_size: 45,
            tx_max_payload: 1,
            ..opts()
        },
    );
    let vm = rig.vm();
    let (g, h) = rig.pair(7150, true);
    // REQUEST (TX) and RESPONSE (RX) are in; 65535 more chains each.
    let n = 65535;
    thread::scope(|sc| {
        let hr = sc.spawn(|| read_verified(&h, 31, Some(n)));
        rig.ok(guest_write(&g, 31, 0, n), "guest write");
        let r = rig.ok(hr.join().expect("thread"), "host read");
        rig.check_report(&r, n, false, "guest to host");
    });
    rig.ok(write_verified(&h, 32, n), "host write");
    let r = rig.ok(guest_read(&g, 32, 0, Some(n)), "guest read");
    rig.check_report(&r, n, false, "host to guest");
    if !vm.wait_tx_idle(T) {
        rig.fail("TX never idle");
    }
    let used = vm.stats().used;
    if used[0] % 65536 != 0 || used[1] % 65536 != 0 {
        rig.fail(format!("ring indices not at 0 mod 65536: {used:?}"));
    }
    rig.ok(vm.reset_driver(), "driver reset");
    rig.ok(
        h.set_read_timeout(Some(Duration::from_secs(3))),
        "read timeout",
    );
    rig.ok(host_wait_end(&h), "host socket closed by the driver reset");
    rig.assert_clean();
}

// ----- VM lifecycle -----

const PEER_PAUSE: &str = "vhost-device-vsock 0.3.0: host bytes arriving while the rings \
     are stopped make its worker fail iterating a queue that is not ready; no queue is served \
     after the resume";

/// Checks the requests of the last stop and resume: SET_VRING_ENABLE 0 on
/// each ring, then GET_VRING_BASE; the restart gives back the bases
/// returned.
fn check_stop_resume_requests(rig: &Rig, stopped_at: usize) {
    let reqs = rig.vm().vhost_requests();
    let tail = &reqs[stopped_at - 4..stopped_at];
    if (&tail[0][..], &tail[1][..]) != ("SET_VRING_ENABLE 0 0", "SET_VRING_ENABLE 1 0") {
        rig.fail(format!("stop sequence: {reqs:?}"));
    }
    let returned: Vec<&str> = tail[2..]
        .iter()
        .map(|r| r.rsplit(' ').next().unwrap_or(""))
        .collect();
    let given: Vec<&str> = reqs[stopped_at..]
        .iter()
        .filter(|r| r.starts_with("SET_VRING_BASE"))
        .take(2)
        .map(|r| r.rsplit(' ').next().unwrap_or(""))
        .collect();
    if returned != given {
        rig.fail(format!(
            "bases returned {returned:?}, given back {given:?}: {reqs:?}"
        ));
    }
}

#[test]
fn stop_and_resume_with_guest_traffic_in_flight() {
    let mut rig = Rig::new("stop-resume");
    let vm = rig.vm();
    let (g, h) = rig.pair(7000, true);
    rig.check_pair(&g, &h, 20, "before the stop");
    // A pause without traffic.
    rig.ok(vm.stop(), "stop");
    let stopped_at = vm.vhost_requests().len();
    rig.ok(vm.resume(), "resume");
    check_stop_resume_requests(&rig, stopped_at);
    rig.check_pair(&g, &h, 21, "after a quiet pause");
    // A pause while the guest writes to a host that reads only later, and
    // the host writes to the guest.
    let size = 3 * MIB;
    let host_size = if rig.skip_on_peer(&format!(
        "host to guest traffic across the pause: {PEER_PAUSE}"
    )) {
        0
    } else {
        size
    };
    thread::scope(|sc| {
        let gw = sc.spawn(|| guest_write(&g, 22, 0, size));
        let hw = sc.spawn(|| write_verified(&h, 23, host_size));
        thread::sleep(Duration::from_millis(100));
        rig.ok(vm.stop(), "stop during the transfers");
        let stopped_at = vm.vhost_requests().len();
        thread::sleep(Duration::from_millis(200));
        rig.ok(vm.resume(), "resume");
        check_stop_resume_requests(&rig, stopped_at);
        let hr = sc.spawn(|| read_verified(&h, 22, Some(size)));
        let r = rig.ok(guest_read(&g, 23, 0, Some(host_size)), "guest read");
        rig.check_report(&r, host_size, false, "host to guest across the pause");
        let r = rig.ok(hr.join().expect("thread"), "host read");
        rig.check_report(&r, size, false, "guest to host across the pause");
        rig.ok(gw.join().expect("thread"), "guest write");
        rig.ok(hw.join().expect("thread"), "host write");
    });
    rig.check_pair(&g, &h, 24, "after the pauses");
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

#[test]
fn stop_and_resume_with_host_traffic_during_the_pause() {
    let mut rig = Rig::new("stop-host-traffic");
    if rig.skip_on_peer(PEER_PAUSE) {
        return;
    }
    let vm = rig.vm();
    let (g, h) = rig.pair(7010, true);
    rig.check_pair(&g, &h, 25, "before the stop");
    let gl = rig.ok(vm.listen(7011), "listen");
    rig.ok(vm.stop(), "stop");
    let size = 600 * KIB;
    thread::scope(|sc| {
        // While the VM is stopped: a host writes, another CONNECTs.
        let writer = sc.spawn(|| write_verified(&h, 26, size));
        let connecter = sc.spawn(|| hybrid_connect_timeout(rig.uds(), 7011, T));
        thread::sleep(Duration::from_millis(400));
        let before = vm.stats();
        thread::sleep(Duration::from_millis(100));
        if rig.ok(g.readable(), "readable") != 0 || vm.stats().rx_packets != before.rx_packets {
            rig.fail("the guest received data while stopped");
        }
        rig.ok(vm.resume(), "resume");
        let r = rig.ok(guest_read(&g, 26, 0, Some(size)), "guest read after resume");
        rig.check_report(&r, size, false, "host data sent during the pause");
        rig.ok(writer.join().expect("thread"), "host write");
        let (h2, _) = rig.ok(
            connecter.join().expect("thread"),
            "CONNECT during the pause",
        );
        set_timeouts(&h2);
        let g2 = rig.ok(gl.accept(T), "accept after resume");
        rig.check_pair(&g2, &h2, 27, "connection made during the pause");
        rig.ok(g2.close(), "close");
    });
    rig.check_pair(&g, &h, 28, "after the resume");
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

#[test]
fn memory_table_sent_again_while_running() {
    let mut rig = Rig::new("mem-table");
    let vm = rig.vm();
    let (g, h) = rig.pair(7050, false);
    let size = 8 * MIB;
    thread::scope(|sc| {
        let gw = sc.spawn(|| guest_write(&g, 29, 0, size));
        let hw = sc.spawn(|| write_verified(&h, 30, size));
        let hr = sc.spawn(|| read_verified(&h, 29, Some(size)));
        for i in 0..20 {
            thread::sleep(Duration::from_millis(5));
            rig.ok(vm.update_mem_table(), &format!("SET_MEM_TABLE #{i}"));
        }
        let r = rig.ok(guest_read(&g, 30, 0, Some(size)), "guest read");
        rig.check_report(&r, size, false, "host to guest");
        let r = rig.ok(hr.join().expect("thread"), "host read");
        rig.check_report(&r, size, false, "guest to host");
        rig.ok(gw.join().expect("thread"), "guest write");
        rig.ok(hw.join().expect("thread"), "host write");
    });
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

#[test]
fn driver_reset_then_new_connections() {
    let mut rig = Rig::new("driver-reset");
    let vm = rig.vm();
    let (g1, h1) = rig.pair(7100, true);
    let (g2, h2) = rig.pair(7101, false);
    rig.check_pair(&g1, &h1, 30, "before the reset");
    rig.ok(write_verified(&h2, 31, 10 * KIB), "host write");
    let r = rig.ok(guest_read(&g2, 31, 0, Some(10 * KIB)), "guest read");
    rig.check_report(&r, 10 * KIB, false, "before the reset");
    rig.ok(vm.reset_driver(), "driver reset");
    for (g, what) in [(&g1, "guest-initiated"), (&g2, "host-initiated")] {
        let mut b = [0u8; 16];
        match g.read(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => rig.fail(format!("{what} guest socket after the reset: {other:?}")),
        }
    }
    if !rig.skip_on_peer(
        "vhost-device-vsock 0.3.0 does not notice a driver reset: the old host sockets stay open",
    ) {
        for (h, what) in [(&h1, "guest-initiated"), (&h2, "host-initiated")] {
            rig.ok(
                host_wait_end(h),
                &format!("{what} host socket closed by the reset"),
            );
        }
    }
    drop((g1, g2));
    let (g, h) = rig.pair(7102, true);
    rig.check_pair(&g, &h, 32, "new guest-initiated connection");
    let (g, h) = rig.pair(7103, false);
    rig.check_pair(&g, &h, 33, "new host-initiated connection");
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

#[test]
fn frontend_disconnects_and_a_new_one_connects() {
    let mut rig = Rig::new("reconnect");
    let vm = rig.vm();
    let (g, h) = rig.pair(7200, true);
    rig.check_pair(&g, &h, 40, "before the disconnect");
    vm.disconnect();
    rig.ok(
        host_wait_end(&h),
        "host socket closed when the VMM went away",
    );
    drop(g);
    rig.ok(vm.reconnect(), "reconnect");
    let (g, h) = rig.pair(7201, false);
    rig.check_pair(&g, &h, 41, "after the reconnect");
    let (g2, h2) = rig.pair(7202, true);
    rig.check_pair(&g2, &h2, 42, "after the reconnect");
    // A VMM that exits without a word, and a brand-new one.
    rig.vm = None;
    rig.ok(host_wait_end(&h2), "host socket closed when the VMM exited");
    drop((g, g2));
    let vm = rig.ok(
        VirtualVm::start(rig.backend.socket(), opts()),
        "a new VMM on the same socket",
    );
    rig.vm = Some(vm);
    let (g, h) = rig.pair(7203, true);
    rig.check_pair(&g, &h, 43, "with the new VMM");
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

#[test]
fn three_queues_with_the_event_queue_handed_over() {
    let mut rig = Rig::with(
        "three-queues",
        VmOptions {
            queues: 3,
            ..opts()
        },
    );
    let vm = rig.vm();
    let reqs = vm.vhost_requests();
    for r in [
        "SET_VRING_KICK 2",
        "SET_VRING_CALL 2",
        "SET_VRING_ENABLE 2 1",
    ] {
        assert!(reqs.iter().any(|x| x == r), "{r} missing: {reqs:?}");
    }
    let (g, h) = rig.pair(7300, true);
    let size = 2 * MIB;
    thread::scope(|sc| {
        let hr = sc.spawn(|| read_verified(&h, 50, Some(size)));
        let hw = sc.spawn(|| write_verified(&h, 51, size));
        let gr = sc.spawn(|| guest_read(&g, 51, 0, Some(size)));
        rig.ok(guest_write(&g, 50, 0, size), "guest write");
        let r = rig.ok(gr.join().expect("thread"), "guest read");
        rig.check_report(&r, size, false, "host to guest");
        let r = rig.ok(hr.join().expect("thread"), "host read");
        rig.check_report(&r, size, false, "guest to host");
        rig.ok(hw.join().expect("thread"), "host write");
    });
    rig.ok(vm.stop(), "stop");
    rig.ok(vm.resume(), "resume");
    rig.check_pair(&g, &h, 52, "after stop and resume with three queues");
    rig.ok(vm.reset_driver(), "driver reset");
    let (g, h) = rig.pair(7301, false);
    rig.check_pair(&g, &h, 53, "after a driver reset with three queues");
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

// ----- a last check of the listener API -----

#[test]
fn listener_closed_before_accept_resets_queued_connections() {
    let mut rig = Rig::new("listener-drop");
    let vm = rig.vm();
    let gl: VListener = rig.ok(vm.listen(7400), "listen");
    let (h, _) = rig.ok(hybrid_connect_timeout(rig.uds(), 7400, T), "CONNECT");
    set_timeouts(&h);
    // Wait until the connection is queued, then close the listener.
    let deadline = Instant::now() + T;
    while vm.conn_count() == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    drop(gl);
    rig.ok(host_wait_end(&h), "host sees the queued connection closed");
    let deadline = Instant::now() + T;
    while vm.conn_count() != 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    if vm.conn_count() != 0 {
        rig.fail("the queued connection was not closed");
    }
    let (g, h) = rig.pair(7400, false);
    rig.check_pair(&g, &h, 60, "a new listener on the same port");
    assert_eq!(rig.ok(g.info(), "info").state, ConnState::Established);
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

/// vsockd's worker SIGKILLed between requests: the keeper keeps the
/// vhost-user session, a new worker adopts it, and the device goes on
/// serving (new connections both ways, a pause and resume).
#[test]
fn worker_killed_between_requests_the_device_carries_on() {
    let mut rig = Rig::new("worker-kill-idle");
    if rig.skip_without_keeper() {
        return;
    }
    let (g, h) = rig.pair(7300, true);
    rig.check_pair(&g, &h, 40, "before the kills");
    drop((g, h));
    for i in 0..10u32 {
        rig.ok(rig.backend.kill_worker(T), &format!("kill #{i}"));
        let guest_initiated = i % 2 == 0;
        let (g, h) = rig.pair(7301 + i, guest_initiated);
        rig.check_pair(
            &g,
            &h,
            41 + u64::from(i),
            &format!("new connection after kill #{i}"),
        );
        rig.ok(g.close(), "close");
    }
    rig.ok(rig.backend.kill_worker(T), "kill before a pause");
    let vm = rig.vm();
    rig.ok(vm.stop(), "stop after a kill");
    let stopped_at = vm.vhost_requests().len();
    rig.ok(rig.backend.kill_worker(T), "kill while paused");
    rig.ok(vm.resume(), "resume");
    check_stop_resume_requests(&rig, stopped_at);
    let (g, h) = rig.pair(7400, false);
    rig.check_pair(&g, &h, 60, "after the pause");
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

/// The worker ends other ways than SIGKILL: an abort (what a failed
/// assertion in a library or a panic under `panic=abort` does), and an
/// exit (a SIGTERM sent to the worker alone makes it exit in order). (A
/// SIGSEGV sent with kill(2) is no fault: Rust's handler returns and the
/// process carries on.) Each time the keeper starts a new worker and
/// reports the cause, and a connection opened before and new ones carry
/// on.
#[test]
fn worker_dies_of_abort_and_sigterm_the_device_carries_on() {
    let mut rig = Rig::new("worker-deaths");
    if rig.skip_without_keeper() {
        return;
    }
    let (g, h) = rig.pair(7450, true);
    rig.check_pair(&g, &h, 70, "before the deaths");
    let deaths = [
        (libc::SIGABRT, "killed by signal 6 (SIGABRT"),
        (libc::SIGTERM, "exited with status 0"),
    ];
    for (i, (signal, name)) in deaths.into_iter().enumerate() {
        let i = i as u32;
        rig.ok(
            rig.backend.signal_worker(signal, T),
            &format!("signal {signal} to the worker"),
        );
        let what = format!("after the worker {name}");
        rig.check_pair(&g, &h, 71 + u64::from(i), &what);
        let (g2, h2) = rig.pair(7451 + i, i % 2 == 0);
        rig.check_pair(
            &g2,
            &h2,
            81 + u64::from(i),
            &format!("new connection {what}"),
        );
        rig.ok(g2.close(), "close");
    }
    let status = settled_status(&rig, |m| {
        let causes: Vec<&str> = (1..=deaths.len())
            .filter_map(|n| m.get(&format!("restarts.{n}")).map(String::as_str))
            .collect();
        let want = deaths.map(|(_, name)| name);
        let matched =
            causes.len() == want.len() && causes.iter().zip(want).all(|(c, w)| c.contains(w));
        if m.get("restarts.total") == Some(&want.len().to_string()) && matched {
            Ok(())
        } else {
            Err(format!(
                "restart causes {causes:?}, expected {want:?} in order"
            ))
        }
    });
    let log = std::fs::read_to_string(rig.backend.log_path()).unwrap_or_default();
    for (_, name) in deaths {
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(name) && l.contains("restarting")),
            "the keeper logs the death ({name}) at warn:\n{log}\n{status:?}"
        );
    }
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

/// `--max-connections 2`: a third connection, either way, is refused (the
/// guest's connect reset, the host client closed without an OK) while the
/// two open ones carry on; once one closes, a new one is taken.
#[test]
fn max_connections_refuses_the_one_too_many() {
    let kind = BackendKind::from_env().unwrap_or_else(|e| panic!("{e}"));
    if kind == BackendKind::Peer {
        eprintln!("max-connections: SKIPPED with the peer backend: no such option");
        return;
    }
    let mut rig = Rig::with_args("max-connections", opts(), None, &["--max-connections", "2"]);
    let (g1, h1) = rig.pair(7480, true);
    let (g2, h2) = rig.pair(7481, false);
    match rig.vm().connect(7482) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Ok(_) => rig.fail("a third guest connect succeeded"),
        Err(e) => rig.fail(format!("a third guest connect: {e}, expected a reset")),
    }
    let _gl = rig.ok(rig.vm().listen(7483), "guest listen");
    let mut h3 = rig.ok(UnixStream::connect(rig.uds()), "third host client");
    set_timeouts(&h3);
    rig.ok(h3.write_all(b"CONNECT 7483\n"), "CONNECT line");
    match host_wait_end(&h3) {
        Ok(end) => eprintln!("third host client: {end}"),
        Err(e) => rig.fail(format!("the third host client was not closed: {e}")),
    }
    rig.check_pair(&g1, &h1, 94, "the first connection");
    rig.check_pair(&g2, &h2, 95, "the second connection");
    rig.ok(g1.close(), "close");
    drop(h1);
    // The slot comes free once the close is through.
    let deadline = Instant::now() + T;
    let (g4, h4) = loop {
        let hl = rig.ok(HostListener::bind(rig.uds(), 7484), "bind host listener");
        match rig.vm().connect(7484) {
            Ok(g) => break (g, rig.ok(hl.accept_timeout(T), "host accept")),
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect while the slot is not free yet: {e}");
                drop(hl);
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => rig.fail(format!("connect after a close: {e}")),
        }
    };
    set_timeouts(&h4);
    rig.check_pair(&g4, &h4, 96, "a connection after a close");
    rig.ok(g2.close(), "close");
    rig.ok(g4.close(), "close");
    rig.assert_clean();
}

/// Waits until `vsockd status` shows exactly one restart, the worker
/// having been killed (the crash point fired, once).
fn check_one_crash(rig: &Rig) {
    settled_status(rig, |m| {
        let total = m.get("restarts.total").map(String::as_str);
        let cause = m.get("restarts.1").map(String::as_str).unwrap_or("");
        if total == Some("1") && cause.contains("SIGKILL") {
            Ok(())
        } else {
            Err(format!(
                "restarts {total:?}, cause {cause:?}: expected one SIGKILL"
            ))
        }
    });
}

/// The worker is killed right after the host connect for a guest's
/// connect reached the host service, before its record says so. The next
/// worker finishes that connect on the same kept socket: the service sees
/// one connection, which carries bytes both ways. Regression test: the
/// guest's REQUEST was handled again and the service saw a second
/// connection, the first closed unused.
#[test]
fn killed_between_a_guest_connect_and_its_record_the_service_sees_it_once() {
    let mut rig = Rig::with_crash_point("crash-guest-connect", "guest-connect");
    if rig.skip_without_keeper() {
        return;
    }
    let hl = rig.ok(HostListener::bind(rig.uds(), 7460), "bind host listener");
    let g = rig.ok(rig.vm().connect(7460), "guest connect across the kill");
    let h = rig.ok(hl.accept_timeout(T), "host accept");
    set_timeouts(&h);
    rig.check_pair(&g, &h, 90, "the connect that straddled the kill");
    if let Ok(extra) = hl.accept_timeout(Duration::from_millis(500)) {
        rig.fail(format!(
            "the host service saw the guest's connect twice ({extra:?})"
        ));
    }
    check_one_crash(&rig);
    let (g2, h2) = rig.pair(7461, true);
    rig.check_pair(&g2, &h2, 91, "a new connection");
    rig.ok(g.close(), "close");
    rig.ok(g2.close(), "close");
    rig.assert_clean();
}

/// The worker is killed right after it read a host client's CONNECT line,
/// before its record says so; stream bytes came in the same write. The
/// next worker finds the line where it was read to: the client gets its
/// OK and every byte after the line reaches the guest. Regression test:
/// the line (and the bytes read with it) were lost and the client was
/// closed unanswered.
#[test]
fn killed_right_after_reading_a_connect_line_the_client_gets_its_ok() {
    let mut rig = Rig::with_crash_point("crash-line-read", "line-read");
    if rig.skip_without_keeper() {
        return;
    }
    let gl = rig.ok(rig.vm().listen(7470), "listen");
    let mut h = rig.ok(UnixStream::connect(rig.uds()), "connect");
    set_timeouts(&h);
    let mut msg = b"CONNECT 7470\n".to_vec();
    let mut data = vec![0u8; 64 * KIB as usize];
    pattern::fill(92, 0, &mut data);
    msg.extend_from_slice(&data);
    rig.ok(h.write_all(&msg), "CONNECT line and data in one write");
    rig.ok(read_ok_line(&mut h), "OK line after the kill");
    let g = rig.ok(gl.accept(T), "guest accept");
    let r = rig.ok(guest_read(&g, 92, 0, Some(64 * KIB)), "guest read");
    rig.check_report(&r, 64 * KIB, false, "bytes after the CONNECT line");
    check_one_crash(&rig);
    rig.check_pair(&g, &h, 93, "after the prefix");
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

/// Regression: a host client accepted by the worker, which died before it
/// gave the client's socket to the keeper, was closed without its `OK`.
/// Now the keeper accepts host clients and holds each from that instant:
/// the worker dies at crash point `host-client` (it got the client from
/// the keeper and has not recorded it yet), and the next worker takes the
/// client from its hand-over. The client gets its `OK` and carries bytes
/// both ways; the worker died exactly once, of that SIGKILL.
#[test]
fn host_client_survives_a_worker_killed_before_recording_it() {
    let mut rig = Rig::with_crash_point("crash-host-client", "host-client");
    if rig.skip_without_keeper() {
        return;
    }
    let first_worker = rig.ok(
        rig.backend.worker_pid().ok_or("no worker"),
        "the first worker",
    );
    let (g, h) = rig.pair(7480, false);
    rig.check_pair(&g, &h, 95, "the host client the worker died for");
    let restart =
        format!("worker 1 (pid {first_worker}, generation 1): killed by signal 9 (SIGKILL)");
    settled_status(&rig, |m| {
        let line = m.get("restarts.1").cloned().unwrap_or_default();
        match (m.get("restarts.total").map(String::as_str), m.get("worker.generation")) {
            (Some("1"), Some(gen)) if gen == "2" && line.ends_with(&restart) => Ok(()),
            (total, gen) => Err(format!(
                "restarts.total {total:?}, worker.generation {gen:?}, restarts.1 {line:?} (expected …{restart})"
            )),
        }
    });
    let log = std::fs::read_to_string(rig.backend.log_path()).unwrap_or_default();
    for want in [
        "crash point host-client reached",
        "1 host clients the keeper accepted were never recorded: taking them",
    ] {
        if !log.contains(want) {
            rig.fail(format!("the log lacks {want:?}"));
        }
    }
    // The worker that took over carries on, both ways.
    for (i, guest_initiated) in [(1u32, false), (2, true)] {
        let (g2, h2) = rig.pair(7480 + i, guest_initiated);
        rig.check_pair(
            &g2,
            &h2,
            95 + u64::from(i),
            "a new connection after the crash",
        );
        rig.ok(g2.close(), "close");
    }
    rig.check_pair(&g, &h, 99, "the host client, again");
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

/// The other side of the keeper's host clients: one whose connection a
/// worker recorded and then freed is not taken for a new client when the
/// worker dies before releasing its stream. The worker dies at crash
/// point `conn-freed` (the guest refused the client's CONNECT, the slot is
/// recorded free, the stream not yet released); the next worker finds the
/// stream in its hand-over with no record naming it, but at or below the
/// region's host-client mark, and withdraws it: the client is closed, as
/// without the kill, instead of waiting for an `OK` forever.
#[test]
fn a_refused_host_client_is_closed_when_the_worker_dies_freeing_it() {
    let mut rig = Rig::with_crash_point("crash-conn-freed", "conn-freed");
    if rig.skip_without_keeper() {
        return;
    }
    let t = Instant::now();
    match hybrid_connect_timeout(rig.uds(), 7490, Duration::from_secs(5)) {
        Ok(_) => rig.fail("host CONNECT to an unbound guest port succeeded"),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            rig.fail(format!("the refused host client was never closed: {e}"))
        }
        Err(_) => {}
    }
    if t.elapsed() > Duration::from_secs(2) {
        rig.fail(format!("closing the refused client took {:?}", t.elapsed()));
    }
    settled_status(&rig, |m| {
        match m.get("restarts.total").map(String::as_str) {
            Some("1") => Ok(()),
            other => Err(format!("restarts.total {other:?} (expected 1)")),
        }
    });
    let log = std::fs::read_to_string(rig.backend.log_path()).unwrap_or_default();
    if !log.contains("crash point conn-freed reached") {
        rig.fail("the worker never reached crash point conn-freed");
    }
    let (g, h) = rig.pair(7491, false);
    rig.check_pair(&g, &h, 100, "a host client after the crash");
    rig.ok(g.close(), "close");
    rig.assert_clean();
}

/// `vsockd status` as a map of its `key: value` lines.
fn status_lines(rig: &Rig) -> Result<BTreeMap<String, String>, String> {
    let out = rig
        .backend
        .status(false)
        .map_err(|e| format!("vsockd status: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "vsockd status failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let (k, v) = line
            .split_once(": ")
            .ok_or_else(|| format!("not a key: value line: {line:?}"))?;
        if map.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("key {k} twice"));
        }
    }
    Ok(map)
}

/// `vsockd status --json`, parsed.
fn status_json(rig: &Rig) -> Result<serde_json::Value, String> {
    let out = rig
        .backend
        .status(true)
        .map_err(|e| format!("vsockd status --json: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "vsockd status --json failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "status JSON does not parse: {e}\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// What a status test expects of the device.
struct Expected {
    connections: usize,
    /// Per queue (rx, tx, event): its size, and the used index the
    /// driver has read up to.
    queues: [(u16, u16); 3],
}

/// Checks the device figures of a status against what the virtual VM
/// observed: connection count, and per queue its size, that it runs, and
/// that it stands where the driver saw its last used element (with
/// nothing in flight, at rest).
fn check_device_lines(m: &BTreeMap<String, String>, want: &Expected) -> Result<(), String> {
    let get = |k: &str| m.get(k).map(String::as_str).unwrap_or("<missing>");
    let mut wrong = Vec::new();
    let mut expect = |k: String, v: String| {
        if get(&k) != v {
            wrong.push(format!("{k}: {} (expected {v})", get(&k)));
        }
    };
    expect("frontend.connected".into(), "true".into());
    expect("connections.total".into(), want.connections.to_string());
    expect(
        "connections.established".into(),
        want.connections.to_string(),
    );
    for (name, &(size, used)) in ["rx", "tx", "event"].iter().zip(&want.queues) {
        expect(format!("queues.{name}.size"), size.to_string());
        expect(format!("queues.{name}.started"), "true".into());
        expect(format!("queues.{name}.enabled"), "true".into());
        expect(format!("queues.{name}.used_idx"), used.to_string());
        expect(format!("queues.{name}.last_avail_idx"), used.to_string());
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

/// What the virtual VM expects now: `conns` open, every used element it
/// has read.
fn expected(rig: &Rig, conns: usize) -> Expected {
    let stats = rig.vm().stats();
    let size = rig.vm().options().queue_size;
    Expected {
        connections: conns,
        queues: std::array::from_fn(|q| (size, stats.used[q] as u16)),
    }
}

/// Runs `vsockd status` until `check` accepts it (the device settles after
/// the last traffic: credit updates, a worker getting ready), or fails the
/// test with the last status and what was wrong.
fn settled_status(
    rig: &Rig,
    check: impl Fn(&BTreeMap<String, String>) -> Result<(), String>,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + T;
    loop {
        let verdict = status_lines(rig).and_then(|m| check(&m).map(|()| m));
        match verdict {
            Ok(m) => return m,
            Err(e) if Instant::now() > deadline => {
                let last = rig.backend.status(false).map(|o| o.stdout);
                rig.fail(format!(
                    "status never matched: {e}\nlast status:\n{}",
                    last.map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                ))
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The JSON status says what the text said (the same instant, at rest).
fn check_json_matches(
    json: &serde_json::Value,
    m: &BTreeMap<String, String>,
) -> Result<(), String> {
    let mut wrong = Vec::new();
    for (key, text) in m {
        // Times and restart lines are compared field by field below.
        if key.ends_with("uptime_s") || key.starts_with("restarts.") && key != "restarts.total" {
            continue;
        }
        let pointer = format!("/{}", key.replace('.', "/"));
        let value = match json.pointer(&pointer) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) => "none".to_string(),
            Some(v) => v.to_string(),
            None => "<missing>".to_string(),
        };
        if &value != text {
            wrong.push(format!("{key}: text {text}, JSON {value}"));
        }
    }
    let recent = json
        .pointer("/restarts/recent")
        .and_then(|r| r.as_array())
        .cloned()
        .unwrap_or_default();
    for r in &recent {
        let n = r["number"].as_u64().unwrap_or(0);
        let line = m.get(&format!("restarts.{n}")).cloned().unwrap_or_default();
        let (pid, cause) = (&r["pid"], r["cause"].as_str().unwrap_or("<no cause>"));
        let gen = match &r["generation"] {
            serde_json::Value::Null => "none".to_string(),
            g => g.to_string(),
        };
        let time = r["time"].as_str().unwrap_or("<no time>");
        let want = format!("(pid {pid}, generation {gen}): {cause}");
        if !line.starts_with(time) || !line.ends_with(&want) {
            wrong.push(format!("restart {n}: text {line:?}, JSON {r}"));
        }
    }
    let shown = m
        .keys()
        .filter(|k| k.starts_with("restarts.") && *k != "restarts.total");
    if shown.count() != recent.len() {
        wrong.push(format!("{} restarts in JSON", recent.len()));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

/// `vsockd status` after two worker kills: the keeper's and the worker's
/// pids, the generation, both restarts with their cause, the connections
/// open, and each queue where the driver saw it; `--json` says the same.
#[test]
fn status_after_two_worker_kills() {
    let rig = Rig::with(
        "status-kills",
        VmOptions {
            queues: 3,
            ..opts()
        },
    );
    if rig.skip_on_peer("the peer has no vsockd status") {
        return;
    }
    let pairs: Vec<(VStream, UnixStream)> =
        (0..3u32).map(|i| rig.pair(7500 + i, i % 2 == 0)).collect();
    for (i, (g, h)) in pairs.iter().enumerate() {
        rig.check_pair(g, h, 70 + i as u64, "before the kills");
    }
    let mut killed = Vec::new();
    for k in 0..2 {
        killed.push(rig.ok(rig.backend.kill_worker(T), &format!("kill #{k}")));
        // Each connection survives, and carries bytes again.
        for (i, (g, h)) in pairs.iter().enumerate() {
            rig.check_pair(g, h, 80 + 10 * k + i as u64, &format!("after kill #{k}"));
        }
    }
    rig.ok(
        rig.vm()
            .wait_tx_idle(T)
            .then_some(())
            .ok_or("TX never idle"),
        "wait",
    );
    let keeper = rig.backend.pid().unwrap_or(0);
    let m = settled_status(&rig, |m| {
        let worker = rig.backend.worker_pid().unwrap_or(0);
        let mut wrong = Vec::new();
        for (k, v) in [
            ("mode", "keeper".to_string()),
            ("keeper.pid", keeper.to_string()),
            ("worker.pid", worker.to_string()),
            ("worker.state", "ready".into()),
            ("worker.generation", "3".into()),
            ("restarts.total", "2".into()),
            ("source", "state region".into()),
        ] {
            if m.get(k) != Some(&v) {
                wrong.push(format!("{k}: {:?} (expected {v})", m.get(k)));
            }
        }
        for (n, pid) in killed.iter().enumerate() {
            let line = m
                .get(&format!("restarts.{}", n + 1))
                .cloned()
                .unwrap_or_default();
            let want = format!(
                "worker {} (pid {pid}, generation {}): killed by signal 9 (SIGKILL)",
                n + 1,
                n + 1
            );
            if !line.ends_with(&want) {
                wrong.push(format!("restart {}: {line:?} (expected …{want})", n + 1));
            }
        }
        if !wrong.is_empty() {
            return Err(wrong.join("; "));
        }
        check_device_lines(m, &expected(&rig, pairs.len()))
    });
    // Not hard-coded: traffic went both ways on both rings.
    for q in ["rx", "tx"] {
        let used: u16 = rig.ok(m[&format!("queues.{q}.used_idx")].parse(), "used_idx");
        assert!(used > 0, "queue {q} never used: {m:?}");
    }
    assert_eq!(rig.vm().conn_count(), pairs.len(), "the driver's count");
    // The JSON document, taken at rest too, says the same.
    let deadline = Instant::now() + T;
    loop {
        let m = status_lines(&rig).unwrap_or_else(|e| rig.fail(e));
        let json = status_json(&rig).unwrap_or_else(|e| rig.fail(e));
        match check_json_matches(&json, &m) {
            Ok(()) => {
                assert_eq!(json["worker"]["generation"], 3);
                assert_eq!(json["restarts"]["total"], 2);
                break;
            }
            Err(e) if Instant::now() > deadline => rig.fail(format!("JSON differs: {e}")),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
    drop(pairs);
}

/// `vsockd status` of a worker running alone: no keeper, no generation,
/// no restarts, and the device's own figures.
#[test]
fn status_without_a_keeper() {
    let rig = Rig::with_args(
        "status-no-keeper",
        VmOptions {
            queues: 3,
            ..opts()
        },
        None,
        &["--no-keeper"],
    );
    if rig.skip_on_peer("the peer has no vsockd status") {
        return;
    }
    let pairs: Vec<(VStream, UnixStream)> = (0..2u32).map(|i| rig.pair(7600 + i, i == 0)).collect();
    for (i, (g, h)) in pairs.iter().enumerate() {
        rig.check_pair(g, h, 90 + i as u64, "no keeper");
    }
    rig.ok(
        rig.vm()
            .wait_tx_idle(T)
            .then_some(())
            .ok_or("TX never idle"),
        "wait",
    );
    let pid = rig.backend.pid().unwrap_or(0).to_string();
    let m = settled_status(&rig, |m| {
        for (k, v) in [
            ("mode", "no-keeper"),
            ("keeper.pid", "none"),
            ("worker.pid", pid.as_str()),
            ("worker.generation", "none"),
            ("restarts.total", "0"),
            ("source", "worker"),
        ] {
            if m.get(k).map(String::as_str) != Some(v) {
                return Err(format!("{k}: {:?} (expected {v})", m.get(k)));
            }
        }
        check_device_lines(m, &expected(&rig, pairs.len()))
    });
    let used: u16 = rig.ok(m["queues.tx.used_idx"].parse(), "used_idx");
    assert!(used > 0, "{m:?}");
    let json = status_json(&rig).unwrap_or_else(|e| rig.fail(e));
    assert!(json["keeper"].is_null(), "{json}");
    assert_eq!(
        json["worker"]["pid"].as_u64(),
        rig.backend.pid().map(u64::from)
    );
    assert_eq!(json["connections"]["total"], pairs.len());
    drop(pairs);
}

/// Junk, an over-long line and a client that never sends on the control
/// socket: each bad one gets an error line (or is left to its deadline),
/// vsockd keeps serving status and the device; once it is stopped, status
/// says so in one line and exits 1.
#[test]
fn status_control_socket_survives_junk_and_reports_a_stopped_instance() {
    let mut rig = Rig::new("status-junk");
    if rig.skip_on_peer("the peer has no vsockd status") {
        return;
    }
    let ctl = PathBuf::from(format!("{}.ctl", rig.backend.socket().display()));
    let silent = rig.ok(UnixStream::connect(&ctl), "silent client");
    let answer = |bytes: &[u8]| -> String {
        let mut c = rig.ok(UnixStream::connect(&ctl), "connect to the control socket");
        set_timeouts(&c);
        rig.ok(c.write_all(bytes), "send junk");
        let mut text = String::new();
        rig.ok(c.read_to_string(&mut text), "read the answer");
        text
    };
    let a = answer(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        a.starts_with("error: unknown request \"GET / HTTP/1.1\"") && a.lines().count() == 1,
        "{a:?}"
    );
    let a = answer(&[0xff; 4096]);
    assert!(
        a.starts_with("error: request longer than") && a.lines().count() == 1,
        "{a:?}"
    );
    let a = answer(b"status json\n");
    assert!(a.starts_with("ok\n{"), "{a:?}");
    // The device and status still work, the silent client notwithstanding.
    let (g, h) = rig.pair(7700, true);
    rig.check_pair(&g, &h, 99, "after junk");
    let m = status_lines(&rig).unwrap_or_else(|e| rig.fail(e));
    assert_eq!(
        m.get("connections.total").map(String::as_str),
        Some("1"),
        "{m:?}"
    );
    let log = std::fs::read_to_string(rig.backend.log_path()).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("unknown request")),
        "junk is logged at warn"
    );
    drop((g, h, silent));
    rig.assert_clean();
    rig.backend.stop();
    let out = rig.ok(rig.backend.status(false), "status of a stopped vsockd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.contains(&ctl.display().to_string()), "{err:?}");
    assert!(out.stdout.is_empty());
}

/// Largest chunk a kill may drop or repeat on a raw host stream: what one
/// socket call moves, whose record the kill prevented. Host to guest, one
/// RX read (16 buffers of 4 KiB); guest to host, one write of bytes the
/// guest sent within its credit (vsockd's default `buf_alloc`, 1 MiB).
const CHAOS_CHUNK_TO_GUEST_BYTES: u64 = 64 * KIB;
const CHAOS_CHUNK_TO_HOST_BYTES: u64 = MIB;

/// Writes the pattern of `seed` until `stop`, then half-closes; returns
/// the bytes written.
fn write_until<W: Write>(
    mut w: W,
    seed: u64,
    stop: &std::sync::atomic::AtomicBool,
    close: impl FnOnce() -> io::Result<()>,
) -> io::Result<u64> {
    let mut buf = vec![0u8; 24 * KIB as usize];
    let mut k = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        pattern::fill(seed, k, &mut buf);
        w.write_all(&buf)?;
        k += buf.len() as u64;
    }
    close()?;
    Ok(k)
}

/// One exchange on a short-lived connection during the chaos: `CHURN_BYTES`
/// each way, each side half-closing after its bytes, both read to EOF
/// through gap-tolerant checkers (a kill may cost a raw stream one chunk,
/// here the whole message; the caller counts it).
type FlowResult = (
    String,
    io::Result<io::Result<(u64, u64)>>,
    io::Result<vsockd_tests::chaos::StreamCheck>,
);

const CHURN_BYTES: u64 = 3000;
/// Opens a connection on `port`, exchanges `CHURN_BYTES` each way (each
/// side half-closes after its bytes; both read to EOF through gap-tolerant
/// checkers) and drops it. A kill during its set-up must cost nothing:
/// the host client gets its OK (a kill between writing it and recording
/// that may send it twice, counted as a repeated chunk), and the host
/// service sees the guest's connect once.
fn churn_exchange(rig: &Rig, port: u32, guest_initiated: bool, n: u32) -> Vec<FlowResult> {
    let vm = rig.vm();
    let seed = 5000 + u64::from(n);
    let what = |s: &str| format!("churn #{n}: {s}");
    let mut ok_line = None;
    let (g, h, hl) = if guest_initiated {
        let hl = rig.ok(HostListener::bind(rig.uds(), port), &what("bind"));
        let g = rig.ok(vm.connect(port), &what("guest connect"));
        let h = rig.ok(hl.accept_timeout(T), &what("host accept"));
        (g, h, Some(hl))
    } else {
        let gl = rig.ok(vm.listen(port), &what("guest listen"));
        let (h, local) = rig.ok(
            hybrid_connect_timeout(rig.uds(), port, T),
            &what("host CONNECT"),
        );
        ok_line = Some(format!("OK {local}\n"));
        let g = rig.ok(gl.accept(T), &what("guest accept"));
        (g, h, None)
    };
    set_timeouts(&h);
    rig.ok(guest_write(&g, seed, 0, CHURN_BYTES), &what("guest write"));
    rig.ok(g.shutdown_write(), &what("guest half-close"));
    let to_host = read_checked_after(&h, seed, ok_line.as_deref());
    if let Some(hl) = &hl {
        if let Ok(extra) = hl.accept_timeout(Duration::ZERO) {
            rig.fail(what(&format!(
                "the host service saw the guest's connect twice ({extra:?})"
            )));
        }
    }
    rig.ok(
        write_verified(&h, reply_seed(seed), CHURN_BYTES),
        &what("host write"),
    );
    rig.ok(h.shutdown(Shutdown::Write), &what("host half-close"));
    let to_guest = read_checked(&g, reply_seed(seed));
    // Both sides half-closed: like Linux, the guest's close then sends
    // nothing and would wait out its close timeout for an RST; drop it.
    drop((g, h));
    vec![
        (what("guest to host"), Ok(Ok((CHURN_BYTES, 0))), to_host),
        (what("host to guest"), Ok(Ok((CHURN_BYTES, 0))), to_guest),
    ]
}

/// `read_checked`, for a host stream that a kill may have given its OK
/// line twice (written, then the kill came before its record): a repeated
/// line is removed and counted as a repeated chunk.
fn read_checked_after(
    mut r: &UnixStream,
    seed: u64,
    ok_line: Option<&str>,
) -> io::Result<vsockd_tests::chaos::StreamCheck> {
    let mut all = Vec::new();
    r.read_to_end(&mut all)?;
    let mut c = vsockd_tests::chaos::StreamCheck::new(seed);
    let mut data = &all[..];
    if let Some(line) = ok_line {
        if let Some(rest) = data.strip_prefix(line.as_bytes()) {
            c.note_repeated_prefix(line.len() as u64);
            data = rest;
        }
    }
    c.feed(data);
    Ok(c)
}

/// Reads to EOF through a gap-tolerant checker.
fn read_checked<R: Read>(mut r: R, seed: u64) -> io::Result<vsockd_tests::chaos::StreamCheck> {
    let mut c = vsockd_tests::chaos::StreamCheck::new(seed);
    let mut buf = vec![0u8; 64 * KIB as usize];
    loop {
        match r.read(&mut buf)? {
            0 => return Ok(c),
            n => c.feed(&buf[..n]),
        }
    }
}

/// A writer and a checking reader per direction of a stream.
type Flow<'s> = (
    String,
    thread::ScopedJoinHandle<'s, io::Result<u64>>,
    thread::ScopedJoinHandle<'s, io::Result<vsockd_tests::chaos::StreamCheck>>,
);

/// Starts both directions of each pair in `sc`: each writer writes its
/// seed's pattern until `stop`, then half-closes; each reader checks what
/// it reads to EOF.
fn stream_flows<'s>(
    sc: &'s thread::Scope<'s, '_>,
    pairs: &'s [(VStream, UnixStream)],
    stop: &'s std::sync::atomic::AtomicBool,
) -> Vec<Flow<'s>> {
    let mut flows = Vec::new();
    for (i, (g, h)) in pairs.iter().enumerate() {
        let (gs, hs) = (1000 + i as u64, 2000 + i as u64);
        let gw = sc.spawn(move || write_until(g, gs, stop, || g.shutdown_write()));
        let hr = sc.spawn(move || read_checked(h, gs));
        let hw = sc.spawn(move || write_until(h, hs, stop, || h.shutdown(Shutdown::Write)));
        let gr = sc.spawn(move || read_checked(g, hs));
        flows.push((format!("stream {i} guest to host"), gw, hr));
        flows.push((format!("stream {i} host to guest"), hw, gr));
    }
    flows
}

/// Opens, exercises and drops connections one after another (see
/// `churn_exchange`) until `stop`, counting them in `churned`.
fn churn_until(
    rig: &Rig,
    stop: &std::sync::atomic::AtomicBool,
    churned: &std::sync::atomic::AtomicU32,
) -> Vec<FlowResult> {
    use std::sync::atomic::Ordering;
    let mut n = 0u32;
    let mut checks = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        checks.extend(churn_exchange(rig, 9000 + n % 500, n % 2 == 0, n));
        n += 1;
        churned.store(n, Ordering::Relaxed);
    }
    checks
}

/// Waits for each flow's writer and reader.
fn join_flows(flows: Vec<Flow<'_>>) -> Vec<FlowResult> {
    flows
        .into_iter()
        .map(|(what, w, r)| {
            let written = w.join().expect("writer thread");
            let read = r.join().expect("reader thread");
            (what, Ok(written.map(|w| (w, 0))), read)
        })
        .collect()
}

#[test]
fn chaos_worker_killed_500_times_during_verified_streams() {
    // VSOCKD_CHAOS_KILLS and VSOCKD_CHAOS_LOG change the count and the
    // backend's log level, to study a failure.
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use vsockd_tests::chaos::ChaosReport;

    const STREAMS: u32 = 8;
    let kills: u32 = std::env::var("VSOCKD_CHAOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    /// Every this many kills, one lands inside a stop and resume.
    const PAUSE_EVERY: u32 = 20;
    let level = std::env::var("VSOCKD_CHAOS_LOG").unwrap_or_else(|_| "info".into());
    let mut rig = Rig::with_log_level("chaos", opts(), Some(&level));
    if rig.skip_without_keeper() {
        return;
    }
    let mut rng = Rng::from_clock();
    eprintln!("chaos: random seed {}", rng.seed());
    let pairs: Vec<(VStream, UnixStream)> = (0..STREAMS)
        .map(|i| rig.pair(7600 + i, i % 2 == 0))
        .collect();
    let stop = AtomicBool::new(false);
    let churned = AtomicU32::new(0);
    let mut report = ChaosReport::default();
    let vm = rig.vm();
    let rig_ref = &rig;
    let results = thread::scope(|sc| {
        let flows = stream_flows(sc, &pairs, &stop);
        let churn = sc.spawn(|| churn_until(rig_ref, &stop, &churned));
        for k in 0..kills {
            thread::sleep(Duration::from_micros(rng.below(8000)));
            if k % PAUSE_EVERY == PAUSE_EVERY - 1 {
                let delay = Duration::from_micros(rng.below(3000));
                let pause = sc.spawn(|| vm.stop().and_then(|()| vm.resume()));
                thread::sleep(delay);
                rig_ref.ok(
                    rig_ref.backend.kill_worker(T),
                    &format!("kill #{k} in a pause"),
                );
                rig_ref.ok(
                    pause.join().expect("pause thread"),
                    &format!("stop and resume around kill #{k}"),
                );
            } else {
                let killed = rig_ref.ok(rig_ref.backend.kill_worker_now(T), &format!("kill #{k}"));
                match wait_for_service(vm, killed.at, T) {
                    Recovery::Served(d) => report.recovery.push(d),
                    other => rig_ref.fail(format!("after kill #{k}: {other}")),
                }
            }
            report.kills += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let churn_checks = rig_ref.ok(
            churn
                .join()
                .map_err(|_| "a churned connection failed (see above)"),
            "churn",
        );
        (join_flows(flows), churn_checks)
    });
    let (mut results, churn_checks) = results;
    results.extend(churn_checks);
    report.connections_churned = churned.load(Ordering::Relaxed);
    let mut failures = Vec::new();
    let (mut affected_to_guest, mut affected_to_host) = (0u64, 0u64);
    for (what, written, read) in results {
        let (written, check) = match (written.and_then(|w| w), read) {
            (Ok((w, _)), Ok(c)) => (w, c),
            (w, r) => {
                report.resets += 1;
                failures.push(format!(
                    "{what}: writer {w:?}, reader {:?}",
                    r.map(|c| c.offset())
                ));
                continue;
            }
        };
        let mut check = check;
        if check.offset() < written && !check.corrupt {
            // The stream's last bytes never came: a gap at its end.
            check.gaps.push(vsockd_tests::chaos::Gap::Lost {
                at: check.offset(),
                n: written - check.offset(),
            });
            check.skip_to(written);
        }
        report.bytes_lost += check.lost();
        report.bytes_duplicated += check.duplicated();
        report.gaps += check.gaps.len() as u32;
        report.bytes_verified += check.offset();
        let affected = check.lost() + check.duplicated();
        if what.ends_with("host to guest") {
            affected_to_guest += affected;
        } else {
            affected_to_host += affected;
        }
        if check.corrupt || check.offset() != written {
            failures.push(format!(
                "{what}: wrote {written}, stream ends at {} after {} bytes received, gaps {:?}, corrupt {}",
                check.offset(),
                check.received,
                check.gaps,
                check.corrupt
            ));
        }
    }
    publish_report(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "chaos, virtual VMM",
        &report.to_string(),
    );
    // Each kill may cost one chunk each way: a kill interrupts one socket
    // call before its record, and an RX read group spans connections.
    let kills = u64::from(report.kills);
    if affected_to_guest > kills * CHAOS_CHUNK_TO_GUEST_BYTES {
        failures.push(format!(
            "{affected_to_guest} bytes lost or repeated host to guest: more than one {CHAOS_CHUNK_TO_GUEST_BYTES}-byte chunk per kill"
        ));
    }
    if affected_to_host > kills * CHAOS_CHUNK_TO_HOST_BYTES {
        failures.push(format!(
            "{affected_to_host} bytes lost or repeated guest to host: more than one {CHAOS_CHUNK_TO_HOST_BYTES}-byte chunk per kill"
        ));
    }
    if !failures.is_empty() {
        rig.fail(format!("{report}\n{}", failures.join("\n")));
    }
    rig.assert_clean();
}

/// Kills that land while a VMM performs the vhost-user handshake (a new
/// frontend's whole start sequence) and while the guest driver resets
/// the device: each handshake completes, and the device then serves new
/// connections both ways.
#[test]
fn chaos_worker_killed_during_handshakes_and_driver_resets() {
    const ROUNDS: u32 = 40;
    let level = std::env::var("VSOCKD_CHAOS_LOG").unwrap_or_else(|_| "info".into());
    let mut rig = Rig::with_log_level("chaos-handshake", opts(), Some(&level));
    if rig.skip_without_keeper() {
        return;
    }
    let mut rng = Rng::from_clock();
    eprintln!("chaos-handshake: random seed {}", rng.seed());
    let vm = rig.vm();
    let mut kills = 0;
    for i in 0..ROUNDS {
        let delay = Duration::from_micros(rng.below(4000));
        let reset = i % 4 == 3;
        thread::scope(|sc| {
            let step = sc.spawn(|| {
                if reset {
                    vm.reset_driver()
                } else {
                    vm.reconnect()
                }
            });
            thread::sleep(delay);
            rig.ok(rig.backend.kill_worker(T), &format!("kill #{i}"));
            kills += 1;
            let what = if reset { "driver reset" } else { "handshake" };
            rig.ok(
                step.join().expect("handshake thread"),
                &format!("{what} around kill #{i} ({delay:?} in)"),
            );
        });
        let (g, h) = rig.pair(9600 + i, i % 2 == 0);
        rig.check_pair(&g, &h, 300 + u64::from(i), &format!("after kill #{i}"));
        drop((g, h));
    }
    // check_pair fails on any byte lost, repeated or reset.
    publish_report(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "chaos in handshakes and driver resets, virtual VMM",
        &format!(
            "kills {kills}, each inside a vhost-user handshake or a driver reset | \
             fresh connections checked after each {kills} | bytes lost 0 | bytes duplicated 0 | \
             resets seen by the guest 0"
        ),
    );
    rig.assert_clean();
}
