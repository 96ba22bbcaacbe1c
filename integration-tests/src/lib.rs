//! ferry's integration tests live in `tests/it/` (one test binary). This package also builds the
//! three ferry binaries as `it-coordinator`, `it-agent` and `it-ferryctl`, so the tests can spawn
//! real processes (`CARGO_BIN_EXE_*`).

pub mod bench;
pub mod process;
pub mod scrape;
pub mod stores;
pub mod tree;
pub mod wan;
