//! The target side of the data plane: accepts QUIC connections from source agents and writes the
//! segments they stream, but only segments whose lease the coordinator confirms, and only from the
//! peer the coordinator named (invariant 5).

use std::sync::Arc;

use ferry_common::names::agent_dns;
use ferry_common::segment::Entry;
use ferry_common::tls::cert_is_for;
use ferry_proto::control::Role;
use ferry_proto::data as pb;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::task::{block_in_place, JoinSet};

use crate::control::Control;
use crate::frame::{self, MAX_HEADER, MAX_SMALL_FRAME};
use crate::sink::FsSink;
use crate::stats::Stats;

/// Most bytes one segment may announce (a bundle of small files or one chunk is far below).
const MAX_SEGMENT_BYTES: u64 = 16 * 1024 * 1024 * 1024;
/// Read buffer per stream: bounds memory per segment in flight.
const BUF: usize = 1024 * 1024;

/// Everything a target needs to receive segments.
pub struct Target {
    /// Bounds the segments received at once (across all peers), and so the memory headers and
    /// buffers take, including what a peer can make the target spend before its lease and
    /// identity are checked.
    pub headers: tokio::sync::Semaphore,
    /// Where segments land.
    pub sink: Arc<FsSink>,
    /// The coordinator.
    pub control: Control,
    /// Counters.
    pub stats: Arc<Stats>,
}

