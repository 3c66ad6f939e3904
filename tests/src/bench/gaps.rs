//! Gaps in a device's service, seen from outside the backend: a thread
//! reads every ring's used index as the device published it in guest
//! memory, every `SAMPLE_INTERVAL`, and records when any of them
//! advanced. While the guest and the host always have packets waiting,
//! the longest stretch without an advance around an event (an upgrade)
//! is how long the device stopped serving for it: from the last element
//! the device published before it to the first one after.
//!
//! Each reading is timed before and after (it takes the virtual VM's
//! lock, and the thread may be descheduled), so an advance is known to
//! lie between the start of the reading before the one that saw it and
//! the end of that one. A gap is measured between the inner bounds:
//! between the end of the reading that saw one advance and the start of
//! the last reading that had not yet seen the next, the indices were
//! seen unchanged, so the device certainly published nothing. The outer
//! bounds are kept too: the difference is how far off the figure can be
//! (about two intervals when the sampler runs as it should, more when
//! the machine stalled it).

use std::sync::{Barrier, OnceLock};
use std::time::{Duration, Instant};

use crate::vmm::VirtualVm;

/// Time between two readings of the used indices: short against the
/// pauses measured, long enough that the sampler does not take a core
/// from the backend.
pub const SAMPLE_INTERVAL: Duration = Duration::from_micros(100);

/// One advance of the used indices, between two instants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advance {
    /// The start of the reading before the one that saw it.
    pub after: Instant,
    /// The end of the reading that saw it.
    pub seen: Instant,
}

/// A stretch without an advance, between two advances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// Its start: the advance before it was seen by then.
    pub from: Instant,
    /// Its end: the advance after it was not yet seen then.
    pub to: Instant,
    /// The earliest the advance before it can have happened.
    pub outer_from: Instant,
    /// The latest the advance after it can have happened.
    pub outer_to: Instant,
}

impl Gap {
    /// Time seen without an advance (the inner bounds).
    pub fn len(&self) -> Duration {
        self.to.saturating_duration_since(self.from)
    }

    /// The longest it can have been (the outer bounds).
    pub fn outer_len(&self) -> Duration {
        self.outer_to.saturating_duration_since(self.outer_from)
    }
}

/// When the used indices advanced, over one sampling run.
#[derive(Debug, Clone)]
pub struct Advances {
    /// The end of the first reading (the first gap starts there).
    pub started: Instant,
    /// The readings that found an index advanced, in order.
    pub advances: Vec<Advance>,
    /// Whether the vhost-user connection closed meanwhile.
    pub device_gone: bool,
}

/// Samples `vm`'s used indices until an advance is seen after the instant
/// put in `end`, or until `bound` past it, or until the device is gone.
/// Waits at `ready` once it has the first reading (so that a busy
/// machine cannot start it late).
pub fn sample(
    vm: &VirtualVm,
    ready: &Barrier,
    end: &OnceLock<Instant>,
    bound: Duration,
) -> Advances {
    let mut last = vm.device_used_indices();
    let started = Instant::now();
    ready.wait();
    let mut previous_start = started;
    let mut advances = Vec::new();
    let mut device_gone = false;
    loop {
        std::thread::sleep(SAMPLE_INTERVAL);
        let start = Instant::now();
        let indices = vm.device_used_indices();
        let now = Instant::now();
        if indices != last {
            last = indices;
            advances.push(Advance {
                after: previous_start,
                seen: now,
            });
        }
        previous_start = start;
        if let Some(&end) = end.get() {
            if advances.last().is_some_and(|a| a.after > end) || now >= end + bound {
                break;
            }
        }
        if vm.backend_gone() {
            device_gone = true;
            break;
        }
    }
    Advances {
        started,
        advances,
        device_gone,
    }
}

impl Advances {
    /// Every stretch between two advances, the first from the start of
    /// sampling.
    pub fn gaps(&self) -> impl Iterator<Item = Gap> + '_ {
        let first = Advance {
            after: self.started,
            seen: self.started,
        };
        let points = || std::iter::once(first).chain(self.advances.iter().copied());
        points().zip(points().skip(1)).map(|(a, b)| Gap {
            from: a.seen,
            to: b.after,
            outer_from: a.after,
            outer_to: b.seen,
        })
    }

    /// The longest gap that overlaps `[from, to]`; none if no advance
    /// was seen after `to` (the device did not serve again while
    /// sampled).
    pub fn longest_gap_around(&self, from: Instant, to: Instant) -> Option<Gap> {
        if !self.advances.last().is_some_and(|a| a.after > to) {
            return None;
        }
        self.gaps()
            .filter(|g| g.outer_to > from && g.outer_from < to)
            .max_by_key(Gap::len)
    }

    /// The longest gap that lies within `[from, to]` (zero if none does).
    pub fn longest_gap_within(&self, from: Instant, to: Instant) -> Duration {
        self.gaps()
            .filter(|g| g.outer_from >= from && g.outer_to <= to)
            .map(|g| g.len())
            .max()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Advances seen at `ms`, each by a reading that took 0.1 ms after
    /// one that started 0.2 ms earlier.
    fn advances(base: Instant, ms: &[u64]) -> Advances {
        let at = |us: u64| base + Duration::from_micros(us);
        Advances {
            started: base,
            advances: ms
                .iter()
                .map(|m| Advance {
                    after: at(m * 1000 - 200),
                    seen: at(m * 1000 + 100),
                })
                .collect(),
            device_gone: false,
        }
    }

    #[test]
    fn longest_gap_around_a_window() {
        let base = Instant::now();
        let at = |m: u64| base + Duration::from_millis(m);
        // Served every ms, a 15 ms hole from 40 to 55, a 30 ms one before
        // the window.
        let mut ms: Vec<u64> = (1..=10).collect();
        ms.extend(40..=41);
        ms.extend(55..=70);
        let a = advances(base, &ms);
        let g = a.longest_gap_around(at(30), at(50)).expect("served after");
        assert_eq!(g.len(), Duration::from_micros(30_000 - 300));
        assert_eq!(g.outer_len(), Duration::from_micros(30_000 + 300));
        let g = a.longest_gap_around(at(41), at(50)).expect("served after");
        assert_eq!(g.from, at(41) + Duration::from_micros(100));
        assert_eq!(g.len(), Duration::from_micros(14_000 - 300));
        // Nothing served after the window's end.
        assert_eq!(a.longest_gap_around(at(41), at(70)), None);
        // Within: only stretches wholly inside; the first from the start
        // of sampling.
        assert_eq!(
            a.longest_gap_within(at(0), at(39)),
            Duration::from_micros(800)
        );
        assert_eq!(
            a.longest_gap_within(at(0), at(41)),
            Duration::from_micros(29_700)
        );
    }

    #[test]
    fn nothing_served_at_all() {
        let base = Instant::now();
        let a = advances(base, &[]);
        assert_eq!(
            a.longest_gap_around(base, base + Duration::from_millis(50)),
            None
        );
        assert_eq!(
            a.longest_gap_within(base, base + Duration::from_millis(50)),
            Duration::ZERO
        );
    }
}
