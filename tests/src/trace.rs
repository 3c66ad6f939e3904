//! A vhost-user proxy that logs every message between a VMM and a
//! backend: request name, flags, size, fds and the decoded payload of the
//! common requests. It forwards messages unchanged, fds included.
//!
//! Enable it in the guest tests with `VSOCKD_E2E_TRACE=1`: the trace goes
//! to `vhost-user.trace` in the test's directory.

use std::fs::File;
use std::io::{self, Write};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

const HDR: usize = 12;
const MAX_FDS: usize = 32;
const REPLY_FLAG: u32 = 0x4;

/// Name of a front-end request.
pub fn request_name(req: u32) -> &'static str {
    const NAMES: [&str; 41] = [
        "NONE",
        "GET_FEATURES",
        "SET_FEATURES",
        "SET_OWNER",
        "RESET_OWNER",
        "SET_MEM_TABLE",
        "SET_LOG_BASE",
        "SET_LOG_FD",
        "SET_VRING_NUM",
        "SET_VRING_ADDR",
        "SET_VRING_BASE",
        "GET_VRING_BASE",
        "SET_VRING_KICK",
        "SET_VRING_CALL",
        "SET_VRING_ERR",
        "GET_PROTOCOL_FEATURES",
        "SET_PROTOCOL_FEATURES",
        "GET_QUEUE_NUM",
        "SET_VRING_ENABLE",
        "SEND_RARP",
        "NET_SET_MTU",
        "SET_BACKEND_REQ_FD",
        "IOTLB_MSG",
        "SET_VRING_ENDIAN",
        "GET_CONFIG",
        "SET_CONFIG",
        "CREATE_CRYPTO_SESSION",
        "CLOSE_CRYPTO_SESSION",
        "POSTCOPY_ADVISE",
        "POSTCOPY_LISTEN",
        "POSTCOPY_END",
        "GET_INFLIGHT_FD",
        "SET_INFLIGHT_FD",
        "GPU_SET_SOCKET",
        "RESET_DEVICE",
        "VRING_KICK",
        "GET_MAX_MEM_SLOTS",
        "ADD_MEM_REG",
        "REM_MEM_REG",
        "SET_STATUS",
        "GET_STATUS",
    ];
    NAMES.get(req as usize).copied().unwrap_or("UNKNOWN")
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// A readable rendering of a message's payload.
pub fn decode(req: u32, reply: bool, p: &[u8]) -> String {
    let name = request_name(req);
    match name {
        "GET_FEATURES"
        | "SET_FEATURES"
        | "GET_PROTOCOL_FEATURES"
        | "SET_PROTOCOL_FEATURES"
        | "GET_QUEUE_NUM"
        | "GET_MAX_MEM_SLOTS"
        | "SET_STATUS"
        | "GET_STATUS" => u64_at(p, 0).map_or(String::new(), |v| format!("value={v:#x}")),
        "SET_VRING_NUM" | "SET_VRING_BASE" | "GET_VRING_BASE" | "SET_VRING_ENABLE" => {
            match (u32_at(p, 0), u32_at(p, 4)) {
                (Some(i), Some(n)) => format!("index={i} num={n}"),
                _ => String::new(),
            }
        }
        "SET_VRING_KICK" | "SET_VRING_CALL" | "SET_VRING_ERR" if !reply => {
            u64_at(p, 0).map_or(String::new(), |v| {
                format!(
                    "index={}{}",
                    v & 0xff,
                    if v & 0x100 != 0 { " nofd" } else { "" }
                )
            })
        }
        "SET_VRING_ADDR" => match (u32_at(p, 0), u32_at(p, 4), u64_at(p, 8)) {
            (Some(i), Some(f), Some(desc)) => format!(
                "index={i} flags={f:#x} desc={desc:#x} used={:#x} avail={:#x}",
                u64_at(p, 16).unwrap_or(0),
                u64_at(p, 24).unwrap_or(0)
            ),
            _ => String::new(),
        },
        "SET_MEM_TABLE" if !reply => {
            let n = u32_at(p, 0).unwrap_or(0) as usize;
            let regions: Vec<String> = (0..n.min(8))
                .map(|r| {
                    let o = 8 + r * 32;
                    format!(
                        "[gpa={:#x} size={:#x} off={:#x}]",
                        u64_at(p, o).unwrap_or(0),
                        u64_at(p, o + 8).unwrap_or(0),
                        u64_at(p, o + 24).unwrap_or(0)
                    )
                })
                .collect();
            format!("regions={n} {}", regions.join(" "))
        }
        "GET_CONFIG" | "SET_CONFIG" => match (u32_at(p, 0), u32_at(p, 4)) {
            (Some(off), Some(size)) => {
                let data = p.get(12..).unwrap_or(&[]);
                format!("offset={off} size={size} data={data:02x?}")
            }
            _ => String::new(),
        },
        _ if reply && p.len() == 8 => format!("value={:#x}", u64_at(p, 0).unwrap_or(0)),
        _ => String::new(),
    }
}

/// Receives one message: header, payload and fds.
fn recv_msg(s: &UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut hdr = [0u8; HDR];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < HDR {
        let mut cbuf = [0u64; 64];
        let mut iov = libc::iovec {
            iov_base: hdr[got..].as_mut_ptr() as *mut libc::c_void,
            iov_len: HDR - got,
        };
        // SAFETY: msghdr is plain data; all-zero is valid before filling.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = mem::size_of_val(&cbuf) as _;
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(None);
        }
        // SAFETY: walking the control messages recvmsg filled in.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / mem::size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(*data.add(i)));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        got += n as usize;
    }
    let size = u32_at(&hdr, 8).unwrap_or(0) as usize;
    let mut buf = hdr.to_vec();
    buf.resize(HDR + size, 0);
    let mut off = HDR;
    while off < buf.len() {
        // SAFETY: the slice is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                s.as_raw_fd(),
                buf[off..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - off,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-message",
            ));
        }
        off += n as usize;
    }
    Ok(Some((buf, fds)))
}

