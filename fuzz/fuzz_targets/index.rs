//! `index`: hostile index.pdsi next to a valid manifest and valid shards (see fuzz/harness/dataset.rs).
#![no_main]

#[path = "../harness/dataset.rs"]
mod harness;
#[path = "../scratch.rs"]
mod scratch;

use libfuzzer_sys::fuzz_target;
use std::sync::{Mutex, OnceLock};

static H: OnceLock<Mutex<harness::IndexHarness>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let h = H.get_or_init(|| {
        let h = harness::IndexHarness::new(&scratch::scratch("index"));
        // PACKDS_FUZZ_WRITE_SEEDS=DIR: write the seed inputs into DIR (used to make corpus/index).
        if let Some(dir) = std::env::var_os("PACKDS_FUZZ_WRITE_SEEDS") {
            for (name, bytes) in h.seeds() {
                std::fs::write(std::path::Path::new(&dir).join(name), bytes).unwrap();
            }
        }
        Mutex::new(h)
    });
    h.lock().unwrap_or_else(|p| p.into_inner()).run(data);
});
