//! Host client for vsockd's hybrid vsock socket.
//!
//! Two ways to reach a guest port:
//!
//! - [`connect_raw`]: `CONNECT <port>`, then plain bytes over a
//!   [`UnixStream`](std::os::unix::net::UnixStream). Simple, but a break of
//!   vsockd's worker or of this process can lose or cut the stream.
//! - [`Session`]: a *resumable session* (`CONNECT <port> resumable`), which
//!   carries on across breaks with every byte delivered exactly once each
//!   way, and can be taken over by a restarted process with its [`Token`].
//!
//! The wire format is described in `docs/resumable-sessions.md`.
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use vsockd_client::{Options, Session};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut session = Session::connect("/run/vsockd/vsock.sock", 1234, Options::default())?;
//! session.write_all(b"hello")?;
//! session.shutdown_write()?;
//! let mut reply = Vec::new();
//! session.read_to_end(&mut reply)?;
//! session.close()?;
//! # Ok(())
//! # }
//! ```

mod error;
pub mod frame;
mod line;
mod options;
mod raw;
mod ring;
mod session;
mod sys;
mod token;
mod wake;

pub use error::{ClientError, SessionFailure};
pub use line::MAX_LINE_BYTES;
pub use options::{
    Options, DEFAULT_ACK_EVERY_BYTES, DEFAULT_MAX_UNACKED_BYTES, DEFAULT_REATTACH_TIMEOUT,
    DEFAULT_RETRY_INTERVAL,
};
pub use raw::{connect_raw, RawConnection};
pub use session::{Disconnect, Session, RECEIVE_BUFFER_BYTES};
pub use token::{Token, TOKEN_BYTES, TOKEN_HEX_DIGITS};
