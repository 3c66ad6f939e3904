//! Device tests: a guest driver played by the test (packets written into
//! buffers, laid out as descriptor chains of any shape) and a host played by
//! socket pairs.

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::rc::Rc;

use vm_memory::ByteValued;

use crate::packet::*;
use crate::{GuestIovs, Host, Muxer, MuxerConfig};

mod sessions;

const GUEST_CID: u64 = 3;
const BUF_ALLOC: u32 = 64 * 1024;

/// Host streams the device connected to, by port, for the test to use.
type Accepted = Rc<RefCell<Vec<(u32, UnixStream)>>>;

struct TestHost {
    listener: UnixListener,
    path: PathBuf,
    refused: HashSet<u32>,
    accepted: Accepted,
    /// Host ends of streams `open` made, by the device's end's fd, until
    /// `connect` makes them accepted.
    unconnected: Vec<(RawFd, UnixStream)>,
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Host for TestHost {
    type Stream = UnixStream;
    fn listener_fd(&self) -> Option<RawFd> {
        Some(self.listener.as_raw_fd())
    }
    fn accept(&mut self) -> io::Result<Option<UnixStream>> {
        match self.listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(true)?;
                Ok(Some(s))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn open(&mut self, _port: u32) -> io::Result<UnixStream> {
        let (a, b) = UnixStream::pair()?;
        a.set_nonblocking(true)?;
        self.unconnected.push((a.as_raw_fd(), b));
        Ok(a)
    }
    fn connect(&mut self, stream: &UnixStream, port: u32) -> io::Result<()> {
        if self.refused.contains(&port) {
            return Err(io::ErrorKind::ConnectionRefused.into());
        }
        let i = self
            .unconnected
            .iter()
            .position(|(fd, _)| *fd == stream.as_raw_fd());
        match i {
            Some(i) => {
                let (_, b) = self.unconnected.swap_remove(i);
                self.accepted.borrow_mut().push((port, b));
                Ok(())
            }
            // Connected by an earlier call.
            None => Ok(()),
        }
    }
}

struct Rig {
    mux: Muxer<TestHost>,
    accepted: Accepted,
    path: PathBuf,
    /// Buffers of chains sent with `tx_parking`: they stay allocated (the
    /// device may hold them) until the rig is dropped.
    kept: Vec<Vec<u8>>,
}

fn hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> PacketHeader {
    let mut h = PacketHeader::default();
    h.set_src_cid(GUEST_CID)
        .set_dst_cid(HOST_CID)
        .set_src_port(src_port)
        .set_dst_port(dst_port)
        .set_type(TYPE_STREAM)
        .set_op(op)
        .set_len(len)
        .set_buf_alloc(BUF_ALLOC)
        .set_fwd_cnt(0);
    h
}

impl Rig {
    fn new() -> Rig {
        Rig::with_buf_alloc(BUF_ALLOC)
    }

    fn with_buf_alloc(buf_alloc: u32) -> Rig {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vsockd-dev-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let accepted: Accepted = Rc::default();
        let host = TestHost {
            listener,
            path: path.clone(),
            refused: [404].into_iter().collect(),
            accepted: accepted.clone(),
            unconnected: Vec::new(),
        };
        let cfg = MuxerConfig {
            guest_cid: GUEST_CID,
            buf_alloc,
            max_connections: 4096,
            resume_grace: std::time::Duration::from_secs(30),
        };
        Rig {
            mux: Muxer::new(cfg, host).unwrap(),
            accepted,
            path,
            kept: Vec::new(),
        }
    }

    /// Sends a packet from the guest, its bytes cut into descriptors at
    /// `cuts` (offsets into header + payload).
    fn tx_split(&mut self, h: &PacketHeader, payload: &[u8], cuts: &[usize]) {
        let mut bytes = h.as_slice().to_vec();
        bytes.extend_from_slice(payload);
        let mut bufs: Vec<Vec<u8>> = Vec::new();
        let mut start = 0;
        for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
            bufs.push(bytes[start..c].to_vec());
            start = c;
        }
        let iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: the buffers outlive the call and are not otherwise accessed.
        let pkt = unsafe { GuestIovs::new(&iovs) };
        self.mux.handle_tx(&pkt);
    }

    fn tx(&mut self, h: &PacketHeader, payload: &[u8]) {
        self.tx_split(h, payload, &[]);
    }

    /// Sends chain `head` (header, then payload in a second buffer) the way
    /// the backend does, letting the device park it. True: returned now.
    fn tx_parking(&mut self, head: u16, h: &PacketHeader, payload: &[u8]) -> bool {
        let mut hb = h.as_slice().to_vec();
        let mut pb = payload.to_vec();
        let iovs = [
            libc::iovec {
                iov_base: hb.as_mut_ptr().cast(),
                iov_len: hb.len(),
            },
            libc::iovec {
                iov_base: pb.as_mut_ptr().cast(),
                iov_len: pb.len(),
            },
        ];
        // SAFETY: both buffers move into `kept` below without their heap
        // storage moving, and stay there until the rig (and its muxer) is
        // dropped; nothing else touches them.
        let pkt = unsafe { GuestIovs::new(&iovs) };
        // SAFETY: as above, the buffers outlive every use the muxer makes.
        let chain = crate::TxChain { head, counter: 0 };
        let done = unsafe { self.mux.handle_tx_parking(chain, &pkt) };
        self.kept.push(hb);
        self.kept.push(pb);
        done
    }

    fn completed(&mut self) -> Vec<u16> {
        let mut v = Vec::new();
        self.mux.take_completed_tx(&mut v);
        v
    }

    /// Takes the next RX packet into a buffer of `size` bytes.
    fn rx_sized(&mut self, size: usize) -> Option<(PacketHeader, Vec<u8>)> {
        self.mux.process_host_events();
        let mut buf = vec![0u8; size];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: `buf` outlives the call and is not otherwise accessed.
        let g = unsafe { GuestIovs::new(&iov) };
        let mut lens = [0usize; 1];
        if self.mux.fill_rx(&[g], &mut lens) == 0 {
            return None;
        }
        let n = lens[0];
        let h = PacketHeader::from_bytes(buf[..HEADER_SIZE_BYTES].try_into().unwrap());
        assert_eq!(
            h.len() as usize,
            n - HEADER_SIZE_BYTES,
            "len field matches bytes written"
        );
        Some((h, buf[HEADER_SIZE_BYTES..n].to_vec()))
    }

    /// Offers `n` RX buffers of 4 KiB in one batch; returns the buffers and
    /// the bytes written to each one filled.
    fn rx_batch(&mut self, n: usize) -> (Vec<Vec<u8>>, Vec<usize>) {
        let mut bufs = vec![vec![0u8; 4096]; n];
        let iovs: Vec<[libc::iovec; 1]> = bufs
            .iter_mut()
            .map(|b| {
                [libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                }]
            })
            .collect();
        // SAFETY: the buffers outlive the call and are not otherwise accessed.
        let g: Vec<GuestIovs<'_>> = iovs.iter().map(|i| unsafe { GuestIovs::new(i) }).collect();
        let mut lens = vec![0usize; n];
        let filled = self.mux.fill_rx(&g, &mut lens);
        lens.truncate(filled);
        (bufs, lens)
    }

