//! ferry's integration tests: one binary, one module per concern.

#[allow(dead_code)]
mod harness;

mod bad_input;
mod cluster;
mod deploy;
mod partition;
mod processes;
mod quickstart;
mod resume;
mod wan;
