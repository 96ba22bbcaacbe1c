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
    /// A new set of trusted CAs does not include the CA of this identity's own certificate.
    #[error("the CA certificates offered do not include the CA that signed this identity's certificate ({0}); kept trusting the CAs trusted before")]
    Untrusted(String),
}

/// The PEM files of one identity, read into memory. Clones share the identity they present
/// ([`TlsMaterial::renew`] changes it for all of them) and the CAs they trust
/// ([`TlsMaterial::trust`]).
#[derive(Clone)]
pub struct TlsMaterial {
    /// The CA certificates (PEM) as loaded: one, or two while a CA rotation overlaps the old
    /// and the new CA. [`TlsMaterial::trusted_ca_pem`] is what is trusted now.
    pub ca_pem: Vec<u8>,
    /// This identity's certificate (PEM) as loaded.
    pub cert_pem: Vec<u8>,
    /// This identity's key (PEM) as loaded.
    pub key_pem: Vec<u8>,
    live: Arc<LiveIdentity>,
    trust: LiveTrust,
    revocations: Revocations,
}

/// The CAs every configuration built from one [`TlsMaterial`] (and its clones) trusts, with the
/// verifiers built from them: replaced whole by [`TlsMaterial::trust`], read at each handshake,
/// so a CA added during a rotation is trusted from the next connection on, without a restart.
#[derive(Clone)]
struct LiveTrust(Arc<std::sync::RwLock<Arc<Trusted>>>);

struct Trusted {
    ca_pem: Vec<u8>,
    certs: Vec<CertificateDer<'static>>,
    clients: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    servers: Arc<rustls::client::WebPkiServerVerifier>,
}

impl std::fmt::Debug for LiveTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveTrust")
    }
}

impl LiveTrust {
    fn now(&self) -> Arc<Trusted> {
        self.0.read().expect("not poisoned").clone()
    }
}

impl Trusted {
    /// Verifiers that accept certificates of any CA in `ca_pem`.
    fn new(ca_pem: &[u8]) -> Result<Trusted, TlsError> {
        let path = std::path::Path::new("<CA certificates>");
        let mut roots = rustls::RootCertStore::empty();
        let certs = pem_certs(path, ca_pem, "CA certificate")?;
        for c in &certs {
            roots.add(c.clone())?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(Trusted {
            ca_pem: ca_pem.to_vec(),
            certs,
            clients: WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()?,
            servers: rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| TlsError::Quic(e.to_string()))?,
        })
    }
}

/// Says whether a certificate of agent `name` valid from `not_before` (unix seconds) is
/// revoked. A coordinator answers from its Raft state, an agent from the list its heartbeats
/// bring.
pub type RevocationCheck = Arc<dyn Fn(&str, i64) -> bool + Send + Sync>;

/// The revocation check the verifiers of one [`TlsMaterial`] (and its clones) consult at every
/// handshake; none until one is set.
#[derive(Clone, Default)]
struct Revocations(Arc<std::sync::RwLock<Option<RevocationCheck>>>);

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Revocations")
    }
}

impl Revocations {
    /// Whether `cert` (already verified as the CA's) is an agent's that was revoked; a
    /// certificate that cannot be read is refused too.
    fn refuses(&self, cert: &CertificateDer<'_>) -> bool {
        let Some(check) = self.0.read().expect("not poisoned").clone() else {
            return false;
        };
        let Ok(info) = crate::pki::CertInfo::from_der(cert) else {
            return true;
        };
        let suffix = crate::names::agent_dns("");
        info.names
            .iter()
            .filter_map(|n| n.strip_suffix(suffix.as_str()))
            .any(|agent| check(agent, info.not_before))
    }
}

fn revoked_error() -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
}

/// A server that resumes sessions takes the client's certificate from the session it resumes,
/// without looking at it again: a certificate revoked or expired since would get through. So
/// no ticket is issued and no session kept; every handshake is a full one (ferry's connections
/// are few and long-lived).
fn no_resumption(cfg: &mut rustls::ServerConfig) {
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
}