    fn rx(&mut self) -> Option<(PacketHeader, Vec<u8>)> {
        self.rx_sized(4096)
    }

    fn rx_op(&mut self, op: u16) -> (PacketHeader, Vec<u8>) {
        let (h, p) = self
            .rx()
            .unwrap_or_else(|| panic!("expected {}, got nothing", op_name(op)));
        assert_eq!(op_name(h.op()), op_name(op), "{h:?}");
        (h, p)
    }

    /// Guest connects from `gport` to host port `hport`; returns the host end.
    fn guest_connect(&mut self, gport: u32, hport: u32) -> UnixStream {
        self.tx(&hdr(OP_REQUEST, gport, hport, 0), &[]);
        let (h, _) = self.rx_op(OP_RESPONSE);
        assert_eq!((h.src_port(), h.dst_port()), (hport, gport));
        assert_eq!(h.dst_cid(), GUEST_CID);
        assert_eq!(h.buf_alloc(), BUF_ALLOC);
        let (port, s) = self.accepted.borrow_mut().pop().unwrap();
        assert_eq!(port, hport);
        s
    }

    fn host_client(&self) -> UnixStream {
        UnixStream::connect(&self.path).unwrap()
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

#[test]
fn guest_to_host_bytes_in_every_descriptor_layout() {
    let mut rig = Rig::new();
    let mut host = rig.guest_connect(1000, 80);
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    // Header and payload in one descriptor; split after the header; header
    // itself split; payload in several pieces.
    let layouts: [&[usize]; 4] = [&[], &[44], &[10, 44], &[44, 100, 101, 2000]];
    for cuts in layouts {
        rig.tx_split(&hdr(OP_RW, 1000, 80, 3000), &payload, cuts);
        assert_eq!(
            read_exact_timeout(&mut host, 3000),
            payload,
            "layout {cuts:?}"
        );
    }
}

#[test]
fn host_to_guest_respects_peer_credit() {
    let mut rig = Rig::new();
    let host = rig.guest_connect(1001, 81);
    // The guest granted 64 KiB; the host sends 100 KiB.
    let data: Vec<u8> = (0..100 * 1024u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let d = data.clone();
        let mut h = host.try_clone().unwrap();
        std::thread::spawn(move || h.write_all(&d))
    };
    let mut got = Vec::new();
    let mut last_fwd = 0u32;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(20));
        match rig.rx() {
            Some((h, p)) => {
                assert_eq!(h.op(), OP_RW);
                got.extend_from_slice(&p);
            }
            None => {
                if got.len() == BUF_ALLOC as usize && last_fwd == 0 {
                    // Guest reads everything and says so.
                    last_fwd = got.len() as u32;
                    let mut cu = hdr(OP_CREDIT_UPDATE, 1001, 81, 0);
                    cu.set_fwd_cnt(last_fwd);
                    rig.tx(&cu, &[]);
                } else if got.len() == data.len() {
                    break;
                }
            }
        }
        assert!(
            got.len() <= last_fwd as usize + BUF_ALLOC as usize,
            "sent beyond the guest's credit"
        );
    }
    writer.join().unwrap().unwrap();
    assert_eq!(got, data);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (h, _) = rig.rx_op(OP_SHUTDOWN);
    assert_eq!(h.flags(), SHUTDOWN_SEND, "host half-close is SEND only");
}

