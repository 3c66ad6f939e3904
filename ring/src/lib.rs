//! Split virtqueues over guest memory, for a device that runs in a vhost-user
//! backend process. Knows nothing of vsock.
//!
//! * [`SplitRing`] owns one queue's indices: it pops descriptor chains from the
//!   available ring, stages used elements and publishes them in batches
//!   (one store to `used->idx` per batch), and decides whether the driver
//!   wants a notification (EVENT_IDX or `VRING_AVAIL_F_NO_INTERRUPT`).
//! * [`Chain`] is one popped descriptor chain, flattened into host iovecs that
//!   point straight into guest memory, so payload moves with `readv`/`writev`
//!   and never through an intermediate buffer.
//!
//! Every address and index here comes from the guest and is untrusted. Nothing
//! panics on guest input: a chain that cannot be walked is reported as a
//! [`ChainError`] carrying its head so the caller can return it to the driver.

mod chain;
mod error;
mod split;

pub use chain::{Chain, ChainError, ChainErrorKind};
pub use error::RingError;
pub use split::{RingAddresses, SplitRing};

/// The guest memory type the rings work on.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

#[cfg(test)]
mod tests;
