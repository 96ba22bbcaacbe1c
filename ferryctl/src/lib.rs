//! `ferryctl`: the admin client of a ferry cluster ([`ctl`]), its command line ([`cli`]) and the
//! single-machine quick start ([`quickstart`]), which runs a coordinator and two agents in one
//! process. The only crate that depends on both daemons.

pub mod cli;
pub mod contexts;
pub mod ctl;
pub mod exit;
pub mod jobs;
pub mod plan;
pub mod quickstart;
pub mod yaml;