/// A client certificate verifier that also refuses revoked agents.
#[derive(Debug)]
struct CheckedClients {
    trust: LiveTrust,
    revocations: Revocations,
}

impl rustls::server::danger::ClientCertVerifier for CheckedClients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No hints: the trusted CAs change at run time, and every ferry client has one
    /// certificate to present anyway.
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let ok = self
            .trust
            .now()
            .clients
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.revocations.refuses(end_entity) {
            return Err(revoked_error());
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.trust
            .now()
            .clients
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.trust
            .now()
            .clients
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.trust.now().clients.supported_verify_schemes()
    }
}

/// A server certificate verifier (the CA's, by name) that also refuses revoked agents: a
/// source does not send to a revoked target.
#[derive(Debug)]
struct CheckedServers {
    trust: LiveTrust,
    revocations: Revocations,
}

impl rustls::client::danger::ServerCertVerifier for CheckedServers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ok = self.trust.now().servers.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if self.revocations.refuses(end_entity) {
            return Err(revoked_error());
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.trust
            .now()
            .servers
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.trust
            .now()
            .servers
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.trust.now().servers.supported_verify_schemes()
    }
}

/// The certificate and key every TLS configuration built from one [`TlsMaterial`] presents:
/// they ask for it at each handshake, so a renewed certificate is used from the next
/// connection on, without a restart; connections already up keep theirs.
#[derive(Debug)]
struct LiveIdentity {
    current: std::sync::RwLock<LiveCurrent>,
}

#[derive(Debug)]
struct LiveCurrent {
    key: Arc<rustls::sign::CertifiedKey>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl LiveIdentity {
    fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.current.read().expect("not poisoned").key.clone()
    }
}

impl rustls::server::ResolvesServerCert for LiveIdentity {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for LiveIdentity {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `cert_pem` and `key_pem` as rustls presents them; the key must be the certificate's.
fn certified(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let chain = pem_certs(cert_path, cert_pem, "certificate")?;
    let key = pem_key(key_path, key_pem)?;
    Ok(rustls::sign::CertifiedKey::from_der(
        chain,
        key,
        &rustls::crypto::ring::default_provider(),
    )?)
}

fn pem_certs(
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

fn pem_key(path: &std::path::Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    match PrivateKeyDer::from_pem_slice(pem) {
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

impl TlsMaterial {
    /// Reads the three files.
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let (ca_pem, cert_pem, key_pem) = (read(&paths.ca)?, read(&paths.cert)?, read(&paths.key)?);
        // Parse once now so that a bad file fails at start-up with its name, not at first use.
        pem_certs(&paths.ca, &ca_pem, "CA certificate")?;
        let key = certified(&cert_pem, &key_pem, &paths.cert, &paths.key)?;
        let trusted = Trusted::new(&ca_pem)?;
        Ok(TlsMaterial {
            live: Arc::new(LiveIdentity {
                current: std::sync::RwLock::new(LiveCurrent {
                    key: Arc::new(key),
                    cert_pem: cert_pem.clone(),
                    key_pem: key_pem.clone(),
                }),
            }),
            ca_pem,
            cert_pem,
            key_pem,
            trust: LiveTrust(Arc::new(std::sync::RwLock::new(Arc::new(trusted)))),
            revocations: Revocations::default(),
        })
    }

    /// From the next handshake on, trusts the CAs in `ca_pem` (instead of those trusted
    /// before), in every configuration built from this material or a clone: how a CA rotation
    /// reaches a running process. Refused, changing nothing, when they do not include the CA
    /// of this identity's own certificate (it would refuse itself). Returns whether the CAs
    /// trusted changed (the same certificates written otherwise change nothing).
    pub fn trust(&self, ca_pem: &[u8]) -> Result<bool, TlsError> {
        let before = self.trust.now();
        if before.ca_pem == ca_pem {
            return Ok(false);
        }
        let new = Trusted::new(ca_pem)?;
        if new.certs == before.certs {
            *self.trust.0.write().expect("not poisoned") = Arc::new(new);
            return Ok(false);
        }
        let (own, at) = self.own_cert_mid_life()?;
        new.clients
            .verify_client_cert(&own, &[], at)
            .map_err(|e| TlsError::Untrusted(e.to_string()))?;
        *self.trust.0.write().expect("not poisoned") = Arc::new(new);
        Ok(true)
    }

    /// This identity's certificate, and the middle of its lifetime: when a chain is checked to
    /// learn which CA signed it (whether it is expired is not the question).
    fn own_cert_mid_life(
        &self,
    ) -> Result<(CertificateDer<'static>, rustls::pki_types::UnixTime), TlsError> {
        let own = self.cert_der()?;
        let info =
            crate::pki::CertInfo::from_der(&own).map_err(|e| TlsError::Untrusted(e.to_string()))?;
        let middle = info.not_before / 2 + info.not_after / 2;
        let at = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            middle.max(0) as u64,
        ));
        Ok((own, at))
    }

    /// The certificate of the CA (among those trusted) that signed this identity's own
    /// certificate: what a coordinator's join tokens pin, since its join listener presents
    /// this identity.
    pub fn own_ca(&self) -> Result<CertificateDer<'static>, TlsError> {
        let (own, at) = self.own_cert_mid_life()?;
        for ca in &self.trust.now().certs {
            let alone = Trusted::new(&crate::pki::pem("CERTIFICATE", ca).into_bytes())?;
            if alone.clients.verify_client_cert(&own, &[], at).is_ok() {
                return Ok(ca.clone());
            }
        }
        Err(TlsError::Untrusted(
            "none of the CA certificates trusted".into(),
        ))
    }

