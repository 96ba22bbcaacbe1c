//! Probing the network path between two agents (`ferryctl probe SRC DST`), over the same QUIC
//! endpoint and TLS as the data plane but its own protocol ([`PROBE_ALPN`]):
//!
//! - **round-trip time**: pings echoed on a control stream before any load (median, min, max);
//! - **throughput**: for each congestion controller asked for (one connection each, the agent's
//!   window), runs of 1, 2, 4 … up to N parallel streams, each streaming bytes for its share of
//!   the probe's time; the target counts what arrived and says so at the end of each stream, so
//!   a run's rate is bytes the target holds over the time until it said so;
//! - **loss**: before any load, [`LOSS_DATAGRAMS`] QUIC datagrams of a packet each, paced at
//!   [`LOSS_RATE`] (and by the congestion controller), against those the target counted: the
//!   path's own one-way loss, not what a flood makes of a queue;
//! - **loss under load**: UDP datagrams the throughput runs sent against those the target
//!   received — congestion drops (a queue, a receiver's socket buffer) included.
//!
//! The target answers only probes the coordinator told it to expect (a job naming the prober),
//! one at a time, and only from the prober's certificate; it reads and drops the bytes.
//! [`summarize`] and [`stream_counts`] are the pure parts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_common::names::agent_dns;
use ferry_common::tls::{cert_is_for, TlsMaterial, PROBE_ALPN};
use ferry_common::transport::{Congestion, Transport};
use ferry_proto::data as pb;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::frame;

/// Pings for the round-trip time.
pub const PINGS: usize = 21;
/// Datagrams that measure the loss: at 1 % loss, 300 are lost on average, and a measure off by
/// a fifth is over three standard deviations away.
pub const LOSS_DATAGRAMS: u64 = 30_000;
/// Their pace, per second (about 90 Mbit/s of 1,200-byte packets; the congestion controller
/// slows them on a thinner path).
pub const LOSS_RATE: u64 = 10_000;
/// The longest the loss measure takes (a thin path sends fewer datagrams).
pub const LOSS_TIME: Duration = Duration::from_secs(8);
/// How long a target waits for the coordinator to tell it of a probe that arrived first.
pub const EXPECT_WAIT: Duration = Duration::from_secs(10);
/// The longest a target answers one probe connection.
pub const MAX_ANSWER: Duration = Duration::from_secs(900);
/// How long a step of the protocol (a reply, the end of a stream) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The size of the chunks a run writes.
const CHUNK: usize = 64 << 10;

/// Probes a target agent must answer now: job id → the agent that probes.
pub type Expected = BTreeMap<u64, String>;

/// A probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The peer cannot be reached or the connection failed.
    #[error("cannot probe {peer} at {addr}: {reason}")]
    Connect {
        /// The peer agent.
        peer: String,
        /// Its data address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The peer refused the probe.
    #[error("{peer} refused the probe: {reason}")]
    Refused {
        /// The peer agent.
        peer: String,
        /// Its reason.
        reason: String,
    },
    /// The exchange failed midway.
    #[error("probe of {peer} failed: {reason}")]
    Failed {
        /// The peer agent.
        peer: String,
        /// Why.
        reason: String,
    },
}

/// What a probe asks for.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    /// The job's id (the target checks it was told of it).
    pub job: u64,
    /// The agent that answers.
    pub peer: String,
    /// Its data address.
    pub addr: SocketAddr,
    /// Seconds in all for the throughput runs.
    pub seconds: u32,
    /// Up to this many parallel streams.
    pub streams: u32,
    /// The controllers to try (in this order).
    pub congestions: Vec<Congestion>,
    /// The receive window of each connection (the agent's configured one).
    pub window: u64,
}

