//! ferry's coordinator: the replicated migration state (openraft on sled), the gRPC services that
//! agents and operators use. (The `ferryctl` client is its own crate.)

pub mod certs;
pub mod cli;
pub mod codec;
pub mod grpc;
pub mod metrics;
pub mod network;
pub mod node;
pub mod raft_types;
pub mod state;
pub mod store;

/// The allocator a coordinator binary declares (`#[global_allocator]`): jemalloc. Under a busy
/// leader's load (thousands of agents' calls, large batches applied and replicated) glibc's
/// malloc spent a quarter of its CPU in `_int_malloc`, `malloc_consolidate` and `unlink_chunk`,
/// and at 10 million segments it was 3–4× slower than either jemalloc or mimalloc; mimalloc
/// held 10–25 % more memory than glibc there, jemalloc about the same (docs/benchmarks.md).
#[cfg(feature = "jemalloc")]
pub use tikv_jemallocator::Jemalloc as Allocator;
