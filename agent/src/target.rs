//! The target side of the data plane: accepts QUIC connections from source agents and writes the
//! segments they stream, but only segments whose lease the coordinator confirms, and only from the
//! peer the coordinator named (invariant 5).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::segment::Entry;
use ferry_common::names::agent_dns;
use ferry_common::path::display;
use ferry_common::telemetry::LogLimit;
use ferry_common::tls::cert_is_for;
use ferry_proto::control::{ReportOutcome, Role};
use ferry_proto::data as pb;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::watch;
use tokio::task::{block_in_place, JoinSet};

use crate::control::{Control, ControlError, Coordinator, Failure};
use crate::frame::{self, MAX_HEADER, MAX_SMALL_FRAME};
use crate::sink::{FsSink, SegmentWrite, Sink, SinkError};
use crate::stats::Stats;
use crate::wire::MalformedEntry;

/// Warnings a failing or hostile peer can repeat as fast as it connects: at most one line each
/// per [`LOG_EVERY`], with the number held back.
static HANDSHAKE_FAILED: LogLimit = LogLimit::new(LOG_EVERY);
static NO_HEADER: LogLimit = LogLimit::new(LOG_EVERY);
static BAD_HEADER: LogLimit = LogLimit::new(LOG_EVERY);
/// See [`HANDSHAKE_FAILED`].
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Most bytes one segment may announce (a bundle of small files or one chunk is far below).
const MAX_SEGMENT_BYTES: u64 = 16 * 1024 * 1024 * 1024;
/// Read buffer per stream: bounds memory per segment in flight.
const BUF: usize = 1024 * 1024;
/// How long a stream's segment header may take to arrive whole: a peer holding a slot (one of
/// [`Target::headers`]) without sending its header is cut off after this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read of a segment's bytes may wait with nothing arriving: a peer that stops
/// sending (its connection kept alive) gives its slot up after this; the source retries.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything a target needs to receive segments: generic over the coordinator and the sink,
/// so its logic is tested through [`crate::control::testing::FakeCoordinator`] and
/// [`crate::sink::mem::MemSink`].
pub struct Target<C: Coordinator = Control, S: Sink = FsSink> {
    /// Bounds the segments received at once (across all peers), and so the memory headers and
    /// buffers take, including what a peer can make the target spend before its lease and
    /// identity are checked.
    pub headers: tokio::sync::Semaphore,
    /// Where segments land.
    pub sink: Arc<S>,
    /// The coordinator.
    pub control: C,
    /// Counters.
    pub stats: Arc<Stats>,
    /// [`HEADER_TIMEOUT`] (tests set less).
    pub header_timeout: Duration,
    /// [`STALL_TIMEOUT`] (tests set less).
    pub stall_timeout: Duration,
    /// Answers probe connections ([`ferry_common::tls::PROBE_ALPN`]); none: they are refused.
    pub probes: Option<Arc<crate::probe::Answerer>>,
}

/// A read that fails once it has waited `limit` with nothing arriving (counted from when it
/// started waiting, so the time the target spends writing between reads does not count).
struct StallGuard<'a, R> {
    inner: &'a mut R,
    limit: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
}

