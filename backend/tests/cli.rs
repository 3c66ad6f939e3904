//! The command line: capabilities, help, and one clear line for every bad
//! flag, value or socket path.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn vsockd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vsockd"))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vsockd-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Asserts a failed run printed exactly one line naming `needle`.
fn assert_one_line_error(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line, got: {err:?}");
    assert!(err.starts_with("vsockd: "), "{err:?}");
    assert!(err.contains(needle), "{err:?} should name {needle:?}");
}

/// Kills the process when the test ends, passed or not.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(p: &Path, child: &mut Child) {
    let t0 = Instant::now();
    while !p.exists() {
        assert!(child.try_wait().unwrap().is_none(), "vsockd exited early");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no socket at {}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn print_capabilities_is_vsock_json() {
    let out = vsockd().arg("--print-capabilities").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.trim_start().starts_with('{') && text.trim_end().ends_with('}'));
    assert!(text.contains("\"type\": \"vsock\""), "{text}");
}

#[test]
fn help_explains_every_option() {
    let out = vsockd().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--socket-path",
        "--fd",
        "--print-capabilities",
        "--guest-cid",
        "--uds-path",
        "--queue-size",
        "--buf-alloc",
        "--max-connections",
        "--log-level",
        "--control-socket",
        "status",
    ] {
        assert!(text.contains(flag), "help lacks {flag}");
    }
}

#[test]
fn bad_values_give_one_line_and_exit_2() {
    let base = ["--socket-path", "/tmp/x.sock", "--uds-path", "/tmp/y.sock"];
    let cases: [(&[&str], &str); 10] = [
        (&["--guest-cid", "2"], "--guest-cid"),
        (&["--guest-cid", "4294967295"], "--guest-cid"),
        (&["--guest-cid", "abc"], "--guest-cid"),
        (&["--queue-size", "100"], "--queue-size"),
        (&["--queue-size", "65536"], "--queue-size"),
        (&["--buf-alloc", "10"], "--buf-alloc"),
        (&["--max-connections", "0"], "--max-connections"),
        (&["--max-connections", "65537"], "--max-connections"),
        (&["--log-level", "loud"], "--log-level"),
        (&["--no-such-flag"], "--no-such-flag"),
    ];
    for (extra, needle) in cases {
        let out = vsockd().args(base).args(extra).output().unwrap();
        assert_one_line_error(&out, 2, needle);
    }
}

#[test]
fn missing_paths_give_one_line() {
    let out = vsockd()
        .args(["--uds-path", "/tmp/y.sock"])
        .output()
        .unwrap();
    assert_one_line_error(&out, 2, "--socket-path");
    let out = vsockd()
        .args(["--socket-path", "/tmp/x.sock"])
        .output()
        .unwrap();
    assert_one_line_error(&out, 2, "--uds-path");
    let out = vsockd()
        .args([
            "--socket-path",
            "/tmp/x.sock",
            "--fd",
            "3",
            "--uds-path",
            "/tmp/y",
        ])
        .output()
        .unwrap();
    assert_one_line_error(&out, 2, "--fd");
}

#[test]
fn unwritable_socket_path_gives_one_line() {
    let d = tmpdir("unwritable");
    let sock = d.join("no/such/dir/v.sock");
    let out = vsockd()
        .arg("--socket-path")
        .arg(&sock)
        .arg("--uds-path")
        .arg(d.join("h.sock"))
        .output()
        .unwrap();
    assert_one_line_error(&out, 1, "cannot listen on vhost-user socket");
}

#[test]
fn path_that_is_not_a_socket_is_left_alone() {
    let d = tmpdir("notsock");
    let file = d.join("v.sock");
    std::fs::write(&file, b"precious").unwrap();
    let out = vsockd()
        .arg("--socket-path")
        .arg(&file)
        .arg("--uds-path")
        .arg(d.join("h.sock"))
        .output()
        .unwrap();
    assert_one_line_error(&out, 1, "is not a socket");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

#[test]
fn socket_in_use_is_refused_and_stale_socket_replaced() {
    let d = tmpdir("inuse");
    let (v, h) = (d.join("v.sock"), d.join("h.sock"));
    // A stale socket file (its listener is gone) does not stop a start.
    drop(UnixListener::bind(&v).unwrap());
    let mut first = KillOnDrop(
        vsockd()
            .arg("--socket-path")
            .arg(&v)
            .arg("--uds-path")
            .arg(&h)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&h, &mut first.0);
    let out = vsockd()
        .arg("--socket-path")
        .arg(&v)
        .arg("--uds-path")
        .arg(d.join("h2.sock"))
        .output()
        .unwrap();
    assert_one_line_error(&out, 1, "in use");
    let out = vsockd()
        .arg("--socket-path")
        .arg(d.join("v2.sock"))
        .arg("--uds-path")
        .arg(&h)
        .output()
        .unwrap();
    assert_one_line_error(&out, 1, "in use");
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "the first instance still serves"
    );
}

