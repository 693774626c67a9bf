//! `tar_meta`: the tar/pax header parsers and the header write → parse round trip.
#![no_main]

#[path = "../harness/tar_meta.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| harness::run_tar_meta(data));
