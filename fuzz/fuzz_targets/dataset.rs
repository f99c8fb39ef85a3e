//! Dataset inputs on a node: Sedna txt indexes and PGM images.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sedna::dataset::{Limits, decode_pgm, parse_txt};

fuzz_target!(|data: &[u8]| {
    let _ = decode_pgm(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_txt(text, std::path::Path::new("/data/set"), &Limits::default());
    }
});
