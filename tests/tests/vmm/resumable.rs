//! Resumable host sessions over the virtual VMM, against the vsockd binary:
//! verified streams over sessions lose and repeat nothing across worker
//! kills and upgrades, a session nobody resumes resets the guest after
//! the grace period, and bad tokens, offsets and frames get one answer on
//! that socket alone.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use vsockd_client::{Options, Session};
use vsockd_tests::chaos::{ChaosReport, StreamCheck};

/// True (and says so) unless the backend under test is vsockd with its
/// keeper: only vsockd has resumable sessions.
fn skipped_unless_vsockd(name: &str) -> bool {
    match BackendKind::from_env() {
        Ok(BackendKind::Vsockd) => false,
        other => {
            eprintln!("{name}: SKIPPED with backend {other:?}: resumable sessions are vsockd's");
            true
        }
    }
}

/// Session options for tests: reattach patiently (a restart under load
/// takes a while), retry often.
fn session_opts() -> Options {
    Options {
        reattach_timeout: Duration::from_secs(60),
        retry_interval: Duration::from_millis(5),
        ..Options::default()
    }
}

impl Rig {
    /// A resumable session to a guest listener on `port`, with the guest's
    /// end.
    fn session(&self, port: u32) -> (VStream, Session) {
        let gl = self.ok(self.vm().listen(port), "guest listen");
        let s = self.ok(
            Session::connect(self.uds(), port, session_opts()),
            &format!("resumable CONNECT {port}"),
        );
        let g = self.ok(gl.accept(T), "guest accept");
        (g, s)
    }
}

/// Both directions of each session: pattern writers until `stop`, then
/// an end (guest `SHUT_WR`, client `END`), and checking readers to EOF.
fn session_flows<'s>(
    sc: &'s thread::Scope<'s, '_>,
    sessions: &'s [(VStream, Session)],
    stop: &'s AtomicBool,
) -> Vec<Flow<'s>> {
    let mut flows = Vec::new();
    for (i, (g, s)) in sessions.iter().enumerate() {
        let (gs, hs) = (3000 + i as u64, 4000 + i as u64);
        let gw = sc.spawn(move || write_until(g, gs, stop, || g.shutdown_write()));
        let hr = sc.spawn(move || read_checked(s, gs));
        let hw = sc.spawn(move || {
            write_until(s, hs, stop, || s.shutdown_write().map_err(io::Error::other))
        });
        let gr = sc.spawn(move || read_checked(g, hs));
        flows.push((format!("session {i} guest to host"), gw, hr));
        flows.push((format!("session {i} host to guest"), hw, gr));
    }
    flows
}

/// Every flow exact: all bytes written read, none lost, repeated or
/// corrupt. Returns the bytes verified; fails the rig otherwise.
fn check_sessions_exact(rig: &Rig, results: Vec<FlowResult>, report: &mut ChaosReport) {
    let mut failures = Vec::new();
    for (what, written, read) in results {
        match (written.and_then(|w| w), read) {
            (Ok((written, _)), Ok(check)) => {
                report.bytes_verified += check.offset();
                report.bytes_lost += check.lost();
                report.bytes_duplicated += check.duplicated();
                report.gaps += check.gaps.len() as u32;
                if !exact(&check, written) {
                    failures.push(format!(
                        "{what}: wrote {written}, stream ends at {}, lost {}, repeated {}, gaps {:?}, corrupt {}",
                        check.offset(),
                        check.lost(),
                        check.duplicated(),
                        check.gaps,
                        check.corrupt
                    ));
                }
            }
            (w, r) => {
                report.resets += 1;
                failures.push(format!(
                    "{what}: writer {w:?}, reader {:?}",
                    r.map(|c| c.offset())
                ))
            }
        }
    }
    if !failures.is_empty() {
        rig.fail(format!("{report}\n{}", failures.join("\n")));
    }
}

/// Ends the test process with `what` if it is still alive `limit` from
/// now, unless dropped first: a stream that stops moving would otherwise
/// block its reader (and the test) for ever.
struct Watchdog {
    _cancel: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    fn arm(what: String, limit: Duration) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("{what}: still running after {limit:?}: a stream stopped moving");
                std::process::exit(101);
            }
        });
        Watchdog { _cancel: tx }
    }
}

