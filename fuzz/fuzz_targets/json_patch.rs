//! JSON patches (RFC 6902) and merge patches against a small object: never a panic, a stack
//! overflow or unbounded memory; every result within the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sedna_apiserver::patch::{self, Limits};

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let target = serde_json::json!({
        "metadata": { "name": "x", "labels": { "a": "1" }, "finalizers": ["f"] },
        "spec": { "list": [1, 2, 3], "nested": { "deep": { "value": true } } },
        "status": {}
    });
    let limits = Limits { max_bytes: 64 * 1024 };
    if let Ok(out) = patch::json(&target, &body, &limits) {
        assert!(patch::check_result(&out, &limits).is_ok());
    }
    let merged = patch::merge(&target, &body);
    let _ = patch::check_result(&merged, &limits);
});
