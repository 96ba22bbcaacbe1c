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

#[test]
fn the_example_catalog_plans_a_migration() {
    let text = std::fs::read_to_string(deploy("plan/catalog.example.toml")).unwrap();
    let catalog: ferryctl::plan::Catalog = toml::from_str(&text).unwrap();
    assert_eq!(catalog.agents.len(), 3);
    let inputs = ferryctl::plan::Inputs {
        bytes: 200_000_000_000_000,
        deadline_secs: 72 * 3600,
        path_limit: None,
    };
    let p = ferryctl::plan::plan(&catalog, &inputs).unwrap();
    assert!(p.duration_secs <= inputs.deadline_secs, "{p:?}");
    let carried: u64 = p.agents.iter().map(|a| a.bytes).sum();
    assert!(
        carried.abs_diff(inputs.bytes) <= p.agents.len() as u64,
        "{p:?}"
    );
}
