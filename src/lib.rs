//! ldapsync: an LDAP proxy with a synchronization core.
//!
//! Clients talk to [`proxy`], which relays every operation to the directory
//! and hands the writes that succeeded to a capture sink; [`poller`] reads
//! what changed in the directory directly; [`sync`] decides and applies
//! each change under the connector's policy; [`store`] keeps the local
//! objects, associations and journals. [`config`] reads the TOML file and
//! [`cli`] is the command line the binary runs.
//!
//! Panic policy (as kanidm's ldap-proxy): no `unwrap`, `panic!` or
//! `unreachable!` in the program; an `expect` states the invariant that
//! makes it hold; a poisoned lock is taken over (`into_inner`), never a
//! reason to stop; no lock is held across an `.await`. Unit tests may
//! unwrap: a failing test is what they are for. No `unsafe` but in one
//! function, allowed where it stands: a session thread's socket reads into
//! buffer space not zeroed first (`proxy::event_loop::socket`).
#![deny(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::panic, clippy::unreachable, clippy::await_holding_lock)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::panic))]

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod directory;
pub mod dn;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod poller;
pub mod proxy;
pub mod store;
pub mod sync;
pub mod throttle;
pub mod tls;
pub mod worker;
