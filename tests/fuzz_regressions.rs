//! Replays the fuzz corpora through the same harnesses the cargo-fuzz targets use (they live in
//! `fuzz/harness/` and are included here), so `cargo test` on stable checks every checked-in
//! seed (`fuzz/corpus/<target>/`) and every fixed crash (`fuzz/regressions/<target>/`) without
//! cargo-fuzz or a nightly toolchain. An input for a bug not fixed yet goes into
//! `fuzz/known-bugs/<target>/` with an `#[ignore]`d test of its own that replays it.
//! See docs/RELIABILITY.md, "Fuzzing".

#[path = "../fuzz/harness/dataset.rs"]
mod dataset;
#[path = "../fuzz/harness/decompress.rs"]
mod decompress;
#[path = "../fuzz/harness/tar_meta.rs"]
mod tar_meta;
#[path = "../fuzz/harness/tarindex.rs"]
mod tarindex;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Every file in `fuzz/<kind>/<target>/` for each kind, sorted by path.
fn inputs(target: &str, kinds: &[&str]) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut v = Vec::new();
    for kind in kinds {
        let Ok(rd) = std::fs::read_dir(fuzz.join(kind).join(target)) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_file() {
                let b = std::fs::read(&p).unwrap();
                v.push((p, b));
            }
        }
    }
    v.sort();
    v
}

/// Runs `f` on every input; fails naming every input that panicked.
fn replay(target: &str, extra: Vec<(PathBuf, Vec<u8>)>, mut f: impl FnMut(&[u8])) {
    let mut all = inputs(target, &["corpus", "regressions"]);
    assert!(!all.is_empty() || !extra.is_empty(), "no inputs for {target}");
    all.extend(extra);
    let mut failed = Vec::new();
    for (p, b) in &all {
        if catch_unwind(AssertUnwindSafe(|| f(b))).is_err() {
            failed.push(p.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: {} of {} inputs failed: {failed:#?}", failed.len(), all.len());
}

#[test]
fn fuzz_index_corpus() {
    let d = tempfile::tempdir().unwrap();
    let mut h = dataset::IndexHarness::new(d.path());
    // The fixtures' own indexes under every control byte, besides the checked-in files.
    let mut extra = Vec::new();
    for (j, ix) in h.pristine_indexes().iter().enumerate() {
        for ctl in 0u8..8 {
            extra.push((PathBuf::from(format!("<fixture index {j}, control {ctl}>")), [&[ctl][..], ix].concat()));
        }
    }
    replay("index", extra, |b| h.run(b));
}

#[test]
fn fuzz_dataset_corpus() {
    let d = tempfile::tempdir().unwrap();
    let mut h = dataset::DatasetHarness::new(d.path());
    let extra = (0u8..16).map(|f| (PathBuf::from(format!("<fixture, flags {f}>")), vec![f])).collect();
    replay("dataset", extra, |b| h.run(b));
}

#[test]
fn fuzz_tar_meta_corpus() {
    replay("tar_meta", Vec::new(), tar_meta::run_tar_meta);
}

#[test]
fn fuzz_decompress_corpus() {
    replay("decompress", Vec::new(), decompress::run_decompress);
}

#[test]
fn fuzz_tarindex_corpus() {
    let d = tempfile::tempdir().unwrap();
    let mut h = tarindex::TarIndexHarness::new(d.path());
    replay("tarindex", Vec::new(), |b| h.run(b));
}

/// Found by the `tar_meta` target: src/tar.rs `parse_member_meta` split pax records at every
/// newline instead of reading each record's length prefix, so a `path` record whose name held a
/// newline (legal in a file name) was misread and its tail could pose as an `mtime` record;
/// `unpack` then restored a wrong mtime. Fixed in 959bb88.
#[test]
fn tar_pax_record_with_newline_in_path() {
    use packds::tar::{parse_member_meta, write_header, Meta};
    let cases: [(&[u8], i64); 3] = [
        // not ASCII → pax path record; the fake record does not parse (was: None)
        ("\u{e9}\n1 mtime=now".as_bytes(), 1_700_000_000),
        // the fake record parses (was: mtime 5 instead of 1_700_000_000)
        (&[b"x\n1 mtime=5\n".as_slice(), &[b'a'; 100]].concat(), 1_700_000_000),
        // before 1970: a real pax mtime record follows, but the fake one failed first (was: None)
        ("\u{e9}\n mtime=".as_bytes(), -86_400),
    ];
    for (name, mtime) in cases {
        let mut h = Vec::new();
        write_header(&mut h, name, &Meta { size: 1, mode: 0o640, mtime, uid: 0, gid: 0 });
        assert_eq!(parse_member_meta(&h), Some((0o640, mtime)), "name {:?}", String::from_utf8_lossy(name));
    }
}
