//! `ferry-agent`: see [`ferry_agent::cli`].

fn main() -> anyhow::Result<()> {
    ferry_agent::cli::main()
}
