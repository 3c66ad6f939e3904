//! Named crash points, for tests that must land a worker's death inside a
//! window a few instructions wide (between a socket call and the record
//! that follows it), which a kill from outside hits only by luck.
//!
//! `VSOCKD_CRASH_POINT=<name>` or `<name>@<n>` in a worker's environment
//! makes the worker SIGKILL itself the first (or the `n`th) time it passes
//! point `<name>`. The keeper passes the variable to the first worker only,
//! so the worker it restarts carries on; a point whose name starts with
//! `standby-` goes to the first standby worker of an upgrade instead.
//! Unset, a point costs one atomic load (of the initialised `OnceLock`).
//!
//! Points, each named where it is passed:
//! * `guest-connect`: a guest's connect reached the host service, before
//!   the connection's record says so.
//! * `line-read`: a host client's `CONNECT` line was read, before the
//!   record says so.
//! * `host-client`: a host client arrived from the keeper, before the
//!   device recorded it.
//! * `conn-freed`: a connection's slot was recorded free, before its host
//!   stream was released (outside an RX batch).
//! * `standby-adopt`: a standby worker took the state region's next
//!   generation (its first write), before it adopted anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable naming the point.
pub const CRASH_POINT_ENV: &str = "VSOCKD_CRASH_POINT";

static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn armed() -> Option<&'static (String, u64)> {
    ARMED
        .get_or_init(|| {
            let v = std::env::var(CRASH_POINT_ENV).ok()?;
            let (name, nth) = match v.split_once('@') {
                Some((name, n)) => (name.to_string(), n.parse().ok()?),
                None => (v, 1),
            };
            Some((name, nth))
        })
        .as_ref()
}

/// Passes crash point `name`: kills the process if it is the armed one
/// and this is the armed pass.
pub fn hit(name: &str) {
    let Some((point, nth)) = armed() else { return };
    if point != name {
        return;
    }
    if HITS.fetch_add(1, Ordering::Relaxed) + 1 == *nth {
        log::warn!("crash point {name} reached: killing this process");
        // SAFETY: signalling our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