#[test]
fn refused_guest_connect_gets_rst() {
    let mut rig = Rig::new();
    rig.tx(&hdr(OP_REQUEST, 1002, 404, 0), &[]);
    let (h, _) = rig.rx_op(OP_RST);
    assert_eq!((h.src_port(), h.dst_port()), (404, 1002));
    assert!(rig.rx().is_none());
}

#[test]
fn host_client_connect_line_and_payload_in_same_write() {
    let mut rig = Rig::new();
    let mut client = rig.host_client();
    client.write_all(b"CONNECT 52\nearly bytes").unwrap();
    let (req, _) = rig.rx_op(OP_REQUEST);
    assert_eq!(req.dst_port(), 52);
    let local = req.src_port();
    // Nothing flows before the guest answers.
    assert!(rig.rx().is_none());
    rig.tx(&hdr(OP_RESPONSE, 52, local, 0), &[]);
    assert_eq!(read_line(&mut client), format!("OK {local}"));
    let (rw, p) = rig.rx_op(OP_RW);
    assert_eq!(rw.src_port(), local);
    assert_eq!(p, b"early bytes");
    client.write_all(b" and later").unwrap();
    let (_, p) = rig.rx_op(OP_RW);
    assert_eq!(p, b" and later");
}

#[test]
fn connection_counts_follow_each_phase() {
    let mut rig = Rig::new();
    let counts = |rig: &Rig| {
        let c = rig.mux.connection_counts();
        assert_eq!(c.total(), rig.mux.connection_count());
        (c.handshake, c.connecting, c.established, c.closing)
    };
    assert_eq!(counts(&rig), (0, 0, 0, 0));
    let _guest = rig.guest_connect(1010, 90);
    let mut client = rig.host_client();
    client.write_all(b"CONNECT 5").unwrap();
    assert!(rig.rx().is_none());
    assert_eq!(counts(&rig), (1, 0, 1, 0));
    client.write_all(b"3\n").unwrap();
    let (req, _) = rig.rx_op(OP_REQUEST);
    assert_eq!(counts(&rig), (0, 1, 1, 0));
    rig.tx(&hdr(OP_RESPONSE, 53, req.src_port(), 0), &[]);
    assert_eq!(counts(&rig), (0, 0, 2, 0));
}

#[test]
fn connect_line_split_across_writes() {
    let mut rig = Rig::new();
    let mut client = rig.host_client();
    client.write_all(b"CONNE").unwrap();
    assert!(rig.rx().is_none());
    client.write_all(b"CT 7").unwrap();
    assert!(rig.rx().is_none());
    client.write_all(b"7\n").unwrap();
    let (req, _) = rig.rx_op(OP_REQUEST);
    assert_eq!(req.dst_port(), 77);
}

#[test]
fn malformed_connect_line_closes_only_that_client() {
    let mut rig = Rig::new();
    let mut good_host = rig.guest_connect(1003, 82);
    let mut bad = rig.host_client();
    bad.write_all(b"HELLO 1\n").unwrap();
    let mut long = rig.host_client();
    long.write_all(&[b'x'; 200]).unwrap();
    assert!(rig.rx().is_none(), "no REQUEST for junk");
    bad.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    long.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 8];
    assert_eq!(bad.read(&mut b).unwrap(), 0, "junk line: closed");
    assert!(
        matches!(long.read(&mut b), Ok(0) | Err(_)),
        "over-long line: closed"
    );
    rig.tx(&hdr(OP_RW, 1003, 82, 2), b"ok");
    assert_eq!(read_exact_timeout(&mut good_host, 2), b"ok");
}

