//! Replays the fuzz corpora through the same harnesses the cargo-fuzz targets use (they live in
//! `fuzz/harness/` and are included here), so `cargo test` on stable checks every checked-in
//! seed (`fuzz/corpus/<target>/`) and every fixed crash (`fuzz/regressions/<target>/`) without
//! cargo-fuzz or a nightly toolchain. Inputs for bugs not fixed yet are in
//! `fuzz/known-bugs/<target>/`, replayed by the `#[ignore]`d tests at the end.
//! See docs/RELIABILITY.md, "Fuzzing".

#[path = "../fuzz/harness/dataset.rs"]
mod dataset;
#[path = "../fuzz/harness/decompress.rs"]
mod decompress;
#[path = "../fuzz/harness/tar_meta.rs"]
mod tar_meta;

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

/// src/tar.rs `parse_member_meta` splits pax records at every newline instead of reading each
/// record's length prefix, so a `path` record whose name holds a newline (legal in a file name)
/// is misread: its tail can pose as an `mtime` record. `unpack` then restores a wrong mtime
/// (the name's fake value wins unless a real `mtime` record follows) or, when the fake value
/// does not parse, falls back to the ustar field (0 for a time before 1970 or after 2242).
#[test]
fn tar_pax_record_with_newline_in_path() {
    use packds::tar::{parse_member_meta, write_header, Meta};
    let cases: [(&[u8], i64); 3] = [
        // not ASCII → pax path record; the fake record does not parse → None
        ("\u{e9}\n1 mtime=now".as_bytes(), 1_700_000_000),
        // the fake record parses → mtime 5 instead of 1_700_000_000
        (&[b"x\n1 mtime=5\n".as_slice(), &[b'a'; 100]].concat(), 1_700_000_000),
        // before 1970: the real pax mtime record comes after, but the fake one fails first
        ("\u{e9}\n mtime=".as_bytes(), -86_400),
    ];
    for (name, mtime) in cases {
        let mut h = Vec::new();
        write_header(&mut h, name, &Meta { size: 1, mode: 0o640, mtime, uid: 0, gid: 0 });
        assert_eq!(parse_member_meta(&h), Some((0o640, mtime)), "name {:?}", String::from_utf8_lossy(name));
    }
    for (p, b) in inputs("tar_meta", &["known-bugs"]) {
        eprintln!("{}", p.display());
        tar_meta::run_tar_meta_with(&b, true);
    }
}
