//! What a hub reads from a node and a node from a hub: envelopes, upstream writes, resync
//! digests, manifests and wanted lists, and the framed channel's frames (read under a
//! limit, whatever lengths they announce).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sedna_proto::Message;
use sedna_proto::channel::{Digest, Envelope, Manifest, Upstream, Want};
use sedna_proto::frame::{AttachRequest, FrameReader};
use sedna_proto::sync;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = Envelope::decode(data) {
        let _ = Upstream::decode(e.payload.as_slice());
    }
    if let Ok(d) = Digest::decode(data) {
        let _ = sync::unpack_digests(&d.digests, d.buckets);
    }
    let _ = Manifest::decode(data);
    if let Ok(w) = Want::decode(data) {
        let _ = sync::unpack_uids(&w.uids);
    }
    let _ = sync::unpack_uids(data);
    let _ = sync::unpack_digests(data, 64);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let mut reader = FrameReader::new(data, 4096);
        let _ = reader.read::<AttachRequest>().await;
        reader.set_max(64 * 1024);
        while let Ok(Some(_)) = reader.read::<Envelope>().await {}
    });
});