#[test]
fn guest_refuses_host_client() {
    let mut rig = Rig::new();
    let mut client = rig.host_client();
    client.write_all(b"CONNECT 9\n").unwrap();
    let (req, _) = rig.rx_op(OP_REQUEST);
    let mut rst = hdr(OP_RST, 9, req.src_port(), 0);
    rst.set_buf_alloc(0);
    rig.tx(&rst, &[]);
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 8];
    assert_eq!(client.read(&mut b).unwrap(), 0, "host client closed");
    assert_eq!(rig.mux.connection_count(), 0);
}

#[test]
fn guest_half_close_reaches_host_as_eof_and_reverse_flows() {
    let mut rig = Rig::new();
    let mut host = rig.guest_connect(1004, 83);
    rig.tx(&hdr(OP_RW, 1004, 83, 3), b"abc");
    let mut sd = hdr(OP_SHUTDOWN, 1004, 83, 0);
    sd.set_flags(SHUTDOWN_SEND);
    rig.tx(&sd, &[]);
    let mut all = Vec::new();
    host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    host.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"abc", "bytes then EOF");
    host.write_all(b"reply").unwrap();
    let (_, p) = rig.rx_op(OP_RW);
    assert_eq!(p, b"reply");
    // Full close from the guest: we answer RST once all is forwarded.
    sd.set_flags(SHUTDOWN_BOTH);
    rig.tx(&sd, &[]);
    rig.rx_op(OP_RST);
    assert_eq!(rig.mux.connection_count(), 0);
}

