//! An agent's certificate: got by joining with a token (`ferry-agent join`), renewed by the
//! running agent before it expires. The key is made here and never leaves this host; the
//! coordinator signs a request for it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_common::config::TlsPaths;
use ferry_common::enrol::{fetch_ca, pem_certificate, EnrolError, JoinToken};
use ferry_common::names;
use ferry_common::pki::{self, CertInfo, Identity, PkiError};
use ferry_common::renewal::{install, retry_after, wait_before_renewal};
use ferry_proto::control as pb;
use thiserror::Error;

/// Joining failed.
#[derive(Debug, Error)]
pub enum JoinError {
    /// The coordinator's CA is not the token's, or it could not be reached.
    #[error(transparent)]
    Enrol(#[from] EnrolError),
    /// Files could not be written or read.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// This agent has a certificate or key already.
    #[error("{0} exists already: this agent has an identity. To join again (after a revocation or an expiry), add --replace")]
    Exists(String),
    /// A CA certificate of another cluster is where this agent's must go.
    #[error("{0} holds another CA's certificate than the coordinator's (which the token pins): this host belongs to another cluster; point tls.ca elsewhere or remove it")]
    OtherCa(String),
    /// The coordinator refused.
    #[error("the coordinator refused the join: {0}")]
    Refused(String),
    /// The call failed.
    #[error("the join call to {addr} failed: {reason}")]
    Call {
        /// The join listener.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The certificate that came back is not for this agent.
    #[error("the coordinator sent a certificate that is not agent {0}'s; nothing was written")]
    WrongCertificate(String),
    /// The name is not an agent name.
    #[error(transparent)]
    Name(#[from] names::InvalidName),
}

/// Joins the cluster at `addr` (a coordinator's join listener) as agent `name` with `token`,
/// and writes the CA certificate, a new key and its certificate to `paths`. Refuses to
/// replace an existing key or certificate unless `replace`. Sends nothing of the token before
/// the coordinator proved its CA is the token's.
pub async fn join(
    token: &JoinToken,
    addr: &str,
    name: &str,
    paths: &TlsPaths,
    replace: bool,
) -> Result<CertInfo, JoinError> {
    names::validate_name(name)?;
    if !replace {
        for p in [&paths.key, &paths.cert] {
            if std::fs::symlink_metadata(p).is_ok() {
                return Err(JoinError::Exists(p.display().to_string()));
            }
        }
    }
    let ca_der = fetch_ca(addr, token.pin).await?;
    let ca_pem = pem_certificate(&ca_der);
    let existing_ca = match std::fs::read(&paths.ca) {
        Ok(pem) => {
            use rustls::pki_types::pem::PemObject;
            let same = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .any(|c| c.is_ok_and(|c| c.as_ref() == ca_der.as_ref()));
            if !same {
                return Err(JoinError::OtherCa(paths.ca.display().to_string()));
            }
            true
        }
        Err(_) => false,
    };
    let (key_pem, csr) = pki::request(&Identity::Agent(name.to_string()))?;
    let call = |reason: String| JoinError::Call {
        addr: addr.to_string(),
        reason,
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| call(e.to_string()))?
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .domain_name(names::COORDINATOR_DNS)
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem)),
        )
        .map_err(|e| call(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| call(format!("{e}: {:?}", std::error::Error::source(&e))))?;
    let answer = pb::enrol_client::EnrolClient::new(channel)
        .join(pb::JoinRequest {
            token_id: token.id.clone(),
            secret: token.secret.clone(),
            agent: name.to_string(),
            csr_der: csr,
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::PermissionDenied
            | tonic::Code::InvalidArgument
            | tonic::Code::ResourceExhausted
            | tonic::Code::FailedPrecondition => JoinError::Refused(s.message().to_string()),
            _ => call(s.message().to_string()),
        })?
        .into_inner();
    let info = CertInfo::from_pem(answer.cert_pem.as_bytes())?;
    if !info.names.iter().any(|n| *n == names::agent_dns(name)) {
        return Err(JoinError::WrongCertificate(name.to_string()));
    }
    if let Some(dir) = paths.key.parent() {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            what: "cannot create",
            path: dir.to_path_buf(),
            source,
        })?;
    }
    if !existing_ca {
        // Every CA the coordinator trusts (two during a CA rotation), if the one pinned is
        // among them; they came over the connection the pinned CA authenticated.
        let pinned = pki::ca_public_keys(ca_pem.as_bytes())?;
        let all = pki::ca_public_keys(answer.ca_pem.as_bytes()).unwrap_or_default();
        let trusted = match pinned.iter().all(|k| all.contains(k)) {
            true => &answer.ca_pem,
            false => &ca_pem,
        };
        pki::create_file(&paths.ca, trusted, 0o644)?;
    }
    // The key first: a certificate is never on disk without its key.
    if replace {
        pki::replace_file(&paths.key, key_pem.as_bytes(), 0o600)?;
        pki::replace_file(&paths.cert, answer.cert_pem.as_bytes(), 0o644)?;
    } else {
        pki::create_file(&paths.key, &key_pem, 0o600)?;
        pki::create_file(&paths.cert, &answer.cert_pem, 0o644)?;
    }
    Ok(info)
}

