//! Enrolment and renewal: agents get certificates for keys they made themselves. `Join` (on the
//! join listener, without a client certificate) takes a one-time token checked in Raft;
//! `RenewCertificate` (on the agent API) takes the agent's current certificate. Either way the
//! node signs with the cluster CA's key, and the certificate is given out only after Raft
//! recorded it (and, for a join, used the token up).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_common::pki::{Ca, CertInfo, Identity};
use ferry_proto::control as pb;
use tonic::{Request, Response, Status};

use super::{now_ms, Core};
use crate::state::{agent_identity, AuditNote, Command, IssuedCert, Response as R};

/// Signs agents' certificates with the cluster CA's key.
pub struct Signer {
    ca: Ca,
    /// Every CA certificate this node trusts (two during a CA rotation): what agents are told
    /// to trust.
    ca_pem: String,
    /// How long a signed certificate is valid, by kind.
    pub lifetimes: Lifetimes,
}

/// How long the certificates a node signs are valid (each at least [`MIN_LIFETIME`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Agents' (joins and renewals).
    pub agent: Duration,
    /// Operators' (`user create`, renewals).
    pub operator: Duration,
    /// Coordinator nodes' (renewals).
    pub coordinator: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            agent: ferry_common::pki::AGENT_LIFETIME,
            operator: ferry_common::pki::OPERATOR_LIFETIME,
            coordinator: ferry_common::pki::COORDINATOR_LIFETIME,
        }
    }
}

/// The CA key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// It could not be read.
    #[error(transparent)]
    Pki(#[from] ferry_common::pki::PkiError),
    /// It is not the key of the CA this node trusts.
    #[error("{key} is not the key of a CA certificate in {ca}: every certificate it signed would be refused; point ca_key at the CA's own key")]
    Mismatch {
        /// The key file.
        key: String,
        /// The CA certificate file.
        ca: String,
    },
}

/// Shortest certificate lifetime a node signs (renewal needs room to happen).
pub const MIN_LIFETIME: Duration = Duration::from_secs(30);

impl Signer {
    /// Loads the CA key at `key` and checks it belongs to one of the CA certificates
    /// `ca_pem` (read from `ca_path`; during a CA rotation it holds the old and the new CA).
    pub fn load(
        key: &Path,
        ca_path: &Path,
        ca_pem: &[u8],
        lifetimes: Lifetimes,
    ) -> Result<Signer, SignerError> {
        let ca = Ca::load_key(key)?;
        if !ferry_common::pki::ca_public_keys(ca_pem)?.contains(&ca.public_key_der()) {
            return Err(SignerError::Mismatch {
                key: key.display().to_string(),
                ca: ca_path.display().to_string(),
            });
        }
        Ok(Signer {
            ca,
            ca_pem: String::from_utf8_lossy(ca_pem).into_owned(),
            lifetimes: Lifetimes {
                agent: lifetimes.agent.max(MIN_LIFETIME),
                operator: lifetimes.operator.max(MIN_LIFETIME),
                coordinator: lifetimes.coordinator.max(MIN_LIFETIME),
            },
        })
    }

