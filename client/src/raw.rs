//! Raw hybrid-vsock connections: `CONNECT <port>\n`, `OK <host-port>\n`,
//! then plain bytes both ways. Not resumable: a break loses the stream.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::error::ClientError;
use crate::line::{parse_raw_connect_reply, raw_connect_request, read_line};
use crate::sys;

/// An open raw connection to a guest port.
#[derive(Debug)]
pub struct RawConnection {
    /// The stream, positioned at the first byte from the guest.
    pub stream: UnixStream,
    /// The connection's port on the host side, from vsockd's reply.
    pub host_port: u32,
}

/// Connects to vsockd's hybrid socket at `uds_path` and to guest port
/// `port`. Returns once vsockd has answered `OK`; the reply is read without
/// consuming any byte after it.
pub fn connect_raw(uds_path: impl AsRef<Path>, port: u32) -> Result<RawConnection, ClientError> {
    let path = uds_path.as_ref();
    let mut stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let request = raw_connect_request(port);
    sys::send_all(stream.as_fd(), request.as_bytes()).map_err(|source| ClientError::Io {
        action: "sending CONNECT to vsockd",
        source,
    })?;
    // The stream is blocking without a timeout: the wait ends with the
    // guest's answer or vsockd closing the socket.
    let line = read_line(&mut stream, &request, || Ok(()))?;
    let host_port = parse_raw_connect_reply(&request, &line)?;
    Ok(RawConnection { stream, host_port })
}