#[test]
fn slow_host_reader_buffers_up_to_credit_then_drains() {
    let mut rig = Rig::new();
    let mut host = rig.guest_connect(1005, 84);
    // Fill the host socket's buffer so the device must buffer.
    let chunk = vec![0x5au8; 8192];
    let mut sent = 0usize;
    let mut fwd_seen = 0u32;
    for _ in 0..64 {
        rig.tx(&hdr(OP_RW, 1005, 84, chunk.len() as u32), &chunk);
        sent += chunk.len();
        while let Some((h, _)) = rig.rx() {
            fwd_seen = h.fwd_cnt();
        }
        // The guest keeps to its credit: stop when it runs out.
        if sent as u32 - fwd_seen + chunk.len() as u32 > BUF_ALLOC {
            break;
        }
    }
    assert!(
        sent > 200 * 1024,
        "the host socket filled and the device buffered"
    );
    // The host reads everything; credit updates follow and every byte arrives.
    host.set_nonblocking(true).unwrap();
    let mut got = 0;
    let mut last = fwd_seen;
    let mut buf = vec![0u8; 65536];
    for _ in 0..10_000 {
        match host.read(&mut buf) {
            Ok(n) => {
                assert!(buf[..n].iter().all(|&b| b == 0x5a));
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        while let Some((h, _)) = rig.rx() {
            last = h.fwd_cnt();
        }
        if got == sent && last as usize == sent {
            break;
        }
    }
    assert_eq!(got, sent);
    assert_eq!(
        last as usize, sent,
        "credit update reports everything forwarded"
    );
}

/// Credit is advertised early: once a quarter of buf_alloc has been
/// forwarded since the last header, a CREDIT_UPDATE is owed even though
/// the guest still has most of its credit (it would otherwise stall a
/// moment waiting for one), and not before.
#[test]
fn credit_update_after_a_quarter_of_buf_alloc_forwarded() {
    let mut rig = Rig::new();
    let mut host = rig.guest_connect(1006, 85);
    let quarter = (BUF_ALLOC / 4) as usize;
    let small = vec![1u8; quarter - 1];
    rig.tx(&hdr(OP_RW, 1006, 85, small.len() as u32), &small);
    assert!(
        rig.rx().is_none(),
        "no update before a quarter is forwarded"
    );
    rig.tx(&hdr(OP_RW, 1006, 85, 1), &[2]);
    let (h, _) = rig.rx_op(OP_CREDIT_UPDATE);
    assert_eq!(h.fwd_cnt() as usize, quarter);
    let mut got = vec![0u8; quarter];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got[..quarter - 1], &small[..]);
    assert_eq!(got[quarter - 1], 2);
}

/// Fills a host stream's socket buffer from the guest side: returns the
/// bytes sent. The guest keeps to its credit.
fn fill_host_socket(rig: &mut Rig, gport: u32, hport: u32) -> usize {
    let chunk = vec![0u8; 4096];
    let mut sent = 0;
    loop {
        rig.tx(&hdr(OP_RW, gport, hport, chunk.len() as u32), &chunk);
        sent += chunk.len();
        while rig.rx().is_some() {}
        if rig.mux.connection_count() == 0 || sent > 4 << 20 {
            panic!("could not fill the host socket");
        }
        // A chain sent with parking allowed that is kept tells it is full.
        let probe = [9u8; 1];
        if !rig.tx_parking(0xffff, &hdr(OP_RW, gport, hport, 1), &probe) {
            return sent + 1;
        }
        sent += 1;
    }
}

/// The host reads `want` bytes while the device runs its host events;
/// returns them and the TX heads completed meanwhile.
fn drain_host(rig: &mut Rig, host: &mut UnixStream, want: usize) -> (Vec<u8>, Vec<u16>) {
    host.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut completed = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    for _ in 0..100_000 {
        match host.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        rig.mux.process_host_events();
        completed.extend(rig.completed());
        if got.len() >= want {
            break;
        }
    }
    assert_eq!(got.len(), want);
    (got, completed)
}

/// A full host stream parks TX chains instead of copying them: they come
/// back once the host reads, in order, with every byte; past the
/// per-connection limit chains are copied and returned at once.
#[test]
fn full_host_stream_parks_chains_until_written() {
    const BIG: u32 = 1 << 20;
    // A roomy buf_alloc, so credit is not what stops the guest.
    let mut rig = Rig::with_buf_alloc(BIG);
    rig.mux.set_park_limit(64);
    rig.tx(&hdr(OP_REQUEST, 1007, 86, 0), &[]);
    rig.rx_op(OP_RESPONSE);
    let (_, mut host) = rig.accepted.borrow_mut().pop().unwrap();
    let filled = fill_host_socket(&mut rig, 1007, 86);
    assert_eq!(rig.mux.parked_chains(), 1);
    assert!(rig.completed().is_empty(), "a parked chain is not returned");
    // Three more park (four per connection), the fifth is copied.
    let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![10 + i; 1000]).collect();
    for (i, p) in payloads.iter().enumerate() {
        let done = rig.tx_parking(i as u16, &hdr(OP_RW, 1007, 86, 1000), p);
        assert_eq!(done, i >= 3, "chain {i}");
    }
    assert_eq!(rig.mux.parked_chains(), 4);
    // The host reads everything: the parked chains complete in order.
    let (got, completed) = drain_host(&mut rig, &mut host, filled + 5000);
    assert_eq!(completed, [0xffff, 0, 1, 2]);
    assert_eq!(rig.mux.parked_chains(), 0);
    assert_eq!(got[filled - 1], 9, "the probe byte");
    for (i, p) in payloads.iter().enumerate() {
        let at = filled + i * 1000;
        assert_eq!(&got[at..at + 1000], &p[..], "payload {i} in order");
    }
}

/// Before guest memory is remapped the parked bytes are copied out: the
/// chains are returned at once, and the bytes still reach the host, in
/// order. A connection reset returns its parked chains too.
#[test]
fn unpark_copies_parked_bytes_and_reset_returns_chains() {
    let mut rig = Rig::new();
    rig.mux.set_park_limit(64);
    let mut host = rig.guest_connect(1008, 87);
    let filled = fill_host_socket(&mut rig, 1008, 87);
    let extra = vec![0x77u8; 100];
    assert!(!rig.tx_parking(5, &hdr(OP_RW, 1008, 87, 100), &extra));
    rig.mux.unpark_all();
    let mut c = rig.completed();
    c.sort_unstable();
    assert_eq!(c, [5, 0xffff]);
    assert_eq!(rig.mux.parked_chains(), 0);
    // The buffers may change now: the device no longer reads them.
    for b in rig.kept.iter_mut() {
        b.fill(0xee);
    }
    let (got, _) = drain_host(&mut rig, &mut host, filled + 100);
    assert_eq!(got[filled - 1], 9);
    assert!(got[filled..].iter().all(|&b| b == 0x77));
    // Park again, then the guest resets the connection: the chain returns.
    fill_host_socket(&mut rig, 1008, 87);
    assert_eq!(rig.mux.parked_chains(), 1);
    rig.tx(&hdr(OP_RST, 1008, 87, 0), &[]);
    assert_eq!(rig.completed(), [0xffff]);
    assert_eq!(rig.mux.parked_chains(), 0);
}

