//! Label selectors from query strings, matched against an object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sedna_apiserver::selector::LabelSelector;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(selector) = LabelSelector::parse(text) {
        let object = serde_json::json!({ "metadata": { "labels": { "app": "web", "tier": "1" } } });
        let _ = selector.matches(&object);
    }
});
