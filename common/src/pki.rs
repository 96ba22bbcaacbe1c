//! The cluster's certificate authority and the certificates it signs (rcgen).
//!
//! Layout of a PKI directory: `ca.pem` + `ca.key` (the CA; keep `ca.key` on coordinators only), and
//! `<name>.pem` + `<name>.key` per identity. Each identity's certificate carries one DNS name that
//! says who it is (see [`crate::names`]); peers check that name after the TLS handshake.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use thiserror::Error;

use crate::names::{self, COORDINATOR_DNS};

/// A PKI operation failed.
#[derive(Debug, Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA already exists; refusing to replace it would orphan every issued certificate.
    #[error("a CA already exists at {0}; refusing to overwrite it (every issued certificate depends on it)")]
    CaExists(PathBuf),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The name is not a valid identity.
    #[error(transparent)]
    Name(#[from] names::InvalidName),
}

/// Who a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An agent, by name.
    Agent(String),
    /// A coordinator node, by node id.
    Coordinator(u64),
    /// An operator using ferryctl, by name.
    Admin(String),
}

impl Identity {
    /// File stem used for this identity's certificate and key.
    pub fn file_stem(&self) -> String {
        match self {
            Identity::Agent(n) => format!("agent-{n}"),
            Identity::Coordinator(id) => format!("coordinator-{id}"),
            Identity::Admin(n) => format!("admin-{n}"),
        }
    }

    fn dns_names(&self) -> Vec<String> {
        match self {
            Identity::Agent(n) => vec![names::agent_dns(n)],
            Identity::Coordinator(id) => {
                vec![
                    COORDINATOR_DNS.to_string(),
                    format!("node-{id}.{COORDINATOR_DNS}"),
                ]
            }
            Identity::Admin(n) => vec![names::admin_dns(n), names::ADMIN_DNS.to_string()],
        }
    }
}

/// The cluster CA, loaded and able to sign.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
}

const CA_CN: &str = "ferry cluster CA";

/// The CA's parameters. They are rebuilt identically when the CA is loaded: issuing needs the CA's
/// name and key, not its self-signature.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, CA_CN);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        what: "cannot read",
        path: path.to_path_buf(),
        source,
    })
}

impl Ca {
    /// Creates a new CA in `dir` (`ca.pem`, `ca.key`). Fails if one exists.
    pub fn init(dir: &Path) -> Result<Ca, PkiError> {
        fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            what: "cannot create",
            path: dir.to_path_buf(),
            source,
        })?;
        let key_path = dir.join("ca.key");
        if key_path.exists() {
            return Err(PkiError::CaExists(key_path));
        }
        let key = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        write_file(&dir.join("ca.pem"), &cert.pem(), 0o644)?;
        write_file(&key_path, &key.serialize_pem(), 0o600)?;
        Ok(Ca {
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    /// Loads the CA from `dir`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(&read_file(&dir.join("ca.key"))?)?;
        Ok(Ca {
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    /// Issues a certificate for `who` and writes `<stem>.pem` and `<stem>.key` into `dir`.
    /// Returns the paths in the layout [`crate::config::TlsPaths::in_dir`] expects.
    pub fn issue(&self, who: &Identity, dir: &Path) -> Result<crate::config::TlsPaths, PkiError> {
        match who {
            Identity::Agent(n) | Identity::Admin(n) => names::validate_name(n)?,
            Identity::Coordinator(_) => {}
        }
        let mut p = CertificateParams::new(who.dns_names())?;
        p.distinguished_name
            .push(DnType::CommonName, who.dns_names()[0].clone());
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        let stem = who.file_stem();
        let paths = crate::config::TlsPaths::in_dir(dir, &stem);
        write_file(&paths.cert, &cert.pem(), 0o644)?;
        write_file(&paths.key, &key.serialize_pem(), 0o600)?;
        Ok(paths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        let paths = ca
            .issue(&Identity::Agent("src".into()), dir.path())
            .unwrap();
        assert!(paths.cert.exists() && paths.key.exists());
        assert!(matches!(Ca::init(dir.path()), Err(PkiError::CaExists(_))));
        let again = Ca::load(dir.path()).unwrap();
        again.issue(&Identity::Coordinator(1), dir.path()).unwrap();
        assert!(again
            .issue(&Identity::Agent("Bad Name".into()), dir.path())
            .is_err());
        let mode = fs::metadata(&paths.key).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }
}
