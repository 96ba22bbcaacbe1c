//! gRPC services. Writes go through Raft (`client_write`); reads wait for a linearizable read
//! point first, then read the applied state. Callers are identified by their TLS certificate.

pub mod admin;
pub mod agent;
mod convert;

use std::sync::{Arc, RwLock};

use ferry_common::names;
use tonic::{Request, Status};

use crate::raft_types::Raft;
use crate::state::{Command, Response, State};
use crate::store::Applied;

/// What the services share.
pub struct Core {
    /// Raft handle.
    pub raft: Raft,
    /// Applied state.
    pub applied: Arc<RwLock<Applied>>,
    /// This node.
    pub node_id: u64,
    /// Lease duration handed to the scheduler.
    pub lease_ttl_ms: u64,
}

/// Wall-clock now in unix milliseconds. Only the leader reads it, when proposing a command.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Core {
    /// Proposes `cmd` and returns what applying it produced.
    pub async fn write(&self, cmd: Command) -> Result<Response, Status> {
        match self.raft.client_write(cmd).await {
            Ok(r) => Ok(r.data),
            Err(e) => Err(Status::unavailable(format!(
                "coordinator could not commit the change: {e}; retry"
            ))),
        }
    }

    /// Reads the state at a linearizable point.
    pub async fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T, Status> {
        self.raft.ensure_linearizable().await.map_err(|e| {
            Status::unavailable(format!(
                "coordinator cannot serve a current read: {e}; retry"
            ))
        })?;
        let a = self.applied.read().expect("not poisoned");
        Ok(f(&a.state))
    }
}

/// Checks that the caller's certificate is the one of agent `claimed`.
pub fn authorize_agent<T>(req: &Request<T>, claimed: &str) -> Result<(), Status> {
    names::validate_name(claimed).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let ok = certs
        .first()
        .is_some_and(|c| ferry_common::tls::cert_is_for(c, &names::agent_dns(claimed)));
    if ok {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "client certificate is not agent {claimed}'s"
        )))
    }
}

/// Checks that the caller holds an admin certificate.
pub fn authorize_admin<T>(req: &Request<T>) -> Result<(), Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let ok = certs
        .first()
        .is_some_and(|c| ferry_common::tls::cert_is_for(c, names::ADMIN_DNS));
    if ok {
        Ok(())
    } else {
        Err(Status::permission_denied(
            "this call needs an admin certificate (ferry-coordinator pki issue --admin NAME)",
        ))
    }
}

/// Maps a refused command to a gRPC status.
pub fn refused(r: Response) -> Status {
    match r {
        Response::Refused(why) => Status::failed_precondition(why),
        other => Status::internal(format!("unexpected state machine response {other:?}")),
    }
}
