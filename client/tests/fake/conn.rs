//! One connection to the fake vsockd: its request line, then raw bytes or
//! frames. A session's connection has a reader (this thread) and a writer
//! thread; either one ending shuts the socket down, which ends the other.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::thread;

use super::wire::{self, HEADER_BYTES, MAX_DATA_BYTES};
use super::{
    pattern, FakeSession, Guest, Shared, State, ECHO_PORT, GREETING, H2G_SEED, PATTERN_PORT,
    RAW_ECHO_PORT, RAW_GREETING_PORT, WINDOW_BYTES,
};

pub fn handle(shared: Arc<Shared>, mut stream: UnixStream, conn_id: u64) {
    shared.lock().stats.connections += 1;
    let Some(line) = read_line(&mut stream) else {
        return;
    };
    let words: Vec<&str> = line.split(' ').collect();
    match words.as_slice() {
        ["CONNECT", port] => raw(stream, port),
        ["CONNECT", port, "resumable"] => open_session(shared, stream, conn_id, port),
        ["RESUME", token, received] => resume(shared, stream, conn_id, token, received),
        _ => {
            shared.violation(format!("malformed request line {line:?}"));
            let _ = stream.write_all(b"ERR malformed request\n");
        }
    }
}

fn read_line(stream: &mut UnixStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    loop {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() >= 64 {
            return None;
        }
    }
    String::from_utf8(line).ok()
}

