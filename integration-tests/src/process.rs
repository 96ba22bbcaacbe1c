//! Daemons started as real processes by the tests and the benchmarks: where they listen is read
//! back from their own log (they bind port 0), so no port is picked, released and raced for.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;

/// Removes terminal colour codes (`ESC [ ... m`) from a log.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The address in the first line of `log` that holds `message` and an `addr=` field: a daemon
/// started on port 0 says there where it listens. Waits up to `timeout` for the line, and fails
/// sooner if `exited` says the process is gone.
pub fn logged_addr(
    log: &Path,
    message: &str,
    timeout: Duration,
    mut exited: impl FnMut() -> bool,
) -> anyhow::Result<SocketAddr> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
        let found = text
            .lines()
            .filter(|l| l.contains(message))
            .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")));
        if let Some(a) = found {
            return Ok(a.parse()?);
        }
        if exited() {
            bail!("the process exited before it said {message:?}:\n{text}");
        }
        if Instant::now() > deadline {
            bail!(
                "no {message:?} line with an address in {} after {timeout:?}:\n{text}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where a `ferry-coordinator` started on port 0 serves, read from its `log` (up to a minute;
/// sooner an error if `child` exits first).
pub fn coordinator_addr(child: &mut std::process::Child, log: &Path) -> anyhow::Result<SocketAddr> {
    logged_addr(log, "Coordinator serving.", Duration::from_secs(60), || {
        !matches!(child.try_wait(), Ok(None))
    })
}

/// An address on 127.0.0.1 where nothing listens, held for as long as the value lives: its port
/// is bound but never listened on, so a connection is refused and no other socket can take it.
pub struct DeadAddr {
    _socket: tokio::net::TcpSocket,
    /// The address.
    pub addr: SocketAddr,
}

impl DeadAddr {
    /// Binds a fresh port.
    pub fn new() -> std::io::Result<Self> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse().expect("literal address"))?;
        let addr = socket.local_addr()?;
        Ok(DeadAddr {
            _socket: socket,
            addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_address_refuses_connections() {
        let dead = DeadAddr::new().unwrap();
        let err = std::net::TcpStream::connect(dead.addr).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(std::net::TcpListener::bind(dead.addr).is_err());
    }

    #[test]
    fn reads_the_address_a_daemon_logged() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(
            &log,
            "x \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m10.0.0.1:9 other\n INFO Coordinator serving. \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:4242 node_id=1\n",
        )
        .unwrap();
        let a = logged_addr(&log, "Coordinator serving.", Duration::from_secs(1), || {
            false
        });
        assert_eq!(a.unwrap(), "127.0.0.1:4242".parse().unwrap());
        let e = logged_addr(&log, "never said", Duration::from_secs(5), || true);
        assert!(e.unwrap_err().to_string().contains("exited"));
    }
}