/// Sends one message with its fds.
fn send_msg(s: &UnixStream, buf: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().take(MAX_FDS).map(|f| f.as_raw_fd()).collect();
    let mut cbuf = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid before filling.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        let bytes = raw.len() * mem::size_of::<RawFd>();
        // SAFETY: cbuf is large enough for CMSG_SPACE(bytes) with
        // MAX_FDS fds; the header and data are written inside it.
        unsafe {
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = libc::CMSG_SPACE(bytes as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr() as *const u8, libc::CMSG_DATA(c), bytes);
        }
    }
    let mut sent = 0usize;
    let mut first = true;
    while sent < buf.len() {
        if !first {
            msg.msg_control = std::ptr::null_mut();
            msg.msg_controllen = 0;
        }
        iov.iov_base = buf[sent..].as_ptr() as *mut libc::c_void;
        iov.iov_len = buf.len() - sent;
        msg.msg_iov = &mut iov;
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
        first = false;
    }
    Ok(())
}

type Log = Arc<Mutex<Box<dyn Write + Send>>>;

fn log_line(log: &Log, line: &str) {
    if let Ok(mut w) = log.lock() {
        let _ = writeln!(w, "{line}");
        let _ = w.flush();
    }
}

fn pump(from: UnixStream, to: UnixStream, dir: &'static str, start: Instant, log: Log) {
    loop {
        match recv_msg(&from) {
            Ok(Some((buf, fds))) => {
                let req = u32_at(&buf, 0).unwrap_or(0);
                let flags = u32_at(&buf, 4).unwrap_or(0);
                let reply = flags & REPLY_FLAG != 0;
                let payload = &buf[HDR..];
                let name = if dir == "B>F" && !reply {
                    // Backend-initiated requests share numbers with their
                    // own table; print the number.
                    "BACKEND_REQ"
                } else {
                    request_name(req)
                };
                log_line(
                    &log,
                    &format!(
                        "{:9.3} {dir} {name}({req}){} flags={flags:#x} size={} fds={} {}",
                        start.elapsed().as_secs_f64(),
                        if reply { " reply" } else { "" },
                        payload.len(),
                        fds.len(),
                        decode(req, reply, payload)
                    ),
                );
                if let Err(e) = send_msg(&to, &buf, &fds) {
                    log_line(&log, &format!("{dir} forward failed: {e}"));
                    break;
                }
            }
            Ok(None) => {
                log_line(
                    &log,
                    &format!("{:9.3} {dir} closed", start.elapsed().as_secs_f64()),
                );
                break;
            }
            Err(e) => {
                log_line(&log, &format!("{dir} error: {e}"));
                break;
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// A running proxy: VMMs connect to `listen`, each connection is relayed
/// to a new connection to `backend`.
pub struct Proxy {
    listen: PathBuf,
}

impl Proxy {
    /// Starts a proxy in background threads, logging to `log`.
    pub fn start(listen: &Path, backend: &Path, log: &Path) -> io::Result<Proxy> {
        let _ = std::fs::remove_file(listen);
        let l = UnixListener::bind(listen)?;
        let log: Log = Arc::new(Mutex::new(Box::new(File::create(log)?)));
        let backend = backend.to_path_buf();
        let start = Instant::now();
        thread::spawn(move || {
            for (n, vmm) in l.incoming().enumerate() {
                let vmm = match vmm {
                    Ok(s) => s,
                    Err(_) => break,
                };
                log_line(
                    &log,
                    &format!("{:9.3} VMM connection {n}", start.elapsed().as_secs_f64()),
                );
                let be = match UnixStream::connect(&backend) {
                    Ok(s) => s,
                    Err(e) => {
                        log_line(&log, &format!("cannot connect to the backend: {e}"));
                        continue;
                    }
                };
                let (v2, b2) = match (vmm.try_clone(), be.try_clone()) {
                    (Ok(v), Ok(b)) => (v, b),
                    _ => continue,
                };
                let l1 = log.clone();
                let l2 = log.clone();
                thread::spawn(move || pump(vmm, be, "F>B", start, l1));
                thread::spawn(move || pump(b2, v2, "B>F", start, l2));
            }
        });
        Ok(Proxy {
            listen: listen.to_path_buf(),
        })
    }

    /// The socket VMMs connect to.
    pub fn socket(&self) -> &Path {
        &self.listen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_decoding() {
        assert_eq!(request_name(11), "GET_VRING_BASE");
        assert_eq!(request_name(40), "GET_STATUS");
        assert_eq!(request_name(99), "UNKNOWN");
        let mut p = Vec::new();
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&7u32.to_le_bytes());
        assert_eq!(decode(11, true, &p), "index=1 num=7");
        assert_eq!(decode(12, false, &0x101u64.to_le_bytes()), "index=1 nofd");
    }

    #[test]
    fn relays_messages_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = File::open("/dev/null").unwrap();
        let mut msg = Vec::new();
        msg.extend_from_slice(&12u32.to_le_bytes());
        msg.extend_from_slice(&1u32.to_le_bytes());
        msg.extend_from_slice(&8u32.to_le_bytes());
        msg.extend_from_slice(&0u64.to_le_bytes());
        send_msg(&a, &msg, &[OwnedFd::from(f)]).unwrap();
        let (got, fds) = recv_msg(&b).unwrap().unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 1);
    }
}
