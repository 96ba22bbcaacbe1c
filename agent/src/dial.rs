//! The source's edge to its targets: dialing a target agent and opening one stream per segment.
//!
//! Trait modelling the dialer, so the source's sending logic tests without sockets:
//! [`QuicDialer`] is the real one (quinn, mutual TLS, one cached connection per target), and
//! [`testing::MemDialer`] connects streams in memory to whatever a test serves them with.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ferry_common::names::agent_dns;
use tokio::io::{AsyncRead, AsyncWrite};

/// Dialing a target or opening a stream to it failed: the target cannot be reached now, which
/// is never the segment's fault (the segment is retried later without counting an attempt).
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The target's advertised address is not an address: the target must register again.
    #[error("target address {addr:?}: {reason}")]
    Address {
        /// What the coordinator gave.
        addr: String,
        /// Why it is not usable.
        reason: String,
    },
    /// The connection could not be started (the endpoint is closed or misconfigured).
    #[error("cannot dial {target} at {addr}: {source}")]
    Dial {
        /// The target agent.
        target: String,
        /// Its address.
        addr: String,
        /// quinn's reason.
        source: quinn::ConnectError,
    },
    /// The handshake failed: the target is down, unreachable, or not who it should be.
    #[error("cannot connect to {target} at {addr}: {source}")]
    Connect {
        /// The target agent.
        target: String,
        /// Its address.
        addr: String,
        /// quinn's reason.
        source: quinn::ConnectionError,
    },
    /// The connection is up but no stream could be opened (it was lost meanwhile).
    #[error("cannot open a stream to {target}: {reason}")]
    Open {
        /// The target agent.
        target: String,
        /// Why.
        reason: String,
    },
}

/// The sending half of a segment's stream.
pub trait SendHalf: AsyncWrite + Unpin + Send {
    /// Ends the stream cleanly after what was written.
    fn finish(&mut self) -> std::io::Result<()>;
    /// Abandons the stream: the peer's reads fail with `code`.
    fn reset(&mut self, code: u32);
}

/// A connection to one target agent.
pub trait Connection: Clone + Send + Sync + 'static {
    /// The sending half of a stream.
    type Send: SendHalf + 'static;
    /// The receiving half of a stream.
    type Recv: AsyncRead + Unpin + Send + 'static;
    /// Opens a stream for one segment.
    fn open(&self) -> impl Future<Output = Result<(Self::Send, Self::Recv), DialError>> + Send;
    /// Why the connection is closed, if it is: a stream failure on a closed connection is not
    /// the segment's failure.
    fn close_reason(&self) -> Option<String>;
    /// The bytes the congestion controller lets be in flight now (0 when it has none).
    fn congestion_window(&self) -> u64 {
        0
    }
}

/// Trait modelling a dialer of target agents. This allows for IO-less testing.
pub trait Dialer: Send + Sync + 'static {
    /// The connections it makes.
    type Conn: Connection;
    /// A connection to agent `target` at `addr` (`ip:port`), reused while it is open.
    fn connect(
        &self,
        target: &str,
        addr: &str,
    ) -> impl Future<Output = Result<Self::Conn, DialError>> + Send;
    /// Closes every connection (the agent stops).
    fn close(&self);
}

/// The data connections a [`QuicDialer`] keeps open, per (target name, address); shared with
/// whoever reads their path figures (the metrics).
#[derive(Debug, Clone, Default)]
pub struct Connections(Arc<Mutex<HashMap<(String, String), quinn::Connection>>>);