/// Why a segment was refused; sent back in the ack and logged.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}")]
    Plain(String),
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    #[error(transparent)]
    Frame(#[from] frame::FrameError),
    #[error("stream failed: {0}")]
    Read(#[from] quinn::ReadExactError),
}

impl Target {
    /// Accepts connections until `stop` turns true.
    pub async fn serve(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                // Reap finished connections so the set holds only live ones.
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let me = self.clone();
                    conns.spawn(async move {
                        match incoming.await {
                            Ok(conn) => me.connection(conn).await,
                            Err(e) => tracing::warn!(message = "QUIC handshake failed.", error = %e),
                        }
                    });
                }
            }
        }
        endpoint.close(0u32.into(), b"agent shutting down");
        conns.shutdown().await;
    }

    async fn connection(self: Arc<Self>, conn: quinn::Connection) {
        let peer: Option<CertificateDer<'static>> = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|certs| certs.first().cloned());
        let Some(peer) = peer else {
            conn.close(1u32.into(), b"client certificate required");
            return;
        };
        tracing::debug!(message = "Connection accepted.", remote = %conn.remote_address());
        let peer = Arc::new(peer);
        let mut streams = JoinSet::new();
        loop {
            tokio::select! {
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
                accepted = conn.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        let me = self.clone();
                        let peer = peer.clone();
                        let conn = conn.clone();
                        streams.spawn(async move { me.stream(&conn, &peer, send, recv).await });
                    }
                    Err(e) => {
                        tracing::debug!(message = "Connection ended.", remote = %conn.remote_address(), error = %e);
                        break;
                    }
                },
            }
        }
        streams.shutdown().await;
    }

    async fn stream(
        &self,
        conn: &quinn::Connection,
        peer: &CertificateDer<'static>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let _permit = self.headers.acquire().await.expect("never closed");
        let header: pb::SegmentHeader = match frame::read(&mut recv, MAX_HEADER).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(message = "Bad segment header; closing connection.", remote = %conn.remote_address(), error = %e);
                conn.close(2u32.into(), b"bad segment header");
                return;
            }
        };
        let (mid, sid, epoch) = (header.migration_id, header.segment_id, header.epoch);
        tracing::debug!(
            message = "Segment offered.",
            migration = mid,
            segment = sid,
            epoch
        );
        let outcome = self.receive(conn, peer, header, &mut recv).await;
        let ack = match outcome {
            Ok(hash) => pb::SegmentAck {
                ok: true,
                blake3: hash.to_vec(),
                error: String::new(),
            },
            Err(e) => {
                Stats::add(&self.stats.segments_refused, 1);
                tracing::warn!(message = "Segment refused.", migration = mid, segment = sid, epoch, error = %e);
                let _ = recv.stop(3u32.into());
                pb::SegmentAck {
                    ok: false,
                    blake3: Vec::new(),
                    error: e.to_string(),
                }
            }
        };
        if frame::write(&mut send, &ack).await.is_ok() {
            let _ = send.finish();
            let _ = send.stopped().await;
        }
    }

    /// Receives one segment; returns its hash once it is durable and recorded at the coordinator.
    async fn receive(
        &self,
        conn: &quinn::Connection,
        peer: &CertificateDer<'static>,
        header: pb::SegmentHeader,
        recv: &mut quinn::RecvStream,
    ) -> Result<[u8; 32], Refusal> {
        let (mid, sid, epoch) = (header.migration_id, header.segment_id, header.epoch);
        let lease = self
            .control
            .check_lease(mid, sid, epoch)
            .await
            .map_err(|e| Refusal::Plain(format!("cannot confirm the lease: {e}")))?;
        if !lease.ok {
            return Err(Refusal::Plain(format!("lease refused: {}", lease.reason)));
        }
        if !cert_is_for(peer, &agent_dns(&lease.source_agent)) {
            tracing::warn!(
                message = "Peer is not the source the coordinator assigned; cutting it off.",
                remote = %conn.remote_address(),
                expected = %lease.source_agent,
                migration = mid,
                segment = sid
            );
            conn.close(4u32.into(), b"peer is not the assigned source");
            return Err(Refusal::Plain(format!(
                "peer is not {}, the assigned source",
                lease.source_agent
            )));
        }
        let entries = header
            .entries
            .into_iter()
            .map(Entry::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Refusal::Plain(e.to_string()))?;
        if entries.len() > ferry_common::segment::MAX_BUNDLE_ENTRIES {
            return Err(Refusal::Plain(format!(
                "segment has {} entries, over the limit",
                entries.len()
            )));
        }
        // Bytes on the wire (a sparse piece sends its data runs only).
        let total: u64 = entries
            .iter()
            .map(Entry::wire_len)
            .fold(0, u64::saturating_add);
        if total > MAX_SEGMENT_BYTES {
            return Err(Refusal::Plain(format!(
                "segment announces {total} bytes, over the limit"
            )));
        }
        // What the target keeps of a migration is keyed by cluster id and migration uuid, so a
        // new cluster's migration 1 never meets an old one's part files or directory times.
        let cluster = self.control.cluster_id();
        if cluster.is_empty() {
            return Err(Refusal::Plain(
                "this agent has not registered with the coordinator yet; retry".into(),
            ));
        }
        let key = format!("{cluster}/{}", lease.migration_uuid);
        let mut writer = self.sink.begin(&lease.target_path, &key, sid, epoch)?;
        let mut buf = vec![0u8; BUF];
        for e in &entries {
            block_in_place(|| writer.start_entry(e))?;
            let mut left = e.wire_len();
            while left > 0 {
                let n = left.min(BUF as u64) as usize;
                recv.read_exact(&mut buf[..n]).await?;
                block_in_place(|| writer.write(&buf[..n]))?;
                left -= n as u64;
            }
        }
        let hash = block_in_place(|| writer.finish())?;
        let trailer: pb::SegmentTrailer = frame::read(recv, MAX_SMALL_FRAME).await?;
        if trailer.blake3.as_slice() != hash.as_slice() {
            drop(writer);
            let why = format!(
                "BLAKE3 mismatch: target computed {}, source sent {}",
                ferry_common::hash::hex(&hash),
                ferry_common::hash::hex(&trailer.blake3)
            );
            let _ = self
                .control
                .report(Role::Target, mid, sid, epoch, Err(why.clone()))
                .await;
            return Err(Refusal::Plain(why));
        }
        // The lease may have expired and been granted again while the bytes streamed: only the
        // current holder may make its bytes visible.
        let still = self
            .control
            .check_lease(mid, sid, epoch)
            .await
            .map_err(|e| Refusal::Plain(format!("cannot confirm the lease: {e}")))?;
        if !still.ok {
            return Err(Refusal::Plain(format!(
                "lease lost while receiving: {}",
                still.reason
            )));
        }
        block_in_place(|| writer.commit())?;
        Stats::add(&self.stats.bytes_received, total);
        Stats::add(&self.stats.segments_committed, 1);
        let r = self
            .control
            .report(Role::Target, mid, sid, epoch, Ok(hash))
            .await
            .map_err(|e| {
                Refusal::Plain(format!("segment is durable but could not be recorded: {e}"))
            })?;
        if r.outcome == "rejected" || r.outcome == "failed" {
            return Err(Refusal::Plain(format!(
                "coordinator {}: {}",
                r.outcome, r.reason
            )));
        }
        Ok(hash)
    }
}
