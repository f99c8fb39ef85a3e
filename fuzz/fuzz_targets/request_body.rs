//! Request bodies as the API server decodes them: JSON, YAML (aliases, deep nesting) and
//! Kubernetes protobuf.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sedna_apiserver::handlers::decode_body;

fuzz_target!(|data: &[u8]| {
    for content_type in [
        "application/json",
        "application/yaml",
        "application/vnd.kubernetes.protobuf",
    ] {
        let _ = decode_body(content_type, data);
    }
});
