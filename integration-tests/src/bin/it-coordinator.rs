//! The `ferry-coordinator` binary, built inside this package so its tests can spawn it
//! (`CARGO_BIN_EXE_it-coordinator`).

#[global_allocator]
static ALLOCATOR: ferry_coordinator::Allocator = ferry_coordinator::Allocator;

fn main() -> anyhow::Result<()> {
    ferry_coordinator::cli::coordinator::main()
}