fn exact(check: &StreamCheck, written: u64) -> bool {
    !check.corrupt
        && check.offset() == written
        && check.lost() == 0
        && check.duplicated() == 0
        && check.gaps.is_empty()
}

#[test]
fn resumable_sessions_lose_and_repeat_nothing_across_30_worker_kills() {
    const SESSIONS: u32 = 4;
    const KILLS: u32 = 30;
    let name = "resumable-kills";
    if skipped_unless_vsockd(name) {
        return;
    }
    let mut rig = Rig::with_log_level(name, opts(), Some("info"));
    let mut rng = Rng::from_clock();
    eprintln!("{name}: random seed {}", rng.seed());
    let sessions: Vec<(VStream, Session)> = (0..SESSIONS).map(|i| rig.session(7900 + i)).collect();
    let stop = AtomicBool::new(false);
    let mut report = ChaosReport::default();
    let vm = rig.vm();
    let rig_ref = &rig;
    let watchdog = Watchdog::arm(name.to_string(), Duration::from_secs(300));
    let results = thread::scope(|sc| {
        let flows = session_flows(sc, &sessions, &stop);
        for k in 0..KILLS {
            thread::sleep(Duration::from_micros(rng.below(40_000)));
            let killed = rig_ref.ok(rig_ref.backend.kill_worker_now(T), &format!("kill #{k}"));
            match wait_for_service(vm, killed.at, T) {
                Recovery::Served(d) => report.recovery.push(d),
                other => rig_ref.fail(format!("after kill #{k}: {other}")),
            }
            report.kills += 1;
        }
        stop.store(true, Ordering::Relaxed);
        join_flows(flows)
    });
    drop(watchdog);
    check_sessions_exact(&rig, results, &mut report);
    let reattached: u64 = sessions.iter().map(|(_, s)| s.reattach_count()).sum();
    publish_report(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "resumable sessions, worker kills, virtual VMM",
        &format!("{report}, reattachments {reattached}"),
    );
    // Every kill detaches every attached session: each one reattached.
    for (i, (_, s)) in sessions.iter().enumerate() {
        if s.reattach_count() == 0 {
            rig.fail(format!("session {i} never reattached across {KILLS} kills"));
        }
    }
    for (_, s) in sessions {
        rig.ok(s.close(), "close a finished session");
    }
    rig.assert_clean();
}

