//! Resumable sessions in the muxer: opening one, attaching the stream of a
//! client that resumes it, detaching a broken stream, the grace period,
//! the acknowledgements due once an RX batch is published, and the
//! hand-over record written when the worker quiesces for an upgrade.
//!
//! A `RESUME` is answered and the new stream moved into the session's slot
//! in one step: the reply is written, the session's records name the new
//! stream, and only then is the resuming client's own slot freed (its
//! stream now the session's). A crash anywhere in between leaves either
//! the old state, or a session naming the stream and a client slot with a
//! `RESUME` line, which a successor closes (see `keep`): the client sees
//! EOF and resumes again.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use log::{debug, info, warn};

use super::Muxer;
use crate::conn::State;
use crate::host::Host;
use crate::iov::write_fd;
use crate::session::{error_frame, monotonic_now_ns, Session, Token};

/// A non-blocking `CLOCK_MONOTONIC` timerfd, disarmed.
pub(super) fn grace_timer() -> io::Result<OwnedFd> {
    // SAFETY: timerfd_create(2) with valid flags; the result is checked.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl<H: Host> Muxer<H> {
    /// Gives the host client in `slot`, which asked for a resumable
    /// session, its session and token. False (the client closed) if no
    /// token could be made.
    pub(super) fn open_session(&mut self, slot: usize) -> bool {
        let token = match Token::random() {
            Ok(t) => t,
            Err(e) => {
                warn!("closing host client: cannot make a session token: {e}");
                self.remove(slot);
                return false;
            }
        };
        let Some(conn) = self.conn(slot) else {
            return false;
        };
        conn.session = Some(Box::new(Session::new(
            token,
            conn.uid,
            conn.tx_cnt(),
            conn.fwd_cnt(),
        )));
        self.sessions.insert(token, slot);
        true
    }

    /// Answers a `RESUME` from the host client in `slot`: refused with an
    /// `ERR` line, or its stream becomes the session's.
    pub(super) fn resume_session(&mut self, slot: usize, token: Token, received: u64) {
        let Some(target) = self.sessions.get(&token).copied().filter(|&t| t != slot) else {
            return self.refuse(slot, "unknown or expired token".to_string());
        };
        let Some(conn) = self.conn(target) else {
            return self.refuse(slot, "unknown or expired token".to_string());
        };
        if conn.is_closing() || conn.broken.as_ref().is_some_and(|b| b.end) {
            return self.refuse(slot, "the session has ended".to_string());
        }
        if !matches!(conn.state, State::Established) {
            return self.refuse(
                slot,
                "the guest has not accepted the session yet".to_string(),
            );
        }
        let (acked, _) = conn.g2h_window();
        let end = conn.g2h_end();
        if received < acked || received > end {
            return self.refuse(
                slot,
                format!("offset {received} is outside what the session can send from ({acked} to {end})"),
            );
        }
        if conn.stream.is_some() {
            conn.break_stream("a new client resumed the session".to_string(), false);
            self.detach(target);
        }
        let Some(conn) = self.conn(target) else {
            return;
        };
        let reply = conn.resume_reply();
        let Some(client) = self.conn(slot) else {
            return;
        };
        let Some(fd) = client.fd() else { return };
        match write_fd(fd, &[reply.as_bytes()]) {
            Ok(n) if n == reply.len() => {}
            result => {
                warn!("host client resuming a session: its reply could not be sent ({result:?}); closing it");
                return self.remove(slot);
            }
        }
        let stream = client.stream.take();
        let stream_uid = client.uid;
        let _ = epoll::ctl(
            self.epoll.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_DEL,
            fd,
            epoll::Event::new(epoll::Events::empty(), 0),
        );
        let Some(conn) = self.conn(target) else {
            return;
        };
        let Some(stream) = stream else { return };
        conn.attach(stream, stream_uid, received);
        let key = conn.key;
        let events = epoll::Events::EPOLLIN
            | epoll::Events::EPOLLOUT
            | epoll::Events::EPOLLRDHUP
            | epoll::Events::EPOLLET;
        if let Err(e) = epoll::ctl(
            self.epoll.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_ADD,
            fd,
            epoll::Event::new(events, target as u64),
        ) {
            if let Some(c) = self.conn(target) {
                c.break_stream(format!("cannot poll the new stream: {e}"), false);
            }
        }
        info!(
            "{key}: session resumed by a new client, which has {received} bytes; it sends from {}",
            reply.trim_end().trim_start_matches("OK ")
        );
        self.commit(target);
        self.remove(slot);
        if let Some(c) = self.conn(target) {
            c.session_write();
            c.settle_now();
        }
        self.after_session_io(target);
        self.arm_grace_timer();
    }

    /// Refuses the handshake of the host client in `slot` with an `ERR`
    /// line, and closes it.
    fn refuse(&mut self, slot: usize, why: String) {
        warn!("host client refused: {why}");
        if let Some(fd) = self.conn(slot).and_then(|c| c.fd()) {
            let _ = write_fd(fd, &[format!("ERR {why}\n").as_bytes()]);
        }
        self.remove(slot);
    }

    /// Sends the client of the session in `slot` an `ERROR` frame with the
    /// reason its stream broke, if it is one to tell and no frame is half
    /// written.
    pub(super) fn tell_client(&mut self, slot: usize) {
        let Some(conn) = self.conn(slot) else { return };
        let Some(b) = &conn.broken else { return };
        if !b.tell || conn.session.as_ref().is_some_and(|s| s.out.is_some()) {
            return;
        }
        if let Some(fd) = conn.fd() {
            let _ = write_fd(fd, &[&error_frame(&b.reason)]);
        }
    }

    /// The stream of the session in `slot` broke: it is closed and the
    /// session waits for a `RESUME` (or, when the break ends it, the guest
    /// is reset).
    pub(super) fn detach(&mut self, slot: usize) {
        self.tell_client(slot);
        let grace = self.cfg.resume_grace;
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let Some(b) = conn.broken.take() else { return };
        let stream_uid = conn.stream_uid();
        if let Some(stream) = conn.stream.take() {
            let _ = epoll::ctl(
                self.epoll.as_raw_fd(),
                epoll::ControlOptions::EPOLL_CTL_DEL,
                stream.as_raw_fd(),
                epoll::Event::new(epoll::Events::empty(), 0),
            );
        }
        conn.host_readable = false;
        conn.host_rdhup = false;
        conn.host_hup = false;
        if let Some(s) = &mut conn.session {
            s.stream_uid = 0;
            s.detached_at_ns = monotonic_now_ns();
            s.drop_link_state();
        }
        let key = conn.key;
        if let (Some(k), Some(uid)) = (&mut self.keep, stream_uid.filter(|&u| u != 0)) {
            k.store.release_streams(&[uid]);
        }
        if b.end {
            warn!("{key}: {}: the session ends", b.reason);
            self.reset_conn(slot);
        } else if b.tell {
            warn!(
                "{key}: bad input from the host client ({}): its stream is closed; the session waits {grace:?} for a RESUME",
                b.reason
            );
        } else {
            info!(
                "{key}: session detached ({}); it waits {grace:?} for a RESUME",
                b.reason
            );
        }
        let in_rx = self.keep.as_ref().is_some_and(|k| k.in_rx);
        if in_rx {
            if let (Some(k), Some(Some(conn))) = (&mut self.keep, self.conns.get_mut(slot)) {
                k.rx_touched(slot, conn);
            }
        } else {
            self.commit(slot);
        }
        self.arm_grace_timer();
    }

    /// After a session's host I/O outside an RX batch: a broken stream is
    /// detached, the change committed, RX work queued.
    pub(super) fn after_session_io(&mut self, slot: usize) {
        if self.conn(slot).is_some_and(|c| c.broken.is_some()) {
            self.detach(slot);
        }
        self.commit(slot);
        self.enqueue(slot);
    }

    /// The RX batch filled last is published: streams of connections it
    /// removed are released, and the sessions it delivered bytes of are
    /// acknowledged to their clients.
    pub fn rx_published(&mut self) {
        self.release_after_rx();
        for slot in std::mem::take(&mut self.rx_acks) {
            let Some(conn) = self.conn(slot) else {
                continue;
            };
            let Some(s) = &mut conn.session else { continue };
            if !s.ack_after_publish {
                continue;
            }
            s.ack_after_publish = false;
            s.ack_owed = true;
            conn.session_write();
            conn.settle_now();
            self.after_session_io(slot);
        }
    }

    /// Arms the timer for the first grace period to end (or disarms it).
    pub(super) fn arm_grace_timer(&mut self) {
        let grace = u64::try_from(self.cfg.resume_grace.as_nanos()).unwrap_or(u64::MAX);
        let first = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.stream.is_none() && !c.is_closing())
            .filter_map(|c| c.session.as_ref().map(|s| s.detached_at_ns))
            .min();
        let at = first.map_or(0, |t| t.saturating_add(grace).max(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at / 1_000_000_000) as libc::time_t,
                tv_nsec: (at % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: timerfd_settime(2) on our timerfd with a valid spec.
        let r = unsafe {
            libc::timerfd_settime(
                self.timer.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            warn!(
                "cannot arm the resumable sessions' timer: {}",
                io::Error::last_os_error()
            );
        }
    }

    /// The grace-period timer fired: sessions detached for longer are
    /// reset.
    pub(super) fn grace_timer_fired(&mut self) {
        let mut expirations = [0u8; 8];
        // SAFETY: read(2) of the 8-byte counter into a local buffer.
        let _ = unsafe {
            libc::read(
                self.timer.as_raw_fd(),
                expirations.as_mut_ptr().cast(),
                expirations.len(),
            )
        };
        let grace = self.cfg.resume_grace;
        let grace_ns = u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX);
        let now = monotonic_now_ns();
        for slot in 0..self.conns.len() {
            let expired = self.conns[slot].as_ref().is_some_and(|c| {
                c.stream.is_none()
                    && !c.is_closing()
                    && c.session
                        .as_ref()
                        .is_some_and(|s| s.detached_at_ns.saturating_add(grace_ns) <= now)
            });
            if expired {
                if let Some(c) = &self.conns[slot] {
                    warn!(
                        "{}: no client resumed the session within {grace:?}: resetting the guest connection",
                        c.key
                    );
                }
                self.reset_conn(slot);
                self.commit(slot);
            }
        }
        self.arm_grace_timer();
    }

    /// The worker is quiescing for an upgrade: every attached session's
    /// record gets the writer's exact position, for the successor to carry
    /// on on the same stream. A session with staged bytes (which are not
    /// in the region) is detached instead; its client resumes.
    pub fn quiesce_sessions(&mut self) {
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_mut() else {
                continue;
            };
            let Some(s) = &conn.session else { continue };
            if conn.stream.is_none() {
                continue;
            }
            if !s.staging.is_empty() || s.end_pending {
                conn.break_stream(
                    "handed over to a new worker with bytes the guest had no room for".to_string(),
                    false,
                );
                self.detach(slot);
                continue;
            }
            let rec = conn.handover_record();
            if let (Some(k), Some(rec)) = (&mut self.keep, rec) {
                k.store.commit_resume(slot, &rec);
                conn.resume_committed = Some(rec);
                debug!("{}: session handed over at g2h {}", conn.key, rec.g2h_sent);
            }
        }
    }
}
