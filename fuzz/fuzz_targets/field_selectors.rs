//! Field selectors (for every built-in kind) matched against an object, and RBAC rules (as a
//! user with write access to Roles could store them) matched against requests: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sedna_apiserver::authz::{Attributes, rule_allows};
use sedna_apiserver::registry::builtins;
use sedna_apiserver::selector::FieldSelector;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let object = serde_json::json!({
        "metadata": { "name": "web", "namespace": "default" },
        "spec": { "nodeName": "edge-1", "unschedulable": false },
        "status": { "phase": "Running" }
    });
    let types = builtins();
    let t = &types[usize::from(which) % types.len()];
    if let Ok(selector) = FieldSelector::parse(text, t) {
        let _ = selector.matches(&object);
    }
    let mut request = Attributes::new("watch", "", "secrets").in_namespace("default");
    request.field_selector = Some(text);
    let _ = request.object_name();
    if let Ok(rule) = serde_json::from_str::<serde_json::Value>(text) {
        for verb in ["get", "create", "*"] {
            let a = Attributes::new(verb, "sedna.io", "models")
                .in_namespace("default")
                .named("m")
                .on_subresource("status");
            let _ = rule_allows(&rule, &a);
        }
    }
});