/// Renews this agent's certificate whenever two thirds of its lifetime are behind it, until
/// `stop`: a new key made here, a request for it signed by a coordinator, the files replaced
/// ([`install`](ferry_common::renewal::install)), and the new certificate presented on every new connection (QUIC both ways,
/// gRPC) without a restart; transfers under way keep their connections.
pub async fn renew_certificates(
    control: crate::control::Control,
    tls: ferry_common::tls::TlsMaterial,
    paths: TlsPaths,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let name = control.agent().to_string();
    loop {
        let info = match CertInfo::from_pem(&tls.current_cert_pem()) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(message = "Cannot read this agent's certificate; it is not renewed.", error = %e);
                return;
            }
        };
        if let Some(wait) = wait_before_renewal(info.not_before, info.not_after, now_s()) {
            tokio::select! {
                _ = tokio::time::sleep(wait) => continue,
                _ = stop.changed() => return,
            }
        }
        let renewed = async {
            let (key_pem, csr) =
                pki::request(&Identity::Agent(name.clone())).map_err(|e| e.to_string())?;
            let answer = control
                .renew_certificate(csr)
                .await
                .map_err(|e| e.to_string())?;
            let new = CertInfo::from_pem(answer.cert_pem.as_bytes()).map_err(|e| e.to_string())?;
            if !new.names.iter().any(|n| *n == names::agent_dns(&name)) {
                return Err(format!(
                    "the coordinator sent a certificate that is not agent {name}'s"
                ));
            }
            install(&paths, answer.cert_pem.as_bytes(), key_pem.as_bytes())
                .map_err(|e| e.to_string())?;
            tls.renew(answer.cert_pem.as_bytes(), key_pem.as_bytes())
                .map_err(|e| e.to_string())?;
            control.present(&tls).map_err(|e| e.to_string())?;
            Ok::<_, String>(new)
        };
        match renewed.await {
            Ok(new) => tracing::info!(
                message = "Renewed this agent's certificate.",
                serial = %new.serial,
                previous = %info.serial,
                valid_until = %ferry_common::text::utc(new.not_after.max(0) as u64 * 1000)
            ),
            Err(error) => {
                let left = info.not_after - now_s();
                if left <= 0 {
                    tracing::error!(message = "This agent's certificate expired and could not be renewed: coordinators and peers refuse it. Join again with a new token (`ferry-agent join --replace`).", %error);
                } else {
                    tracing::warn!(message = "Cannot renew this agent's certificate; trying again.", %error, seconds_left = left);
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry_after(info.not_after, now_s())) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// Unix seconds now.
pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
