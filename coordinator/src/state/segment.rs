//! A segment's lifecycle: its states, the transitions between them, and how long it waits
//! after a failure.

use super::*;

/// A segment as the source registers it. The fingerprint (BLAKE3 of the source's manifest record:
/// paths, offsets, sizes, mtimes, inodes) tells a replanned segment from the one already known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentReg {
    /// Segment id.
    pub id: u64,
    /// File bytes it carries.
    pub bytes: u64,
    /// Files it accounts for.
    pub files: u32,
    /// Fingerprint of its description.
    pub fingerprint: Digest,
    /// Which piece of a split file it is (from 0; 0 for a bundle).
    pub piece_index: u32,
    /// How many pieces its split file has (0 for a bundle). The pieces of a file have
    /// consecutive ids: the first is `id - piece_index`.
    pub piece_count: u32,
}

/// How long a segment waits before its next try after its `n`-th failure (`n` from 1):
/// `RETRY_BASE_MS · 2^(n-1)`, capped at [`RETRY_CAP_MS`], with "equal jitter" — half of it
/// fixed, the other half drawn from a hash of `(migration, segment, n)`. The jitter spreads
/// segments that failed together (a full disk fails them all at once) so they do not come back
/// together; it is derived, not random, because every replica must apply the same state.
pub fn retry_delay_ms(mid: u64, sid: u64, n: u32) -> u64 {
    let full = RETRY_BASE_MS
        .saturating_mul(1u64 << n.saturating_sub(1).min(32))
        .min(RETRY_CAP_MS);
    let half = full / 2;
    half + mix(mid, sid, n as u64) % (full - half + 1)
}

/// splitmix64 of the three values: a well-spread deterministic hash.
pub(super) fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(b.rotate_left(21))
        .wrapping_add(c.rotate_left(42))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Where a segment is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SegState {
    /// Waiting for a lease.
    Pending,
    /// Held by the source until `expires_ms`; `epoch` is the fencing token ([`fencing_token`] of
    /// the granting command).
    Leased {
        /// Fencing token.
        epoch: u64,
        /// Expiry (unix ms).
        expires_ms: u64,
    },
    /// Target holds the bytes durably and both ends computed the same hash.
    Verified,
    /// Given up on: it failed `spec.max_attempts` times (`last_error` says why). Terminal.
    Failed,
    /// Its file changed after the scan (a piece of a split file that is no longer the scanned
    /// file): the next round sends the file as it is then. Terminal.
    Stale,
}

/// A segment, as the coordinator tracks it (its contents are described by the source's manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "SegmentRecord", into = "SegmentRecord")]
pub struct Segment {
    /// Bytes of file data.
    pub bytes: u64,
    /// Files it accounts for.
    pub files: u32,
    /// Fingerprint of the source's description of it.
    pub fingerprint: Digest,
    /// Which piece of a split file it is (0 for a bundle).
    pub piece_index: u32,
    /// How many pieces its split file has (0 for a bundle): pieces of one file all go to the
    /// target that got the first one, whose state directory holds the file's sidecar.
    pub piece_count: u32,
    /// The member of the migration's target pool ([`Migration::targets`]) its latest lease
    /// was granted to (0 before any lease).
    pub target: u16,
    /// Lifecycle state.
    pub state: SegState,
    /// Leases granted for it.
    pub leases: u32,
    /// Failed attempts.
    pub attempts: u32,
    /// While `Pending` after a failure: not leased again before this time (unix ms; 0: at
    /// once). Set by the backoff ([`retry_delay_ms`]), cleared when leased.
    pub not_before_ms: u64,
    /// What each end reported under the current lease (or the verified hash):
    /// [`Segment::source_hash`], [`Segment::target_hash`].
    pub hashes: Hashes,
    /// Last failure.
    pub last_error: Reason,
}

/// [`Segment`] as it is encoded (records, snapshots, JSON): both hashes as options. Kept so the
/// compact [`Hashes`] in memory changed nothing on disk.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename = "Segment")]
struct SegmentRecord {
    bytes: u64,
    files: u32,
    fingerprint: Digest,
    piece_index: u32,
    piece_count: u32,
    target: u16,
    state: SegState,
    leases: u32,
    attempts: u32,
    not_before_ms: u64,
    source_hash: Option<Digest>,
    target_hash: Option<Digest>,
    last_error: Reason,
}

impl From<SegmentRecord> for Segment {
    fn from(r: SegmentRecord) -> Self {
        Segment {
            bytes: r.bytes,
            files: r.files,
            fingerprint: r.fingerprint,
            piece_index: r.piece_index,
            piece_count: r.piece_count,
            target: r.target,
            state: r.state,
            leases: r.leases,
            attempts: r.attempts,
            not_before_ms: r.not_before_ms,
            hashes: Hashes::of(r.source_hash, r.target_hash),
            last_error: r.last_error,
        }
    }
}

impl From<Segment> for SegmentRecord {
    fn from(s: Segment) -> Self {
        SegmentRecord {
            bytes: s.bytes,
            files: s.files,
            fingerprint: s.fingerprint,
            piece_index: s.piece_index,
            piece_count: s.piece_count,
            target: s.target,
            state: s.state,
            leases: s.leases,
            attempts: s.attempts,
            not_before_ms: s.not_before_ms,
            source_hash: s.source_hash(),
            target_hash: s.target_hash(),
            last_error: s.last_error,
        }
    }
}

