//! `ferry-coordinator`: see [`ferry_coordinator::cli::coordinator`].

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: ferry_coordinator::Allocator = ferry_coordinator::Allocator;

fn main() -> anyhow::Result<()> {
    ferry_coordinator::cli::coordinator::main()
}
