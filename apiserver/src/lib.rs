//! Embedded Kubernetes-compatible API server on SQLite.
pub mod apply;
pub mod builtin;
pub mod error;
pub mod meta;
pub mod patch;
pub mod registry;
pub mod request;
pub mod selector;
pub mod store;
