//! A coordinator node renews its own certificate while it runs, once two thirds of its lifetime
//! are behind it: a new key made here, a request for it certified by this node (when it holds
//! the CA key) or by another member that does (`RaftPeer.RenewNodeCertificate`), recorded in
//! Raft and audited, the files replaced so that a crash leaves a pair that belongs together,
//! and the new certificate presented from the next connection on (to agents, operators and
//! peers) without a restart.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_common::config::TlsPaths;
use ferry_common::pki::{self, CertInfo, Identity};
use ferry_common::renewal::{install, retry_after, wait_before_renewal};
use ferry_common::tls::TlsMaterial;

use crate::grpc::Core;

/// How long a peer has to certify a request.
const PEER_CALL: Duration = Duration::from_secs(10);

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Renews this node's certificate whenever it is due, until the task is aborted.
pub async fn renew_own_certificate(core: Arc<Core>, tls: TlsMaterial, paths: TlsPaths) {
    loop {
        let info = match CertInfo::from_pem(&tls.current_cert_pem()) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(message = "Cannot read this node's certificate; it is not renewed.", error = %e);
                return;
            }
        };
        if let Some(wait) = wait_before_renewal(info.not_before, info.not_after, now_s()) {
            tokio::time::sleep(wait).await;
            continue;
        }
        match renew(&core, &tls, &paths).await {
            Ok(new) => tracing::info!(
                message = "Renewed this node's certificate.",
                serial = %new.serial,
                previous = %info.serial,
                valid_until = %ferry_common::text::utc(new.not_after.max(0) as u64 * 1000)
            ),
            Err(error) => {
                let left = info.not_after - now_s();
                if left <= 0 {
                    tracing::error!(message = "This node's certificate expired and could not be renewed: agents, operators and peers refuse it. Certify a new one by hand (`ferry-coordinator pki request` here, `pki sign` on the CA's host) and restart the node.", %error);
                } else {
                    tracing::warn!(message = "Cannot renew this node's certificate; trying again.", %error, seconds_left = left);
                }
                tokio::time::sleep(retry_after(info.not_after, now_s())).await;
            }
        }
    }
}

/// One renewal: returns the new certificate's details once it is in its files and presented.
async fn renew(core: &Core, tls: &TlsMaterial, paths: &TlsPaths) -> Result<CertInfo, String> {
    let id = core.node_id;
    let (key_pem, csr) = pki::request(&Identity::Coordinator(id)).map_err(|e| e.to_string())?;
    let current = tls.cert_der().map_err(|e| e.to_string())?;
    let cert_pem = if core.signer.is_some() {
        crate::grpc::enrol::renew_node(core, id, &current, &csr, "this node".into())
            .await
            .map_err(|s| s.message().to_string())?
    } else {
        certified_by_a_peer(core, csr).await?
    };
    let new = CertInfo::from_pem(cert_pem.as_bytes()).map_err(|e| e.to_string())?;
    let own = format!("node-{id}.{}", ferry_common::names::COORDINATOR_DNS);
    if !new.names.contains(&own) {
        return Err(format!(
            "the certificate signed is not coordinator node {id}'s; the old one stays"
        ));
    }
    install(paths, cert_pem.as_bytes(), key_pem.as_bytes()).map_err(|e| e.to_string())?;
    tls.renew(cert_pem.as_bytes(), key_pem.as_bytes())
        .map_err(|e| e.to_string())?;
    core.peers.refresh(tls);
    Ok(new)
}

/// Asks the other members, one after another, to certify `csr`.
async fn certified_by_a_peer(core: &Core, csr: Vec<u8>) -> Result<String, String> {
    let others: Vec<(u64, String)> = {
        let metrics = core.raft.metrics();
        let m = metrics.borrow();
        m.membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != core.node_id)
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect()
    };
    if others.is_empty() {
        return Err("this node holds no CA key and has no other member to ask: set ca_key".into());
    }
    let mut why = Vec::new();
    for (id, addr) in others {
        let asked = async {
            let mut c = core.peers.client(&addr).map_err(|e| e.to_string())?;
            let req = ferry_proto::raft::RenewNodeCertificateRequest {
                csr_der: csr.clone(),
            };
            match tokio::time::timeout(PEER_CALL, c.renew_node_certificate(req)).await {
                Ok(Ok(r)) => Ok(r.into_inner().cert_pem),
                Ok(Err(s)) => Err(s.message().to_string()),
                Err(_) => Err(format!("no answer within {PEER_CALL:?}")),
            }
        };
        match asked.await {
            Ok(pem) => return Ok(pem),
            Err(e) => why.push(format!("node {id}: {e}")),
        }
    }
    Err(format!(
        "no member certified this node's request ({})",
        why.join("; ")
    ))
}
