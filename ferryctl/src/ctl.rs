//! The admin client behind `ferryctl`: connects with an admin certificate and renders answers as
//! tables or JSON.

use std::time::{Duration, Instant};

use backon::Retryable;
use ferry_common::tls::TlsMaterial;
use ferry_proto::admin::{self as pb, admin_client::AdminClient};
use ferry_proto::json::phase_name;
use tonic::transport::{Channel, Endpoint};

/// A call failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The coordinator could not be reached.
    #[error("cannot reach the coordinator at {addr}: {reason}; is it running, and is --coordinator right?")]
    Connect {
        /// Address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed: a certificate was refused by one end or the other.
    #[error("the TLS handshake with the coordinator at {addr} failed: {reason}; its certificate is not from the CA in --pki-dir, or it refused this admin certificate (another cluster's CA? expired?)")]
    Handshake {
        /// Address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// `--coordinator` is not a list of `host:port`.
    #[error("--coordinator {0:?}: {1}")]
    BadAddress(String, String),
    /// Something went wrong on this side (a watch that timed out, an answer without a body).
    #[error("{0}")]
    Status(String),
    /// The coordinator refused the call with `code`.
    #[error("coordinator refused: {message}")]
    Refused {
        /// The gRPC status code (NotFound, PermissionDenied, InvalidArgument, ...).
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] ferry_common::tls::TlsError),
    /// No leader could serve the call (an election is under way, or a quorum is down).
    #[error("coordinator unavailable: {0}; retry when the cluster has a leader (ferryctl cluster status)")]
    Unavailable(String),
}

impl From<tonic::Status> for CtlError {
    fn from(s: tonic::Status) -> Self {
        if s.code() == tonic::Code::Unavailable {
            CtlError::Unavailable(s.message().to_string())
        } else {
            CtlError::Refused {
                code: s.code(),
                message: s.message().to_string(),
            }
        }
    }
}

/// How long read calls keep retrying while the cluster has no reachable leader (an election
/// takes a few seconds).
const READ_RETRY_FOR: Duration = Duration::from_secs(20);

/// How long `snapshot` waits for its answer: the node's own bound (10 minutes) and a minute.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(660);

/// The retry policy of admin calls: from 100 ms up to 2 s between tries.
fn policy() -> backon::ExponentialBuilder {
    ferry_common::retry::policy(Duration::from_millis(100), Duration::from_secs(2))
}

/// Retries a read while the coordinator answers `Unavailable`, for up to [`READ_RETRY_FOR`].
async fn retry_read<T, F, Fut>(f: F) -> Result<T, CtlError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CtlError>>,
{
    let deadline = Instant::now() + READ_RETRY_FOR;
    f.retry(policy())
        .when(|e| matches!(e, CtlError::Unavailable(_)) && Instant::now() < deadline)
        .await
}

/// An admin connection.
#[derive(Clone)]
pub struct Ctl {
    client: AdminClient<Channel>,
    /// The same node without the per-call timeout, for calls that wait on purpose (a joining
    /// node catching up) and carry their own bound.
    long: AdminClient<Channel>,
    tls: TlsMaterial,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable.
    Table,
    /// One JSON document.
    Json,
    /// The same as YAML (a document per JSON document).
    Yaml,
}

/// Whether `print_json` writes YAML (`-o yaml`): set once, by the command line.
static YAML: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `-o yaml` was asked for.
pub fn yaml_output() -> bool {
    YAML.load(std::sync::atomic::Ordering::Relaxed)
}

/// Makes [`print_json`] write YAML documents instead of JSON.
pub fn output_yaml() {
    YAML.store(true, std::sync::atomic::Ordering::Relaxed);
}