    /// Signs `csr` for agent `name`, valid from the second `sign_s` (see
    /// `Pki::signing_second`).
    fn sign_agent(
        &self,
        csr: &[u8],
        name: &str,
        sign_s: i64,
    ) -> Result<(String, CertInfo), Status> {
        let at = UNIX_EPOCH + Duration::from_secs(sign_s.max(0) as u64);
        let now = SystemTime::now().max(at);
        self.ca
            .sign_request(
                csr,
                &Identity::Agent(name.to_string()),
                now,
                self.lifetimes.agent,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

impl Signer {
    /// Signs `csr` for operator `name` with `role`, valid for the operators' lifetime.
    pub fn sign_user(
        &self,
        csr: &[u8],
        name: &str,
        role: ferry_common::names::Role,
    ) -> Result<(String, CertInfo), Status> {
        self.ca
            .sign_request(
                csr,
                &Identity::User(name.to_string(), role),
                SystemTime::now(),
                self.lifetimes.operator,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }

    /// Signs `csr` for coordinator node `id`, valid for the coordinators' lifetime.
    pub fn sign_coordinator(&self, csr: &[u8], id: u64) -> Result<(String, CertInfo), Status> {
        self.ca
            .sign_request(
                csr,
                &Identity::Coordinator(id),
                SystemTime::now(),
                self.lifetimes.coordinator,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }

    /// The CA certificates this node trusts (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
}

fn issued(info: &CertInfo, name: &str, via: String) -> IssuedCert {
    IssuedCert {
        serial: info.serial.clone(),
        identity: agent_identity(name),
        not_before_s: info.not_before,
        not_after_s: info.not_after,
        via,
    }
}

/// A node holds no CA key.
pub(crate) fn no_signer() -> Status {
    Status::failed_precondition(
        "this coordinator node holds no CA key, so it signs no certificates: set ca_key in its \
         config (the cluster CA's ca.key), or reach a node that has it",
    )
}

/// Join attempts one address may make per [`ATTEMPT_WINDOW`].
pub const ATTEMPTS_PER_WINDOW: u32 = 10;
/// See [`ATTEMPTS_PER_WINDOW`].
pub const ATTEMPT_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered by the limiter at most (beyond, the oldest windows are forgotten).
const LIMITER_ADDRESSES: usize = 4096;
/// Renewals one identity (agent, operator, coordinator node) may ask one node for per
/// [`ATTEMPT_WINDOW`]: a renewal is due once in two thirds of a lifetime, and a failed one is
/// retried after seconds, not at once.
pub const RENEWALS_PER_WINDOW: u32 = 6;

/// Counts attempts per key (an address, an identity) within a window, and refuses those
/// beyond a number: a peer cannot make a node sign, and Raft record, without end.
pub struct Limiter<K> {
    per_window: u32,
    keys: usize,
    seen: Mutex<HashMap<K, (Instant, u32)>>,
}

/// Why [`Limiter::admit`] refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This key made more than its attempts within the window.
    TooMany,
    /// More keys than remembered made attempts within the window.
    TooManyKeys,
}

impl<K: std::hash::Hash + Eq> Limiter<K> {
    /// `per_window` attempts per key per [`ATTEMPT_WINDOW`], for up to `keys` keys at once.
    pub fn new(per_window: u32, keys: usize) -> Self {
        Limiter {
            per_window,
            keys,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an attempt of `key` at `now`.
    pub fn admit(&self, key: K, now: Instant) -> Result<(), Refusal> {
        let mut seen = self.seen.lock().expect("not poisoned");
        if seen.len() >= self.keys && !seen.contains_key(&key) {
            seen.retain(|_, (start, _)| now.duration_since(*start) < ATTEMPT_WINDOW);
            if seen.len() >= self.keys {
                return Err(Refusal::TooManyKeys);
            }
        }
        let e = seen.entry(key).or_insert((now, 0));
        if now.duration_since(e.0) >= ATTEMPT_WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
        if e.1 > self.per_window {
            return Err(Refusal::TooMany);
        }
        Ok(())
    }
}

/// Counts a renewal asked by `identity` on `core`; refused beyond [`RENEWALS_PER_WINDOW`].
pub(crate) fn admit_renewal(core: &Core, identity: &str) -> Result<(), Status> {
    match core.renewals.admit(identity.to_string(), Instant::now()) {
        Ok(()) => Ok(()),
        Err(Refusal::TooMany) => {
            tracing::warn!(message = "A renewal refused: too many from one identity.", %identity);
            Err(Status::resource_exhausted(format!(
                "{identity} asked for more than {RENEWALS_PER_WINDOW} certificates within {}s; \
                 wait and retry",
                ATTEMPT_WINDOW.as_secs()
            )))
        }
        Err(Refusal::TooManyKeys) => Err(Status::resource_exhausted(
            "too many renewals from too many identities; retry in a minute",
        )),
    }
}

/// The `Enrol` service of the join listener.
pub struct EnrolService {
    core: Arc<Core>,
    attempts: Limiter<IpAddr>,
}

impl EnrolService {
    /// The service over `core` (whose signer signs).
    pub fn new(core: Arc<Core>) -> Self {
        EnrolService {
            core,
            attempts: Limiter::new(ATTEMPTS_PER_WINDOW, LIMITER_ADDRESSES),
        }
    }

    /// Counts an attempt from `ip`; refused beyond [`ATTEMPTS_PER_WINDOW`].
    fn admit(&self, ip: Option<IpAddr>) -> Result<(), Status> {
        let Some(ip) = ip else { return Ok(()) };
        match self.attempts.admit(ip, Instant::now()) {
            Ok(()) => Ok(()),
            Err(Refusal::TooManyKeys) => Err(Status::resource_exhausted(
                "too many join attempts from too many addresses; retry in a minute",
            )),
            Err(Refusal::TooMany) => {
                tracing::warn!(message = "Join attempts refused: too many from one address.", %ip);
                Err(Status::resource_exhausted(format!(
                    "more than {ATTEMPTS_PER_WINDOW} join attempts from {ip} within {}s; wait and retry",
                    ATTEMPT_WINDOW.as_secs()
                )))
            }
        }
    }
}

#[tonic::async_trait]
impl pb::enrol_server::Enrol for EnrolService {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let from = req.remote_addr();
        self.admit(from.map(|a| a.ip()))?;
        let r = req.into_inner();
        ferry_common::names::validate_name(&r.agent)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let signer = self.core.signer.clone().ok_or_else(no_signer)?;
        let now_s = (now_ms() / 1000) as i64;
        let sign_s = self
            .core
            .read_local(|s| s.pki.signing_second(&r.agent, now_s));
        let (pem, info) = signer.sign_agent(&r.csr_der, &r.agent, sign_s)?;
        let from = from.map(|a| a.to_string()).unwrap_or_default();
        let cmd = Command::Audited {
            note: AuditNote {
                at_ms: now_ms(),
                who: r.agent.clone(),
                role: "agent".into(),
                from: from.clone(),
                call: "Join".into(),
                what: format!("join token {} as agent {}", r.token_id, r.agent),
            },
            cmd: Box::new(Command::UseJoinToken {
                id: r.token_id.clone(),
                digest: ferry_common::enrol::secret_digest(&r.secret),
                agent: r.agent.clone(),
                from,
                cert: issued(&info, &r.agent, format!("join token {}", r.token_id)),
                now_ms: now_ms(),
            }),
        };
        match self.core.write(cmd).await? {
            R::Ok => {
                tracing::info!(message = "An agent joined.", agent = %r.agent, token = %r.token_id, serial = %info.serial);
                Ok(Response::new(pb::CertificateResponse {
                    cert_pem: pem,
                    ca_pem: signer.ca_pem.clone(),
                    not_after: info.not_after,
                }))
            }
            R::Refused(why) => Err(Status::permission_denied(why)),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }
}

/// Renews the certificate of agent `name`, who called with `current` (DER).
pub async fn renew(
    core: &Core,
    name: &str,
    current: &[u8],
    csr: &[u8],
) -> Result<pb::CertificateResponse, Status> {
    let signer = core.signer.clone().ok_or_else(no_signer)?;
    admit_renewal(core, &agent_identity(name))?;
    let old = CertInfo::from_der(current).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let now_s = (now_ms() / 1000) as i64;
    let sign_s = core.read_local(|s| s.pki.signing_second(name, now_s));
    let (pem, info) = signer.sign_agent(csr, name, sign_s)?;
    let cmd = Command::RecordCert {
        agent: name.to_string(),
        previous_not_before_s: old.not_before,
        cert: issued(&info, name, format!("renewal of {}", old.serial)),
        now_ms: now_ms(),
    };
    match core.write(cmd).await? {
        R::Ok => {
            tracing::info!(message = "Renewed an agent's certificate.", agent = %name, serial = %info.serial, previous = %old.serial, not_after = info.not_after);
            Ok(pb::CertificateResponse {
                cert_pem: pem,
                ca_pem: signer.ca_pem.clone(),
                not_after: info.not_after,
            })
        }
        R::Refused(why) => Err(Status::permission_denied(why)),
        other => Err(Status::internal(format!("unexpected answer {other:?}"))),
    }
}

/// Signs a renewed certificate for coordinator node `id` (which called with `current`, DER, or
/// is this node), records it in Raft (audited as `who`'s call `call`, from `from`), and
/// returns it (PEM): given out only once recorded.
pub async fn renew_node(
    core: &Core,
    id: u64,
    current: &[u8],
    csr: &[u8],
    from: String,
) -> Result<String, Status> {
    let signer = core.signer.clone().ok_or_else(no_signer)?;
    let who = format!("node-{id}");
    admit_renewal(core, &who)?;
    let member = core
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&id)
        .is_some();
    if !member {
        return Err(Status::permission_denied(format!(
            "coordinator node {id} is not a member of this cluster: its certificate is not renewed"
        )));
    }
    let old = CertInfo::from_der(current).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let (pem, info) = signer.sign_coordinator(csr, id)?;
    let cert = IssuedCert {
        serial: info.serial.clone(),
        identity: format!("coordinator {id}"),
        not_before_s: info.not_before,
        not_after_s: info.not_after,
        via: format!("renewal of {}", old.serial),
    };
    let cmd = Command::Audited {
        note: AuditNote {
            at_ms: now_ms(),
            who,
            role: "coordinator".into(),
            from,
            call: "RenewNodeCertificate".into(),
            what: format!(
                "certificate {} for coordinator node {id}, renewing {}",
                info.serial, old.serial
            ),
        },
        cmd: Box::new(Command::RecordIssuedCert {
            cert,
            now_ms: now_ms(),
        }),
    };
    match core.write(cmd).await? {
        R::Ok => {
            tracing::info!(message = "Renewed a coordinator node's certificate.", node = id, serial = %info.serial, previous = %old.serial, not_after = info.not_after);
            Ok(pem)
        }
        R::Refused(why) => Err(Status::permission_denied(why)),
        other => Err(Status::internal(format!("unexpected answer {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limiter_refuses_beyond_its_count_until_the_window_ends_and_remembers_few_keys() {
        let l = Limiter::new(2, 2);
        let t0 = Instant::now();
        assert_eq!(l.admit("a", t0), Ok(()));
        assert_eq!(l.admit("a", t0), Ok(()));
        assert_eq!(
            l.admit("a", t0 + Duration::from_secs(59)),
            Err(Refusal::TooMany)
        );
        // Another key is counted apart.
        assert_eq!(l.admit("b", t0), Ok(()));
        // A third key while two are within their window: refused, the others unharmed.
        assert_eq!(
            l.admit("c", t0 + Duration::from_secs(1)),
            Err(Refusal::TooManyKeys)
        );
        assert_eq!(l.admit("b", t0 + Duration::from_secs(1)), Ok(()));
        // A window later, all is forgotten.
        let later = t0 + ATTEMPT_WINDOW;
        assert_eq!(l.admit("c", later), Ok(()));
        assert_eq!(l.admit("a", later), Ok(()));
    }
}
