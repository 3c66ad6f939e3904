//! The crate's error type.
//!
//! [`ClientError`] is what every fallible call returns. A session that can no
//! longer carry on records a [`SessionFailure`]: it is kept in the session's
//! state and handed out again (it is `Clone`) to every later call, and to
//! `Read`/`Write` callers inside an [`std::io::Error`].

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong talking to vsockd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The hybrid socket could not be reached.
    #[error("cannot connect to vsockd's hybrid socket {}: {source} (is vsockd running with --uds-path {}?)", path.display(), path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A socket call failed while talking to vsockd.
    #[error("{action} failed: {source}")]
    Io {
        action: &'static str,
        #[source]
        source: io::Error,
    },

    /// vsockd closed the socket without answering the request line.
    #[error("vsockd closed the connection without replying to `{request}`: no guest socket listens on that port, all connection slots are in use, or vsockd is restarting")]
    NoReply { request: String },

    /// vsockd answered the request line with `ERR <reason>`.
    #[error("vsockd refused `{request}`: {reason}")]
    Refused { request: String, reason: String },

    /// vsockd answered with a line this client does not understand.
    #[error("unexpected reply from vsockd to `{request}`: {reply:?} ({problem})")]
    BadReply {
        request: String,
        reply: String,
        problem: &'static str,
    },

    /// A session token that is not 32 lowercase hexadecimal digits.
    #[error("invalid session token {text:?}: {problem} (expected 32 hexadecimal digits)")]
    InvalidToken { text: String, problem: &'static str },

    /// The session can no longer carry on.
    #[error("the session failed: {0}")]
    Session(#[from] SessionFailure),

    /// A write after `shutdown_write()`.
    #[error(
        "the session's sending side is shut down: nothing can be written after shutdown_write()"
    )]
    WriteShutDown,

    /// A wait did not finish in time.
    #[error("{what} did not happen within {timeout:?}")]
    TimedOut {
        what: &'static str,
        timeout: Duration,
    },

    /// `close()` found guest bytes the application had not read.
    #[error("{bytes} bytes from the guest are unread: read to the end (until read returns 0) before close(), or use abort()")]
    UnreadData { bytes: u64 },

    /// The session already ended (both sides finished, or it was aborted).
    #[error("the session has already ended")]
    Ended,

    /// The session's I/O thread could not be started.
    #[error("cannot start the session's I/O thread: {source}")]
    Spawn {
        #[source]
        source: io::Error,
    },
}

/// Why a session stopped for good. Kept in the session and returned by every
/// call after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionFailure {
    /// No `RESUME` succeeded within `Options::reattach_timeout` of a break.
    #[error("could not reattach to vsockd within {waited:?}; last attempt: {last_error}")]
    ReattachTimedOut {
        waited: Duration,
        last_error: String,
    },

    /// vsockd answered `RESUME` with `ERR`: the token is unknown, or the
    /// session ended (the guest reset its connection, or the grace period
    /// expired).
    #[error("vsockd refused to resume the session: {reason}{}", after_break(.last_error_frame))]
    ResumeRefused {
        reason: String,
        /// The message of the last `ERROR` frame vsockd sent, if any: it
        /// usually says why the session ended.
        last_error_frame: Option<String>,
    },

    /// vsockd answered in a way no correct server does; carrying on could
    /// lose or repeat bytes.
    #[error("vsockd broke the session protocol: {problem}")]
    Protocol { problem: String },

    /// The session was aborted with `abort()`.
    #[error("the session was aborted")]
    Aborted,
}

fn after_break(last_error_frame: &Option<String>) -> String {
    match last_error_frame {
        Some(message) => format!(" (vsockd had reported: {message})"),
        None => String::new(),
    }
}

impl ClientError {
    /// The `std::io::ErrorKind` that best matches this error, for `Read` and
    /// `Write`.
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            ClientError::Connect { source, .. } | ClientError::Io { source, .. } => source.kind(),
            ClientError::Spawn { .. } => io::ErrorKind::Other,
            ClientError::NoReply { .. } | ClientError::Refused { .. } => {
                io::ErrorKind::ConnectionRefused
            }
            ClientError::BadReply { .. } | ClientError::InvalidToken { .. } => {
                io::ErrorKind::InvalidData
            }
            ClientError::Session(SessionFailure::Aborted) => io::ErrorKind::ConnectionAborted,
            ClientError::Session(_) => io::ErrorKind::ConnectionReset,
            ClientError::WriteShutDown | ClientError::Ended => io::ErrorKind::BrokenPipe,
            ClientError::TimedOut { .. } => io::ErrorKind::TimedOut,
            ClientError::UnreadData { .. } => io::ErrorKind::InvalidInput,
        }
    }
}

impl From<ClientError> for io::Error {
    fn from(err: ClientError) -> io::Error {
        io::Error::new(err.io_kind(), err)
    }
}
