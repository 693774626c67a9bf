//! `decompress`: the bounded zstd decoder (hostile frames, sizes, codecs) and the encoder's
//! round trip (see fuzz/harness/decompress.rs).
#![no_main]

#[path = "../harness/decompress.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::run_decompress(data));
