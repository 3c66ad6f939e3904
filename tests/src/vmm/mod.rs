//! A virtual VMM: plays both the VMM and the guest's virtio-vsock driver,
//! over real vhost-user and real shared memory, so tests and benchmarks
//! drive any vhost-user vsock backend without booting a VM.
//!
//! * [`frontend`]: the VMM half, a vhost-user frontend sending QEMU 7.2's
//!   sequence of requests (handshake, start, stop, restart).
//! * [`driver`] and [`ring`]: the guest half, a Linux-like virtio-vsock
//!   driver over split rings in a memfd shared with the backend.
//! * [`VirtualVm`], [`VStream`], [`VListener`]: the socket-like API tests
//!   use, plus VM lifecycle (stop, resume, driver reset, disconnect,
//!   reconnect) and raw descriptor injection for malformed-input tests.
//!
//! ```no_run
//! use vsockd_tests::vmm::{VirtualVm, VmOptions};
//! # fn main() -> std::io::Result<()> {
//! let vm = VirtualVm::start("/tmp/vhost.sock", VmOptions::default())?;
//! let s = vm.connect(1234)?; // to <uds>_1234 on the host
//! s.write_all(b"hello")?;
//! s.close()?;
//! # Ok(())
//! # }
//! ```

pub mod driver;
pub mod frontend;
pub mod memory;
pub mod options;
pub mod packet;
pub mod ring;

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use driver::{err, Inner};
pub use driver::{ConnInfo, ConnState, Injection, RawAddr, RawDesc, EVENT, RX, TX};
pub use frontend::VhostFrontend;
pub use options::{TxLayout, VmOptions, VmStats};
pub use packet::Header;
pub use ring::{Link, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

/// How long `inject_tx_raw` waits for the chain to come back.
pub const INJECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a new frontend waits for the backend's socket to accept.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(5);

/// What the frontend and the backend agreed on.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub offered_features: u64,
    pub acked_features: u64,
    pub offered_protocol: u64,
    pub acked_protocol: u64,
    pub backend_queues: Option<u64>,
    pub guest_cid: u64,
    pub event_idx: bool,
}

/// A virtual VM with a virtio-vsock device served by a vhost-user
/// backend. Dropping it ends the driver thread and closes the vhost-user
/// connection (the VMM exits).
pub struct VirtualVm {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl VirtualVm {
    /// Connects to the backend at `socket`, runs the handshake, starts the
    /// device and the driver.
    pub fn start(socket: impl AsRef<Path>, opts: VmOptions) -> io::Result<VirtualVm> {
        let socket = socket.as_ref().to_path_buf();
        let inner = Arc::new(Inner::new(socket.clone(), opts)?);
        let mut fe = VhostFrontend::connect(
            &socket,
            inner.opts.queues,
            inner.opts.event_idx,
            CONNECT_PATIENCE,
        )?;
        inner.start_device(&mut fe, true)?;
        *inner.fe.lock().unwrap_or_else(|e| e.into_inner()) = Some(fe);
        let i2 = inner.clone();
        let thread = std::thread::Builder::new()
            .name("vmm-driver".into())
            .spawn(move || driver::run(i2))?;
        Ok(VirtualVm {
            inner,
            thread: Some(thread),
        })
    }

    pub fn options(&self) -> &VmOptions {
        &self.inner.opts
    }

    /// The guest CID read with GET_CONFIG.
    pub fn guest_cid(&self) -> u64 {
        self.inner.lock().guest_cid
    }

    /// First guest physical address after guest memory.
    pub fn memory_end(&self) -> u64 {
        self.inner.ram.end()
    }

    /// Connects to host port `port` (CID 2).
    pub fn connect(&self, port: u32) -> io::Result<VStream> {
        self.connect_timeout(port, self.inner.opts.connect_timeout)
    }

    pub fn connect_timeout(&self, port: u32, timeout: Duration) -> io::Result<VStream> {
        let id = self.inner.connect(port, timeout)?;
        VStream::open(&self.inner, id)
    }

    /// Listens on guest port `port`.
    pub fn listen(&self, port: u32) -> io::Result<VListener> {
        self.inner.listen(port)?;
        Ok(VListener {
            inner: self.inner.clone(),
            port,
        })
    }

    fn with_frontend<T>(
        &self,
        f: impl FnOnce(&Inner, &mut VhostFrontend) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut fe = self.inner.fe.lock().unwrap_or_else(|e| e.into_inner());
        let fe = fe
            .as_mut()
            .ok_or_else(|| err(io::ErrorKind::NotConnected, "no vhost-user connection"))?;
        f(&self.inner, fe)
    }

    /// VM stop: SET_VRING_ENABLE 0 and GET_VRING_BASE on every ring; the
    /// guest does nothing until `resume`.
    pub fn stop(&self) -> io::Result<()> {
        self.with_frontend(|i, fe| i.stop_device(fe))
    }

    /// VM continue: the start sequence again with the same rings and the
    /// bases returned at stop.
    pub fn resume(&self) -> io::Result<()> {
        self.with_frontend(|i, fe| i.start_device(fe, false))
    }

