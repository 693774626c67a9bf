//! `tarindex`: the foreign-tar scanner behind `packds index` (see fuzz/harness/tarindex.rs).
#![no_main]

#[path = "../harness/tarindex.rs"]
mod harness;
#[path = "../scratch.rs"]
mod scratch;

use libfuzzer_sys::fuzz_target;
use std::sync::{Mutex, OnceLock};

static H: OnceLock<Mutex<harness::TarIndexHarness>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let h = H.get_or_init(|| Mutex::new(harness::TarIndexHarness::new(&scratch::scratch("tarindex"))));
    h.lock().unwrap_or_else(|p| p.into_inner()).run(data);
});
