//! `vsock-connect` against the fake vsockd: standard input to the guest
//! and back to standard output.

mod fake;

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::thread;

use fake::{pattern_bytes, Config, FakeVsockd, Faults, ECHO_PORT, RAW_ECHO_PORT};
use vsockd_client::{Options, Session};

fn vsock_connect(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vsock-connect"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vsock-connect");
    let mut input = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut output = Vec::new();
    thread::scope(|scope| {
        scope.spawn(move || {
            // The program may exit before reading everything (a failure).
            let _ = input.write_all(stdin);
        });
        stdout.read_to_end(&mut output).unwrap();
    });
    let mut result = child.wait_with_output().unwrap();
    result.stdout = output;
    result
}

fn path_arg(server: &FakeVsockd) -> &str {
    server.path().to_str().unwrap()
}

#[test]
fn raw_round_trip() {
    let server = FakeVsockd::start(Config::default());
    let data = pattern_bytes(4, 0, 300_000);
    let output = vsock_connect(&[path_arg(&server), &RAW_ECHO_PORT.to_string()], &data);
    assert!(output.status.success(), "{output:?}");
    assert!(output.stdout == data, "the echo differs");
    assert!(output.stderr.is_empty(), "{output:?}");
}

#[test]
fn resumable_round_trip_across_breaks() {
    let server = FakeVsockd::start(Config {
        faults: Faults {
            break_after_bytes: Some((8 << 10, 96 << 10)),
            corrupt_one_in: Some(10),
        },
        ..Config::default()
    });
    let data = pattern_bytes(6, 0, 1 << 20);
    let output = vsock_connect(
        &[
            "--resumable",
            "--print-token",
            path_arg(&server),
            &ECHO_PORT.to_string(),
        ],
        &data,
    );
    assert!(output.status.success(), "{output:?}");
    assert!(output.stdout == data, "the echo differs");
    let stderr = String::from_utf8(output.stderr).unwrap();
    let token = stderr
        .lines()
        .find_map(|line| line.strip_prefix("token "))
        .expect("a token line");
    assert_eq!(server.tokens(), vec![token.to_owned()]);
    assert_eq!(
        server.session(token).unwrap().ended.as_deref(),
        Some("complete")
    );
    let stats = server.stats();
    assert!(stats.injected_breaks > 0);
    assert!(stats.violations.is_empty(), "{:?}", stats.violations);
}

#[test]
fn resume_takes_a_session_over() {
    let server = FakeVsockd::start(Config::default());
    let mut session = Session::connect(server.path(), ECHO_PORT, Options::default()).unwrap();
    session.write_all(b"hello ").unwrap();
    let mut echoed = [0u8; 6];
    session.read_exact(&mut echoed).unwrap();
    session.flush().unwrap();
    let resume = format!("{}:{}", session.token(), session.received());
    drop(session);

    let output = vsock_connect(
        &["--resume", &resume, "--print-token", path_arg(&server)],
        b"world",
    );
    assert!(output.status.success(), "{output:?}");
    assert_eq!(output.stdout, b"world");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("resumed at 6"), "{stderr}");
}

#[test]
fn a_bad_flag_is_a_usage_error() {
    let output = vsock_connect(&["--bogus", "/nonexistent", "1"], b"");
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("--bogus"), "{stderr}");
}

#[test]
fn a_bad_token_is_named() {
    let output = vsock_connect(&["--resume", "xyz:0", "/nonexistent"], b"");
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("invalid session token"), "{stderr}");
}

#[test]
fn an_unreachable_socket_is_one_line_naming_it() {
    let output = vsock_connect(&["/nonexistent/vsock.sock", "5"], b"");
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/vsock.sock"), "{stderr}");
}