impl Ctl {
    /// Connects to `addr` as the admin whose TLS material is given.
    /// With several addresses (`a:7400,b:7400`), the first that accepts a connection is used; any
    /// node serves every call (writes are forwarded to the leader).
    pub async fn connect(addr: &str, tls: &TlsMaterial) -> Result<Self, CtlError> {
        let mut last = None;
        for one in addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            match Self::connect_one(one, tls).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| CtlError::Connect {
            addr: addr.to_string(),
            reason: "no address given".into(),
        }))
    }

    async fn connect_one(addr: &str, tls: &TlsMaterial) -> Result<Self, CtlError> {
        check_address(addr)?;
        let err = |reason: String| {
            if crate::exit::tls_failure(&reason) {
                CtlError::Handshake {
                    addr: addr.to_string(),
                    reason,
                }
            } else {
                CtlError::Connect {
                    addr: addr.to_string(),
                    reason,
                }
            }
        };
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| err(e.to_string()))?
            .tls_config(tls.grpc_client())
            .map_err(|e| err(e.to_string()))?
            .connect_timeout(Duration::from_secs(5));
        let long = endpoint.connect_lazy();
        let channel = endpoint
            .timeout(Duration::from_secs(60))
            .connect()
            .await
            .map_err(|e| err(error_chain(&e)))?;
        Ok(Ctl {
            client: AdminClient::new(channel).max_decoding_message_size(256 * 1024 * 1024),
            long: AdminClient::new(long),
            tls: tls.clone(),
        })
    }

    /// Adds a coordinator node (it catches up as a learner, then becomes a voter), waiting up to
    /// the default catch-up time.
    pub async fn add_node(&self, node_id: u64, addr: &str) -> Result<(), CtlError> {
        self.add_node_watched(node_id, addr, Duration::ZERO, |_| {})
            .await
    }

    /// Adds a coordinator node, allowing it `catch_up` (zero: the coordinator's default) to catch
    /// up, and calls `progress` about once a second with a line on how far it is. If it does not
    /// catch up in time, the coordinator removes it again and this fails.
    pub async fn add_node_watched(
        &self,
        node_id: u64,
        addr: &str,
        catch_up: Duration,
        mut progress: impl FnMut(&str),
    ) -> Result<(), CtlError> {
        let mut long = self.long.clone();
        let req = pb::AddNodeRequest {
            node_id,
            addr: addr.to_string(),
            catch_up_timeout_secs: catch_up.as_secs().min(u32::MAX as u64) as u32,
        };
        let call = long.add_node(req);
        tokio::pin!(call);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut leader: Option<(u64, Ctl)> = None;
        loop {
            tokio::select! {
                r = &mut call => {
                    r?;
                    return Ok(());
                }
                _ = tick.tick() => {
                    if let Some(line) = self.join_progress(node_id, &mut leader).await {
                        progress(&line);
                    }
                }
            }
        }
    }

    /// One line on a joining node, from the leader's view (the only node that knows how far a
    /// learner is); `None` when no node answers right now.
    async fn join_progress(&self, node_id: u64, leader: &mut Option<(u64, Ctl)>) -> Option<String> {
        let mut c = self.client.clone();
        let here = c
            .cluster_status(pb::ClusterStatusRequest {})
            .await
            .ok()?
            .into_inner();
        let status = if here.leader_id == here.node_id || here.leader_id == 0 {
            here
        } else {
            if leader.as_ref().is_none_or(|(id, _)| *id != here.leader_id) {
                let addr = here
                    .members
                    .iter()
                    .find(|m| m.node_id == here.leader_id)?
                    .addr
                    .clone();
                *leader = Some((here.leader_id, Ctl::connect(&addr, &self.tls).await.ok()?));
            }
            let (_, ctl) = leader.as_ref()?;
            ctl.client
                .clone()
                .cluster_status(pb::ClusterStatusRequest {})
                .await
                .ok()?
                .into_inner()
        };
        Some(match status.members.iter().find(|m| m.node_id == node_id) {
            None => format!("node {node_id}: not a member yet"),
            Some(m) if m.voter => format!("node {node_id}: voter"),
            Some(m) if !m.matched_known || m.matched_index == 0 => format!(
                "node {node_id} (learner at {}): nothing replicated yet (of {} log entries)",
                m.addr, status.last_log_index
            ),
            Some(m) => format!(
                "node {node_id} (learner at {}): holds the log up to {} of {}",
                m.addr, m.matched_index, status.last_log_index
            ),
        })
    }

    /// Removes a coordinator node from the cluster.
    pub async fn remove_node(&self, node_id: u64) -> Result<(), CtlError> {
        self.client
            .clone()
            .remove_node(pb::RemoveNodeRequest { node_id })
            .await?;
        Ok(())
    }

    /// Builds a snapshot on the connected node; returns `(node, index, build milliseconds)`.
    pub async fn snapshot(&self) -> Result<(u64, u64, u64), CtlError> {
        // The node waits until the snapshot covers what it applied, at most 10 minutes:
        // millions of segments on a busy node outlast the 60 s per call. A minute more here,
        // so a stuck node or a dead connection still ends the call.
        let mut long = self.long.clone();
        let call = long.snapshot(pb::SnapshotRequest {});
        let r = tokio::time::timeout(SNAPSHOT_WAIT, call)
            .await
            .map_err(|_| {
                tonic::Status::deadline_exceeded(format!(
                    "no answer to the snapshot request within {} s: check the node's log",
                    SNAPSHOT_WAIT.as_secs()
                ))
            })??
            .into_inner();
        Ok((r.node_id, r.snapshot_index, r.build_millis))
    }

    /// Makes `node_id` the leader.
    pub async fn transfer_leader(&self, node_id: u64) -> Result<(), CtlError> {
        self.client
            .clone()
            .transfer_leader(pb::TransferLeaderRequest { node_id })
            .await?;
        Ok(())
    }

    /// Cluster status.
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse, CtlError> {
        retry_read(|| async {
            let mut c = self.client.clone();
            Ok(c.cluster_status(pb::ClusterStatusRequest {})
                .await?
                .into_inner())
        })
        .await
    }

    /// Agents.
    pub async fn agents(&self) -> Result<Vec<pb::AgentInfo>, CtlError> {
        retry_read(|| async {
            let mut c = self.client.clone();
            Ok(c.list_agents(pb::ListAgentsRequest {})
                .await?
                .into_inner()
                .agents)
        })
        .await
    }

    /// Makes a join token (sent once: a retry would make a second token).
    pub async fn create_token(
        &self,
        role: &str,
        ttl: std::time::Duration,
        agent: &str,
    ) -> Result<pb::CreateJoinTokenResponse, CtlError> {
        let mut c = self.client.clone();
        Ok(c.create_join_token(pb::CreateJoinTokenRequest {
            role: role.to_string(),
            ttl_secs: ttl.as_secs(),
            agent: agent.to_string(),
        })
        .await?
        .into_inner())
    }

    /// Has the coordinator certify an operator's key (sent once: each call signs anew).
    pub async fn create_user(
        &self,
        name: &str,
        role: &str,
        csr_der: Vec<u8>,
    ) -> Result<pb::CreateUserResponse, CtlError> {
        let mut c = self.client.clone();
        Ok(c.create_user(pb::CreateUserRequest {
            name: name.to_string(),
            role: role.to_string(),
            csr_der,
        })
        .await?
        .into_inner())
    }

    /// Renews the caller's own certificate: certifies `csr_der` (a key made here) for the
    /// caller's name and role.
    pub async fn renew_operator_certificate(
        &self,
        csr_der: Vec<u8>,
    ) -> Result<pb::CreateUserResponse, CtlError> {
        let mut c = self.client.clone();
        Ok(
            c.renew_operator_certificate(pb::RenewOperatorCertificateRequest { csr_der })
                .await?
                .into_inner(),
        )
    }

    /// The join tokens of the last day.
    pub async fn tokens(&self) -> Result<Vec<pb::JoinTokenInfo>, CtlError> {
        retry_read(|| async {
            let mut c = self.client.clone();
            Ok(c.list_join_tokens(pb::ListJoinTokensRequest {})
                .await?
                .into_inner()
                .tokens)
        })
        .await
    }

    /// The certificates the coordinators signed.
    pub async fn certificates(&self) -> Result<Vec<pb::CertificateInfo>, CtlError> {
        retry_read(|| async {
            let mut c = self.client.clone();
            Ok(c.list_certificates(pb::ListCertificatesRequest {})
                .await?
                .into_inner()
                .certificates)
        })
        .await
    }

    /// Revokes an agent (idempotent: retried like a read).
    pub async fn revoke(&self, agent: &str) -> Result<(), CtlError> {
        retry_read(|| async {
            let mut c = self.client.clone();
            c.revoke_agent(pb::RevokeAgentRequest {
                agent: agent.to_string(),
            })
            .await?;
            Ok(())
        })
        .await
    }

    /// Sets the throttle of a migration (`migration`: its name or id) or an agent; returns the
    /// throttle now in force, in canonical form. Setting a throttle is idempotent, so it is
    /// retried like a read.
    pub async fn set_throttle(
        &self,
        migration: &str,
        agent: &str,
        throttle: &str,
    ) -> Result<String, CtlError> {
        retry_read(|| async {
            let mut c = self.client.clone();
            Ok(c.set_throttle(pb::SetThrottleRequest {
                migration: migration.to_string(),
                agent: agent.to_string(),
                throttle: throttle.to_string(),
            })
            .await?
            .into_inner()
            .throttle)
        })
        .await
    }

    /// Adds `agent` to the target pool of `migration` (its name or id), or with `active`
    /// false takes it out; returns the pool as it is then. Idempotent, so retried like a
    /// read.
    pub async fn set_migration_target(
        &self,
        migration: &str,
        agent: &str,
        active: bool,
    ) -> Result<Vec<pb::PoolMember>, CtlError> {
        retry_read(|| async {
            let mut c = self.client.clone();
            Ok(c.set_migration_target(pb::SetMigrationTargetRequest {
                migration: migration.to_string(),
                agent: agent.to_string(),
                active,
            })
            .await?
            .into_inner()
            .targets)
        })
        .await
    }

    /// Starts a sync round of a migration whose current round has ended; returns its number.
    /// Sent once, not retried: a repeated request would start yet another round (if the answer
    /// is lost, `migration status` shows whether the round started).
    pub async fn sync(&self, id: u64) -> Result<u32, CtlError> {
        let mut c = self.client.clone();
        Ok(c.sync_migration(pb::SyncMigrationRequest {
            migration_id: id,
            name: String::new(),
        })
        .await?
        .into_inner()
        .round)
    }

    /// Starts a job on `agent` (an assessment or a probe). Sent once, like [`Ctl::sync`]: a
    /// retry could start it twice.
    pub async fn start_job(&self, req: pb::StartJobRequest) -> Result<pb::JobInfo, CtlError> {
        let mut c = self.client.clone();
        Ok(c.start_job(req).await?.into_inner())
    }

    /// Job `id` as the coordinator keeps it.
    pub async fn job(&self, id: u64) -> Result<pb::JobInfo, CtlError> {
        retry_read(|| async {
            let mut c = self.client.clone();
            Ok(c.get_job(pb::GetJobRequest { id }).await?.into_inner())
        })
        .await
    }

    /// The jobs kept, newest first.
    pub async fn jobs(&self) -> Result<Vec<pb::JobInfo>, CtlError> {
        retry_read(|| async {
            let mut c = self.client.clone();
            Ok(c.list_jobs(pb::ListJobsRequest {}).await?.into_inner().jobs)
        })
        .await
    }

    /// Starts a cutover (or, with `abort`, aborts the running one); returns its attempt. Sent
    /// once, like [`Ctl::sync`].
    pub async fn cutover(&self, id: u64, abort: bool) -> Result<u32, CtlError> {
        let mut c = self.client.clone();
        Ok(c.cutover(pb::CutoverRequest {
            migration_id: id,
            name: String::new(),
            abort,
            dry_run: false,
        })
        .await?
        .into_inner()
        .attempt)
    }

    /// The attempt a cutover of migration `id` started now would be, or why none can start;
    /// starts nothing.
    pub async fn check_cutover(&self, id: u64) -> Result<u32, CtlError> {
        retry_read(|| async {
            let mut c = self.client.clone();
            Ok(c.cutover(pb::CutoverRequest {
                migration_id: id,
                name: String::new(),
                abort: false,
                dry_run: true,
            })
            .await?
            .into_inner()
            .attempt)
        })
        .await
    }

    /// Opens the fallback window of a migration that was cut over; returns the id and name of
    /// its reverse migration. Sent once, like [`Ctl::sync`].
    pub async fn fallback(&self, id: u64) -> Result<(u64, String), CtlError> {
        let mut c = self.client.clone();
        let r = c
            .fallback(pb::FallbackRequest {
                migration_id: id,
                name: String::new(),
            })
            .await?
            .into_inner();
        Ok((r.migration_id, r.name))
    }

    /// Closes the fallback window of a migration that was cut over (idempotent).
    pub async fn finalize(&self, id: u64) -> Result<(), CtlError> {
        let mut c = self.client.clone();
        c.finalize(pb::FinalizeRequest {
            migration_id: id,
            name: String::new(),
        })
        .await?;
        Ok(())
    }

    /// The whole audit log, oldest first (asked a page at a time).
    pub async fn audit(&self) -> Result<Vec<pb::AuditRecordInfo>, CtlError> {
        let mut all: Vec<pb::AuditRecordInfo> = Vec::new();
        loop {
            let after_seq = all.last().map_or(0, |r| r.seq);
            let page = retry_read(|| async {
                let mut c = self.client.clone();
                Ok(c.audit(pb::AuditRequest {
                    after_seq,
                    limit: 0,
                })
                .await?
                .into_inner())
            })
            .await?;
            all.extend(page.records);
            if !page.more {
                return Ok(all);
            }
        }
    }

    /// Deletes a migration (`force`: also while it runs).
    pub async fn delete(&self, id: u64, force: bool) -> Result<(), CtlError> {
        let mut c = self.client.clone();
        c.delete_migration(pb::DeleteMigrationRequest {
            migration_id: id,
            name: String::new(),
            force,
        })
        .await?;
        Ok(())
    }

    /// Starts a full verification of a migration whose last round is done; returns its number
    /// and the round it verifies. Sent once, like [`Ctl::sync`].
    pub async fn verify_full(&self, id: u64) -> Result<(u32, u32), CtlError> {
        let mut c = self.client.clone();
        let r = c
            .verify_full(pb::VerifyFullRequest {
                migration_id: id,
                name: String::new(),
            })
            .await?
            .into_inner();
        Ok((r.number, r.round))
    }

    /// Polls migration `id` every 250 ms until `done` makes something of its progress; fails
    /// after `timeout`, saying `what` had not ended.
    async fn poll_until<T>(
        &self,
        id: u64,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(pb::MigrationProgress) -> Result<Option<T>, CtlError>,
    ) -> Result<T, CtlError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = done(self.status(id).await?)? {
                return Ok(t);
            }
            if Instant::now() > deadline {
                return Err(CtlError::Status(format!(
                    "{what} of migration {id} has not ended within {}s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Polls migration `id` until its full verification `number` has ended; fails after
    /// `timeout`.
    pub async fn watch_verification(
        &self,
        id: u64,
        number: u32,
        timeout: Duration,
    ) -> Result<pb::FullVerificationInfo, CtlError> {
        let what = format!("verification {number}");
        self.poll_until(id, timeout, &what, |p| {
            match p.verification.filter(|v| v.number == number) {
                None => Err(CtlError::Status(format!(
                    "verification {number} of migration {id} is gone (a later one replaced it)"
                ))),
                Some(v) => Ok((v.ended_ms != 0).then_some(v)),
            }
        })
        .await
    }

    /// Polls migration `id` until its cutover has ended (done or aborted), showing each
    /// change of phase; fails after `timeout`.
    pub async fn watch_cutover(
        &self,
        id: u64,
        timeout: Duration,
        mut show: impl FnMut(&pb::MigrationProgress),
    ) -> Result<pb::MigrationProgress, CtlError> {
        let mut last = None;
        self.poll_until(id, timeout, "the cutover", |p| {
            let phase = p.cutover.as_ref().map(|c| (c.phase, c.runs.len(), p.phase));
            if phase != last {
                show(&p);
                last = phase;
            }
            let ended = p.cutover.as_ref().is_some_and(|c| {
                matches!(
                    c.phase(),
                    pb::CutoverPhase::Done | pb::CutoverPhase::Aborted
                )
            });
            Ok(ended.then_some(p))
        })
        .await
    }

    /// Checks a create as the coordinator would (the name, the agents, the spec, its
    /// throttle) without creating anything.
    pub async fn check_create(
        &self,
        name: &str,
        spec: pb::MigrationSpec,
        throttle: &str,
    ) -> Result<(), CtlError> {
        let req = pb::CreateMigrationRequest {
            spec: Some(spec),
            name: name.to_string(),
            idempotency_key: String::new(),
            throttle: throttle.to_string(),
            dry_run: true,
        };
        retry_read(|| async {
            let mut c = self.client.clone();
            c.create_migration(req.clone()).await?;
            Ok(())
        })
        .await
    }

    /// Creates a migration named by [`default_name`]; returns its id. See [`Ctl::create_named`].
    pub async fn create(&self, spec: pb::MigrationSpec) -> Result<u64, CtlError> {
        self.create_named(&default_name(&spec), spec).await
    }

    /// Creates a migration; returns its id. The request carries a fresh idempotency key and is
    /// retried with it while the outcome is unknown (no leader, a timeout): a first attempt
    /// that was committed after all is answered, never duplicated.
    pub async fn create_named(&self, name: &str, spec: pb::MigrationSpec) -> Result<u64, CtlError> {
        self.create_with_key(name, spec, &new_idempotency_key())
            .await
    }

    /// Creates a migration with the caller's idempotency key, retrying while the outcome is
    /// unknown; the same key again answers the migration it created.
    pub async fn create_with_key(
        &self,
        name: &str,
        spec: pb::MigrationSpec,
        key: &str,
    ) -> Result<u64, CtlError> {
        self.create_throttled(name, spec, key, "").await
    }

    /// [`Ctl::create_with_key`], with a throttle in force from the start (empty: none).
    pub async fn create_throttled(
        &self,
        name: &str,
        spec: pb::MigrationSpec,
        key: &str,
        throttle: &str,
    ) -> Result<u64, CtlError> {
        let req = pb::CreateMigrationRequest {
            spec: Some(spec),
            name: name.to_string(),
            idempotency_key: key.to_string(),
            throttle: throttle.to_string(),
            dry_run: false,
        };
        let deadline = Instant::now() + READ_RETRY_FOR;
        let create = || {
            let mut c = self.client.clone();
            let req = req.clone();
            async move { c.create_migration(req).await }
        };
        let r = create
            .retry(policy())
            .when(|s| {
                matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                ) && Instant::now() < deadline
            })
            .notify(|s, _| {
                tracing::info!(
                    message = "Create not answered; retrying with the same idempotency key.",
                    key = %req.idempotency_key,
                    error = %s.message()
                )
            })
            .await?;
        Ok(r.into_inner().migration_id)
    }

    /// The id of the migration given as NAME or id (all digits).
    pub async fn resolve(&self, name_or_id: &str) -> Result<u64, CtlError> {
        if let Ok(id) = name_or_id.parse::<u64>() {
            return Ok(id);
        }
        Ok(self.status_of(name_or_id).await?.migration_id)
    }

    /// One migration, by name.
    pub async fn status_of(&self, name: &str) -> Result<pb::MigrationProgress, CtlError> {
        retry_read(|| async {
            let mut c = self.client.clone();
            let r = c.migration_status(pb::MigrationStatusRequest {
                migration_id: 0,
                name: name.to_string(),
            });
            r.await?
                .into_inner()
                .progress
                .ok_or_else(|| CtlError::Status("empty status".into()))
        })
        .await
    }

    /// All migrations.
    pub async fn migrations(&self) -> Result<Vec<pb::MigrationProgress>, CtlError> {
        retry_read(|| async {
            let mut c = self.client.clone();
            Ok(c.list_migrations(pb::ListMigrationsRequest {})
                .await?
                .into_inner()
                .migrations)
        })
        .await
    }

    /// One migration.
    pub async fn status(&self, id: u64) -> Result<pb::MigrationProgress, CtlError> {
        retry_read(|| async {
            let mut c = self.client.clone();
            let r = c.migration_status(pb::MigrationStatusRequest {
                migration_id: id,
                name: String::new(),
            });
            r.await?
                .into_inner()
                .progress
                .ok_or_else(|| CtlError::Status("empty status".into()))
        })
        .await
    }

    /// Verification summary; `max_listed = u32::MAX` lists every segment (asked a page at a
    /// time; the counts are the first page's).
    pub async fn verify(
        &self,
        id: u64,
        max_listed: u32,
    ) -> Result<pb::VerifyMigrationResponse, CtlError> {
        let page = |segments_from| {
            retry_read(move || async move {
                let mut c = self.client.clone();
                let r = c.verify_migration(pb::VerifyMigrationRequest {
                    migration_id: id,
                    max_listed,
                    segments_from,
                });
                Ok(r.await?.into_inner())
            })
        };
        let mut all = page(0).await?;
        while all.segments_more {
            let from = all.segments.last().map_or(0, |s| s.segment_id + 1);
            let next = page(from).await?;
            all.segments.extend(next.segments);
            all.segments_more = next.segments_more;
        }
        Ok(all)
    }

    /// Polls a migration until it has ended (done or failed), calling `show` on each sample.
    /// Fails if verified bytes do not move for `stall` (the last error is in the message).
    pub async fn watch(
        &self,
        id: u64,
        stall: Duration,
        mut show: impl FnMut(&pb::MigrationProgress, &Rate),
    ) -> Result<pb::MigrationProgress, CtlError> {
        let mut rate = Rate::default();
        let mut last_change = Instant::now();
        let mut last_bytes = u64::MAX;
        loop {
            let p = self.status(id).await?;
            rate.sample(p.bytes_verified);
            show(&p, &rate);
            if matches!(p.phase(), pb::Phase::Done | pb::Phase::Failed) {
                return Ok(p);
            }
            // Progress is verified bytes and failed attempts: a segment that is still being
            // retried toward its limit is not a stall.
            let moved = p.bytes_verified.saturating_add(p.failed_attempts);
            if moved != last_bytes || p.segments_verified == 0 && !p.scan_complete {
                last_bytes = moved;
                last_change = Instant::now();
            } else if last_change.elapsed() > stall {
                return Err(CtlError::Status(format!(
                    "migration {id} made no progress for {}s{}; last error: {}",
                    stall.as_secs(),
                    if p.blocked.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", p.blocked)
                    },
                    if p.last_error.is_empty() {
                        "none"
                    } else {
                        &p.last_error
                    }
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The name a migration gets when none is given: its source and target, e.g.
/// `src-01-data-to-dst-01-restored` for `src-01:/data` → `dst-01:restored`. The same request
/// gets the same name, so running a create twice is refused instead of copying twice.
pub fn default_name(spec: &pb::MigrationSpec) -> String {
    let mut out = String::new();
    let raw = format!(
        "{}-{}-to-{}-{}",
        spec.source_agent, spec.source_path, spec.target_agent, spec.target_path
    );
    for c in raw.chars() {
        let c = if c.is_ascii_alphanumeric() || matches!(c, '.' | '_') {
            c
        } else {
            '-'
        };
        if !(c == '-' && (out.is_empty() || out.ends_with('-'))) {
            out.push(c);
        }
    }
    let mut name = out.trim_end_matches('-').to_string();
    if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        name.insert(0, 'm');
    }
    const MAX: usize = 128;
    if name.len() > MAX {
        // Keep it unique per request: a prefix and a digest of the whole.
        let digest = blake3::hash(raw.as_bytes()).to_hex();
        name.truncate(MAX - 17);
        name = format!("{}-{}", name.trim_end_matches('-'), &digest[..16]);
    }
    name
}

/// A key no other request has (128 random bits).
pub fn new_idempotency_key() -> String {
    ferry_common::ids::random_id()
}

/// `addr` is `host:port` (a port is required: without one the address would be dialled on
/// 443, where no coordinator listens).
pub fn check_address(addr: &str) -> Result<(), CtlError> {
    let bad = |why: &str| Err(CtlError::BadAddress(addr.to_string(), why.to_string()));
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("no port: give HOST:PORT (coordinators listen on 7400 in the example configs)");
    };
    if host.is_empty() || host.ends_with(':') && !host.starts_with('[') {
        return bad("expected HOST:PORT, or [IPv6]:PORT");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => bad("the port is not a number from 1 to 65535"),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Throughput over the samples seen so far (bytes verified per second since the first sample
/// that showed progress).
#[derive(Debug, Default)]
pub struct Rate {
    first: Option<(Instant, u64)>,
    last: Option<(Instant, u64)>,
}

impl Rate {
    fn sample(&mut self, bytes: u64) {
        self.sample_at(Instant::now(), bytes);
    }

    fn sample_at(&mut self, now: Instant, bytes: u64) {
        if self.first.is_none() {
            self.first = Some((now, bytes));
        }
        self.last = Some((now, bytes));
    }

    /// Bytes per second, if measurable.
    pub fn bytes_per_sec(&self) -> Option<f64> {
        let ((t0, b0), (t1, b1)) = (self.first?, self.last?);
        let dt = t1.duration_since(t0).as_secs_f64();
        (dt > 0.2 && b1 > b0).then(|| (b1 - b0) as f64 / dt)
    }
}

/// `12.3 MiB`.
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// One progress line.
pub fn progress_line(p: &pb::MigrationProgress, rate: &Rate) -> String {
    let pct = if p.bytes_total > 0 {
        100.0 * p.bytes_verified as f64 / p.bytes_total as f64
    } else if p.phase() == pb::Phase::Done {
        100.0
    } else {
        0.0
    };
    let speed = rate.bytes_per_sec();
    let eta = match speed {
        Some(s) if p.scan_complete && p.bytes_total > p.bytes_verified && s > 0.0 => {
            let left = (p.bytes_total - p.bytes_verified) as f64 / s;
            format!("ETA {}", crate::plan::duration_text(left.min(1e9) as u64))
        }
        _ if p.phase() == pb::Phase::Done => "done".to_string(),
        _ if !p.scan_complete => "scanning".to_string(),
        _ => "ETA -".to_string(),
    };
    // While the scan runs the totals still grow: say so.
    let growing = if p.scan_complete { "" } else { "+" };
    format!(
        "migration {} ({}) {:<8} {:>10} / {:<11} ({pct:5.1}%)  files {}/{}{growing}  segments {}/{}{growing}  {}  {eta}",
        p.migration_id,
        p.name,
        phase_name(p.phase()),
        human_bytes(p.bytes_verified),
        format!("{}{growing}", human_bytes(p.bytes_total)),
        p.files_verified,
        p.files_total,
        p.segments_verified,
        p.segments_total,
        speed.map_or("- MB/s".to_string(), |s| format!("{:.1} MB/s", s / 1e6)),
    )
}

/// The lines that show a migration's rounds (none while it has only its bulk copy): what each
/// sent and deleted, how long it took, and how it ended.
pub fn round_lines(p: &pb::MigrationProgress, now_ms: u64) -> Vec<String> {
    if p.rounds.len() < 2 {
        return Vec::new();
    }
    let mut out = vec![format!(
        "{:>6}  {:<8} {:>9} {:>10} {:>8} {:>9}  {}",
        "ROUND", "OUTCOME", "FILES", "BYTES", "DELETED", "TOOK", "NOTE"
    )];
    for r in &p.rounds {
        let end = if r.finished_ms == 0 {
            now_ms
        } else {
            r.finished_ms
        };
        let took = end.saturating_sub(r.started_ms) as f64 / 1000.0;
        let mut note = Vec::new();
        if r.segments_failed > 0 {
            note.push(format!("{} segment(s) failed", r.segments_failed));
        }
        if r.segments_stale > 0 {
            note.push(format!(
                "{} segment(s) changed during the round, sent again in the next",
                r.segments_stale
            ));
        }
        if r.finished_ms == 0 {
            note.push("running".into());
        }
        out.push(format!(
            "{:>6}  {:<8} {:>9} {:>10} {:>8} {:>8.1}s  {}",
            r.number,
            phase_name(r.outcome()),
            r.files,
            human_bytes(r.bytes),
            r.deleted,
            took,
            note.join("; ")
        ));
    }
    if let Some(est) = freeze_estimate(p) {
        out.push(est);
    }
    out
}

/// What the last finished sync round says about a cutover's freeze: its final round would take
/// about as long, if the source changes at the same pace; the full verification then reads
/// what changed since the last one on top of it. Nothing once cut over.
fn freeze_estimate(p: &pb::MigrationProgress) -> Option<String> {
    if p.cutover
        .as_ref()
        .is_some_and(|c| c.phase() == pb::CutoverPhase::Done)
    {
        return None;
    }
    let last = p
        .rounds
        .iter()
        .rev()
        .find(|r| r.number > 0 && r.finished_ms > 0)?;
    let took = last.finished_ms.saturating_sub(last.started_ms) as f64 / 1000.0;
    Some(format!(
        "lag: round {} sent {} files, {} in {took:.1}s — a cutover now would freeze writes for \
         about that long, plus reading what changed since the last full verification",
        last.number,
        last.files,
        human_bytes(last.bytes),
    ))
}

/// The lines of a cutover: its phase, the freeze window, each step an agent did, and why it
/// rolled back.
pub fn cutover_lines(c: &pb::CutoverInfo) -> Vec<String> {
    let mut out = vec![format!(
        "cutover attempt {}: {}{}",
        c.attempt,
        ferry_proto::json::cutover_phase_name(c.phase()),
        if c.frozen_ms > 0 {
            format!(
                ", writes frozen {:.1}s{}",
                c.freeze_window_ms as f64 / 1000.0,
                match c.phase() {
                    pb::CutoverPhase::Done => " (end of pre_freeze to end of switch)",
                    pb::CutoverPhase::Aborted => " (until the rollback)",
                    _ => " so far",
                }
            )
        } else {
            String::new()
        }
    )];
    if !c.trigger.is_empty() {
        out.push(format!("  started by itself: {}", c.trigger));
    }
    if c.final_round > 0 {
        out.push(format!("  final sync: round {}", c.final_round));
    }
    out.extend(c.runs.iter().map(step_line));
    if !c.error.is_empty() {
        out.push(format!("  rolled back: {}", c.error));
    }
    out
}

/// One step as an agent did it: a hook's command and exit, or a tree it read.
pub fn step_line(r: &pb::StepRunInfo) -> String {
    let what = match &r.tree {
        Some(t) if t.error.is_empty() => format!(
            "{} files, {} in bytes, {} directories, {} symlinks, digest {}; read {} files, {} \
             (the rest unchanged since an earlier verification read them)",
            t.files,
            human_bytes(t.bytes),
            t.dirs,
            t.symlinks,
            &t.digest[..16.min(t.digest.len())],
            t.files_read,
            human_bytes(t.bytes_read)
        ),
        Some(t) => format!("FAILED: {}", t.error),
        None if r.command.is_empty() => r.output.trim().to_string(),
        None => format!(
            "`{}` exited {}{}",
            r.command,
            r.exit_code,
            match r.output.trim().lines().last() {
                Some(l) => format!(": {l}"),
                None => String::new(),
            }
        ),
    };
    format!(
        "  {:<14} {:<10} {:>7.1}s  {what}",
        r.step,
        r.agent,
        r.duration_ms as f64 / 1000.0
    )
}

/// The lines of a full verification: what it verifies, each tree read, the verdict.
pub fn verification_lines(v: &pb::FullVerificationInfo) -> Vec<String> {
    let verdict = if v.ended_ms == 0 {
        "running".to_string()
    } else if v.equal {
        format!(
            "EQUAL: the target holds the source as round {}'s scan found it",
            v.round
        )
    } else {
        format!("NOT VERIFIED: {}", v.error)
    };
    let mut out = vec![format!(
        "full verification {} of round {}: {verdict}",
        v.number, v.round
    )];
    out.extend(v.source.iter().chain(v.target.iter()).map(step_line));
    out
}

/// The lines that tell an operator about failed segments: how many, and each listed one with
/// its files and its last error (which names the file and the cause).
pub fn failed_lines(p: &pb::MigrationProgress) -> Vec<String> {
    if p.segments_failed == 0 {
        return Vec::new();
    }
    let mut out = vec![format!(
        "FAILED      {} segment(s) ({}) given up on after {} attempts each; each error names \
         its file:",
        p.segments_failed,
        human_bytes(p.bytes_failed),
        p.spec.as_ref().map_or(0, |s| s.max_attempts)
    )];
    for s in &p.failed {
        out.push(format!("  segment {}: {}", s.segment_id, s.last_error));
    }
    if (p.failed.len() as u64) < p.segments_failed {
        out.push(format!(
            "  ... and {} more (ferryctl migration verify lists them)",
            p.segments_failed - p.failed.len() as u64
        ));
    }
    out
}

/// Prints `v` as pretty JSON.
pub fn print_json<T: serde::Serialize>(v: &T) {
    if yaml_output() {
        let value = serde_json::to_value(v).expect("protobuf types serialise");
        crate::cli::emit(format_args!("{}", crate::yaml::document(&value)));
        return;
    }
    crate::cli::emit(format_args!(
        "{}\n",
        serde_json::to_string_pretty(v).expect("protobuf types serialise")
    ));
}

/// Whether audit `records` (the whole log, from its first record) chain: each record's hash is
/// its fields' and names the record before. Returns the first broken record's number.
pub fn check_audit_chain(records: &[pb::AuditRecordInfo]) -> Result<(), u64> {
    use ferry_coordinator::state::{record_hash, AuditNote, AUDIT_KEPT};
    // The coordinator keeps the newest AUDIT_KEPT records: a log that starts later than the
    // first record is whole only if it holds that many (the first one's `prev` names a record
    // that was dropped, and cannot be checked).
    let first = records.first().map_or(1, |r| r.seq);
    if first > 1 && records.len() < AUDIT_KEPT {
        return Err(first - 1);
    }
    let mut prev: [u8; 32] = match records.first() {
        Some(r) if first > 1 => r.prev.as_slice().try_into().map_err(|_| first)?,
        _ => [0u8; 32],
    };
    for (i, r) in records.iter().enumerate() {
        let note = AuditNote {
            at_ms: r.at_ms,
            who: r.who.clone(),
            role: r.role.clone(),
            from: r.from.clone(),
            call: r.call.clone(),
            what: r.what.clone(),
        };
        let hash = record_hash(r.seq, &note, &r.decision, &prev);
        if r.seq != first + i as u64 || r.prev.as_slice() != prev || r.hash.as_slice() != hash {
            return Err(r.seq);
        }
        prev = hash;
    }
    Ok(())
}

pub use ferry_common::text::utc;

#[cfg(test)]
mod tests {
    /// The coordinator keeps the newest `AUDIT_KEPT` records: such a log chains from its first
    /// record; a log that starts later than record 1 yet holds fewer was cut elsewhere.
    #[test]
    fn an_audit_log_trimmed_to_its_newest_records_chains_and_one_cut_short_does_not() {
        use ferry_coordinator::state::{record_hash, AuditNote, AUDIT_KEPT};
        let mut prev = [0u8; 32];
        let log: Vec<super::pb::AuditRecordInfo> = (1..=AUDIT_KEPT as u64 + 3)
            .map(|seq| {
                let note = AuditNote {
                    at_ms: seq,
                    who: "otto".into(),
                    role: "admin".into(),
                    from: "10.0.0.1:5000".into(),
                    call: "SetThrottle".into(),
                    what: String::new(),
                };
                let hash = record_hash(seq, &note, "ok", &prev);
                let r = super::pb::AuditRecordInfo {
                    seq,
                    at_ms: seq,
                    who: note.who,
                    role: note.role,
                    from: note.from,
                    call: note.call,
                    what: note.what,
                    decision: "ok".into(),
                    prev: prev.to_vec(),
                    hash: hash.to_vec(),
                };
                prev = hash;
                r
            })
            .collect();
        assert_eq!(super::check_audit_chain(&log), Ok(()));
        let trimmed = &log[3..];
        assert_eq!(super::check_audit_chain(trimmed), Ok(()));
        assert_eq!(super::check_audit_chain(&log[4..]), Err(4), "cut short");
        let mut changed = trimmed.to_vec();
        changed[10].decision = "refused".into();
        assert_eq!(super::check_audit_chain(&changed), Err(14));
    }

    #[test]
    fn times_are_shown_in_utc_calendar_form() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_796_414_612_393), "2026-12-04 20:03:32");
    }

    #[test]
    fn a_scanning_migration_marks_its_totals_growing_and_a_known_rate_gives_an_eta() {
        use super::pb;
        let mut p = pb::MigrationProgress {
            migration_id: 1,
            name: "m".into(),
            bytes_total: 1000,
            files_total: 4,
            segments_total: 2,
            ..Default::default()
        };
        p.set_phase(pb::Phase::Copying);
        let line = super::progress_line(&p, &Default::default());
        assert!(
            line.contains("files 0/4+") && line.contains("scanning"),
            "{line}"
        );
        p.scan_complete = true;
        p.bytes_verified = 400;
        let mut rate = super::Rate::default();
        let t0 = std::time::Instant::now();
        rate.sample_at(t0, 0);
        rate.sample_at(t0 + std::time::Duration::from_secs(2), 400);
        let line = super::progress_line(&p, &rate);
        assert!(!line.contains('+') && line.contains("ETA 3s"), "{line}");
    }
}
