//! Tuning for a [`Session`](crate::Session).

use std::time::Duration;

/// How a session behaves across breaks and how much it buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// How long the session keeps trying to `RESUME` after a break before it
    /// fails. Default 60 s (vsockd's grace period is 30 s by default).
    pub reattach_timeout: Duration,
    /// Pause between `RESUME` attempts. Default 20 ms.
    pub retry_interval: Duration,
    /// Host-to-guest bytes kept for sending again after a break; `write()`
    /// blocks while this many are unacknowledged. Default 4 MiB.
    pub max_unacked_bytes: usize,
    /// Send an `ACK` once the application has consumed this many bytes since
    /// the last one, and whenever a read finds nothing more buffered.
    /// Default 64 KiB (vsockd's receive buffer is 1 MiB by default; the
    /// protocol asks for at least one `ACK` every quarter of it).
    pub ack_every_bytes: u64,
    /// Acknowledge what the application read as soon as it read it (the
    /// default). With `false` the session acknowledges only up to the
    /// offset the application passes to
    /// [`Session::acknowledge`](crate::Session::acknowledge): an
    /// application that records its progress, to resume from it after its
    /// own restart, acknowledges only what it recorded, since vsockd
    /// refuses a `RESUME` below the last acknowledgement.
    pub acknowledge_on_read: bool,
}

/// Default [`Options::reattach_timeout`].
pub const DEFAULT_REATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`Options::retry_interval`].
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_millis(20);
/// Default [`Options::max_unacked_bytes`].
pub const DEFAULT_MAX_UNACKED_BYTES: usize = 4 << 20;
/// Default [`Options::ack_every_bytes`].
pub const DEFAULT_ACK_EVERY_BYTES: u64 = 64 << 10;

impl Default for Options {
    fn default() -> Options {
        Options {
            reattach_timeout: DEFAULT_REATTACH_TIMEOUT,
            retry_interval: DEFAULT_RETRY_INTERVAL,
            max_unacked_bytes: DEFAULT_MAX_UNACKED_BYTES,
            ack_every_bytes: DEFAULT_ACK_EVERY_BYTES,
            acknowledge_on_read: true,
        }
    }
}
