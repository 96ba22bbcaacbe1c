//! TLS configurations for every connection ferry makes: gRPC (tonic) to the coordinator and QUIC
//! (quinn) between agents. All of them are mutual TLS 1.3 against the cluster CA (invariant 5).

use rustls::pki_types::pem::PemObject;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use thiserror::Error;

use crate::config::TlsPaths;
use crate::transport::Transport;

/// ALPN of the agent-to-agent data plane (QUIC). Bump it when the frames change incompatibly:
/// 2 carries names as bytes, hardlinks, sparse data runs, owners and extended attributes.
pub const DATA_ALPN: &[u8] = b"ferry/2";

/// ALPN of a probe connection (`ferryctl probe`): the same endpoint as the data plane, another
/// protocol (`ProbeRequest`/`ProbeReply` frames and streams of bytes counted and dropped).
pub const PROBE_ALPN: &[u8] = b"ferry-probe/1";

/// TLS material could not be loaded or used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("{path} holds no {what}; issue it with `ferry-coordinator pki issue`")]
    Empty {
        /// The file.
        path: std::path::PathBuf,
        /// What was expected.
        what: &'static str,
    },
    /// rustls refused the configuration.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn refused the rustls configuration.
    #[error("QUIC TLS setup failed: {0}")]
    Quic(String),
}

/// The PEM files of one identity, read into memory.
#[derive(Clone)]
pub struct TlsMaterial {
    /// The CA certificate (PEM).
    pub ca_pem: Vec<u8>,
    /// This identity's certificate (PEM).
    pub cert_pem: Vec<u8>,
    /// This identity's key (PEM).
    pub key_pem: Vec<u8>,
}

impl TlsMaterial {
    /// Reads the three files.
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let m = TlsMaterial {
            ca_pem: read(&paths.ca)?,
            cert_pem: read(&paths.cert)?,
            key_pem: read(&paths.key)?,
        };
        // Parse once now so that a bad file fails at start-up with its name, not at first use.
        m.certs(&paths.ca, &m.ca_pem, "CA certificate")?;
        m.certs(&paths.cert, &m.cert_pem, "certificate")?;
        m.key(&paths.key)?;
        Ok(m)
    }

    fn certs(
        &self,
        path: &std::path::Path,
        pem: &[u8],
        what: &'static str,
    ) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            })?;
        if certs.is_empty() {
            return Err(TlsError::Empty {
                path: path.to_path_buf(),
                what,
            });
        }
        Ok(certs)
    }

    fn key(&self, path: &std::path::Path) -> Result<PrivateKeyDer<'static>, TlsError> {
        match PrivateKeyDer::from_pem_slice(&self.key_pem) {
            Ok(k) => Ok(k),
            Err(rustls::pki_types::pem::Error::NoItemsFound) => Err(TlsError::Empty {
                path: path.to_path_buf(),
                what: "private key",
            }),
            Err(e) => Err(TlsError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            }),
        }
    }

    fn parts(
        &self,
    ) -> Result<
        (
            rustls::RootCertStore,
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
        ),
        TlsError,
    > {
        let p = std::path::Path::new("<memory>");
        let mut roots = rustls::RootCertStore::empty();
        for c in self.certs(p, &self.ca_pem, "CA certificate")? {
            roots.add(c)?;
        }
        Ok((
            roots,
            self.certs(p, &self.cert_pem, "certificate")?,
            self.key(p)?,
        ))
    }

    /// This identity's own certificate (the first of its chain), as a peer sees it.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, TlsError> {
        let p = std::path::Path::new("<memory>");
        let certs = self.certs(p, &self.cert_pem, "certificate")?;
        certs.into_iter().next().ok_or_else(|| TlsError::Empty {
            path: p.to_path_buf(),
            what: "certificate",
        })
    }

    /// The coordinator's gRPC server TLS: TLS 1.3 only, a client certificate from the CA
    /// required, HTTP/2. (tonic's own server TLS also accepts TLS 1.2.)
    pub fn grpc_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        self.server_tls(&[b"h2"]).map(Arc::new)
    }

    /// A coordinator's join listener: TLS 1.3, HTTP/2, no client certificate asked (a joining
    /// agent has none yet), and the CA's certificate sent after this node's, so the agent can
    /// check it against the pin in its token (`crate::enrol::fetch_ca`).
    pub fn join_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let p = std::path::Path::new("<memory>");
        let mut chain = self.certs(p, &self.cert_pem, "certificate")?;
        chain.extend(self.certs(p, &self.ca_pem, "CA certificate")?);
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(chain, self.key(p)?)?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// A server's TLS speaking `alpn`: TLS 1.3 only, a client certificate from the CA
    /// required, no 0-RTT (rustls' default: early data could be replayed).
    fn server_tls(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (roots, certs, key) = self.parts()?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(cfg)
    }

    /// tonic client TLS towards a coordinator: verifies it as [`crate::names::COORDINATOR_DNS`]
    /// and presents this identity.
    pub fn grpc_client(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .domain_name(crate::names::COORDINATOR_DNS)
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
    }

    /// The TLS of a target's QUIC endpoint ([`TlsMaterial::server_tls`] for ferry's data
    /// protocol and probes).
    fn quic_server_tls(&self) -> Result<rustls::ServerConfig, TlsError> {
        self.server_tls(&[DATA_ALPN, PROBE_ALPN])
    }

    /// The TLS of a source's QUIC connections speaking `alpn`: TLS 1.3, this identity
    /// presented, no 0-RTT.
    fn quic_client_tls(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (roots, certs, key) = self.parts()?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(cfg)
    }

    /// QUIC server (target agent) with the default [`Transport`].
    pub fn quic_server(&self) -> Result<quinn::ServerConfig, TlsError> {
        self.quic_server_with(&Transport::default())
    }

    /// QUIC server (target agent): TLS 1.3, client certificate from the CA required.
    pub fn quic_server_with(&self, transport: &Transport) -> Result<quinn::ServerConfig, TlsError> {
        let cfg = self.quic_server_tls()?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport.config()));
        Ok(server)
    }

    /// QUIC client (source agent) with the default [`Transport`].
    pub fn quic_client(&self) -> Result<quinn::ClientConfig, TlsError> {
        self.quic_client_with(&Transport::default())
    }

    /// QUIC client (source agent): TLS 1.3, verifies the server against the CA and presents this
    /// identity. The caller names the expected server (`names::agent_dns(target)`) when connecting.
    pub fn quic_client_with(&self, transport: &Transport) -> Result<quinn::ClientConfig, TlsError> {
        self.quic_client_speaking(DATA_ALPN, transport)
    }

    /// A QUIC client as [`TlsMaterial::quic_client_with`], speaking `alpn` (a probe's
    /// connections: [`PROBE_ALPN`]).
    pub fn quic_client_speaking(
        &self,
        alpn: &[u8],
        transport: &Transport,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let cfg = self.quic_client_tls(alpn)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(transport.config()));
        Ok(client)
    }
}

