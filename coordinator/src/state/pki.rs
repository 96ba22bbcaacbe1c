//! Enrolment and certificates: join tokens (single use, with an expiry, only a digest of their
//! secret kept), the certificates the coordinators signed (on a join or a renewal), and revoked
//! agents. Kept in Raft so every node refuses a used token, a revoked agent and a renewal it
//! must not sign, whichever node an agent reaches. Records: `pki` (the whole [`Pki`]: it is
//! bounded).

use super::*;

/// Most tokens that may be open (neither used nor expired) at once.
pub const MAX_OPEN_TOKENS: usize = 256;
/// Longest a token may be valid.
pub const MAX_TOKEN_TTL_MS: u64 = 7 * 86_400_000;
/// How long a used or expired token is still listed (and a replay of it named as such).
pub const TOKEN_KEPT_MS: u64 = 86_400_000;
/// Certificates kept per identity (the newest); expired ones go after [`CERT_KEPT_MS`].
pub const CERTS_KEPT_PER_IDENTITY: usize = 8;
/// How long a certificate is listed after it expired.
pub const CERT_KEPT_MS: u64 = 30 * 86_400_000;
/// Seconds a certificate is valid before it was signed (`ferry_common::pki::CLOCK_SKEW`).
pub const SKEW_S: i64 = ferry_common::pki::CLOCK_SKEW.as_secs() as i64;

/// A join token as the cluster keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Its id (not secret).
    pub id: String,
    /// `ferry_common::enrol::secret_digest` of its secret.
    pub digest: Digest,
    /// Who may join with it: `agent`.
    pub role: String,
    /// The only agent name it may join as (empty: any name not in use).
    pub name: String,
    /// Made at (unix ms).
    pub created_ms: u64,
    /// Refused from (unix ms).
    pub expires_ms: u64,
    /// The operator who made it.
    pub created_by: String,
    /// Its use, once used.
    pub used: Option<TokenUse>,
}

/// A token's use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    /// The agent that joined with it.
    pub agent: String,
    /// When (unix ms).
    pub at_ms: u64,
    /// From which address.
    pub from: String,
}

/// A certificate a coordinator signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// Serial, hex.
    pub serial: String,
    /// Whose: `agent <name>`, `operator <name> (<role>)`.
    pub identity: String,
    /// Valid from (unix seconds).
    pub not_before_s: i64,
    /// Valid until (unix seconds).
    pub not_after_s: i64,
    /// How it came: `join token <id>`, `renewal of <serial>`.
    pub via: String,
}

/// A revoked agent: its certificates signed before `at_s` are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The first second not revoked (the revocation's time, rounded up).
    pub at_s: i64,
    /// The operator who revoked it.
    pub by: String,
}

/// Tokens, certificates and revocations.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pki {
    /// Join tokens by id.
    pub tokens: BTreeMap<String, JoinTokenRecord>,
    /// Signed certificates by serial.
    pub certs: BTreeMap<String, IssuedCert>,
    /// Revoked agents by name.
    pub revoked: BTreeMap<String, Revocation>,
}

/// The identity text of agent `name` in records.
pub fn agent_identity(name: &str) -> String {
    format!("agent {name}")
}

/// The identity text of operator `name` with `role` in records.
pub fn operator_identity(name: &str, role: &str) -> String {
    format!("operator {name} ({role})")
}

impl Pki {
    /// Whether a certificate of agent `name` valid from `not_before_s` is revoked: it was
    /// signed ([`SKEW_S`] after its start) before the agent's revocation.
    pub fn is_revoked(&self, name: &str, not_before_s: i64) -> bool {
        self.revoked
            .get(name)
            .is_some_and(|r| not_before_s.saturating_add(SKEW_S) < r.at_s)
    }

    /// The earliest second a certificate for agent `name` may be signed at so that it is not
    /// revoked: `now_s`, or the revocation's second if later.
    pub fn signing_second(&self, name: &str, now_s: i64) -> i64 {
        self.revoked.get(name).map_or(now_s, |r| now_s.max(r.at_s))
    }

