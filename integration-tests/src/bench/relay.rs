//! A UDP relay on 127.0.0.1 that gives one QUIC peer its own emulated link: each direction
//! goes through the WAN emulator's model ([`crate::wan::Link`]: rate cap, queue, delay), as
//! each cloud VM has its own bandwidth. A target agent advertised at the relay's address is
//! reached only through it. One client at a time (the source agent's one endpoint).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::wan::{Fate, Impairment, Link};

/// A running relay; stops when dropped.
pub struct Relay {
    /// Where clients send.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(50);

impl Relay {
    /// Relays between clients of a new socket on 127.0.0.1 and `upstream`, each direction
    /// impaired by `imp` (seeded by `seed`).
    pub fn start(upstream: SocketAddr, imp: Impairment, seed: u64) -> io::Result<Relay> {
        let front = UdpSocket::bind("127.0.0.1:0")?;
        front.set_read_timeout(Some(POLL))?;
        let back = UdpSocket::bind("127.0.0.1:0")?;
        back.connect(upstream)?;
        back.set_read_timeout(Some(POLL))?;
        for s in [&front, &back] {
            let _ = crate::wan::sys::force_recv_buffer(s, 8 << 20);
        }
        let addr = front.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (up_tx, up_rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        let (down_tx, down_rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        let (front, back) = (Arc::new(front), Arc::new(back));
        let mut threads = Vec::new();
        // Client → upstream: admitted through the link, sent when due.
        {
            let (front, stop, client) = (front.clone(), stop.clone(), client.clone());
            let link = Link::new(imp, seed);
            threads.push(std::thread::spawn(move || {
                admit_each(&stop, link, up_tx, |buf| {
                    let (n, from) = front.recv_from(buf).ok()?;
                    *client.lock().expect("relay lock") = Some(from);
                    Some(n)
                })
            }));
        }
        {
            let (back, stop) = (back.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                send_when_due(up_rx, &stop, |p| {
                    let _ = back.send(p);
                })
            }));
        }
        // Upstream → client.
        {
            let (back, stop) = (back.clone(), stop.clone());
            let link = Link::new(imp, seed ^ 0x9E37_79B9_7F4A_7C15);
            threads.push(std::thread::spawn(move || {
                admit_each(&stop, link, down_tx, |buf| back.recv(buf).ok())
            }));
        }
        {
            let (front, stop) = (front.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                send_when_due(down_rx, &stop, |p| {
                    if let Some(c) = *client.lock().expect("relay lock") {
                        let _ = front.send_to(p, c);
                    }
                })
            }));
        }
        Ok(Relay {
            addr,
            stop,
            threads,
        })
    }
}

/// Receives packets with `recv` until stopped (`None`: nothing this time); each one `link`
/// delivers goes to `tx` with the time it is due.
fn admit_each(
    stop: &AtomicBool,
    mut link: Link,
    tx: mpsc::Sender<(Instant, Vec<u8>)>,
    mut recv: impl FnMut(&mut [u8]) -> Option<usize>,
) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let Some(n) = recv(&mut buf) else {
            continue;
        };
        if let Fate::Deliver(at) = link.admit(Instant::now(), n) {
            let _ = tx.send((at, buf[..n].to_vec()));
        }
    }
}

/// Sends each packet of `rx` at its time, in order (the link never reorders).
fn send_when_due(
    rx: mpsc::Receiver<(Instant, Vec<u8>)>,
    stop: &AtomicBool,
    mut send: impl FnMut(&[u8]),
) {
    while !stop.load(Ordering::Relaxed) {
        let Ok((at, p)) = rx.recv_timeout(POLL) else {
            continue;
        };
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        send(&p);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_both_ways_and_answers_the_client_that_sent() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let imp = Impairment {
            delay: Duration::from_millis(5),
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: Some(100_000_000),
            queue_bytes: 1 << 20,
        };
        let relay = Relay::start(server.local_addr().unwrap(), imp, 1).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let t = Instant::now();
        client.send_to(b"ping", relay.addr).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        server.send_to(b"pong", from).unwrap();
        let (n, back) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], back), (&b"pong"[..], relay.addr));
        assert!(
            t.elapsed() >= Duration::from_millis(10),
            "both delays applied"
        );
    }
}
