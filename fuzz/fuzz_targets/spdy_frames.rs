//! SPDY/3.1 frames as a node's stream server reads them from kubectl (through the hub).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sedna_edgecore::streams::spdy::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::default();
    let mut buf = bytes::BytesMut::from(data);
    // Every frame in the input, until the first error or the end.
    while let Ok(Some(_)) = decoder.decode(&mut buf) {}
});