    /// Sends the memory table again while the device runs, as QEMU does
    /// when the guest's memory layout changes.
    pub fn update_mem_table(&self) -> io::Result<()> {
        self.with_frontend(|i, fe| fe.update_mem_table(&i.ram))
    }

    /// The guest driver resets the device: stop, every connection reset,
    /// then a start with new ring addresses and base 0.
    pub fn reset_driver(&self) -> io::Result<()> {
        self.with_frontend(|i, fe| {
            if i.lock().running {
                i.stop_device(fe)?;
            }
            i.reset_guest_state("driver reset");
            i.start_device(fe, true)
        })
    }

    /// The VMM goes away: the vhost-user socket is closed and the guest's
    /// connections are reset.
    pub fn disconnect(&self) {
        let mut fe = self.inner.fe.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.reset_guest_state("the VMM disconnected");
        {
            let mut st = self.inner.lock();
            st.attached = false;
        }
        *fe = None;
    }

    /// A new VMM connects to the same socket: a new frontend, the whole
    /// handshake, and a fresh driver. Disconnects first if needed.
    pub fn reconnect(&self) -> io::Result<()> {
        let mut slot = self.inner.fe.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            self.inner.reset_guest_state("the VMM disconnected");
            *slot = None;
        }
        let mut fe = VhostFrontend::connect(
            &self.inner.socket,
            self.inner.opts.queues,
            self.inner.opts.event_idx,
            CONNECT_PATIENCE,
        )?;
        self.inner.start_device(&mut fe, true)?;
        *slot = Some(fe);
        Ok(())
    }

    /// Whether the backend is gone: it closed the vhost-user connection
    /// (its process died), or there is none. Like QEMU, the VMM does not
    /// reset the guest for it: the device just stops serving.
    pub fn backend_gone(&self) -> bool {
        let fe = self.inner.fe.lock().unwrap_or_else(|e| e.into_inner());
        fe.as_ref().map_or(true, VhostFrontend::hung_up)
    }

    /// Every ring's used index as the device last published it in guest
    /// memory (not as far as the driver has read it).
    pub fn device_used_indices(&self) -> Vec<u16> {
        let st = self.inner.lock();
        st.rings
            .iter()
            .map(|r| r.device_used_idx(&self.inner.ram))
            .collect()
    }

    /// Whether the rings are started.
    pub fn is_running(&self) -> bool {
        self.inner.lock().running
    }

    /// Stops (true) or restarts (false) posting RX buffers.
    pub fn hold_rx_buffers(&self, hold: bool) {
        self.inner.set_hold_rx(hold);
    }

    /// RX buffers currently posted to the device.
    pub fn rx_posted(&self) -> usize {
        self.inner.lock().rx_posted()
    }

    /// TX chains not yet returned by the device.
    pub fn tx_in_flight(&self) -> usize {
        self.inner.lock().tx_in_flight()
    }

    /// Packets waiting for room on the TX ring.
    pub fn tx_queued(&self) -> usize {
        self.inner.lock().tx_queued()
    }

    /// Waits until the device holds no RX buffer.
    pub fn wait_rx_exhausted(&self, timeout: Duration) -> bool {
        self.inner.wait_until(timeout, |st| st.rx_posted() == 0)
    }

    /// Waits until every TX chain came back and nothing is queued.
    pub fn wait_tx_idle(&self, timeout: Duration) -> bool {
        self.inner
            .wait_until(timeout, |st| st.tx_in_flight() == 0 && st.tx_queued() == 0)
    }

    /// Puts a chain of arbitrary descriptors on queue `queue` and waits up
    /// to `timeout` for the device to return it.
    pub fn inject_raw(
        &self,
        queue: usize,
        descs: &[RawDesc],
        timeout: Duration,
    ) -> io::Result<Injection> {
        self.inner.inject(queue, descs, timeout)
    }

    /// `inject_raw` on the TX queue with the default timeout.
    pub fn inject_tx_raw(&self, descs: &[RawDesc]) -> io::Result<Injection> {
        self.inject_raw(TX, descs, INJECT_TIMEOUT)
    }

    /// Puts a bare (possibly out-of-range) head index on a queue's
    /// available ring.
    pub fn inject_head(&self, queue: usize, head: u16) -> io::Result<()> {
        self.inner.inject_head(queue, head)
    }

    pub fn stats(&self) -> VmStats {
        self.inner.lock().stats.clone()
    }

    /// Protocol violations the driver saw from the device.
    pub fn anomalies(&self) -> Vec<String> {
        self.inner.lock().anomalies.clone()
    }

    /// Every vhost-user request sent so far on the current connection.
    pub fn vhost_requests(&self) -> Vec<String> {
        let fe = self.inner.fe.lock().unwrap_or_else(|e| e.into_inner());
        fe.as_ref().map(|f| f.requests.clone()).unwrap_or_default()
    }

