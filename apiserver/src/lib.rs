//! Embedded Kubernetes-compatible API server on SQLite.
pub mod apply;
pub mod builtin;
pub mod discovery;
pub mod error;
pub mod meta;
pub mod patch;
pub mod pki;
pub mod protobuf;
pub mod registry;
pub mod request;
pub mod selector;
pub mod store;
pub mod table;
