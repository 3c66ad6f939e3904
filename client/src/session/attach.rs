//! Getting a socket that carries the session: `CONNECT <port> resumable`
//! for a new session, `RESUME <token> <received>` for every later one.
//!
//! # Reattaching
//!
//! [`reattach`] loops over attempts until one succeeds or the session ends:
//!
//! - connect error (no socket, `ECONNREFUSED` while vsockd restarts), EOF
//!   before the reply, a reply that is not a line: wait
//!   `Options::retry_interval` and try again;
//! - `ERR <reason>`: final ([`SessionFailure::ResumeRefused`]): a correct
//!   client's `RESUME` is refused only when the session is gone. When this
//!   client had already seen the session complete (both `END`s
//!   acknowledged both ways) the refusal confirms that vsockd ended it:
//!   the session is finished;
//! - `OK <n>` with `n` outside what this client sent: final
//!   ([`SessionFailure::Protocol`]);
//! - `Options::reattach_timeout` after the start: final
//!   ([`SessionFailure::ReattachTimedOut`]);
//! - the stub's generation is over (`stop()`): give up quietly.
//!
//! Each attempt first rewinds the receive ring, so the offset sent is what
//! the application consumed and cannot move until the reply is applied.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use log::info;

use crate::error::{ClientError, SessionFailure};
use crate::line::{
    parse_resume_reply, parse_session_connect_reply, read_line, resume_request,
    session_connect_request,
};
use crate::session::link::Link;
use crate::session::state::Shared;
use crate::sys;
use crate::token::Token;

/// How long one blocking read of a reply line waits before checking for a
/// stop or the deadline.
const REPLY_WAIT_SLICE: Duration = Duration::from_millis(50);

/// Opens a new session to guest port `port`. Blocks until the guest
/// accepts (or vsockd closes the socket).
pub fn open(uds_path: &Path, port: u32) -> Result<(UnixStream, u32, Token), ClientError> {
    let mut stream = connect(uds_path)?;
    let request = session_connect_request(port);
    send_line(&mut stream, &request)?;
    let line = read_line(&mut stream, &request, || Ok(()))?;
    let (host_port, token) = parse_session_connect_reply(&request, &line)?;
    Ok((stream, host_port, token))
}

/// How [`reattach`] ended without a link.
#[derive(Debug)]
pub enum ReattachEnd {
    Stopped,
    /// vsockd ended the complete session.
    Finished,
    Failed(SessionFailure),
}

/// What an attempt found.
enum Attempt {
    Attached(Link),
    Retry(String),
    Stopped,
    Finished,
    Failed(SessionFailure),
}

/// Resumes the session on a new socket; see the module docs. `fresh` is
/// for a new handle taking over a session: vsockd's offset becomes where
/// its host-to-guest stream starts. `counted` adds to the reattach count.
pub fn reattach(
    shared: &Shared,
    generation: u64,
    fresh: bool,
    counted: bool,
) -> Result<Link, ReattachEnd> {
    let started = Instant::now();
    // A timeout too long to represent is a century: no timeout.
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let deadline = started
        .checked_add(shared.opts.reattach_timeout)
        .unwrap_or(started + CENTURY);
    loop {
        match attempt(shared, generation, fresh, counted, deadline) {
            Attempt::Attached(link) => return Ok(link),
            Attempt::Stopped => return Err(ReattachEnd::Stopped),
            Attempt::Finished => return Err(ReattachEnd::Finished),
            Attempt::Failed(failure) => return Err(ReattachEnd::Failed(failure)),
            Attempt::Retry(last_error) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(ReattachEnd::Failed(SessionFailure::ReattachTimedOut {
                        waited: now - started,
                        last_error,
                    }));
                }
                let state = shared.lock();
                if state.generation != generation {
                    return Err(ReattachEnd::Stopped);
                }
                let pause = shared.opts.retry_interval.min(deadline - now);
                drop(shared.wait_timeout(state, pause));
            }
        }
    }
}

fn attempt(
    shared: &Shared,
    generation: u64,
    fresh: bool,
    counted: bool,
    deadline: Instant,
) -> Attempt {
    let received = {
        let mut state = shared.lock();
        if state.generation != generation {
            return Attempt::Stopped;
        }
        state.g2h.rewind();
        state.g2h.consumed_offset()
    };
    let mut stream = match connect(&shared.uds_path) {
        Ok(stream) => stream,
        Err(err) => return Attempt::Retry(err.to_string()),
    };
    let request = resume_request(&shared.token, received);
    if let Err(err) = send_line(&mut stream, &request) {
        return Attempt::Retry(err.to_string());
    }
    if let Err(source) = stream.set_read_timeout(Some(REPLY_WAIT_SLICE)) {
        return Attempt::Retry(format!("setting a read timeout: {source}"));
    }
    // The request names the token: errors show the line without it.
    let shown = format!("RESUME <token> {received}");
    let keep_waiting = || {
        if shared.lock().generation != generation {
            return Err(ClientError::Ended);
        }
        if Instant::now() >= deadline {
            return Err(ClientError::TimedOut {
                what: "vsockd's reply to RESUME",
                timeout: shared.opts.reattach_timeout,
            });
        }
        Ok(())
    };
    let (peer_received, peer_has_end) = match read_line(&mut stream, &shown, keep_waiting)
        .and_then(|line| parse_resume_reply(&shown, &line))
    {
        Ok(offset) => offset,
        Err(ClientError::Refused { reason, .. }) => {
            let state = shared.lock();
            if state.is_complete() {
                return Attempt::Finished;
            }
            let last_error_frame = state.last_error_frame.clone();
            return Attempt::Failed(SessionFailure::ResumeRefused {
                reason,
                last_error_frame,
            });
        }
        Err(ClientError::Ended) => return Attempt::Stopped,
        Err(err) => return Attempt::Retry(err.to_string()),
    };

    let mut state = shared.lock();
    if state.generation != generation {
        return Attempt::Stopped;
    }
    if fresh {
        // A new process: vsockd's offset is where its stream stands (the
        // bytes, then the END if vsockd has it).
        state.h2g.acknowledged = peer_received - u64::from(peer_has_end);
        if peer_has_end {
            state.h2g.end_requested = true;
            state.h2g.end_acknowledged = true;
        }
    }
    let (low, high) = (state.h2g.acknowledged, state.h2g.stream_limit());
    if !(low..=high).contains(&peer_received) {
        return Attempt::Failed(SessionFailure::Protocol {
            problem: format!(
                "vsockd resumed the host-to-guest stream at {peer_received}, \
                 outside the unacknowledged range {low}..={high}"
            ),
        });
    }
    state.h2g.acknowledge(peer_received);
    state.h2g.peer_received = peer_received;
    let link = match Link::new(stream, &state) {
        Ok(link) => link,
        Err(err) => return Attempt::Retry(format!("preparing the socket: {err}")),
    };
    state.attached_since = Some(Instant::now());
    if counted {
        state.reattach_count += 1;
    }
    info!(
        "session {:?} attached: guest-to-host from {received}, host-to-guest from {peer_received} \
         (reattach {})",
        shared.token, state.reattach_count
    );
    shared.notify();
    Attempt::Attached(link)
}

fn connect(uds_path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(uds_path).map_err(|source| ClientError::Connect {
        path: uds_path.to_owned(),
        source,
    })
}

fn send_line(stream: &mut UnixStream, line: &str) -> Result<(), ClientError> {
    sys::send_all(stream.as_fd(), line.as_bytes()).map_err(|source| ClientError::Io {
        action: "sending a request line to vsockd",
        source,
    })
}
