//! vsock-probe: opens vsock (guest) or hybrid Unix (host) connections and
//! runs verified exchanges over them, printing one `RESULT` line per
//! connection. Exits 0 only when every connection succeeded.
//!
//! Usage:
//!   vsock-probe [--timeout SECS] cid
//!   vsock-probe [--timeout SECS] listen PORT [--delay-accept MS] [--count N] [--seed-step K] MODE
//!   vsock-probe [--timeout SECS] connect CID PORT [--parallel N] [--repeat N] MODE
//!
//! `listen unix:PATH` listens on a Unix socket and `connect unix:UDS PORT`
//! opens a hybrid connection (`CONNECT PORT`) through a backend's Unix
//! socket: the host-side counterparts of the vsock forms.
//!
//! MODE is one of:
//!   sendv BYTES SEED             send a verified stream, SHUT_WR, wait for EOF or reset
//!   recvv BYTES SEED             receive and verify exactly BYTES, then EOF
//!   bidiv BYTES SEED             send stream SEED, receive stream !SEED
//!   echo                         echo until EOF
//!   halfclose-writer BYTES SEED  send SEED, SHUT_WR, then receive !SEED until EOF
//!   halfclose-reader BYTES SEED  receive SEED until EOF, then send !SEED
//!   expect-error                 connect must fail; prints the errno name
//!   message TEXT...              send TEXT as a line, print the line the peer sends
//!   chaos SEED                   send SEED until the peer half-closes, receive !SEED
//!                                tolerating lost or repeated chunks (reported)
//!
//! With `--parallel N`, N connections run at once, connection i with seed
//! SEED+i; with `--repeat N`, N connections run one after another, seeds
//! likewise (a failed one does not stop the rest). With `--count N`, the
//! listener serves N connections, connection i with seed SEED+i×K given
//! `--seed-step K` (default 0: every one uses SEED).
//! Output lines: `LISTENING port=P`, `ACCEPTED conn=I cid=C port=P`,
//! `RESULT conn=I sent=N received=N ok=yes|no first_bad=-1|OFF errno=-|NAME op=-|OP end=-|eof|reset`,
//! `ERROR conn=I errno=NAME op=OP ...`, `CID N`.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::process::exit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vsockd_tests::errno::io_error_name;
use vsockd_tests::hybrid::hybrid_connect_timeout;
use vsockd_tests::sock::{local_cid, Sock, VsockListener};
use vsockd_tests::stream::{parse_u64, run_mode, Mode, OpError, Outcome};

struct Opts {
    timeout: Duration,
    delay_accept: Duration,
    count: u64,
    seed_step: u64,
    parallel: u64,
    repeat: u64,
    pos: Vec<String>,
}

fn usage(msg: &str) -> ! {
    eprintln!("vsock-probe: {msg}");
    eprintln!(
        "usage: vsock-probe [--timeout SECS] (cid | listen PORT|unix:PATH [--delay-accept MS] \
         [--count N] [--seed-step K] MODE | connect CID|unix:UDS PORT [--parallel N] \
         [--repeat N] MODE)"
    );
    exit(64)
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        timeout: Duration::from_secs(60),
        delay_accept: Duration::ZERO,
        count: 1,
        seed_step: 0,
        parallel: 1,
        repeat: 1,
        pos: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if let Some(name) = a.strip_prefix("--") {
            let v = args
                .next()
                .unwrap_or_else(|| usage(&format!("--{name} needs a value")));
            let n = parse_u64(&v).unwrap_or_else(|| usage(&format!("bad number {v:?}")));
            match name {
                "timeout" => o.timeout = Duration::from_secs(n),
                "delay-accept" => o.delay_accept = Duration::from_millis(n),
                "count" => o.count = n.max(1),
                "seed-step" => o.seed_step = n,
                "parallel" => o.parallel = n.max(1),
                "repeat" => o.repeat = n.max(1),
                _ => usage(&format!("unknown option --{name}")),
            }
        } else {
            o.pos.push(a);
        }
    }
    o
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn report(conn: u64, o: &Outcome) -> bool {
    if let Some(m) = &o.message {
        say(&format!("MESSAGE conn={conn} text={m:?}"));
    }
    if let Some(l) = o.error_line(conn) {
        say(&l);
    }
    say(&o.result_line(conn));
    o.ok
}

fn serve(conn: u64, sock: Sock, mode: &Mode, timeout: Duration) -> bool {
    let _ = sock.set_timeouts(Some(timeout));
    report(conn, &run_mode(&sock, mode))
}

fn watchdog(timeout: Duration) {
    thread::spawn(move || {
        thread::sleep(timeout + Duration::from_secs(5));
        say("ERROR conn=- errno=ETIMEDOUT op=watchdog");
        exit(2);
    });
}

