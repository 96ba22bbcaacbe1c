//! ferry's integration tests: one binary, one module per concern.

#[allow(dead_code)]
mod harness;

mod admin;
mod bad_input;
mod cli;
mod cluster;
mod crash;
mod cutover;
mod deploy;
mod enrol;
mod identity;
mod jobs;
mod metrics;
mod object_store;
mod partition;
mod processes;
mod quickstart;
mod resume;
mod retries;
mod sync;
mod throttle;
mod wan;
