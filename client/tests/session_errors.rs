//! Breaks, refusals and failures of resumable sessions.

mod fake;
mod support;

use std::io::{ErrorKind, Read, Write};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use fake::{Config, FakeVsockd, ECHO_PORT};
use support::{test_options, wait_until};
use vsockd_client::{ClientError, Disconnect, Options, Session, SessionFailure, Token};

/// Writes `message` and reads its echo back.
fn round_trip(session: &Session, message: &[u8]) {
    (&*session).write_all(message).unwrap();
    let mut echoed = vec![0u8; message.len()];
    (&*session).read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, message);
}

fn record_breaks(session: &Session) -> Arc<Mutex<Vec<Disconnect>>> {
    let breaks = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&breaks);
    session.on_disconnect(move |disconnect| sink.lock().unwrap().push(disconnect.clone()));
    breaks
}

#[test]
fn the_callback_fires_once_per_break() {
    let server = FakeVsockd::start(Config::default());
    let session = Session::connect(server.path(), ECHO_PORT, test_options()).unwrap();
    let breaks = record_breaks(&session);
    let token = session.token().to_string();
    for round in 1..=10u64 {
        round_trip(&session, format!("before break {round}").as_bytes());
        assert!(server.break_connection(&token), "the session was attached");
        wait_until("the break's callback", || {
            breaks.lock().unwrap().len() as u64 >= round
        });
    }
    round_trip(&session, b"after the last break");
    let breaks = breaks.lock().unwrap();
    assert_eq!(breaks.len(), 10);
    assert_eq!(session.reattach_count(), 10);
    for (i, disconnect) in breaks.iter().enumerate() {
        assert_eq!(disconnect.break_number, i as u64 + 1);
        assert!(
            disconnect.reason.contains("vsockd"),
            "{}",
            disconnect.reason
        );
    }
    let last = breaks.last().unwrap();
    assert_eq!(last.sent, last.received, "everything sent came back");
}

#[test]
fn an_unknown_token_is_refused_clearly() {
    let server = FakeVsockd::start(Config::default());
    let err = Session::resume(server.path(), Token([7; 16]), 0, test_options()).unwrap_err();
    match &err {
        ClientError::Session(SessionFailure::ResumeRefused { reason, .. }) => {
            assert_eq!(reason, "no such session");
        }
        other => panic!("unexpected error: {other}"),
    }
    let message = err.to_string();
    assert!(message.contains("refused to resume"), "{message}");
    assert!(message.contains("no such session"), "{message}");
}

#[test]
fn a_port_without_a_listener_is_no_reply() {
    let server = FakeVsockd::start(Config::default());
    let err = Session::connect(server.path(), 4242, test_options()).unwrap_err();
    assert!(matches!(err, ClientError::NoReply { .. }), "{err}");
    assert!(err.to_string().contains("CONNECT 4242 resumable"), "{err}");
}

#[test]
fn the_session_waits_while_vsockd_is_away() {
    let server = FakeVsockd::start(Config::default());
    let session = Session::connect(server.path(), ECHO_PORT, test_options()).unwrap();
    let breaks = record_breaks(&session);
    let token = session.token().to_string();
    round_trip(&session, b"before");

    // vsockd goes away: the socket file stays (ECONNREFUSED), ...
    server.pause_listener(false);
    server.break_connection(&token);
    wait_until("the break", || !breaks.lock().unwrap().is_empty());
    (&session).write_all(b"written while detached").unwrap();
    // (These pauses only let attempts fail for a while; nothing waits on
    // them.)
    thread::sleep(Duration::from_millis(100));
    // ... then the file goes too (ENOENT), then vsockd comes back.
    std::fs::remove_file(server.path()).unwrap();
    thread::sleep(Duration::from_millis(100));
    server.resume_listener();

    let mut echoed = vec![0u8; 22];
    (&session).read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, b"written while detached");
    assert_eq!(session.reattach_count(), 1);
    assert_eq!(breaks.lock().unwrap().len(), 1);
}

#[test]
fn reattaching_gives_up_after_the_timeout() {
    let server = FakeVsockd::start(Config::default());
    let opts = Options {
        reattach_timeout: Duration::from_millis(300),
        ..test_options()
    };
    let session = Session::connect(server.path(), ECHO_PORT, opts).unwrap();
    let token = session.token().to_string();
    round_trip(&session, b"hello");
    server.pause_listener(true);
    server.break_connection(&token);

    let err = (&session).read(&mut [0u8; 16]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    let message = err.to_string();
    assert!(message.contains("could not reattach"), "{message}");
    assert!(message.contains("vsock.sock"), "{message}");
    // The failure is final and every call reports it.
    assert!((&session).write(b"x").is_err());
    assert!(matches!(
        session.start(),
        Err(ClientError::Session(
            SessionFailure::ReattachTimedOut { .. }
        ))
    ));
    server.resume_listener();
}

#[test]
fn a_guest_reset_ends_the_session_with_vsockds_message() {
    let server = FakeVsockd::start(Config::default());
    let session = Session::connect(server.path(), ECHO_PORT, test_options()).unwrap();
    let breaks = record_breaks(&session);
    round_trip(&session, b"hello");
    server.reset_guest(&session.token().to_string());

    let err = (&session).read(&mut [0u8; 16]).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("refused to resume"), "{message}");
    assert!(message.contains("guest reset"), "{message}");
    let breaks = breaks.lock().unwrap();
    assert_eq!(breaks.len(), 1);
    assert!(
        breaks[0].reason.contains("guest reset"),
        "{}",
        breaks[0].reason
    );
}
