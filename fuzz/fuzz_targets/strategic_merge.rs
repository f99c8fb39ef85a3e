//! Strategic merge patches (what `kubectl apply` sends for built-in kinds) against a Pod and
//! a ConfigMap: never a panic; every accepted result is checked against the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sedna_apiserver::patch::{self, Limits};
use sedna_apiserver::registry::builtins;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let types = builtins();
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "p", "labels": { "a": "1" }, "finalizers": ["f"] },
        "spec": { "containers": [
            { "name": "c", "image": "x", "env": [{ "name": "A", "value": "1" }],
              "ports": [{ "containerPort": 80 }] } ],
            "volumes": [{ "name": "v", "emptyDir": {} }], "tolerations": [{ "key": "k" }] }
    });
    let limits = Limits { max_bytes: 64 * 1024 };
    for t in types.iter().filter(|t| t.kind == "Pod" || t.kind == "ConfigMap") {
        if let Ok(out) = patch::strategic(t, &pod, &body) {
            let _ = patch::check_result(&out, &limits);
        }
    }
});
