//! Ring tests over guest memory laid out by virtio-queue's MockSplitQueue.

use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use crate::chain::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::{Chain, ChainErrorKind, GuestMemory, RingAddresses, RingError, SplitRing};

const QSIZE: u16 = 16;
const MEM_BYTES: usize = 0x20_0000;
const DATA: u64 = 0x10_0000;
/// The used ring lives apart: MockSplitQueue's own layout overlaps its used
/// ring with the end of the available ring (`used_event` among it).
const USED: u64 = 0x8000;

fn used_idx(m: &GuestMemory) -> u16 {
    u16::from_le(m.load(GuestAddress(USED + 2), Ordering::Acquire).unwrap())
}

fn used_elem(m: &GuestMemory, i: u64) -> (u32, u32) {
    let id: u32 = m.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap();
    let len: u32 = m.read_obj(GuestAddress(USED + 8 + 8 * i)).unwrap();
    (u32::from_le(id), u32::from_le(len))
}

fn mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn ring(m: &GuestMemory, q: &MockSplitQueue<GuestMemory>, event_idx: bool) -> SplitRing {
    let addrs = RingAddresses {
        desc: q.desc_table_addr().0,
        avail: q.avail_addr().0,
        used: USED,
    };
    SplitRing::new(m, u32::from(QSIZE), addrs, event_idx, 0).unwrap()
}

fn pop_err(r: &mut SplitRing, m: &GuestMemory) -> ChainErrorKind {
    let mut c = Chain::new();
    match r.pop(m, &mut c) {
        Ok(Some(Err(e))) => e.kind,
        other => panic!(
            "expected a chain error, got {:?}",
            other.map(|o| o.map(|r| r.is_ok()))
        ),
    }
}

