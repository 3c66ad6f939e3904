//! The device's own figures for `vsockd status` (`--no-keeper`, where no
//! keeper reads them from the state region).

use super::{VsockDevice, NUM_QUEUES};
use crate::status::{DeviceFigures, QueueStatus};

impl VsockDevice {
    /// Open connections and where each queue stands. A running ring
    /// reports its next available index and the used index it published
    /// last; one that is not running stands at its base.
    pub fn status_figures(&self) -> DeviceFigures {
        let queues: [QueueStatus; NUM_QUEUES] = std::array::from_fn(|q| {
            let v = &self.vrings[q];
            let (last_avail_idx, used_idx) = match &v.ring {
                Some(ring) => (Some(ring.next_avail()), Some(ring.published())),
                None if v.size != 0 => (Some(v.base), Some(v.base)),
                None => (None, None),
            };
            QueueStatus {
                size: v.size,
                enabled: v.enabled,
                started: v.ring.is_some(),
                last_avail_idx,
                used_idx,
            }
        });
        DeviceFigures::Known {
            connections: self.muxer.connection_counts(),
            queues,
        }
    }
}
