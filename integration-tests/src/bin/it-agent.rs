//! The `ferry-agent` binary, built inside this package so its tests can spawn it.

fn main() -> anyhow::Result<()> {
    ferry_agent::cli::main()
}
