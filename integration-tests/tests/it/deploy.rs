//! The example configs in `deploy/` are the configs the daemons read.

use std::path::Path;

fn deploy(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

#[test]
fn example_configs_parse_into_the_daemons_config_types() {
    let a: ferry_agent::run::AgentConfig =
        ferry_common::config::load_toml(&deploy("config/agent.toml")).unwrap();
    assert_eq!(a.name, "gpu-node-01");
    assert!(a.root.is_some() && a.data_listen.is_some());
    let c: ferry_coordinator::node::CoordinatorConfig =
        ferry_common::config::load_toml(&deploy("config/coordinator.toml")).unwrap();
    assert_eq!(c.node_id, 1);
}

#[test]
fn units_start_the_commands_the_binaries_have() {
    let coord = std::fs::read_to_string(deploy("systemd/ferry-coordinator.service")).unwrap();
    assert!(coord.contains("ferry-coordinator run --config /etc/ferry/coordinator.toml"));
    assert!(coord.contains("Type=notify"));
    let agent = std::fs::read_to_string(deploy("systemd/ferry-agent.service")).unwrap();
    assert!(agent.contains("ferry-agent run --config /etc/ferry/agent.toml"));
}