    /// Drops used and expired tokens older than [`TOKEN_KEPT_MS`], expired certificates older
    /// than [`CERT_KEPT_MS`], and all but the newest [`CERTS_KEPT_PER_IDENTITY`] per identity.
    fn prune(&mut self, now_ms: u64) {
        self.tokens.retain(|_, t| {
            let ended = t.used.as_ref().map_or(t.expires_ms, |u| u.at_ms);
            ended.saturating_add(TOKEN_KEPT_MS) > now_ms
        });
        let now_s = (now_ms / 1000) as i64;
        let keep_s = (CERT_KEPT_MS / 1000) as i64;
        self.certs
            .retain(|_, c| c.not_after_s.saturating_add(keep_s) > now_s);
        let mut per: BTreeMap<&str, Vec<(i64, &str)>> = BTreeMap::new();
        for c in self.certs.values() {
            per.entry(&c.identity)
                .or_default()
                .push((c.not_before_s, &c.serial));
        }
        let mut drop = Vec::new();
        for mut list in per.into_values() {
            if list.len() > CERTS_KEPT_PER_IDENTITY {
                list.sort();
                let extra = list.len() - CERTS_KEPT_PER_IDENTITY;
                drop.extend(list[..extra].iter().map(|(_, s)| s.to_string()));
            }
        }
        for s in drop {
            self.certs.remove(&s);
        }
    }
}