/// One throughput run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeRun {
    /// The congestion controller.
    pub congestion: String,
    /// Parallel streams.
    pub streams: u32,
    /// From its first byte to the target's last count.
    pub seconds: f64,
    /// Bytes the target received.
    pub bytes: u64,
    /// `bytes / seconds`.
    pub bytes_per_sec: f64,
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The agent that probed.
    pub from: String,
    /// The agent that answered.
    pub to: String,
    /// Median, smallest and largest round-trip time of the pings, in milliseconds.
    pub rtt_ms: f64,
    /// Smallest.
    pub rtt_min_ms: f64,
    /// Largest.
    pub rtt_max_ms: f64,
    /// Datagrams (a packet each) the paced loss measure sent, and how many never arrived.
    pub packets_sent: u64,
    /// Lost.
    pub packets_lost: u64,
    /// `packets_lost / packets_sent` (0 when nothing was sent): the path's one-way loss.
    pub loss: f64,
    /// The UDP datagrams the throughput runs sent, and the share that never arrived (line
    /// loss, queues overflowing, a receiver not keeping up).
    pub load_packets_sent: u64,
    /// Their loss.
    pub load_loss: f64,
    /// Each throughput run, in the order run.
    pub runs: Vec<ProbeRun>,
    /// The fastest run.
    pub best: Option<ProbeRun>,
}

/// The stream counts to try up to `max`: powers of two, and `max` itself.
pub fn stream_counts(max: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut n = 1;
    while n < max {
        out.push(n);
        n *= 2;
    }
    out.push(max.max(1));
    out
}

/// Sent and received counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sent.
    pub sent: u64,
    /// Received (more than sent counts as all).
    pub received: u64,
}

impl Counts {
    fn lost(self) -> u64 {
        self.sent.saturating_sub(self.received)
    }

    fn share_lost(self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            self.lost() as f64 / self.sent as f64
        }
    }
}

/// Folds pings (round-trip samples), the paced loss measure, the throughput runs' datagram
/// counts and the runs into a result.
pub fn summarize(
    from: &str,
    to: &str,
    mut pings: Vec<Duration>,
    paced: Counts,
    load: Counts,
    runs: Vec<ProbeRun>,
) -> ProbeResult {
    pings.sort();
    let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let best = runs
        .iter()
        .max_by(|a, b| a.bytes_per_sec.total_cmp(&b.bytes_per_sec))
        .cloned();
    ProbeResult {
        from: from.to_string(),
        to: to.to_string(),
        rtt_ms: ms(pings.get(pings.len() / 2)),
        rtt_min_ms: ms(pings.first()),
        rtt_max_ms: ms(pings.last()),
        packets_sent: paced.sent,
        packets_lost: paced.lost(),
        loss: paced.share_lost(),
        load_packets_sent: load.sent,
        load_loss: load.share_lost(),
        runs,
        best,
    }
}

/// Runs a probe from `endpoint` (the agent's client endpoint) as agent `me`.
pub async fn probe(
    endpoint: &quinn::Endpoint,
    tls: &TlsMaterial,
    me: &str,
    spec: &ProbeSpec,
) -> Result<ProbeResult, ProbeError> {
    let counts = stream_counts(spec.streams);
    let runs_total = (counts.len() * spec.congestions.len()).max(1) as u32;
    let per_run =
        Duration::from_secs_f64((f64::from(spec.seconds) / f64::from(runs_total)).max(1.0));
    let mut pings = Vec::new();
    let mut paced = Counts::default();
    let mut load = Counts::default();
    let mut runs = Vec::new();
    for (i, &cc) in spec.congestions.iter().enumerate() {
        let mut c = Connected::open(endpoint, tls, spec, cc).await?;
        if i == 0 {
            for n in 0..PINGS as u64 {
                pings.push(c.ping(n).await?);
            }
            paced = c.paced_loss(LOSS_DATAGRAMS, LOSS_RATE, LOSS_TIME).await?;
        }
        let before = c.udp_counts().await?;
        for &streams in &counts {
            runs.push(c.run(cc, streams, per_run).await?);
        }
        let after = c.udp_counts().await?;
        load.sent += after.sent - before.sent;
        load.received += after.received.saturating_sub(before.received);
        c.conn.close(0u32.into(), b"probe done");
    }
    Ok(summarize(me, &spec.peer, pings, paced, load, runs))
}

/// A probe connection, its control stream open and the probe accepted.
struct Connected {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    peer: String,
}

