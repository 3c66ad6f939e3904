//! The keeper's image: what a keeper hands the binary it re-executes
//! itself into (`vsockd upgrade --keeper`), so that the new keeper carries
//! on where the old one stopped, in the same process.
//!
//! It is written into a memfd that survives the execve, and names the
//! descriptors the new keeper inherits (their close-on-exec flag cleared
//! just before the execve): the listeners, the frontend connection, the
//! worker's link, the binary workers start from, every descriptor of the
//! store, and the control clients waiting for the upgrade's answer. The
//! worker is a child of the process, which stays the same, so the new
//! keeper reaps it by its pid.
//!
//! The keeper re-executes only at rest: a ready worker, no control message
//! in flight, no worker upgrade under way, no retired worker unreaped. So
//! the image holds no message and no half-done step, only counters, the
//! restart log and the descriptors. The worker serves on meanwhile; the
//! frames it sends wait on its link, the frontend's messages and the host
//! clients in their sockets' queues.
//!
//! Format: the magic `VSKEEPER`, a format version, then fields in a fixed
//! order: u64 little-endian integers, and byte strings as a u64 length and
//! the bytes. A descriptor is its number. A reader refuses another magic or
//! version, a short image, and trailing bytes.

use std::ffi::OsString;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::status::Restart;

/// Start of every image.
const MAGIC: &[u8; 8] = b"VSKEEPER";
/// Version of the format.
const FORMAT_VERSION: u64 = 1;
/// Largest image read, so that a wrong descriptor cannot exhaust memory.
const MAX_IMAGE_BYTES: u64 = 64 << 20;

/// The worker the keeper had, ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct WorkerImage {
    pub pid: u32,
    pub number: u64,
    pub generation: Option<u64>,
    pub link: RawFd,
    pub uptime: Duration,
}

/// Everything a re-executed keeper carries on with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Image {
    pub worker_args: Vec<OsString>,
    pub binary_path: PathBuf,
    pub listener: RawFd,
    pub host_listener: RawFd,
    pub control: Option<RawFd>,
    pub frontend: Option<RawFd>,
    pub worker_exe: RawFd,
    pub worker: WorkerImage,
    pub store: Vec<(u64, RawFd)>,
    /// Control clients waiting for the upgrade's answer.
    pub waiting: Vec<RawFd>,
    pub next_client_uid: u64,
    pub unsent_clients: Vec<u64>,
    pub session_end_owed: bool,
    pub next_seq: u64,
    pub started: u64,
    pub standbys_started: u64,
    pub quick_deaths: u32,
    pub uptime: Duration,
    pub restarts_total: u64,
    pub restarts: Vec<Restart>,
    /// What the answer to the waiting clients says so far.
    pub answer: String,
}

