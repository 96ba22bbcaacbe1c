//! An agent's certificate: got by joining with a token (`ferry-agent join`), renewed by the
//! running agent before it expires. The key is made here and never leaves this host; the
//! coordinator signs a request for it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_common::config::TlsPaths;
use ferry_common::enrol::{fetch_ca, pem_certificate, EnrolError, JoinToken};
use ferry_common::names;
use ferry_common::pki::{self, CertInfo, Identity, PkiError};
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
        pki::create_file(&paths.ca, &ca_pem, 0o644)?;
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

/// When a certificate valid from `not_before` to `not_after` (unix seconds) should be
/// renewed: once two thirds of its lifetime are behind it.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before).max(0) * 2 / 3
}

/// Unix seconds now.
pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_renewed_with_a_third_of_its_life_left() {
        assert_eq!(renew_at(0, 90), 60);
        assert_eq!(renew_at(100, 100), 100);
        assert_eq!(renew_at(100, 50), 100);
    }
}
