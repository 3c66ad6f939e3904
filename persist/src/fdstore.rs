//! The fd store: descriptors the keeper holds for the worker, by id, so
//! that they outlive the worker.
//!
//! The worker deposits a descriptor (a [`Kind::Fds`] frame) as soon as it
//! has one the session needs: guest memory regions, kick and call eventfds,
//! each host connection socket. It withdraws ids it no longer needs. A new
//! worker receives every stored descriptor with its id, then
//! [`Kind::HandoverEnd`].
//!
//! Ordering rule that makes recovery exact: a descriptor is deposited
//! before any record in the state region names its id, and withdrawn only
//! after no record names it. A worker that dies in between leaves an id no
//! record names; its successor withdraws such ids after adoption
//! ([`FdSet::unreferenced`]). Frames on the link are processed in order, so
//! a deposit sent before the worker died is stored before the hand-over to
//! the next worker starts.
//!
//! Host clients are the one deposit the keeper makes itself: it accepts
//! them on the host listener, which it keeps out of the store (no worker
//! ever holds it), and puts each in the store under
//! [`well_known::conn_stream`] of a uid from its own range
//! ([`well_known::FIRST_KEEPER_CONN_UID`]) *before* it tells the worker
//! ([`Kind::HostClient`]). So a host client is in the store from the
//! instant it is accepted, and no worker death loses it: an id of that
//! range left over after adoption, above the highest keeper uid a worker
//! recorded (the state region's `last_host_client_uid`, raised only after
//! the connection's record is written), is a client no worker recorded,
//! and the successor takes it as a new one instead of withdrawing it. At
//! or below that mark it is a connection a worker recorded and freed, and
//! is withdrawn like any other.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::channel::{ids_payload, Channel, Frame, Kind};

/// Ids of descriptors in the store, and the ranges of connection uids.
///
/// Ids: [`STATE_REGION`] (the keeper's, kept across sessions; the host
/// listener is not in the store: the keeper keeps it to itself); from
/// [`FIRST_WORKER_ID`] up, the session's fds (guest memory, eventfds),
/// which the worker allocates; from [`CONN_STREAM_BASE`] up, connections'
/// host streams by uid ([`conn_stream`]), which the worker deposits, or
/// the keeper for the host clients it accepts. Everything from
/// [`FIRST_WORKER_ID`] up is dropped when a session ends.
///
/// Connection uids: `1..FIRST_KEEPER_CONN_UID` are the worker's (the state
/// region's counter, `Region::take_conn_uid`, counting up from 1: guest
/// connects, and host clients a `--no-keeper` worker accepts);
/// `FIRST_KEEPER_CONN_UID` up are the keeper's (host clients it accepted,
/// counting up from there). The two never meet: the worker's counter would
/// need 2^40 connections to get there (three years at 10,000 a second),
/// and adoption never raises it past its own range.
pub mod well_known {
    /// The state region's memfd.
    pub const STATE_REGION: u64 = 1;
    /// First id of the range the worker allocates from.
    pub const FIRST_WORKER_ID: u64 = 1 << 16;
    /// Host streams of connections: this plus the connection's uid (above
    /// every id a session's control messages use).
    pub const CONN_STREAM_BASE: u64 = 1 << 48;
    /// First uid of a host client the keeper accepted.
    pub const FIRST_KEEPER_CONN_UID: u64 = 1 << 40;

    /// The id the host stream of connection `uid` is kept under.
    pub const fn conn_stream(uid: u64) -> u64 {
        CONN_STREAM_BASE + uid
    }

    /// The connection uid whose host stream id `id` is, if it is one.
    pub const fn conn_uid(id: u64) -> Option<u64> {
        if id > CONN_STREAM_BASE {
            Some(id - CONN_STREAM_BASE)
        } else {
            None
        }
    }

    /// True for a uid the keeper gave a host client it accepted.
    pub const fn is_keeper_conn_uid(uid: u64) -> bool {
        uid >= FIRST_KEEPER_CONN_UID
    }
}

/// The keeper's side: descriptors by id.
#[derive(Debug, Default)]
pub struct FdStore {
    fds: BTreeMap<u64, OwnedFd>,
}

impl FdStore {
    /// Stores `fd` under `id`, closing what was stored there before.
    pub fn deposit(&mut self, id: u64, fd: OwnedFd) {
        self.fds.insert(id, fd);
    }

