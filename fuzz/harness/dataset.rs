//! Fuzz harness for the `index` and `dataset` targets, shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/*.rs`) and the stable regression test (`tests/fuzz_regressions.rs`), both of which include this file with
//! `#[path = ...] mod harness;`. It depends only on packds and on crates packds itself depends
//! on (serde_json, xxhash-rust, crc32c, libc), so it builds in both places.
//!
//! Every `run_*` function must return normally for every input: errors from packds are fine,
//! a panic (including a failed assertion below) or a crash is a bug.
#![allow(dead_code)]

use packds::index::Index;
use packds::read::Reader;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// At most this many samples are read per input (counts come from hostile bytes).
pub const CAP: usize = 10_000;

/// A dataset's files: (name, bytes), manifest first, index second, then the shards.
pub type Files = Vec<(String, Vec<u8>)>;

pub const INDEX: &str = "index.pdsi";
pub const MANIFEST: &str = "manifest.json";

/// The fixture: (key, contents, mode, mtime). It covers a plain member, nested directories, an
/// empty file, a key longer than 100 bytes and a non-UTF-8 key (both need pax `path`
/// records), an mtime before 1970 (pax `mtime` record) and several shards (shard size 4 KiB).
fn fixture_files() -> Vec<(Vec<u8>, Vec<u8>, u32, i64)> {
    let long = [b"dir/".to_vec(), vec![b'n'; 116]].concat();
    vec![
        (b"a.txt".to_vec(), b"hello".to_vec(), 0o644, 1_700_000_000),
        (b"dir/b.bin".to_vec(), (0..600u32).map(|i| (i * 7 % 251) as u8).collect(), 0o600, 1_600_000_000),
        (b"dir/c".to_vec(), vec![b'c'; 1000], 0o640, 1_500_000_000),
        (long, b"xyz".to_vec(), 0o644, 1_700_000_001),
        (b"dir/sub/empty".to_vec(), Vec::new(), 0o444, 1_700_000_002),
        (b"z/exec.sh".to_vec(), b"#!/bin/sh\necho hi\n".to_vec(), 0o755, 1_700_000_003),
        (b"\xffname".to_vec(), b"not utf-8".to_vec(), 0o600, -86_400),
    ]
}

/// Packs the fixture with packds's own pack pipeline into `root/build/ds.pds`, then makes the
/// manifest deterministic (`created_unix`). Returns the dataset's files, name → bytes,
/// manifest first, index second, then the shards in order.
pub fn build_fixture(root: &Path) -> Vec<(String, Vec<u8>)> {
    let src = root.join("build/src");
    let out = root.join("build/ds.pds");
    let _ = fs::remove_dir_all(root.join("build"));
    fs::create_dir_all(&src).unwrap();
    for (key, data, mode, mtime) in fixture_files() {
        let p = src.join(std::ffi::OsStr::from_bytes(&key));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, &data).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        let t = if mtime >= 0 {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime as u64)
        } else {
            std::time::UNIX_EPOCH - std::time::Duration::from_secs(mtime.unsigned_abs())
        };
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_times(fs::FileTimes::new().set_accessed(t).set_modified(t)).unwrap();
    }
    let mut opts = packds::pack::PackOptions::new(vec![src], out.clone());
    opts.shard_size = 4096;
    opts.threads = 1;
    packds::pack::pack(&opts, &packds::pack::Progress::default()).expect("packing the fuzz fixture");
    let mut m: serde_json::Value = serde_json::from_slice(&fs::read(out.join(MANIFEST)).unwrap()).unwrap();
    m["created_unix"] = serde_json::json!(0);
    let mut files = vec![(MANIFEST.to_string(), serde_json::to_vec_pretty(&m).unwrap()), (INDEX.to_string(), fs::read(out.join(INDEX)).unwrap())];
    let mut shards: Vec<String> =
        fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n != MANIFEST && n != INDEX).collect();
    shards.sort();
    assert!(shards.len() >= 2, "the fixture should span several shards: {shards:?}");
    for s in shards {
        let b = fs::read(out.join(&s)).unwrap();
        files.push((s, b));
    }
    fs::remove_dir_all(root.join("build")).unwrap();
    files
}

