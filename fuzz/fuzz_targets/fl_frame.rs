//! Federated-learning frames (SDNF) as the aggregator and the trainers read them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sedna::fl::wire::{WireLimits, read_message};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let limits = WireLimits {
        max_frame_bytes: 1 << 20,
        ..WireLimits::default()
    };
    runtime.block_on(async {
        let mut reader = data;
        // Every frame in the input, until the first error or the end.
        while let Ok(Some(_)) = read_message(&mut reader, &limits).await {}
    });
});
