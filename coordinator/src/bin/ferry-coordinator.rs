//! `ferry-coordinator`: see [`ferry_coordinator::cli::coordinator`].

fn main() -> anyhow::Result<()> {
    ferry_coordinator::cli::coordinator::main()
}