    /// The CA certificates (PEM) trusted now.
    pub fn trusted_ca_pem(&self) -> Vec<u8> {
        self.trust.now().ca_pem.clone()
    }

    /// From now on, every server configuration built from this material (or a clone) refuses
    /// a client certificate `check` says is revoked, and every QUIC client configuration such a
    /// server certificate, in the handshake: before any application byte.
    pub fn check_revocations(&self, check: RevocationCheck) {
        *self.revocations.0.write().expect("not poisoned") = Some(check);
    }

    /// Presents `cert_pem` with `key_pem` from the next handshake on, in every configuration
    /// built from this material or a clone of it (a renewed certificate). Refused, changing
    /// nothing, when the key is not the certificate's.
    pub fn renew(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), TlsError> {
        let p = std::path::Path::new("<renewed>");
        let key = certified(cert_pem, key_pem, p, p)?;
        *self.live.current.write().expect("not poisoned") = LiveCurrent {
            key: Arc::new(key),
            cert_pem: cert_pem.to_vec(),
            key_pem: key_pem.to_vec(),
        };
        Ok(())
    }

    /// The certificate presented now (PEM).
    pub fn current_cert_pem(&self) -> Vec<u8> {
        self.live
            .current
            .read()
            .expect("not poisoned")
            .cert_pem
            .clone()
    }

    fn certs(
        &self,
        path: &std::path::Path,
        pem: &[u8],
        what: &'static str,
    ) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        pem_certs(path, pem, what)
    }

    /// This identity's own certificate (the first of its chain), as a peer sees it.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, TlsError> {
        let current = self.live.current();
        current
            .cert
            .first()
            .cloned()
            .ok_or_else(|| TlsError::Empty {
                path: "<memory>".into(),
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
        let current = self.live.current.read().expect("not poisoned");
        let mut chain = self.certs(p, &current.cert_pem, "certificate")?;
        chain.extend(self.certs(p, &self.trusted_ca_pem(), "CA certificate")?);
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(chain, pem_key(p, &current.key_pem)?)?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        no_resumption(&mut cfg);
        Ok(Arc::new(cfg))
    }

    /// A server's TLS speaking `alpn`: TLS 1.3 only, a client certificate from the CA
    /// required, no 0-RTT (rustls' default: early data could be replayed).
    fn server_tls(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(CheckedClients {
            trust: self.trust.clone(),
            revocations: self.revocations.clone(),
        });
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.live.clone());
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        no_resumption(&mut cfg);
        Ok(cfg)
    }

