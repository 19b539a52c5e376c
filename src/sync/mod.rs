//! The sync engine: connectors, change events, and the decisions that keep
//! the local store and the directory in step.

pub mod engine;
pub mod policy;
pub mod progress;
pub mod report;
