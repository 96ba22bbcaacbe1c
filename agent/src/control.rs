//! The agent's client of the coordinator's control API.

use std::time::Duration;

use ferry_common::tls::TlsMaterial;
use ferry_proto::control::{self as pb, agent_control_client::AgentControlClient};
use tonic::transport::{Channel, Endpoint};

/// A call to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The coordinator address is not usable.
    #[error("bad coordinator address {addr}: {reason}")]
    Address {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The coordinator could not be reached or refused the call.
    #[error("coordinator at {addr}: {status}")]
    Call {
        /// The address.
        addr: String,
        /// What it said (or the transport error).
        status: tonic::Status,
    },
}

impl ControlError {
    /// Whether retrying later may succeed (the coordinator is down or electing a leader).
    pub fn is_transient(&self) -> bool {
        match self {
            ControlError::Address { .. } => false,
            ControlError::Call { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ),
        }
    }
}

/// A cheap-to-clone handle on the control API, acting as one agent.
#[derive(Clone)]
pub struct Control {
    agent: String,
    addr: String,
    client: AgentControlClient<Channel>,
}

impl Control {
    /// Prepares a connection to `addr` (`host:port`); it is established on first use, so an agent
    /// starts even while the coordinator is down.
    pub fn new(agent: &str, addr: &str, tls: &TlsMaterial) -> Result<Self, ControlError> {
        let bad = |reason: String| ControlError::Address {
            addr: addr.to_string(),
            reason,
        };
        // Several coordinators may be listed ("a:7400,b:7400,c:7400"): calls go to any of them
        // (each forwards to the leader), and a node that is down is skipped until it is back.
        let mut endpoints = Vec::new();
        for one in addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            endpoints.push(
                Endpoint::from_shared(format!("https://{one}"))
                    .map_err(|e| bad(e.to_string()))?
                    .tls_config(tls.grpc_client())
                    .map_err(|e| bad(e.to_string()))?
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(30))
                    .tcp_nodelay(true),
            );
        }
        let channel = match endpoints.len() {
            0 => return Err(bad("no address given".into())),
            1 => endpoints.pop().expect("one").connect_lazy(),
            _ => Channel::balance_list(endpoints.into_iter()),
        };
        Ok(Control {
            agent: agent.to_string(),
            addr: addr.to_string(),
            client: AgentControlClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
        })
    }

    /// This agent's name.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    fn err(&self, status: tonic::Status) -> ControlError {
        ControlError::Call {
            addr: self.addr.clone(),
            status,
        }
    }

    /// Registers this agent and its data address.
    pub async fn register(&self, data_addr: &str) -> Result<(), ControlError> {
        self.client
            .clone()
            .register(pb::RegisterRequest {
                agent: self.agent.clone(),
                data_addr: data_addr.to_string(),
            })
            .await
            .map_err(|s| self.err(s))?;
        Ok(())
    }

    /// Heartbeat; returns the source work assigned to this agent.
    pub async fn heartbeat(&self) -> Result<Vec<pb::SourceWork>, ControlError> {
        let r = self
            .client
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                agent: self.agent.clone(),
            })
            .await
            .map_err(|s| self.err(s))?;
        Ok(r.into_inner().source_work)
    }

    /// Registers planned segments.
    pub async fn register_segments(
        &self,
        migration_id: u64,
        segments: &[crate::manifest::SegmentSummary],
    ) -> Result<(), ControlError> {
        self.client
            .clone()
            .register_segments(pb::RegisterSegmentsRequest {
                agent: self.agent.clone(),
                migration_id,
                segments: segments
                    .iter()
                    .map(|s| pb::SegmentInfo {
                        segment_id: s.id,
                        bytes: s.bytes,
                        files: s.files,
                        fingerprint: s.fingerprint.to_vec(),
                    })
                    .collect(),
            })
            .await
            .map_err(|s| self.err(s))?;
        Ok(())
    }

    /// Marks the scan complete.
    pub async fn complete_scan(
        &self,
        migration_id: u64,
        summary: &crate::manifest::ScanSummary,
    ) -> Result<(), ControlError> {
        self.client
            .clone()
            .complete_scan(pb::CompleteScanRequest {
                agent: self.agent.clone(),
                migration_id,
                segments_total: summary.segments_total,
                issues: summary
                    .issues
                    .iter()
                    .map(|(path, reason)| pb::ScanIssue {
                        path: path.clone(),
                        reason: reason.clone(),
                    })
                    .collect(),
                issues_total: summary.issues_total,
            })
            .await
            .map_err(|s| self.err(s))?;
        Ok(())
    }

    /// Tells the operator, through the migration's status, about a problem at this source.
    pub async fn report_problem(
        &self,
        migration_id: u64,
        error: &str,
        issues: &[(String, String)],
    ) -> Result<(), ControlError> {
        self.client
            .clone()
            .report_source_problem(pb::SourceProblemRequest {
                agent: self.agent.clone(),
                migration_id,
                error: error.to_string(),
                issues: issues
                    .iter()
                    .map(|(path, reason)| pb::ScanIssue {
                        path: path.clone(),
                        reason: reason.clone(),
                    })
                    .collect(),
            })
            .await
            .map_err(|s| self.err(s))?;
        Ok(())
    }

    /// Asks for up to `max` segments to send.
    pub async fn lease(&self, max: u32) -> Result<Vec<pb::Lease>, ControlError> {
        let r = self
            .client
            .clone()
            .lease_segments(pb::LeaseSegmentsRequest {
                agent: self.agent.clone(),
                max,
            })
            .await
            .map_err(|s| self.err(s))?;
        Ok(r.into_inner().leases)
    }

    /// Asks whether a lease is current (as a target).
    pub async fn check_lease(
        &self,
        migration_id: u64,
        segment_id: u64,
        epoch: u64,
    ) -> Result<pb::CheckLeaseResponse, ControlError> {
        let r = self
            .client
            .clone()
            .check_lease(pb::CheckLeaseRequest {
                agent: self.agent.clone(),
                migration_id,
                segment_id,
                epoch,
            })
            .await
            .map_err(|s| self.err(s))?;
        Ok(r.into_inner())
    }

    /// Reports a transfer's outcome from this end.
    pub async fn report(
        &self,
        role: pb::Role,
        migration_id: u64,
        segment_id: u64,
        epoch: u64,
        result: Result<[u8; 32], String>,
    ) -> Result<pb::ReportSegmentResponse, ControlError> {
        let (ok, blake3, error) = match result {
            Ok(h) => (true, h.to_vec(), String::new()),
            Err(e) => (false, Vec::new(), e),
        };
        let r = self
            .client
            .clone()
            .report_segment(pb::ReportSegmentRequest {
                agent: self.agent.clone(),
                role: role as i32,
                migration_id,
                segment_id,
                epoch,
                ok,
                blake3,
                error,
            })
            .await
            .map_err(|s| self.err(s))?;
        Ok(r.into_inner())
    }
}