#[test]
fn guest_exceeding_credit_is_reset_others_unaffected() {
    let mut rig = Rig::new();
    let _stalled = rig.guest_connect(1006, 85);
    let mut other = rig.guest_connect(1007, 86);
    let chunk = vec![1u8; 32 * 1024];
    let mut reset = false;
    for _ in 0..64 {
        rig.tx(&hdr(OP_RW, 1006, 85, chunk.len() as u32), &chunk);
        if let Some((h, _)) = rig.rx() {
            if h.op() == OP_RST {
                assert_eq!(h.dst_port(), 1006);
                reset = true;
                break;
            }
        }
    }
    assert!(reset, "a guest ignoring credit is reset");
    rig.tx(&hdr(OP_RW, 1007, 86, 5), b"still");
    assert_eq!(read_exact_timeout(&mut other, 5), b"still");
}

#[test]
fn malformed_packets_reset_one_connection_and_spare_the_rest() {
    let mut rig = Rig::new();
    let mut other = rig.guest_connect(2000, 90);
    type Mangle = fn(&mut PacketHeader);
    let cases: [(&str, Mangle, &[u8], bool); 5] = [
        (
            "len larger than the buffer",
            |h| {
                h.set_len(100);
            },
            b"abc",
            true,
        ),
        (
            "len smaller than the buffer",
            |h| {
                h.set_len(1);
            },
            b"abc",
            true,
        ),
        (
            "unknown op",
            |h| {
                h.set_op(99);
            },
            b"",
            true,
        ),
        (
            "seqpacket type",
            |h| {
                h.set_type(2);
            },
            b"",
            true,
        ),
        (
            "control packet with payload",
            |h| {
                h.set_op(OP_CREDIT_REQUEST).set_len(3);
            },
            b"abc",
            true,
        ),
    ];
    for (i, (name, mangle, payload, expect_rst)) in cases.into_iter().enumerate() {
        let port = 3000 + i as u32;
        let _h = rig.guest_connect(port, 91);
        let mut h = hdr(OP_RW, port, 91, payload.len() as u32);
        mangle(&mut h);
        rig.tx(&h, payload);
        if expect_rst {
            let (r, _) = rig.rx_op(OP_RST);
            assert_eq!(r.dst_port(), port, "{name}");
        }
    }
    // Wrong addresses and short buffers are dropped silently.
    let mut h = hdr(OP_RW, 2000, 90, 1);
    h.set_src_cid(7);
    rig.tx(&h, b"x");
    let mut h = hdr(OP_RW, 2000, 90, 1);
    h.set_dst_cid(5);
    rig.tx(&h, b"x");
    let short = hdr(OP_RW, 2000, 90, 0);
    let bytes = short.as_slice()[..20].to_vec();
    let mut b = bytes.clone();
    let iov = [libc::iovec {
        iov_base: b.as_mut_ptr().cast(),
        iov_len: b.len(),
    }];
    // SAFETY: `b` outlives the call.
    rig.mux.handle_tx(&unsafe { GuestIovs::new(&iov) });
    // A packet for a connection that does not exist gets an RST.
    rig.tx(&hdr(OP_RW, 5555, 90, 1), b"z");
    let (r, _) = rig.rx_op(OP_RST);
    assert_eq!(r.dst_port(), 5555);
    assert!(rig.rx().is_none());
    rig.tx(&hdr(OP_RW, 2000, 90, 4), b"fine");
    assert_eq!(read_exact_timeout(&mut other, 4), b"fine");
    assert!(rig.mux.stats().bad_packets >= 7);
}

#[test]
fn credit_request_is_answered() {
    let mut rig = Rig::new();
    let _h = rig.guest_connect(1008, 87);
    rig.tx(&hdr(OP_CREDIT_REQUEST, 1008, 87, 0), &[]);
    let (h, _) = rig.rx_op(OP_CREDIT_UPDATE);
    assert_eq!(h.buf_alloc(), BUF_ALLOC);
}

#[test]
fn host_close_sends_shutdown_both_and_guest_rst_removes() {
    let mut rig = Rig::new();
    let host = rig.guest_connect(1009, 88);
    drop(host);
    let (h, _) = rig.rx_op(OP_SHUTDOWN);
    assert_eq!(h.flags(), SHUTDOWN_BOTH);
    rig.tx(&hdr(OP_RST, 1009, 88, 0), &[]);
    assert_eq!(rig.mux.connection_count(), 0);
    assert!(rig.rx().is_none());
}

#[test]
fn tiny_rx_buffers_carry_data_in_pieces() {
    let mut rig = Rig::new();
    let mut host = rig.guest_connect(1010, 89);
    host.write_all(&[9u8; 100]).unwrap();
    let mut got = 0;
    while got < 100 {
        let (h, p) = rig.rx_sized(HEADER_SIZE_BYTES + 7).unwrap();
        assert_eq!(h.op(), OP_RW);
        assert!(p.len() <= 7);
        got += p.len();
    }
    assert!(
        rig.rx_sized(HEADER_SIZE_BYTES - 1).is_none(),
        "buffer shorter than a header"
    );
}

