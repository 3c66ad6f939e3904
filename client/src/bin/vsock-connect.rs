//! `vsock-connect`: bridges standard input and output to a guest vsock
//! port through vsockd's hybrid socket, raw or as a resumable session.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;

use clap::Parser;
use vsockd_client::{connect_raw, ClientError, Options, Session, Token};

/// Copy buffer size: one full `DATA` frame.
const COPY_BUFFER_BYTES: usize = 64 << 10;

/// Bridges standard input to a guest vsock port and the guest's replies to
/// standard output, through vsockd's hybrid socket.
///
/// End of standard input shuts down the sending side (the guest reads
/// EOF). The program exits once the guest has ended its side and standard
/// output is flushed; with a resumable session, also once vsockd has
/// acknowledged everything sent, so standard input must reach its end.
#[derive(Debug, Parser)]
#[command(name = "vsock-connect", version)]
struct Args {
    /// Use a resumable session: it carries on across vsockd worker
    /// restarts and live upgrades, every byte exactly once.
    #[arg(long)]
    resumable: bool,

    /// Take over an existing resumable session, having received RECEIVED
    /// bytes of the guest's stream. Standard input continues the host's
    /// stream at the offset vsockd reports (a regular file is seeked to
    /// it).
    #[arg(long, value_name = "TOKEN:RECEIVED", value_parser = parse_resume)]
    resume: Option<(Token, u64)>,

    /// With a resumable session: print `token <hex>` on standard error once
    /// connected (and, with --resume, `resumed at <offset>`, where standard
    /// input continues). A raw connection has no token.
    #[arg(long)]
    print_token: bool,

    /// vsockd's hybrid socket (its --uds-path).
    uds_path: PathBuf,

    /// The guest port to connect to (not used with --resume).
    #[arg(required_unless_present = "resume")]
    port: Option<u32>,
}

fn parse_resume(text: &str) -> Result<(Token, u64), String> {
    let (token, received) = text
        .split_once(':')
        .ok_or_else(|| "expected TOKEN:RECEIVED".to_owned())?;
    let token = token.parse::<Token>().map_err(|err| err.to_string())?;
    let received = received
        .parse::<u64>()
        .map_err(|err| format!("RECEIVED {received:?}: {err}"))?;
    Ok((token, received))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vsock-connect: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), ClientError> {
    let stdin = stdin_file()?;
    match (args.resume, args.port) {
        (Some((token, received)), _) => {
            let session = Session::resume(&args.uds_path, token, received, Options::default())?;
            if args.print_token {
                eprintln!("token {}", session.token());
                eprintln!("resumed at {}", session.peer_received());
            }
            // A file is positioned at what vsockd lacks; a pipe is taken
            // to start there.
            let mut stdin = stdin;
            let _ = stdin.seek(SeekFrom::Start(session.peer_received()));
            bridge_session(session, stdin)
        }
        (None, Some(port)) if args.resumable => {
            let session = Session::connect(&args.uds_path, port, Options::default())?;
            if args.print_token {
                eprintln!("token {}", session.token());
            }
            bridge_session(session, stdin)
        }
        (None, Some(port)) => bridge_raw(&args.uds_path, port, stdin),
        (None, None) => missing_port(),
    }
}

/// clap requires PORT without --resume; should that change, an error.
fn missing_port() -> Result<(), ClientError> {
    Err(ClientError::Io {
        action: "reading the arguments",
        source: io::Error::new(io::ErrorKind::InvalidInput, "PORT is required"),
    })
}

/// Standard input as a file, so that it can be seeked when it is one.
fn stdin_file() -> Result<File, ClientError> {
    let fd = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| ClientError::Io {
            action: "duplicating standard input",
            source,
        })?;
    Ok(File::from(fd))
}

fn bridge_raw(uds_path: &std::path::Path, port: u32, mut stdin: File) -> Result<(), ClientError> {
    let connection = connect_raw(uds_path, port)?;
    let stream = &connection.stream;
    // The upload thread is not joined: the program ends once the guest
    // has ended its side, whether or not standard input has.
    thread::spawn({
        let stream = stream.try_clone().map_err(|source| ClientError::Io {
            action: "duplicating the socket",
            source,
        })?;
        move || {
            let sent = copy(
                &mut stdin,
                &mut &stream,
                "reading standard input",
                "sending to vsockd",
            );
            let _ = stream.shutdown(Shutdown::Write);
            sent
        }
    });
    copy(
        &mut &*stream,
        &mut io::stdout().lock(),
        "reading from vsockd",
        "writing standard output",
    )?;
    flush_stdout()
}

fn bridge_session(session: Session, mut stdin: File) -> Result<(), ClientError> {
    thread::scope(|scope| {
        let upload = scope.spawn(|| {
            copy(
                &mut stdin,
                &mut &session,
                "reading standard input",
                "sending to the session",
            )?;
            session.shutdown_write()
        });
        copy(
            &mut &session,
            &mut io::stdout().lock(),
            "reading the session",
            "writing standard output",
        )?;
        flush_stdout()?;
        upload.join().unwrap_or_else(|_| {
            Err(ClientError::Io {
                action: "sending standard input",
                source: io::Error::other("the upload thread panicked"),
            })
        })
    })?;
    session.close()
}

/// Copies `from` to `to` until `from` ends; errors are named by the
/// actions given (or are the session's own).
fn copy(
    from: &mut impl Read,
    to: &mut impl Write,
    reading: &'static str,
    writing: &'static str,
) -> Result<(), ClientError> {
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    loop {
        let count = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(count) => count,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(client_error(reading, source)),
        };
        to.write_all(&buf[..count])
            .map_err(|source| client_error(writing, source))?;
    }
}

fn flush_stdout() -> Result<(), ClientError> {
    io::stdout().flush().map_err(|source| ClientError::Io {
        action: "writing standard output",
        source,
    })
}

/// The session's own error when `source` carries one.
fn client_error(action: &'static str, source: io::Error) -> ClientError {
    match source.downcast::<ClientError>() {
        Ok(err) => err,
        Err(source) => ClientError::Io { action, source },
    }
}
