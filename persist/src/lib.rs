//! Crash-consistent state in shared memory, and the fd store: what must
//! outlive a vsockd worker process, kept so that its successor can adopt it.
//!
//! * [`Region`]: the state region, a memfd with a versioned header and fixed
//!   parts (session, inflight logs, connection slots, buffers).
//! * [`Record`]: an A/B record that a crash never leaves half-written as far
//!   as a reader can tell.
//! * [`InflightLog`]: the vhost-user inflight log of one queue.
//! * [`RegionView`]: the region mapped read-only, for reporting on it.
//! * [`Channel`], [`FdStore`], [`FdSet`]: the keeper-worker link and the
//!   descriptors the keeper holds for the worker.
//!
//! Updates are ordinary stores to mapped memory: no syscall and no fsync. A
//! process crash loses no store it executed; ordering between stores is
//! kept with release fences. (This protects against a worker's death, not
//! against the machine's: the region lives in memory.)

pub mod channel;
pub mod fdstore;
mod inflight;
pub mod migrate;
mod record;
mod region;
pub mod resume;
pub mod session;
mod shm;
pub mod slot;
mod view;

pub use channel::{Channel, Frame, Kind};
pub use fdstore::{FdKeeper, FdSet, FdStore};
pub use inflight::{inflight_bytes, InflightLog, InflightSummary, Recovered};
pub use record::{record_bytes, Committed, Record};
pub use region::{Geometry, Region, RingsState, Stamp, LAYOUT_VERSION};
pub use shm::{page_size, SharedMemory};
pub use view::RegionView;

/// Errors of the persistence layer.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The state memfd could not be created.
    #[error("cannot create the state region: {0}")]
    Create(#[source] std::io::Error),
    /// The state memfd could not be sized or mapped.
    #[error("cannot map the state region: {0}")]
    Map(#[source] std::io::Error),
    /// No worker has formatted the region yet.
    #[error("the state region is not formatted yet (no worker has started)")]
    NotFormatted,
    /// The file is not a vsockd state region.
    #[error("the state region has no vsockd header (wrong file?)")]
    NotARegion,
    /// Written by a newer vsockd.
    #[error("the state region has layout version {found}; this vsockd knows up to {known}: run the newer binary or start a new session")]
    LayoutTooNew { found: u32, known: u32 },
    /// Written by an older layout this build migrates from, which must be
    /// migrated before it is mapped (see `migrate`).
    #[error("the state region has layout version {found}, older than this vsockd's {LAYOUT_VERSION}: it must be migrated first")]
    LayoutOlder { found: u32 },
    /// Written by an older layout this build cannot read.
    #[error("the state region has layout version {found}, which this vsockd cannot read")]
    LayoutUnsupported { found: u32 },
    /// The sizes do not match.
    #[error("state region geometry: {0}")]
    Geometry(String),
    /// A queue size the log was not laid out for.
    #[error("queue size {size} exceeds the {max} the state region was laid out for")]
    QueueSize { size: u16, max: u16 },
    /// The inflight log contradicts guest memory.
    #[error("inflight log: {0}")]
    Inflight(String),
    /// Reading the region's file failed.
    #[error("cannot read the state region: {0}")]
    Io(#[source] std::io::Error),
    /// Migrating an older layout failed.
    #[error("cannot migrate the state region: {0}")]
    Migration(String),
}
