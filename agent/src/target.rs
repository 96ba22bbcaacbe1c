//! The target side of the data plane: accepts QUIC connections from source agents and writes the
//! segments they stream, but only segments whose lease the coordinator confirms, and only from the
//! peer the coordinator named (invariant 5).

use std::sync::Arc;
use std::time::Duration;

use crate::segment::Entry;
use ferry_common::names::agent_dns;
use ferry_common::path::display;
use ferry_common::tls::cert_is_for;
use ferry_proto::control::{ReportOutcome, Role};
use ferry_proto::data as pb;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::task::{block_in_place, JoinSet};

use crate::control::{Control, Coordinator, Failure};
use crate::frame::{self, MAX_HEADER, MAX_SMALL_FRAME};
use crate::sink::{FsSink, SinkError};
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

/// How long a target waits for the coordinator to record a failure before it answers the
/// source anyway (the source reports the same error, so nothing is lost if this one is late).
const FAILURE_REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a segment was refused; sent back in the ack and logged.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// Refused before a byte was written (the lease, the peer, the header) or after (the lease
    /// was lost): not this target's failure to report.
    #[error("{0}")]
    Plain(String),
    /// Writing at the target failed (a full disk, a permission, an I/O error), for a lease the
    /// coordinator confirmed from the assigned source: the target reports it itself.
    #[error("{}", describe_sink_error(.error, .entry.as_deref()))]
    Sink {
        /// The entry being written, if one was.
        entry: Option<String>,
        /// What failed.
        error: SinkError,
    },
    #[error(transparent)]
    Frame(#[from] frame::FrameError),
    #[error("stream failed: {0}")]
    Read(#[from] quinn::ReadExactError),
}

impl From<SinkError> for Refusal {
    fn from(error: SinkError) -> Self {
        Refusal::Sink { entry: None, error }
    }
}

impl Refusal {
    fn sink(entry: &Entry) -> impl FnOnce(SinkError) -> Refusal + '_ {
        move |error| Refusal::Sink {
            entry: Some(display(&entry.path)),
            error,
        }
    }

    /// Whether the target reports this failure itself: writing failed in the target's own
    /// environment (a full disk, a permission, an I/O error). What the peer sent (a bad path,
    /// a bad entry) is refused in the ack only, and the source reports it.
    fn target_reports(&self) -> bool {
        matches!(
            self,
            Refusal::Sink {
                error: SinkError::Io { .. } | SinkError::Root { .. },
                ..
            }
        )
    }

    /// Whether the failure is not the segment's: a hardlink waits for its first name.
    fn retry_later(&self) -> bool {
        matches!(
            self,
            Refusal::Sink {
                error: SinkError::LinkPending { .. },
                ..
            }
        )
    }
}

/// What an operator reads when writing at the target failed: the cause in plain words, where,
/// and what to do. A full disk, a denied permission, a read-only file system and an I/O error
/// are named; anything else is the sink's own message.
fn describe_sink_error(e: &SinkError, entry: Option<&str>) -> String {
    let writing = entry.map_or(String::new(), |p| format!(" while writing {p}"));
    let SinkError::Io { op, path, source } = e else {
        return match entry {
            Some(p) if !matches!(e, SinkError::LinkPending { .. }) => format!("{e} (writing {p})"),
            _ => e.to_string(),
        };
    };
    let path = path.display();
    match source.raw_os_error() {
        Some(libc::ENOSPC) => format!(
            "no space left on the target's device ({path}{writing}): free space on it or move \
             the target root to a larger file system; ferry retries the segment, with backoff, \
             up to the migration's max attempts"
        ),
        Some(libc::EDQUOT) => format!(
            "the target agent's disk quota is exhausted ({path}{writing}): raise the quota or \
             free space; ferry retries the segment, with backoff, up to the migration's max \
             attempts"
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "permission denied at the target ({op} {path}{writing}): let the target agent's \
             user write there, or choose another target directory"
        ),
        Some(libc::EROFS) => format!(
            "the target's file system is read-only ({op} {path}{writing}): remount it read-write \
             or move the target root"
        ),
        Some(libc::EIO) => format!(
            "I/O error on the target's device ({op} {path}{writing}): check the disk (dmesg) \
             before trusting it with data"
        ),
        _ => format!("{op} {path}{writing}: {source}"),
    }
}

