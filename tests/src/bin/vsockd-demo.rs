//! vsockd-demo: starts a backend (vsockd, or the peer with
//! VSOCKD_E2E_BACKEND=peer), boots a QEMU guest on it, and sends one
//! message from the guest to the host and one from the host to the guest.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use vsockd_tests::error::{Context, Error, Result};
use vsockd_tests::hybrid::{hybrid_connect, HostListener};
use vsockd_tests::qemu::{shell_quote, temp_dir};
use vsockd_tests::{Backend, BackendKind, GuestImage, Vm, VmConfig};

const CID: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(60);

fn guest_message(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| l.strip_prefix("MESSAGE conn=0 text="))
        .map(|t| t.trim_matches('"').to_string())
}

/// Reads one line (without its newline).
fn read_line(s: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b)? == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn run() -> Result<()> {
    let kind = BackendKind::from_env()?;
    println!("[demo] preparing the guest image (kernel, initramfs)");
    let image = GuestImage::get()?;
    println!(
        "[demo] kernel {} ({}), initramfs {}",
        image.kernel_version,
        if image.pvh {
            "vmlinux, PVH entry"
        } else {
            "bzImage"
        },
        image.initrd.display()
    );
    let dir = temp_dir("demo")?;
    let backend = Backend::start(&dir, CID)?;
    println!(
        "[demo] {} started: vhost-user socket {}, host socket {}",
        kind.name(),
        backend.socket().display(),
        backend.uds().display()
    );
    let vm = Vm::boot(image, &VmConfig::new(backend.socket())).map_err(|e| backend.attach(e))?;
    println!(
        "[demo] guest booted in {:.1} s; it sees CID {}",
        vm.boot_time().as_secs_f64(),
        vm.cid().unwrap_or(0)
    );

    // Guest to host: the guest connects to CID 2 port 5000, which the
    // backend bridges to <uds>_5000.
    let listener = HostListener::bind(backend.uds(), 5000)?;
    let text = "hello host, this is the guest speaking over vsock";
    let job = vm.spawn(&format!(
        "vsock-probe --timeout 30 connect 2 5000 message {}",
        shell_quote(text)
    ))?;
    let mut s = listener
        .accept_timeout(TIMEOUT)
        .map_err(|e| backend.attach(Error::new(format!("no guest connection: {e}"))))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let got = read_line(&mut s).context(|| "reading the guest's message".into())?;
    println!();
    println!("  guest -> host   the host received: {got:?}");
    s.write_all(b"ack from the host\n")?;
    let out = job.wait(TIMEOUT)?;
    if !out.success() || got != text {
        return Err(backend.attach(Error::new(format!(
            "guest to host failed: guest said {:?}",
            out.output
        ))));
    }
    println!(
        "                  the guest got the reply: {:?}",
        guest_message(&out.output).unwrap_or_default()
    );

    // Host to guest: the host asks the backend for guest port 5001.
    let job = vm.spawn("vsock-probe --timeout 30 listen 5001 message 'ack from the guest'")?;
    job.wait_for_output("LISTENING", TIMEOUT)?;
    let text = "hello guest, this is the host speaking through the hybrid socket";
    let (mut s, n) = hybrid_connect(backend.uds(), 5001)
        .map_err(|e| backend.attach(Error::new(format!("hybrid connect failed: {e}"))))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(format!("{text}\n").as_bytes())?;
    let reply = read_line(&mut s).context(|| "reading the guest's reply".into())?;
    let out = job.wait(TIMEOUT)?;
    let received = guest_message(&out.output).unwrap_or_default();
    println!();
    println!("  host -> guest   (CONNECT 5001 answered OK {n})");
    println!("                  the guest received: {received:?}");
    println!("                  the host got the reply: {reply:?}");
    println!();
    if !out.success() || received != text {
        return Err(backend.attach(Error::new(format!(
            "host to guest failed: guest said {:?}",
            out.output
        ))));
    }
    vm.shutdown()?;
    drop(backend);
    let _ = std::fs::remove_dir_all(&dir);
    println!("[demo] guest shut down, backend stopped: all good");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("[demo] FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