impl<'a, R> StallGuard<'a, R> {
    fn new(inner: &'a mut R, limit: Duration) -> Self {
        StallGuard {
            inner,
            limit,
            sleep: Box::pin(tokio::time::sleep(limit)),
            waiting: false,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for StallGuard<'_, R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        let me = &mut *self;
        match std::pin::Pin::new(&mut *me.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                me.waiting = false;
                Poll::Ready(r)
            }
            Poll::Pending => {
                if !me.waiting {
                    me.waiting = true;
                    let at = tokio::time::Instant::now() + me.limit;
                    me.sleep.as_mut().reset(at);
                }
                match me.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the source sent nothing for {} s", me.limit.as_secs_f32()),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

/// How long a target waits for the coordinator to record a failure before it answers the
/// source anyway (the source reports the same error, so nothing is lost if this one is late).
const FAILURE_REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a segment was refused; sent back in the ack and logged.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// The coordinator could not be asked whether the lease holds: the source retries later.
    #[error("cannot confirm the lease: {0}")]
    LeaseUnconfirmed(ControlError),
    /// The coordinator says the lease is not current (expired, replaced, given up on): nothing
    /// was written.
    #[error("lease refused: {0}")]
    LeaseRefused(String),
    /// The peer is not the source the coordinator assigned: the connection is cut off.
    #[error("peer is not {0}, the assigned source")]
    WrongPeer(String),
    /// An entry of the header is malformed.
    #[error(transparent)]
    BadHeader(#[from] MalformedEntry),
    /// The header lists more entries than a segment may hold.
    #[error("segment has {0} entries, over the limit")]
    TooManyEntries(usize),
    /// The header announces more bytes than a segment may carry.
    #[error("segment announces {0} bytes, over the limit")]
    TooLarge(u64),
    /// This agent has no cluster id yet, so it cannot key the migration's local state: the
    /// source retries.
    #[error("this agent has not registered with the coordinator yet; retry")]
    NotRegisteredYet,
    /// The bytes received do not hash to what the source sent: nothing is published, and the
    /// failure counts.
    #[error("BLAKE3 mismatch: target computed {computed}, source sent {sent}")]
    HashMismatch {
        /// The target's hash (hex).
        computed: String,
        /// The source's (hex).
        sent: String,
    },
    /// The lease expired or was replaced while the bytes streamed: nothing is published.
    #[error("lease lost while receiving: {0}")]
    LeaseLost(String),
    /// The segment is durable here but the coordinator could not be told.
    #[error("segment is durable but could not be recorded: {0}")]
    NotRecorded(ControlError),
    /// The coordinator refused the target's report.
    #[error("coordinator {}: {reason}", outcome_text(*.outcome))]
    RecordRefused {
        /// Its answer.
        outcome: ReportOutcome,
        /// Its reason.
        reason: String,
    },
    /// Writing at the target failed (a full disk, a permission, an I/O error), for a lease the
    /// coordinator confirmed from the assigned source: the target reports it itself.
    #[error("{}", describe_sink_error(.error, .entry.as_deref()))]
    Sink {
        /// The entry being written, if one was.
        entry: Option<String>,
        /// What failed.
        error: SinkError,
    },
    /// A frame could not be read.
    #[error(transparent)]
    Frame(#[from] frame::FrameError),
    /// The stream failed while the bytes were read.
    #[error("stream failed: {0}")]
    Read(#[from] std::io::Error),
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
                error: SinkError::Io { .. }
                    | SinkError::Root { .. }
                    | SinkError::Store { .. }
                    | SinkError::UploadLost { .. },
                ..
            }
        )
    }

    /// Whether the segment can never be written as planned: a delta whose base is gone.
    fn stale(&self) -> bool {
        matches!(
            self,
            Refusal::Sink {
                error: SinkError::BaseGone { .. },
                ..
            }
        )
    }

    /// Whether the failure is not the segment's: a hardlink waits for its first name.
    /// Whether retrying cannot help: the segment holds what this target refuses for what it is
    /// (a malformed or oversized header, an entry the sink cannot write as it is, a path it
    /// refuses). Nothing about the target's own state (space, permissions, the store) is.
    fn permanent(&self) -> bool {
        matches!(
            self,
            Refusal::BadHeader(_)
                | Refusal::TooManyEntries(_)
                | Refusal::TooLarge(_)
                | Refusal::Sink {
                    error: SinkError::BadEntry { .. } | SinkError::Path(_),
                    ..
                }
        )
    }

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
        ReportOutcome::Stale => "left to the next round",
        ReportOutcome::Refused => "refused",
        ReportOutcome::Unavailable => "unavailable",
    }
}

/// What became of one stream, for the QUIC driver.
struct Handled {
    /// The segment was taken (ack ok).
    ok: bool,
    /// The ack went out.
    acked: bool,
    /// Cut the whole connection off, with this code and reason.
    close: Option<(u32, &'static [u8])>,
}

impl<C: Coordinator, S: Sink> Target<C, S> {
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
                            Err(e) => {
                                if let Some(held_back) = HANDSHAKE_FAILED.admit() {
                                    tracing::warn!(message = "QUIC handshake failed.", error = %e, held_back);
                                }
                            }
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
        let protocol = conn
            .handshake_data()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|h| h.protocol);
        if protocol.as_deref() == Some(ferry_common::tls::PROBE_ALPN) {
            match &self.probes {
                Some(answerer) => answerer.answer(conn, &peer).await,
                None => conn.close(6u32.into(), b"this agent answers no probes"),
            }
            return;
        }
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
        let h = self
            .handle(peer, conn.remote_address(), &mut send, &mut recv)
            .await;
        if let Some((code, why)) = h.close {
            conn.close(code.into(), why);
        }
        if !h.ok {
            let _ = recv.stop(3u32.into());
        }
        if h.acked {
            let _ = send.finish();
            let _ = send.stopped().await;
        }
    }

    /// One stream: the segment's header, its bytes and trailer, then the ack (written before
    /// the driver stops the stream, so a source still sending sees its write fail and then
    /// reads why). Generic over the stream, so tests drive it over an in-memory pipe.
    async fn handle<R, W>(
        &self,
        peer: &CertificateDer<'static>,
        remote: SocketAddr,
        send: &mut W,
        recv: &mut R,
    ) -> Handled
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        let _permit = self.headers.acquire().await.expect("never closed");
        let mut recv = StallGuard::new(recv, self.stall_timeout);
        let recv = &mut recv;
        let read = tokio::time::timeout(self.header_timeout, frame::read(recv, MAX_HEADER));
        let header: pb::SegmentHeader = match read.await {
            Ok(Ok(h)) => h,
            Err(_) => {
                if let Some(held_back) = NO_HEADER.admit() {
                    tracing::warn!(message = "No segment header in time; closing connection.", %remote, timeout_secs = self.header_timeout.as_secs_f32(), held_back);
                }
                return Handled {
                    ok: false,
                    acked: false,
                    close: Some((5, b"segment header timeout")),
                };
            }
            Ok(Err(e)) => {
                if let Some(held_back) = BAD_HEADER.admit() {
                    tracing::warn!(message = "Bad segment header; closing connection.", %remote, error = %e, held_back);
                }
                return Handled {
                    ok: false,
                    acked: false,
                    close: Some((2, b"bad segment header")),
                };
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
        let outcome = self.receive(peer, header, recv, &mut attempts).await;
        let mut close = None;
        if let Err(Refusal::WrongPeer(expected)) = &outcome {
            tracing::warn!(
                message = "Peer is not the source the coordinator assigned; cutting it off.",
                %remote,
                %expected,
                migration = mid,
                segment = sid
            );
            close = Some((4, &b"peer is not the assigned source"[..]));
        }
        let ack = match outcome {
            Ok((hash, verified)) => pb::SegmentAck {
                ok: true,
                blake3: hash.to_vec(),
                verified,
                ..Default::default()
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
                        stale: false,
                        permanent: false,
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
                    stale: e.stale(),
                    verified: false,
                    permanent: e.permanent(),
                }
            }
        };
        let acked = frame::write(send, &ack).await.is_ok();
        Handled {
            ok: ack.ok,
            acked,
            close,
        }
    }

    /// Receives one segment; returns its hash once it is durable and recorded at the
    /// coordinator, and whether that record verified it (it carries the source's hash, which
    /// came with the bytes and equals the target's).
    async fn receive<R: AsyncRead + Unpin + Send>(
        &self,
        peer: &CertificateDer<'static>,
        header: pb::SegmentHeader,
        recv: &mut R,
        attempts: &mut u32,
    ) -> Result<([u8; 32], bool), Refusal> {
        let (mid, sid, epoch) = (header.migration_id, header.segment_id, header.epoch);
        let lease = self
            .control
            .check_lease(mid, sid, epoch)
            .await
            .map_err(Refusal::LeaseUnconfirmed)?;
        if !lease.ok {
            return Err(Refusal::LeaseRefused(lease.reason));
        }
        *attempts = lease.attempts;
        if !cert_is_for(peer, &agent_dns(&lease.source_agent)) {
            return Err(Refusal::WrongPeer(lease.source_agent));
        }
        let entries = header
            .entries
            .into_iter()
            .map(Entry::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        if entries.len() > crate::segment::MAX_BUNDLE_ENTRIES {
            return Err(Refusal::TooManyEntries(entries.len()));
        }
        // Bytes on the wire (a sparse piece sends its data runs only).
        let total: u64 = entries
            .iter()
            .map(Entry::wire_len)
            .fold(0, u64::saturating_add);
        if total > MAX_SEGMENT_BYTES {
            return Err(Refusal::TooLarge(total));
        }
        // What the target keeps of a migration is keyed by cluster id and migration uuid, so a
        // new cluster's migration 1 never meets an old one's part files or directory times.
        let cluster = self.control.cluster_id();
        if cluster.is_empty() {
            return Err(Refusal::NotRegisteredYet);
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
            let mismatch = Refusal::HashMismatch {
                computed: ferry_common::hash::hex(&hash),
                sent: ferry_common::hash::hex(&trailer.blake3),
            };
            let why = mismatch.to_string();
            let _ = self
                .control
                .report(Role::Target, mid, sid, epoch, Err(Failure::counted(why)))
                .await;
            return Err(mismatch);
        }
        // The lease may have expired and been granted again while the bytes streamed: only the
        // current holder may make its bytes visible.
        let still = self
            .control
            .check_lease(mid, sid, epoch)
            .await
            .map_err(Refusal::LeaseUnconfirmed)?;
        if !still.ok {
            return Err(Refusal::LeaseLost(still.reason));
        }
        block_in_place(|| writer.commit())?;
        ferry_common::fault_point!("target::before_report");
        Stats::add(&self.stats.bytes_received, total);
        Stats::add(&self.stats.segments_committed, 1);
        let r = self
            .control
            .report_received(mid, sid, epoch, hash)
            .await
            .map_err(Refusal::NotRecorded)?;
        if !matches!(
            r.outcome(),
            ReportOutcome::Verified | ReportOutcome::Waiting
        ) {
            return Err(Refusal::RecordRefused {
                outcome: r.outcome(),
                reason: r.reason,
            });
        }
        Ok((hash, r.outcome() == ReportOutcome::Verified))
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
        assert!(!Refusal::LeaseRefused("not current".into()).retry_later());
    }

    #[test]
    fn the_target_reports_its_own_write_failures_not_what_a_peer_sent() {
        assert!(Refusal::from(io(libc::ENOSPC)).target_reports());
        assert!(!Refusal::from(SinkError::Reserved(".ferry-x".into())).target_reports());
        assert!(!Refusal::LeaseRefused("not current".into()).target_reports());
    }
}

/// The target driven whole through its seams: a [`FakeCoordinator`], a [`MemSink`] and an
/// in-memory pipe instead of a QUIC stream; no disk, no sockets.
#[cfg(test)]
mod driven {
    use super::*;
    use crate::control::testing::FakeCoordinator;
    use crate::sink::mem::MemSink;

    struct Rig {
        target: Target<FakeCoordinator, MemSink>,
        control: FakeCoordinator,
        sink: Arc<MemSink>,
        /// The certificate of agent "src", the source the fake coordinator assigns.
        src: CertificateDer<'static>,
        /// The certificate of another agent.
        other: CertificateDer<'static>,
        _pki: tempfile::TempDir,
    }

    fn rig() -> Rig {
        let pki = tempfile::tempdir().unwrap();
        let ca = ferry_common::pki::Ca::init(pki.path()).unwrap();
        let cert = |name: &str| {
            let paths = ca
                .issue(&ferry_common::pki::Identity::Agent(name.into()), pki.path())
                .unwrap();
            ferry_common::tls::TlsMaterial::load(&paths)
                .unwrap()
                .cert_der()
                .unwrap()
        };
        let (control, sink) = (FakeCoordinator::default(), Arc::new(MemSink::default()));
        Rig {
            target: Target {
                headers: tokio::sync::Semaphore::new(4),
                sink: sink.clone(),
                control: control.clone(),
                stats: Arc::default(),
                probes: None,
                header_timeout: HEADER_TIMEOUT,
                stall_timeout: STALL_TIMEOUT,
            },
            control,
            sink,
            src: cert("src"),
            other: cert("intruder"),
            _pki: pki,
        }
    }

    const DATA: &[u8] = b"the bytes of a small file";

    /// A stream as a target sees it, in memory: what the source wrote is in `target_in`, what
    /// the target answers comes out of `from_target`.
    struct Pipe {
        to_target: tokio::io::DuplexStream,
        target_in: tokio::io::DuplexStream,
        target_out: tokio::io::DuplexStream,
        from_target: tokio::io::DuplexStream,
    }

    impl Pipe {
        /// A stream on which the source offered segment 7 of migration 1 (epoch 3) holding
        /// `entry`, and has written `bytes` of it so far.
        async fn offering(entry: &Entry, bytes: &[u8]) -> Pipe {
            let (mut to_target, target_in) = tokio::io::duplex(1 << 20);
            let (target_out, from_target) = tokio::io::duplex(1 << 20);
            let header = pb::SegmentHeader {
                migration_id: 1,
                segment_id: 7,
                epoch: 3,
                entries: vec![pb::Entry::from(entry)],
            };
            frame::write(&mut to_target, &header).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut to_target, bytes)
                .await
                .unwrap();
            Pipe {
                to_target,
                target_in,
                target_out,
                from_target,
            }
        }

        /// What `rig`'s target does with the stream, as if `peer` sent it.
        async fn handled(&mut self, rig: &Rig, peer: &CertificateDer<'static>) -> Handled {
            let remote = "127.0.0.1:9".parse().unwrap();
            rig.target
                .handle(peer, remote, &mut self.target_out, &mut self.target_in)
                .await
        }

        /// The target's ack, once it has handled the stream.
        async fn ack(mut self) -> Option<pb::SegmentAck> {
            drop(self.target_out);
            frame::read::<pb::SegmentAck, _>(&mut self.from_target, MAX_SMALL_FRAME)
                .await
                .ok()
        }
    }

    /// `model.bin`, holding [`DATA`].
    fn model() -> Entry {
        Entry::file("model.bin", DATA.len() as u64, 0o644, (1_700_000_000, 0), 0)
    }

    /// Sends one segment holding `model.bin` (= [`DATA`]) from `peer`, with `trailer` as the
    /// source's hash (its true hash if `None`); returns what the target did and its ack.
    async fn send(
        rig: &Rig,
        peer: &CertificateDer<'static>,
        trailer: Option<[u8; 32]>,
    ) -> (Handled, Option<pb::SegmentAck>) {
        let mut pipe = Pipe::offering(&model(), DATA).await;
        let hash = trailer.unwrap_or(*blake3::hash(DATA).as_bytes());
        let t = pb::SegmentTrailer {
            blake3: hash.to_vec(),
        };
        frame::write(&mut pipe.to_target, &t).await.unwrap();
        let handled = pipe.handled(rig, peer).await;
        (handled, pipe.ack().await)
    }

    fn target_reports(control: &FakeCoordinator) -> Vec<Result<[u8; 32], Failure>> {
        control.with(|s| {
            s.reports
                .iter()
                .filter(|r| r.role == Role::Target)
                .map(|r| r.result.clone())
                .collect()
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_good_segment_is_written_committed_and_reported_with_its_hash() {
        let rig = rig();
        let (h, ack) = send(&rig, &rig.src, None).await;
        let ack = ack.expect("an ack");
        let hash = *blake3::hash(DATA).as_bytes();
        assert!(h.ok && h.acked && h.close.is_none());
        assert!(ack.ok, "{}", ack.error);
        assert_eq!(ack.blake3, hash.to_vec());
        assert_eq!(rig.sink.file("model.bin").as_deref(), Some(DATA));
        assert_eq!(target_reports(&rig.control), vec![Ok(hash)]);
        // The report carries the source's hash (the trailer's, equal to the target's), so the
        // coordinator verifies the segment on it and the ack tells the source so.
        let reported = rig.control.with(|s| s.reports[0].source_hash);
        assert_eq!(reported, Some(hash));
        assert!(ack.verified);
        // The lease is checked before writing and again before publishing.
        assert_eq!(rig.control.with(|s| s.lease_checks), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_the_coordinator_refuses_is_refused_before_a_byte_is_written() {
        let rig = rig();
        rig.control.with(|s| {
            s.refuse_leases_after = Some(0);
            s.lease_refusal = "lease expired".into();
        });
        let (h, ack) = send(&rig, &rig.src, None).await;
        let ack = ack.expect("an ack");
        assert!(!h.ok && !ack.ok);
        assert_eq!(ack.error, "lease refused: lease expired");
        assert!(rig.sink.files.lock().unwrap().is_empty());
        assert!(target_reports(&rig.control).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_lost_while_streaming_publishes_nothing() {
        let rig = rig();
        rig.control.with(|s| {
            s.refuse_leases_after = Some(1);
            s.lease_refusal = "lease 3 is not current".into();
        });
        let (_, ack) = send(&rig, &rig.src, None).await;
        let ack = ack.expect("an ack");
        assert_eq!(
            ack.error,
            "lease lost while receiving: lease 3 is not current"
        );
        assert!(rig.sink.files.lock().unwrap().is_empty());
        assert!(target_reports(&rig.control).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_hash_is_refused_counted_and_nothing_is_published() {
        let rig = rig();
        let (h, ack) = send(&rig, &rig.src, Some([9; 32])).await;
        let ack = ack.expect("an ack");
        assert!(!h.ok);
        assert!(ack.error.starts_with("BLAKE3 mismatch"), "{}", ack.error);
        assert!(!ack.retry_later);
        assert!(!ack.permanent, "damage on the way may not happen again");
        assert!(rig.sink.files.lock().unwrap().is_empty());
        let reports = target_reports(&rig.control);
        assert_eq!(reports.len(), 1);
        assert!(
            matches!(&reports[0], Err(f) if !f.retry_later && f.error.starts_with("BLAKE3 mismatch"))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_segment_refused_for_what_it_holds_is_refused_for_good() {
        let rig = rig();
        let huge = Entry::file("huge.bin", MAX_SEGMENT_BYTES + 1, 0o644, (1, 0), 0);
        let mut pipe = Pipe::offering(&huge, b"").await;
        let h = pipe.handled(&rig, &rig.src).await;
        let ack = pipe.ack().await.expect("an ack");
        assert!(!h.ok);
        assert!(ack.error.contains("over the limit"), "{}", ack.error);
        assert!(ack.permanent && !ack.retry_later);
        // The source passes it on as it is.
        let f = crate::source::refused_for_tests("t", ack);
        assert!(f.permanent);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_is_reported_by_the_target_itself_as_a_counted_failure() {
        let rig = rig();
        *rig.sink.fail_after_writes.lock().unwrap() = Some(0);
        let (_, ack) = send(&rig, &rig.src, None).await;
        let ack = ack.expect("an ack");
        assert!(!ack.permanent, "space may be freed");
        assert!(
            ack.error
                .starts_with("no space left on the target's device"),
            "{}",
            ack.error
        );
        let reports = target_reports(&rig.control);
        assert_eq!(reports.len(), 1, "the target reports its own write failure");
        assert!(matches!(&reports[0], Err(f) if !f.retry_later && f.error == ack.error));
        assert!(rig.sink.files.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_is_not_the_assigned_source_is_cut_off() {
        let rig = rig();
        let (h, ack) = send(&rig, &rig.other, None).await;
        assert_eq!(h.close, Some((4, &b"peer is not the assigned source"[..])));
        assert_eq!(
            ack.expect("an ack").error,
            "peer is not src, the assigned source"
        );
        assert!(rig.sink.files.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_coordinator_refuses_the_segment_without_writing() {
        let rig = rig();
        rig.control.with(|s| s.unavailable = true);
        let (_, ack) = send(&rig, &rig.src, None).await;
        let ack = ack.expect("an ack");
        assert!(
            ack.error.starts_with("cannot confirm the lease"),
            "{}",
            ack.error
        );
        assert!(rig.sink.files.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peers_that_send_nothing_give_their_slots_up_and_a_good_segment_still_lands() {
        let mut rig = rig();
        rig.target.header_timeout = Duration::from_millis(300);
        rig.target.stall_timeout = Duration::from_millis(600);
        let remote: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // Every slot taken by a stream whose peer never sends its header (its end kept open).
        let mut silent = Vec::new();
        for _ in 0..4 {
            silent.push((tokio::io::duplex(64), tokio::io::duplex(64)));
        }
        let stalled = futures::future::join_all(silent.iter_mut().map(
            |((_keep_open, target_in), (target_out, _))| {
                rig.target.handle(&rig.src, remote, target_out, target_in)
            },
        ));
        // A peer that sends a header and part of the bytes, then nothing (its end kept open).
        let mut half_sent = Pipe::offering(&model(), &DATA[..5]).await;
        let (stalled, good, half) = tokio::join!(
            stalled,
            send(&rig, &rig.src, None),
            half_sent.handled(&rig, &rig.src)
        );
        for h in stalled {
            assert_eq!(h.close, Some((5, &b"segment header timeout"[..])));
        }
        let (h, ack) = good;
        assert!(h.ok, "the good segment waited for a slot and landed");
        assert!(ack.expect("an ack").ok);
        assert_eq!(rig.sink.file("model.bin").as_deref(), Some(DATA));
        assert!(!half.ok && half.acked);
        let ack = half_sent.ack().await.expect("an ack");
        assert!(ack.error.contains("sent nothing for"), "{}", ack.error);
    }
}
