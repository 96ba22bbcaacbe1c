//! The cluster's certificate authority and the certificates it signs (rcgen).
//!
//! Layout of a PKI directory: `ca.pem` + `ca.key` (the CA; keep `ca.key` on coordinators only), and
//! `<name>.pem` + `<name>.key` per identity. Each identity's certificate carries one DNS name that
//! says who it is (see [`crate::names`]); peers check that name after the TLS handshake.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// A certificate request could not be read or its signature is wrong.
    #[error("the certificate request is not valid: {0}")]
    BadRequest(String),
    /// A certificate could not be read.
    #[error("cannot read the certificate: {0}")]
    BadCertificate(String),
    /// A step of a CA rotation was run out of order.
    #[error("{0}")]
    Rotation(String),
}

/// How long a certificate [`Ca::issue`] signs is valid, unless told otherwise: an agent's a
/// week (a running agent renews it when a third is left, through the coordinator), an
/// operator's 90 days, a coordinator node's a year, the CA's ten years.
pub const AGENT_LIFETIME: Duration = Duration::from_secs(7 * 86_400);
/// See [`AGENT_LIFETIME`].
pub const OPERATOR_LIFETIME: Duration = Duration::from_secs(90 * 86_400);
/// See [`AGENT_LIFETIME`].
pub const COORDINATOR_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// See [`AGENT_LIFETIME`].
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How far before its signing a certificate is valid from: a host whose clock is a little
/// behind the signer's still accepts it at once.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

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

    /// How long its certificate is valid when nobody says ([`AGENT_LIFETIME`]).
    pub fn default_lifetime(&self) -> Duration {
        match self {
            Identity::Agent(_) => AGENT_LIFETIME,
            Identity::Coordinator(_) => COORDINATOR_LIFETIME,
            Identity::Admin(_) | Identity::User(..) => OPERATOR_LIFETIME,
        }
    }

    /// Its certificate's parameters: names, usages, a random serial, valid from
    /// [`CLOCK_SKEW`] before `now` for `lifetime`.
    fn params(&self, now: SystemTime, lifetime: Duration) -> Result<CertificateParams, PkiError> {
        match self {
            Identity::Agent(n) | Identity::Admin(n) | Identity::User(n, _) => {
                names::validate_name(n)?
            }
            Identity::Coordinator(_) => {}
        }
        let mut p = CertificateParams::new(self.dns_names())?;
        p.distinguished_name
            .push(DnType::CommonName, self.dns_names()[0].clone());
        p.extended_key_usages = self.key_usages();
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut p, now, lifetime)?;
        Ok(p)
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

/// Sets `p`'s validity (from [`CLOCK_SKEW`] before `now`, for `lifetime`) and a random
/// 128-bit serial.
fn validity(
    p: &mut CertificateParams,
    now: SystemTime,
    lifetime: Duration,
) -> Result<(), PkiError> {
    let secs = |t: SystemTime| {
        let s = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
        time::OffsetDateTime::from_unix_timestamp(s)
            .map_err(|e| PkiError::BadCertificate(format!("a validity time out of range: {e}")))
    };
    let from = now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH);
    p.not_before = secs(from)?;
    p.not_after = secs(now + lifetime)?;
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| PkiError::BadCertificate("no randomness for a serial number".into()))?;
    serial[0] &= 0x7f; // positive
    serial[0] |= 0x01; // and of full length
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(())
}

/// What ferry reads from a certificate: its serial (hex), the names it is valid for, and its
/// validity in unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lower-case hex.
    pub serial: String,
    /// DNS names (subject alternative names).
    pub names: Vec<String>,
    /// Valid from (unix seconds).
    pub not_before: i64,
    /// Valid until (unix seconds).
    pub not_after: i64,
}