#[test]
fn many_connections_each_get_their_bytes() {
    let mut rig = Rig::new();
    let mut hosts: Vec<UnixStream> = (0..300)
        .map(|i| rig.guest_connect(10_000 + i, 99))
        .collect();
    for i in 0..300u32 {
        let msg = i.to_le_bytes();
        rig.tx(&hdr(OP_RW, 10_000 + i, 99, 4), &msg);
    }
    for (i, h) in hosts.iter_mut().enumerate() {
        assert_eq!(read_exact_timeout(h, 4), (i as u32).to_le_bytes());
    }
    for (i, h) in hosts.iter_mut().enumerate() {
        h.write_all(&(i as u32).to_le_bytes()).unwrap();
    }
    let mut seen = vec![false; 300];
    while let Some((h, p)) = rig.rx() {
        let i = (h.dst_port() - 10_000) as usize;
        assert_eq!(p, (i as u32).to_le_bytes());
        seen[i] = true;
    }
    assert!(seen.iter().all(|&s| s));
}

#[test]
fn reset_closes_every_host_stream() {
    let mut rig = Rig::new();
    let mut h = rig.guest_connect(1011, 92);
    rig.mux.reset();
    assert_eq!(rig.mux.connection_count(), 0);
    h.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(h.read(&mut b).unwrap(), 0);
}

#[test]
fn one_read_fills_several_rx_buffers() {
    let mut rig = Rig::new();
    let mut host = rig.guest_connect(1012, 93);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 241) as u8).collect();
    host.write_all(&data).unwrap();
    rig.mux.process_host_events();
    let (bufs, lens) = rig.rx_batch(5);
    let filled = lens.len();
    assert_eq!(filled, 3, "10000 bytes in buffers of 4052 payload bytes");
    let mut got = Vec::new();
    let mut tx_total = 0;
    for (b, &n) in bufs.iter().zip(&lens[..filled]) {
        let h = PacketHeader::from_bytes(b[..HEADER_SIZE_BYTES].try_into().unwrap());
        assert_eq!(h.op(), OP_RW);
        assert_eq!(h.len() as usize + HEADER_SIZE_BYTES, n);
        tx_total += h.len();
        got.extend_from_slice(&b[HEADER_SIZE_BYTES..n]);
    }
    assert_eq!(tx_total, 10_000);
    assert_eq!(got, data);
}

#[test]
fn batch_stops_at_peer_credit() {
    let mut rig = Rig::new();
    let mut h = hdr(OP_REQUEST, 1013, 94, 0);
    h.set_buf_alloc(5000);
    rig.tx(&h, &[]);
    rig.rx_op(OP_RESPONSE);
    let (_, mut host) = rig.accepted.borrow_mut().pop().unwrap();
    host.write_all(&[7u8; 20_000]).unwrap();
    rig.mux.process_host_events();
    let (_, lens) = rig.rx_batch(4);
    assert_eq!(lens.len(), 2);
    assert_eq!(
        lens[0] + lens[1] - 2 * HEADER_SIZE_BYTES,
        5000,
        "exactly the credit"
    );
}

/// What a [`LogStore`] was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StoreCall {
    Keep(u64),
    Release(Vec<u64>),
    /// Slot and the uid its record names (0: free).
    Commit(usize, u64),
    Recorded(u64),
}

/// A connection store that only logs its calls (no data areas, so no
/// connection uses a shared buffer).
struct LogStore {
    slots: usize,
    next_uid: u64,
    calls: Rc<RefCell<Vec<StoreCall>>>,
}

// SAFETY: `data_area` never returns memory.
unsafe impl crate::ConnStore for LogStore {
    fn slots(&self) -> usize {
        self.slots
    }
    fn data_bytes(&self) -> usize {
        0
    }
    fn data_area(&self, _slot: usize) -> Option<*mut u8> {
        None
    }
    fn discard_data(&mut self, _slot: usize) {}
    fn next_uid(&mut self) -> u64 {
        self.next_uid += 1;
        self.next_uid
    }
    fn keep_stream(&mut self, uid: u64, _fd: RawFd) {
        self.calls.borrow_mut().push(StoreCall::Keep(uid));
    }
    fn release_streams(&mut self, uids: &[u64]) {
        self.calls
            .borrow_mut()
            .push(StoreCall::Release(uids.to_vec()));
    }
    fn kept_stream_recorded(&mut self, uid: u64) {
        self.calls.borrow_mut().push(StoreCall::Recorded(uid));
    }
    fn commit(&mut self, slot: usize, rec: &crate::store::ConnRecord) {
        self.calls
            .borrow_mut()
            .push(StoreCall::Commit(slot, rec.uid));
    }
    fn commit_resume(&mut self, _slot: usize, _rec: &crate::store::ResumeRecord) {}
    fn note_tx(&mut self, _head: u16, _meta: &crate::store::TxMeta) {}
    fn tx_meta(&self, _head: u16) -> Option<crate::store::TxMeta> {
        None
    }
}

