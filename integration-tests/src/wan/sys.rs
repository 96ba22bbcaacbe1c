//! The two system calls the emulator needs that std does not wrap: opening a TUN device and
//! moving a thread into a network namespace. Kept to this file; each `unsafe` block says why it
//! is sound.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the rest of the union unused).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 24],
}

/// Creates TUN device `name` (layer 3, no packet-info header) in the caller's namespace and
/// returns the file that reads and writes its packets. The device lives while the file is open,
/// also after it is moved into another namespace.
pub fn open_tun(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!("bad interface name {name:?}")));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 24],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `f` is an open descriptor of /dev/net/tun and `req` is a valid, initialised
    // `struct ifreq`-sized buffer that outlives the call; TUNSETIFF reads and writes only it.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// Waits until `f` is readable or `timeout` passes; true if readable.
pub fn wait_readable(f: &File, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(rc > 0 && pfd.revents & libc::POLLIN != 0)
}

/// Sets the socket's receive buffer to `bytes`, past the `rmem_max` limit (needs root, as the
/// emulator does): a measuring receiver should not drop datagrams while it is descheduled.
pub fn force_recv_buffer(sock: &std::net::UdpSocket, bytes: usize) -> io::Result<()> {
    let v = bytes as libc::c_int;
    // SAFETY: `sock` is an open socket; the option value is a valid c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread that has joined network namespace `ns` (`ip netns` name). Sockets it
/// creates stay in that namespace wherever they are used afterwards.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let path = format!("/run/netns/{ns}");
    let nsf = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    std::thread::spawn(move || {
        // SAFETY: `nsf` is an open namespace file; setns changes only this thread's network
        // namespace (the thread ends after `f`).
        let rc = unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("thread panicked"))?
}
