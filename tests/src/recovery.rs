//! How long a device takes to serve again after its backend was killed:
//! from the signal to the first used-index advance the device publishes
//! in guest memory, on any ring. The chaos tests and vsock-bench measure
//! recovery this way.
//!
//! The indices are read once the killed process is dead, so an advance
//! seen after that was published by whatever replaced it. A backend
//! whose vhost-user socket closed has nothing left to replace it: its
//! device never serves again, and that is reported at once.

use std::fmt;
use std::time::{Duration, Instant};

use crate::vmm::VirtualVm;

/// How often the used indices are read while waiting.
const POLL_INTERVAL: Duration = Duration::from_micros(100);

/// What followed a kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The device served again this long after the kill.
    Served(Duration),
    /// The backend closed the vhost-user connection: the device is dead.
    DeviceGone,
    /// Nothing served within the bound, though the connection is open.
    NotWithin(Duration),
}

impl Recovery {
    /// The recovery time, if the device served again.
    pub fn time(&self) -> Option<Duration> {
        match self {
            Recovery::Served(d) => Some(*d),
            _ => None,
        }
    }
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recovery::Served(d) => write!(f, "served again after {d:?}"),
            Recovery::DeviceGone => f.write_str("the backend closed the vhost-user connection"),
            Recovery::NotWithin(b) => write!(f, "nothing served within {b:?}"),
        }
    }
}

/// Waits, up to `bound` after `killed_at`, for `vm`'s device to publish a
/// used element on any ring. Call it once the killed process is dead
/// (see `Backend::kill_worker_now`); it needs traffic that wants serving
/// (a guest writing, a host stream with bytes for the guest).
pub fn wait_for_service(vm: &VirtualVm, killed_at: Instant, bound: Duration) -> Recovery {
    let before = vm.device_used_indices();
    loop {
        if vm.device_used_indices() != before {
            return Recovery::Served(killed_at.elapsed());
        }
        if vm.backend_gone() {
            return Recovery::DeviceGone;
        }
        if killed_at.elapsed() >= bound {
            return Recovery::NotWithin(bound);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
