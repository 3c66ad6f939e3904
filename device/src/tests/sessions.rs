//! Resumable sessions at the device level: a host client played by the
//! test, writing and reading frames with its own encoder (not the
//! device's), and the guest played by the rig.

use super::*;

const DATA: u8 = 1;
const ACK: u8 = 2;
const END: u8 = 3;
const ERROR: u8 = 4;
const ABORT: u8 = 5;

/// A frame as the client encodes it; `corrupt` flips a checksum bit.
fn frame(kind: u8, offset: u64, payload: &[u8], corrupt: bool) -> Vec<u8> {
    let mut b = vec![0u8; 24];
    b[0] = kind;
    b[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..16]);
    h.update(payload);
    let sum = h.finalize() ^ u32::from(corrupt);
    b[16..20].copy_from_slice(&sum.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

/// A frame read by the client: kind, offset, payload (checksum checked).
fn read_frame(s: &mut UnixStream) -> (u8, u64, Vec<u8>) {
    let h = read_exact_timeout(s, 24);
    let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    let offset = u64::from_le_bytes(h[8..16].try_into().unwrap());
    let payload = if len > 0 {
        read_exact_timeout(s, len)
    } else {
        Vec::new()
    };
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..16]);
    c.update(&payload);
    assert_eq!(
        c.finalize(),
        u32::from_le_bytes(h[16..20].try_into().unwrap()),
        "checksum of a frame from the device"
    );
    (h[0], offset, payload)
}

/// Reads frames until `kind`, returning it (frames of other kinds before
/// it are returned too, in order).
fn read_until(s: &mut UnixStream, kind: u8) -> Vec<(u8, u64, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        let f = read_frame(s);
        let done = f.0 == kind;
        got.push(f);
        if done {
            return got;
        }
    }
}

/// True when the device closed `s` within 5 s: EOF, or a reset when it
/// closed with bytes of ours unread.
fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == io::ErrorKind::ConnectionReset,
        }
    }
}

impl Rig {
    /// RX as the backend does it: fill, commit, publish (ACKs go out).
    fn rx_published(&mut self) -> Option<(PacketHeader, Vec<u8>)> {
        let got = self.rx();
        self.mux.commit_rx();
        self.mux.rx_published();
        got
    }

    /// Opens a resumable session to guest port `gport`, sending `first`
    /// right after the line; returns the client, the host-side port and
    /// the token.
    fn open_session(&mut self, gport: u32, first: &[u8]) -> (UnixStream, u32, String) {
        let mut c = self.host_client();
        let mut bytes = format!("CONNECT {gport} resumable\n").into_bytes();
        bytes.extend_from_slice(first);
        c.write_all(&bytes).unwrap();
        let (req, _) = self.rx_op(OP_REQUEST);
        let local = req.src_port();
        self.tx(&hdr(OP_RESPONSE, gport, local, 0), &[]);
        let line = read_line(&mut c);
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words.len(), 3, "{line}");
        assert_eq!((words[0], words[1]), ("OK", local.to_string().as_str()));
        assert_eq!(words[2].len(), 32, "{line}");
        (c, local, words[2].to_string())
    }

    fn resume(&mut self, token: &str, received: u64) -> (UnixStream, String) {
        let mut c = self.host_client();
        c.write_all(format!("RESUME {token} {received}\n").as_bytes())
            .unwrap();
        self.mux.process_host_events();
        let line = read_line(&mut c);
        (c, line)
    }

    fn with_grace(grace: std::time::Duration) -> Rig {
        let mut rig = Rig::new();
        let cfg = MuxerConfig {
            guest_cid: GUEST_CID,
            buf_alloc: BUF_ALLOC,
            max_connections: 4096,
            resume_grace: grace,
        };
        let host = TestHost {
            listener: UnixListener::bind(rig.path.with_extension("g")).unwrap(),
            path: rig.path.with_extension("g"),
            refused: HashSet::new(),
            accepted: rig.accepted.clone(),
            unconnected: Vec::new(),
        };
        host.listener.set_nonblocking(true).unwrap();
        rig.path = host.path.clone();
        rig.mux = Muxer::new(cfg, host).unwrap();
        rig
    }
}

