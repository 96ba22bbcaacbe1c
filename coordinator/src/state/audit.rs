//! The audit log: every operator call that changes (or tried to change) the cluster, recorded in
//! the same Raft entry as its effect (`Command::Audited`), so no change is visible without its
//! record; calls refused for their certificate's role are recorded too (`Command::Audit`).
//! Records are numbered from 1 and hash-chained: each record's BLAKE3 covers its fields and the
//! previous record's hash, so a record changed or removed afterwards breaks the chain
//! ([`verify_chain`]). The newest [`AUDIT_KEPT`] records are kept (the state, and every
//! snapshot, would otherwise grow with every call for as long as the cluster lives); each
//! record is also written to every node's log as it is applied (target `ferry_audit`), which
//! is where a longer history is kept.

use super::*;

/// Who made a call and what it was, as the node that received it saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditNote {
    /// Leader time of the proposal (unix ms).
    pub at_ms: u64,
    /// The operator's name, from the certificate.
    pub who: String,
    /// The certificate's role.
    pub role: String,
    /// The caller's address.
    pub from: String,
    /// The call (`CreateMigration`, `AddNode`, ...).
    pub call: String,
    /// What it named (a migration, a node, a throttle), in words.
    pub what: String,
}

/// One record of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Its number (1 for the first).
    pub seq: u64,
    /// The call.
    pub note: AuditNote,
    /// `ok`, `refused: <why>` (the state machine refused it), `denied: <why>` (its certificate
    /// may not), or `requested` (a membership change, whose outcome follows in its own record).
    pub decision: String,
    /// The previous record's hash (zeros for the first).
    pub prev: Digest,
    /// BLAKE3 of this record's fields and `prev`.
    pub hash: Digest,
}

/// The hash of a record with these fields.
pub fn record_hash(seq: u64, note: &AuditNote, decision: &str, prev: &Digest) -> Digest {
    let mut h = blake3::Hasher::new_derive_key("ferry audit record v1");
    h.update(&seq.to_le_bytes());
    h.update(&note.at_ms.to_le_bytes());
    for field in [
        &note.who, &note.role, &note.from, &note.call, &note.what, decision,
    ] {
        h.update(&(field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
    h.update(prev);
    *h.finalize().as_bytes()
}

/// Whether `records` (consecutive, in order) chain: each one's hash is right and names the one
/// before; the first's `prev` is `first_prev` when given. Returns the first broken record's
/// number.
pub fn verify_chain(records: &[AuditRecord], first_prev: Option<Digest>) -> Result<(), u64> {
    let mut prev = first_prev;
    for r in records {
        if prev.is_some_and(|p| p != r.prev)
            || r.hash != record_hash(r.seq, &r.note, &r.decision, &r.prev)
        {
            return Err(r.seq);
        }
        prev = Some(r.hash);
    }
    Ok(())
}

/// Longest text kept in a record's field.
const MAX_FIELD: usize = 512;

/// Audit records kept: the oldest beyond these are dropped as new ones come (at most about
/// 60 MiB with every field at its longest, a few MiB in practice).
pub const AUDIT_KEPT: usize = 20_000;

impl State {
    /// Appends a record of `note` with `decision`.
    pub(super) fn audit(&mut self, mut note: AuditNote, decision: String) {
        for f in [
            &mut note.who,
            &mut note.role,
            &mut note.from,
            &mut note.call,
            &mut note.what,
        ] {
            if f.len() > MAX_FIELD {
                *f = ferry_common::text::head(f, MAX_FIELD).to_string();
            }
        }
        let decision = ferry_common::text::head(&decision, MAX_FIELD).to_string();
        let (seq, prev) = match self.audit.last_key_value() {
            Some((&seq, r)) => (seq + 1, r.hash),
            None => (1, [0; 32]),
        };
        let hash = record_hash(seq, &note, &decision, &prev);
        tracing::info!(
            target: "ferry_audit",
            seq,
            at_ms = note.at_ms,
            who = %note.who,
            role = %note.role,
            from = %note.from,
            call = %note.call,
            what = %note.what,
            decision = %decision,
            hash = %ferry_common::hash::hex(&hash),
            "Audit record."
        );
        self.audit.insert(
            seq,
            AuditRecord {
                seq,
                note,
                decision,
                prev,
                hash,
            },
        );
        self.dirty.audit.insert(seq);
        while self.audit.len() > AUDIT_KEPT {
            if let Some((old, _)) = self.audit.pop_first() {
                self.dirty.audit.insert(old);
            }
        }
    }

    /// Applies `cmd` and records its outcome.
    pub(super) fn audited(&mut self, token: u64, note: AuditNote, cmd: Command) -> Response {
        let r = match cmd {
            Command::Batch(_) | Command::Audited { .. } => {
                refused("an audited command is one command")
            }
            c => self.apply_one(token, c),
        };
        let decision = match &r {
            Response::Refused(why) => format!("refused: {why}"),
            _ => "ok".to_string(),
        };
        self.audit(note, decision);
        r
    }
}
