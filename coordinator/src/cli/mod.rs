//! The binaries' command lines, in the library so that tests can build thin wrappers around them.

pub mod coordinator;
