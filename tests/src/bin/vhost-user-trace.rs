//! vhost-user-trace: relays vhost-user connections from a VMM to a
//! backend and logs every message (request, flags, size, fds, decoded
//! payload).
//!
//! Usage: vhost-user-trace LISTEN_SOCKET BACKEND_SOCKET [LOG_FILE]
//!
//! Point the VMM at LISTEN_SOCKET. The log goes to LOG_FILE, or to
//! standard error when none is given. Runs until killed.

use std::path::PathBuf;
use std::process::exit;

use vsockd_tests::trace::Proxy;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 3 {
        eprintln!("usage: vhost-user-trace LISTEN_SOCKET BACKEND_SOCKET [LOG_FILE]");
        exit(64);
    }
    let log = args
        .get(2)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/stderr"));
    match Proxy::start(args[0].as_ref(), args[1].as_ref(), &log) {
        Ok(_proxy) => loop {
            std::thread::park();
        },
        Err(e) => {
            eprintln!("vhost-user-trace: {e}");
            exit(1);
        }
    }
}
