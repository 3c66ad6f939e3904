//! Live upgrades over the virtual VMM: `vsockd upgrade` while verified
//! streams run both ways lose and repeat nothing, and an upgrade to a
//! binary that cannot take over rolls back with traffic going on.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::*;
use vsockd_tests::chaos::percentile;

/// Runs `vsockd upgrade` for the rig's backend: what it printed, or its
/// exit status and what it said on stderr.
fn upgrade(rig: &Rig) -> Result<String, String> {
    upgrade_with(rig, &[])
}

/// `upgrade` with more arguments (`--keeper`).
fn upgrade_with(rig: &Rig, extra: &[&str]) -> Result<String, String> {
    let out = rig.ok(rig.backend.upgrade_with(extra), "run vsockd upgrade");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The pause an upgrade's answer reports (`pause: <ms> ms`).
fn reported_pause(answer: &str) -> Option<Duration> {
    let ms: f64 = answer
        .lines()
        .find_map(|l| l.strip_prefix("pause: "))?
        .strip_suffix(" ms")?
        .parse()
        .ok()?;
    Some(Duration::from_secs_f64(ms / 1e3))
}

/// True (and says so) unless the backend under test is vsockd with its
/// keeper: these tests run vsockd binaries of their own.
fn skipped_unless_vsockd(name: &str) -> bool {
    match BackendKind::from_env() {
        Ok(BackendKind::Vsockd) => false,
        other => {
            eprintln!("{name}: SKIPPED with backend {other:?}: it upgrades vsockd binaries");
            true
        }
    }
}

/// Restarts the keeper recorded (crashes: an upgrade is not one).
fn restarts(rig: &Rig) -> String {
    let m = rig.ok(status_lines(rig), "vsockd status");
    m.get("restarts.total").cloned().unwrap_or_default()
}

/// Every flow must end complete, with nothing lost, repeated or corrupt.
fn check_exact(rig: &Rig, results: Vec<FlowResult>) -> u64 {
    let mut verified = 0;
    let mut failures = Vec::new();
    for (what, written, read) in results {
        match (written.and_then(|w| w), read) {
            (Ok((written, _)), Ok(check)) => {
                verified += check.offset();
                if check.corrupt
                    || check.offset() != written
                    || check.lost() != 0
                    || check.duplicated() != 0
                {
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
            (w, r) => failures.push(format!(
                "{what}: writer {w:?}, reader {:?}",
                r.map(|c| c.offset())
            )),
        }
    }
    if !failures.is_empty() {
        rig.fail(failures.join("\n"));
    }
    verified
}

#[test]
fn upgrades_during_verified_streams_lose_and_repeat_nothing() {
    const STREAMS: u32 = 8;
    const UPGRADES: u32 = 20;
    let mut rig = Rig::with_log_level("upgrade-streams", opts(), Some("info"));
    if rig.skip_without_keeper() {
        return;
    }
    let mut rng = Rng::from_clock();
    eprintln!("upgrade-streams: random seed {}", rng.seed());
    let pairs: Vec<(VStream, UnixStream)> = (0..STREAMS)
        .map(|i| rig.pair(7700 + i, i % 2 == 0))
        .collect();
    let stop = AtomicBool::new(false);
    let churned = AtomicU32::new(0);
    let mut pauses = Vec::new();
    let rig_ref = &rig;
    let (flows, churn_checks) = thread::scope(|sc| {
        let flows = stream_flows(sc, &pairs, &stop);
        let churn = sc.spawn(|| churn_until(rig_ref, &stop, &churned));
        for k in 0..UPGRADES {
            thread::sleep(Duration::from_millis(rng.below(100)));
            match upgrade(rig_ref) {
                Ok(answer) => pauses.push(reported_pause(&answer).unwrap_or_else(|| {
                    rig_ref.fail(format!("upgrade #{k}: no pause in {answer:?}"))
                })),
                Err(e) => rig_ref.fail(format!("upgrade #{k} failed: {e}")),
            }
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
    let verified = check_exact(&rig, flows);
    check_exact(&rig, churn_checks);
    // Upgrades are not crashes.
    assert_eq!(restarts(&rig), "0", "{}", rig.backend.log_tail(40));
    pauses.sort();
    let line = format!(
        "{UPGRADES} upgrades, {:.2} GB verified on {STREAMS} streams, {} connections churned, 0 bytes lost or repeated, 0 resets; pause (quiesce to ready) p50 {:?}, max {:?}",
        verified as f64 / 1e9,
        churned.load(Ordering::Relaxed),
        percentile(&pauses, 0.5),
        pauses.last().copied().unwrap_or_default()
    );
    publish_report(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "upgrade, virtual VMM",
        &line,
    );
    rig.assert_clean();
}

/// An upgrade to a binary that aborts at once: `vsockd upgrade` fails
/// naming the abort, the old worker never stopped, and once the binary on
/// disk is a good one again the next upgrade goes through.
#[test]
fn upgrade_to_a_binary_that_crashes_on_start_rolls_back() {
    if skipped_unless_vsockd("upgrade-abort") {
        return;
    }
    let mut rig = Rig::from_copy("upgrade-abort", None);
    let bin = rig.dir.join("bin").join("vsockd");
    let (g, h) = rig.pair(7800, true);
    rig.check_pair(&g, &h, 1, "before");
    rig.ok(
        install_binary(Path::new(env!("CARGO_BIN_EXE_abort-on-start")), &bin),
        "install the aborting binary",
    );
    match upgrade(&rig) {
        Ok(answer) => rig.fail(format!(
            "the upgrade to an aborting binary succeeded: {answer}"
        )),
        Err(e) if e.contains("SIGABRT") && e.contains("never stopped serving") => {}
        Err(e) => rig.fail(format!("unexpected failure: {e}")),
    }
    rig.check_pair(&g, &h, 2, "after the failed upgrade");
    let (g2, h2) = rig.pair(7801, false);
    rig.check_pair(&g2, &h2, 3, "a new connection after the failed upgrade");
    rig.ok(
        install_binary(&BackendKind::Vsockd.binary(), &bin),
        "install vsockd again",
    );
    rig.ok(upgrade(&rig), "upgrade to a good binary");
    rig.check_pair(&g, &h, 4, "after the good upgrade");
    rig.check_pair(&g2, &h2, 5, "after the good upgrade");
    assert_eq!(restarts(&rig), "0");
    rig.assert_clean();
}

/// A standby killed after it took the state region over (crash point
/// `standby-adopt`): the old worker cannot resume from its memory, so a
/// worker from the running binary adopts the region, and the connections
/// carry on.
#[test]
fn a_standby_killed_while_adopting_hands_back_to_the_running_binary() {
    let mut rig = Rig::with_env(
        "upgrade-adopt-kill",
        opts(),
        None,
        &[],
        &[("VSOCKD_CRASH_POINT", "standby-adopt")],
    );
    if rig.skip_without_keeper() {
        return;
    }
    let (g, h) = rig.pair(7810, false);
    rig.check_pair(&g, &h, 1, "before");
    match upgrade(&rig) {
        Ok(answer) => rig.fail(format!("the upgrade succeeded: {answer}")),
        Err(e) if e.contains("SIGKILL") && e.contains("running binary adopts") => {}
        Err(e) => rig.fail(format!("unexpected failure: {e}")),
    }
    rig.check_pair(&g, &h, 2, "after the failed upgrade");
    // The crash point is spent: the next upgrade goes through.
    rig.ok(upgrade(&rig), "the second upgrade");
    rig.check_pair(&g, &h, 3, "after the second upgrade");
    rig.assert_clean();
}

#[test]
fn upgrade_without_a_keeper_is_refused_with_the_reason() {
    if skipped_unless_vsockd("upgrade-no-keeper") {
        return;
    }
    let mut rig = Rig::start("upgrade-no-keeper", opts(), |dir| {
        Backend::start_in(BackendKind::VsockdNoKeeper, dir, CID, None, &[])
    });
    match upgrade(&rig) {
        Ok(answer) => rig.fail(format!("upgraded without a keeper: {answer}")),
        Err(e) if e.contains("--no-keeper") => {}
        Err(e) => rig.fail(format!("unexpected failure: {e}")),
    }
    let (g, h) = rig.pair(7820, true);
    rig.check_pair(&g, &h, 1, "after the refusal");
    rig.assert_clean();
}

/// An upgrade to a binary with a newer state-region layout (vsockd built
/// here with feature `layout-next`) migrates the region and serves on;
/// a crash after it restarts the worker from that binary, though the file
/// on disk is an older build by then; and the upgrade to that older build
/// is refused, since it cannot read the newer layout: the worker serves
/// on. Connections carry bytes both ways throughout.
#[test]
fn upgrade_to_a_newer_layout_migrates_and_the_way_back_is_refused() {
    if skipped_unless_vsockd("upgrade-layout") {
        return;
    }
    let next = vsockd_tests::backend::layout_next_binary().unwrap_or_else(|e| panic!("{e}"));
    let mut rig = Rig::from_copy("upgrade-layout", None);
    let bin = rig.dir.join("bin").join("vsockd");
    let (g, h) = rig.pair(7830, false);
    let (g2, h2) = rig.pair(7831, true);
    rig.check_pair(&g, &h, 1, "before");
    rig.ok(install_binary(&next, &bin), "install the layout-next build");
    let answer = rig.ok(upgrade(&rig), "upgrade to the newer layout");
    if !answer.contains("layout: 4 (migrated from 3)") {
        rig.fail(format!("the upgrade did not migrate the layout: {answer}"));
    }
    rig.check_pair(&g, &h, 2, "after the migration");
    rig.check_pair(&g2, &h2, 3, "after the migration");
    // The file on disk is the older build again; a crashed worker comes
    // back from the binary it ran, which reads the newer layout.
    rig.ok(
        install_binary(&BackendKind::Vsockd.binary(), &bin),
        "install the current build",
    );
    rig.ok(rig.backend.kill_worker(T), "kill the worker");
    rig.check_pair(&g, &h, 4, "after a crash");
    match upgrade(&rig) {
        Ok(answer) => rig.fail(format!(
            "the upgrade to an older layout succeeded: {answer}"
        )),
        Err(e) if e.contains("layout version 4") && e.contains("never stopped serving") => {}
        Err(e) => rig.fail(format!("unexpected failure: {e}")),
    }
    rig.check_pair(&g, &h, 5, "after the refused upgrade");
    rig.check_pair(&g2, &h2, 6, "after the refused upgrade");
    let (g3, h3) = rig.pair(7832, false);
    rig.check_pair(&g3, &h3, 7, "a new connection");
    assert_eq!(restarts(&rig), "1", "{}", rig.backend.log_tail(30));
    rig.assert_clean();
}

/// `vsockd upgrade --keeper`: the worker is upgraded, then the keeper
/// re-executes itself in the same process. Streams running both ways
/// through three such upgrades lose and repeat nothing; the keeper keeps
/// its restart log, accepts new host clients, and restarts a killed
/// worker afterwards.
#[test]
fn keeper_upgrades_keep_every_connection_and_the_restart_log() {
    if skipped_unless_vsockd("upgrade-keeper") {
        return;
    }
    let mut rig = Rig::from_copy("upgrade-keeper", Some("info"));
    let keeper_pid = rig.backend.pid();
    let (g, h) = rig.pair(7840, false);
    rig.check_pair(&g, &h, 1, "before");
    rig.ok(rig.backend.kill_worker(T), "kill the worker");
    rig.check_pair(&g, &h, 2, "after a crash");
    let pairs: Vec<(VStream, UnixStream)> =
        (0..4).map(|i| rig.pair(7850 + i, i % 2 == 0)).collect();
    let stop = AtomicBool::new(false);
    let rig_ref = &rig;
    let flows = thread::scope(|sc| {
        let flows = stream_flows(sc, &pairs, &stop);
        for k in 0..3 {
            thread::sleep(Duration::from_millis(50));
            let answer = match upgrade_with(rig_ref, &["--keeper"]) {
                Ok(a) => a,
                Err(e) => rig_ref.fail(format!("keeper upgrade #{k} failed: {e}")),
            };
            let want = format!("keeper: pid {} re-executed", keeper_pid.unwrap_or(0));
            if !answer.contains(&want) || !answer.contains("pause: ") {
                rig_ref.fail(format!("keeper upgrade #{k}: {answer:?} lacks {want:?}"));
            }
        }
        stop.store(true, Ordering::Relaxed);
        join_flows(flows)
    });
    check_exact(&rig, flows);
    assert_eq!(
        rig.backend.pid(),
        keeper_pid,
        "the keeper's process changed"
    );
    // The restart log came through the three re-executions.
    assert_eq!(restarts(&rig), "1");
    rig.check_pair(&g, &h, 3, "after the keeper upgrades");
    let (g2, h2) = rig.pair(7860, false);
    rig.check_pair(&g2, &h2, 4, "a host client the new keeper accepted");
    rig.ok(rig.backend.kill_worker(T), "kill the worker");
    rig.check_pair(&g, &h, 5, "after a crash under the new keeper");
    assert_eq!(restarts(&rig), "2");
    rig.assert_clean();
}