impl Image {
    /// Every descriptor the image names.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![
            self.listener,
            self.host_listener,
            self.worker_exe,
            self.worker.link,
        ];
        fds.extend(self.control);
        fds.extend(self.frontend);
        fds.extend(self.store.iter().map(|&(_, fd)| fd));
        fds.extend(&self.waiting);
        fds
    }

    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder(MAGIC.to_vec());
        e.u64(FORMAT_VERSION);
        e.u64(self.worker_args.len() as u64);
        for a in &self.worker_args {
            e.bytes(a.as_bytes());
        }
        e.bytes(self.binary_path.as_os_str().as_bytes());
        e.fd(self.listener);
        e.fd(self.host_listener);
        e.opt_fd(self.control);
        e.opt_fd(self.frontend);
        e.fd(self.worker_exe);
        e.u64(u64::from(self.worker.pid));
        e.u64(self.worker.number);
        e.opt(self.worker.generation);
        e.fd(self.worker.link);
        e.duration(self.worker.uptime);
        e.u64(self.store.len() as u64);
        for &(id, fd) in &self.store {
            e.u64(id);
            e.fd(fd);
        }
        e.u64(self.waiting.len() as u64);
        for &fd in &self.waiting {
            e.fd(fd);
        }
        e.u64(self.next_client_uid);
        e.u64(self.unsent_clients.len() as u64);
        for &uid in &self.unsent_clients {
            e.u64(uid);
        }
        e.u64(u64::from(self.session_end_owed));
        e.u64(self.next_seq);
        e.u64(self.started);
        e.u64(self.standbys_started);
        e.u64(u64::from(self.quick_deaths));
        e.duration(self.uptime);
        e.u64(self.restarts_total);
        e.u64(self.restarts.len() as u64);
        for r in &self.restarts {
            e.duration(
                r.at.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default(),
            );
            e.u64(r.worker);
            e.u64(u64::from(r.pid));
            e.opt(r.generation);
            e.bytes(r.cause.as_bytes());
        }
        e.bytes(self.answer.as_bytes());
        e.0
    }

    fn decode(bytes: &[u8]) -> Result<Image, String> {
        let mut d = Decoder(bytes);
        if d.take(MAGIC.len())? != MAGIC {
            return Err("not a keeper image".into());
        }
        let version = d.u64()?;
        if version != FORMAT_VERSION {
            return Err(format!(
                "keeper image format {version}, this vsockd reads {FORMAT_VERSION}"
            ));
        }
        let n = d.count()?;
        let mut worker_args = Vec::with_capacity(n);
        for _ in 0..n {
            worker_args.push(OsString::from_vec(d.bytes()?.to_vec()));
        }
        let binary_path = PathBuf::from(OsString::from_vec(d.bytes()?.to_vec()));
        let listener = d.fd()?;
        let host_listener = d.fd()?;
        let control = d.opt_fd()?;
        let frontend = d.opt_fd()?;
        let worker_exe = d.fd()?;
        let worker = WorkerImage {
            pid: d.u32()?,
            number: d.u64()?,
            generation: d.opt()?,
            link: d.fd()?,
            uptime: d.duration()?,
        };
        let n = d.count()?;
        let mut store = Vec::with_capacity(n);
        for _ in 0..n {
            store.push((d.u64()?, d.fd()?));
        }
        let n = d.count()?;
        let mut waiting = Vec::with_capacity(n);
        for _ in 0..n {
            waiting.push(d.fd()?);
        }
        let next_client_uid = d.u64()?;
        let n = d.count()?;
        let mut unsent_clients = Vec::with_capacity(n);
        for _ in 0..n {
            unsent_clients.push(d.u64()?);
        }
        let session_end_owed = d.u64()? != 0;
        let next_seq = d.u64()?;
        let started = d.u64()?;
        let standbys_started = d.u64()?;
        let quick_deaths = d.u32()?;
        let uptime = d.duration()?;
        let restarts_total = d.u64()?;
        let n = d.count()?;
        let mut restarts = Vec::with_capacity(n);
        for _ in 0..n {
            restarts.push(Restart {
                at: SystemTime::UNIX_EPOCH + d.duration()?,
                worker: d.u64()?,
                pid: d.u32()?,
                generation: d.opt()?,
                cause: d.string()?,
            });
        }
        let answer = d.string()?;
        if !d.0.is_empty() {
            return Err(format!("{} bytes after the keeper image", d.0.len()));
        }
        Ok(Image {
            worker_args,
            binary_path,
            listener,
            host_listener,
            control,
            frontend,
            worker_exe,
            worker,
            store,
            waiting,
            next_client_uid,
            unsent_clients,
            session_end_owed,
            next_seq,
            started,
            standbys_started,
            quick_deaths,
            uptime,
            restarts_total,
            restarts,
            answer,
        })
    }

    /// Writes the image into a new memfd that an execve keeps open.
    pub fn write(&self) -> io::Result<OwnedFd> {
        // SAFETY: memfd_create(2) with a constant name and no flags (the
        // descriptor must survive the execve); the result is checked
        // before it is owned.
        let fd = unsafe { libc::memfd_create(c"vsockd-keeper-image".as_ptr(), 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut file = std::fs::File::from(fd);
        file.write_all(&self.encode())?;
        file.rewind()?;
        Ok(OwnedFd::from(file))
    }

    /// Reads the image in memfd `fd`.
    pub fn read(fd: OwnedFd) -> Result<Image, String> {
        let mut bytes = Vec::new();
        std::fs::File::from(fd)
            .take(MAX_IMAGE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read the keeper image: {e}"))?;
        if bytes.len() as u64 > MAX_IMAGE_BYTES {
            return Err(format!("keeper image over {MAX_IMAGE_BYTES} bytes"));
        }
        Image::decode(&bytes)
    }
}

/// Sets or clears the close-on-exec flag of `fds`.
pub(super) fn set_cloexec(fds: &[RawFd], on: bool) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: fcntl(2) F_GETFD and F_SETFD on descriptors the keeper
        // holds.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Takes ownership of an inherited descriptor named by an image.
///
/// # Safety
///
/// `fd` must be open, inherited by this process for it to own, and taken
/// once.
pub(super) unsafe fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: as the caller promises.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

struct Encoder(Vec<u8>);

impl Encoder {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn fd(&mut self, fd: RawFd) {
        self.u64(fd as u64);
    }
    fn opt(&mut self, v: Option<u64>) {
        match v {
            Some(v) => {
                self.u64(1);
                self.u64(v);
            }
            None => self.u64(0),
        }
    }
    fn opt_fd(&mut self, fd: Option<RawFd>) {
        self.opt(fd.map(|fd| fd as u64));
    }
    fn duration(&mut self, d: Duration) {
        self.u64(d.as_secs());
        self.u64(u64::from(d.subsec_nanos()));
    }
}

struct Decoder<'a>(&'a [u8]);

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("the keeper image is cut short".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn u32(&mut self) -> Result<u32, String> {
        u32::try_from(self.u64()?).map_err(|_| "a 32-bit field out of range".to_string())
    }
    /// A count of items that follow, each at least 8 bytes.
    fn count(&mut self) -> Result<usize, String> {
        let n = self.u64()?;
        if n > (self.0.len() / 8) as u64 {
            return Err(format!("a count of {n} beyond the image's end"));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = usize::try_from(self.u64()?).map_err(|_| "a length out of range")?;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "a string not UTF-8".to_string())
    }
    fn fd(&mut self) -> Result<RawFd, String> {
        RawFd::try_from(self.u64()?).map_err(|_| "a descriptor out of range".to_string())
    }
    fn opt(&mut self) -> Result<Option<u64>, String> {
        match self.u64()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            t => Err(format!("an option tagged {t}")),
        }
    }
    fn opt_fd(&mut self) -> Result<Option<RawFd>, String> {
        self.opt()?
            .map(|v| RawFd::try_from(v).map_err(|_| "a descriptor out of range".to_string()))
            .transpose()
    }
    fn duration(&mut self) -> Result<Duration, String> {
        let secs = self.u64()?;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return Err("a duration's nanoseconds out of range".into());
        }
        Ok(Duration::new(secs, nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn image() -> Image {
        Image {
            worker_args: vec!["--socket-path".into(), "/r/v.sock".into()],
            binary_path: "/usr/bin/vsockd".into(),
            listener: 3,
            host_listener: 4,
            control: Some(5),
            frontend: None,
            worker_exe: 6,
            worker: WorkerImage {
                pid: 4242,
                number: 3,
                generation: Some(7),
                link: 8,
                uptime: Duration::new(12, 345),
            },
            store: vec![(1, 9), (1 << 48, 10)],
            waiting: vec![11],
            next_client_uid: (1 << 40) + 5,
            unsent_clients: vec![(1 << 40) + 4],
            session_end_owed: false,
            next_seq: 99,
            started: 3,
            standbys_started: 1,
            quick_deaths: 0,
            uptime: Duration::from_secs(60),
            restarts_total: 1,
            restarts: vec![Restart {
                at: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5),
                worker: 1,
                pid: 4000,
                generation: None,
                cause: "killed by signal 9 (SIGKILL)".into(),
            }],
            answer: "worker: 3\n".into(),
        }
    }

    #[test]
    fn an_image_reads_back_as_written() {
        let img = image();
        let fd = img.write().unwrap();
        // SAFETY: F_GETFD on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, 0, "the image must survive execve");
        assert_eq!(Image::read(fd).unwrap(), img);
        assert_eq!(img.fds().len(), 8);
    }

    #[test]
    fn bad_images_are_refused() {
        let bytes = image().encode();
        assert!(Image::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Image::decode(&longer).unwrap_err().contains("after"));
        let mut other = bytes.clone();
        other[0] = b'X';
        assert!(Image::decode(&other)
            .unwrap_err()
            .contains("not a keeper image"));
        let mut newer = bytes;
        newer[8] = 2;
        assert!(Image::decode(&newer).unwrap_err().contains("format 2"));
        // A huge count does not allocate.
        let mut e = Encoder(MAGIC.to_vec());
        e.u64(FORMAT_VERSION);
        e.u64(u64::MAX);
        assert!(Image::decode(&e.0).unwrap_err().contains("beyond"));
    }
}
