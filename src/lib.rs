//! ldapsync: an LDAP proxy with a synchronization core.
//!
//! Clients talk to [`proxy`], which relays every operation to the directory
//! and hands the writes that succeeded to a capture sink. [`config`] reads
//! the TOML file and [`cli`] is the command line the binary runs.

pub mod cli;
pub mod config;
pub mod proxy;
pub mod store;
pub mod sync;
