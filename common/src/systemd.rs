//! systemd readiness and watchdog notifications (`Type=notify`), without a C library: a datagram
//! to `$NOTIFY_SOCKET`. Does nothing when not run by systemd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` (e.g. `READY=1`) to systemd, if it is listening. Errors are ignored: a missing
/// notification only delays systemd's view of the service, it never changes ferry's behaviour.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name) {
            let _ = sock.send_to_addr(state.as_bytes(), &addr);
        }
    } else {
        let _ = sock.send_to(state.as_bytes(), &path);
    }
}

/// The interval at which to send `WATCHDOG=1` (half of `$WATCHDOG_USEC`), if the watchdog is on.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    Some(Duration::from_micros(usec / 2))
}

/// How often a daemon tells systemd its status line (`systemctl status` shows the last).
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Waits for SIGTERM or SIGINT, feeding the systemd watchdog meanwhile and sending `status()`
/// as `STATUS=` at once and every [`STATUS_EVERY`]; on SIGHUP calls `on_hangup` (the daemon
/// reloads what it can) and goes on waiting.
pub async fn wait_for_signal(
    mut on_hangup: impl FnMut(),
    mut status: impl FnMut() -> String,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let period = watchdog_interval();
    let mut tick = tokio::time::interval(period.unwrap_or(Duration::from_secs(3600)));
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    loop {
        tokio::select! {
            _ = status_tick.tick() => notify(&format!("STATUS={}", status())),
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config.");
                notify("RELOADING=1");
                on_hangup();
                notify("READY=1");
            }
            _ = tick.tick() => if period.is_some() { notify("WATCHDOG=1") },
        }
    }
}