impl Connected {
    async fn open(
        endpoint: &quinn::Endpoint,
        tls: &TlsMaterial,
        spec: &ProbeSpec,
        cc: Congestion,
    ) -> Result<Self, ProbeError> {
        let connect_err = |reason: String| ProbeError::Connect {
            peer: spec.peer.clone(),
            addr: spec.addr.to_string(),
            reason,
        };
        let transport = Transport {
            congestion: cc,
            window: spec.window,
        };
        let config = tls
            .quic_client_speaking(PROBE_ALPN, &transport)
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = endpoint
            .connect_with(config, spec.addr, &agent_dns(&spec.peer))
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let mut c = Connected {
            conn,
            send,
            recv,
            peer: spec.peer.clone(),
        };
        let reply = c
            .ask(&pb::ProbeRequest {
                job: spec.job,
                ..Default::default()
            })
            .await?;
        if !reply.ok {
            return Err(ProbeError::Refused {
                peer: spec.peer.clone(),
                reason: reply.error,
            });
        }
        Ok(c)
    }

    fn failed(&self, reason: impl std::fmt::Display) -> ProbeError {
        ProbeError::Failed {
            peer: self.peer.clone(),
            reason: reason.to_string(),
        }
    }

    async fn ask(&mut self, req: &pb::ProbeRequest) -> Result<pb::ProbeReply, ProbeError> {
        let exchange = async {
            frame::write(&mut self.send, req).await?;
            frame::read::<pb::ProbeReply, _>(&mut self.recv, frame::MAX_SMALL_FRAME).await
        };
        match tokio::time::timeout(STEP_TIMEOUT, exchange).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => Err(self.failed("no reply within 30 s")),
        }
    }

    async fn ping(&mut self, n: u64) -> Result<Duration, ProbeError> {
        let t = Instant::now();
        let reply = self
            .ask(&pb::ProbeRequest {
                ping: n + 1,
                ..Default::default()
            })
            .await?;
        if reply.ping != n + 1 {
            return Err(self.failed(format!("ping {} answered as {}", n + 1, reply.ping)));
        }
        Ok(t.elapsed())
    }

    /// Streams bytes on `streams` streams for `time`; the rate is what the target counted.
    async fn run(
        &mut self,
        cc: Congestion,
        streams: u32,
        time: Duration,
    ) -> Result<ProbeRun, ProbeError> {
        let start = Instant::now();
        let until = start + time;
        let chunk = Bytes::from(vec![0u8; CHUNK]);
        let mut tasks = JoinSet::new();
        for _ in 0..streams {
            let conn = self.conn.clone();
            let chunk = chunk.clone();
            tasks.spawn(async move {
                let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                while Instant::now() < until {
                    send.write_chunk(chunk.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                }
                send.finish().map_err(|e| e.to_string())?;
                let mut count = [0u8; 8];
                tokio::time::timeout(STEP_TIMEOUT, recv.read_exact(&mut count))
                    .await
                    .map_err(|_| "the target did not count a stream within 30 s".to_string())?
                    .map_err(|e| e.to_string())?;
                Ok::<u64, String>(u64::from_be_bytes(count))
            });
        }
        let mut bytes = 0u64;
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(n)) => bytes += n,
                Ok(Err(e)) => return Err(self.failed(e)),
                Err(e) => return Err(self.failed(e)),
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        Ok(ProbeRun {
            congestion: cc.to_string(),
            streams,
            seconds,
            bytes,
            bytes_per_sec: bytes as f64 / seconds.max(1e-9),
        })
    }

    /// The target's counts.
    async fn count(&mut self) -> Result<pb::ProbeReply, ProbeError> {
        self.ask(&pb::ProbeRequest {
            count: true,
            ..Default::default()
        })
        .await
    }

    /// UDP datagrams this connection sent, and those the target's received, so far.
    async fn udp_counts(&mut self) -> Result<Counts, ProbeError> {
        // Taken before the request: the request's own datagrams count at the target only, so
        // the loss is never overstated by them.
        let sent = self.conn.stats().udp_tx.datagrams;
        let received = self.count().await?.udp_datagrams;
        Ok(Counts { sent, received })
    }

    /// Sends up to `n` datagrams of a packet each at `per_sec` (for at most `limit`), waits for
    /// stragglers, and counts what the target received.
    async fn paced_loss(
        &mut self,
        n: u64,
        per_sec: u64,
        limit: Duration,
    ) -> Result<Counts, ProbeError> {
        let Some(size) = self.conn.max_datagram_size() else {
            return Err(self.failed("the peer takes no QUIC datagrams"));
        };
        // Above half the smallest packet: never two in one packet, so a lost packet is one lost
        // datagram.
        let payload = Bytes::from(vec![0u8; size.clamp(700, 1200)]);
        let before_sent = self.conn.stats().frame_tx.datagram;
        let before_received = self.count().await?.datagrams;
        let start = tokio::time::Instant::now();
        for i in 0..n {
            let due = start + Duration::from_secs_f64(i as f64 / per_sec as f64);
            if due > tokio::time::Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            if start.elapsed() > limit {
                break;
            }
            self.conn
                .send_datagram_wait(payload.clone())
                .await
                .map_err(|e| self.failed(e))?;
        }
        // Let the last ones land (or be lost) before counting: a few round trips.
        let rtt = self.conn.rtt();
        tokio::time::sleep((rtt * 4).max(Duration::from_millis(200))).await;
        let sent = self.conn.stats().frame_tx.datagram - before_sent;
        let received = self
            .count()
            .await?
            .datagrams
            .saturating_sub(before_received);
        Ok(Counts { sent, received })
    }
}

