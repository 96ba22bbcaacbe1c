//! The side-by-side benchmark harness (`wan-bench`): data sets and the measurement of CPU and
//! memory of whatever runs in the emulated path's namespaces; copies are checked by
//! [`crate::tree`].

pub mod dataset;
pub mod measure;