    /// tonic client TLS towards a coordinator: verifies it as [`crate::names::COORDINATOR_DNS`]
    /// and presents this identity.
    /// The identity presented is the current one: a channel built after [`TlsMaterial::renew`]
    /// presents the renewed certificate.
    pub fn grpc_client(&self) -> tonic::transport::ClientTlsConfig {
        let current = self.live.current.read().expect("not poisoned");
        tonic::transport::ClientTlsConfig::new()
            .domain_name(crate::names::COORDINATOR_DNS)
            .ca_certificate(tonic::transport::Certificate::from_pem(
                self.trusted_ca_pem(),
            ))
            .identity(tonic::transport::Identity::from_pem(
                &current.cert_pem,
                &current.key_pem,
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
        let verifier = Arc::new(CheckedServers {
            trust: self.trust.clone(),
            revocations: self.revocations.clone(),
        });
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(self.live.clone());
        cfg.alpn_protocols = vec![alpn.to_vec()];
        // Every connection presents its certificate in full (see `no_resumption`).
        cfg.resumption = rustls::client::Resumption::disabled();
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

/// The node id a coordinator node's certificate carries (`node-<id>.coordinator.ferry`);
/// `None` for a certificate that is not a coordinator node's.
pub fn coordinator_node(cert: &CertificateDer<'_>) -> Option<u64> {
    if !cert_is_for(cert, crate::names::COORDINATOR_DNS) {
        return None;
    }
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let suffix = format!(".{}", crate::names::COORDINATOR_DNS);
    let id = ee.valid_dns_names().find_map(|n| {
        n.strip_suffix(suffix.as_str())
            .and_then(|h| h.strip_prefix("node-"))
            .and_then(|id| id.parse().ok())
    });
    id
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
        let cert = m.cert_der().unwrap();
        assert!(cert_is_for(&cert, "src.agent.ferry"));
        assert!(!cert_is_for(&cert, "dst.agent.ferry"));
        assert!(!cert_is_for(&cert, "coordinator.ferry"));
        assert_eq!(coordinator_node(&cert), None);
        assert_eq!(operator_name(&cert), None);
        let node = ca.issue(&Identity::Coordinator(12), dir.path()).unwrap();
        let node = TlsMaterial::load(&node).unwrap().cert_der().unwrap();
        assert_eq!(coordinator_node(&node), Some(12));
        assert_eq!(role_of(&node), None);
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
        // Nor is any session resumed: each handshake checks the certificate again (revoked?
        // expired?).
        for cfg in [
            m.quic_server_tls().unwrap(),
            (*c.grpc_server_config().unwrap()).clone(),
            (*c.join_server_config().unwrap()).clone(),
        ] {
            assert_eq!(cfg.send_tls13_tickets, 0);
            assert!(!cfg.session_storage.can_cache());
        }
    }

    #[test]
    fn a_pem_file_that_holds_no_key_or_garbage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        let p = ca.issue(&Identity::Agent("a".into()), dir.path()).unwrap();
        let m = TlsMaterial::load(&p).unwrap();
        assert!(matches!(
            pem_key(&p.key, &m.cert_pem),
            Err(TlsError::Empty { .. })
        ));
        let garbage = b"-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n";
        assert!(matches!(
            pem_key(&p.key, garbage),
            Err(TlsError::Read { .. })
        ));
        // A key that is not the certificate's is refused at load and at renewal.
        let other = ca.issue(&Identity::Agent("b".into()), dir.path()).unwrap();
        let other_key = std::fs::read(&other.key).unwrap();
        std::fs::write(&p.key, &other_key).unwrap();
        assert!(TlsMaterial::load(&p).is_err());
        assert!(m.renew(&m.cert_pem, &other_key).is_err());
    }

    /// Agent `name`'s identity, issued by `ca` into `dir`.
    fn agent(ca: &Ca, dir: &std::path::Path, name: &str) -> TlsMaterial {
        TlsMaterial::load(&ca.issue(&Identity::Agent(name.into()), dir).unwrap()).unwrap()
    }

    /// A QUIC endpoint serving `m` on a loopback port.
    fn listening(m: &TlsMaterial) -> quinn::Endpoint {
        quinn::Endpoint::server(m.quic_server().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap()
    }

    /// Whether `client` completes a QUIC handshake with the endpoint `server` serves `name` on.
    async fn handshake(client: &TlsMaterial, server: &quinn::Endpoint, name: &str) -> bool {
        let mut cl = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        cl.set_default_client_config(client.quic_client().unwrap());
        let addr = server.local_addr().unwrap();
        let (accepted, connected) =
            tokio::join!(async { server.accept().await.unwrap().await }, async {
                cl.connect(addr, name).unwrap().await
            });
        accepted.is_ok() && connected.is_ok()
    }

    /// A CA rotation: the new CA is trusted beside the old one by running processes (no
    /// restart), certificates of either CA are accepted both ways during the overlap, and the
    /// old CA's certificates only once it is retired.
    #[tokio::test]
    async fn a_ca_rotation_keeps_every_certificate_trusted_through_its_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        let old_only = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let (old_dst, old_src) = (agent(&ca, dir.path(), "dst"), agent(&ca, dir.path(), "src"));
        let stale = agent(&ca, dir.path(), "stale");
        let old_server = listening(&old_dst);
        assert!(handshake(&old_src, &old_server, "dst.agent.ferry").await);

        // Begin: both CAs in ca.pem, learnt by the running agents (as their heartbeats bring it).
        Ca::rotate_begin(dir.path()).unwrap();
        let both = std::fs::read(dir.path().join("ca.pem")).unwrap();
        assert_eq!(crate::pki::ca_public_keys(&both).unwrap().len(), 2);
        assert!(old_dst.trust(&both).unwrap());
        assert!(old_src.trust(&both).unwrap());
        assert!(
            !old_src.trust(&both).unwrap(),
            "nothing new the second time"
        );
        assert!(
            !old_src.trust(&[&both[..], b"\n\n"].concat()).unwrap(),
            "nor when the same certificates are written otherwise"
        );
        assert_eq!(
            old_dst.own_ca().unwrap(),
            CertificateDer::pem_slice_iter(&old_only)
                .next()
                .unwrap()
                .unwrap(),
            "its CA is the old one"
        );
        assert!(
            Ca::rotate_begin(dir.path()).is_err(),
            "one rotation at a time"
        );

        // Switch: ca.key is the new CA's; new certificates are the new CA's.
        Ca::rotate_switch(dir.path()).unwrap();
        let new_ca = Ca::load(dir.path()).unwrap();
        let (new_dst, new_src) = (
            agent(&new_ca, dir.path(), "dst2"),
            agent(&new_ca, dir.path(), "src2"),
        );
        let new_server = listening(&new_dst);
        assert_ne!(new_dst.own_ca().unwrap(), old_dst.own_ca().unwrap());
        assert!(
            handshake(&new_src, &old_server, "dst.agent.ferry").await,
            "a new certificate is accepted by a server started before the rotation"
        );
        assert!(
            handshake(&old_src, &new_server, "dst2.agent.ferry").await,
            "an old certificate is accepted by a new server during the overlap"
        );
        let stale_server = listening(&stale);
        assert!(
            !handshake(&new_src, &stale_server, "stale.agent.ferry").await,
            "a process that never learnt the new CA refuses its certificates"
        );
        let e = new_src.trust(&old_only).unwrap_err();
        assert!(matches!(e, TlsError::Untrusted(_)), "{e}");
        assert!(handshake(&new_src, &old_server, "dst.agent.ferry").await);

        // Finish: the old CA leaves ca.pem; its certificates are refused from then on.
        Ca::rotate_finish(dir.path()).unwrap();
        let new_only = std::fs::read(dir.path().join("ca.pem")).unwrap();
        assert_eq!(crate::pki::ca_public_keys(&new_only).unwrap().len(), 1);
        assert!(!dir.path().join("ca.old.key").exists());
        assert!(
            matches!(old_dst.trust(&new_only), Err(TlsError::Untrusted(_))),
            "an agent still holding an old certificate keeps trusting both until it renews"
        );
        assert!(new_dst.trust(&new_only).unwrap());
        assert!(
            !handshake(&old_src, &new_server, "dst2.agent.ferry").await,
            "the old CA's certificates are refused once it is retired"
        );
        assert!(handshake(&new_src, &new_server, "dst2.agent.ferry").await);
    }

    /// A renewed certificate is presented from the next handshake on by every configuration
    /// built before, on both ends of QUIC, while connections already up keep theirs.
    #[tokio::test]
    async fn a_renewed_certificate_is_presented_from_the_next_handshake_on() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        let server = agent(&ca, dir.path(), "dst");
        let client = agent(&ca, dir.path(), "src");
        let ep = listening(&server);
        let addr = ep.local_addr().unwrap();
        let mut cl = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        cl.set_default_client_config(client.quic_client().unwrap());
        let accept = |ep: quinn::Endpoint| async move {
            let c = ep.accept().await.unwrap().await.unwrap();
            let certs = c
                .peer_identity()
                .unwrap()
                .downcast::<Vec<CertificateDer<'static>>>()
                .unwrap();
            (c, certs[0].clone())
        };
        let serial = |der: &CertificateDer<'_>| crate::pki::CertInfo::from_der(der).unwrap().serial;
        let first = serial(&client.cert_der().unwrap());
        let (a, b) = tokio::join!(accept(ep.clone()), async {
            cl.connect(addr, "dst.agent.ferry").unwrap().await.unwrap()
        });
        let (_kept, seen) = a;
        assert_eq!(serial(&seen), first);

        // Renewed: a new key and a certificate for it.
        let (key, csr) = crate::pki::request(&Identity::Agent("src".into())).unwrap();
        let (pem, info) = ca
            .sign_request(
                &csr,
                &Identity::Agent("src".into()),
                std::time::SystemTime::now(),
                std::time::Duration::from_secs(600),
            )
            .unwrap();
        client.renew(pem.as_bytes(), key.as_bytes()).unwrap();
        assert_ne!(info.serial, first);
        let (a, _c2) = tokio::join!(accept(ep.clone()), async {
            cl.connect(addr, "dst.agent.ferry").unwrap().await.unwrap()
        });
        assert_eq!(
            serial(&a.1),
            info.serial,
            "the next handshake presents the new one"
        );
        assert!(
            b.close_reason().is_none(),
            "the first connection is still up"
        );
        assert_eq!(client.current_cert_pem(), pem.as_bytes());
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let paths = TlsPaths::in_dir(dir.path(), "nobody");
        let err = TlsMaterial::load(&paths).err().unwrap().to_string();
        assert!(err.contains("ca.pem"), "{err}");
    }

    /// A session resumed from before a revocation would carry the revoked certificate past the
    /// check: every handshake is a full one, so the next connection is refused.
    #[tokio::test]
    async fn a_revocation_refuses_the_next_connection_of_a_client_that_was_accepted_before() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        let server = agent(&ca, dir.path(), "dst");
        let client = agent(&ca, dir.path(), "src");
        let ep = listening(&server);
        let addr = ep.local_addr().unwrap();
        // Each connection accepted answers a byte on the first stream the client opens (after
        // whatever the server sent once the handshake was done: session tickets, if any).
        let accepting = {
            let ep = ep.clone();
            tokio::spawn(async move {
                let mut kept = Vec::new();
                while let Some(incoming) = ep.accept().await {
                    if let Ok(c) = incoming.await {
                        if let Ok((mut send, mut recv)) = c.accept_bi().await {
                            let _ = recv.read_to_end(1).await;
                            let _ = send.write_all(b"!").await;
                            let _ = send.finish();
                        }
                        kept.push(c);
                    }
                }
            })
        };
        let ask = |c: quinn::Connection| async move {
            let (mut send, mut recv) = c.open_bi().await?;
            send.write_all(b"?").await?;
            send.finish()?;
            Ok::<_, Box<dyn std::error::Error>>(recv.read_to_end(1).await?)
        };
        let within = std::time::Duration::from_secs(10);
        let mut cl = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        cl.set_default_client_config(client.quic_client().unwrap());
        let first = cl.connect(addr, "dst.agent.ferry").unwrap().await.unwrap();
        let answer = tokio::time::timeout(within, ask(first.clone())).await;
        assert_eq!(answer.unwrap().unwrap(), b"!");
        server.check_revocations(Arc::new(|agent: &str, _| agent == "src"));
        let refused = match cl.connect(addr, "dst.agent.ferry").unwrap().await {
            Err(e) => e.to_string(),
            Ok(c) => match tokio::time::timeout(within, ask(c)).await {
                Ok(Err(e)) => e.to_string(),
                other => panic!("a revoked client was let in again: {other:?}"),
            },
        };
        assert!(!refused.is_empty());
        drop(first);
        accepting.abort();
    }