impl State {
    /// An admin makes a join token.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_token(
        &mut self,
        id: String,
        digest: Digest,
        role: String,
        name: String,
        ttl_ms: u64,
        by: String,
        now_ms: u64,
    ) -> Response {
        if role != "agent" {
            return refused(format!(
                "a join token is for an agent (--role agent), not {role:?}"
            ));
        }
        if ttl_ms == 0 || ttl_ms > MAX_TOKEN_TTL_MS {
            return refused(format!(
                "a join token is valid for a time up to {} days; {ttl_ms} ms is not",
                MAX_TOKEN_TTL_MS / 86_400_000
            ));
        }
        if !name.is_empty() {
            if let Err(e) = ferry_common::names::validate_name(&name) {
                return refused(e.to_string());
            }
        }
        if self.pki.tokens.contains_key(&id) {
            return refused(format!("a join token {id} exists already; make another"));
        }
        self.pki.prune(now_ms);
        let open = self
            .pki
            .tokens
            .values()
            .filter(|t| t.used.is_none() && t.expires_ms > now_ms)
            .count();
        if open >= MAX_OPEN_TOKENS {
            return refused(format!(
                "{open} join tokens are open (the most kept): wait for some to be used or \
                 expire (`ferryctl token list`)"
            ));
        }
        self.pki.tokens.insert(
            id.clone(),
            JoinTokenRecord {
                id,
                digest,
                role,
                name,
                created_ms: now_ms,
                expires_ms: now_ms.saturating_add(ttl_ms),
                created_by: by,
                used: None,
            },
        );
        self.dirty.pki = true;
        Response::Ok
    }

    /// An agent joins with a token; `cert` is the certificate the node signed for it, given
    /// out only if this is applied. Refused: an unknown, used or expired token, a wrong
    /// secret, a name the token does not allow or that another agent holds.
    pub(super) fn use_token(
        &mut self,
        id: &str,
        digest: Digest,
        agent: &str,
        from: String,
        cert: IssuedCert,
        now_ms: u64,
    ) -> Response {
        let Some(t) = self.pki.tokens.get(id) else {
            return refused(format!(
                "join token {id} is not known (never made, or long expired): ask an admin for \
                 a new one (`ferryctl token create`)"
            ));
        };
        // The secret first: nothing about the token is said to one who does not hold it.
        if t.digest != digest {
            return refused(format!(
                "join token {id}: the secret is wrong; copy the token whole"
            ));
        }
        if let Some(u) = &t.used {
            return refused(format!(
                "join token {id} was used already (by agent {} from {}): a token is good for \
                 one join; ask an admin for a new one",
                u.agent, u.from
            ));
        }
        if t.expires_ms <= now_ms {
            return refused(format!(
                "join token {id} expired {} s ago: ask an admin for a new one",
                (now_ms - t.expires_ms) / 1000
            ));
        }
        if !t.name.is_empty() && t.name != agent {
            return refused(format!(
                "join token {id} is for agent {}, not {agent}",
                t.name
            ));
        }
        if let Some(why) = self.name_in_use(agent, now_ms) {
            return refused(why);
        }
        if self.pki.is_revoked(agent, cert.not_before_s) {
            return refused(format!(
                "agent {agent} was revoked moments ago; join again in a second"
            ));
        }
        let t = self.pki.tokens.get_mut(id).expect("looked up above");
        t.used = Some(TokenUse {
            agent: agent.to_string(),
            at_ms: now_ms,
            from,
        });
        self.pki.certs.insert(cert.serial.clone(), cert);
        self.pki.prune(now_ms);
        self.dirty.pki = true;
        Response::Ok
    }

    /// Why agent `name` may not join (another agent by that name is known and not revoked),
    /// if it may not.
    fn name_in_use(&self, name: &str, now_ms: u64) -> Option<String> {
        let now_s = (now_ms / 1000) as i64;
        let identity = agent_identity(name);
        let live_cert = self.pki.certs.values().any(|c| {
            c.identity == identity
                && c.not_after_s > now_s
                && !self.pki.is_revoked(name, c.not_before_s)
        });
        let revoked = self.pki.revoked.contains_key(name);
        if live_cert || (self.agents.contains_key(name) && !revoked) {
            return Some(format!(
                "an agent named {name} exists already: pick another name, or revoke the old \
                 one first (`ferryctl agents revoke {name}`)"
            ));
        }
        None
    }

    /// A node signed a renewed certificate for an agent (which proved it holds the one whose
    /// serial is `previous` and that it was valid from `previous_not_before_s`).
    pub(super) fn record_cert(
        &mut self,
        agent: &str,
        previous_not_before_s: i64,
        cert: IssuedCert,
        now_ms: u64,
    ) -> Response {
        if self.pki.is_revoked(agent, previous_not_before_s) {
            return refused(format!(
                "agent {agent} is revoked: its certificate is not renewed"
            ));
        }
        self.pki.certs.insert(cert.serial.clone(), cert);
        self.pki.prune(now_ms);
        self.dirty.pki = true;
        Response::Ok
    }

    /// A node signed an operator's certificate (`CreateUser`, a renewal) or a coordinator
    /// node's (a renewal).
    pub(super) fn record_issued_cert(&mut self, cert: IssuedCert, now_ms: u64) -> Response {
        self.pki.certs.insert(cert.serial.clone(), cert);
        self.pki.prune(now_ms);
        self.dirty.pki = true;
        Response::Ok
    }

    /// An admin revokes an agent: every certificate of it signed until now is refused from
    /// now on, its leases end, and it may join again only with a new token.
    pub(super) fn revoke_agent(&mut self, agent: &str, by: String, now_ms: u64) -> Response {
        let known = self.agents.contains_key(agent)
            || self
                .pki
                .certs
                .values()
                .any(|c| c.identity == agent_identity(agent));
        if !known {
            return refused(format!(
                "no agent {agent} is registered or has a certificate from this cluster"
            ));
        }
        let at_s = now_ms.div_ceil(1000) as i64;
        // Its session ends: its next call must register again, and that is refused.
        if let Some(a) = self.agents.get_mut(agent) {
            a.session = 0;
            self.dirty.agents.insert(agent.to_string());
        }
        // Its leases end now: a target asked to confirm one refuses the bytes, and the
        // segments go to whoever sends for the migration next.
        let sources: Vec<u64> = self.sourced_by(agent).map(|m| m.id).collect();
        for mid in sources {
            for id in self.leased.remove(&mid).unwrap_or_default() {
                let seg = self.segments.get_mut(&(mid, id)).expect("indexed");
                seg.expire();
                seg.last_error = format!("source agent {agent} was revoked").into();
                self.pending.entry(mid).or_default().insert(id);
                self.dirty.segments.insert((mid, id));
            }
        }
        self.pki
            .revoked
            .insert(agent.to_string(), Revocation { at_s, by });
        self.dirty.pki = true;
        Response::Ok
    }
}
