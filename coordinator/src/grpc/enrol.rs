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
    /// How long a signed agent certificate is valid.
    pub agent_lifetime: Duration,
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

/// Shortest agent certificate lifetime a node signs (renewal needs room to happen).
pub const MIN_AGENT_LIFETIME: Duration = Duration::from_secs(30);

impl Signer {
    /// Loads the CA key at `key` and checks it belongs to one of the CA certificates
    /// `ca_pem` (read from `ca_path`; during a CA rotation it holds the old and the new CA).
    pub fn load(
        key: &Path,
        ca_path: &Path,
        ca_pem: &[u8],
        agent_lifetime: Duration,
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
            agent_lifetime: agent_lifetime.max(MIN_AGENT_LIFETIME),
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
                self.agent_lifetime,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

impl Signer {
    /// Signs `csr` for operator `name` with `role`, valid for [`ferry_common::pki::OPERATOR_LIFETIME`].
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
                ferry_common::pki::OPERATOR_LIFETIME,
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

/// The `Enrol` service of the join listener.
pub struct EnrolService {
    core: Arc<Core>,
    attempts: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl EnrolService {
    /// The service over `core` (whose signer signs).
    pub fn new(core: Arc<Core>) -> Self {
        EnrolService {
            core,
            attempts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an attempt from `ip`; refused beyond [`ATTEMPTS_PER_WINDOW`].
    fn admit(&self, ip: Option<IpAddr>) -> Result<(), Status> {
        let Some(ip) = ip else { return Ok(()) };
        let now = Instant::now();
        let mut a = self.attempts.lock().expect("not poisoned");
        if a.len() >= LIMITER_ADDRESSES {
            a.retain(|_, (start, _)| now.duration_since(*start) < ATTEMPT_WINDOW);
        }
        if a.len() >= LIMITER_ADDRESSES {
            return Err(Status::resource_exhausted(
                "too many join attempts from too many addresses; retry in a minute",
            ));
        }
        let e = a.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= ATTEMPT_WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
        if e.1 > ATTEMPTS_PER_WINDOW {
            tracing::warn!(message = "Join attempts refused: too many from one address.", %ip);
            return Err(Status::resource_exhausted(format!(
                "more than {ATTEMPTS_PER_WINDOW} join attempts from {ip} within {}s; wait and retry",
                ATTEMPT_WINDOW.as_secs()
            )));
        }
        Ok(())
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