    /// A certificate past its lifetime, one not yet valid, a self-signed one and none at all
    /// are refused by a data endpoint in the handshake.
    #[tokio::test]
    async fn expired_future_self_signed_and_missing_client_certificates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        let server = agent(&ca, dir.path(), "dst");
        let ep = listening(&server);
        let addr = ep.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepting = {
            let (ep, accepted) = (ep.clone(), accepted.clone());
            tokio::spawn(async move {
                while let Some(incoming) = ep.accept().await {
                    if incoming.await.is_ok() {
                        accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            })
        };
        // The material of a valid identity, then made to present a certificate signed `at`.
        let base = ca
            .issue(&Identity::Agent("src".into()), dir.path())
            .unwrap();
        let signed_at = |at: std::time::SystemTime, secs: u64| {
            let who = Identity::Agent("src".into());
            let (key, csr) = crate::pki::request(&who).unwrap();
            let (cert, _) = ca
                .sign_request(&csr, &who, at, std::time::Duration::from_secs(secs))
                .unwrap();
            let m = TlsMaterial::load(&base).unwrap();
            m.renew(cert.as_bytes(), key.as_bytes()).unwrap();
            m
        };
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        let expired = signed_at(now - day, 3600);
        let future = signed_at(now + day, 3600);
        // Self-signed: a CA of its own, not the cluster's.
        let other = tempfile::tempdir().unwrap();
        let stranger = TlsMaterial::load(
            &Ca::init(other.path())
                .unwrap()
                .issue(&Identity::Agent("src".into()), other.path())
                .unwrap(),
        )
        .unwrap();
        let no_cert = {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates({
                    let mut roots = rustls::RootCertStore::empty();
                    for c in CertificateDer::pem_slice_iter(&server.ca_pem) {
                        roots.add(c.unwrap()).unwrap();
                    }
                    roots
                })
                .with_no_client_auth();
            cfg.alpn_protocols = vec![DATA_ALPN.to_vec()];
            quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap(),
            ))
        };
        let cl = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        for (what, cfg) in [
            ("expired", expired.quic_client().unwrap()),
            ("not yet valid", future.quic_client().unwrap()),
            ("another CA's", stranger.quic_client().unwrap()),
            ("none", no_cert),
        ] {
            let c = cl.connect_with(cfg, addr, "dst.agent.ferry").unwrap().await;
            if let Ok(c) = c {
                let e = tokio::time::timeout(std::time::Duration::from_secs(10), c.accept_uni())
                    .await
                    .expect("the server closes the connection");
                assert!(e.is_err(), "{what}: let in");
            }
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
        // A valid one still gets in.
        let good = TlsMaterial::load(&base).unwrap();
        cl.connect_with(good.quic_client().unwrap(), addr, "dst.agent.ferry")
            .unwrap()
            .await
            .unwrap();
        accepting.abort();
    }
}
