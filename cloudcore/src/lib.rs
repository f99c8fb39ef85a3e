//! The cloud hub (`sedna cloudcore`): edge nodes dial it over mutual TLS; it sends each node
//! exactly the API objects the node needs, keeps them in sync across disconnections with an
//! incremental resync, and applies the node's upstream writes after authorizing them.
//!
//! - [`pki`]: the hub CA, its serving certificate and node certificates.
//! - [`tokens`]: join tokens, kept as Secrets in the API.
//! - [`revocation`]: certificates revoked by deleting their Node.
//! - [`router`]: which objects each node needs (pure).
//! - [`session`]: one node's protocol state machine (pure).
//! - [`upstream`]: authorization and application of nodes' writes.
//! - [`liveness`]: which node Lease renewals reach the API; what the hub knows first-hand.
//! - [`lifecycle`]: nodes whose lease expired become NotReady; eviction only after an
//!   autonomy period set on the node.
//! - [`gate`]: admission of TLS handshakes (per source, in total, fair when full).
//! - [`streams`]: streams to nodes for `kubectl logs`, `exec`, `attach`, `port-forward`.
//! - [`partitions`], [`tier`]: several hubs sharing the nodes, partitions negotiated through
//!   Leases, nodes redirected to the hub that serves them.
//! - [`interest`]: which of the fleet's objects a hub of a tier keeps (pure).
//! - [`hub`]: the tokio shell: listener, gRPC service, shared watches, sessions.
pub mod gate;
pub mod hub;
pub mod interest;
pub mod lifecycle;
pub mod liveness;
pub mod partitions;
pub mod pki;
mod rate;
pub mod revocation;
pub mod router;
pub mod session;
pub mod streams;
pub mod tier;
pub mod tokens;
pub mod tunnel;
pub mod upstream;

pub use hub::{Hub, HubConfig, HubStats};
