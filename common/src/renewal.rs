//! Renewing a certificate in place: when it is due ([`renew_at`]), and putting a renewed key
//! and certificate into their files so that a crash at any point leaves a pair that belongs
//! together ([`install`], [`finish_renewal`]). Agents, coordinator nodes and ferryctl all renew
//! this way; each makes its new key where it runs.

use std::time::Duration;

use crate::config::TlsPaths;
use crate::pki::{self, PkiError};

/// Longest a running process sleeps between two looks at its certificate.
pub const LOOK_EVERY: Duration = Duration::from_secs(3600);
/// Longest a failed renewal waits before it tries again.
pub const RETRY_AT_MOST: Duration = Duration::from_secs(60);

/// When a certificate valid from `not_before` to `not_after` (unix seconds) should be
/// renewed: once two thirds of its lifetime are behind it, counted from its signing (ferry's
/// certificates are valid from [`pki::CLOCK_SKEW`] before it).
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    let signed = not_before
        .saturating_add(pki::CLOCK_SKEW.as_secs() as i64)
        .min(not_after);
    signed + (not_after - signed).max(0) * 2 / 3
}

/// What a running process does at `now_s` with its certificate valid from `not_before` to
/// `not_after` (unix seconds): sleep this long before it looks again (at most
/// [`LOOK_EVERY`]), or renew now (`None`).
pub fn wait_before_renewal(not_before: i64, not_after: i64, now_s: i64) -> Option<Duration> {
    let due = renew_at(not_before, not_after);
    let wait = Duration::from_secs(due.saturating_sub(now_s).max(0) as u64);
    (!wait.is_zero()).then(|| wait.min(LOOK_EVERY))
}

/// How long a renewal that failed at `now_s` waits before the next try: a tenth of the
/// certificate's time left (at least a second), at most [`RETRY_AT_MOST`].
pub fn retry_after(not_after: i64, now_s: i64) -> Duration {
    let left = not_after.saturating_sub(now_s);
    RETRY_AT_MOST.min(Duration::from_secs((left.max(10) / 10) as u64))
}

/// Where a renewed key waits while its certificate is put in place.
fn next_key(paths: &TlsPaths) -> std::path::PathBuf {
    let mut name = paths.key.file_name().unwrap_or_default().to_os_string();
    name.push(".next");
    paths.key.with_file_name(name)
}

/// Puts a renewed certificate and its key in place so that a crash at any point leaves a key
/// and certificate that belong together: the key goes to `<key>.next`, then the certificate
/// replaces the old one, then the key replaces the old key ([`finish_renewal`] completes the
/// last step after a crash).
pub fn install(paths: &TlsPaths, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), PkiError> {
    let next = next_key(paths);
    pki::replace_file(&next, key_pem, 0o600)?;
    pki::replace_file(&paths.cert, cert_pem, 0o644)?;
    std::fs::rename(&next, &paths.key).map_err(|source| PkiError::Io {
        what: "cannot replace",
        path: paths.key.clone(),
        source,
    })
}

/// Completes a renewal a crash interrupted (see [`install`]): a `<key>.next` that belongs to
/// the certificate becomes the key; one that does not (the certificate was not replaced yet)
/// is removed.
pub fn finish_renewal(paths: &TlsPaths) {
    let next = next_key(paths);
    if std::fs::symlink_metadata(&next).is_err() {
        return;
    }
    let with_next = TlsPaths {
        key: next.clone(),
        ..paths.clone()
    };
    if crate::tls::TlsMaterial::load(&with_next).is_ok() {
        match std::fs::rename(&next, &paths.key) {
            Ok(()) => {
                tracing::info!(message = "Completed a certificate renewal a stop interrupted.", key = %paths.key.display())
            }
            Err(e) => {
                tracing::warn!(message = "Cannot complete an interrupted renewal.", key = %paths.key.display(), error = %e)
            }
        }
    } else {
        let _ = std::fs::remove_file(&next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Identity;
    use std::time::SystemTime;

    #[test]
    fn a_process_sleeps_until_renewal_is_due_and_retries_sooner_as_expiry_nears() {
        // Signed at 1000 (valid from 700), for 90 s: due at 1060.
        assert_eq!(
            wait_before_renewal(700, 1090, 1000),
            Some(Duration::from_secs(60))
        );
        assert_eq!(wait_before_renewal(700, 1090, 1060), None);
        assert_eq!(wait_before_renewal(700, 1090, 2000), None);
        // A year's certificate: looked at again within the hour.
        let year = 365 * 86_400;
        assert_eq!(wait_before_renewal(0, year, 300), Some(LOOK_EVERY));
        // Retries: a tenth of what is left, between 1 s and a minute.
        assert_eq!(retry_after(1090, 1060), Duration::from_secs(3));
        assert_eq!(retry_after(1090, 2000), Duration::from_secs(1));
        assert_eq!(retry_after(year, 0), RETRY_AT_MOST);
    }

    #[test]
    fn a_certificate_is_renewed_with_a_third_of_its_life_left() {
        // Signed at 1000 (valid from 700), for 90 s.
        assert_eq!(renew_at(700, 1090), 1060);
        // A week's certificate: with 2 days 8 hours left.
        let week = 7 * 86_400;
        assert_eq!(renew_at(10_000 - 300, 10_000 + week), 10_000 + week * 2 / 3);
        assert_eq!(renew_at(100, 100), 100);
    }

    #[test]
    fn an_interrupted_renewal_leaves_a_key_and_certificate_that_belong_together() {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::Ca::init(dir.path()).unwrap();
        let who = Identity::Agent("a".into());
        let paths = ca.issue(&who, dir.path()).unwrap();
        let sign = || {
            let (key, csr) = pki::request(&who).unwrap();
            let (cert, _) = ca
                .sign_request(&csr, &who, SystemTime::now(), Duration::from_secs(600))
                .unwrap();
            (cert, key)
        };
        // Stopped after the key was put aside: the old pair stays, the new key goes.
        let (_, key) = sign();
        pki::replace_file(&next_key(&paths), key.as_bytes(), 0o600).unwrap();
        finish_renewal(&paths);
        assert!(!next_key(&paths).exists());
        crate::tls::TlsMaterial::load(&paths).unwrap();
        // Stopped after the certificate was replaced: the new key is taken.
        let (cert, key) = sign();
        pki::replace_file(&next_key(&paths), key.as_bytes(), 0o600).unwrap();
        pki::replace_file(&paths.cert, cert.as_bytes(), 0o644).unwrap();
        assert!(crate::tls::TlsMaterial::load(&paths).is_err());
        finish_renewal(&paths);
        crate::tls::TlsMaterial::load(&paths).unwrap();
        assert_eq!(std::fs::read_to_string(&paths.key).unwrap(), key);
        // And whole.
        let (cert, key) = sign();
        install(&paths, cert.as_bytes(), key.as_bytes()).unwrap();
        crate::tls::TlsMaterial::load(&paths).unwrap();
        assert_eq!(std::fs::read_to_string(&paths.cert).unwrap(), cert);
    }
}