/// Raw-content zstd dictionary of the coded fixture.
pub const DICT: &[u8] = b"#!/bin/sh\necho hi\nnot utf-8 hello packds dictionary ccccccccccccccccccccccc";

/// A format-2 (coded) variant of the fixture, built by hand from packds's public pieces
/// (`tar::write_header`, `codec::Encoder`, `IndexBuilder::new_coded`) next to the packed one:
/// samples alternate raw / zstd / zstd with the dictionary, in two shards `zshard-0000N.tar`.
/// Returns manifest, index, shards (as [`build_fixture`]); the manifest is the packed one's,
/// edited to describe these files.
pub fn build_coded_fixture(packed_manifest: &[u8]) -> Vec<(String, Vec<u8>)> {
    use packds::codec::{Compress, Encoder, RAW};
    use packds::index::{IndexBuilder, ShardInfo};
    use packds::tar;
    let mut samples = fixture_files();
    samples.sort_by(|a, b| a.0.cmp(&b.0));
    let mut ib = IndexBuilder::new_coded(DICT);
    let mut shards: Vec<Vec<u8>> = vec![Vec::new(), Vec::new()];
    let mut plain = Encoder::new(Compress::Zstd(3), None);
    let mut with_dict = Encoder::new(Compress::Zstd(3), Some(DICT));
    for (i, (key, data, mode, mtime)) in samples.iter().enumerate() {
        let s = usize::from(i >= 4);
        let mut frame = Vec::new();
        let codec = match i % 3 {
            0 => RAW,
            1 => plain.encode(data, &mut frame, true),
            _ => with_dict.encode(data, &mut frame, true),
        };
        let stored = if codec == RAW { data.clone() } else { frame };
        let out = &mut shards[s];
        tar::write_header(out, key, &tar::Meta { size: stored.len() as u64, mode: *mode, mtime: *mtime, uid: 0, gid: 0 });
        let off = out.len() as u64;
        out.extend_from_slice(&stored);
        out.resize(out.len() + tar::padding(stored.len() as u64) as usize, 0);
        ib.push_coded(key, s as u32, off, stored.len() as u64, data.len() as u64, codec, crc32c::crc32c(data));
    }
    let mut m: serde_json::Value = serde_json::from_slice(packed_manifest).unwrap();
    let mut recs = Vec::new();
    let mut files = Vec::new();
    for (s, mut b) in shards.into_iter().enumerate() {
        b.extend_from_slice(&tar::END);
        let name = format!("zshard-{s:05}.tar");
        let hash = xxhash_rust::xxh3::xxh3_128(&b);
        ib.push_shard(ShardInfo { name: name.clone(), size: b.len() as u64, hash });
        recs.push(
            serde_json::json!({"file": name, "size": b.len(), "samples": if s == 0 { 4 } else { samples.len() - 4 }, "xxh3_128": format!("{hash:032x}")}),
        );
        files.push((name, b));
    }
    let index = ib.to_bytes();
    m["shards"] = recs.into();
    m["index"]["size"] = index.len().into();
    m["index"]["xxh3_128"] = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&index)).into();
    files.insert(0, (INDEX.to_string(), index));
    files.insert(0, (MANIFEST.to_string(), serde_json::to_vec_pretty(&m).unwrap()));
    files
}

fn rd_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

fn rd_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(d) = at.checked_add(v.len()).and_then(|end| b.get_mut(at..end)) {
        d.copy_from_slice(v);
    }
}

/// Recomputes the CRC32Cs of an index (format 1 or 2 layout: body, shard table, codec section,
/// header) from the offsets its header claims, where they are in bounds, so mutations get past
/// the cheap checksum checks.
pub fn fix_index_crcs(b: &mut [u8]) {
    if b.len() < 128 {
        return;
    }
    let len = b.len();
    let field = |b: &[u8], at| rd_u64(b, at).unwrap() as usize;
    let (eo, so, no, nl) = (field(b, 32), field(b, 56), field(b, 64), field(b, 72));
    if eo <= so && so <= len {
        let c = crc32c::crc32c(&b[eo..so]);
        put(b, 80, &c.to_le_bytes());
    }
    if let Some(ne) = no.checked_add(nl).filter(|&ne| so <= ne && ne <= len) {
        let c = crc32c::crc32c(&b[so..ne]);
        put(b, 84, &c.to_le_bytes());
    }
    let co = field(b, 96);
    if rd_u64(b, 88) == Some(1) && co <= len {
        let c = crc32c::crc32c(&b[co..]);
        put(b, 120, &c.to_le_bytes());
    }
    let c = crc32c::crc32c(&b[..124]);
    put(b, 124, &c.to_le_bytes());
}

