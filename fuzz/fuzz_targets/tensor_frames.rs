//! Tensor frames on the joint-inference wire (SDNT) and weight messages of federated learning
//! (SDNW, fp32/fp16/int8): decoded under their limits, never a panic or an allocation beyond
//! them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sedna::joint::{FrameLimits, decode_tensors};
use sedna::weights::{Limits, Weights};

fuzz_target!(|data: &[u8]| {
    let frame_limits = FrameLimits {
        max_tensors: 16,
        max_bytes: 1 << 20,
        max_rank: 8,
    };
    let _ = decode_tensors(data, &frame_limits);
    let limits = Limits {
        max_tensors: 16,
        max_values: 1 << 18,
        max_name_bytes: 256,
        max_rank: 8,
    };
    if let Ok(w) = Weights::decode(data, &limits) {
        // What decodes re-encodes (the round trip the aggregator relies on).
        let _ = w.encode(sedna::weights::Encoding::F32);
    }
});
