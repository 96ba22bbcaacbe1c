//! Probing the network path between two agents (`ferryctl probe SRC DST`), over the same QUIC
//! endpoint and TLS as the data plane but its own protocol ([`PROBE_ALPN`]):
//!
//! - **round-trip time**: pings echoed on a control stream before any load (median, min, max);
//! - **throughput**: for each congestion controller asked for (one connection each, the agent's
//!   window), runs of 1, 2, 4 … up to N parallel streams, each streaming bytes for its share of
//!   the probe's time; the target counts what arrived and says so at the end of each stream, so
//!   a run's rate is bytes the target holds over the time until it said so;
//! - **loss**: UDP datagrams the prober's connections sent against those the target's received
//!   (asked for at the end of each connection): the one-way packet loss of the path, whatever
//!   the congestion controller made of it.
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
    /// UDP datagrams the prober sent, and how many of them never arrived.
    pub packets_sent: u64,
    /// Lost.
    pub packets_lost: u64,
    /// `packets_lost / packets_sent` (0 when nothing was sent).
    pub loss: f64,
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

/// Folds pings (round-trip samples), datagram counts and runs into a result.
pub fn summarize(
    from: &str,
    to: &str,
    mut pings: Vec<Duration>,
    sent: u64,
    received: u64,
    runs: Vec<ProbeRun>,
) -> ProbeResult {
    pings.sort();
    let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let lost = sent.saturating_sub(received);
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
        packets_sent: sent,
        packets_lost: lost,
        loss: if sent == 0 {
            0.0
        } else {
            lost as f64 / sent as f64
        },
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
    let (mut sent, mut received) = (0u64, 0u64);
    let mut runs = Vec::new();
    for (i, &cc) in spec.congestions.iter().enumerate() {
        let mut c = Connected::open(endpoint, tls, spec, cc).await?;
        if i == 0 {
            for n in 0..PINGS as u64 {
                pings.push(c.ping(n).await?);
            }
        }
        for &streams in &counts {
            runs.push(c.run(cc, streams, per_run).await?);
        }
        let (tx, rx) = c.datagrams().await?;
        sent += tx;
        received += rx;
        c.conn.close(0u32.into(), b"probe done");
    }
    Ok(summarize(me, &spec.peer, pings, sent, received, runs))
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

    /// UDP datagrams this connection sent, and those the target's received.
    async fn datagrams(&mut self) -> Result<(u64, u64), ProbeError> {
        // Taken before the request: the request's own datagrams count at the target only, so
        // the loss is never overstated by them.
        let sent = self.conn.stats().udp_tx.datagrams;
        let reply = self
            .ask(&pb::ProbeRequest {
                count: true,
                ..Default::default()
            })
            .await?;
        Ok((sent, reply.udp_datagrams.min(sent)))
    }
}

/// The target's side: answers the probe connections the coordinator told it to expect.
#[derive(Debug)]
pub struct Answerer {
    expected: watch::Receiver<Expected>,
    /// One probe at a time.
    busy: tokio::sync::Semaphore,
}

impl Answerer {
    /// Answers probes `expected` names (updated from heartbeats).
    pub fn new(expected: watch::Receiver<Expected>) -> Self {
        Answerer {
            expected,
            busy: tokio::sync::Semaphore::new(1),
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
            why
        };
        let job = hello.job;
        let mut expected = self.expected.clone();
        let told = tokio::time::timeout(EXPECT_WAIT, expected.wait_for(|e| e.contains_key(&job)))
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
        let r = summarize(
            "a",
            "b",
            vec![ms(52), ms(40), ms(41), ms(300), ms(42)],
            10_000,
            9_900,
            vec![run("cubic", 5e6), run("bbr", 9e6), run("newreno", 4e6)],
        );
        assert_eq!((r.rtt_ms, r.rtt_min_ms, r.rtt_max_ms), (42.0, 40.0, 300.0));
        assert_eq!((r.packets_sent, r.packets_lost), (10_000, 100));
        assert!((r.loss - 0.01).abs() < 1e-12);
        assert_eq!(r.best.unwrap().congestion, "bbr");
        // Nothing sent: no loss, not NaN; more received than sent (the count request's own
        // datagrams) is no loss either.
        let r = summarize("a", "b", Vec::new(), 0, 3, Vec::new());
        assert_eq!((r.loss, r.packets_lost, r.rtt_ms), (0.0, 0, 0.0));
        assert!(r.best.is_none());
    }
}
