//! The side-by-side benchmark harness (`wan-bench`): data sets, the independent check of each
//! copy, and the measurement of CPU and memory of whatever runs in the emulated path's
//! namespaces.

pub mod dataset;
pub mod measure;
pub mod tree;