    /// Applies a worker's frame: a deposit or a withdrawal. Other frames
    /// are returned untouched.
    pub fn apply(&mut self, frame: Frame) -> Result<Option<Frame>, io::Error> {
        match frame.kind {
            Kind::Fds => {
                for (id, fd) in frame.into_fd_items()? {
                    self.deposit(id, fd);
                }
                Ok(None)
            }
            Kind::Withdraw => {
                for id in frame.ids() {
                    self.fds.remove(&id);
                }
                Ok(None)
            }
            _ => Ok(Some(frame)),
        }
    }

    /// Sends every stored descriptor to a new worker, then
    /// [`Kind::HandoverEnd`] with `started` (workers started before).
    pub fn hand_over(&self, link: &Channel, started: u64) -> io::Result<()> {
        let items: Vec<(u64, RawFd)> = self
            .fds
            .iter()
            .map(|(&id, fd)| (id, fd.as_raw_fd()))
            .collect();
        link.send_fds(&items)?;
        link.send(Kind::HandoverEnd, 0, started, &[], &[])
    }

    /// Sends the descriptors under `ids` (those held) to a worker, then
    /// [`Kind::HandoverEnd`] with `started`: a partial hand-over, as a
    /// standby worker's first one.
    pub fn hand_over_only(&self, link: &Channel, ids: &[u64], started: u64) -> io::Result<()> {
        let items: Vec<(u64, RawFd)> = ids
            .iter()
            .filter_map(|&id| self.raw_fd(id).map(|fd| (id, fd)))
            .collect();
        link.send_fds(&items)?;
        link.send(Kind::HandoverEnd, 0, started, &[], &[])
    }

    /// Every descriptor held, with its id (they stay held).
    pub fn raw_fds(&self) -> Vec<(u64, RawFd)> {
        self.fds
            .iter()
            .map(|(&id, fd)| (id, fd.as_raw_fd()))
            .collect()
    }

    /// Number of descriptors held.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// True when `id` is held.
    pub fn contains(&self, id: u64) -> bool {
        self.fds.contains_key(&id)
    }

    /// A duplicate of the descriptor held under `id`.
    pub fn dup(&self, id: u64) -> Option<OwnedFd> {
        self.fds.get(&id).and_then(|fd| fd.try_clone().ok())
    }

    /// The descriptor held under `id`, to send (it stays held).
    pub fn raw_fd(&self, id: u64) -> Option<RawFd> {
        self.fds.get(&id).map(AsRawFd::as_raw_fd)
    }

    /// Closes everything except the well-known descriptors (the session
    /// ended).
    pub fn clear_session(&mut self) {
        self.fds.retain(|&id, _| id < well_known::FIRST_WORKER_ID);
    }
}

/// The worker's side: what the hand-over delivered, to be taken by id
/// while adopting.
#[derive(Debug, Default)]
pub struct FdSet {
    fds: BTreeMap<u64, OwnedFd>,
}

impl FdSet {
    /// Receives a hand-over on `link`: every [`Kind::Fds`] frame up to
    /// [`Kind::HandoverEnd`], whose `id` is returned with the set.
    pub fn receive(link: &Channel) -> io::Result<(Self, u64)> {
        let mut set = FdSet::default();
        loop {
            let Some(frame) = link.recv()? else {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the keeper closed the link during the hand-over",
                ));
            };
            match frame.kind {
                Kind::Fds => set.fds.extend(frame.into_fd_items()?),
                Kind::HandoverEnd => return Ok((set, frame.id)),
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{other:?} frame during the hand-over"),
                    ))
                }
            }
        }
    }

    /// Takes the descriptor stored under `id`.
    pub fn take(&mut self, id: u64) -> Option<OwnedFd> {
        self.fds.remove(&id)
    }

    /// A duplicate of the descriptor under `id`, leaving it in the set.
    pub fn dup(&self, id: u64) -> Option<OwnedFd> {
        self.fds.get(&id).and_then(|fd| fd.try_clone().ok())
    }

    /// Takes every descriptor whose id `pick` accepts, in id order.
    pub fn take_where(&mut self, mut pick: impl FnMut(u64) -> bool) -> Vec<(u64, OwnedFd)> {
        let ids: Vec<u64> = self.fds.keys().copied().filter(|&id| pick(id)).collect();
        ids.into_iter()
            .filter_map(|id| self.fds.remove(&id).map(|fd| (id, fd)))
            .collect()
    }

    /// Ids left in the set after adoption took what it needed: nothing
    /// refers to them any more. Drops their descriptors here.
    pub fn unreferenced(&mut self) -> Vec<u64> {
        let ids = self.fds.keys().copied().collect();
        self.fds.clear();
        ids
    }

    /// Insert (tests and `--no-keeper` start-up).
    pub fn insert(&mut self, id: u64, fd: OwnedFd) {
        self.fds.insert(id, fd);
    }
}

