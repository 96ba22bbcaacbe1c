//! ferry's agent. A source scans its paths into segments and streams them to target agents over
//! QUIC; a target writes what it receives below its root. Both report to the coordinator.
//! This crate links neither openraft nor sled.

pub mod cli;
pub mod control;
pub mod frame;
pub mod holes;
pub mod manifest;
pub mod run;
pub mod scan;
pub mod segment;
pub mod sink;
pub mod source;
pub mod stats;
pub mod target;
pub mod wire;
pub mod xattr;
