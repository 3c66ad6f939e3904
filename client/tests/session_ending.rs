//! Ending sessions: END, close, abort, and acknowledgement waits.

mod fake;
mod support;

use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

use fake::{pattern_bytes, Config, FakeVsockd, ECHO_PORT};
use support::test_options;
use vsockd_client::{ClientError, Session, SessionFailure};

#[test]
fn end_reaches_the_guest_and_close_finishes_cleanly() {
    let server = FakeVsockd::start(Config::default());
    let mut session = Session::connect(server.path(), ECHO_PORT, test_options()).unwrap();
    assert!(session.host_port().is_some());
    let token = session.token().to_string();
    let data = pattern_bytes(9, 0, 100_000);
    session.write_all(&data).unwrap();
    session.shutdown_write().unwrap();
    session.shutdown_write().unwrap();

    let err = session.write(b"more").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BrokenPipe);
    assert!(err.to_string().contains("shutdown_write"), "{err}");

    let mut echoed = Vec::new();
    session.read_to_end(&mut echoed).unwrap();
    assert!(echoed == data, "the echo differs");
    assert_eq!(session.read(&mut [0u8; 8]).unwrap(), 0, "EOF stays EOF");
    // The END takes one offset.
    assert_eq!(session.received(), data.len() as u64 + 1);
    session.flush_acknowledged(Duration::from_secs(60)).unwrap();
    assert_eq!(session.acknowledged(), data.len() as u64);
    session.close().unwrap();

    server.wait_session(&token, "the end", |s| s.ended.is_some());
    assert_eq!(
        server.session(&token).unwrap().ended.as_deref(),
        Some("complete")
    );
    assert!(server.stats().violations.is_empty());
}

#[test]
fn flush_waits_for_acknowledgement() {
    let server = FakeVsockd::start(Config::default());
    let mut session = Session::connect(server.path(), ECHO_PORT, test_options()).unwrap();
    session.write_all(&pattern_bytes(2, 0, 500_000)).unwrap();
    session.flush().unwrap();
    assert_eq!(session.acknowledged(), 500_000);
    assert_eq!(session.sent(), 500_000);
}

#[test]
fn close_reads_the_guests_end_itself() {
    let server = FakeVsockd::start(Config::default());
    let session = Session::connect(server.path(), ECHO_PORT, test_options()).unwrap();
    let token = session.token().to_string();
    (&session).write_all(b"abc").unwrap();
    let mut echoed = [0u8; 3];
    (&session).read_exact(&mut echoed).unwrap();
    session.close().unwrap();
    server.wait_session(&token, "the end", |s| s.ended.is_some());
    assert_eq!(
        server.session(&token).unwrap().ended.as_deref(),
        Some("complete")
    );
}

#[test]
fn close_refuses_to_discard_unread_bytes() {
    let server = FakeVsockd::start(Config::default());
    let session = Session::connect(server.path(), ECHO_PORT, test_options()).unwrap();
    let token = session.token().to_string();
    (&session).write_all(b"unread").unwrap();
    let err = session.close().unwrap_err();
    assert!(matches!(err, ClientError::UnreadData { bytes: 6 }), "{err}");
    assert!(err.to_string().contains("unread"), "{err}");
    // Not ended: the session waits to be resumed.
    assert_eq!(server.session(&token).unwrap().ended, None);
}

#[test]
fn abort_ends_the_session_at_once() {
    let server = FakeVsockd::start(Config::default());
    let session = Session::connect(server.path(), ECHO_PORT, test_options()).unwrap();
    let token = session.token();
    (&session).write_all(b"abc").unwrap();
    session.abort().unwrap();

    server.wait_session(&token.to_string(), "the abort", |s| s.ended.is_some());
    assert_eq!(
        server.session(&token.to_string()).unwrap().ended.as_deref(),
        Some("aborted")
    );
    assert_eq!(server.stats().aborts, 1);
    let err = Session::resume(server.path(), token, 0, test_options()).unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Session(SessionFailure::ResumeRefused { .. })
        ),
        "{err}"
    );
}

#[test]
fn a_stopped_session_reattaches_to_abort() {
    let server = FakeVsockd::start(Config::default());
    let session = Session::connect(server.path(), ECHO_PORT, test_options()).unwrap();
    let token = session.token().to_string();
    session.stop();
    session.abort().unwrap();
    server.wait_session(&token, "the abort", |s| s.ended.is_some());
    assert_eq!(
        server.session(&token).unwrap().ended.as_deref(),
        Some("aborted")
    );
}
