//! systemd's readiness protocol (`Type=notify`): READY, RELOADING and STOPPING sent as one
//! datagram to `$NOTIFY_SOCKET`. Without that variable (not under systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Send `state` (e.g. "READY=1") to systemd, if it is listening. Failures are logged, never
/// fatal: the proxy works the same without a supervisor.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket (Linux).
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)?;
                return Ok(());
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = name;
                return Err(std::io::Error::other("abstract sockets need Linux"));
            }
        }
        socket.send_to(state.as_bytes(), &path)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        // The variable is process-wide: set and read it in this one test only.
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify("READY=1\nSTATUS=listening");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=listening");
    }
}
