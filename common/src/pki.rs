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

use crate::names::{self, Role, COORDINATOR_DNS};

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
    /// An identity's file already exists (or a symlink stands at its path): never replaced.
    #[error("{0} already exists; refusing to overwrite it (a running process may use it): remove it first to issue this identity again")]
    Exists(PathBuf),
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
    /// An operator using ferryctl, by name, with every right ([`Role::Admin`]).
    Admin(String),
    /// An operator using ferryctl, by name, with the rights of a role.
    User(String, Role),
}

impl Identity {
    /// File stem used for this identity's certificate and key.
    pub fn file_stem(&self) -> String {
        match self {
            Identity::Agent(n) => format!("agent-{n}"),
            Identity::Coordinator(id) => format!("coordinator-{id}"),
            Identity::Admin(n) | Identity::User(n, _) => format!("admin-{n}"),
        }
    }

    /// What its certificate may be used for: an operator only calls (client); agents and
    /// coordinator nodes also serve (targets, the gRPC API) and call (sources, Raft peers).
    fn key_usages(&self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Identity::Admin(_) | Identity::User(..) => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Identity::Agent(_) | Identity::Coordinator(_) => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
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
            Identity::Admin(n) => Identity::User(n.clone(), Role::Admin).dns_names(),
            Identity::User(n, role) => vec![
                names::admin_dns(n),
                names::ADMIN_DNS.to_string(),
                role.dns(),
            ],
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
    // Signs end-entity certificates only, never another CA.
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// Writes a new file at `path` with `mode`, never replacing anything there (a file, or a
/// symlink someone planted: `link` does not follow it): written to a temporary created with
/// `O_EXCL|O_NOFOLLOW` and that mode, synced, then linked into place.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { what, path, source }
    };
    if fs::symlink_metadata(path).is_ok() {
        return Err(PkiError::Exists(path.to_path_buf()));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io("cannot write", &tmp))?;
        f.write_all(contents.as_bytes())
            .map_err(io("cannot write", &tmp))?;
        f.sync_all().map_err(io("cannot write", &tmp))?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(PkiError::Exists(path.to_path_buf()))
            }
            Err(e) => Err(io("cannot write", path)(e)),
        }
    })();
    let _ = fs::remove_file(&tmp);
    written?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
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

    /// The identity `who` already has in `dir` (its certificate and key both there), or a new
    /// one ([`Ca::issue`]).
    pub fn issue_if_missing(
        &self,
        who: &Identity,
        dir: &Path,
    ) -> Result<crate::config::TlsPaths, PkiError> {
        let paths = crate::config::TlsPaths::in_dir(dir, &who.file_stem());
        if paths.cert.is_file() && paths.key.is_file() {
            return Ok(paths);
        }
        self.issue(who, dir)
    }

    /// Issues a certificate for `who` and writes `<stem>.pem` and `<stem>.key` into `dir`;
    /// refuses ([`PkiError::Exists`]) when either is there already.
    /// Returns the paths in the layout [`crate::config::TlsPaths::in_dir`] expects.
    pub fn issue(&self, who: &Identity, dir: &Path) -> Result<crate::config::TlsPaths, PkiError> {
        match who {
            Identity::Agent(n) | Identity::Admin(n) | Identity::User(n, _) => {
                names::validate_name(n)?
            }
            Identity::Coordinator(_) => {}
        }
        let mut p = CertificateParams::new(who.dns_names())?;
        p.distinguished_name
            .push(DnType::CommonName, who.dns_names()[0].clone());
        p.extended_key_usages = who.key_usages();
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        let stem = who.file_stem();
        let paths = crate::config::TlsPaths::in_dir(dir, &stem);
        for p in [&paths.cert, &paths.key] {
            if fs::symlink_metadata(p).is_ok() {
                return Err(PkiError::Exists(p.clone()));
            }
        }
        // The key first: a certificate is never on disk without its key.
        write_file(&paths.key, &key.serialize_pem(), 0o600)?;
        write_file(&paths.cert, &cert.pem(), 0o644)?;
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

    #[test]
    fn an_identity_is_never_overwritten_nor_written_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        let who = Identity::Agent("src".into());
        let paths = ca.issue(&who, dir.path()).unwrap();
        let key = fs::read(&paths.key).unwrap();
        let again = ca.issue(&who, dir.path()).unwrap_err();
        assert!(
            matches!(&again, PkiError::Exists(p) if *p == paths.cert),
            "{again}"
        );
        assert_eq!(fs::read(&paths.key).unwrap(), key, "the key is as it was");
        // Taken as it is when asked for if missing.
        assert_eq!(ca.issue_if_missing(&who, dir.path()).unwrap(), paths);
        assert_eq!(fs::read(&paths.key).unwrap(), key);

        // A symlink planted where a key goes is neither followed nor replaced.
        let victim = dir.path().join("victim");
        fs::write(&victim, b"not yours").unwrap();
        let other = Identity::Agent("dst".into());
        let planted = crate::config::TlsPaths::in_dir(dir.path(), &other.file_stem());
        std::os::unix::fs::symlink(&victim, &planted.key).unwrap();
        let e = ca.issue(&other, dir.path()).unwrap_err();
        assert!(matches!(&e, PkiError::Exists(_)), "{e}");
        assert_eq!(fs::read(&victim).unwrap(), b"not yours");
        assert!(!planted.cert.exists(), "no certificate without its key");
        // A file someone created with a wide mode is not reused either: a new key is 0600.
        fs::remove_file(&planted.key).unwrap();
        let p = ca.issue(&other, dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&p.key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "no temporaries left");
    }

    #[test]
    fn an_admin_certificate_cannot_serve_and_the_ca_signs_no_other_ca() {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, UnixTime};
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        let ca_der = CertificateDer::from_pem_file(dir.path().join("ca.pem")).unwrap();
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).unwrap();
        let now = UnixTime::now();
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        let usable = |who: Identity, usage: webpki::KeyUsage| {
            let p = ca.issue(&who, dir.path()).unwrap();
            let der = CertificateDer::from_pem_file(&p.cert).unwrap();
            let ee = webpki::EndEntityCert::try_from(&der).unwrap();
            ee.verify_for_usage(
                algs.all,
                std::slice::from_ref(&anchor),
                &[],
                now,
                usage,
                None,
                None,
            )
            .is_ok()
        };
        assert!(usable(
            Identity::Admin("a".into()),
            webpki::KeyUsage::client_auth()
        ));
        assert!(!usable(
            Identity::Admin("b".into()),
            webpki::KeyUsage::server_auth()
        ));
        assert!(usable(
            Identity::Agent("c".into()),
            webpki::KeyUsage::server_auth()
        ));
        assert!(usable(
            Identity::Agent("d".into()),
            webpki::KeyUsage::client_auth()
        ));
        assert!(usable(
            Identity::Coordinator(1),
            webpki::KeyUsage::server_auth()
        ));
        assert!(usable(
            Identity::Coordinator(2),
            webpki::KeyUsage::client_auth()
        ));
        // The CA's path length is 0: it signs end entities only.
        let params = ca_params().unwrap();
        assert_eq!(params.is_ca, IsCa::Ca(BasicConstraints::Constrained(0)));
    }

    #[test]
    fn an_operator_certificate_carries_its_role_and_one_from_before_roles_is_an_admin() {
        use crate::tls::role_of;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        let role = |who: Identity| {
            let p = ca.issue(&who, dir.path()).unwrap();
            role_of(&CertificateDer::from_pem_file(&p.cert).unwrap())
        };
        assert_eq!(
            role(Identity::User("v".into(), Role::Viewer)),
            Some(Role::Viewer)
        );
        assert_eq!(
            role(Identity::User("o".into(), Role::Operator)),
            Some(Role::Operator)
        );
        assert_eq!(role(Identity::Admin("a".into())), Some(Role::Admin));
        assert_eq!(role(Identity::Agent("x".into())), None);
        assert_eq!(role(Identity::Coordinator(1)), None);
        // As ferry issued operator certificates before roles: both admin names, no role.
        let mut p =
            CertificateParams::new(vec![names::admin_dns("old"), names::ADMIN_DNS.to_string()])
                .unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let old = p.signed_by(&key, &ca.issuer).unwrap();
        assert_eq!(role_of(old.der()), Some(Role::Admin));
    }
}
