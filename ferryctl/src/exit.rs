//! `ferryctl`'s exit codes: one per kind of failure a script can act on.

use std::process::ExitCode;

use crate::ctl::CtlError;

/// Why `ferryctl` exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done.
    Ok = 0,
    /// Any other error (a bad file, a local problem).
    Error = 1,
    /// The command line is wrong (clap's own code).
    Usage = 2,
    /// The coordinator cannot be reached, or its cluster has no leader now.
    Unreachable = 3,
    /// The migration, agent or node named does not exist.
    NotFound = 4,
    /// The coordinator refused the call: the certificate's role does not allow it, or the call
    /// is not valid in the migration's state.
    Refused = 5,
    /// A certificate problem: the admin certificate is missing or unreadable, or the TLS
    /// handshake failed (another cluster's CA, an expired certificate).
    Certificate = 6,
    /// What was checked failed: a verification found differences, a migration, cutover or
    /// job ended failed, the audit log's chain is broken.
    Failed = 7,
}

/// The table `--help` and the README show.
pub const HELP: &str = "\
Exit codes:
  0  done
  1  other error (a bad file, a local problem)
  2  usage: the command line is wrong
  3  the coordinator cannot be reached, or its cluster has no leader now
  4  not found: no such migration, agent or node
  5  refused by the coordinator: the certificate's role does not allow the call, or the
     migration's state does not
  6  certificate problem: the admin certificate is missing, or the TLS handshake failed
     (another cluster's CA, an expired certificate)
  7  what was checked failed: verification found differences, a migration, cutover or
     job (assess, probe) ended failed, the audit log's chain is broken";

impl Exit {
    /// As a process exit code.
    pub fn code(self) -> ExitCode {
        ExitCode::from(self as u8)
    }

    /// The exit code of a failed command.
    pub fn of(e: &anyhow::Error) -> Exit {
        for cause in e.chain() {
            if let Some(c) = cause.downcast_ref::<CtlError>() {
                return match c {
                    CtlError::Connect { reason, .. } if tls_failure(reason) => Exit::Certificate,
                    CtlError::Handshake { .. } => Exit::Certificate,
                    CtlError::BadAddress(..) => Exit::Usage,
                    CtlError::Connect { .. } | CtlError::Unavailable(_) => Exit::Unreachable,
                    CtlError::Tls(_) => Exit::Certificate,
                    CtlError::Refused { code, .. } => match code {
                        tonic::Code::NotFound => Exit::NotFound,
                        tonic::Code::Unavailable => Exit::Unreachable,
                        tonic::Code::Unauthenticated => Exit::Certificate,
                        _ => Exit::Refused,
                    },
                    CtlError::Status(_) => Exit::Error,
                };
            }
            if cause
                .downcast_ref::<ferry_common::tls::TlsError>()
                .is_some()
            {
                return Exit::Certificate;
            }
        }
        Exit::Error
    }
}

/// Whether a connection failure was the TLS handshake's (a certificate refused by either end)
/// rather than the network's.
pub fn tls_failure(reason: &str) -> bool {
    [
        "certificate",
        "UnknownIssuer",
        "UnknownCA",
        "BadCertificate",
        "CertificateExpired",
        "fatal alert",
        "NotValidForName",
    ]
    .iter()
    .any(|s| reason.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_code() {
        let of = |e: CtlError| Exit::of(&anyhow::Error::new(e).context("migration status x"));
        let connect = |reason: &str| CtlError::Connect {
            addr: "a:1".into(),
            reason: reason.into(),
        };
        assert_eq!(of(connect("connection refused")), Exit::Unreachable);
        assert_eq!(
            of(connect("invalid peer certificate: UnknownIssuer")),
            Exit::Certificate
        );
        assert_eq!(
            of(CtlError::Unavailable("election".into())),
            Exit::Unreachable
        );
        let refused = |code| CtlError::Refused {
            code,
            message: "m".into(),
        };
        assert_eq!(of(refused(tonic::Code::NotFound)), Exit::NotFound);
        assert_eq!(of(refused(tonic::Code::PermissionDenied)), Exit::Refused);
        assert_eq!(of(refused(tonic::Code::FailedPrecondition)), Exit::Refused);
        assert_eq!(of(CtlError::Status("timed out".into())), Exit::Error);
        assert_eq!(
            of(crate::ctl::check_address("coord").unwrap_err()),
            Exit::Usage
        );
        for ok in ["coord:7400", "10.0.0.1:7400", "[::1]:7400"] {
            assert!(crate::ctl::check_address(ok).is_ok(), "{ok}");
        }
        for bad in ["coord", "coord:", ":7400", "coord:http", "::1", "coord:0"] {
            assert!(crate::ctl::check_address(bad).is_err(), "{bad}");
        }
        assert_eq!(Exit::of(&anyhow::anyhow!("bad catalog")), Exit::Error);
        for (code, n) in [(Exit::Usage, 2), (Exit::Failed, 7)] {
            assert_eq!(code as u8, n);
            assert!(HELP.contains(&format!("  {n}  ")), "{n}");
        }
    }
}