#[test]
fn fd_that_is_not_a_listening_socket_is_refused() {
    let out = vsockd()
        .args(["--fd", "0", "--uds-path", "/tmp/vsockd-cli-unused.sock"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_one_line_error(&out, 1, "--fd 0");
}

#[test]
fn sigterm_exits_cleanly_and_removes_the_sockets() {
    let d = tmpdir("sigterm");
    let (v, h) = (d.join("v.sock"), d.join("h.sock"));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut child = KillOnDrop(
            vsockd()
                .arg("--socket-path")
                .arg(&v)
                .arg("--uds-path")
                .arg(&h)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_for_socket(&h, &mut child.0);
        let ctl = d.join("v.sock.ctl");
        wait_for_socket(&ctl, &mut child.0);
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(child.0.id() as i32, sig) }, 0);
        let status = child.0.wait().unwrap();
        assert_eq!(status.code(), Some(0), "signal {sig}: clean exit");
        assert!(
            !v.exists() && !h.exists() && !ctl.exists(),
            "signal {sig}: sockets removed"
        );
    }
}

#[test]
fn status_of_nothing_running_is_one_line_and_exit_1() {
    let d = tmpdir("status-none");
    let v = d.join("v.sock");
    let out = vsockd()
        .args(["status", "--socket-path"])
        .arg(&v)
        .output()
        .unwrap();
    assert_one_line_error(&out, 1, &format!("{}.ctl", v.display()));
    assert!(out.stdout.is_empty());
    // A stale socket (its process died) is no better.
    let ctl = d.join("stale.ctl");
    drop(UnixListener::bind(&ctl).unwrap());
    let out = vsockd()
        .args(["status", "--json", "--control-socket"])
        .arg(&ctl)
        .output()
        .unwrap();
    assert_one_line_error(&out, 1, "stale.ctl");
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"));
}

#[test]
fn status_needs_exactly_one_path() {
    let out = vsockd().arg("status").output().unwrap();
    assert_one_line_error(&out, 2, "--socket-path or --control-socket");
    let out = vsockd()
        .args(["status", "--socket-path", "/a", "--control-socket", "/b"])
        .output()
        .unwrap();
    assert_one_line_error(&out, 2, "--control-socket");
}

#[test]
fn status_of_a_running_instance_without_a_vmm() {
    let d = tmpdir("status-idle");
    let (v, h, ctl) = (d.join("v.sock"), d.join("h.sock"), d.join("other.ctl"));
    let mut child = KillOnDrop(
        vsockd()
            .arg("--socket-path")
            .arg(&v)
            .arg("--uds-path")
            .arg(&h)
            .arg("--control-socket")
            .arg(&ctl)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&ctl, &mut child.0);
    assert!(
        !d.join("v.sock.ctl").exists(),
        "--control-socket replaces the default"
    );
    // Until the first worker has formatted the state region, its figures
    // are unknown, and status says why.
    let t0 = Instant::now();
    let text = loop {
        let out = vsockd()
            .args(["status", "--control-socket"])
            .arg(&ctl)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        if text.contains("worker.state: ready\n") {
            break text;
        }
        if text.contains("connections.total: none\n") {
            assert!(text.contains("unknown_because: "), "{text}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "never ready:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let keeper = format!("keeper.pid: {}", child.0.id());
    for want in [
        &format!("socket: {}", v.display()),
        "mode: keeper",
        keeper.as_str(),
        "worker.generation: 1",
        "restarts.total: 0",
        "frontend.connected: false",
        "connections.total: 0",
        "queues.rx.size: 0",
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "{want:?} missing in\n{text}"
        );
    }
}
