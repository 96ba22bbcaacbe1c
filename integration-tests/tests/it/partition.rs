//! A real network partition: three coordinator nodes, each in its own network namespace joined by
//! a bridge, and the leader's link cut mid-migration. Needs root (to create namespaces); where
//! they cannot be created the test says so and checks nothing else.

use ferry_proto::admin::Phase;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_common::pki::Identity;
use ferry_integration_tests::wan::path::ip;

use crate::harness::{
    assert_not_resent, assert_same_tree, finished, migration_spec, wait_for, wait_verified, Agents,
    TestEnv,
};

/// Namespaces, veths and a bridge, removed on drop.
struct Net {
    tag: String,
    subnet: u8,
    nodes: u32,
}

impl Net {
    fn ns(&self, i: u32) -> String {
        format!("{}n{i}", self.tag)
    }

    fn veth(&self, i: u32) -> String {
        format!("{}v{i}", self.tag)
    }

    fn addr(&self, i: u32) -> String {
        format!("10.213.{}.{}", self.subnet, 10 + i)
    }

    fn create(nodes: u32) -> Result<Net, String> {
        let pid = std::process::id();
        let net = Net {
            tag: format!("fy{}", pid % 100_000),
            subnet: (pid % 200) as u8 + 20,
            nodes,
        };
        let br = format!("{}br", net.tag);
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("10.213.{}.1/24", net.subnet),
            "dev",
            &br,
        ])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 1..=nodes {
            let (ns, veth) = (net.ns(i), net.veth(i));
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &br])?;
            ip(&["link", "set", &veth, "up"])?;
            let addr = format!("{}/24", net.addr(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// Cuts (or restores) node `i`'s only link.
    fn link(&self, i: u32, up: bool) {
        ip(&["link", "set", &self.veth(i), if up { "up" } else { "down" }]).unwrap();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 1..=self.nodes {
            let _ = ip(&["link", "del", &self.veth(i)]);
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["link", "del", &format!("{}br", self.tag)]);
    }
}

struct Node {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(env: &TestEnv, net: &Net, id: u32) -> Node {
    let listen = format!("{}:7400", net.addr(id));
    let cfg = env.node_config(id as u64, listen.parse().unwrap(), id == 1);
    let config = env.path(&format!("pnode{id}.toml"));
    std::fs::write(
        &config,
        format!(
            "node_id = {id}\nlisten = \"{listen}\"\ndata_dir = \"{}\"\nbootstrap = {}\nsnapshot_every = 100\nkeep_logs_after_snapshot = 10\nlease_ttl_secs = 30\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            cfg.data_dir.display(),
            id == 1,
            cfg.tls.ca.display(),
            cfg.tls.cert.display(),
            cfg.tls.key.display()
        ),
    )
    .unwrap();
    let log = env.path(&format!("pnode{id}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &net.ns(id)])
        .arg(env!("CARGO_BIN_EXE_it-coordinator"))
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Node { child, log }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_leader_commits_nothing_and_the_majority_carries_on() {
    let net = match Net::create(3) {
        Ok(n) => n,
        Err(e) => {
            crate::harness::skip(&format!(
                "cannot create network namespaces here ({e}); run as root"
            ));
            return;
        }
    };
    let env = TestEnv::new();
    env.issue(Identity::Admin("admin".into()));
    let nodes: Vec<Node> = (1..=3).map(|i| start(&env, &net, i)).collect();
    let addr = |i: u32| format!("{}:7400", net.addr(i));
    let ctl = wait_for("node 1 to lead", Duration::from_secs(30), || async {
        let c = env.ctl_try(&addr(1)).await?;
        (c.cluster_status().await.ok()?.leader_id == 1).then_some(c)
    })
    .await;
    for i in 2..=3 {
        ctl.add_node(i as u64, &addr(i)).await.unwrap_or_else(|e| {
            panic!(
                "add node {i}: {e}\n{}",
                std::fs::read_to_string(&nodes[0].log).unwrap_or_default()
            )
        });
    }

    let all = (1..=3).map(addr).collect::<Vec<_>>().join(",");
    let Agents {
        src,
        root,
        source,
        target,
    } = env.agent_pair(&all).await;
    let id = ctl.create(migration_spec(&src, "")).await.unwrap();
    wait_verified(&ctl, id, 5).await;
    let before = ctl.verify(id, u32::MAX).await.unwrap();

    // Cut the leader off from everyone.
    net.link(1, false);
    // The isolated leader cannot commit: an operator on its side of the cut gets no success.
    let isolated = Command::new("timeout")
        .args([
            "8",
            "ip",
            "netns",
            "exec",
            &net.ns(1),
            env!("CARGO_BIN_EXE_it-ferryctl"),
        ])
        .args(["--coordinator", &addr(1), "--pki-dir"])
        .arg(env.pki())
        .args([
            "migration",
            "create",
            "--source",
            "source:/isolated",
            "--target",
            "target",
        ])
        .output()
        .unwrap();
    assert!(
        !isolated.status.success(),
        "the minority side committed a migration"
    );
    // The majority elects a leader and the migration finishes through it.
    let majority = format!("{},{}", addr(2), addr(3));
    let ctl2 = wait_for("a majority leader", Duration::from_secs(60), || async {
        let c = env.ctl_try(&majority).await?;
        let l = c.cluster_status().await.ok()?.leader_id;
        (l == 2 || l == 3).then_some(c)
    })
    .await;
    finished(&ctl2, id, Duration::from_secs(90), &String::new).await;
    assert_same_tree(&src, &root);

    // Heal: node 1 rejoins as a follower and converges on the majority's state.
    net.link(1, true);
    let back = wait_for("node 1 to converge", Duration::from_secs(60), || async {
        let c = env.ctl_try(&addr(1)).await?;
        let s = c.cluster_status().await.ok()?;
        if s.leader_id == 1 || s.leader_id == 0 {
            return None;
        }
        let p = c.status(id).await.ok()?;
        (p.phase() == Phase::Done).then_some(c)
    })
    .await;
    let migrations = back.migrations().await.unwrap();
    assert_eq!(
        migrations.len(),
        1,
        "the isolated side's create must not exist: {migrations:?}"
    );
    let after = back.verify(id, u32::MAX).await.unwrap();
    assert!(after.all_verified);
    assert_not_resent(&before, &after);
    source.shutdown().await;
    target.shutdown().await;
    drop(nodes);
}