#[test]
fn chain_becomes_readable_then_writable_iovecs() {
    let m = mem();
    let q = MockSplitQueue::new(&m, QSIZE);
    q.add_desc_chains(
        &[
            desc(DATA, 44, VIRTQ_DESC_F_NEXT, 1),
            desc(DATA + 0x1000, 100, VIRTQ_DESC_F_NEXT, 2),
            desc(DATA + 0x2000, 4096, VIRTQ_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut r = ring(&m, &q, false);
    let mut c = Chain::new();
    assert!(matches!(r.pop(&m, &mut c), Ok(Some(Ok(())))));
    assert_eq!(c.head(), 0);
    assert_eq!(c.readable().len(), 2);
    assert_eq!(c.readable_len(), 144);
    assert_eq!(c.writable_len(), 4096);
    // The iovecs point at the guest bytes.
    m.write_slice(b"guest!", GuestAddress(DATA + 0x1000))
        .unwrap();
    let iov = c.readable()[1];
    // SAFETY: the iovec lies in `m`, alive for this test.
    let seen = unsafe { std::slice::from_raw_parts(iov.iov_base as *const u8, 6) };
    assert_eq!(seen, b"guest!");
    assert!(matches!(r.pop(&m, &mut c), Ok(None)));
}

#[test]
fn looping_chain_is_refused() {
    let m = mem();
    let q = MockSplitQueue::new(&m, QSIZE);
    q.add_desc_chains(
        &[
            desc(DATA, 10, VIRTQ_DESC_F_NEXT, 1),
            desc(DATA, 10, VIRTQ_DESC_F_NEXT, 0),
        ],
        0,
    )
    .unwrap();
    let mut r = ring(&m, &q, false);
    assert_eq!(pop_err(&mut r, &m), ChainErrorKind::TooLong);
}

#[test]
fn next_index_out_of_range_is_refused() {
    let m = mem();
    let q = MockSplitQueue::new(&m, QSIZE);
    q.add_desc_chains(&[desc(DATA, 10, VIRTQ_DESC_F_NEXT, QSIZE + 3)], 0)
        .unwrap();
    let mut r = ring(&m, &q, false);
    assert_eq!(
        pop_err(&mut r, &m),
        ChainErrorKind::IndexOutOfRange(QSIZE + 3)
    );
}

#[test]
fn readable_after_writable_is_refused() {
    let m = mem();
    let q = MockSplitQueue::new(&m, QSIZE);
    q.add_desc_chains(
        &[
            desc(DATA, 10, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
            desc(DATA, 10, 0, 0),
        ],
        0,
    )
    .unwrap();
    let mut r = ring(&m, &q, false);
    assert_eq!(pop_err(&mut r, &m), ChainErrorKind::ReadableAfterWritable);
}

#[test]
fn indirect_descriptor_is_refused() {
    let m = mem();
    let q = MockSplitQueue::new(&m, QSIZE);
    q.add_desc_chains(&[desc(DATA, 16, VIRTQ_DESC_F_INDIRECT, 0)], 0)
        .unwrap();
    let mut r = ring(&m, &q, false);
    assert_eq!(pop_err(&mut r, &m), ChainErrorKind::Indirect);
}

#[test]
fn buffer_outside_guest_memory_is_refused() {
    let m = mem();
    let q = MockSplitQueue::new(&m, QSIZE);
    let end = MEM_BYTES as u64 - 8;
    q.add_desc_chains(&[desc(end, 64, 0, 0)], 0).unwrap();
    let mut r = ring(&m, &q, false);
    assert!(matches!(
        pop_err(&mut r, &m),
        ChainErrorKind::OutsideGuestMemory { .. }
    ));
    // And one at an address wrapping the 64-bit space.
    q.add_desc_chains(&[desc(u64::MAX - 4, 64, 0, 0)], 1)
        .unwrap();
    assert!(matches!(
        pop_err(&mut r, &m),
        ChainErrorKind::OutsideGuestMemory { .. }
    ));
}

#[test]
fn avail_index_running_ahead_is_a_ring_error() {
    let m = mem();
    let q = MockSplitQueue::new(&m, QSIZE);
    q.avail().idx().store(u16::to_le(QSIZE + 1));
    let mut r = ring(&m, &q, false);
    let mut c = Chain::new();
    assert!(matches!(
        r.pop(&m, &mut c),
        Err(RingError::AvailIndexOutOfRange { .. })
    ));
}

#[test]
fn used_elements_are_published_in_one_batch() {
    let m = mem();
    let q = MockSplitQueue::new(&m, QSIZE);
    for i in 0..3u16 {
        q.add_desc_chains(
            &[desc(DATA + u64::from(i) * 0x100, 64, VIRTQ_DESC_F_WRITE, 0)],
            i,
        )
        .unwrap();
    }
    let mut r = ring(&m, &q, false);
    let mut c = Chain::new();
    for i in 0..3u32 {
        assert!(matches!(r.pop(&m, &mut c), Ok(Some(Ok(())))));
        r.push_used(&m, c.head(), 10 + i).unwrap();
        // Staged, not yet visible.
        assert_eq!(used_idx(&m), 0);
    }
    assert_eq!(r.staged(), 3);
    assert!(r.publish(&m).unwrap(), "no suppression: notify");
    assert_eq!(used_idx(&m), 3);
    for i in 0..3u64 {
        assert_eq!(used_elem(&m, i), (i as u32, 10 + i as u32));
    }
    assert!(!r.publish(&m).unwrap(), "nothing new: no notification");
    assert!(r.push_used(&m, QSIZE, 0).is_err(), "head out of range");
}

#[test]
fn unpop_returns_the_chain() {
    let m = mem();
    let q = MockSplitQueue::new(&m, QSIZE);
    q.add_desc_chains(&[desc(DATA, 64, VIRTQ_DESC_F_WRITE, 0)], 5)
        .unwrap();
    let mut r = ring(&m, &q, false);
    let mut c = Chain::new();
    assert!(matches!(r.pop(&m, &mut c), Ok(Some(Ok(())))));
    assert_eq!(c.head(), 5);
    r.unpop();
    assert_eq!(r.next_avail(), 0);
    assert!(matches!(r.pop(&m, &mut c), Ok(Some(Ok(())))));
    assert_eq!(c.head(), 5);
}

#[test]
fn event_idx_notifies_only_when_used_event_is_crossed() {
    let m = mem();
    let q = MockSplitQueue::new(&m, QSIZE);
    for i in 0..4u16 {
        q.add_desc_chains(&[desc(DATA, 64, VIRTQ_DESC_F_WRITE, 0)], i)
            .unwrap();
    }
    let used_event = q.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    // The driver wants to hear when element 2 (index 3) is used.
    m.store(2u16.to_le(), GuestAddress(used_event), Ordering::Relaxed)
        .unwrap();
    let mut r = ring(&m, &q, true);
    let mut c = Chain::new();
    let mut step = |r: &mut SplitRing| {
        assert!(matches!(r.pop(&m, &mut c), Ok(Some(Ok(())))));
        r.push_used(&m, c.head(), 0).unwrap();
        r.publish(&m).unwrap()
    };
    assert!(!step(&mut r), "used idx 1");
    assert!(!step(&mut r), "used idx 2");
    assert!(step(&mut r), "used idx 3 crosses used_event 2");
    assert!(!step(&mut r), "used idx 4");
    // enable_notification writes avail_event = next_avail.
    let avail_event = USED + 4 + 8 * u64::from(QSIZE);
    assert!(!r.enable_notification(&m).unwrap());
    let v: u16 = m
        .load(GuestAddress(avail_event), Ordering::Relaxed)
        .unwrap();
    assert_eq!(u16::from_le(v), 4);
}

#[test]
fn bad_ring_addresses_and_sizes_are_refused() {
    let m = mem();
    let ok = RingAddresses {
        desc: 0,
        avail: 0x1000,
        used: 0x2000,
    };
    assert!(
        SplitRing::new(&m, 3, ok, false, 0).is_err(),
        "not a power of two"
    );
    assert!(
        SplitRing::new(&m, 65536, ok, false, 0).is_err(),
        "too large"
    );
    let mis = RingAddresses { desc: 8, ..ok };
    assert!(SplitRing::new(&m, 16, mis, false, 0).is_err(), "misaligned");
    let out = RingAddresses {
        used: MEM_BYTES as u64 - 4,
        ..ok
    };
    assert!(
        SplitRing::new(&m, 16, out, false, 0).is_err(),
        "outside memory"
    );
    assert!(SplitRing::new(&m, 16, ok, false, 0).is_ok());
}

#[test]
fn published_heads_are_reported_and_readable_for_recovery() {
    let m = mem();
    let q = MockSplitQueue::new(&m, QSIZE);
    for i in 0..3u16 {
        q.add_desc_chains(
            &[desc(DATA + u64::from(i) * 0x100, 64, VIRTQ_DESC_F_WRITE, 0)],
            i,
        )
        .unwrap();
    }
    let mut r = ring(&m, &q, false);
    r.track_used_heads();
    let mut c = Chain::new();
    let mut heads = Vec::new();
    for _ in 0..3 {
        assert!(matches!(r.pop(&m, &mut c), Ok(Some(Ok(())))));
        heads.push(c.head());
    }
    // Returned out of order: 2 and 0 published, 1 staged after.
    r.push_used(&m, heads[2], 0).unwrap();
    r.push_used(&m, heads[0], 0).unwrap();
    r.publish(&m).unwrap();
    r.push_used(&m, heads[1], 0).unwrap();
    let mut out = vec![99];
    r.take_published_heads(&mut out);
    assert_eq!(out, [heads[2], heads[0]]);
    assert_eq!(r.published(), 2);
    r.publish(&m).unwrap();
    r.take_published_heads(&mut out);
    assert_eq!(out, [heads[1]]);
    // What recovery reads back from guest memory.
    let addrs = RingAddresses {
        desc: q.desc_table_addr().0,
        avail: q.avail_addr().0,
        used: USED,
    };
    assert_eq!(SplitRing::guest_used_idx(&m, &addrs).unwrap(), 3);
    assert_eq!(r.used_head_at(&m, 1), Some(heads[0]));
    assert_eq!(r.used_head_at(&m, QSIZE + 2), Some(heads[1]));
    // A chain walked again by its head, without popping.
    let next = r.next_avail();
    r.walk_head(&m, &mut c, heads[1]).unwrap();
    assert_eq!((c.head(), c.writable_len()), (heads[1], 64));
    assert_eq!(r.next_avail(), next);
    assert!(r.walk_head(&m, &mut c, QSIZE).is_err());
}
