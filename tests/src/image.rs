//! The guest image: a kernel from /boot plus an initramfs holding the
//! virtio-vsock modules, busybox, vsock-probe and its libraries, and an
//! /init that hands a shell to the host on a virtio-serial port.
//!
//! Built once and cached under `<target>/guest-image/`; rebuilt when any
//! input changes. A file lock makes concurrent callers safe.

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::cpio::Cpio;
use crate::error::{Context, Error, Result};

/// Modules the guest loads, in this order: virtio over PCI, the
/// virtio-serial port that carries the command shell, and vsock.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// Marker the guest prints on the command port when it is ready.
pub const READY_MARKER: &str = "@@READY";

/// Name of the virtio-serial port that carries the command shell.
pub const CMD_PORT_NAME: &str = "vsockd.cmd";

/// Bump when the layout of the image or /init changes.
const FORMAT: &str = "vsockd-guest-image-6";

/// A built guest image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Kernel to boot: an uncompressed vmlinux (PVH entry) or a bzImage.
    pub kernel: PathBuf,
    /// The initramfs (uncompressed newc cpio).
    pub initrd: PathBuf,
    /// True when `kernel` is the uncompressed vmlinux.
    pub pvh: bool,
    /// The kernel's release, e.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
    /// The kernel command line to boot with.
    pub cmdline: String,
}

/// The workspace root (the parent of this crate).
pub fn workspace_dir() -> PathBuf {
    let m = Path::new(env!("CARGO_MANIFEST_DIR"));
    m.parent().unwrap_or(m).to_path_buf()
}

/// The workspace's target directory: `$CARGO_TARGET_DIR` or
/// `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_dir().join(d)
            }
        }
        _ => workspace_dir().join("target"),
    }
}

/// Finds the vsock-probe binary: `$VSOCKD_PROBE_BIN`, else next to the
/// running executable (or its parent directory, for test executables in
/// `deps/`), else `<target>/release` or `<target>/debug`.
pub fn find_probe() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VSOCKD_PROBE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(d) = exe.parent() {
            candidates.push(d.join("vsock-probe"));
            if let Some(p) = d.parent() {
                candidates.push(p.join("vsock-probe"));
            }
        }
    }
    let t = target_dir();
    candidates.push(t.join("release").join("vsock-probe"));
    candidates.push(t.join("debug").join("vsock-probe"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            Error::new(format!(
                "vsock-probe binary not found (looked at {candidates:?}); build it with \
                 `cargo build -p vsockd-tests` or set VSOCKD_PROBE_BIN"
            ))
        })
}

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .output()
        .context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(Error::new(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The newest kernel in /boot that has its modules installed, or the one
/// named by `$VSOCKD_GUEST_KVER`. Returns (release, bzImage path).
pub fn find_kernel() -> Result<(String, PathBuf)> {
    if let Ok(v) = std::env::var("VSOCKD_GUEST_KVER") {
        let p = PathBuf::from(format!("/boot/vmlinuz-{v}"));
        return Ok((v, p));
    }
    let mut found: Vec<(Vec<u64>, String)> = Vec::new();
    for e in fs::read_dir("/boot").context(|| "cannot list /boot".into())? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(v) = name.strip_prefix("vmlinuz-") {
            if Path::new("/lib/modules").join(v).is_dir() {
                found.push((version_key(v), v.to_string()));
            }
        }
    }
    found.sort();
    let (_, v) = found.pop().ok_or_else(|| {
        Error::new(
            "no kernel with modules in /boot and /lib/modules \
             (install linux-image-amd64; scripts/install-deps does)",
        )
    })?;
    let p = PathBuf::from(format!("/boot/vmlinuz-{v}"));
    Ok((v, p))
}

/// Module files for `names` and their dependencies, in load order.
pub fn resolve_modules(kver: &str, names: &[&str]) -> Result<Vec<PathBuf>> {
    let mut order: Vec<PathBuf> = Vec::new();
    for name in names {
        let out = run(Command::new("modprobe")
            .args(["-S", kver, "--show-depends", name])
            .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin"))?;
        for line in String::from_utf8_lossy(&out).lines() {
            let mut w = line.split_whitespace();
            if w.next() == Some("insmod") {
                if let Some(p) = w.next() {
                    let p = PathBuf::from(p);
                    if !order.contains(&p) {
                        order.push(p);
                    }
                }
            }
        }
    }
    Ok(order)
}

/// The module name of a module file, e.g. `virtio_pci` for
/// `.../virtio_pci.ko.xz`.
fn module_name(p: &Path) -> String {
    let f = p.file_name().unwrap_or_default().to_string_lossy();
    f.split(".ko").next().unwrap_or(&f).replace('-', "_")
}

fn read_module(p: &Path) -> Result<Vec<u8>> {
    let s = p.to_string_lossy();
    let tool = if s.ends_with(".xz") {
        Some("xz")
    } else if s.ends_with(".zst") {
        Some("zstd")
    } else if s.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        Some(t) => run(Command::new(t).arg("-dc").arg(p)),
        None => fs::read(p).context(|| format!("cannot read {}", p.display())),
    }
}

/// Shared libraries `ldd` lists for a binary (none for a static one).
pub fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context(|| "cannot run ldd".into())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, r)) => r.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path {
            if p.starts_with('/') {
                libs.push(PathBuf::from(p));
            }
        }
    }
    Ok(libs)
}

