//! Exact transfers both ways through every kind of break: the fake
//! vsockd cutting the socket at random points, corrupted frames, stop() and
//! start(), and a new process taking the session over.

mod fake;
mod support;

use std::sync::{Arc, Mutex};
use std::thread;

use fake::{Config, FakeVsockd, Faults, PATTERN_PORT};
use support::{read_pattern, read_pattern_to_end, test_options, write_pattern};
use vsockd_client::{Disconnect, Session};

/// Records every break the session reports.
fn record_breaks(session: &Session) -> Arc<Mutex<Vec<Disconnect>>> {
    let breaks = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&breaks);
    session.on_disconnect(move |disconnect| {
        sink.lock().unwrap().push(disconnect.clone());
    });
    breaks
}

/// Both directions at once, each to its END; then a clean close.
fn transfer_all(session: &Session, g2h_from: u64, h2g_from: u64, config: &Config) {
    thread::scope(|scope| {
        scope.spawn(|| {
            write_pattern(session, h2g_from, config.h2g_bytes, config.seed);
            session.shutdown_write().unwrap();
        });
        let end = read_pattern_to_end(session, g2h_from, config.seed + 1);
        assert_eq!(
            end, config.g2h_bytes,
            "the guest's stream ended early or late"
        );
    });
}

/// The fake's record of the session shows every host byte exactly once and
/// a clean end.
fn assert_exact(server: &FakeVsockd, token: &str, config: &Config) {
    let report = server.session(token).expect("the session is known");
    assert_eq!(report.h2g_mismatch, None, "a host byte arrived wrong");
    assert_eq!(report.h2g_len, config.h2g_bytes);
    assert!(report.h2g_end);
    assert_eq!(report.ended.as_deref(), Some("complete"));
    let stats = server.stats();
    assert!(stats.violations.is_empty(), "{:?}", stats.violations);
    assert!(stats.refusals.is_empty(), "{:?}", stats.refusals);
}

#[test]
fn exact_both_ways_across_random_breaks() {
    let config = Config {
        g2h_bytes: 3 << 20,
        h2g_bytes: 3 << 20,
        seed: 7,
        faults: Faults {
            break_after_bytes: Some((1, 160 << 10)),
            corrupt_one_in: None,
        },
    };
    let server = FakeVsockd::start(config.clone());
    let session = Session::connect(server.path(), PATTERN_PORT, test_options()).unwrap();
    let breaks = record_breaks(&session);
    let token = session.token().to_string();

    transfer_all(&session, 0, 0, &config);
    let reattaches = session.reattach_count();
    session.close().unwrap();

    assert_exact(&server, &token, &config);
    let breaks = breaks.lock().unwrap();
    let injected = server.stats().injected_breaks;
    assert!(injected >= 30, "only {injected} breaks injected");
    assert!(
        breaks.len() as u64 >= 30,
        "only {} breaks reported",
        breaks.len()
    );
    assert!(reattaches >= 30, "only {reattaches} reattaches");
    for (i, disconnect) in breaks.iter().enumerate() {
        assert_eq!(disconnect.break_number, i as u64 + 1);
        assert!(!disconnect.reason.is_empty());
    }
}

#[test]
fn corrupted_frames_are_never_delivered() {
    let config = Config {
        g2h_bytes: 1 << 20,
        h2g_bytes: 256 << 10,
        seed: 11,
        faults: Faults {
            break_after_bytes: None,
            corrupt_one_in: Some(4),
        },
    };
    let server = FakeVsockd::start(config.clone());
    let session = Session::connect(server.path(), PATTERN_PORT, test_options()).unwrap();
    let breaks = record_breaks(&session);
    let token = session.token().to_string();

    transfer_all(&session, 0, 0, &config);
    session.close().unwrap();

    assert_exact(&server, &token, &config);
    assert!(server.stats().corrupted_frames > 0);
    let breaks = breaks.lock().unwrap();
    let checksum_breaks = breaks
        .iter()
        .filter(|d| d.reason.contains("checksum"))
        .count();
    assert!(checksum_breaks > 0, "{breaks:?}");
}

#[test]
fn stop_and_start_the_same_session_many_times() {
    let config = Config {
        g2h_bytes: 2 << 20,
        h2g_bytes: 2 << 20,
        seed: 3,
        faults: Faults::default(),
    };
    let server = FakeVsockd::start(config.clone());
    let session = Session::connect(server.path(), PATTERN_PORT, test_options()).unwrap();
    let breaks = record_breaks(&session);
    let token = session.token().to_string();
    let mut cycles = 0;

    thread::scope(|scope| {
        scope.spawn(|| {
            write_pattern(&session, 0, config.h2g_bytes, config.seed);
            session.shutdown_write().unwrap();
        });
        // The reader stops and starts the session every 48 KiB, while the
        // writer goes on writing.
        let mut offset = 0;
        while offset < config.g2h_bytes {
            let next = (offset + (48 << 10)).min(config.g2h_bytes);
            read_pattern(&session, offset, next, offset);
            offset = next;
            session.stop();
            assert!(!session.is_attached());
            session.start().unwrap();
            cycles += 1;
        }
        assert_eq!(read_pattern_to_end(&session, offset, 0), config.g2h_bytes);
    });
    assert!(cycles >= 40, "only {cycles} stop/start cycles");
    assert_eq!(session.reattach_count(), cycles);
    assert!(breaks.lock().unwrap().is_empty(), "stop() is not a break");
    session.close().unwrap();
    assert_exact(&server, &token, &config);
}

#[test]
fn a_new_process_resumes_where_the_old_one_stopped() {
    let config = Config {
        g2h_bytes: 2 << 20,
        h2g_bytes: 2 << 20,
        seed: 5,
        faults: Faults {
            break_after_bytes: Some((32 << 10, 256 << 10)),
            corrupt_one_in: None,
        },
    };
    let server = FakeVsockd::start(config.clone());
    let mut token = None;
    let mut received = 0;
    for round in 0..4u64 {
        // Each "process" writes and reads part of the streams, then dies.
        let session = match token {
            None => Session::connect(server.path(), PATTERN_PORT, test_options()).unwrap(),
            Some(token) => {
                let session = Session::resume(server.path(), token, received, test_options())
                    .unwrap_or_else(|err| {
                        panic!(
                            "{err}: {:?} {:?}",
                            server.session(&token.to_string()),
                            server.stats()
                        )
                    });
                assert_eq!(session.host_port(), None);
                assert_eq!(session.received(), received);
                session
            }
        };
        token = Some(session.token());
        let h2g_from = session.peer_received();
        assert_eq!(session.sent(), h2g_from);
        let h2g_to = (round + 1) * (400 << 10);
        let g2h_to = (round + 1) * (300 << 10);
        thread::scope(|scope| {
            scope.spawn(|| write_pattern(&session, h2g_from, h2g_to, round));
            read_pattern(&session, received, g2h_to, round);
        });
        received = session.received();
        assert_eq!(received, g2h_to);
        drop(session);
    }

    let token = token.unwrap();
    let session =
        Session::resume(server.path(), token, received, test_options()).unwrap_or_else(|err| {
            panic!(
                "{err}: {:?} {:?}",
                server.session(&token.to_string()),
                server.stats()
            )
        });
    let h2g_from = session.peer_received();
    transfer_all(&session, received, h2g_from, &config);
    session.close().unwrap();
    assert_exact(&server, &token.to_string(), &config);
    assert!(server.stats().resumes >= 5);
}