/// Rows of the index's shard table (format 1 and 2 layout) whose name is one of `files`: sets their
/// size and XXH3-128 to the file's actual ones.
fn fix_index_shard_table(ix: &mut [u8], files: &[(String, Vec<u8>)]) {
    let (Some(ns), Some(so), Some(no), Some(nl)) = (rd_u64(ix, 24), rd_u64(ix, 56), rd_u64(ix, 64), rd_u64(ix, 72)) else { return };
    for s in 0..ns.min(64) as usize {
        let Some(at) = (so as usize).checked_add(s * 32).filter(|at| at.checked_add(32).is_some_and(|end| end <= ix.len())) else { return };
        let (Some(noff), Some(nlen)) = (rd_u32(ix, at + 24), rd_u32(ix, at + 28)) else { return };
        let name = (no as usize).checked_add(noff as usize).and_then(|a| Some((a, a.checked_add(nlen as usize)?)));
        let Some(name) = name.filter(|&(_, e)| e as u64 <= no.saturating_add(nl)).and_then(|(a, e)| ix.get(a..e)) else { continue };
        if let Some((_, data)) = files.iter().find(|(n, _)| n.as_bytes() == name) {
            let h = xxhash_rust::xxh3::xxh3_128(data);
            put(ix, at, &(data.len() as u64).to_le_bytes());
            put(ix, at + 8, &(h as u64).to_le_bytes());
            put(ix, at + 16, &((h >> 64) as u64).to_le_bytes());
        }
    }
}

/// Edits a manifest (if it parses as a JSON object) to agree with `index` (size, XXH3-128,
/// sample count from its header) and, if `shards`, with the shard files' sizes and hashes.
fn fix_manifest(manifest: &[u8], index: &[u8], files: &[(String, Vec<u8>)], shards: bool) -> Option<Vec<u8>> {
    let mut m: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    let idx = m.get_mut("index")?.as_object_mut()?;
    idx.insert("size".into(), (index.len() as u64).into());
    idx.insert("xxh3_128".into(), format!("{:032x}", xxhash_rust::xxh3::xxh3_128(index)).into());
    if let Some(n) = rd_u64(index, 16) {
        m.as_object_mut()?.insert("samples".into(), n.into());
    }
    if shards {
        for rec in m.get_mut("shards")?.as_array_mut()?.iter_mut() {
            let Some(rec) = rec.as_object_mut() else { continue };
            let Some(name) = rec.get("file").and_then(|f| f.as_str()).map(str::to_owned) else { continue };
            if let Some((_, data)) = files.iter().find(|(n, _)| *n == name) {
                rec.insert("size".into(), (data.len() as u64).into());
                rec.insert("xxh3_128".into(), format!("{:032x}", xxhash_rust::xxh3::xxh3_128(data)).into());
            }
        }
    }
    serde_json::to_vec_pretty(&m).ok()
}

/// Every lookup on a (possibly hostile) index; checks the promises that follow from
/// `validate_all` succeeding.
pub fn exercise_index(ix: &Index) {
    let n = ix.len().min(CAP);
    for i in 0..n {
        let _ = ix.entry(i);
        if let Ok(k) = ix.key(i) {
            let _ = ix.find(k);
        }
    }
    assert!(ix.entry(ix.len()).is_err() && ix.key(ix.len()).is_err());
    let _ = ix.find(b"");
    let _ = ix.find(b"\xff\xff\xff");
    if ix.len() <= CAP && ix.validate_all().is_ok() {
        for i in 0..ix.len() {
            ix.entry(i).expect("validate_all passed, yet an entry is refused");
            let k = ix.key(i).expect("validate_all passed, yet a key is refused");
            assert_eq!(ix.find(k).expect("find after validate_all"), Some(i), "validate_all passed, yet find(key(i)) != i");
        }
    }
}

