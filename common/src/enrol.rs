//! Enrolment: how an agent gets its certificate without a key ever leaving its host (the
//! kubeadm pattern). An admin makes a one-time join token (`ferryctl token create`); it
//! carries the pin of the cluster CA ([`crate::pki::ca_pin`]), an id and a secret. The new
//! agent (`ferry-agent join`) connects to a coordinator's join listener, accepts its TLS
//! certificate only if it chains to a CA with that pin ([`fetch_ca`]) — before it sends
//! anything of the token — then sends the token's id and secret with a certificate request for
//! a key it made itself; the coordinator checks the token in Raft (single use, not expired)
//! and signs.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use thiserror::Error;

use crate::pki::{ca_pin, hex};

/// What starts every token (and says which format it is).
const PREFIX: &str = "ferry-join-v1";

/// A join token as an admin hands it to whoever installs an agent:
/// `ferry-join-v1:<CA pin, 64 hex>:<id, 16 hex>:<secret, 32 hex>`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the cluster CA's public key.
    pub pin: [u8; 32],
    /// Names the token in Raft, logs and the audit log (not secret).
    pub id: String,
    /// The secret (only its digest is kept: [`secret_digest`]).
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("pin", &hex(&self.pin))
            .field("id", &self.id)
            .field("secret", &"<hidden>")
            .finish()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}:{}:{}:{}", hex(&self.pin), self.id, self.secret)
    }
}

