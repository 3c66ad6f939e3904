//! Helpers the session tests share: options, pattern streams, waiting.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use vsockd_client::{Options, Session};

use crate::fake::{fill_pattern, pattern, Rng, G2H_SEED, H2G_SEED, HANG_LIMIT};

/// Options for tests: small buffers (more wrapping, more back-pressure),
/// quick retries.
pub fn test_options() -> Options {
    Options {
        reattach_timeout: Duration::from_secs(30),
        retry_interval: Duration::from_millis(5),
        max_unacked_bytes: 300 << 10,
        ack_every_bytes: 20 << 10,
        ..Options::default()
    }
}

/// Polls `done` until it holds; fails the test if that takes longer than
/// any run could.
pub fn wait_until(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < HANG_LIMIT, "waited too long for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Writes the host pattern from offset `from` to `to`, in writes of
/// varied sizes.
pub fn write_pattern(session: &Session, from: u64, to: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 200_000];
    let mut offset = from;
    while offset < to {
        let len = (rng.range(1, buf.len() as u64)).min(to - offset) as usize;
        fill_pattern(H2G_SEED, offset, &mut buf[..len]);
        (&*session)
            .write_all(&buf[..len])
            .unwrap_or_else(|err| panic!("write at {offset}: {err}"));
        offset += len as u64;
    }
}

/// Reads exactly the guest pattern's bytes `from..to`, checking each.
pub fn read_pattern(session: &Session, from: u64, to: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 150_000];
    let mut offset = from;
    while offset < to {
        let want = (rng.range(1, buf.len() as u64)).min(to - offset) as usize;
        let count = (&*session)
            .read(&mut buf[..want])
            .unwrap_or_else(|err| panic!("read at {offset}: {err}"));
        assert!(count > 0, "EOF at {offset}, expected {to}");
        check_pattern(G2H_SEED, offset, &buf[..count]);
        offset += count as u64;
    }
}

/// Reads the guest pattern from `from` to its end (a read of 0); returns
/// the length.
pub fn read_pattern_to_end(session: &Session, from: u64, seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 150_000];
    let mut offset = from;
    loop {
        let want = rng.range(1, buf.len() as u64) as usize;
        let count = (&*session)
            .read(&mut buf[..want])
            .unwrap_or_else(|err| panic!("read at {offset}: {err}"));
        if count == 0 {
            return offset;
        }
        check_pattern(G2H_SEED, offset, &buf[..count]);
        offset += count as u64;
    }
}

pub fn check_pattern(seed: u64, offset: u64, bytes: &[u8]) {
    for (i, byte) in bytes.iter().enumerate() {
        let at = offset + i as u64;
        assert_eq!(*byte, pattern(seed, at), "wrong byte at offset {at}");
    }
}
