//! The device figures of `vsockd status` read from the state region, for
//! the keeper, which holds the region's memfd but no guest memory.
//!
//! The region is mapped read-only on the first request after a worker
//! formatted it, and stays mapped. Per queue (see `crate::status` for what
//! the figures mean):
//! * RX and TX, running: the inflight log's used index and the heads it
//!   shows in flight. A log formatted for another queue size than the
//!   session records (written by a worker of another build) gives none;
//! * the event queue, running: its base (the device never takes its
//!   buffers);
//! * any queue set up but not running: its recorded base.

use std::os::fd::OwnedFd;

use log::warn;
use vsockd_device::{ConnCounts, ConnPhase};
use vsockd_persist::session::{VringRecord, VRING_ENABLED, VRING_STARTED};
use vsockd_persist::{Geometry, InflightSummary, PersistError, RegionView, Stamp};

use crate::handler::EVENT_QUEUE;
use crate::status::{DeviceFigures, QueueStatus};

/// The state region as the keeper reads it.
pub struct RegionReader {
    fd: OwnedFd,
    geometry: Geometry,
    view: Option<RegionView>,
}

impl RegionReader {
    /// A reader of the region in memfd `fd`, laid out for `geometry`.
    pub fn new(fd: OwnedFd, geometry: Geometry) -> Self {
        RegionReader {
            fd,
            geometry,
            view: None,
        }
    }

    /// Reads the region in memfd `fd` from now on (an upgrade migrated the
    /// region into a new memfd).
    pub fn replace_fd(&mut self, fd: OwnedFd) {
        self.fd = fd;
        self.view = None;
    }

    /// The region's layout version and generation, read from its header
    /// whatever its layout.
    pub fn stamp(&self) -> std::io::Result<Stamp> {
        Stamp::read(&self.fd)
    }

    fn view(&mut self) -> Result<&RegionView, String> {
        if self.view.is_none() {
            let fd = self
                .fd
                .try_clone()
                .map_err(|e| format!("cannot duplicate the state region's fd: {e}"))?;
            match RegionView::open(fd, self.geometry) {
                Ok(v) => self.view = Some(v),
                Err(e @ PersistError::NotFormatted) => return Err(e.to_string()),
                Err(e) => {
                    warn!("status: cannot read the state region: {e}");
                    return Err(e.to_string());
                }
            }
        }
        self.view
            .as_ref()
            .ok_or_else(|| "the state region is not mapped".to_string())
    }

    /// Connections and queues as the region holds them now.
    pub fn figures(&mut self) -> DeviceFigures {
        let view = match self.view() {
            Ok(v) => v,
            Err(why) => return DeviceFigures::Unknown(why),
        };
        let mut connections = ConnCounts::default();
        for rec in view.live_connections() {
            connections.add(ConnPhase::of_record(&rec));
        }
        let session = view.session().unwrap_or_default();
        let queues = std::array::from_fn(|q| queue(q, &session.vrings[q], view.inflight(q)));
        DeviceFigures::Known {
            connections,
            queues,
        }
    }
}

/// Queue `q` from its session record and inflight log.
fn queue(q: usize, rec: &VringRecord, log: Option<InflightSummary>) -> QueueStatus {
    let started = rec.flags & VRING_STARTED != 0;
    let (last_avail_idx, used_idx) = match log {
        Some(log) if started && u32::from(log.queue_size) == rec.size => {
            (Some(log.last_avail_idx()), Some(log.used_idx))
        }
        _ if started && q != EVENT_QUEUE => (None, None),
        _ if rec.size != 0 => (Some(rec.base), Some(rec.base)),
        _ => (None, None),
    };
    QueueStatus {
        size: rec.size,
        enabled: rec.flags & VRING_ENABLED != 0,
        started,
        last_avail_idx,
        used_idx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(size: u32, base: u16, flags: u32) -> VringRecord {
        VringRecord {
            size,
            base,
            flags,
            ..Default::default()
        }
    }

    fn log(queue_size: u16, used_idx: u16, in_flight: u16) -> Option<InflightSummary> {
        Some(InflightSummary {
            queue_size,
            used_idx,
            in_flight,
        })
    }

    #[test]
    fn queue_positions_from_what_the_region_holds() {
        let running = VRING_STARTED | VRING_ENABLED;
        let tx = queue(1, &rec(128, 3, running), log(128, 40, 2));
        assert_eq!((tx.last_avail_idx, tx.used_idx), (Some(42), Some(40)));
        assert!(tx.started && tx.enabled);
        // A log for another size is not this ring's.
        let tx = queue(1, &rec(256, 3, running), log(128, 40, 2));
        assert_eq!((tx.last_avail_idx, tx.used_idx), (None, None));
        // The event queue stays at its base.
        let ev = queue(EVENT_QUEUE, &rec(64, 9, running), None);
        assert_eq!((ev.last_avail_idx, ev.used_idx), (Some(9), Some(9)));
        // Stopped: the recorded base, whatever the log says.
        let rx = queue(0, &rec(128, 77, 0), log(128, 40, 0));
        assert_eq!((rx.last_avail_idx, rx.used_idx), (Some(77), Some(77)));
        assert!(!rx.started && !rx.enabled);
        // Not set up.
        let rx = queue(0, &rec(0, 0, 0), None);
        assert_eq!((rx.size, rx.last_avail_idx), (0, None));
    }
}