/// The worker's handle for deposits and withdrawals.
pub trait FdKeeper {
    /// Keeps duplicates of `fds` under `ids`.
    fn deposit(&self, items: &[(u64, RawFd)]) -> io::Result<()>;
    /// Forgets `ids`.
    fn withdraw(&self, ids: &[u64]) -> io::Result<()>;
}

impl FdKeeper for Channel {
    fn deposit(&self, items: &[(u64, RawFd)]) -> io::Result<()> {
        self.send_fds(items)
    }

    fn withdraw(&self, ids: &[u64]) -> io::Result<()> {
        for chunk in ids.chunks(crate::channel::MAX_FDS_PER_FRAME) {
            self.send(Kind::Withdraw, 0, 0, &ids_payload(chunk), &[])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn null() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn deposits_withdrawals_and_hand_over() {
        let (keeper_end, worker_end) = Channel::pair().unwrap();
        let mut store = FdStore::default();
        store.deposit(well_known::STATE_REGION, null());
        let a = null();
        let b = null();
        worker_end
            .deposit(&[(100_000, a.as_raw_fd()), (100_001, b.as_raw_fd())])
            .unwrap();
        worker_end.withdraw(&[100_000]).unwrap();
        worker_end.send(Kind::Ready, 0, 1, &[], &[]).unwrap();
        for _ in 0..2 {
            let f = keeper_end.recv().unwrap().unwrap();
            assert!(store.apply(f).unwrap().is_none());
        }
        let f = keeper_end.recv().unwrap().unwrap();
        assert_eq!(store.apply(f).unwrap().map(|f| f.kind), Some(Kind::Ready));
        assert_eq!(store.len(), 2);
        assert!(store.contains(100_001) && !store.contains(100_000));

        store.hand_over(&keeper_end, 3).unwrap();
        let (mut set, started) = FdSet::receive(&worker_end).unwrap();
        assert_eq!(started, 3);
        assert!(set.take(well_known::STATE_REGION).is_some());
        assert_eq!(set.unreferenced(), vec![100_001]);

        store.clear_session();
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn uid_ranges_and_picking_host_clients() {
        use well_known::*;
        assert_eq!(conn_uid(conn_stream(7)), Some(7));
        assert_eq!(conn_uid(FIRST_WORKER_ID + 3), None);
        assert_eq!(conn_uid(STATE_REGION), None);
        assert!(!is_keeper_conn_uid(FIRST_KEEPER_CONN_UID - 1));
        assert!(is_keeper_conn_uid(FIRST_KEEPER_CONN_UID));
        let mut set = FdSet::default();
        for id in [
            STATE_REGION,
            FIRST_WORKER_ID,
            conn_stream(5),
            conn_stream(FIRST_KEEPER_CONN_UID + 2),
            conn_stream(FIRST_KEEPER_CONN_UID),
        ] {
            set.insert(id, null());
        }
        let keeper_clients = set.take_where(|id| conn_uid(id).is_some_and(is_keeper_conn_uid));
        let ids: Vec<u64> = keeper_clients.iter().map(|(id, _)| *id).collect();
        assert_eq!(
            ids,
            vec![
                conn_stream(FIRST_KEEPER_CONN_UID),
                conn_stream(FIRST_KEEPER_CONN_UID + 2)
            ]
        );
        assert_eq!(
            set.unreferenced(),
            vec![STATE_REGION, FIRST_WORKER_ID, conn_stream(5)]
        );
    }

    #[test]
    fn a_deposit_with_missing_fds_is_refused() {
        let (keeper_end, worker_end) = Channel::pair().unwrap();
        worker_end
            .send(Kind::Fds, 0, 0, &ids_payload(&[1, 2]), &[])
            .unwrap();
        let f = keeper_end.recv().unwrap().unwrap();
        assert!(FdStore::default().apply(f).is_err());
    }
}
