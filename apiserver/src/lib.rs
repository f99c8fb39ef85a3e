//! Embedded Kubernetes-compatible API server on SQLite: the single-box control plane that
//! real, unmodified clients (`kubectl`, kube-rs) accept, and later the edge's local
//! list/watch server.
//!
//! - Storage: one append-only revision log in SQLite ([`store`]).
//! - API: discovery, OpenAPI, CRDs with schema validation, built-in kinds, every verb with
//!   watch, patches, server-side apply, status subresources, finalizers, garbage collection.
//! - Streams: `kubectl logs`, `exec`, `attach`, `port-forward` relayed to the pod's node
//!   ([`nodestream`]).
//! - Security: HTTPS with a generated CA, bearer tokens, RBAC ([`authz`]), loopback by
//!   default.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = sedna_apiserver::Config::new("/var/lib/sedna/apiserver");
//! let server = sedna_apiserver::ApiServer::start(config).await?;
//! println!("KUBECONFIG={}", server.kubeconfig_path().display());
//! # Ok(()) }
//! ```
pub mod apply;
pub mod authz;
pub mod builtin;
pub mod discovery;
pub mod error;
mod gc;
pub mod handlers;
pub mod meta;
pub mod nodestream;
pub mod patch;
pub mod pki;
pub mod protobuf;
mod protobuf_workloads;
pub mod registry;
pub mod request;
pub mod selector;
pub mod server;
pub mod store;
pub mod subresources;
pub mod table;
pub mod tokenrequest;
mod watch;

pub use server::{ApiServer, Config, MirrorError, StartError, WritePolicy, WriteRequest};
