//! ldapsync: an LDAP proxy with a synchronization core.
//!
//! Clients talk to [`proxy`], which relays every operation to the directory
//! and hands the writes that succeeded to a capture sink; [`poller`] reads
//! what changed in the directory directly; [`sync`] decides and applies
//! each change under the connector's policy; [`store`] keeps the local
//! objects, associations and journals. [`config`] reads the TOML file and
//! [`cli`] is the command line the binary runs.

pub mod cli;
pub mod config;
pub mod dn;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod poller;
pub mod proxy;
pub mod store;
pub mod sync;
pub mod throttle;
