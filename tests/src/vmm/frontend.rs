//! The VMM half: a vhost-user frontend for a vsock device, over the vhost
//! crate's `Frontend`, sending the requests in the order QEMU 7.2's
//! vhost-user-vsock does.
//!
//! * Handshake (device realize): GET_FEATURES, GET_PROTOCOL_FEATURES,
//!   SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER, GET_FEATURES again
//!   (vhost_dev_init reads them after taking ownership), GET_CONFIG.
//! * Start (driver sets DRIVER_OK): SET_FEATURES, SET_MEM_TABLE, then per
//!   ring SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK,
//!   SET_VRING_CALL; then SET_VRING_ENABLE 1 for every ring.
//! * Stop (VM stop, device reset): SET_VRING_ENABLE 0 for every ring, then
//!   GET_VRING_BASE per ring.
//!
//! With REPLY_ACK negotiated every request without a reply of its own
//! asks for one, so a refused request fails here.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestRam;
use super::ring::RingAddrs;

/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_EVENT_IDX.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// How long the backend has to answer one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One ring as the frontend hands it over.
#[derive(Debug, Clone, Copy)]
pub struct QueueSetup {
    pub size: u16,
    pub addrs: RingAddrs,
    pub base: u16,
}

/// A vhost-user connection to a vsock backend.
pub struct VhostFrontend {
    fe: Frontend,
    num_queues: usize,
    /// Features the backend offered.
    pub offered_features: u64,
    /// Features acked with SET_FEATURES.
    pub acked_features: u64,
    /// Protocol features the backend offered (0 without
    /// VHOST_USER_F_PROTOCOL_FEATURES).
    pub offered_protocol: u64,
    /// Protocol features acked.
    pub acked_protocol: u64,
    /// GET_QUEUE_NUM's answer, when MQ was negotiated.
    pub backend_queues: Option<u64>,
    /// The guest CID from GET_CONFIG.
    pub guest_cid: u64,
    /// Every request sent, by name, in order.
    pub requests: Vec<String>,
}

fn err(what: &str, e: vhost::Error) -> io::Error {
    io::Error::other(format!("vhost-user {what}: {e}"))
}