/// Samples larger than this (original size, as the index claims it) are not read back into a
/// second buffer with `read_into` (`read` still decodes them).
const READ_INTO_MAX: u64 = 1 << 24;

/// Every read of an opened dataset, then a deep verify; checks that the
/// accessors agree with each other. Returns Some(n) if all n samples read back through
/// `get_checked`, None if some failed.
pub fn exercise_reader(r: &Reader) -> Option<usize> {
    let n = r.len().min(CAP);
    let _ = r.is_coded();
    let mut all_checked = true;
    for i in 0..n {
        if let Ok(k) = r.key(i) {
            let _ = r.find(k);
        }
        let entry = r.entry(i);
        let size = r.size(i);
        let stored_size = r.stored_size(i);
        let loc = r.locate(i);
        let got = r.get(i);
        let read = r.read(i);
        let checked = r.get_checked(i);
        assert_eq!(entry.is_ok(), size.is_ok(), "entry and size disagree on sample {i}");
        assert_eq!(size.is_ok(), got.is_ok(), "size and get disagree on sample {i}");
        assert_eq!(size.is_ok(), stored_size.is_ok(), "size and stored_size disagree on sample {i}");
        assert_eq!(size.is_ok(), loc.is_ok(), "size and locate disagree on sample {i}");
        if let (Ok(s), Ok(g), Ok((_, _, ls))) = (&stored_size, &got, &loc) {
            assert_eq!(*s, g.len() as u64);
            assert_eq!(*s, *ls);
        }
        if let Ok(rd) = &read {
            assert_eq!(rd.len() as u64, *size.as_ref().unwrap(), "read returned a length other than size() for sample {i}");
        }
        match &checked {
            Ok(c) => assert_eq!(Some(&c[..]), read.as_ref().ok().map(|r| &r[..]), "get_checked and read differ on sample {i}"),
            Err(_) => all_checked = false,
        }
        if let Ok(&s) = size.as_ref() {
            if s <= READ_INTO_MAX {
                let mut buf = vec![0u8; s as usize];
                let into = r.read_into(i, &mut buf);
                assert_eq!(into.is_ok(), read.is_ok(), "read_into and read disagree on sample {i}");
                if into.is_ok() {
                    assert_eq!(&buf[..], &read.as_ref().unwrap()[..], "read_into and read differ on sample {i}");
                }
                let into_checked = r.read_into_checked(i, &mut buf);
                assert_eq!(into_checked.is_ok(), checked.is_ok(), "read_into_checked and get_checked disagree on sample {i}");
            }
            // A buffer of the wrong size is an error, never a partial write past its end.
            let mut short = vec![0u8; (s as usize).min(16).saturating_sub(1)];
            if s > 0 {
                let _ = r.read_into(i, &mut short);
            }
        }
    }
    assert!(r.get(r.len()).is_err() && r.get(usize::MAX).is_err() && r.size(usize::MAX).is_err() && r.read(usize::MAX).is_err());
    // One deep verify (it does everything `verify()` does, plus decoding every compressed
    // sample); one thread besides the caller's, to keep executions fast.
    if let Ok(rep) = r.verify_with(1, true) {
        if rep.problems.is_empty() && r.len() <= CAP {
            assert!(all_checked, "verify(deep) found no problem, yet get_checked failed");
            assert_eq!(rep.samples, r.len() as u64, "verify(deep) checked {} samples of {}", rep.samples, r.len());
        }
    }
    all_checked.then_some(n)
}

