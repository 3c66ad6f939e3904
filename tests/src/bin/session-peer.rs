//! session-peer: a host program that carries a resumable session through
//! its own restarts. It exchanges verified pattern streams with a guest
//! port: it reads the guest's stream (seed SEED) and checks every byte, and
//! writes `BYTES` bytes of the reply stream (`reply_seed(SEED)`) then its
//! end.
//!
//! Usage: session-peer UDS PORT STATE SEED BYTES
//!
//! STATE is the file where it records its token and how far it has read,
//! after each read and before acknowledging that far (the session
//! acknowledges by hand): killed at any instant and started again with the
//! same arguments, it resumes the session from what it recorded, and
//! writes from the offset vsockd reports. It prints `DONE received=N
//! sent=N` and exits 0 once both streams ended; on a wrong byte or a
//! failed session it prints `ERROR ...` and exits 1.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::exit;
use std::time::Duration;

use vsockd_client::{ClientError, Options, Session, Token};
use vsockd_tests::pattern::{self, reply_seed};

/// Bytes per write.
const CHUNK_BYTES: usize = 32 * 1024;

fn fail(msg: impl std::fmt::Display) -> ! {
    println!("ERROR {msg}");
    exit(1)
}

/// What the state file holds: the token, and the guest stream's offset
/// read up to.
fn load(path: &Path) -> Option<(Token, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut words = text.split_whitespace();
    let token = words.next()?.parse().ok()?;
    let received = words.next()?.parse().ok()?;
    Some((token, received))
}

/// Records `token` and `received` atomically (a new file renamed over
/// the old one).
fn save(path: &Path, token: Token, received: u64) {
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, format!("{token} {received}\n"))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        fail(format!("cannot record progress in {}: {e}", path.display()));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [uds, port, state, seed, bytes] = args.as_slice() else {
        eprintln!("usage: session-peer UDS PORT STATE SEED BYTES");
        exit(64)
    };
    let num = |s: &str| -> u64 {
        s.parse()
            .unwrap_or_else(|_| fail(format!("bad number {s:?}")))
    };
    let (port, seed, bytes) = (num(port) as u32, num(seed), num(bytes));
    let state = PathBuf::from(state);
    let opts = Options {
        acknowledge_on_read: false,
        reattach_timeout: Duration::from_secs(60),
        retry_interval: Duration::from_millis(5),
        ..Options::default()
    };
    let session = match load(&state) {
        Some((token, received)) => match Session::resume(uds, token, received, opts) {
            Ok(s) => s,
            // The session ended after this process had everything: a
            // restart after the last read found it gone.
            Err(ClientError::Session(f)) if received == bytes + 1 => {
                println!("DONE received={bytes} sent={bytes} (ended before this restart: {f})");
                return;
            }
            Err(e) => fail(format!("resume at {received}: {e}")),
        },
        None => {
            let s = Session::connect(uds, port, opts)
                .unwrap_or_else(|e| fail(format!("connect to guest port {port}: {e}")));
            save(&state, s.token(), 0);
            s
        }
    };
    let token = session.token();
    std::thread::scope(|sc| {
        let writer = sc.spawn(|| {
            let mut at = session.peer_received();
            let mut buf = vec![0u8; CHUNK_BYTES];
            while at < bytes {
                let n = (bytes - at).min(CHUNK_BYTES as u64) as usize;
                pattern::fill(reply_seed(seed), at, &mut buf[..n]);
                if let Err(e) = (&session).write_all(&buf[..n]) {
                    fail(format!("write at {at}: {e}"));
                }
                at += n as u64;
            }
            if at == bytes {
                if let Err(e) = session.shutdown_write() {
                    fail(format!("end: {e}"));
                }
            }
        });
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let at = session.received();
            let n = match (&session).read(&mut buf) {
                Ok(n) => n,
                Err(e) => fail(format!("read at {at}: {e}")),
            };
            if n == 0 {
                break;
            }
            if let Some(bad) = pattern::check(seed, at, &buf[..n]) {
                fail(format!("wrong byte at offset {}", at + bad as u64));
            }
            let received = session.received();
            save(&state, token, received);
            session.acknowledge(received);
        }
        if session.received() != bytes + 1 {
            fail(format!(
                "the guest's stream ended at {}, expected {bytes}",
                session.received() - 1
            ));
        }
        save(&state, token, bytes + 1);
        session.acknowledge(bytes + 1);
        if writer.join().is_err() {
            fail("the writer failed");
        }
    });
    let sent = session.sent();
    if let Err(e) = session.close() {
        fail(format!("close: {e}"));
    }
    let _ = std::io::stdout().flush();
    println!("DONE received={bytes} sent={sent}");
}