    pub fn negotiated(&self) -> Option<Negotiated> {
        let fe = self.inner.fe.lock().unwrap_or_else(|e| e.into_inner());
        fe.as_ref().map(|f| Negotiated {
            offered_features: f.offered_features,
            acked_features: f.acked_features,
            offered_protocol: f.offered_protocol,
            acked_protocol: f.acked_protocol,
            backend_queues: f.backend_queues,
            guest_cid: f.guest_cid,
            event_idx: f.event_idx(),
        })
    }

    /// The driver's rings, queues and connections, for failure messages.
    pub fn describe(&self) -> String {
        self.inner.lock().describe(&self.inner.ram)
    }

    /// Connections the driver holds (open, queued for accept, closing).
    pub fn conn_count(&self) -> usize {
        self.inner.conn_count()
    }
}

impl Drop for VirtualVm {
    fn drop(&mut self) {
        self.inner.shut_down();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        *self.inner.fe.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// A guest stream socket. Methods take `&self`, so one thread may read
/// while another writes. Dropping it closes it without waiting.
///
/// Errors, as Linux reports them: a connect answered with RST fails with
/// `ConnectionReset` (nothing listens on the host port), one not answered
/// in time with `TimedOut`. After the peer's RST or a SHUTDOWN of both
/// directions, reads return what was buffered then 0 and writes fail with
/// `BrokenPipe` ([`VStream::peer_reset`] tells an RST). A driver reset, a
/// transport-reset event or the VMM going away fail reads and writes with
/// `ConnectionReset`; a read or write that outlasts its timeout fails with
/// `TimedOut`.
pub struct VStream {
    inner: Arc<Inner>,
    id: u64,
    local_port: u32,
    peer_port: u32,
    read_timeout: Mutex<Option<Duration>>,
    write_timeout: Mutex<Option<Duration>>,
    closed: bool,
}

impl VStream {
    /// The stream of connection `id`, with the VM's default timeouts.
    fn open(inner: &Arc<Inner>, id: u64) -> io::Result<VStream> {
        let info = inner.info(id)?;
        Ok(VStream {
            inner: inner.clone(),
            id,
            local_port: info.local_port,
            peer_port: info.peer_port,
            read_timeout: Mutex::new(inner.opts.io_timeout),
            write_timeout: Mutex::new(inner.opts.io_timeout),
            closed: false,
        })
    }

    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) {
        *self.read_timeout.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) {
        *self.write_timeout.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    fn rt(&self) -> Option<Duration> {
        *self.read_timeout.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wt(&self) -> Option<Duration> {
        *self.write_timeout.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `buf` as a blocking Linux socket does: waits for credit
    /// until all of it is sent, and returns the count sent before an
    /// error, if any (the error itself when nothing was sent).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(self.id, buf, self.wt())
    }

    /// Sends all of `buf` or fails.
    pub fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        let mut off = 0;
        while off < buf.len() {
            off += self.write(&buf[off..])?;
        }
        Ok(())
    }

    /// Receives up to `buf.len()` bytes, waiting for at least one; 0 at end
    /// of stream.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(self.id, buf, self.rt())
    }

    /// Bytes that can be read without blocking.
    pub fn readable(&self) -> io::Result<u32> {
        self.inner.readable(self.id)
    }

    /// `shutdown(SHUT_WR)`: SHUTDOWN with the SEND flag.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.inner.shutdown(self.id, packet::SHUTDOWN_SEND)
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let flags = match how {
            Shutdown::Read => packet::SHUTDOWN_RCV,
            Shutdown::Write => packet::SHUTDOWN_SEND,
            Shutdown::Both => packet::SHUTDOWN_BOTH,
        };
        self.inner.shutdown(self.id, flags)
    }

    /// Closes like Linux (SHUTDOWN, then the peer's RST) and waits for the
    /// end: TimedOut if no RST came within the close timeout.
    pub fn close(mut self) -> io::Result<()> {
        self.closed = true;
        self.inner.close(self.id)
    }

    /// A snapshot of the connection's state and credit.
    pub fn info(&self) -> io::Result<ConnInfo> {
        self.inner.info(self.id)
    }

    /// Whether the peer reset the connection.
    pub fn peer_reset(&self) -> bool {
        self.info().map(|i| i.peer_reset).unwrap_or(false)
    }

    /// The error the connection ended with, if any.
    pub fn error(&self) -> Option<(io::ErrorKind, String)> {
        self.inner.conn_error(self.id)
    }
}

impl Read for &VStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        VStream::read(self, buf)
    }
}

impl Write for &VStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        VStream::write(self, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for VStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        VStream::read(self, buf)
    }
}

impl Write for VStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        VStream::write(self, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for VStream {
    fn drop(&mut self) {
        if !self.closed {
            self.inner.close_async(self.id);
        }
    }
}

/// A guest listening socket. Dropping it stops listening; connections not
/// yet accepted are closed.
pub struct VListener {
    inner: Arc<Inner>,
    port: u32,
}

impl VListener {
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Waits up to `timeout` for a connection.
    pub fn accept(&self, timeout: Duration) -> io::Result<VStream> {
        let id = self.inner.accept(self.port, Some(timeout))?;
        VStream::open(&self.inner, id)
    }
}

impl Drop for VListener {
    fn drop(&mut self) {
        self.inner.unlisten(self.port);
    }
}
