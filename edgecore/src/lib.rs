//! The edge agent (`sedna edgecore`).
//!
//! - [`agent`]: everything below wired together; what `sedna edgecore` runs.
//! - [`runtime`]: pods bound to the node, run as supervised processes.
//! - [`node`]: the Node object (capacity, conditions) and its Lease.
//! - [`metaserver`]: the node's local, read-mostly Kubernetes API on 127.0.0.1.
//! - [`join`]: joining a hub with a token; the node identity on disk.
//! - [`tls`]: pinned and mutual TLS towards the hub.
//! - [`store`]: objects received and the outbox of upstream writes (SQLite).
//! - [`datasets`], [`triggers`]: the local controller: Dataset sample counts and
//!   incremental-learning train triggers, evaluated on the node and reported upstream.
//! - [`devices`]: mappers for the node's Devices (Modbus TCP, MQTT) and their twins.
//! - [`streams`]: `kubectl logs`, `exec`, `attach`, `port-forward` served through the hub.
//! - [`machine`]: the channel protocol as a pure state machine.
//! - [`client`]: the tokio shell that runs it.
pub mod agent;
pub mod client;
pub mod datasets;
pub mod devices;
pub mod join;
pub mod machine;
pub mod metaserver;
pub mod node;
pub mod podtoken;
pub mod runtime;
pub mod store;
pub mod streams;
pub mod tls;
pub mod triggers;
pub mod tunnel;

pub use agent::{Agent, AgentConfig};
pub use client::{EdgeConfig, EdgeHub, EdgeStatus};

/// Creates `dir` (and missing parents) readable by this user alone (0700), and makes an
/// existing `dir` so: the agent's data holds its key, its store and its pods' secrets.
pub(crate) fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}
