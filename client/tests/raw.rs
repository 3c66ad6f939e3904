//! Raw hybrid-vsock connections: `CONNECT <port>`, `OK <host-port>`, bytes.

mod fake;

use std::io::{Read, Write};
use std::net::Shutdown;

use fake::{Config, FakeVsockd, GREETING, RAW_ECHO_PORT, RAW_GREETING_PORT};
use vsockd_client::{connect_raw, ClientError};

#[test]
fn the_reply_line_is_read_without_the_bytes_after_it() {
    let server = FakeVsockd::start(Config::default());
    // The fake sends its OK line and the guest's first bytes in one write.
    let mut connection = connect_raw(server.path(), RAW_GREETING_PORT).unwrap();
    assert_eq!(connection.host_port, 1024);
    let mut greeting = vec![0u8; GREETING.len()];
    connection.stream.read_exact(&mut greeting).unwrap();
    assert_eq!(greeting, GREETING);
}

#[test]
fn bytes_flow_both_ways_and_shutdown_reaches_the_guest() {
    let server = FakeVsockd::start(Config::default());
    let connection = connect_raw(server.path(), RAW_ECHO_PORT).unwrap();
    let data = fake::pattern_bytes(1, 0, 300_000);
    let mut echoed = Vec::new();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            (&connection.stream).write_all(&data).unwrap();
            connection.stream.shutdown(Shutdown::Write).unwrap();
        });
        (&connection.stream).read_to_end(&mut echoed).unwrap();
    });
    assert!(echoed == data, "the echo differs");
}

#[test]
fn a_port_without_a_listener_is_no_reply() {
    let server = FakeVsockd::start(Config::default());
    let err = connect_raw(server.path(), 4242).unwrap_err();
    assert!(matches!(err, ClientError::NoReply { .. }), "{err}");
    assert!(err.to_string().contains("CONNECT 4242"), "{err}");
}

#[test]
fn a_missing_socket_names_its_path() {
    let server = FakeVsockd::start(Config::default());
    let path = server.dir().join("nothing-here.sock");
    let err = connect_raw(&path, 1).unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("nothing-here.sock"), "{err}");
}
