//! Settings of a virtual VM and the counters it keeps.

use std::io;
use std::time::Duration;

use super::packet::{HDR_LEN, MAX_PKT_PAYLOAD};

/// How the driver lays a TX packet out in descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxLayout {
    /// Header and payload in one descriptor.
    Single,
    /// Header in one descriptor, payload in a second (Linux); a packet
    /// without payload is one descriptor.
    HeaderThenPayload,
    /// Header in one descriptor, payload cut into this many descriptors
    /// (1 to `MAX_TX_PIECES`) of uneven sizes.
    PayloadSplit(usize),
    /// The header cut at this byte (1 to 43): its first part in one
    /// descriptor, the rest of the header and the payload in a second.
    HeaderSplit(usize),
}

/// Most descriptors `TxLayout::PayloadSplit` uses for the payload.
pub const MAX_TX_PIECES: usize = 16;

/// Settings of a [`super::VirtualVm`].
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Guest memory size in bytes (a multiple of 4096).
    pub mem_size: u64,
    /// Guest physical address where memory starts.
    pub mem_base: u64,
    /// Size of every virtqueue (a power of two; QEMU's default is 128).
    pub queue_size: u16,
    /// Queues handed to the backend: 2 (rx, tx: QEMU) or 3 (rx, tx, event:
    /// Cloud Hypervisor).
    pub queues: usize,
    /// Ack VIRTIO_RING_F_EVENT_IDX when the backend offers it.
    pub event_idx: bool,
    /// Bytes of one RX buffer, header included (Linux: 4096).
    pub rx_buf_size: u32,
    /// Post every RX buffer as two descriptors, header then payload (Linux
    /// before 6.3), instead of one.
    pub rx_split_header: bool,
    /// Descriptor layout of TX packets.
    pub tx_layout: TxLayout,
    /// Largest payload in one TX packet (Linux: 64 KiB).
    pub tx_max_payload: usize,
    /// Receive buffer advertised per connection (Linux default: 256 KiB).
    pub buf_alloc: u32,
    /// Send a credit update after a read when the free space the peer
    /// knows of falls under this (Linux: 64 KiB).
    pub credit_update_threshold: u32,
    /// Default read and write timeout of streams (`None`: wait forever).
    pub io_timeout: Option<Duration>,
    /// How long `connect` waits for the RESPONSE.
    pub connect_timeout: Duration,
    /// How long a close waits for the peer's RST before sending one (Linux:
    /// 8 s).
    pub close_timeout: Duration,
    /// Signal every kick eventfd before handing it over, as QEMU's host
    /// notifiers are created signalled.
    pub kick_on_start: bool,
    /// Connections a listener queues before answering REQUESTs with RST.
    pub listen_backlog: usize,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            mem_size: 64 << 20,
            mem_base: 0,
            queue_size: 128,
            queues: 2,
            event_idx: true,
            rx_buf_size: 4096,
            rx_split_header: false,
            tx_layout: TxLayout::HeaderThenPayload,
            tx_max_payload: MAX_PKT_PAYLOAD,
            buf_alloc: 256 * 1024,
            credit_update_threshold: MAX_PKT_PAYLOAD as u32,
            io_timeout: Some(Duration::from_secs(30)),
            connect_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(8),
            kick_on_start: true,
            listen_backlog: 4096,
        }
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl VmOptions {
    pub fn validate(&self) -> io::Result<()> {
        if !self.queue_size.is_power_of_two() || self.queue_size < 2 {
            return Err(bad(format!(
                "queue size {} is not a power of two >= 2",
                self.queue_size
            )));
        }
        if self.queues != 2 && self.queues != 3 {
            return Err(bad(format!("{} queues: 2 or 3", self.queues)));
        }
        let min_rx = HDR_LEN as u32 + u32::from(self.rx_split_header);
        if self.rx_buf_size < min_rx {
            return Err(bad(format!("RX buffers of {} bytes", self.rx_buf_size)));
        }
        if self.tx_max_payload == 0 || self.tx_max_payload > 16 << 20 {
            return Err(bad(format!("TX payload limit {}", self.tx_max_payload)));
        }
        match self.tx_layout {
            TxLayout::PayloadSplit(n) if n == 0 || n > MAX_TX_PIECES => {
                return Err(bad(format!("payload split in {n} (1 to {MAX_TX_PIECES})")))
            }
            TxLayout::HeaderSplit(at) if at == 0 || at >= HDR_LEN => {
                return Err(bad(format!("header split at {at} (1 to 43)")))
            }
            _ => {}
        }
        if self.buf_alloc == 0 {
            return Err(bad("buf_alloc 0".into()));
        }
        Ok(())
    }
}

/// Counters of one virtual VM (since it started).
#[derive(Debug, Clone, Default)]
pub struct VmStats {
    /// Packets the driver put on the TX ring (injected chains excluded).
    pub tx_packets: u64,
    /// Payload bytes in them.
    pub tx_bytes: u64,
    /// Packets received on the RX ring.
    pub rx_packets: u64,
    /// Payload bytes in them.
    pub rx_bytes: u64,
    /// Per queue (rx, tx, event): writes to the kick eventfd.
    pub kicks: [u64; 3],
    /// Per queue: used-buffer notifications, i.e. the sum of the call
    /// eventfd's counter over every read.
    pub calls: [u64; 3],
    /// Per queue: times the driver woke on a call eventfd.
    pub interrupts: [u64; 3],
    /// Per queue: used elements processed.
    pub used: [u64; 3],
    /// RST packets sent and received.
    pub rst_sent: u64,
    pub rst_received: u64,
    /// CREDIT_UPDATE packets sent.
    pub credit_updates_sent: u64,
    /// RW packets that overran the credit the driver gave (dropped, as
    /// Linux drops them).
    pub credit_violations: u64,
    /// Events received on the event queue.
    pub events: u64,
}
