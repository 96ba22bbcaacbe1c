//! Names of agents and the DNS identities their certificates carry.

use thiserror::Error;

/// An agent name is not usable as a certificate identity.
#[derive(Debug, Error)]
#[error("invalid agent name {name:?}: use 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'")]
pub struct InvalidName {
    /// The rejected name.
    pub name: String,
}

/// Checks that `name` is a valid agent (or admin) name: a single DNS label.
pub fn validate_name(name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            name: name.to_string(),
        })
    }
}

/// The DNS name in an agent's certificate. Peers check it to know who they talk to.
pub fn agent_dns(name: &str) -> String {
    format!("{name}.agent.ferry")
}

/// The DNS name in an admin (ferryctl) certificate.
pub fn admin_dns(name: &str) -> String {
    format!("{name}.admin.ferry")
}

/// The DNS name every admin certificate carries besides its own; the admin API requires it.
pub const ADMIN_DNS: &str = "admin.ferry";

/// What an operator's (ferryctl) certificate allows, least to most: each role may do what the
/// ones below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads: cluster and agent lists, migrations' status, verification results.
    Viewer,
    /// Also changes migrations: create, throttle, sync, verify in full, cut over, fall back,
    /// finalize, delete.
    Operator,
    /// Also changes the cluster: membership, leadership, snapshots.
    Admin,
}

impl Role {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The DNS name a certificate of this role carries (besides [`ADMIN_DNS`]). No agent,
    /// operator or node name can make it.
    pub fn dns(self) -> String {
        format!("{}.role.ferry", self.as_str())
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}: use viewer, operator or admin"
            )),
        }
    }
}

/// The DNS name every coordinator node's certificate carries; clients verify it.
pub const COORDINATOR_DNS: &str = "coordinator.ferry";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("src-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a.b", "a/b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(agent_dns("t1"), "t1.agent.ferry");
    }
}
