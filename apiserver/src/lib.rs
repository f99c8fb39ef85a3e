//! Embedded Kubernetes-compatible API server on SQLite.
pub mod store;