#[test]
fn frames_carry_both_directions_and_acks_return_credit() {
    let mut rig = Rig::new();
    let (mut c, local, _) = rig.open_session(52, &frame(DATA, 0, b"hello", false));
    let (h, p) = rig.rx_published().unwrap();
    assert_eq!((op_name(h.op()), p.as_slice()), ("RW", &b"hello"[..]));
    // The guest has 5 bytes: acknowledged after publication.
    assert_eq!(read_frame(&mut c), (ACK, 5, vec![]));
    rig.tx(&hdr(OP_RW, 52, local, 5), b"world");
    assert_eq!(read_frame(&mut c), (DATA, 0, b"world".to_vec()));
    // Unacknowledged, the credit is not given back.
    rig.tx(&hdr(OP_CREDIT_REQUEST, 52, local, 0), &[]);
    let (h, _) = rig.rx_op(OP_CREDIT_UPDATE);
    assert_eq!(h.fwd_cnt(), 0);
    c.write_all(&frame(ACK, 5, b"", false)).unwrap();
    rig.mux.process_host_events();
    rig.tx(&hdr(OP_CREDIT_REQUEST, 52, local, 0), &[]);
    let (h, _) = rig.rx_op(OP_CREDIT_UPDATE);
    assert_eq!(h.fwd_cnt(), 5);
}

#[test]
fn unacknowledged_bytes_are_sent_again_after_a_resume_and_nothing_twice_to_the_guest() {
    let mut rig = Rig::new();
    let (mut c, local, token) = rig.open_session(52, &frame(DATA, 0, b"abc", false));
    rig.rx_published().unwrap();
    assert_eq!(read_frame(&mut c), (ACK, 3, vec![]));
    for chunk in [&b"one-"[..], b"two-", b"three"] {
        rig.tx(&hdr(OP_RW, 52, local, chunk.len() as u32), chunk);
    }
    let got: Vec<u8> = (0..3).flat_map(|_| read_frame(&mut c).2).collect();
    assert_eq!(got, b"one-two-three");
    // The client acknowledges 4 bytes, then its socket breaks.
    c.write_all(&frame(ACK, 4, b"", false)).unwrap();
    rig.mux.process_host_events();
    drop(c);
    rig.mux.process_host_events();
    assert_eq!(rig.mux.connection_count(), 1, "the guest connection stays");
    // Resuming below what was acknowledged is refused.
    let (_, line) = rig.resume(&token, 3);
    assert!(line.starts_with("ERR "), "{line}");
    // The client had 8 bytes: the device sends from there, and reports
    // the 3 bytes the guest has; the client sends the rest from there.
    let (mut c, line) = rig.resume(&token, 8);
    assert_eq!(line, "OK 3");
    assert_eq!(read_frame(&mut c), (DATA, 8, b"three".to_vec()));
    c.write_all(&frame(DATA, 3, b"def", false)).unwrap();
    let (_, p) = rig.rx_published().unwrap();
    assert_eq!(p, b"def");
    assert!(rig.rx().is_none(), "nothing twice");
    assert_eq!(read_frame(&mut c), (ACK, 6, vec![]));
}

#[test]
fn a_bad_checksum_reaches_no_guest_and_the_session_resumes() {
    let mut rig = Rig::new();
    let (mut c, _, token) = rig.open_session(52, &frame(DATA, 0, b"corrupt!", true));
    assert!(
        rig.rx_published().is_none(),
        "a byte of a bad frame reached the guest"
    );
    let (kind, _, msg) = read_frame(&mut c);
    assert_eq!(kind, ERROR);
    let msg = String::from_utf8(msg).unwrap();
    assert!(msg.contains("checksum"), "{msg}");
    assert!(closed(&mut c));
    let (mut c, line) = rig.resume(&token, 0);
    assert_eq!(line, "OK 0");
    c.write_all(&frame(DATA, 0, b"good", false)).unwrap();
    assert_eq!(rig.rx_published().unwrap().1, b"good");
}

#[test]
fn bad_frames_and_lines_are_refused_one_socket_at_a_time() {
    let mut rig = Rig::new();
    let (mut c, _, token) = rig.open_session(52, &[]);
    let (mut other, _, _) = rig.open_session(53, &[]);
    // A gap in the offsets.
    c.write_all(&frame(DATA, 7, b"x", false)).unwrap();
    rig.mux.process_host_events();
    assert!(rig.rx_published().is_none());
    let (kind, _, msg) = read_frame(&mut c);
    assert_eq!(kind, ERROR);
    assert!(String::from_utf8(msg).unwrap().contains("expected 0"));
    assert!(closed(&mut c));
    // An unknown token, a malformed line.
    let (_, line) = rig.resume("00000000000000000000000000000000", 0);
    assert_eq!(line, "ERR unknown or expired token");
    let (_, line) = rig.resume(&token, 1);
    assert!(line.starts_with("ERR offset 1 is outside"), "{line}");
    // An unknown kind.
    let (mut c, line) = rig.resume(&token, 0);
    assert_eq!(line, "OK 0");
    let mut junk = frame(ACK, 0, b"", false);
    junk[0] = 9;
    c.write_all(&junk).unwrap();
    rig.mux.process_host_events();
    assert_eq!(read_frame(&mut c).0, ERROR);
    assert!(closed(&mut c));
    // The other session never noticed.
    other.write_all(&frame(DATA, 0, b"fine", false)).unwrap();
    assert_eq!(rig.rx_published().unwrap().1, b"fine");
    assert_eq!(read_frame(&mut other), (ACK, 4, vec![]));
}