/// A scratch directory for one harness instance; removed on drop.
pub struct Scratch {
    pub root: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn write_if_changed(path: &Path, now: &mut Vec<u8>, want: &[u8]) {
    if now.as_slice() != want {
        fs::write(path, want).unwrap();
        now.clear();
        now.extend_from_slice(want);
    }
}

// ------------------------------------------------------------------------------------------
// Target `index`: the input (after one control byte) is index.pdsi.

/// Both fixtures, written once into `root/ds`: the packed one (`manifest.json`, `index.pdsi`,
/// `shard-*.tar`) and the coded one's shards (`zshard-*.tar`). Returns (packed, coded).
fn write_fixtures(root: &Path) -> (PathBuf, Files, Files) {
    let packed = build_fixture(root);
    let coded = build_coded_fixture(&packed[0].1);
    let ds = root.join("ds");
    fs::create_dir_all(&ds).unwrap();
    for (n, b) in packed.iter().chain(&coded[2..]) {
        fs::write(ds.join(n), b).unwrap();
    }
    (ds, packed, coded)
}

/// Harness for the `index` target. `root` is an empty scratch directory it owns.
pub struct IndexHarness {
    ds: PathBuf,
    packed: Vec<(String, Vec<u8>)>,
    coded: Vec<(String, Vec<u8>)>,
    on_disk_manifest: Vec<u8>,
    on_disk_index: Vec<u8>,
}

impl IndexHarness {
    pub fn new(root: &Path) -> IndexHarness {
        let (ds, packed, coded) = write_fixtures(root);
        IndexHarness { ds, on_disk_manifest: packed[0].1.clone(), on_disk_index: packed[1].1.clone(), packed, coded }
    }

    /// The fixtures' own indexes (format 1 packed, format 2 coded).
    pub fn pristine_indexes(&self) -> [&[u8]; 2] {
        [&self.packed[1].1, &self.coded[1].1]
    }

    /// Seed inputs: both fixture indexes under the control bytes that open them, and a few
    /// with a changed sample count or entry (CRCs recomputed).
    pub fn seeds(&self) -> Vec<(String, Vec<u8>)> {
        let [p, c] = self.pristine_indexes();
        let mut v = Vec::new();
        for (name, ix, ctls) in [("packed", p, [0u8, 1, 3]), ("coded", c, [4u8, 5, 7])] {
            for ctl in ctls {
                v.push((format!("{name}-ctl{ctl}"), [&[ctl][..], ix].concat()));
            }
            let mut fewer = ix.to_vec();
            fewer[16] -= 1;
            v.push((format!("{name}-fewer-samples"), [&[ctl_open(name)][..], &fewer].concat()));
            let mut moved = ix.to_vec();
            moved[128 + 32 + 1] ^= 1; // second entry's offset
            v.push((format!("{name}-entry-moved"), [&[ctl_open(name)][..], &moved].concat()));
        }
        v
    }

    /// `data[0]` is a control byte: bit 0 recomputes the index CRCs before writing it; bit 1
    /// writes a manifest that agrees with the index (size, hash, sample count, and the shard
    /// table's names/sizes/hashes) instead of a fixture's; without bit 1, bit 2 picks the coded
    /// fixture's manifest instead of the packed one's. `data[1..]` is index.pdsi.
    /// The index is opened alone (`Index::open`, every lookup, `validate_all`) and, if that
    /// works, as part of the dataset (`Reader::open`, every read, `verify`).
    pub fn run(&mut self, data: &[u8]) {
        let Some((&ctl, ix)) = data.split_first() else { return };
        let mut ix = ix.to_vec();
        if ctl & 1 != 0 {
            fix_index_crcs(&mut ix);
        }
        let ipath = self.ds.join(INDEX);
        write_if_changed(&ipath, &mut self.on_disk_index, &ix);
        let Ok(index) = Index::open(&ipath) else { return };
        exercise_index(&index);
        let _ = (index.version(), index.dict(), index.raw_total());
        let base = if ctl & 4 != 0 { &self.coded[0].1 } else { &self.packed[0].1 };
        let manifest = if ctl & 2 != 0 {
            let mut m: serde_json::Value = serde_json::from_slice(base).unwrap();
            m["index"]["size"] = (ix.len() as u64).into();
            m["index"]["xxh3_128"] = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&ix)).into();
            m["samples"] = (index.len() as u64).into();
            let shards: Vec<serde_json::Value> = index
                .shards()
                .iter()
                .take(64)
                .map(|s| serde_json::json!({"file": s.name, "size": s.size, "samples": 0, "xxh3_128": format!("{:032x}", s.hash)}))
                .collect();
            m["shards"] = shards.into();
            serde_json::to_vec_pretty(&m).unwrap()
        } else {
            base.clone()
        };
        drop(index);
        write_if_changed(&self.ds.join(MANIFEST), &mut self.on_disk_manifest, &manifest);
        if let Ok(r) = Reader::open(&self.ds) {
            exercise_reader(&r);
        }
    }
}

