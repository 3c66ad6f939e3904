//! Where connections are in their life, counted for `vsockd status`: from
//! the muxer's table, or from the state region's connection records.

use vsockd_persist::slot::ConnRecord;

use crate::conn::rec_state;

/// A connection's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnPhase {
    /// A host client connected and has not finished its `CONNECT` line.
    Handshake,
    /// REQUEST owed or sent to the guest, RESPONSE not yet received; or
    /// the guest's REQUEST is being connected to the host service.
    Connecting,
    /// Data flows.
    Established,
    /// RST owed or sent; removed once it is through.
    Closing,
}

impl ConnPhase {
    /// The phase a connection record holds (None: not a state this build
    /// writes).
    pub fn of_record(rec: &ConnRecord) -> Option<ConnPhase> {
        match rec.state {
            rec_state::AWAIT_LINE => Some(ConnPhase::Handshake),
            rec_state::LOCAL_INIT | rec_state::CONNECTING => Some(ConnPhase::Connecting),
            rec_state::ESTABLISHED => Some(ConnPhase::Established),
            rec_state::CLOSING => Some(ConnPhase::Closing),
            _ => None,
        }
    }
}

/// Open connections by phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnCounts {
    pub handshake: usize,
    pub connecting: usize,
    pub established: usize,
    pub closing: usize,
    /// Records in a state this build does not know (a newer writer).
    pub unknown: usize,
}

impl ConnCounts {
    /// Counts one more connection in `phase` (None: unknown).
    pub fn add(&mut self, phase: Option<ConnPhase>) {
        let n = match phase {
            Some(ConnPhase::Handshake) => &mut self.handshake,
            Some(ConnPhase::Connecting) => &mut self.connecting,
            Some(ConnPhase::Established) => &mut self.established,
            Some(ConnPhase::Closing) => &mut self.closing,
            None => &mut self.unknown,
        };
        *n += 1;
    }

    /// Every connection counted.
    pub fn total(&self) -> usize {
        self.handshake + self.connecting + self.established + self.closing + self.unknown
    }
}