#[test]
fn a_session_nobody_resumes_resets_the_guest_after_the_grace_period() {
    let mut rig = Rig::with_grace(std::time::Duration::from_millis(50));
    let (c, local, token) = rig.open_session(52, &[]);
    drop(c);
    rig.mux.process_host_events();
    assert!(rig.rx().is_none(), "reset before the grace period");
    std::thread::sleep(std::time::Duration::from_millis(80));
    let (h, _) = rig.rx_op(OP_RST);
    assert_eq!((h.src_port(), h.dst_port()), (local, 52));
    let (_, line) = rig.resume(&token, 0);
    assert!(line.starts_with("ERR "), "{line}");
    assert_eq!(rig.mux.connection_count(), 0);
}

#[test]
fn frames_the_guest_has_no_room_for_are_staged_and_acks_behind_them_read() {
    let mut rig = Rig::new();
    let (mut c, local, _) = rig.open_session(52, &[]);
    // The guest grants only 10 bytes of credit.
    let small = |op, len| {
        let mut h = hdr(op, 52, local, len);
        h.set_buf_alloc(10);
        h
    };
    rig.tx(&small(OP_CREDIT_UPDATE, 0), &[]);
    rig.tx(&small(OP_RW, 4), b"ping");
    assert_eq!(read_frame(&mut c), (DATA, 0, b"ping".to_vec()));
    // 30 bytes, then the ACK of "ping".
    let mut w = frame(DATA, 0, &[7u8; 30], false);
    w.extend(frame(ACK, 4, b"", false));
    c.write_all(&w).unwrap();
    rig.mux.process_host_events();
    // The ACK was read past the staged frame: credit for "ping" is back.
    let (h, p) = rig.rx().unwrap();
    assert_eq!(
        (op_name(h.op()), p.len()),
        ("RW", 10),
        "10 staged bytes first"
    );
    assert_eq!(h.fwd_cnt(), 4);
}

#[test]
fn ends_are_passed_on_and_acknowledged_then_the_session_closes() {
    let mut rig = Rig::new();
    let (mut c, local, _) = rig.open_session(52, &frame(DATA, 0, b"bye", false));
    c.write_all(&frame(END, 3, b"", false)).unwrap();
    assert_eq!(rig.rx_published().unwrap().1, b"bye");
    let (h, _) = rig.rx_op(OP_SHUTDOWN);
    assert_eq!(h.flags(), SHUTDOWN_SEND);
    rig.mux.commit_rx();
    rig.mux.rx_published();
    let acks: Vec<u64> = read_until(&mut c, ACK).iter().map(|f| f.1).collect();
    let acks = if acks == [3] {
        vec![3, read_frame(&mut c).1]
    } else {
        acks
    };
    assert_eq!(acks.last(), Some(&4), "END acknowledged at 3 + 1");
    // The guest sends its last bytes and shuts down.
    rig.tx(&hdr(OP_RW, 52, local, 2), b"ok");
    rig.tx(
        &hdr(OP_SHUTDOWN, 52, local, 0)
            .set_flags(SHUTDOWN_BOTH)
            .to_owned(),
        &[],
    );
    assert_eq!(read_frame(&mut c), (DATA, 0, b"ok".to_vec()));
    assert_eq!(read_frame(&mut c), (END, 2, vec![]));
    assert_eq!(
        rig.mux.connection_count(),
        1,
        "open until the END is acknowledged"
    );
    c.write_all(&frame(ACK, 3, b"", false)).unwrap();
    rig.mux.process_host_events();
    rig.rx_op(OP_RST);
    assert!(closed(&mut c));
    assert_eq!(rig.mux.connection_count(), 0);
}

#[test]
fn abort_resets_the_guest_and_forgets_the_token() {
    let mut rig = Rig::new();
    let (mut c, _, token) = rig.open_session(52, &[]);
    c.write_all(&frame(ABORT, 0, b"", false)).unwrap();
    rig.mux.process_host_events();
    rig.rx_op(OP_RST);
    assert!(closed(&mut c));
    let (_, line) = rig.resume(&token, 0);
    assert_eq!(line, "ERR unknown or expired token");
}
