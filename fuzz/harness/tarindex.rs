//! Fuzz harness for the `tarindex` target (`packds index` reading foreign tar files), shared
//! by the cargo-fuzz target and the stable regression test (`tests/fuzz_regressions.rs`).
//! Must return normally for every input.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// The input is written as a tar file and scanned with `tarindex::scan`. When the scan
/// succeeds: the size and XXH3-128 are the file's, every member's data lies inside the file
/// after its header, its CRC32C is that of those bytes, and its name is one `unpack` accepts.
pub struct TarIndexHarness {
    path: PathBuf,
}

impl TarIndexHarness {
    pub fn new(root: &Path) -> TarIndexHarness {
        TarIndexHarness { path: root.join("in.tar") }
    }

    pub fn run(&mut self, data: &[u8]) {
        std::fs::write(&self.path, data).unwrap();
        let Ok(s) = packds::tarindex::scan(&self.path, &AtomicBool::new(false)) else { return };
        assert_eq!(s.size, data.len() as u64, "scan size is not the file's");
        assert_eq!(s.hash, xxhash_rust::xxh3::xxh3_128(data), "scan hash is not the file's");
        for m in &s.members {
            let end = m.offset.checked_add(m.size).expect("member end overflows");
            assert!(end <= data.len() as u64, "member {:?} runs past the end of the file", m.name);
            assert!(m.header < m.offset, "member {:?} has its data before its header", m.name);
            let bytes = &data[m.offset as usize..end as usize];
            assert_eq!(crc32c::crc32c(bytes), m.crc, "member {:?} has a wrong CRC32C", m.name);
            assert!(packds::read::safe_components(&m.name).is_ok(), "unsafe member name {:?} accepted", m.name);
        }
    }
}