/// A token that cannot be read.
#[derive(Debug, Error)]
#[error("not a ferry join token ({0}); it reads ferry-join-v1:<64 hex>:<16 hex>:<32 hex> — copy it whole from `ferryctl token create`")]
pub struct BadToken(&'static str);

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl FromStr for JoinToken {
    type Err = BadToken;

    fn from_str(s: &str) -> Result<Self, BadToken> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let [prefix, pin, id, secret] = parts[..] else {
            return Err(BadToken("it has not four parts"));
        };
        if prefix != PREFIX {
            return Err(BadToken("its prefix is not ferry-join-v1"));
        }
        if !is_hex(pin, 64) || !is_hex(id, 16) || !is_hex(secret, 32) {
            return Err(BadToken("a part is not lower-case hex of its length"));
        }
        let mut p = [0u8; 32];
        for (i, b) in p.iter_mut().enumerate() {
            *b = u8::from_str_radix(&pin[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(JoinToken {
            pin: p,
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }
}

impl JoinToken {
    /// A new token for the CA with `pin`: a random id and secret.
    pub fn generate(pin: [u8; 32]) -> Result<JoinToken, BadToken> {
        let mut bytes = [0u8; 24];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| BadToken("no randomness to make one"))?;
        Ok(JoinToken {
            pin,
            id: hex(&bytes[..8]),
            secret: hex(&bytes[8..]),
        })
    }
}

/// What the coordinator keeps of a token's secret: a keyed BLAKE3 of it (a copy of the state
/// or of a snapshot does not give the secret away).
pub fn secret_digest(secret: &str) -> [u8; 32] {
    blake3::derive_key("ferry join token secret v1", secret.as_bytes())
}

/// Enrolment failed.
#[derive(Debug, Error)]
pub enum EnrolError {
    /// The coordinator could not be reached.
    #[error("cannot reach the coordinator's join listener at {addr}: {source}")]
    Connect {
        /// Its address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS handshake failed: most often, the coordinator's CA is not the token's.
    #[error("the TLS handshake with {addr} failed: {reason}; nothing of the token was sent")]
    Handshake {
        /// Its address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// TLS could not be set up.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// The reason a handshake fails when no CA in the coordinator's chain has the token's pin.
pub const PIN_MISMATCH: &str = "the coordinator's CA is not the one the join token names (its \
    public key's SHA-256 differs from the token's pin): another cluster, or someone in between";

/// Accepts a server certificate only if the chain it came with holds a CA whose pin is the
/// token's, and the certificate is that CA's, valid now, for the name asked; keeps that CA.
#[derive(Debug)]
struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    found: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| ca_pin(c).is_ok_and(|p| p == self.pin))
            .ok_or_else(|| rustls::Error::General(PIN_MISMATCH.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        *self.found.lock().expect("not poisoned") = Some(ca.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// How long [`fetch_ca`] waits for the connection and the handshake.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(15);

/// Connects to a coordinator's join listener at `addr` and returns its CA certificate — only if
/// the CA's pin is `pin` and the coordinator's certificate is that CA's. Sends nothing but a
/// TLS handshake (no client certificate, no application data): a coordinator of another CA,
/// or someone in between, learns nothing of the token.
pub async fn fetch_ca(addr: &str, pin: [u8; 32]) -> Result<CertificateDer<'static>, EnrolError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCa {
        pin,
        provider: provider.clone(),
        found: Mutex::new(None),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    let connect = |source| EnrolError::Connect {
        addr: addr.to_string(),
        source,
    };
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(connect)?;
        let name = ServerName::try_from(crate::names::COORDINATOR_DNS)
            .expect("a valid name")
            .to_owned();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| EnrolError::Handshake {
                addr: addr.to_string(),
                reason: e.to_string(),
            })
    };
    let tls = tokio::time::timeout(HANDSHAKE_WITHIN, handshake)
        .await
        .map_err(|_| {
            connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no TLS handshake within {HANDSHAKE_WITHIN:?}"),
            ))
        })??;
    drop(tls);
    let found = verifier.found.lock().expect("not poisoned").take();
    found.ok_or_else(|| EnrolError::Handshake {
        addr: addr.to_string(),
        reason: "the coordinator presented no certificate".into(),
    })
}

/// A DER certificate as PEM.
pub fn pem_certificate(der: &[u8]) -> String {
    crate::pki::pem("CERTIFICATE", der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_and_bad_ones_are_named() {
        let t = JoinToken::generate([7; 32]).unwrap();
        let text = t.to_string();
        assert!(text.starts_with("ferry-join-v1:0707"), "{text}");
        assert_eq!(text.parse::<JoinToken>().unwrap(), t);
        assert!(
            !format!("{t:?}").contains(&t.secret),
            "Debug hides the secret"
        );
        for bad in [
            "",
            "ferry-join-v2:00:00:00",
            &text.replace("ferry-join-v1", "ferry-join-v2"),
            &text[..text.len() - 1],
            &text.to_uppercase(),
        ] {
            let e = bad.parse::<JoinToken>().unwrap_err().to_string();
            assert!(e.contains("ferryctl token create"), "{e}");
        }
        assert_ne!(secret_digest("a"), secret_digest("b"));
    }

    #[test]
    fn pem_of_a_der_certificate_reads_back() {
        use rustls::pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        crate::pki::Ca::init(dir.path()).unwrap();
        let der = CertificateDer::from_pem_file(dir.path().join("ca.pem")).unwrap();
        let pem = pem_certificate(&der);
        assert_eq!(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap(), der);
    }

    /// A join listener's TLS (the CA's certificate after the node's) on loopback: reads what
    /// a client sends after its handshake.
    async fn join_listener(dir: &std::path::Path) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        use tokio::io::AsyncReadExt;
        let ca = crate::pki::Ca::load(dir).unwrap();
        let paths = ca
            .issue_if_missing(&crate::pki::Identity::Coordinator(1), dir)
            .unwrap();
        let tls = crate::tls::TlsMaterial::load(&paths).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.join_server_config().unwrap());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            if let Ok(mut s) = acceptor.accept(tcp).await {
                let _ = s.read_to_end(&mut got).await;
            }
            got
        });
        (addr, server)
    }

    #[tokio::test]
    async fn the_ca_is_taken_only_when_it_has_the_pin_and_nothing_is_sent_otherwise() {
        use rustls::pki_types::pem::PemObject;
        let ours = tempfile::tempdir().unwrap();
        crate::pki::Ca::init(ours.path()).unwrap();
        let ca_der = CertificateDer::from_pem_file(ours.path().join("ca.pem")).unwrap();
        let pin = ca_pin(&ca_der).unwrap();

        let (addr, server) = join_listener(ours.path()).await;
        let got = fetch_ca(&addr, pin).await.unwrap();
        assert_eq!(got, ca_der);
        assert!(server.await.unwrap().is_empty(), "a handshake only");

        // Another cluster's pin: refused in the handshake, before any application byte.
        let other = tempfile::tempdir().unwrap();
        crate::pki::Ca::init(other.path()).unwrap();
        let other_pin =
            ca_pin(&CertificateDer::from_pem_file(other.path().join("ca.pem")).unwrap()).unwrap();
        let (addr, server) = join_listener(ours.path()).await;
        let e = fetch_ca(&addr, other_pin).await.unwrap_err();
        assert!(matches!(e, EnrolError::Handshake { .. }), "{e}");
        assert!(
            e.to_string().contains("not the one the join token names"),
            "{e}"
        );
        assert!(server.await.unwrap().is_empty());
    }
}
