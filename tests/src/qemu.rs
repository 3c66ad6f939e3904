//! A QEMU guest with a vhost-user-vsock-pci device, driven from Rust:
//! a shell in the guest over a virtio-serial port, QMP, and the console
//! log (first serial port) for diagnostics.
//!
//! The shell is not on a second 16550 serial port: under TCG, input to
//! a guest ttyS1 fed from a socket chardev stalls for seconds at a time,
//! while a virtio-serial port delivers at once.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{file_tail, Context, Error, Result};
use crate::hybrid::wait_readable;
use crate::image::{GuestImage, CMD_PORT_NAME, READY_MARKER};

/// Default limit for one guest shell command.
pub const DEFAULT_CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit for a boot to reach the guest shell.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// How to boot a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The backend's vhost-user socket.
    pub vhost_socket: PathBuf,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Directory for the VM's sockets and logs; a fresh temporary
    /// directory when None.
    pub work_dir: Option<PathBuf>,
    /// Extra words for the kernel command line.
    pub extra_cmdline: String,
    /// QEMU binary (`$VSOCKD_QEMU` or qemu-system-x86_64 when None).
    pub qemu: Option<PathBuf>,
}

impl VmConfig {
    pub fn new(vhost_socket: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            vhost_socket: vhost_socket.into(),
            mem_mib: 256,
            work_dir: None,
            extra_cmdline: String::new(),
            qemu: None,
        }
    }
}

/// A shell command's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdOutput {
    /// Exit status (as the guest shell's `$?`).
    pub status: i32,
    /// Standard output and standard error, interleaved.
    pub output: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// Quotes a string for the guest's shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether to keep VM and backend files after a test
/// (`VSOCKD_E2E_KEEP=1`).
pub fn keep_files() -> bool {
    std::env::var_os("VSOCKD_E2E_KEEP").is_some_and(|v| v != "0")
}

static DIR_SEQ: AtomicU64 = AtomicU64::new(0);