fn listen(o: &Opts, mode: &Mode) -> bool {
    let target = &o.pos[1];
    enum L {
        V(VsockListener),
        U(UnixListener),
    }
    let l = if let Some(path) = target.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        match UnixListener::bind(path) {
            Ok(l) => L::U(l),
            Err(e) => {
                say(&format!("ERROR conn=- errno={} op=bind", io_error_name(&e)));
                return false;
            }
        }
    } else {
        let port = parse_u64(target).unwrap_or_else(|| usage("bad PORT")) as u32;
        match VsockListener::bind(port) {
            Ok(l) => L::V(l),
            Err(e) => {
                say(&format!("ERROR conn=- errno={} op=bind", io_error_name(&e)));
                return false;
            }
        }
    };
    say(&format!("LISTENING port={target}"));
    if !o.delay_accept.is_zero() {
        thread::sleep(o.delay_accept);
    }
    let all_ok = Arc::new(AtomicBool::new(true));
    let mut threads = Vec::new();
    for i in 0..o.count {
        let accepted = match &l {
            L::V(l) => l.accept().map(|(s, cid, port)| {
                say(&format!("ACCEPTED conn={i} cid={cid} port={port}"));
                s
            }),
            L::U(l) => l.accept().map(|(s, _)| {
                say(&format!("ACCEPTED conn={i}"));
                Sock::from(s)
            }),
        };
        let sock = match accepted {
            Ok(s) => s,
            Err(e) => {
                say(&format!(
                    "ERROR conn={i} errno={} op=accept",
                    io_error_name(&e)
                ));
                all_ok.store(false, Ordering::SeqCst);
                break;
            }
        };
        let mode = mode.for_conn(i.wrapping_mul(o.seed_step));
        let all_ok = all_ok.clone();
        let timeout = o.timeout;
        threads.push(thread::spawn(move || {
            if !serve(i, sock, &mode, timeout) {
                all_ok.store(false, Ordering::SeqCst);
            }
        }));
    }
    for t in threads {
        if t.join().is_err() {
            all_ok.store(false, Ordering::SeqCst);
        }
    }
    all_ok.load(Ordering::SeqCst)
}

fn connect_one(target: &str, port: u32, timeout: Duration) -> std::io::Result<Sock> {
    if let Some(uds) = target.strip_prefix("unix:") {
        let (s, _) = hybrid_connect_timeout(uds, port, timeout)?;
        Ok(Sock::from(s))
    } else {
        let cid = parse_u64(target).unwrap_or_else(|| usage("bad CID")) as u32;
        Sock::vsock_connect(cid, port)
    }
}

/// Opens connection `i` and runs `mode` on it; reports it.
fn connect_and_serve(i: u64, target: &str, port: u32, mode: &Mode, timeout: Duration) -> bool {
    match connect_one(target, port, timeout) {
        Ok(sock) => {
            if *mode == Mode::ExpectError {
                let out = Outcome::default();
                say(&format!("{} connected=yes", out.result_line(i)));
                false
            } else {
                serve(i, sock, mode, timeout)
            }
        }
        Err(e) => {
            let out = Outcome {
                error: Some(OpError::new("connect", &e)),
                ok: *mode == Mode::ExpectError,
                ..Outcome::default()
            };
            if *mode == Mode::ExpectError {
                say(&out.result_line(i));
                true
            } else {
                report(i, &out)
            }
        }
    }
}

fn connect(o: &Opts, mode: &Mode) -> bool {
    if o.pos.len() < 3 {
        usage("connect needs CID PORT MODE");
    }
    let target = o.pos[1].clone();
    let port = parse_u64(&o.pos[2]).unwrap_or_else(|| usage("bad PORT")) as u32;
    let mut threads = Vec::new();
    for p in 0..o.parallel {
        let (mode, target, timeout, repeat) = (mode.clone(), target.clone(), o.timeout, o.repeat);
        threads.push(thread::spawn(move || {
            let mut ok = true;
            for r in 0..repeat {
                let i = p * repeat + r;
                ok &= connect_and_serve(i, &target, port, &mode.for_conn(i), timeout);
            }
            ok
        }));
    }
    let mut ok = true;
    for t in threads {
        ok &= t.join().unwrap_or(false);
    }
    ok
}

fn main() {
    let o = parse_opts();
    let cmd = o
        .pos
        .first()
        .cloned()
        .unwrap_or_else(|| usage("missing command"));
    watchdog(o.timeout);
    let ok = match cmd.as_str() {
        "cid" => match local_cid() {
            Ok(c) => {
                say(&format!("CID {c}"));
                true
            }
            Err(e) => {
                say(&format!("ERROR conn=- errno={} op=cid", io_error_name(&e)));
                false
            }
        },
        "listen" => {
            if o.pos.len() < 3 {
                usage("listen needs PORT MODE");
            }
            let mode = Mode::parse(&o.pos[2..]).unwrap_or_else(|e| usage(&e));
            if mode == Mode::ExpectError {
                usage("expect-error is for connect");
            }
            listen(&o, &mode)
        }
        "connect" => {
            let mode = Mode::parse(o.pos.get(3..).unwrap_or(&[])).unwrap_or_else(|e| usage(&e));
            connect(&o, &mode)
        }
        other => usage(&format!("unknown command {other:?}")),
    };
    exit(if ok { 0 } else { 1 });
}