/// The operator's name an operator certificate carries (`<name>.admin.ferry`), for records and
/// messages (never for authorisation: that is [`cert_is_for`] and [`role_of`]).
pub fn operator_name(cert: &CertificateDer<'_>) -> Option<String> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let suffix = format!(".{}", crate::names::ADMIN_DNS);
    let name = ee
        .valid_dns_names()
        .find_map(|n| n.strip_suffix(suffix.as_str()).map(str::to_string));
    name
}

/// The role an operator's certificate carries ([`crate::names::Role`]); `None` for a
/// certificate that is not an operator's. An operator certificate issued before roles existed
/// carries none, and keeps the rights it had: [`Role::Admin`](crate::names::Role::Admin).
pub fn role_of(cert: &CertificateDer<'_>) -> Option<crate::names::Role> {
    use crate::names::Role;
    if !cert_is_for(cert, crate::names::ADMIN_DNS) {
        return None;
    }
    Some(
        [Role::Admin, Role::Operator, Role::Viewer]
            .into_iter()
            .find(|r| cert_is_for(cert, &r.dns()))
            .unwrap_or(Role::Admin),
    )
}

/// Whether the (already CA-verified) end-entity certificate `cert` is valid for `dns_name`. Used
/// after a handshake to learn which agent or admin is on the other end.
pub fn cert_is_for(cert: &CertificateDer<'_>, dns_name: &str) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(dns_name) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, Identity};

    #[test]
    fn identities_and_configs() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        let paths = ca
            .issue(&Identity::Agent("src".into()), dir.path())
            .unwrap();
        let m = TlsMaterial::load(&paths).unwrap();
        m.quic_server().unwrap();
        m.quic_client().unwrap();
        let (_, certs, _) = m.parts().unwrap();
        assert!(cert_is_for(&certs[0], "src.agent.ferry"));
        assert!(!cert_is_for(&certs[0], "dst.agent.ferry"));
        assert!(!cert_is_for(&certs[0], "coordinator.ferry"));
    }

    #[test]
    fn no_endpoint_accepts_or_sends_0rtt_data() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        let m = TlsMaterial::load(&ca.issue(&Identity::Agent("a".into()), dir.path()).unwrap())
            .unwrap();
        let c =
            TlsMaterial::load(&ca.issue(&Identity::Coordinator(1), dir.path()).unwrap()).unwrap();
        // Early data can be replayed by anyone who saw it: neither side of QUIC uses it, and
        // the coordinator's gRPC accepts none.
        assert_eq!(m.quic_server_tls().unwrap().max_early_data_size, 0);
        assert!(!m.quic_client_tls(DATA_ALPN).unwrap().enable_early_data);
        assert!(!m.quic_client_tls(PROBE_ALPN).unwrap().enable_early_data);
        assert_eq!(c.grpc_server_config().unwrap().max_early_data_size, 0);
    }

    #[test]
    fn a_pem_file_that_holds_no_key_or_garbage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        let p = ca.issue(&Identity::Agent("a".into()), dir.path()).unwrap();
        let mut m = TlsMaterial::load(&p).unwrap();
        m.key_pem = m.cert_pem.clone();
        assert!(matches!(m.key(&p.key), Err(TlsError::Empty { .. })));
        m.key_pem = b"-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n".to_vec();
        assert!(matches!(m.key(&p.key), Err(TlsError::Read { .. })));
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let paths = TlsPaths::in_dir(dir.path(), "nobody");
        let err = TlsMaterial::load(&paths).err().unwrap().to_string();
        assert!(err.contains("ca.pem"), "{err}");
    }
}
