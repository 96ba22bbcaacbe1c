//! ferry's agent. A source scans its paths into segments and streams them to target agents over
//! QUIC; a target writes what it receives below its root. Both report to the coordinator.
//! This crate links neither openraft nor sled.

pub mod assess;
pub mod blocks;
pub mod catalog;
pub mod cli;
pub mod control;
pub mod cutover;
pub mod dial;
pub mod enrol;
pub mod forget;
pub mod frame;
pub mod hashcache;
pub mod holes;
pub mod jobs;
pub mod manifest;
pub mod metrics;
pub mod objsource;
pub mod probe;
pub mod run;
pub mod scan;
pub mod schedule;
pub mod segment;
pub mod sink;
pub mod source;
pub mod stats;
pub mod storeverify;
pub mod target;
pub mod throttle;
pub mod wire;
pub mod xattr;

/// A unit test that needs what this machine lacks (root, user xattrs) says SKIPPED and passes,
/// unless `FERRY_TESTS_REQUIRE_ALL=1` (set by `.ci/run`): then it fails.
#[cfg(test)]
pub(crate) fn skip(why: &str) {
    if std::env::var("FERRY_TESTS_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{why}; FERRY_TESTS_REQUIRE_ALL=1 says this machine must be able to run it");
    }
    eprintln!("SKIPPED: {why}");
}
