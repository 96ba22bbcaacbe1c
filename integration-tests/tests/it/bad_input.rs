//! Bad input gets a clear error and writes nothing it should not: missing source, unusable target
//! root, unreachable coordinator, hostile peers (paths with `..`, absolute paths, the wrong agent,
//! another CA).

use ferry_proto::admin::Phase;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_agent::control::{Control, Coordinator};
use ferry_agent::frame;
use ferry_agent::manifest::{ScanSummary, SegmentSummary};
use ferry_common::names::agent_dns;
use ferry_common::pki::Identity;
use ferry_common::tls::TlsMaterial;
use ferry_proto::admin as pb;
use ferry_proto::control::Lease;
use ferry_proto::data as dpb;

use crate::harness::{ferryctl_bin, migration_spec, DeadAddr, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_source_path_is_reported_not_ignored() {
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let target = env.agent("target", &coord, Some(env.path("dst"))).await;
    let source = env.agent("source", &coord, None).await;
    let ctl = env.ctl(&coord).await;
    let id = ctl
        .create(pb::MigrationSpec {
            source_path: "/nonexistent/ferry-test".into(),
            segment_size: 0,
            ..migration_spec(Path::new(""), "")
        })
        .await
        .unwrap();
    let p = ctl
        .watch(id, Duration::from_secs(30), |_, _| {})
        .await
        .unwrap();
    assert_eq!(p.scan_issues_total, 1);
    assert_eq!(p.scan_issues[0].path, "/nonexistent/ferry-test");
    assert!(
        p.scan_issues[0].reason.contains("does not exist"),
        "{:?}",
        p.scan_issues
    );
    // It fails, with a clear error, and neither status nor verify calls it verified (they
    // printed VERIFIED and exited 0 for its 0 of 0 segments).
    assert_eq!(p.phase(), Phase::Failed);
    assert!(
        p.last_error.contains("/nonexistent/ferry-test") && p.last_error.contains("does not exist"),
        "{}",
        p.last_error
    );
    assert_cli_says_not_verified(&env, &coord, id);
    source.shutdown().await;
    target.shutdown().await;
    node.shutdown().await;
}

/// `ferryctl migration verify` exits non-zero without claiming VERIFIED, and `status` shows
/// the migration failed.
fn assert_cli_says_not_verified(env: &TestEnv, coord: &str, id: u64) {
    env.issue(ferry_common::pki::Identity::Admin("ops".into()));
    let id = id.to_string();
    let out = crate::processes::ferryctl(env, coord, &["migration", "verify", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "verify exited 0:\n{text}");
    assert!(
        text.contains("NOT VERIFIED"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("not copied"), "{text}");
    let out = crate::processes::ferryctl(env, coord, &["migration", "status", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("failed"), "{text}");
}

/// A tree whose only entry cannot be copied (a FIFO) is not a verified migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tree_whose_only_entry_was_skipped_is_not_verified() {
    let env = TestEnv::new();
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let fifo = src.join("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo failed");
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let target = env.agent("target", &coord, Some(env.path("dst"))).await;
    let source = env.agent("source", &coord, None).await;
    let ctl = env.ctl(&coord).await;
    let id = ctl
        .create(crate::harness::migration_spec(&src, ""))
        .await
        .unwrap();
    let p = ctl
        .watch(id, Duration::from_secs(30), |_, _| {})
        .await
        .unwrap();
    assert_eq!(p.phase(), Phase::Failed);
    assert_eq!(p.scan_issues_total, 1);
    assert!(
        p.scan_issues[0].reason.contains("named pipe"),
        "{:?}",
        p.scan_issues
    );
    let v = ctl.verify(id, 0).await.unwrap();
    assert!(!v.all_verified);
    assert_eq!(v.scan_issues_total, 1);
    assert_cli_says_not_verified(&env, &coord, id);

    // Excluded by the operator, the same FIFO is no failure: counted, and the copy verifies.
    let out = crate::processes::ferryctl(
        &env,
        &coord,
        &[
            "migration",
            "create",
            "--source",
            &format!("source:{}", src.display()),
            "--target",
            "target:excluding",
            "--exclude",
            "pip[e]",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = id + 1;
    let p = ctl
        .watch(id, Duration::from_secs(30), |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        (p.phase(), p.excluded, p.scan_issues_total),
        (Phase::Done, 1, 0)
    );
    let out = crate::processes::ferryctl(&env, &coord, &["migration", "verify", &id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A pattern that is not a glob is refused when the migration is created.
    let mut spec = crate::harness::migration_spec(&src, "bad");
    spec.excludes = vec!["a[".into()];
    let err = ctl.create(spec).await.unwrap_err().to_string();
    assert!(err.contains("exclude pattern"), "{err}");
    source.shutdown().await;
    target.shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_target_root_fails_agent_start_clearly() {
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let file = env.path("a-file");
    std::fs::write(&file, b"x").unwrap();
    let cfg = env.agent_config("target", &node.addr.to_string(), Some(file.join("root")));
    let err = ferry_agent::run::start(cfg)
        .await
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("not usable") && err.contains("a-file"),
        "{err}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_coordinator_is_a_clear_error() {
    let env = TestEnv::new();
    let dead = DeadAddr::new().unwrap();
    let addr = dead.addr.to_string();
    // ferryctl, as an operator would run it.
    env.issue(Identity::Admin("admin".into()));
    let out = Command::new(ferryctl_bin())
        .args(["--coordinator", &addr, "--pki-dir"])
        .arg(env.pki())
        .args(["agents", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot reach the coordinator at {addr}")),
        "{err}"
    );
    // An agent gives up after its registration timeout, naming the coordinator.
    let mut cfg = env.agent_config("source", &addr, None);
    cfg.register_timeout_secs = 1;
    let err = ferry_agent::run::start(cfg)
        .await
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("cannot register with the coordinator") && err.contains(&addr),
        "{err}"
    );
}

/// A cluster with a real target agent, where the test itself plays the source agent so it can
/// send whatever it likes with a current lease.
struct Hostile {
    env: TestEnv,
    node: ferry_coordinator::node::RunningNode,
    target: ferry_agent::run::RunningAgent,
    lease: Lease,
    /// The session of the test's source process (calls of any other are refused).
    session: u64,
    /// One client endpoint for all sends: a fresh endpoint per send could reuse the port of a
    /// connection the target just closed, and be answered with a stateless reset.
    ep: quinn::Endpoint,
}

impl Hostile {
    async fn new() -> Self {
        let env = TestEnv::new();
        let node = env.coordinator().await;
        let coord = node.addr.to_string();
        let target = env
            .agent("target", &coord, Some(env.path("outer/root")))
            .await;
        let tls = TlsMaterial::load(&env.issue(Identity::Agent("source".into()))).unwrap();
        let me = Control::new("source", &coord, &tls).unwrap();
        me.register("", false, &Default::default(), "")
            .await
            .unwrap();
        let id = env
            .ctl(&coord)
            .await
            .create(pb::MigrationSpec {
                source_path: "/src".into(),
                segment_size: 0,
                ..migration_spec(Path::new(""), "")
            })
            .await
            .unwrap();
        let seg = SegmentSummary {
            id: 0,
            bytes: 3,
            files: 1,
            fingerprint: [0; 32],
            piece: (0, 0),
        };
        me.register_segments(id, &[seg]).await.unwrap();
        // The completion leases the segment in the same entry.
        let lease = me
            .complete_scan(
                id,
                &ScanSummary {
                    segments_total: 1,
                    ..Default::default()
                },
                &[],
                1,
            )
            .await
            .unwrap()
            .pop()
            .expect("a lease with the scan's completion");
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        Hostile {
            env,
            node,
            target,
            lease,
            session: me.session(),
            ep,
        }
    }

    /// Sends one segment holding a single 3-byte file at `path`, as agent `as_agent` with a
    /// certificate from `tls`; returns the ack or the transport error.
    async fn send(&self, tls: &TlsMaterial, path: &str) -> Result<dpb::SegmentAck, String> {
        let conn = self
            .ep
            .connect_with(
                tls.quic_client().unwrap(),
                self.target.data_addr.unwrap(),
                &agent_dns("target"),
            )
            .unwrap()
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let entry = dpb::Entry {
            kind: dpb::EntryKind::File as i32,
            path: path.as_bytes().to_vec(),
            mode: 0o644,
            file_size: 3,
            len: 3,
            chunk_count: 1,
            ..Default::default()
        };
        let header = dpb::SegmentHeader {
            migration_id: self.lease.migration_id,
            segment_id: self.lease.segment_id,
            epoch: self.lease.epoch,
            entries: vec![entry],
        };
        frame::write(&mut send, &header)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.write_all(b"bad").await;
        let trailer = dpb::SegmentTrailer {
            blake3: blake3::hash(b"bad").as_bytes().to_vec(),
        };
        let _ = frame::write(&mut send, &trailer).await;
        let _ = send.finish();
        frame::read(&mut recv, 1 << 16)
            .await
            .map_err(|e| format!("{e}: {e:?}"))
    }

    fn outer(&self) -> std::path::PathBuf {
        self.env.path("outer")
    }

    async fn stop(self) {
        self.target.shutdown().await;
        self.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_paths_with_dotdot_or_absolute_are_refused_and_nothing_escapes() {
    let h = Hostile::new().await;
    let tls = TlsMaterial::load(&h.env.issue(Identity::Agent("source".into()))).unwrap();
    for (path, expect) in [
        ("../escape.txt", "'..'"),
        ("/tmp/ferry-abs-escape.txt", "absolute"),
        ("a/../../x", "'..'"),
    ] {
        let ack = h.send(&tls, path).await.expect("the target answers");
        assert!(!ack.ok, "{path} accepted");
        assert!(ack.error.contains(expect), "{path}: {}", ack.error);
    }
    let outer: Vec<_> = std::fs::read_dir(h.outer())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        outer,
        vec![std::ffi::OsString::from("root")],
        "something was written outside the root"
    );
    assert!(!std::path::Path::new("/tmp/ferry-abs-escape.txt").exists());
    // A well-formed path from the right peer with the current lease is accepted.
    let ack = h.send(&tls, "fine.txt").await.unwrap();
    assert!(ack.ok, "{}", ack.error);
    assert_eq!(
        std::fs::read(h.outer().join("root/fine.txt")).unwrap(),
        b"bad"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_assigned_source_may_send() {
    let h = Hostile::new().await;
    // Same CA, valid certificate, current lease epoch — but not the agent the coordinator named.
    let mallory = TlsMaterial::load(&h.env.issue(Identity::Agent("mallory".into()))).unwrap();
    match h.send(&mallory, "x.txt").await {
        Ok(ack) => {
            assert!(!ack.ok);
            assert!(
                ack.error.contains("not source, the assigned source"),
                "{}",
                ack.error
            );
        }
        Err(e) => assert!(e.contains("assigned source") || e.contains("closed"), "{e}"),
    }
    assert!(!h.outer().join("root/x.txt").exists());
    // A stale epoch from the right peer is refused too.
    let tls = TlsMaterial::load(&h.env.issue(Identity::Agent("source".into()))).unwrap();
    let mut stale = Hostile {
        lease: h.lease.clone(),
        ..h
    };
    stale.lease.epoch -= 1;
    let ack = stale.send(&tls, "y.txt").await.unwrap();
    assert!(
        !ack.ok && ack.error.contains("not current"),
        "{}",
        ack.error
    );
    stale.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_from_another_ca_are_rejected() {
    let h = Hostile::new().await;
    let other = TestEnv::new();
    // Data plane: the TLS handshake fails.
    let foreign = TlsMaterial::load(&other.issue(Identity::Agent("source".into()))).unwrap();
    let err = h
        .send(&foreign, "z.txt")
        .await
        .expect_err("foreign CA accepted on QUIC");
    assert!(!err.is_empty());
    // Admin API: ferryctl with a foreign admin certificate cannot call.
    let coord = h.node.addr.to_string();
    let rejected = match other.ctl_try(&coord).await {
        None => true,
        Some(ctl) => ctl.agents().await.is_err(),
    };
    assert!(rejected, "foreign CA accepted on gRPC");
    // An agent certificate of the right CA cannot use the admin API either.
    let agent_as_admin = TlsMaterial::load(&h.env.issue(Identity::Agent("target".into()))).unwrap();
    let ctl = ferryctl::ctl::Ctl::connect(&coord, &agent_as_admin)
        .await
        .unwrap();
    let err = ctl.agents().await.unwrap_err().to_string();
    assert!(err.contains("admin certificate"), "{err}");
    assert!(!h.outer().join("root/z.txt").exists());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_of_reports_cannot_speak_for_another_agent() {
    use ferry_proto::control::{
        agent_control_client::AgentControlClient, ReportOutcome, ReportSegmentRequest,
        ReportSegmentsRequest, Role,
    };
    let h = Hostile::new().await;
    let ch = h
        .env
        .channel(&h.node.addr.to_string(), Identity::Agent("source".into()))
        .await
        .unwrap();
    let mut c = AgentControlClient::new(ch);
    let one = |agent: &str, role: Role| ReportSegmentRequest {
        agent: agent.into(),
        role: role as i32,
        migration_id: h.lease.migration_id,
        segment_id: h.lease.segment_id,
        epoch: h.lease.epoch,
        ok: true,
        blake3: vec![7; 32],
        error: String::new(),
        retry_later: false,
        stale: false,
        source_blake3: Vec::new(),
        permanent: false,
    };
    let r = c
        .report_segments(ReportSegmentsRequest {
            agent: "source".into(),
            session: h.session,
            reports: vec![
                // The target's half of the verification, forged by the source.
                one("target", Role::Target),
                one("", Role::Source),
                ReportSegmentRequest {
                    blake3: vec![1; 3],
                    ..one("source", Role::Source)
                },
                // Only a target vouches for the hash the source sent with the bytes.
                ReportSegmentRequest {
                    source_blake3: vec![7; 32],
                    ..one("source", Role::Source)
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let outcomes: Vec<ReportOutcome> = r.results.iter().map(|x| x.outcome()).collect();
    assert_eq!(
        outcomes,
        [
            ReportOutcome::Refused,
            ReportOutcome::Waiting,
            ReportOutcome::Refused,
            ReportOutcome::Refused
        ],
        "{r:?}"
    );
    assert!(r.results[0]
        .reason
        .contains("inside a call of agent source"));
    // The forged report changed nothing: the segment still waits for its target.
    let p = h
        .env
        .ctl(&h.node.addr.to_string())
        .await
        .status(h.lease.migration_id)
        .await
        .unwrap();
    assert_eq!(p.segments_verified, 0);
    // A call in another agent's name is refused by the certificate check.
    let err = c
        .report_segments(ReportSegmentsRequest {
            agent: "target".into(),
            session: h.session,
            reports: vec![one("target", Role::Target)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    h.stop().await;
}

/// A gRPC codec that puts the bytes it is given on the wire as they are (a malformed body).
#[derive(Clone, Copy)]
struct Raw;
struct RawBytes;

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut v = vec![0; bytes::Buf::remaining(src)];
        bytes::Buf::copy_to_slice(src, &mut v);
        Ok(Some(v))
    }
}

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;
    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }
    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_and_admin_calls_are_refused_by_certificate_before_their_body_is_read() {
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let addr = node.addr.to_string();
    let ch = env
        .channel(&addr, Identity::Agent("source".into()))
        .await
        .unwrap();
    // Not a protobuf message at all: a server that read the body first would answer that it
    // cannot decode it; the certificate check answers first.
    let garbage = vec![0xff; 64];
    for path in [
        "/ferry.raft.v1.RaftPeer/AppendEntries",
        "/ferry.raft.v1.RaftPeer/InstallSnapshot",
        "/ferry.admin.v1.Admin/ListAgents",
    ] {
        let mut grpc = tonic::client::Grpc::new(ch.clone());
        grpc.ready().await.unwrap();
        let err = grpc
            .unary(
                tonic::Request::new(garbage.clone()),
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                Raw,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{path}: {err}");
    }
    // A coordinator's certificate gets as far as decoding (and is told the body is not one).
    let ch = env.channel(&addr, Identity::Coordinator(2)).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let err = grpc
        .unary(
            tonic::Request::new(garbage),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/ferry.raft.v1.RaftPeer/AppendEntries",
            ),
            Raw,
        )
        .await
        .unwrap_err();
    assert_ne!(err.code(), tonic::Code::PermissionDenied, "{err}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_speaks_tls13_only_and_drops_a_client_that_never_completes_its_handshake() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let tls = TlsMaterial::load(&env.issue(Identity::Admin("test".into()))).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&tls.ca_pem).unwrap())
        .unwrap();
    let cert = CertificateDer::from_pem_slice(&tls.cert_pem).unwrap();
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).unwrap();
    let connect = |version: &'static rustls::SupportedProtocolVersion| {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(vec![cert.clone()], key.clone_key())
        .unwrap();
        let addr = node.addr;
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from(ferry_common::names::COORDINATOR_DNS).unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
        }
    };
    let refused = connect(&rustls::version::TLS12).await;
    assert!(refused.is_err(), "a TLS 1.2 handshake completed");
    let ok = connect(&rustls::version::TLS13).await.unwrap();
    assert_eq!(
        ok.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    drop(ok);

    // A client that connects and says nothing holds nothing up, and is dropped.
    let mut silent = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let ctl = env.ctl(&node.addr.to_string()).await;
    ctl.agents().await.unwrap();
    let limit = ferry_coordinator::node::HANDSHAKE_TIMEOUT * 3;
    let read = tokio::time::timeout(limit, silent.read(&mut [0u8; 16]))
        .await
        .expect("the coordinator never dropped a client that did not complete its handshake");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_operator_role_may_do_what_it_allows_and_nothing_more() {
    use ferry_common::names::Role;
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let as_user = |name: &str, role: Role| {
        let tls = TlsMaterial::load(&env.issue(Identity::User(name.into(), role))).unwrap();
        let coord = coord.clone();
        async move { ferryctl::ctl::Ctl::connect(&coord, &tls).await.unwrap() }
    };
    let viewer = as_user("vera", Role::Viewer).await;
    let operator = as_user("otto", Role::Operator).await;
    let admin = env.ctl(&coord).await;
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), b"a").unwrap();
    let _source = env.agent("source", &coord, None).await;
    let _target = env.agent("target", &coord, Some(env.path("dst"))).await;

    // A viewer reads, and changes nothing.
    viewer.cluster_status().await.unwrap();
    viewer.agents().await.unwrap();
    let denied = |e: ferryctl::ctl::CtlError, role: &str| {
        let e = e.to_string();
        assert!(e.contains(&format!("needs the {role} role")), "{e}");
    };
    denied(
        viewer.create(migration_spec(&src, "")).await.unwrap_err(),
        "operator",
    );
    assert!(
        viewer.migrations().await.unwrap().is_empty(),
        "nothing created"
    );
    denied(viewer.cutover(1, false).await.unwrap_err(), "operator");
    denied(viewer.delete(1, true).await.unwrap_err(), "operator");
    denied(
        viewer.add_node(2, "127.0.0.1:1").await.unwrap_err(),
        "admin",
    );

    // An operator changes migrations, not the cluster.
    let id = operator.create(migration_spec(&src, "")).await.unwrap();
    assert_eq!(viewer.migrations().await.unwrap().len(), 1);
    denied(
        operator.add_node(2, "127.0.0.1:1").await.unwrap_err(),
        "admin",
    );
    assert_eq!(
        admin.cluster_status().await.unwrap().members.len(),
        1,
        "membership unchanged"
    );
    operator.delete(id, true).await.unwrap();

    // Every change and every refused attempt is in the audit log, in order, chained; only an
    // admin reads it.
    denied(viewer.audit().await.unwrap_err(), "admin");
    let log = admin.audit().await.unwrap();
    assert_eq!(ferryctl::ctl::check_audit_chain(&log), Ok(()));
    let seen: Vec<(&str, &str, &str)> = log
        .iter()
        .map(|r| (r.who.as_str(), r.call.as_str(), r.decision.as_str()))
        .collect();
    let denied_for = |who: &str, call: &str| {
        seen.iter()
            .any(|(w, c, d)| *w == who && *c == call && d.starts_with("denied"))
    };
    assert!(denied_for("vera", "CreateMigration"), "{seen:?}");
    assert!(denied_for("vera", "Cutover"), "{seen:?}");
    assert!(denied_for("vera", "AddNode"), "{seen:?}");
    assert!(denied_for("otto", "AddNode"), "{seen:?}");
    assert!(
        seen.contains(&("otto", "CreateMigration", "ok")),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("otto", "DeleteMigration", "ok")),
        "{seen:?}"
    );
    let created = log
        .iter()
        .find(|r| r.call == "CreateMigration" && r.decision == "ok");
    let created = created.unwrap();
    assert_eq!(created.role, "operator");
    assert!(created.from.starts_with("127.0.0.1:"), "{}", created.from);
    assert!(created.what.contains("CreateMigration"), "{}", created.what);

    // The log keeps its newest records only: a certificate calling what it may not, again and
    // again, gets its refusals recorded at most 10 a minute, so it cannot push the others out.
    let denials = |log: &[ferry_proto::admin::AuditRecordInfo]| {
        log.iter()
            .filter(|r| r.who == "vera" && r.decision.starts_with("denied"))
            .count()
    };
    let before = denials(&admin.audit().await.unwrap());
    for _ in 0..12 {
        denied(viewer.delete(1, true).await.unwrap_err(), "operator");
    }
    let log = admin.audit().await.unwrap();
    assert_eq!(
        denials(&log),
        ferry_coordinator::grpc::DENIALS_RECORDED_PER_WINDOW as usize,
        "{before} recorded before"
    );
    assert_eq!(ferryctl::ctl::check_audit_chain(&log), Ok(()));
    node.shutdown().await;
}

/// An agent that is not root, scanning a directory it may list but not search (mode 0444):
/// the directory is there, and each name in it is reported as a path that cannot be copied —
/// not the directory dropped whole as unreadable. Runs `ferry-agent assess` (the migration's
/// own walk) as uid 65534.
#[test]
fn a_directory_that_can_be_listed_but_not_searched_reports_each_name() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    if !std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        crate::harness::skip("running the walk as another user needs root");
        return;
    }
    // In /tmp, with the agent binary beside the tree: uid 65534 must reach both, and the
    // checkout or TMPDIR may sit below a directory only root may enter.
    let d = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = d.path().join("ferry-agent");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_it-agent"), &agent).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_it-agent"), &agent).unwrap();
    }
    let tree = d.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::set_permissions(&tree, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = &tree;
    let locked = d.join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::write(locked.join("a"), b"x").unwrap();
    std::fs::write(locked.join("b"), b"y").unwrap();
    std::fs::write(d.join("open"), b"z").unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o444)).unwrap();
    let out = Command::new(&agent)
        .args(["assess", "--json"])
        .arg(d)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "assess failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a: ferry_agent::assess::Assessment = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((a.dirs, a.files), (1, 1), "{a:?}");
    let mut paths: Vec<_> = a.issue_examples.iter().map(|(p, _)| p.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["locked/a", "locked/b"], "{a:?}");
    assert!(
        a.issue_examples
            .iter()
            .all(|(_, why)| why.contains("Permission denied")),
        "{a:?}"
    );
}