/// The target's side: answers the probe connections the coordinator told it to expect.
#[derive(Debug)]
pub struct Answerer {
    expected: watch::Receiver<Expected>,
    /// One probe at a time.
    busy: tokio::sync::Semaphore,
    /// [`EXPECT_WAIT`] (tests set less).
    expect_wait: Duration,
}

impl Answerer {
    /// Answers probes `expected` names (updated from heartbeats).
    pub fn new(expected: watch::Receiver<Expected>) -> Self {
        Answerer {
            expected,
            busy: tokio::sync::Semaphore::new(1),
            expect_wait: EXPECT_WAIT,
        }
    }

    /// The same answerer, waiting `wait` for the coordinator's word on a probe.
    pub fn with_expect_wait(self, wait: Duration) -> Self {
        Answerer {
            expect_wait: wait,
            ..self
        }
    }

    /// Serves one probe connection from the holder of `peer_cert` until the prober closes it,
    /// the job ends, or [`MAX_ANSWER`] passes.
    pub async fn answer(&self, conn: quinn::Connection, peer_cert: &CertificateDer<'_>) {
        let remote = conn.remote_address();
        match tokio::time::timeout(MAX_ANSWER, self.serve(&conn, peer_cert)).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                tracing::warn!(message = "Probe refused or failed.", %remote, reason = %why);
                conn.close(6u32.into(), why.as_bytes());
            }
            Err(_) => conn.close(6u32.into(), b"probe took too long"),
        }
    }

    async fn serve(
        &self,
        conn: &quinn::Connection,
        peer_cert: &CertificateDer<'_>,
    ) -> Result<(), String> {
        let (mut send, mut recv) = tokio::time::timeout(STEP_TIMEOUT, conn.accept_bi())
            .await
            .map_err(|_| "no probe request within 30 s".to_string())?
            .map_err(|e| e.to_string())?;
        let hello: pb::ProbeRequest =
            tokio::time::timeout(STEP_TIMEOUT, frame::read(&mut recv, frame::MAX_SMALL_FRAME))
                .await
                .map_err(|_| "no probe request within 30 s".to_string())?
                .map_err(|e| e.to_string())?;
        let refuse = async |send: &mut quinn::SendStream, why: String| {
            let reply = pb::ProbeReply {
                error: why.clone(),
                ..Default::default()
            };
            let _ = frame::write(send, &reply).await;
            let _ = send.finish();
            // The reply must reach the prober before the connection closes.
            let _ = tokio::time::timeout(STEP_TIMEOUT, send.stopped()).await;
            why
        };
        let job = hello.job;
        let mut expected = self.expected.clone();
        let told = tokio::time::timeout(
            self.expect_wait,
            expected.wait_for(|e| e.contains_key(&job)),
        )
        .await
        .ok()
        .and_then(|e| e.ok().map(|e| e[&job].clone()));
        let prober = match told {
            Some(prober) => prober,
            None => {
                return Err(refuse(
                    &mut send,
                    format!("this agent was not told of probe job {job} by the coordinator"),
                )
                .await)
            }
        };
        if !cert_is_for(peer_cert, &agent_dns(&prober)) {
            return Err(refuse(
                &mut send,
                format!("probe job {job} is agent {prober}'s; the peer is another agent"),
            )
            .await);
        }
        let Ok(_permit) = self.busy.try_acquire() else {
            return Err(refuse(&mut send, "another probe is being answered".into()).await);
        };
        frame::write(
            &mut send,
            &pb::ProbeReply {
                ok: true,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        tracing::info!(message = "Answering a probe.", job, prober = %prober, remote = %conn.remote_address());

        let received = Arc::new(AtomicU64::new(0));
        // The control stream's requests, answered in order. One future for the whole
        // connection: a frame half read is never dropped when a stream arrives meanwhile.
        let control = async {
            loop {
                let Ok(req) =
                    frame::read::<pb::ProbeRequest, _>(&mut recv, frame::MAX_SMALL_FRAME).await
                else {
                    return Ok(());
                };
                let reply = pb::ProbeReply {
                    ok: true,
                    ping: req.ping,
                    bytes: received.load(Ordering::Relaxed),
                    udp_datagrams: if req.count {
                        conn.stats().udp_rx.datagrams
                    } else {
                        0
                    },
                    datagrams: if req.count {
                        conn.stats().frame_rx.datagram
                    } else {
                        0
                    },
                    ..Default::default()
                };
                frame::write(&mut send, &reply)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        };
        tokio::pin!(control);
        let mut streams = JoinSet::new();
        let job_ended = expected.wait_for(|e| !e.contains_key(&job));
        tokio::pin!(job_ended);
        loop {
            tokio::select! {
                _ = &mut job_ended => return Ok(()),
                ended = &mut control => return ended,
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
                accepted = conn.accept_bi() => match accepted {
                    Ok((mut s, mut r)) => {
                        let received = received.clone();
                        streams.spawn(async move {
                            let mut n = 0u64;
                            while let Ok(Some(chunk)) = r.read_chunk(CHUNK, false).await {
                                n += chunk.bytes.len() as u64;
                                received.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                            }
                            let _ = tokio::io::AsyncWriteExt::write_all(&mut s, &n.to_be_bytes()).await;
                            let _ = s.finish();
                        });
                    }
                    // The prober closed the connection: done.
                    Err(_) => return Ok(()),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_counts_are_powers_of_two_up_to_the_most_asked() {
        assert_eq!(stream_counts(1), [1]);
        assert_eq!(stream_counts(4), [1, 2, 4]);
        assert_eq!(stream_counts(6), [1, 2, 4, 6]);
        assert_eq!(stream_counts(0), [1]);
    }

    #[test]
    fn a_summary_takes_the_median_ping_the_one_way_loss_and_the_fastest_run() {
        let ms = Duration::from_millis;
        let run = |cc: &str, bytes_per_sec: f64| ProbeRun {
            congestion: cc.into(),
            streams: 1,
            seconds: 1.0,
            bytes: bytes_per_sec as u64,
            bytes_per_sec,
        };
        let counts = |sent, received| Counts { sent, received };
        let r = summarize(
            "a",
            "b",
            vec![ms(52), ms(40), ms(41), ms(300), ms(42)],
            counts(10_000, 9_900),
            counts(1_000, 900),
            vec![run("cubic", 5e6), run("bbr", 9e6), run("newreno", 4e6)],
        );
        assert_eq!((r.rtt_ms, r.rtt_min_ms, r.rtt_max_ms), (42.0, 40.0, 300.0));
        assert_eq!((r.packets_sent, r.packets_lost), (10_000, 100));
        assert!((r.loss - 0.01).abs() < 1e-12);
        assert_eq!(r.load_packets_sent, 1_000);
        assert!((r.load_loss - 0.1).abs() < 1e-12);
        assert_eq!(r.best.unwrap().congestion, "bbr");
        // Nothing sent: no loss, not NaN; more received than sent (the count request's own
        // datagrams) is no loss either.
        let r = summarize("a", "b", Vec::new(), counts(0, 3), counts(5, 9), Vec::new());
        assert_eq!(
            (r.loss, r.packets_lost, r.rtt_ms, r.load_loss),
            (0.0, 0, 0.0, 0.0)
        );
        assert!(r.best.is_none());
    }

    /// Two agents' endpoints on loopback with real certificates: `dst` answers with an
    /// [`Answerer`] told of `expected`.
    struct Pair {
        client: quinn::Endpoint,
        server_addr: SocketAddr,
        tls: BTreeMap<&'static str, TlsMaterial>,
        expected: watch::Sender<Expected>,
        _pki: tempfile::TempDir,
    }

    fn pair() -> Pair {
        let pki = tempfile::tempdir().unwrap();
        let ca = ferry_common::pki::Ca::init(pki.path()).unwrap();
        let mut tls = BTreeMap::new();
        for name in ["src", "dst", "other"] {
            let paths = ca
                .issue(&ferry_common::pki::Identity::Agent(name.into()), pki.path())
                .unwrap();
            tls.insert(name, TlsMaterial::load(&paths).unwrap());
        }
        let server = quinn::Endpoint::server(
            tls["dst"].quic_server_with(&Transport::default()).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let server_addr = server.local_addr().unwrap();
        let (expected, rx) = watch::channel(Expected::new());
        let answerer = Arc::new(Answerer::new(rx).with_expect_wait(Duration::from_millis(300)));
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let answerer = answerer.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let peer = conn
                        .peer_identity()
                        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                        .and_then(|c| c.first().cloned())
                        .unwrap();
                    answerer.answer(conn, &peer).await;
                });
            }
        });
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        Pair {
            client,
            server_addr,
            tls,
            expected,
            _pki: pki,
        }
    }

    fn spec(pair: &Pair, job: u64) -> ProbeSpec {
        ProbeSpec {
            job,
            peer: "dst".into(),
            addr: pair.server_addr,
            seconds: 2,
            streams: 2,
            congestions: vec![Congestion::Bbr, Congestion::Cubic],
            window: 8 << 20,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_probe_the_target_was_told_of_measures_the_path_over_real_quic() {
        let p = pair();
        p.expected
            .send_replace(BTreeMap::from([(5, "src".to_string())]));
        let r = probe(&p.client, &p.tls["src"], "src", &spec(&p, 5))
            .await
            .unwrap();
        assert_eq!((r.from.as_str(), r.to.as_str()), ("src", "dst"));
        // Two controllers × streams 1 and 2.
        let runs: Vec<_> = r
            .runs
            .iter()
            .map(|x| (x.congestion.as_str(), x.streams))
            .collect();
        assert_eq!(runs, [("bbr", 1), ("bbr", 2), ("cubic", 1), ("cubic", 2)]);
        assert!(
            r.runs.iter().all(|x| x.bytes > 0 && x.seconds >= 1.0),
            "{r:?}"
        );
        assert!(r.rtt_ms > 0.0 && r.rtt_ms < 100.0, "loopback: {r:?}");
        // Paced, loopback loses nothing; a flood may overrun a socket buffer now and then.
        assert!(r.packets_sent > 1000 && r.loss < 0.001, "{r:?}");
        assert!(r.load_packets_sent > 100 && r.load_loss < 0.2, "{r:?}");
        assert_eq!(
            r.best.as_ref().map(|b| b.bytes_per_sec),
            r.runs.iter().map(|x| x.bytes_per_sec).reduce(f64::max)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_probe_not_announced_or_from_another_agent_is_refused() {
        let p = pair();
        // Told of job 5 for "src": "other" presenting job 5 is cut off.
        p.expected
            .send_replace(BTreeMap::from([(5, "src".to_string())]));
        let e = probe(&p.client, &p.tls["other"], "other", &spec(&p, 5))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProbeError::Refused { reason, .. } if reason.contains("agent src's")),
            "{e}"
        );
        // Job 6 was never announced: refused once the wait for it ends.
        let e = probe(&p.client, &p.tls["src"], "src", &spec(&p, 6))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProbeError::Refused { reason, .. } if reason.contains("not told of probe job 6")),
            "{e}"
        );
    }
}