/// Creates a fresh temporary directory `<tmp>/vsockd-<name>-<pid>-<n>`.
pub fn temp_dir(name: &str) -> Result<PathBuf> {
    let base = std::env::var_os("VSOCKD_E2E_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let n = DIR_SEQ.fetch_add(1, Ordering::SeqCst);
    let d = base.join(format!("vsockd-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).context(|| format!("cannot create {}", d.display()))?;
    Ok(d)
}

/// Logs whose tails are attached to errors.
#[derive(Debug, Clone)]
struct Logs {
    console: PathBuf,
    qemu: PathBuf,
}

impl Logs {
    fn attach(&self, e: Error) -> Error {
        e.with_context("qemu stderr (tail)", &file_tail(&self.qemu, 20))
            .with_context("guest console (tail)", &file_tail(&self.console, 40))
    }
}

/// The shell on the guest's virtio-serial command port.
struct CmdChannel {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
    logs: Logs,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl CmdChannel {
    /// Reads more bytes into the buffer, waiting up to `deadline`.
    fn fill(&mut self, deadline: Instant, what: &str) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.logs.attach(Error::new(format!(
                "timed out {what}; output so far: {:?}",
                String::from_utf8_lossy(&self.buf)
            ))));
        }
        self.stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let mut tmp = [0u8; 4096];
        match self.stream.read(&mut tmp) {
            Ok(0) => Err(self.logs.attach(Error::new(format!(
                "guest command channel closed (QEMU exited?) {what}; output so far: {:?}",
                String::from_utf8_lossy(&self.buf)
            )))),
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(())
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut
                    || e.kind() == std::io::ErrorKind::Interrupted =>
            {
                Ok(())
            }
            Err(e) => Err(self.logs.attach(Error::new(format!(
                "reading the guest command channel: {e}"
            )))),
        }
    }

    /// Waits for the ready line /init prints; returns it.
    fn wait_ready(&mut self, deadline: Instant) -> Result<String> {
        loop {
            if let Some(start) = find(&self.buf, READY_MARKER.as_bytes()) {
                if let Some(end) = find(&self.buf[start..], b"@@\n") {
                    let line = String::from_utf8_lossy(&self.buf[start..start + end]).into_owned();
                    self.buf.drain(..start + end + 3);
                    return Ok(line);
                }
            }
            self.fill(deadline, "waiting for the guest to boot")?;
        }
    }

    /// Sends a command without waiting for it.
    fn send(&mut self, cmd: &str) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let line =
            format!("{{ {cmd}\n}} </dev/null 2>&1; printf '\\n@@%s %s %s@@\\n' END {id} $?\n");
        self.stream.write_all(line.as_bytes()).map_err(|e| {
            self.logs
                .attach(Error::new(format!("writing to the guest shell: {e}")))
        })?;
        Ok(id)
    }

    /// Runs a command to completion.
    fn run(&mut self, cmd: &str, timeout: Duration) -> Result<CmdOutput> {
        let deadline = Instant::now() + timeout;
        let id = self.send(cmd)?;
        let marker = format!("\n@@END {id} ");
        loop {
            if let Some(pos) = find(&self.buf, marker.as_bytes()) {
                let rest = &self.buf[pos + marker.len()..];
                if let Some(end) = find(rest, b"@@\n") {
                    let status: i32 = String::from_utf8_lossy(&rest[..end])
                        .trim()
                        .parse()
                        .unwrap_or(-1);
                    let mut out = &self.buf[..pos];
                    // Output left over from an earlier command that timed
                    // out ends with that command's marker: drop it.
                    while let Some(p) = find(out, b"\n@@END ") {
                        match find(&out[p + 1..], b"@@\n") {
                            Some(e) => out = &out[p + 1 + e + 3..],
                            None => break,
                        }
                    }
                    let output = String::from_utf8_lossy(out).into_owned();
                    self.buf.drain(..pos + marker.len() + end + 3);
                    return Ok(CmdOutput { status, output });
                }
            }
            self.fill(
                deadline,
                &format!("running guest command {cmd:?} ({timeout:?})"),
            )?;
        }
    }
}

/// A QMP connection.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn read_msg(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::new("timed out waiting for QMP"));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(Error::new("QMP connection closed (QEMU exited?)")),
                Ok(_) => {
                    let t = line.trim();
                    if t.is_empty() {
                        continue;
                    }
                    return serde_json::from_str(t).context(|| format!("bad QMP message {t:?}"));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::new(format!("reading QMP: {e}"))),
            }
        }
    }

    fn handshake(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let greeting = self.read_msg(deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(Error::new(format!("unexpected QMP greeting {greeting}")));
        }
        self.execute(r#"{"execute":"qmp_capabilities"}"#, timeout)?;
        Ok(())
    }

    fn execute(&mut self, cmd: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut line = cmd.trim().to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .context(|| "writing to QMP".into())?;
        loop {
            let m = self.read_msg(deadline)?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(Error::new(format!("QMP {cmd} failed: {e}")));
            }
            self.events.push(m);
        }
    }
}

/// A running guest.
pub struct Vm {
    child: Option<Child>,
    dir: PathBuf,
    remove_dir: bool,
    logs: Logs,
    cmd: Arc<Mutex<CmdChannel>>,
    qmp: Mutex<Qmp>,
    ready_line: String,
    boot_time: Duration,
    cid: Option<u32>,
}

fn accept_or_exit(
    l: &UnixListener,
    child: &mut Child,
    deadline: Instant,
    what: &str,
    logs: &Logs,
) -> Result<UnixStream> {
    loop {
        if wait_readable(l, Duration::from_millis(100))? {
            let (s, _) = l.accept()?;
            return Ok(s);
        }
        if let Some(st) = child.try_wait()? {
            return Err(logs.attach(Error::new(format!(
                "QEMU exited ({st}) before connecting its {what}"
            ))));
        }
        if Instant::now() > deadline {
            return Err(logs.attach(Error::new(format!(
                "QEMU did not connect its {what} in time"
            ))));
        }
    }
}