impl VhostFrontend {
    /// Connects to the backend's socket and runs the handshake.
    /// `num_queues` is 2 (QEMU: rx, tx) or 3 (Cloud Hypervisor: rx, tx,
    /// event); `event_idx` whether to ack VIRTIO_RING_F_EVENT_IDX if
    /// offered. Waits up to `patience` for a socket that is missing or
    /// refuses connections (a backend re-creating it after the previous
    /// VMM left). Every request then has `REQUEST_TIMEOUT` to be answered.
    pub fn connect(
        path: &Path,
        num_queues: usize,
        event_idx: bool,
        patience: Duration,
    ) -> io::Result<VhostFrontend> {
        let deadline = Instant::now() + patience;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("vhost-user connect to {}: {e}", path.display()),
                    ))
                }
            }
        };
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let fe = Frontend::from_stream(stream, num_queues as u64);
        let mut f = VhostFrontend {
            fe,
            num_queues,
            offered_features: 0,
            acked_features: 0,
            offered_protocol: 0,
            acked_protocol: 0,
            backend_queues: None,
            guest_cid: 0,
            requests: Vec::new(),
        };
        f.handshake(event_idx)?;
        Ok(f)
    }

    fn log(&mut self, what: impl Into<String>) {
        self.requests.push(what.into());
    }

    /// Asks for a REPLY_ACK on the next requests, when negotiated.
    fn want_ack(&self, on: bool) {
        if self.acked_protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0 {
            self.fe.set_hdr_flags(if on {
                VhostUserHeaderFlag::NEED_REPLY
            } else {
                VhostUserHeaderFlag::empty()
            });
        }
    }

    fn handshake(&mut self, event_idx: bool) -> io::Result<()> {
        self.log("GET_FEATURES");
        self.offered_features = self.fe.get_features().map_err(|e| err("GET_FEATURES", e))?;
        if self.offered_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(io::Error::other(format!(
                "the backend does not offer VIRTIO_F_VERSION_1 (features {:#x})",
                self.offered_features
            )));
        }
        let mut acked = VIRTIO_F_VERSION_1;
        if event_idx {
            acked |= self.offered_features & VIRTIO_RING_F_EVENT_IDX;
        }
        acked |= self.offered_features & VHOST_USER_F_PROTOCOL_FEATURES;
        self.acked_features = acked;

        if self.offered_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.log("GET_PROTOCOL_FEATURES");
            let offered = self
                .fe
                .get_protocol_features()
                .map_err(|e| err("GET_PROTOCOL_FEATURES", e))?;
            self.offered_protocol = offered.bits();
            let want = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK;
            let ack = offered & want;
            self.log("SET_PROTOCOL_FEATURES");
            self.fe
                .set_protocol_features(ack)
                .map_err(|e| err("SET_PROTOCOL_FEATURES", e))?;
            self.acked_protocol = ack.bits();
            if ack.contains(VhostUserProtocolFeatures::MQ) {
                self.log("GET_QUEUE_NUM");
                let n = self
                    .fe
                    .get_queue_num()
                    .map_err(|e| err("GET_QUEUE_NUM", e))?;
                self.backend_queues = Some(n);
                if n < self.num_queues as u64 {
                    return Err(io::Error::other(format!(
                        "the backend has {n} queues, {} wanted",
                        self.num_queues
                    )));
                }
            }
        }
        self.want_ack(true);
        self.log("SET_OWNER");
        let r = self.fe.set_owner();
        self.want_ack(false);
        r.map_err(|e| err("SET_OWNER", e))?;
        self.log("GET_FEATURES");
        let again = self.fe.get_features().map_err(|e| err("GET_FEATURES", e))?;
        if again != self.offered_features {
            return Err(io::Error::other(format!(
                "GET_FEATURES changed from {:#x} to {again:#x}",
                self.offered_features
            )));
        }
        if self.acked_protocol & VhostUserProtocolFeatures::CONFIG.bits() != 0 {
            self.log("GET_CONFIG");
            let (_, payload) = self
                .fe
                .get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8])
                .map_err(|e| err("GET_CONFIG", e))?;
            let b: [u8; 8] = payload
                .get(..8)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| io::Error::other("GET_CONFIG: short payload"))?;
            self.guest_cid = u64::from_le_bytes(b);
        }
        Ok(())
    }

    /// Whether EVENT_IDX was negotiated.
    pub fn event_idx(&self) -> bool {
        self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0
    }

    fn protocol_features_on(&self) -> bool {
        self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0
    }

    /// Starts the device: features, memory table, then every ring.
    pub fn start(
        &mut self,
        ram: &GuestRam,
        queues: &[QueueSetup],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> io::Result<()> {
        assert_eq!(queues.len(), self.num_queues);
        self.want_ack(true);
        let r = self.start_inner(ram, queues, kicks, calls);
        self.want_ack(false);
        r
    }

    fn start_inner(
        &mut self,
        ram: &GuestRam,
        queues: &[QueueSetup],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> io::Result<()> {
        self.log("SET_FEATURES");
        self.fe
            .set_features(self.acked_features)
            .map_err(|e| err("SET_FEATURES", e))?;
        self.log("SET_MEM_TABLE");
        self.fe
            .set_mem_table(&[ram.region_info()])
            .map_err(|e| err("SET_MEM_TABLE", e))?;
        for (q, setup) in queues.iter().enumerate() {
            self.log(format!("SET_VRING_NUM {q} {}", setup.size));
            self.fe
                .set_vring_num(q, setup.size)
                .map_err(|e| err("SET_VRING_NUM", e))?;
            self.log(format!("SET_VRING_BASE {q} {}", setup.base));
            self.fe
                .set_vring_base(q, setup.base)
                .map_err(|e| err("SET_VRING_BASE", e))?;
            let cfg = VringConfigData {
                queue_max_size: setup.size,
                queue_size: setup.size,
                flags: 0,
                desc_table_addr: ram.host_addr(setup.addrs.desc),
                used_ring_addr: ram.host_addr(setup.addrs.used),
                avail_ring_addr: ram.host_addr(setup.addrs.avail),
                log_addr: None,
            };
            self.log(format!("SET_VRING_ADDR {q}"));
            self.fe
                .set_vring_addr(q, &cfg)
                .map_err(|e| err("SET_VRING_ADDR", e))?;
            self.log(format!("SET_VRING_KICK {q}"));
            self.fe
                .set_vring_kick(q, &kicks[q])
                .map_err(|e| err("SET_VRING_KICK", e))?;
            self.log(format!("SET_VRING_CALL {q}"));
            self.fe
                .set_vring_call(q, &calls[q])
                .map_err(|e| err("SET_VRING_CALL", e))?;
        }
        if self.protocol_features_on() {
            for q in 0..queues.len() {
                self.log(format!("SET_VRING_ENABLE {q} 1"));
                self.fe
                    .set_vring_enable(q, true)
                    .map_err(|e| err("SET_VRING_ENABLE", e))?;
            }
        }
        Ok(())
    }

    /// Sends SET_MEM_TABLE again (QEMU does on memory topology changes,
    /// with the rings running).
    pub fn update_mem_table(&mut self, ram: &GuestRam) -> io::Result<()> {
        self.log("SET_MEM_TABLE");
        self.want_ack(true);
        let r = self.fe.set_mem_table(&[ram.region_info()]);
        self.want_ack(false);
        r.map(|_| ()).map_err(|e| err("SET_MEM_TABLE", e))
    }

    /// Stops every ring; returns the next available index of each.
    pub fn stop(&mut self) -> io::Result<Vec<u16>> {
        if self.protocol_features_on() {
            for q in 0..self.num_queues {
                self.log(format!("SET_VRING_ENABLE {q} 0"));
                self.want_ack(true);
                let r = self.fe.set_vring_enable(q, false);
                self.want_ack(false);
                r.map_err(|e| err("SET_VRING_ENABLE", e))?;
            }
        }
        let mut bases = Vec::with_capacity(self.num_queues);
        for q in 0..self.num_queues {
            let b = self
                .fe
                .get_vring_base(q)
                .map_err(|e| err("GET_VRING_BASE", e))?;
            self.log(format!("GET_VRING_BASE {q} -> {b}"));
            bases.push(u16::try_from(b).map_err(|_| {
                io::Error::other(format!("GET_VRING_BASE {q} returned {b}, not a u16"))
            })?);
        }
        Ok(bases)
    }

    /// Whether the backend closed its end of the vhost-user socket (it
    /// exited or dropped the session): a frontend learns it without
    /// sending a request.
    pub fn hung_up(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fe.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; timeout 0.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }
}
