//! Test support for vsockd: verified streams, a QEMU guest harness, the
//! backend launcher and host-side hybrid vsock helpers.

pub mod backend;
pub mod bench;
pub mod chaos;
pub mod cpio;
pub mod errno;
pub mod error;
pub mod hybrid;
pub mod image;
pub mod pattern;
pub mod pidfd;
pub mod qemu;
pub mod recovery;
pub mod sock;
pub mod stream;
pub mod trace;
pub mod vmm;

pub use backend::{Backend, BackendKind};
pub use error::{Error, Result};
pub use hybrid::{hybrid_connect, read_verified, write_verified, HostListener};
pub use image::GuestImage;
pub use qemu::{CmdOutput, GuestJob, Vm, VmConfig};
