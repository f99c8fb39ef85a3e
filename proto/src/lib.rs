//! Protobuf messages and gRPC services of the cloud-edge channel (`proto/channel.proto`) and
//! of joint inference's cloud worker (`proto/inference.proto`),
//! generated at build time without a system `protoc`, plus the size limits both sides apply.

/// The channel's messages and the `Hub` service (client and server).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod channel {
    tonic::include_proto!("sedna.channel.v1");
}

/// The cloud-inference service of joint inference (`proto/inference.proto`): client and
/// server.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod inference {
    tonic::include_proto!("sedna.inference.v1");
}

/// The device-mapper interface of the edge agent (`proto/mapper.proto`): how a user's mapper
/// process registers for a protocol and reports twin values. Client and server.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod mapper {
    tonic::include_proto!("sedna.mapper.v1");
}

/// The ONNX model format, as far as the trainer reads it (`proto/onnx.proto`: ONNX's field
/// numbers; unknown fields are skipped when decoding).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod onnx {
    tonic::include_proto!("onnx");
}

/// gRPC metadata of an `Attach` refusal naming the hub of a tier that serves the node
/// (`host:port`).
pub const REDIRECT_METADATA: &str = "sedna-redirect";

/// gRPC metadata of an `Attach` refusal while no hub serves the node's partition: when to dial
/// again, in milliseconds (the edge adds jitter).
pub const RETRY_AFTER_METADATA: &str = "sedna-retry-after-ms";

/// gRPC metadata that may accompany [`RETRY_AFTER_METADATA`]: the hub expected to serve the
/// node's partition by then (`host:port`), so the node dials it directly instead of being
/// redirected there after the wait.
pub const SUCCESSOR_METADATA: &str = "sedna-successor";

/// Metadata of an accepted attach (the framed channel's `AttachAnswer`, or the `Attach`
/// response's headers): how often, in milliseconds, the hub wants the node's Lease renewed
/// over this session. A hub that judges its nodes by their sessions asks for fewer renewals
/// than the kubelet's every 10 s; without it the node keeps its own cadence.
pub const LEASE_RENEWAL_METADATA: &str = "sedna-lease-renewal-ms";

/// gRPC metadata of an `Attach`: the hub address the node was redirected to and could not
/// reach (so it is not redirected there again before that hub's Leases expire).
pub const UNREACHABLE_METADATA: &str = "sedna-unreachable";

/// Default cap on one envelope, encoded: larger messages are refused by both sides.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

pub mod codec;
pub mod frame;
pub mod identity;
pub mod sync;

/// The protobuf message trait (encode/decode), re-exported so users need no direct `prost`.
pub use prost::Message;