impl Connections {
    /// Each open connection's target name and path figures (round-trip time, congestion
    /// window, losses), by target name.
    pub fn paths(&self) -> Vec<(String, quinn::ConnectionStats)> {
        let mut out: Vec<_> = self
            .0
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .map(|((name, _), c)| (name.clone(), c.stats()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// The real dialer: QUIC with mutual TLS, the target's certificate checked for its agent name.
pub struct QuicDialer {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    /// Open connections per (target name, address).
    conns: Connections,
}

impl QuicDialer {
    /// Dials from `endpoint` with `config`, keeping its connections in `conns`.
    pub fn new(endpoint: quinn::Endpoint, config: quinn::ClientConfig, conns: Connections) -> Self {
        QuicDialer {
            endpoint,
            config,
            conns,
        }
    }
}

impl Dialer for QuicDialer {
    type Conn = QuicConn;

    async fn connect(&self, target: &str, addr: &str) -> Result<QuicConn, DialError> {
        let key = (target.to_string(), addr.to_string());
        if let Some(c) = self.conns.0.lock().expect("not poisoned").get(&key) {
            if c.close_reason().is_none() {
                return Ok(QuicConn(c.clone(), target.to_string()));
            }
        }
        let sock: SocketAddr =
            addr.parse()
                .map_err(|e: std::net::AddrParseError| DialError::Address {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?;
        let conn = self
            .endpoint
            .connect_with(self.config.clone(), sock, &agent_dns(target))
            .map_err(|source| DialError::Dial {
                target: target.to_string(),
                addr: addr.to_string(),
                source,
            })?
            .await
            .map_err(|source| DialError::Connect {
                target: target.to_string(),
                addr: addr.to_string(),
                source,
            })?;
        self.conns
            .0
            .lock()
            .expect("not poisoned")
            .insert(key, conn.clone());
        Ok(QuicConn(conn, target.to_string()))
    }

    fn close(&self) {
        self.endpoint.close(0u32.into(), b"agent shutting down");
    }
}

/// A QUIC connection to a target, with the target's name (for messages).
#[derive(Clone)]
pub struct QuicConn(quinn::Connection, String);

impl Connection for QuicConn {
    type Send = quinn::SendStream;
    type Recv = quinn::RecvStream;

    async fn open(&self) -> Result<(quinn::SendStream, quinn::RecvStream), DialError> {
        self.0.open_bi().await.map_err(|e| DialError::Open {
            target: self.1.clone(),
            reason: e.to_string(),
        })
    }

    fn close_reason(&self) -> Option<String> {
        self.0.close_reason().map(|r| r.to_string())
    }

    fn congestion_window(&self) -> u64 {
        self.0.stats().path.cwnd
    }
}

impl SendHalf for quinn::SendStream {
    fn finish(&mut self) -> std::io::Result<()> {
        quinn::SendStream::finish(self).map_err(std::io::Error::other)
    }

    fn reset(&mut self, code: u32) {
        let _ = quinn::SendStream::reset(self, code.into());
    }
}

/// In-memory fakes of the dialer's seam, for tests of the source without sockets.
pub mod testing {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
    use tokio::sync::mpsc;

    use super::*;

    /// One stream a source opened, as the fake target sees it: read the source's bytes from
    /// `recv`, answer on `send`.
    pub struct Accepted {
        /// The target agent dialed.
        pub target: String,
        /// What the source sends.
        pub recv: ReadHalf<DuplexStream>,
        /// What the source reads.
        pub send: WriteHalf<DuplexStream>,
    }

    /// A dialer whose streams arrive, in memory, on the receiver [`MemDialer::new`] returns.
    /// Dialing fails while [`MemDialer::set_reachable`] says so.
    pub struct MemDialer {
        accept: mpsc::UnboundedSender<Accepted>,
        reachable: Arc<AtomicBool>,
        closed: Arc<AtomicBool>,
    }

    impl MemDialer {
        /// A dialer, and where the streams it opens arrive.
        pub fn new() -> (Self, mpsc::UnboundedReceiver<Accepted>) {
            let (accept, rx) = mpsc::unbounded_channel();
            let d = MemDialer {
                accept,
                reachable: Arc::new(AtomicBool::new(true)),
                closed: Arc::default(),
            };
            (d, rx)
        }

        /// Whether targets can be dialed.
        pub fn set_reachable(&self, yes: bool) {
            self.reachable.store(yes, Ordering::SeqCst);
        }

        /// Whether [`Dialer::close`] was called.
        pub fn closed(&self) -> bool {
            self.closed.load(Ordering::SeqCst)
        }
    }

    impl Dialer for MemDialer {
        type Conn = MemConn;

        async fn connect(&self, target: &str, addr: &str) -> Result<MemConn, DialError> {
            if !self.reachable.load(Ordering::SeqCst) || self.closed() {
                return Err(DialError::Open {
                    target: target.to_string(),
                    reason: format!("{addr} unreachable (test)"),
                });
            }
            Ok(MemConn {
                target: target.to_string(),
                accept: self.accept.clone(),
            })
        }

        fn close(&self) {
            self.closed.store(true, Ordering::SeqCst);
        }
    }

    /// A fake connection: each stream is a pair of in-memory pipes.
    #[derive(Clone)]
    pub struct MemConn {
        target: String,
        accept: mpsc::UnboundedSender<Accepted>,
    }

    impl Connection for MemConn {
        type Send = MemSend;
        type Recv = ReadHalf<DuplexStream>;

        async fn open(&self) -> Result<(MemSend, ReadHalf<DuplexStream>), DialError> {
            // 1 MiB of buffer each way, like a stream's window.
            let (ours, theirs) = tokio::io::duplex(1 << 20);
            let (our_recv, our_send) = tokio::io::split(ours);
            let (their_recv, their_send) = tokio::io::split(theirs);
            self.accept
                .send(Accepted {
                    target: self.target.clone(),
                    recv: their_recv,
                    send: their_send,
                })
                .map_err(|_| DialError::Open {
                    target: self.target.clone(),
                    reason: "fake target gone".into(),
                })?;
            Ok((MemSend(our_send), our_recv))
        }

        fn close_reason(&self) -> Option<String> {
            self.accept.is_closed().then(|| "fake target gone".into())
        }
    }

    /// The sending half of a fake stream; finishing or resetting it ends what the peer reads.
    pub struct MemSend(WriteHalf<DuplexStream>);

    impl AsyncWrite for MemSend {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    impl SendHalf for MemSend {
        fn finish(&mut self) -> std::io::Result<()> {
            // The duplex pipe has no end marker of its own; the segment's trailer frame ends
            // what the fake target reads.
            Ok(())
        }

        fn reset(&mut self, _code: u32) {}
    }
}