impl Vm {
    /// Boots a guest on `image` with a vhost-user-vsock device on
    /// `cfg.vhost_socket`, and waits until its shell answers.
    pub fn boot(image: &GuestImage, cfg: &VmConfig) -> Result<Vm> {
        let start = Instant::now();
        let (dir, remove_dir) = match &cfg.work_dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (d.clone(), false)
            }
            None => (temp_dir("vm")?, true),
        };
        let logs = Logs {
            console: dir.join("console.log"),
            qemu: dir.join("qemu.log"),
        };
        let cmd_path = dir.join("cmd.sock");
        let qmp_path = dir.join("qmp.sock");
        for p in [&cmd_path, &qmp_path] {
            let _ = std::fs::remove_file(p);
        }
        let cmd_l = UnixListener::bind(&cmd_path)?;
        let qmp_l = UnixListener::bind(&qmp_path)?;
        let _ = std::fs::remove_file(&logs.console);

        let qemu = cfg
            .qemu
            .clone()
            .or_else(|| std::env::var_os("VSOCKD_QEMU").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        let mem = cfg.mem_mib;
        let mut cmdline = image.cmdline.clone();
        if !cfg.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&cfg.extra_cmdline);
        }
        let p = |p: &Path| p.to_string_lossy().into_owned();
        let args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-cpu".into(),
            "max".into(),
            "-smp".into(),
            "1".into(),
            "-m".into(),
            format!("{mem}M"),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-machine".into(),
            "q35,memory-backend=mem".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            p(&image.kernel),
            "-initrd".into(),
            p(&image.initrd),
            "-append".into(),
            cmdline,
            "-chardev".into(),
            format!("file,id=con,path={}", p(&logs.console)),
            "-serial".into(),
            "chardev:con".into(),
            "-device".into(),
            "virtio-serial-pci,id=vser".into(),
            "-chardev".into(),
            format!("socket,id=cmd,path={}", p(&cmd_path)),
            "-device".into(),
            format!("virtserialport,bus=vser.0,chardev=cmd,name={CMD_PORT_NAME}"),
            "-chardev".into(),
            format!("socket,id=qmp,path={}", p(&qmp_path)),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
            "-chardev".into(),
            format!("socket,id=vsock0,path={}", p(&cfg.vhost_socket)),
            "-device".into(),
            "vhost-user-vsock-pci,chardev=vsock0".into(),
        ];
        let qlog = std::fs::File::create(&logs.qemu)?;
        let mut child = Command::new(&qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(qlog.try_clone()?)
            .stderr(qlog)
            .spawn()
            .context(|| format!("cannot start {}", qemu.display()))?;

        let deadline = start + BOOT_TIMEOUT;
        let booted = (|| -> Result<(CmdChannel, Qmp, String)> {
            let cmd_s = accept_or_exit(&cmd_l, &mut child, deadline, "command port", &logs)?;
            let qmp_s = accept_or_exit(&qmp_l, &mut child, deadline, "QMP socket", &logs)?;
            let mut qmp = Qmp {
                reader: BufReader::new(qmp_s.try_clone()?),
                writer: qmp_s,
                events: Vec::new(),
            };
            qmp.handshake(Duration::from_secs(60))
                .map_err(|e| logs.attach(e))?;
            let mut chan = CmdChannel {
                stream: cmd_s,
                buf: Vec::new(),
                next_id: 1,
                logs: logs.clone(),
            };
            let ready = chan.wait_ready(deadline)?;
            Ok((chan, qmp, ready))
        })();
        let (chan, qmp, ready) = match booted {
            Ok(x) => x,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(
                    Error::new(format!("boot failed (files kept in {})", dir.display()))
                        .with_context("cause", e.message()),
                );
            }
        };
        let mut vm = Vm {
            child: Some(child),
            dir,
            remove_dir,
            logs,
            cmd: Arc::new(Mutex::new(chan)),
            qmp: Mutex::new(qmp),
            ready_line: String::new(),
            boot_time: Duration::ZERO,
            cid: None,
        };
        vm.boot_time = start.elapsed();
        vm.cid = ready
            .split_whitespace()
            .skip_while(|w| *w != "CID")
            .nth(1)
            .and_then(|c| c.parse().ok());
        vm.ready_line = ready;
        if vm.cid.is_none() {
            return Err(vm.attach(Error::new(format!(
                "guest has no working vsock device: {:?}",
                vm.ready_line
            ))));
        }
        Ok(vm)
    }

    fn attach(&self, e: Error) -> Error {
        self.logs.attach(e)
    }

    /// Time from starting QEMU to the guest shell answering.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The guest's CID as the guest sees it.
    pub fn cid(&self) -> Option<u32> {
        self.cid
    }

    /// The line /init printed when ready (vsock device, CID).
    pub fn ready_line(&self) -> &str {
        &self.ready_line
    }

    /// The VM's directory (sockets, console.log, qemu.log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The console log's path.
    pub fn console_log(&self) -> &Path {
        &self.logs.console
    }

    /// The last `lines` lines of the console log.
    pub fn console_tail(&self, lines: usize) -> String {
        file_tail(&self.logs.console, lines)
    }

    /// Runs a shell command in the guest to completion (default limit).
    pub fn sh(&self, cmd: &str) -> Result<CmdOutput> {
        self.sh_timeout(cmd, DEFAULT_CMD_TIMEOUT)
    }

    /// Runs a shell command in the guest to completion within `timeout`.
    pub fn sh_timeout(&self, cmd: &str, timeout: Duration) -> Result<CmdOutput> {
        self.cmd.lock().unwrap().run(cmd, timeout)
    }

    /// Runs a shell command and fails unless it exits 0.
    pub fn sh_ok(&self, cmd: &str) -> Result<String> {
        let out = self.sh(cmd)?;
        if !out.success() {
            return Err(self.attach(Error::new(format!(
                "guest command {cmd:?} exited {}: {}",
                out.status, out.output
            ))));
        }
        Ok(out.output)
    }

    /// Starts a shell command in the background in the guest.
    pub fn spawn(&self, cmd: &str) -> Result<GuestJob> {
        let mut c = self.cmd.lock().unwrap();
        let id = c.next_id;
        let job = format!(
            "( {{ {cmd}\n}} </dev/null >/tmp/jobs/{id}.out 2>&1; echo $? >/tmp/jobs/{id}.tmp; \
             mv /tmp/jobs/{id}.tmp /tmp/jobs/{id}.rc ) &"
        );
        let out = c.run(&job, DEFAULT_CMD_TIMEOUT)?;
        if !out.success() {
            return Err(self.attach(Error::new(format!(
                "cannot start guest job {cmd:?}: {}",
                out.output
            ))));
        }
        Ok(GuestJob {
            id,
            cmd: cmd.to_string(),
            chan: self.cmd.clone(),
            logs: self.logs.clone(),
        })
    }

    /// Sends one QMP command (a JSON object) and returns its "return".
    pub fn qmp(&self, json: &str) -> Result<Value> {
        self.qmp
            .lock()
            .unwrap()
            .execute(json, Duration::from_secs(60))
            .map_err(|e| self.attach(e))
    }

    /// QMP events seen so far (taken).
    pub fn qmp_events(&self) -> Vec<Value> {
        std::mem::take(&mut self.qmp.lock().unwrap().events)
    }

    /// Pauses the guest (QMP `stop`).
    pub fn stop(&self) -> Result<()> {
        self.qmp(r#"{"execute":"stop"}"#).map(|_| ())
    }

    /// Resumes the guest (QMP `cont`).
    pub fn cont(&self) -> Result<()> {
        self.qmp(r#"{"execute":"cont"}"#).map(|_| ())
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.is_running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        !self.is_running()
    }

    /// Powers the guest off and waits for QEMU to exit: first the guest's
    /// own `poweroff -f`, then QMP `quit`, then SIGKILL.
    pub fn shutdown(mut self) -> Result<()> {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        if let Ok(mut c) = self.cmd.lock() {
            let _ = c.send("poweroff -f");
        }
        if self.wait_exit(Duration::from_secs(20)) {
            return Ok(());
        }
        let _ = self
            .qmp
            .lock()
            .unwrap()
            .execute(r#"{"execute":"quit"}"#, Duration::from_secs(5));
        if self.wait_exit(Duration::from_secs(10)) {
            return Ok(());
        }
        self.kill();
        Err(self.attach(Error::new(
            "QEMU did not exit on poweroff or quit; killed it",
        )))
    }

    /// Kills QEMU at once.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() || keep_files() {
            eprintln!(
                "VM files kept in {} (console.log, qemu.log)",
                self.dir.display()
            );
        } else if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A command running in the background in the guest.
pub struct GuestJob {
    id: u64,
    cmd: String,
    chan: Arc<Mutex<CmdChannel>>,
    logs: Logs,
}

impl GuestJob {
    /// The command line.
    pub fn command(&self) -> &str {
        &self.cmd
    }

    /// The output so far.
    pub fn output(&self) -> Result<String> {
        let id = self.id;
        let out = self
            .chan
            .lock()
            .unwrap()
            .run(&format!("cat /tmp/jobs/{id}.out"), DEFAULT_CMD_TIMEOUT)?;
        Ok(out.output)
    }

    /// Waits until the output contains `needle`; returns the output.
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let id = self.id;
        let q = shell_quote(needle);
        loop {
            // Poll in the guest for up to a second per round trip.
            let probe = format!(
                "i=0; while ! grep -qF -- {q} /tmp/jobs/{id}.out 2>/dev/null && \
                 [ ! -e /tmp/jobs/{id}.rc ] && [ $i -lt 20 ]; do sleep 0.05; i=$((i+1)); done; \
                 cat /tmp/jobs/{id}.out"
            );
            let out = self.chan.lock().unwrap().run(&probe, DEFAULT_CMD_TIMEOUT)?;
            if out.output.contains(needle) {
                return Ok(out.output);
            }
            let ended = self
                .chan
                .lock()
                .unwrap()
                .run(&format!("cat /tmp/jobs/{id}.rc"), DEFAULT_CMD_TIMEOUT)?;
            if ended.success() {
                return Err(self.logs.attach(Error::new(format!(
                    "guest job {:?} ended (status {}) without printing {needle:?}; output: {}",
                    self.cmd,
                    ended.output.trim(),
                    out.output
                ))));
            }
            if Instant::now() > deadline {
                return Err(self.logs.attach(Error::new(format!(
                    "guest job {:?} did not print {needle:?} within {timeout:?}; output: {}",
                    self.cmd, out.output
                ))));
            }
        }
    }

    /// Waits for the job to end within `timeout`; returns its output and
    /// exit status.
    pub fn wait(&self, timeout: Duration) -> Result<CmdOutput> {
        let deadline = Instant::now() + timeout;
        let id = self.id;
        loop {
            let probe = format!(
                "i=0; while [ ! -e /tmp/jobs/{id}.rc ] && [ $i -lt 20 ]; do sleep 0.05; \
                 i=$((i+1)); done; cat /tmp/jobs/{id}.rc 2>/dev/null"
            );
            let out = self.chan.lock().unwrap().run(&probe, DEFAULT_CMD_TIMEOUT)?;
            if out.success() {
                let status = out.output.trim().parse().unwrap_or(-1);
                let output = self.output()?;
                return Ok(CmdOutput { status, output });
            }
            if Instant::now() > deadline {
                let so_far = self.output().unwrap_or_default();
                return Err(self.logs.attach(Error::new(format!(
                    "guest job {:?} did not finish within {timeout:?}; output so far: {so_far}",
                    self.cmd
                ))));
            }
        }
    }
}