/// Extracts the uncompressed vmlinux (an ELF file) from a bzImage, using
/// the payload offset and length in its setup header.
pub fn extract_vmlinux(bzimage: &Path) -> Result<Vec<u8>> {
    let data = fs::read(bzimage).context(|| format!("cannot read {}", bzimage.display()))?;
    if data.len() < 0x250 || &data[0x202..0x206] != b"HdrS" {
        return Err(Error::new("not a bzImage (no HdrS)"));
    }
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
    let mut setup_sects = data[0x1f1] as usize;
    if setup_sects == 0 {
        setup_sects = 4;
    }
    let pm_start = (setup_sects + 1) * 512;
    let off = pm_start + u32_at(0x248);
    let len = u32_at(0x24c);
    let payload = data
        .get(off..off + len)
        .ok_or_else(|| Error::new("bzImage payload out of bounds"))?;
    let (tool, args): (&str, &[&str]) = if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        ("xz", &["-dc", "--single-stream"])
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        ("zstd", &["-dc"])
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        ("gzip", &["-dc"])
    } else {
        return Err(Error::new(format!(
            "unsupported bzImage payload compression (magic {:02x?})",
            &payload[..payload.len().min(6)]
        )));
    };
    let tmp = std::env::temp_dir().join(format!("vsockd-payload-{}", std::process::id()));
    fs::write(&tmp, payload)?;
    // gzip and zstd may complain about the size trailer after the stream
    // but still write the whole kernel, so judge by the output.
    let out = Command::new(tool).args(args).arg(&tmp).output();
    let _ = fs::remove_file(&tmp);
    let out = out.context(|| format!("cannot run {tool}"))?;
    if !out.stdout.starts_with(b"\x7fELF") {
        return Err(Error::new(format!(
            "decompressed bzImage payload is not ELF ({tool}: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// A binary without its debug information (smaller initramfs, faster
/// boot) when `strip` is available; as it is otherwise.
fn read_stripped(bin: &Path) -> Result<Vec<u8>> {
    let tmp = std::env::temp_dir().join(format!("vsockd-stripped-{}", std::process::id()));
    let stripped = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(bin)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let data = if stripped { fs::read(&tmp).ok() } else { None };
    let _ = fs::remove_file(&tmp);
    match data {
        Some(d) => Ok(d),
        None => fs::read(bin).context(|| format!("cannot read {}", bin.display())),
    }
}

fn kernel_has_pvh(kver: &str) -> bool {
    fs::read_to_string(format!("/boot/config-{kver}"))
        .map(|c| c.lines().any(|l| l == "CONFIG_PVH=y"))
        .unwrap_or(false)
}

/// FNV-1a, enough to notice that an input changed.
#[derive(Debug, Clone)]
struct Hasher(u64);

impl Hasher {
    fn new() -> Hasher {
        Hasher(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, b: &[u8]) {
        for x in b {
            self.0 ^= *x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate fields.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }

    fn file_stamp(&mut self, p: &Path) {
        self.bytes(p.to_string_lossy().as_bytes());
        if let Ok(m) = fs::metadata(p) {
            self.bytes(&m.len().to_le_bytes());
            self.bytes(&m.mtime().to_le_bytes());
            self.bytes(&m.mtime_nsec().to_le_bytes());
            self.bytes(&m.ino().to_le_bytes());
        }
    }

    fn file_contents(&mut self, p: &Path) -> Result<()> {
        let mut f = fs::File::open(p).context(|| format!("cannot open {}", p.display()))?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            self.bytes(&buf[..n]);
        }
        Ok(())
    }
}

fn init_script(modules: &[String], lib_dirs: &[String]) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH={libs}
export HOME=/root
for m in {mods}; do
    insmod /lib/modules/guest/$m.ko || echo "init: insmod $m failed"
done
dev=none
for d in /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio*; do
    [ -e "$d" ] && dev=$(basename "$d")
done
cid=$(vsock-probe --timeout 10 cid 2>&1 | tr '\n' ' ')
echo "init: vsock device $dev, $cid"
mkdir -p /tmp/jobs
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "{port_name}" ] && port=/dev/$(basename "$p")
done
if [ -z "$port" ]; then
    echo "init: no virtio-serial port named {port_name}"
    exec sh
fi
# One open of the port (it allows only one), shared by every shell. Its
# standard input is not a terminal, so the shell is non-interactive.
exec 3<>"$port"
echo "{ready} vsockdev=$dev $cid@@" >&3
while true; do
    sh <&3 >&3 2>&3
done
"#,
        libs = lib_dirs.join(":"),
        mods = modules.join(" "),
        ready = READY_MARKER,
        port_name = CMD_PORT_NAME,
    )
}

/// Options for building an image.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// The vsock-probe binary to put in the guest.
    pub probe: PathBuf,
    /// Where the image is cached.
    pub cache_dir: PathBuf,
}

impl ImageOptions {
    /// The defaults: `find_probe()` and `<target>/guest-image`.
    pub fn from_env() -> Result<ImageOptions> {
        Ok(ImageOptions {
            probe: find_probe()?,
            cache_dir: target_dir().join("guest-image"),
        })
    }
}

struct FileLock(fs::File);

impl FileLock {
    fn lock(path: &Path) -> Result<FileLock> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .context(|| format!("cannot open lock {}", path.display()))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::new(format!(
                "cannot lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: flock on an fd we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, data).context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).context(|| format!("cannot rename to {}", path.display()))?;
    Ok(())
}

static IMAGE: OnceLock<std::result::Result<GuestImage, Error>> = OnceLock::new();

impl GuestImage {
    /// The image for this process, built (or found in the cache) on first
    /// use with `ImageOptions::from_env()`.
    pub fn get() -> Result<&'static GuestImage> {
        IMAGE
            .get_or_init(|| ImageOptions::from_env().and_then(|o| GuestImage::build(&o)))
            .as_ref()
            .map_err(|e| e.clone())
    }

    /// Builds the image, or reuses the cached one when no input changed.
    pub fn build(opts: &ImageOptions) -> Result<GuestImage> {
        let (kver, bzimage) = find_kernel()?;
        let modules = resolve_modules(&kver, GUEST_MODULES)?;
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::new("busybox not found (install busybox-static; scripts/install-deps does)")
            })?;
        let mut libs = shared_libs(&opts.probe)?;
        for l in shared_libs(&busybox)? {
            if !libs.contains(&l) {
                libs.push(l);
            }
        }
        let want_pvh = kernel_has_pvh(&kver) && std::env::var_os("VSOCKD_GUEST_BZIMAGE").is_none();

        let mod_names: Vec<String> = modules.iter().map(|p| module_name(p)).collect();
        let mut lib_dirs: Vec<String> = Vec::new();
        for l in &libs {
            if let Some(d) = l.parent() {
                let d = d.to_string_lossy().into_owned();
                if !lib_dirs.contains(&d) {
                    lib_dirs.push(d);
                }
            }
        }
        let init = init_script(&mod_names, &lib_dirs);

        let mut h = Hasher::new();
        h.bytes(FORMAT.as_bytes());
        h.bytes(init.as_bytes());
        h.bytes(&[want_pvh as u8]);
        h.file_stamp(&bzimage);
        h.file_stamp(&busybox);
        for p in modules.iter().chain(libs.iter()) {
            h.file_stamp(p);
        }
        h.file_contents(&opts.probe)?;
        let key = format!("{:016x} {kver}", h.0);

        fs::create_dir_all(&opts.cache_dir)
            .context(|| format!("cannot create {}", opts.cache_dir.display()))?;
        let _lock = FileLock::lock(&opts.cache_dir.join("lock"))?;
        let key_file = opts.cache_dir.join("key");
        let initrd = opts.cache_dir.join("initramfs.cpio");
        let vmlinux = opts.cache_dir.join("vmlinux");
        let cmdline = "console=ttyS0 rdinit=/init panic=-1 quiet".to_string();

        let cached = fs::read_to_string(&key_file).ok();
        if let Some(k) = cached {
            let mut parts = k.trim().rsplitn(2, ' ');
            let pvh_flag = parts.next().unwrap_or("");
            let stored_key = parts.next().unwrap_or("");
            let pvh = pvh_flag == "pvh";
            if stored_key == key && initrd.is_file() && (!pvh || vmlinux.is_file()) {
                return Ok(GuestImage {
                    kernel: if pvh { vmlinux } else { bzimage },
                    initrd,
                    pvh,
                    kernel_version: kver,
                    cmdline,
                });
            }
        }

        // Build the initramfs.
        let mut c = Cpio::new();
        for d in [
            "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "root",
        ] {
            c.dir(d);
        }
        c.char_dev("dev/console", 0o600, 5, 1);
        c.char_dev("dev/null", 0o666, 1, 3);
        c.file("init", 0o755, init.as_bytes());
        let bb = fs::read(&busybox).context(|| format!("cannot read {}", busybox.display()))?;
        c.file("bin/busybox", 0o755, &bb);
        c.symlink("bin/sh", "busybox");
        let probe = read_stripped(&opts.probe)?;
        c.file("bin/vsock-probe", 0o755, &probe);
        for l in &libs {
            let data = fs::read(l).context(|| format!("cannot read {}", l.display()))?;
            c.file(&l.to_string_lossy(), 0o755, &data);
        }
        for (m, name) in modules.iter().zip(&mod_names) {
            let data = read_module(m)?;
            c.file(&format!("lib/modules/guest/{name}.ko"), 0o644, &data);
        }
        write_atomic(&initrd, &c.finish())?;

        // The kernel: the uncompressed vmlinux when it can be had.
        let pvh = if want_pvh {
            match extract_vmlinux(&bzimage) {
                Ok(elf) => {
                    write_atomic(&vmlinux, &elf)?;
                    true
                }
                Err(e) => {
                    eprintln!("guest image: booting the bzImage: {e}");
                    false
                }
            }
        } else {
            false
        };
        write_atomic(
            &key_file,
            format!("{key} {}\n", if pvh { "pvh" } else { "bzimage" }).as_bytes(),
        )?;
        Ok(GuestImage {
            kernel: if pvh { vmlinux } else { bzimage },
            initrd,
            pvh,
            kernel_version: kver,
            cmdline,
        })
    }
}