impl Rig {
    /// Switches on a [`LogStore`] of `slots` slots; returns its call log.
    fn log_store(&mut self, slots: usize) -> Rc<RefCell<Vec<StoreCall>>> {
        let calls: Rc<RefCell<Vec<StoreCall>>> = Rc::default();
        self.mux.set_store(Box::new(LogStore {
            slots,
            next_uid: 0,
            calls: calls.clone(),
        }));
        calls
    }

    /// `rx_op`, committing and publishing the RX batch as the backend does.
    fn rx_op_kept(&mut self, op: u16) -> (PacketHeader, Vec<u8>) {
        let got = self.rx_op(op);
        self.mux.commit_rx();
        self.mux.rx_published();
        got
    }
}

/// A host client the keeper accepted keeps the keeper's uid, is recorded
/// before the store hears it was, is never kept a second time, and is
/// released under that uid when it goes.
#[test]
fn a_host_client_accepted_elsewhere_keeps_its_uid() {
    const UID: u64 = 1 << 40;
    let mut rig = Rig::new();
    let log = rig.log_store(8);
    let (mut client, accepted) = UnixStream::pair().unwrap();
    accepted.set_nonblocking(true).unwrap();
    client.write_all(b"CONNECT 52\nfirst").unwrap();
    rig.mux.add_host_client(accepted, UID);
    let (req, _) = rig.rx_op_kept(OP_REQUEST);
    assert_eq!(req.dst_port(), 52);
    let local = req.src_port();
    rig.tx(&hdr(OP_RESPONSE, 52, local, 0), &[]);
    assert_eq!(read_line(&mut client), format!("OK {local}"));
    let (_, p) = rig.rx_op_kept(OP_RW);
    assert_eq!(p, b"first");
    rig.tx(&hdr(OP_RST, 52, local, 0), &[]);
    let calls = log.borrow().clone();
    assert!(
        !calls.iter().any(|c| matches!(c, StoreCall::Keep(_))),
        "kept twice: {calls:?}"
    );
    let first_commit = calls.iter().position(|c| *c == StoreCall::Commit(0, UID));
    let recorded = calls.iter().position(|c| *c == StoreCall::Recorded(UID));
    assert!(
        first_commit.is_some() && first_commit < recorded,
        "recorded before its record was written: {calls:?}"
    );
    assert_eq!(
        calls[calls.len() - 2..],
        [StoreCall::Commit(0, 0), StoreCall::Release(vec![UID])],
        "{calls:?}"
    );
    // A client accepted here still gets its uid from the store, and kept.
    let mut other = rig.host_client();
    other.write_all(b"CONNECT 53\n").unwrap();
    rig.rx_op_kept(OP_REQUEST);
    let calls = log.borrow().clone();
    assert!(calls.contains(&StoreCall::Keep(1)), "{calls:?}");
    assert!(!calls.contains(&StoreCall::Recorded(1)), "{calls:?}");
}

/// A host client from elsewhere that finds every slot taken is closed and
/// its kept stream released.
#[test]
fn a_host_client_from_elsewhere_with_no_slot_left_is_released() {
    let mut rig = Rig::new();
    let log = rig.log_store(1);
    let (_c1, a1) = UnixStream::pair().unwrap();
    let (mut c2, a2) = UnixStream::pair().unwrap();
    for s in [&a1, &a2] {
        s.set_nonblocking(true).unwrap();
    }
    rig.mux.add_host_client(a1, (1 << 40) + 1);
    rig.mux.add_host_client(a2, (1 << 40) + 2);
    assert_eq!(rig.mux.connection_count(), 1);
    let calls = log.borrow().clone();
    assert_eq!(
        calls.last(),
        Some(&StoreCall::Release(vec![(1 << 40) + 2])),
        "{calls:?}"
    );
    assert!(!calls.contains(&StoreCall::Recorded((1 << 40) + 2)));
    // The device closed its end.
    c2.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    assert_eq!(c2.read(&mut [0u8; 8]).unwrap(), 0);
}
