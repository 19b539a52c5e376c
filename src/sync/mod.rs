//! The sync engine: connectors, change events, and the decisions that keep
//! the local store and the directory in step.

pub mod engine;
mod guard;
mod mapping;
pub mod policy;
pub mod progress;
pub mod report;