#[test]
fn resumable_sessions_are_handed_over_attached_across_upgrades() {
    const SESSIONS: u32 = 4;
    const UPGRADES: u32 = 10;
    let name = "resumable-upgrades";
    if skipped_unless_vsockd(name) {
        return;
    }
    let mut rig = Rig::with_log_level(name, opts(), Some("info"));
    let mut rng = Rng::from_clock();
    let sessions: Vec<(VStream, Session)> = (0..SESSIONS).map(|i| rig.session(7950 + i)).collect();
    let stop = AtomicBool::new(false);
    let mut report = ChaosReport::default();
    let rig_ref = &rig;
    let watchdog = Watchdog::arm(name.to_string(), Duration::from_secs(300));
    let results = thread::scope(|sc| {
        let flows = session_flows(sc, &sessions, &stop);
        for k in 0..UPGRADES {
            thread::sleep(Duration::from_millis(rng.below(100)));
            let out = rig_ref.ok(rig_ref.backend.upgrade_with(&[]), "run vsockd upgrade");
            if !out.status.success() {
                rig_ref.fail(format!(
                    "upgrade #{k}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        stop.store(true, Ordering::Relaxed);
        join_flows(flows)
    });
    drop(watchdog);
    check_sessions_exact(&rig, results, &mut report);
    let reattached: u64 = sessions.iter().map(|(_, s)| s.reattach_count()).sum();
    eprintln!("{name}: {report}; reattachments {reattached} over {UPGRADES} upgrades");
    for (_, s) in sessions {
        rig.ok(s.close(), "close a finished session");
    }
    rig.assert_clean();
}

#[test]
fn a_session_nobody_resumes_is_reset_after_the_grace_period() {
    let name = "resumable-grace";
    if skipped_unless_vsockd(name) {
        return;
    }
    let mut rig = Rig::with_args(name, opts(), None, &["--resume-grace", "1"]);
    let (g, s) = rig.session(7990);
    rig.ok(guest_write(&g, 11, 0, 1000), "guest write");
    let mut got = vec![0u8; 1000];
    rig.ok((&s).read_exact(&mut got), "session read");
    let token = s.token();
    let received = s.received();
    s.stop();
    // The guest connection stays open through the grace period: its reads
    // wait, then it is reset.
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let outcome = loop {
        match g.read(&mut buf) {
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                if started.elapsed() > Duration::from_secs(20) {
                    rig.fail("the guest connection was not reset 20 s after its client left");
                }
            }
            other => break other,
        }
    };
    match outcome {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Ok(0) if g.peer_reset() => {}
        other => rig.fail(format!(
            "guest read after {:?}: {other:?} (reset: {}), expected a reset",
            started.elapsed(),
            g.peer_reset()
        )),
    }
    if started.elapsed() < Duration::from_millis(900) {
        rig.fail(format!(
            "reset after {:?}, before the 1 s grace period",
            started.elapsed()
        ));
    }
    match Session::resume(rig.uds(), token, received, session_opts()) {
        Err(e) if e.to_string().contains("unknown or expired token") => {}
        other => rig.fail(format!(
            "resuming an expired session: {:?}",
            other.map(|s| s.token())
        )),
    }
    rig.assert_clean();
}

/// A frame as a client encodes it (kind, offset, payload), with a wrong
/// checksum if `corrupt`: this test's own encoder.
fn frame(kind: u8, offset: u64, payload: &[u8], corrupt: bool) -> Vec<u8> {
    let mut b = vec![0u8; 24];
    b[0] = kind;
    b[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..16]);
    h.update(payload);
    let sum = h.finalize() ^ u32::from(corrupt);
    b[16..20].copy_from_slice(&sum.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn read_line_from(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).map(|n| n == 1).unwrap_or(false) && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn bad_tokens_offsets_and_checksums_are_refused_on_that_socket_alone() {
    let name = "resumable-bad-input";
    if skipped_unless_vsockd(name) {
        return;
    }
    let mut rig = Rig::new(name);
    let (g, s) = rig.session(7991);
    let (g2, h2) = rig.pair(7992, false);
    let uds = rig.uds().to_path_buf();
    let ask = |line: String| {
        let mut c = rig.ok(UnixStream::connect(&uds), "connect");
        set_timeouts(&c);
        rig.ok(c.write_all(line.as_bytes()), "write");
        read_line_from(&mut c)
    };
    let unknown = ask("RESUME 0123456789abcdef0123456789abcdef 0\n".to_string());
    if unknown != "ERR unknown or expired token" {
        rig.fail(format!("unknown token answered {unknown:?}"));
    }
    let beyond = ask(format!("RESUME {} 999999\n", s.token()));
    if !beyond.starts_with("ERR offset 999999 is outside") {
        rig.fail(format!("an offset past the stream answered {beyond:?}"));
    }
    // Take the session over by hand (its own stub stopped, so that it does
    // not take it back) and send a frame with a bad checksum.
    s.stop();
    let mut c = rig.ok(UnixStream::connect(&uds), "connect");
    set_timeouts(&c);
    rig.ok(
        c.write_all(format!("RESUME {} {}\n", s.token(), s.received()).as_bytes()),
        "write RESUME",
    );
    let ok = read_line_from(&mut c);
    let from: u64 = ok
        .strip_prefix("OK ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rig.fail(format!("RESUME answered {ok:?}")));
    rig.ok(
        c.write_all(&frame(1, from, b"not for the guest", true)),
        "write",
    );
    let mut reply = Vec::new();
    let _ = c.read_to_end(&mut reply);
    if reply.first() != Some(&4) || !String::from_utf8_lossy(&reply).contains("checksum") {
        rig.fail(format!("a bad checksum answered {reply:?}"));
    }
    // None of it reached the guest; the session and the other connection
    // carry on.
    g.set_read_timeout(Some(Duration::from_millis(300)));
    let mut b = [0u8; 64];
    if let Ok(n) = g.read(&mut b) {
        rig.fail(format!("the guest read {n} bytes of a bad frame"));
    }
    rig.check_pair(&g2, &h2, 70, "another connection");
    // The session's own client takes it back.
    rig.ok(s.start(), "restart the session's stub");
    rig.ok((&s).write_all(b"still here"), "session write");
    g.set_read_timeout(Some(T));
    let mut got = [0u8; 10];
    rig.ok((&g).read_exact(&mut got), "guest read");
    if &got != b"still here" {
        rig.fail(format!("the guest read {got:?}"));
    }
    rig.assert_clean();
}

/// The guest stream offset `session-peer` recorded in `state`, if any.
fn peer_progress(state: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(state).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn the_host_client_process_killed_10_times_resumes_with_its_token() {
    const PORT: u32 = 7993;
    const SEED: u64 = 8100;
    const BYTES: u64 = 48 << 20;
    const KILLS: u64 = 10;
    let name = "resumable-client-restarts";
    if skipped_unless_vsockd(name) {
        return;
    }
    let mut rig = Rig::with_log_level(name, opts(), Some("info"));
    let mut rng = Rng::from_clock();
    let state = rig.dir.join("session-peer.state");
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_session-peer"))
            .arg(rig.uds())
            .args([PORT.to_string()])
            .arg(&state)
            .args([SEED.to_string(), BYTES.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
    };
    let gl = rig.ok(rig.vm().listen(PORT), "guest listen");
    let mut child = rig.ok(spawn(), "start session-peer");
    let g = rig.ok(gl.accept(T), "guest accept");
    let (written, check) = thread::scope(|sc| {
        let gw = sc.spawn(|| {
            guest_write(&g, SEED, 0, BYTES)?;
            g.shutdown_write()
        });
        let gr = sc.spawn(|| read_checked(&g, reply_seed(SEED)));
        for k in 0..KILLS {
            // Kill it mid-transfer: once it has read past the next mark.
            let mark = (k + 1) * BYTES / (KILLS + 2);
            let started = Instant::now();
            while peer_progress(&state).is_none_or(|r| r < mark) {
                if let Ok(Some(status)) = child.try_wait() {
                    rig.fail(format!("session-peer exited ({status}) before kill #{k}"));
                }
                if started.elapsed() > Duration::from_secs(60) {
                    rig.fail(format!(
                        "session-peer stuck below offset {mark} before kill #{k}"
                    ));
                }
                thread::sleep(Duration::from_millis(1));
            }
            thread::sleep(Duration::from_micros(rng.below(3000)));
            rig.ok(child.kill(), "kill session-peer");
            rig.ok(child.wait(), "reap session-peer");
            child = rig.ok(spawn(), "restart session-peer");
        }
        let started = Instant::now();
        let status = loop {
            if let Some(status) = rig.ok(child.try_wait(), "wait for session-peer") {
                break status;
            }
            if started.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                rig.fail("session-peer did not finish within 120 s of its last restart");
            }
            thread::sleep(Duration::from_millis(5));
        };
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if !status.success() || !out.starts_with("DONE") {
            rig.fail(format!(
                "session-peer after {KILLS} restarts: {status}: {out}"
            ));
        }
        (
            gw.join().expect("guest writer"),
            gr.join().expect("guest reader"),
        )
    });
    rig.ok(written, "guest write");
    let check = rig.ok(check, "guest read");
    if !exact(&check, BYTES) {
        rig.fail(format!(
            "host to guest across {KILLS} client restarts: stream ends at {}, lost {}, repeated {}, gaps {:?}, corrupt {}",
            check.offset(),
            check.lost(),
            check.duplicated(),
            check.gaps,
            check.corrupt
        ));
    }
    eprintln!("{name}: {KILLS} restarts of the client process, {BYTES} bytes each way exact");
    rig.assert_clean();
}