fn raw(mut stream: UnixStream, port: &str) {
    let greeting: &[u8] = match port.parse() {
        Ok(RAW_ECHO_PORT) => b"",
        Ok(RAW_GREETING_PORT) => GREETING,
        _ => return,
    };
    let reply = [b"OK 1024\n", greeting].concat();
    if stream.write_all(&reply).is_err() {
        return;
    }
    let mut buf = vec![0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(count) => {
                if stream.write_all(&buf[..count]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

fn open_session(shared: Arc<Shared>, mut stream: UnixStream, conn_id: u64, port: &str) {
    let guest = match port.parse() {
        Ok(PATTERN_PORT) => Guest::Pattern {
            h2g_expected: shared.config.h2g_bytes,
        },
        Ok(ECHO_PORT) => Guest::Echo,
        // Nothing listens: close without a reply.
        _ => return,
    };
    let port: u32 = port.parse().unwrap_or(0);
    let (g2h, g2h_end) = match guest {
        Guest::Pattern { .. } => {
            let len = shared.config.g2h_bytes;
            (
                super::pattern_bytes(super::G2H_SEED, 0, len as usize),
                Some(len),
            )
        }
        Guest::Echo => (Vec::new(), None),
    };
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let token = {
        let mut state = shared.lock();
        let token = format!("{:016x}{:016x}", state.rng.next(), state.rng.next());
        state.stats.sessions_opened += 1;
        state.sessions.insert(
            token.clone(),
            FakeSession {
                port,
                guest,
                g2h,
                g2h_end,
                g2h_acked: 0,
                g2h_sent_max: 0,
                h2g_len: 0,
                h2g_ack_sent: 0,
                h2g_end: false,
                h2g_end_acked: false,
                h2g_mismatch: None,
                attached: Some((conn_id, clone)),
                conn_wire: 0,
                conn_end_sent: false,
                error_to_send: None,
                ended: None,
            },
        );
        token
    };
    let host_port = 1024 + conn_id;
    if stream
        .write_all(format!("OK {host_port} {token}\n").as_bytes())
        .is_err()
    {
        return;
    }
    run_frames(shared, stream, conn_id, token, 0);
}

fn resume(shared: Arc<Shared>, mut stream: UnixStream, conn_id: u64, token: &str, received: &str) {
    let refuse = |stream: &mut UnixStream, reason: String| {
        let mut state = shared.lock();
        state.stats.refusals.push(reason.clone());
        drop(state);
        shared.changed.notify_all();
        let _ = stream.write_all(format!("ERR {reason}\n").as_bytes());
    };
    let Ok(received) = received.parse::<u64>() else {
        shared.violation(format!("RESUME with a malformed offset {received:?}"));
        return refuse(&mut stream, "malformed offset".to_owned());
    };
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let (h2g_offset, h2g_end) = {
        let mut state = shared.lock();
        let Some(session) = state.sessions.get_mut(token) else {
            drop(state);
            return refuse(&mut stream, "no such session".to_owned());
        };
        if session.ended.is_some() {
            // Not a refusal a test counts: a client confirms a complete
            // session's end this way.
            state.stats.resumes_after_end += 1;
            drop(state);
            let _ = stream.write_all(b"ERR the session ended\n");
            return;
        }
        if received < session.g2h_acked || received > session.g2h_sent_max {
            let reason = format!(
                "offset {received} outside {}..={}",
                session.g2h_acked, session.g2h_sent_max
            );
            drop(state);
            return refuse(&mut stream, reason);
        }
        // A RESUME takes an attached session over.
        session.detach();
        session.attached = Some((conn_id, clone));
        match session.g2h_end {
            Some(end) if received > end => {
                session.conn_wire = end;
                session.conn_end_sent = true;
            }
            _ => {
                session.conn_wire = received;
                session.conn_end_sent = false;
            }
        }
        let h2g_offset = session.h2g_len + u64::from(session.h2g_end);
        // The reply acknowledges what it names.
        session.h2g_ack_sent = session.h2g_ack_sent.max(h2g_offset);
        let h2g_end = session.h2g_end;
        if h2g_end {
            session.h2g_end_acked = true;
        }
        state.stats.resumes += 1;
        (h2g_offset, h2g_end)
    };
    shared.changed.notify_all();
    if stream
        .write_all(
            if h2g_end {
                format!("OK {h2g_offset} END\n")
            } else {
                format!("OK {h2g_offset}\n")
            }
            .as_bytes(),
        )
        .is_err()
    {
        return;
    }
    run_frames(shared, stream, conn_id, token.to_owned(), h2g_offset);
}

/// Cuts the connection after a budget of bytes, read and written.
struct Budget {
    remaining: AtomicI64,
    spent: AtomicBool,
}

impl Budget {
    /// Takes `count` bytes; returns how many may pass before the cut, or
    /// `None` if all of them may.
    fn take(&self, shared: &Shared, count: usize) -> Option<usize> {
        let before = self.remaining.fetch_sub(count as i64, Ordering::SeqCst);
        if before >= count as i64 {
            return None;
        }
        if !self.spent.swap(true, Ordering::SeqCst) {
            shared.lock().stats.injected_breaks += 1;
        }
        Some(before.max(0) as usize)
    }
}

fn run_frames(
    shared: Arc<Shared>,
    stream: UnixStream,
    conn_id: u64,
    token: String,
    h2g_acked: u64,
) {
    let budget = {
        let mut state = shared.lock();
        let remaining = match state.faults.break_after_bytes {
            Some((low, high)) => state.rng.range(low, high) as i64,
            None => i64::MAX,
        };
        Arc::new(Budget {
            remaining: AtomicI64::new(remaining),
            spent: AtomicBool::new(false),
        })
    };
    let writer = {
        let shared = Arc::clone(&shared);
        let token = token.clone();
        let budget = Arc::clone(&budget);
        let Ok(stream) = stream.try_clone() else {
            return;
        };
        thread::spawn(move || write_loop(&shared, stream, conn_id, &token, h2g_acked, &budget))
    };
    read_loop(&shared, &stream, conn_id, &token, &budget);
    let _ = stream.shutdown(Shutdown::Both);
    {
        let mut state = shared.lock();
        if let Some(session) = state.sessions.get_mut(&token) {
            if session
                .attached
                .as_ref()
                .is_some_and(|(id, _)| *id == conn_id)
            {
                session.attached = None;
            }
        }
    }
    shared.changed.notify_all();
    let _ = writer.join();
}

fn read_exact_metered(
    shared: &Shared,
    mut stream: &UnixStream,
    buf: &mut [u8],
    budget: &Budget,
) -> Result<(), ()> {
    let mut filled = 0;
    while filled < buf.len() {
        let count = match stream.read(&mut buf[filled..]) {
            Ok(0) | Err(_) => return Err(()),
            Ok(count) => count,
        };
        filled += count;
        if budget.take(shared, count).is_some() {
            // Cut in the middle of whatever was being read.
            let _ = stream.shutdown(Shutdown::Both);
            return Err(());
        }
    }
    Ok(())
}

/// Reads the client's frames and applies them as vsockd does: only whole,
/// checked frames reach the guest.
fn read_loop(shared: &Shared, stream: &UnixStream, conn_id: u64, token: &str, budget: &Budget) {
    loop {
        let mut header_bytes = [0u8; HEADER_BYTES];
        if read_exact_metered(shared, stream, &mut header_bytes, budget).is_err() {
            return;
        }
        let header = match wire::decode(&header_bytes) {
            Ok(header) => header,
            Err(problem) => return protocol_error(shared, stream, problem),
        };
        let mut payload = vec![0u8; header.len];
        if read_exact_metered(shared, stream, &mut payload, budget).is_err() {
            return;
        }
        if !wire::checksum_ok(&header_bytes, &header, &payload) {
            return protocol_error(shared, stream, "bad checksum from the client".to_owned());
        }
        let mut state = shared.lock();
        let Some(session) = state.sessions.get_mut(token) else {
            return;
        };
        if !session
            .attached
            .as_ref()
            .is_some_and(|(id, _)| *id == conn_id)
        {
            return;
        }
        if let Err(problem) = apply(session, &header, &payload) {
            drop(state);
            return protocol_error(shared, stream, problem);
        }
        let aborted = header.kind == wire::ABORT;
        if aborted {
            session.ended = Some("aborted".to_owned());
            state.stats.aborts += 1;
        }
        let done = aborted || finish_if_complete(&mut state, token);
        drop(state);
        shared.changed.notify_all();
        if done {
            return;
        }
    }
}

/// One checked client frame.
fn apply(session: &mut FakeSession, header: &wire::Header, payload: &[u8]) -> Result<(), String> {
    match header.kind {
        wire::DATA => {
            if session.h2g_end {
                return Err("DATA after END".to_owned());
            }
            if header.offset != session.h2g_len {
                return Err(format!(
                    "DATA at {}, expected {}",
                    header.offset, session.h2g_len
                ));
            }
            let end = header.offset + payload.len() as u64;
            if end > session.h2g_ack_sent + vsockd_client::frame::H2G_WINDOW_BYTES {
                return Err(format!(
                    "DATA up to {end}, past the window after ACK {}",
                    session.h2g_ack_sent
                ));
            }
            match session.guest {
                Guest::Pattern { .. } => {
                    if session.h2g_mismatch.is_none() {
                        let start = session.h2g_len;
                        session.h2g_mismatch = payload
                            .iter()
                            .enumerate()
                            .find(|(i, byte)| **byte != pattern(H2G_SEED, start + *i as u64))
                            .map(|(i, _)| start + i as u64);
                    }
                }
                Guest::Echo => session.g2h.extend_from_slice(payload),
            }
            session.h2g_len += payload.len() as u64;
        }
        wire::ACK => {
            let limit = session.conn_wire + u64::from(session.conn_end_sent);
            if header.offset < session.g2h_acked || header.offset > limit {
                return Err(format!(
                    "ACK {} outside {}..={limit}",
                    header.offset, session.g2h_acked
                ));
            }
            session.g2h_acked = header.offset;
        }
        wire::END => {
            if session.h2g_end || header.offset != session.h2g_len {
                return Err(format!(
                    "END at {}, stream at {}",
                    header.offset, session.h2g_len
                ));
            }
            if let Guest::Pattern { h2g_expected } = session.guest {
                if session.h2g_len != h2g_expected {
                    return Err(format!(
                        "END after {} bytes, {h2g_expected} expected",
                        session.h2g_len
                    ));
                }
            }
            session.h2g_end = true;
            if let Guest::Echo = session.guest {
                session.g2h_end = Some(session.g2h.len() as u64);
            }
        }
        wire::ABORT => {}
        kind => return Err(format!("frame kind {kind} from the client")),
    }
    Ok(())
}

fn protocol_error(shared: &Shared, mut stream: &UnixStream, problem: String) {
    shared.violation(problem.clone());
    let message = format!("protocol error: {problem}");
    let message = &message.as_bytes()[..message.len().min(wire::MAX_ERROR_BYTES)];
    let _ = stream.write_all(&wire::encode(wire::ERROR, 0, message));
}

/// Ends the session once both ENDs are acknowledged both ways.
fn finish_if_complete(state: &mut State, token: &str) -> bool {
    let Some(session) = state.sessions.get_mut(token) else {
        return true;
    };
    if session.ended.is_none() && session.is_complete() {
        session.ended = Some("complete".to_owned());
        session.detach();
        state.stats.completed += 1;
        return true;
    }
    // A guest reset's ERROR frame is still to go out: the writer closes.
    session.ended.is_some() && session.error_to_send.is_none()
}

/// Sends the guest's stream, the `END`, and `ACK`s of the host's stream.
fn write_loop(
    shared: &Shared,
    mut stream: UnixStream,
    conn_id: u64,
    token: &str,
    mut h2g_acked: u64,
    budget: &Budget,
) {
    let mut state = shared.lock();
    loop {
        let corrupt_one_in = state.faults.corrupt_one_in;
        let roll = state.rng.next();
        let Some(session) = state.sessions.get_mut(token) else {
            return;
        };
        if !session
            .attached
            .as_ref()
            .is_some_and(|(id, _)| *id == conn_id)
        {
            return;
        }
        let mut close_after = false;
        let mut corrupted = false;
        let h2g_ack = session.h2g_len + u64::from(session.h2g_end);
        // Cleared only once written: the reader leaves the socket open
        // until then.
        let frame = if let Some(message) = session.error_to_send.clone() {
            close_after = true;
            wire::encode(wire::ERROR, 0, message.as_bytes())
        } else if h2g_ack > h2g_acked {
            h2g_acked = h2g_ack;
            session.h2g_ack_sent = session.h2g_ack_sent.max(h2g_ack);
            wire::encode(wire::ACK, h2g_ack, &[])
        } else if session.conn_wire < session.g2h.len() as u64
            && session.conn_wire - session.g2h_acked.min(session.conn_wire) < WINDOW_BYTES
        {
            let start = session.conn_wire;
            let room = WINDOW_BYTES - (start - session.g2h_acked.min(start));
            let len = (session.g2h.len() as u64 - start)
                .min(MAX_DATA_BYTES as u64)
                .min(room);
            let payload = &session.g2h[start as usize..(start + len) as usize];
            let mut frame = wire::encode(wire::DATA, start, payload);
            if corrupt_one_in.is_some_and(|n| roll % n == 0) {
                frame[HEADER_BYTES + (roll as usize / 7) % payload.len()] ^= 0x20;
                corrupted = true;
            }
            session.conn_wire += len;
            session.g2h_sent_max = session.g2h_sent_max.max(session.conn_wire);
            frame
        } else if session.g2h_end == Some(session.conn_wire) && !session.conn_end_sent {
            session.conn_end_sent = true;
            session.g2h_sent_max = session.g2h_sent_max.max(session.conn_wire + 1);
            wire::encode(wire::END, session.conn_wire, &[])
        } else {
            state = shared.wait(state);
            continue;
        };
        if corrupted {
            state.stats.corrupted_frames += 1;
        }
        drop(state);

        let allowed = budget.take(shared, frame.len());
        let written = stream.write_all(&frame[..allowed.unwrap_or(frame.len())]);
        if allowed.is_some() || written.is_err() || close_after {
            let _ = stream.shutdown(Shutdown::Both);
            if close_after {
                if let Some(session) = shared.lock().sessions.get_mut(token) {
                    session.error_to_send = None;
                }
            }
            return;
        }

        state = shared.lock();
        if frame[0] == wire::ACK {
            if let Some(session) = state.sessions.get_mut(token) {
                if session.h2g_end && h2g_acked > session.h2g_len {
                    session.h2g_end_acked = true;
                }
            }
            if finish_if_complete(&mut state, token) {
                shared.changed.notify_all();
                return;
            }
        }
    }
}