/// The two ends' hashes of a segment, in 40 bytes instead of two `Option<Digest>`'s 66: an
/// attempt has at most one end's hash until the second report, which either verifies the
/// segment (the two are the same) or fails it (both are forgotten). `Differ` is kept for a
/// record that holds two different hashes all the same (none is written today).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Hashes {
    /// Neither end reported.
    #[default]
    None,
    /// Only the source reported.
    Source(Digest),
    /// Only the target reported.
    Target(Digest),
    /// Both reported this hash.
    Same(Digest),
    /// Both reported, differently: `[source, target]`.
    Differ(Box<[Digest; 2]>),
}

impl Hashes {
    /// From the source's and the target's hash.
    pub fn of(source: Option<Digest>, target: Option<Digest>) -> Self {
        match (source, target) {
            (None, None) => Hashes::None,
            (Some(s), None) => Hashes::Source(s),
            (None, Some(t)) => Hashes::Target(t),
            (Some(s), Some(t)) if s == t => Hashes::Same(s),
            (Some(s), Some(t)) => Hashes::Differ(Box::new([s, t])),
        }
    }

    /// The source's and the target's hash.
    pub fn pair(&self) -> (Option<Digest>, Option<Digest>) {
        match self {
            Hashes::None => (None, None),
            Hashes::Source(s) => (Some(*s), None),
            Hashes::Target(t) => (None, Some(*t)),
            Hashes::Same(h) => (Some(*h), Some(*h)),
            Hashes::Differ(b) => (Some(b[0]), Some(b[1])),
        }
    }
}

/// Why a segment's last attempt failed. Empty for nearly every segment, so it costs one
/// pointer (a `String` costs three: 16 bytes more on each of millions of segments). Encoded as
/// a string.
#[derive(Clone, Default, PartialEq, Eq)]
#[allow(clippy::box_collection)] // the point: a thin pointer, an allocation only when it fails
pub struct Reason(Option<Box<String>>);

impl Reason {
    /// No reason: the segment has not failed, or its failure was cleared.
    pub fn clear(&mut self) {
        self.0 = None;
    }
}

impl std::ops::Deref for Reason {
    type Target = str;

    fn deref(&self) -> &str {
        self.0.as_deref().map_or("", String::as_str)
    }
}

impl From<String> for Reason {
    fn from(s: String) -> Self {
        Reason((!s.is_empty()).then(|| Box::new(s)))
    }
}

impl From<&str> for Reason {
    fn from(s: &str) -> Self {
        s.to_string().into()
    }
}

impl std::fmt::Debug for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self)
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(String::deserialize(d)?.into())
    }
}

/// A segment's transitions: every change of its lifecycle state goes through one of these.
impl Segment {
    /// Leased to the holder of fencing token `epoch` until `expires_ms`, to be sent to member
    /// `target` of the pool: a fresh attempt, with no hashes yet and no backoff left.
    pub(super) fn grant(&mut self, epoch: u64, expires_ms: u64, target: u16) {
        self.state = SegState::Leased { epoch, expires_ms };
        self.target = target;
        self.leases = self.leases.saturating_add(1);
        self.not_before_ms = 0;
        self.hashes = Hashes::None;
    }

    /// Extends lease `epoch` to at least `expires_ms` if it is current at `now_ms`; whether
    /// it was.
    pub(super) fn extend(&mut self, epoch: u64, now_ms: u64, expires_ms: u64) -> bool {
        match self.state {
            SegState::Leased {
                epoch: e,
                expires_ms: old,
            } if e == epoch && old > now_ms => {
                self.state = SegState::Leased {
                    epoch,
                    expires_ms: old.max(expires_ms),
                };
                true
            }
            _ => false,
        }
    }

    /// Its lease ran out: pending again at once (the holder may simply be slow; no attempt is
    /// counted).
    pub(super) fn expire(&mut self) {
        self.state = SegState::Pending;
        self.last_error = "lease expired".into();
    }

    /// Both ends reported the same hash.
    pub(super) fn verify(&mut self) {
        self.state = SegState::Verified;
        self.last_error.clear();
    }

    /// What every failed attempt leaves: no hashes of it, and why it failed.
    pub(super) fn forget_attempt(&mut self, why: &str) {
        self.hashes = Hashes::None;
        self.last_error = why.into();
    }

    /// Left to the next round. Terminal.
    pub(super) fn go_stale(&mut self) {
        self.state = SegState::Stale;
        self.not_before_ms = 0;
    }

    /// Given up on. Terminal.
    pub(super) fn give_up(&mut self) {
        self.state = SegState::Failed;
        self.not_before_ms = 0;
    }

    /// The hash the source reported under the current lease (or the verified one).
    pub fn source_hash(&self) -> Option<Digest> {
        self.hashes.pair().0
    }

    /// The hash the target reported under the current lease (or the verified one).
    pub fn target_hash(&self) -> Option<Digest> {
        self.hashes.pair().1
    }

    /// Whether it is a piece of a file split into several.
    pub fn is_piece(&self) -> bool {
        self.piece_count > 1
    }

    /// Pending again, not to be leased before `not_before_ms`; returns that time, never 0 (0
    /// means "no backoff" in the stored record).
    pub(super) fn wait_until(&mut self, not_before_ms: u64) -> u64 {
        let not_before_ms = not_before_ms.max(1);
        self.state = SegState::Pending;
        self.not_before_ms = not_before_ms;
        not_before_ms
    }
}
