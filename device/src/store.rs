//! Where the muxer keeps its connections for a successor process: the
//! device's side of the state region, as a trait the backend implements
//! over shared memory (and tests over plain memory).
//!
//! What the muxer stores, and when (the commit points of the design):
//! * a connection's record, in the slot it occupies in the muxer's table,
//!   after every change that a successor must see: each TX packet applied,
//!   each host read or write, each step of the handshake, and once per RX
//!   batch before the batch is published;
//! * its host stream, kept under the connection's uid before any record
//!   names the uid, and released only once no record can name it again (a
//!   host client the keeper accepted comes with its stream kept already,
//!   under a uid the keeper gave it: the store is told once its record is
//!   written, [`ConnStore::kept_stream_recorded`]);
//! * for each TX chain applied, where its payload sits in its connection's
//!   stream ([`TxMeta`]), before the record that counts it;
//! * bytes the host has not taken, in the slot's data area (for a
//!   resumable session, bytes its client has not acknowledged);
//! * a resumable session's own record, before the connection's record
//!   whenever it changed.
//!
//! Removing a connection commits a free record (`uid == 0`).

use std::os::fd::RawFd;

pub use vsockd_persist::resume::ResumeRecord;
pub use vsockd_persist::slot::{ConnRecord, TxMeta};

/// Bytes of data area a connection with credit `buf_alloc` needs.
pub fn data_area_bytes(buf_alloc: u32) -> usize {
    crate::txbuf::ring_bytes(buf_alloc as usize)
}

/// A store of connection slots.
///
/// # Safety
///
/// [`ConnStore::data_area`] must return memory valid for reads and writes
/// of [`ConnStore::data_bytes`] bytes for as long as the store lives, used
/// by nothing but the connection in that slot.
pub unsafe trait ConnStore {
    /// Slots: the most connections the device holds at once.
    fn slots(&self) -> usize;

    /// Bytes of each slot's data area.
    fn data_bytes(&self) -> usize;

    /// Slot `slot`'s data area.
    fn data_area(&self, slot: usize) -> Option<*mut u8>;

    /// Gives back the memory of slot `slot`'s data area (its content is no
    /// longer needed).
    fn discard_data(&mut self, slot: usize);

    /// A connection uid never handed out before.
    fn next_uid(&mut self) -> u64;

    /// Keeps a copy of host stream `fd` for connection `uid`.
    fn keep_stream(&mut self, uid: u64, fd: RawFd);

    /// Drops the copies kept for these connections.
    fn release_streams(&mut self, uids: &[u64]);

    /// Connection `uid`, whose stream was kept before the device got it
    /// (a host client the keeper accepted), is recorded in its slot: a
    /// successor that finds the stream kept and no record naming `uid` must
    /// take it for a connection that was freed, not for a new client.
    fn kept_stream_recorded(&mut self, uid: u64);

    /// Writes `rec` as slot `slot`'s state.
    fn commit(&mut self, slot: usize, rec: &ConnRecord);

    /// Writes `rec` as the state of slot `slot`'s resumable session.
    fn commit_resume(&mut self, slot: usize, rec: &ResumeRecord);

    /// Stores where TX chain `head`'s payload went.
    fn note_tx(&mut self, head: u16, meta: &TxMeta);

    /// What [`ConnStore::note_tx`] stored last for `head`.
    fn tx_meta(&self, head: u16) -> Option<TxMeta>;
}