impl CertInfo {
    /// Reads a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertInfo, PkiError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        let names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(PkiError::BadCertificate(e.to_string())),
        };
        Ok(CertInfo {
            serial: hex(cert.raw_serial()),
            names,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// Reads the first certificate of a PEM text.
    pub fn from_pem(pem: &[u8]) -> Result<CertInfo, PkiError> {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem)
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        CertInfo::from_der(&der)
    }
}

/// `der` as PEM with `label` (`CERTIFICATE`, `CERTIFICATE REQUEST`).
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Makes a key and a request for `who` ([`request`]) and writes them to `dir` as
/// `<stem>.key` (0600) and `<stem>.csr` (PEM), never replacing a file. Returns both paths.
pub fn write_request(who: &Identity, dir: &Path) -> Result<(PathBuf, PathBuf), PkiError> {
    let (key, csr) = request(who)?;
    let key_path = dir.join(format!("{}.key", who.file_stem()));
    let csr_path = dir.join(format!("{}.csr", who.file_stem()));
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        what: "cannot create",
        path: dir.to_path_buf(),
        source,
    })?;
    create_file(&key_path, &key, 0o600)?;
    create_file(&csr_path, &pem("CERTIFICATE REQUEST", &csr), 0o644)?;
    Ok((key_path, csr_path))
}

/// Reads a certificate request (PEM) made by [`request`] and written with [`pem`].
pub fn read_request(path: &Path) -> Result<Vec<u8>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateSigningRequestDer::from_pem_file(path)
        .map(|d| d.as_ref().to_vec())
        .map_err(|e| PkiError::BadRequest(format!("{}: {e}", path.display())))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The pin of a CA certificate (DER): the SHA-256 of its public key (SubjectPublicKeyInfo),
/// as kubeadm's discovery hash. A join token carries it; a joining agent trusts only a
/// coordinator whose CA has it.
pub fn ca_pin(ca_der: &[u8]) -> Result<[u8; 32], PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let d = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    let mut pin = [0u8; 32];
    pin.copy_from_slice(d.as_ref());
    Ok(pin)
}

/// The public key (raw bits) of the first certificate of a PEM text (to check a CA key
/// against its certificate).
pub fn ca_public_key(pem: &[u8]) -> Result<Vec<u8>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// The public key (raw bits) of every certificate of a PEM text: the CAs a bundle holds (two
/// while a CA rotation overlaps the old and the new one).
pub fn ca_public_keys(pem: &[u8]) -> Result<Vec<Vec<u8>>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    let mut keys = Vec::new();
    for der in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
        let der = der.map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        keys.push(cert.public_key().subject_public_key.data.to_vec());
    }
    if keys.is_empty() {
        return Err(PkiError::BadCertificate("no certificate in it".into()));
    }
    Ok(keys)
}

/// The certificates (PEM, one after the other) of a PEM text whose public key is not `key`.
fn certificates_without(text: &[u8], key: &[u8]) -> Result<String, PkiError> {
    use rustls::pki_types::pem::PemObject;
    let mut out = String::new();
    for der in rustls::pki_types::CertificateDer::pem_slice_iter(text) {
        let der = der.map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != key {
            out.push_str(&pem("CERTIFICATE", &der));
        }
    }
    Ok(out)
}

/// A new key for `who` and a request (CSR, DER) to have it certified: the key never leaves
/// the host that made it. Returns the key (PEM) and the request.
pub fn request(who: &Identity) -> Result<(String, Vec<u8>), PkiError> {
    let key = KeyPair::generate()?;
    let p = CertificateParams::new(who.dns_names())?;
    let csr = p.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Writes `contents` to `path` with `mode`, replacing what is there (a renewed certificate
/// or key): written to a temporary next to it (`O_EXCL|O_NOFOLLOW`, that mode), synced, then
/// renamed over it — a symlink at `path` is replaced, never followed.
pub fn replace_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    write_via_temporary(path, contents, mode, true)
}

/// Writes a new file (PEM) at `path` with `mode`, never replacing anything there.
pub fn create_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    write_file(path, contents, mode)
}