/// How a report's outcome reads in a refusal: as the coordinator's words once were.
fn outcome_text(o: ReportOutcome) -> &'static str {
    match o {
        ReportOutcome::Unspecified => "answered nothing known",
        ReportOutcome::Verified => "verified",
        ReportOutcome::Waiting => "waiting",
        ReportOutcome::Rejected => "rejected",
        ReportOutcome::Failed => "failed",
        ReportOutcome::GaveUp => "gave up",
        ReportOutcome::Refused => "refused",
        ReportOutcome::Unavailable => "unavailable",
    }
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
        // Failed attempts of the segment before this one, as the coordinator counts them.
        let mut attempts = 0;
        let outcome = self
            .receive(conn, peer, header, &mut recv, &mut attempts)
            .await;
        let ack = match outcome {
            Ok(hash) => pb::SegmentAck {
                ok: true,
                blake3: hash.to_vec(),
                error: String::new(),
                retry_later: false,
            },
            Err(e) => {
                Stats::add(&self.stats.segments_refused, 1);
                let why = e.to_string();
                let retry_later = e.retry_later();
                // The first failure of a segment is a warning; its retries repeat it at debug
                // level (the coordinator counts them and shows the last error).
                if retry_later || attempts > 0 {
                    tracing::debug!(message = "Segment refused.", migration = mid, segment = sid, epoch, attempts, error = %why);
                } else {
                    tracing::warn!(message = "Segment refused.", migration = mid, segment = sid, epoch, error = %why);
                }
                if e.target_reports() {
                    // The write failed here: record the cause at the coordinator first, so the
                    // operator sees the target's reason (a full disk) rather than the source's
                    // view of it (a stopped stream), whatever the source reports after.
                    let failure = Failure {
                        error: why.clone(),
                        retry_later,
                    };
                    let report = self
                        .control
                        .report(Role::Target, mid, sid, epoch, Err(failure));
                    match tokio::time::timeout(FAILURE_REPORT_TIMEOUT, report).await {
                        Ok(Ok(r)) if r.outcome() == ReportOutcome::GaveUp => {
                            tracing::warn!(message = "Segment given up on after its last allowed attempt.", migration = mid, segment = sid, attempts = attempts + 1, error = %why)
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::debug!(message = "Could not report the failure; the source will.", migration = mid, segment = sid, error = %e)
                        }
                        Err(_) => {
                            tracing::debug!(
                                message = "Reporting the failure timed out; the source will.",
                                migration = mid,
                                segment = sid
                            )
                        }
                    }
                }
                pb::SegmentAck {
                    ok: false,
                    blake3: Vec::new(),
                    error: why,
                    retry_later,
                }
            }
        };
        // The ack goes out before the stream is stopped: a source still sending sees its write
        // fail and then reads why.
        let sent = frame::write(&mut send, &ack).await.is_ok();
        if !ack.ok {
            let _ = recv.stop(3u32.into());
        }
        if sent {
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
        attempts: &mut u32,
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
        *attempts = lease.attempts;
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
        if entries.len() > crate::segment::MAX_BUNDLE_ENTRIES {
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
            block_in_place(|| writer.start_entry(e)).map_err(Refusal::sink(e))?;
            let mut left = e.wire_len();
            while left > 0 {
                let n = left.min(BUF as u64) as usize;
                recv.read_exact(&mut buf[..n]).await?;
                block_in_place(|| writer.write(&buf[..n])).map_err(Refusal::sink(e))?;
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
                .report(
                    Role::Target,
                    mid,
                    sid,
                    epoch,
                    Err(Failure::counted(why.clone())),
                )
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
        if !matches!(
            r.outcome(),
            ReportOutcome::Verified | ReportOutcome::Waiting
        ) {
            return Err(Refusal::Plain(format!(
                "coordinator {}: {}",
                outcome_text(r.outcome()),
                r.reason
            )));
        }
        Ok(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(errno: i32) -> SinkError {
        SinkError::Io {
            op: "write",
            path: "/srv/dst/.ferry-part-1".into(),
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    #[test]
    fn write_failures_name_the_cause_the_place_and_what_to_do() {
        let e = describe_sink_error(&io(libc::ENOSPC), Some("data/model.bin"));
        assert!(
            e.starts_with(
                "no space left on the target's device (/srv/dst/.ferry-part-1 while writing \
                 data/model.bin): free space on it or move the target root"
            ),
            "{e}"
        );
        let e = describe_sink_error(&io(libc::EACCES), Some("a"));
        assert!(
            e.starts_with("permission denied at the target (write /srv/dst/"),
            "{e}"
        );
        assert!(describe_sink_error(&io(libc::EROFS), None).contains("read-only"));
        assert!(describe_sink_error(&io(libc::EIO), None).contains("I/O error"));
        let e = describe_sink_error(&io(libc::EMFILE), None);
        assert!(e.starts_with("write /srv/dst/.ferry-part-1: "), "{e}");
    }

    #[test]
    fn only_a_waiting_hardlink_is_retried_without_counting() {
        let link = Refusal::from(SinkError::LinkPending {
            path: "b".into(),
            first: "a".into(),
            reason: "a has not arrived".into(),
        });
        assert!(link.retry_later());
        assert!(!Refusal::from(io(libc::ENOSPC)).retry_later());
        assert!(!Refusal::Plain("lease refused".into()).retry_later());
    }

    #[test]
    fn the_target_reports_its_own_write_failures_not_what_a_peer_sent() {
        assert!(Refusal::from(io(libc::ENOSPC)).target_reports());
        assert!(!Refusal::from(SinkError::Reserved(".ferry-x".into())).target_reports());
        assert!(!Refusal::Plain("lease refused".into()).target_reports());
    }
}