/// The control byte that recomputes CRCs and writes a matching manifest.
fn ctl_open(fixture: &str) -> u8 {
    if fixture == "coded" {
        7
    } else {
        3
    }
}

// ------------------------------------------------------------------------------------------
// Target `dataset`: the input is a list of patches to a fixture's files.

/// Harness for the `dataset` target.
pub struct DatasetHarness {
    root: PathBuf,
    ds: PathBuf,
    dest: PathBuf,
    /// manifest, index (packed), shard-*, zshard-*
    files: Vec<(String, Vec<u8>)>,
    /// the coded fixture's manifest and index
    coded_head: [Vec<u8>; 2],
    on_disk: Vec<Vec<u8>>,
}

/// Applies the patch program in `ops` to `files` (see [`DatasetHarness::run`]).
pub fn apply_patches(files: &mut [(String, Vec<u8>)], mut ops: &[u8]) {
    while ops.len() >= 4 {
        let (sel, pos, kind, n) = (ops[0] as usize, u16::from_le_bytes([ops[1], ops[2]]) as usize, ops[3] >> 6, (ops[3] & 0x3f) as usize);
        ops = &ops[4..];
        let arg = &ops[..n.min(ops.len())];
        ops = &ops[arg.len()..];
        let nfiles = files.len();
        let f = &mut files[sel % nfiles].1;
        match kind {
            0 | 1 => {
                if !f.is_empty() {
                    for (j, x) in arg.iter().enumerate() {
                        let l = f.len();
                        f[(pos + j) % l] ^= x;
                    }
                }
            }
            2 => f.truncate(pos % (f.len() + 1)),
            _ => {
                let at = pos % (f.len() + 1);
                f.splice(at..at, arg.iter().copied());
            }
        }
    }
}

impl DatasetHarness {
    pub fn new(root: &Path) -> DatasetHarness {
        let (ds, packed, coded) = write_fixtures(root);
        let dest = root.join("o1/o2/dest");
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let mut files = packed;
        files.extend(coded[2..].iter().cloned());
        let coded_head = [coded[0].1.clone(), coded[1].1.clone()];
        DatasetHarness { root: root.to_path_buf(), ds, dest, on_disk: files.iter().map(|f| f.1.clone()).collect(), files, coded_head }
    }

    /// Seed inputs: each fixture as it is, with every fix-up flag, and a few patch programs.
    pub fn seeds(&self) -> Vec<(String, Vec<u8>)> {
        let sel = |name: &str| self.files.iter().position(|f| f.0 == name).unwrap() as u8;
        let (sh0, zsh0) = (sel("shard-00000.tar"), sel("zshard-00000.tar"));
        let mut v: Vec<(String, Vec<u8>)> = [0u8, 1, 3, 7, 8, 9, 11, 15].iter().map(|&f| (format!("flags{f}"), vec![f])).collect();
        v.push(("packed-sample-bytes-flipped".into(), vec![0, sh0, 0x00, 0x02, 4, 1, 2, 3, 4]));
        v.push(("coded-frame-bytes-flipped".into(), vec![8, zsh0, 0x10, 0x02, 2, 0x80, 0x01]));
        v.push(("coded-entry-flipped-crc-fixed".into(), vec![8 | 3, 1, 200, 0, 1, 0x01]));
        v.push(("packed-count-changed".into(), vec![3, 1, 16, 0, 1, 0x01]));
        v.push(("coded-shard-truncated-table-fixed".into(), vec![8 | 4 | 1, zsh0, 0x00, 0x02, 0x80]));
        v.push(("packed-header-flipped-crc-fixed".into(), vec![3, sh0, 148, 0, 1, 0x01]));
        v.push(("manifest-insert".into(), vec![0, 0, 10, 0, 0xc1, b'x']));
        v
    }