/// The cluster CA, loaded and able to sign.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
}

const CA_CN: &str = "ferry cluster CA";

/// A CA directory's key, the key of a rotation under way, and the CA bundle.
fn rotation_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("ca.key"),
        dir.join("ca.next.key"),
        dir.join("ca.pem"),
    )
}

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
    write_via_temporary(path, contents.as_bytes(), mode, false)
}

/// [`replace_file`] (`replace`) or [`write_file`]: the temporary, then a rename over `path` or
/// a link that fails if anything is there; the directory synced after.
fn write_via_temporary(
    path: &Path,
    contents: &[u8],
    mode: u32,
    replace: bool,
) -> Result<(), PkiError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { what, path, source }
    };
    if !replace && fs::symlink_metadata(path).is_ok() {
        return Err(PkiError::Exists(path.to_path_buf()));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tag = if replace { "new" } else { "tmp" };
    let tmp = path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io("cannot write", &tmp))?;
        f.write_all(contents).map_err(io("cannot write", &tmp))?;
        f.sync_all().map_err(io("cannot write", &tmp))?;
        if replace {
            return fs::rename(&tmp, path).map_err(io("cannot replace", path));
        }
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(PkiError::Exists(path.to_path_buf()))
            }
            Err(e) => Err(io("cannot write", path)(e)),
        }
    })();
    // Gone after a rename; the link's temporary, or what a failure left.
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
    /// Creates a new CA in `dir` (`ca.pem`, `ca.key`), valid for [`CA_LIFETIME`]. Fails if one
    /// exists.
    pub fn init(dir: &Path) -> Result<Ca, PkiError> {
        Ca::init_for(dir, CA_LIFETIME)
    }

    /// [`Ca::init`], the CA valid for `lifetime`.
    pub fn init_for(dir: &Path, lifetime: Duration) -> Result<Ca, PkiError> {
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
        let mut params = ca_params()?;
        validity(&mut params, SystemTime::now(), lifetime)?;
        let cert = params.self_signed(&key)?;
        write_file(&dir.join("ca.pem"), &cert.pem(), 0o644)?;
        write_file(&key_path, &key.serialize_pem(), 0o600)?;
        Ok(Ca {
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    /// CA rotation, step 1 of 3 (`ferry-coordinator pki rotate-ca begin`): a new CA key is
    /// made beside the old one (`ca.next.key`) and its certificate added to `ca.pem`, which
    /// then holds both CAs. Nothing is signed by the new CA yet: first every node must trust
    /// both (coordinators are given the new `ca.pem`; agents learn it from their heartbeats).
    pub fn rotate_begin(dir: &Path) -> Result<Ca, PkiError> {
        Ca::rotate_begin_for(dir, CA_LIFETIME)
    }

    /// [`Ca::rotate_begin`], the new CA valid for `lifetime`.
    pub fn rotate_begin_for(dir: &Path, lifetime: Duration) -> Result<Ca, PkiError> {
        let (key_path, next, bundle_path) = rotation_files(dir);
        if !key_path.is_file() {
            return Err(PkiError::Rotation(format!(
                "no CA key at {}: rotate the CA where its key is",
                key_path.display()
            )));
        }
        if next.exists() {
            return Err(PkiError::Rotation(format!(
                "a rotation is already under way ({} exists): finish it with `pki rotate-ca \
                 switch` and `finish`",
                next.display()
            )));
        }
        let bundle = read_file(&bundle_path)?;
        let key = KeyPair::generate()?;
        let mut params = ca_params()?;
        validity(&mut params, SystemTime::now(), lifetime)?;
        let cert = params.self_signed(&key)?;
        write_file(&next, &key.serialize_pem(), 0o600)?;
        let mut both = bundle.trim_end().to_string();
        both.push('\n');
        both.push_str(&cert.pem());
        replace_file(&bundle_path, both.as_bytes(), 0o644)?;
        Ok(Ca {
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    /// CA rotation, step 2 (`pki rotate-ca switch`): the new key becomes `ca.key` (the old one
    /// is kept as `ca.old.key`), so coordinators restarted from now on sign with the new CA;
    /// `ca.pem` still holds both, so certificates of either are accepted while agents renew.
    pub fn rotate_switch(dir: &Path) -> Result<(), PkiError> {
        let (key_path, next, bundle_path) = rotation_files(dir);
        let old = dir.join("ca.old.key");
        if !next.is_file() {
            return Err(PkiError::Rotation(format!(
                "no new CA key at {}: start with `pki rotate-ca begin`",
                next.display()
            )));
        }
        let new_key = Ca::load_key(&next)?.public_key_der();
        if !ca_public_keys(read_file(&bundle_path)?.as_bytes())?.contains(&new_key) {
            return Err(PkiError::Rotation(format!(
                "{} does not hold the new CA's certificate: was it replaced since `rotate-ca \
                 begin`?",
                bundle_path.display()
            )));
        }
        if old.exists() {
            return Err(PkiError::Exists(old));
        }
        let rename = |from: &Path, to: &Path| {
            fs::rename(from, to).map_err(|source| PkiError::Io {
                what: "cannot rename",
                path: from.to_path_buf(),
                source,
            })
        };
        rename(&key_path, &old)?;
        rename(&next, &key_path)
    }

    /// CA rotation, step 3 (`pki rotate-ca finish`), once no certificate of the old CA is
    /// still in use: the old CA's certificate leaves `ca.pem` and its key is removed.
    pub fn rotate_finish(dir: &Path) -> Result<(), PkiError> {
        let (_, next, bundle_path) = rotation_files(dir);
        let old = dir.join("ca.old.key");
        if next.exists() || !old.is_file() {
            return Err(PkiError::Rotation(format!(
                "no switched rotation in {}: run `pki rotate-ca switch` first",
                dir.display()
            )));
        }
        let old_key = Ca::load_key(&old)?.public_key_der();
        let kept = certificates_without(read_file(&bundle_path)?.as_bytes(), &old_key)?;
        replace_file(&bundle_path, kept.as_bytes(), 0o644)?;
        fs::remove_file(&old).map_err(|source| PkiError::Io {
            what: "cannot remove",
            path: old.clone(),
            source,
        })
    }

    /// Loads the CA's key from `path` (a coordinator's `ca_key`).
    pub fn load_key(path: &Path) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(&read_file(path)?)?;
        Ok(Ca {
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    /// The CA's public key (the raw bits, as in a certificate's key field).
    pub fn public_key_der(&self) -> Vec<u8> {
        self.issuer.key().public_key_raw().to_vec()
    }

    /// Loads the CA from `dir`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(&read_file(&dir.join("ca.key"))?)?;
        Ok(Ca {
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    /// The identity `who` already has in `dir` (its certificate and key both there, and the
    /// certificate not in the last third of its lifetime), or a new one ([`Ca::issue`]) that
    /// replaces an old one.
    pub fn issue_if_missing(
        &self,
        who: &Identity,
        dir: &Path,
    ) -> Result<crate::config::TlsPaths, PkiError> {
        let paths = crate::config::TlsPaths::in_dir(dir, &who.file_stem());
        if paths.cert.is_file() && paths.key.is_file() {
            let fresh = fs::read(&paths.cert)
                .ok()
                .and_then(|pem| CertInfo::from_pem(&pem).ok())
                .is_some_and(|i| {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64);
                    i.not_after - now > (who.default_lifetime().as_secs() / 3) as i64
                });
            if fresh {
                return Ok(paths);
            }
            let p = who.params(SystemTime::now(), who.default_lifetime())?;
            let key = KeyPair::generate()?;
            let cert = p.signed_by(&key, &self.issuer)?;
            replace_file(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
            replace_file(&paths.cert, cert.pem().as_bytes(), 0o644)?;
            return Ok(paths);
        }
        self.issue(who, dir)
    }

    /// Issues a certificate for `who` (valid for its [`Identity::default_lifetime`]) and writes
    /// `<stem>.pem` and `<stem>.key` into `dir`; refuses ([`PkiError::Exists`]) when either is
    /// there already. Returns the paths in the layout [`crate::config::TlsPaths::in_dir`]
    /// expects.
    pub fn issue(&self, who: &Identity, dir: &Path) -> Result<crate::config::TlsPaths, PkiError> {
        self.issue_for(who, dir, who.default_lifetime())
    }

    /// [`Ca::issue`], valid for `lifetime`.
    pub fn issue_for(
        &self,
        who: &Identity,
        dir: &Path,
        lifetime: Duration,
    ) -> Result<crate::config::TlsPaths, PkiError> {
        let p = who.params(SystemTime::now(), lifetime)?;
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

    /// Certifies the key of a request (CSR, DER) as `who`, valid for `lifetime` from `now`.
    /// Only the request's key is taken: its names, usages and any other extension are not
    /// (the signer says who the holder is). The request's signature must be right (the holder
    /// has the key). Returns the certificate (PEM) and what it says.
    pub fn sign_request(
        &self,
        csr_der: &[u8],
        who: &Identity,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<(String, CertInfo), PkiError> {
        let der = rustls::pki_types::CertificateSigningRequestDer::from(csr_der);
        let req = rcgen::CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| PkiError::BadRequest(e.to_string()))?;
        let signed = rcgen::CertificateSigningRequestParams {
            params: who.params(now, lifetime)?,
            public_key: req.public_key,
        }
        .signed_by(&self.issuer)?;
        let info = CertInfo::from_der(signed.der())?;
        Ok((signed.pem(), info))
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

    #[test]
    fn a_request_is_signed_for_whom_the_signer_says_for_the_time_it_says() {
        use rustls::pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        // The request asks to be a coordinator; the signer certifies an agent.
        let (_key, csr) = request(&Identity::Coordinator(1)).unwrap();
        let now = SystemTime::now();
        let (pem, info) = ca
            .sign_request(
                &csr,
                &Identity::Agent("gpu-1".into()),
                now,
                Duration::from_secs(3600),
            )
            .unwrap();
        assert_eq!(info.names, ["gpu-1.agent.ferry"]);
        let now_s = now.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert_eq!(info.not_before, now_s - CLOCK_SKEW.as_secs() as i64);
        assert_eq!(info.not_after, now_s + 3600);
        assert_eq!(info.serial.len(), 32);
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert!(crate::tls::cert_is_for(&der, "gpu-1.agent.ferry"));
        assert!(!crate::tls::cert_is_for(&der, "coordinator.ferry"));
        // A request whose signature is wrong (the key is not the holder's) is refused.
        let mut bad = csr.clone();
        let n = bad.len();
        bad[n - 5] ^= 0xff;
        assert!(matches!(
            ca.sign_request(
                &bad,
                &Identity::Agent("x".into()),
                now,
                Duration::from_secs(60)
            ),
            Err(PkiError::BadRequest(_))
        ));
        // The CA's key checks against its certificate.
        let pem = fs::read(dir.path().join("ca.pem")).unwrap();
        assert_eq!(ca_public_key(&pem).unwrap(), ca.public_key_der());
        let other = tempfile::tempdir().unwrap();
        let ca2 = Ca::init(other.path()).unwrap();
        assert_ne!(ca_public_key(&pem).unwrap(), ca2.public_key_der());
        // Issued identities are bounded in time too.
        let p = ca.issue(&Identity::Agent("y".into()), dir.path()).unwrap();
        let i = CertInfo::from_pem(&fs::read(p.cert).unwrap()).unwrap();
        assert_eq!(
            i.not_after - i.not_before,
            (AGENT_LIFETIME + CLOCK_SKEW).as_secs() as i64
        );
    }
}