    /// `data[0]` holds flags; the rest is a patch program: ops of 4 bytes `sel, pos lo, pos hi,
    /// k` followed by `k & 63` argument bytes. `sel` picks the file (modulo the file count: 0
    /// manifest.json, 1 index.pdsi, then shard-*.tar, then zshard-*.tar), `pos` a position
    /// (modulo the length); `k >> 6` is the kind: 0/1 XOR the argument bytes in, 2 truncate at
    /// `pos`, 3 insert the argument bytes at `pos`.
    /// Flag bit 3 starts from the coded fixture's manifest and index (format 2, zstd) instead
    /// of the packed one's (format 1). After the patches, bit 2 makes the index shard table and
    /// the manifest agree with the shard files (size, hash), bit 0 recomputes the index CRCs,
    /// bit 1 (or 2) makes the manifest agree with the index (size, hash, sample count).
    /// Then: `Reader::open`, every read, `verify`, and `unpack` into a fresh directory, after
    /// which nothing may exist outside it and what it wrote must equal the samples.
    pub fn run(&mut self, data: &[u8]) {
        let Some((&flags, ops)) = data.split_first() else { return };
        let mut files = self.files.clone();
        if flags & 8 != 0 {
            files[0].1 = self.coded_head[0].clone();
            files[1].1 = self.coded_head[1].clone();
        }
        apply_patches(&mut files, ops);
        let shard_files = files[2..].to_vec();
        if flags & 4 != 0 {
            fix_index_shard_table(&mut files[1].1, &shard_files);
        }
        if flags & 1 != 0 {
            fix_index_crcs(&mut files[1].1);
        }
        if flags & 6 != 0 {
            if let Some(m) = fix_manifest(&files[0].1, &files[1].1, &shard_files, flags & 4 != 0) {
                files[0].1 = m;
            }
        }
        for (j, (name, bytes)) in files.iter().enumerate() {
            write_if_changed(&self.ds.join(name), &mut self.on_disk[j], bytes);
        }
        let Ok(r) = Reader::open(&self.ds) else { return };
        let all_checked = exercise_reader(&r);
        if self.dest.exists() {
            fs::remove_dir_all(&self.dest).unwrap();
        }
        let unpacked = r.unpack(&self.dest);
        self.check_nothing_escaped();
        if let Ok(count) = unpacked {
            assert_eq!(count, r.len() as u64, "unpack reported {count} files for {} samples", r.len());
            if r.len() <= CAP {
                assert!(all_checked.is_some(), "unpack succeeded although get_checked failed");
                for i in 0..r.len() {
                    let key = r.key(i).unwrap();
                    let on_disk = fs::read(self.dest.join(std::ffi::OsStr::from_bytes(key))).expect("unpacked file is missing");
                    assert_eq!(on_disk, &r.read(i).unwrap()[..], "unpacked file differs from its sample");
                }
            }
        }
    }

    /// Unpack may only have written under `dest`: the scratch root holds exactly `ds` and
    /// `o1/o2/dest`, and `ds` exactly the dataset's files.
    fn check_nothing_escaped(&self) {
        let names = |p: &Path| -> Vec<Vec<u8>> {
            let mut v: Vec<Vec<u8>> = fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().as_bytes().to_vec()).collect();
            v.sort();
            v
        };
        assert_eq!(names(&self.root), vec![b"ds".to_vec(), b"o1".to_vec()], "unpack wrote outside its destination");
        assert_eq!(names(&self.root.join("o1")), vec![b"o2".to_vec()], "unpack wrote outside its destination");
        let o2 = names(&self.root.join("o1/o2"));
        assert!(o2.is_empty() || o2 == vec![b"dest".to_vec()], "unpack wrote outside its destination: {o2:?}");
        let mut want: Vec<Vec<u8>> = self.files.iter().map(|f| f.0.as_bytes().to_vec()).collect();
        want.sort();
        assert_eq!(names(&self.ds), want, "unpack wrote into the dataset directory");
    }
}
