//! Sources that change while they are packed.
//!
//! A file's [`Stamp`] (size, mtime and ctime in ns, inode and device) is taken by `fstat` before
//! and after it is read; a file whose stamp moved is read again (at most [`READ_TRIES`] times)
//! and then is a `Changed` error. A write that began just before the first `fstat` may still be
//! copying bytes while the timestamps no longer move, so a file changed in the last
//! [`RECENT_NS`] is read twice, the second time no sooner than [`SETTLE_NS`] after its ctime,
//! and taken only when both reads have the same CRC32C and the stamp held. Files not changed
//! recently (the normal case) cost one `fstat` more.
//!
//! For `--resume`, every completed shard has a record of its files as they were read (size and
//! mtime in ns, [`STAMP_LEN`] bytes a file, beside its per-shard index); a resume stats the
//! files of the completed shards again, in parallel, and refuses when any differs.

use crate::error::{Error, IoContext, Result};
use crate::fsx;
use crate::pool;
use crate::walk::{FileList, SourceRoot};
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Reads of a file that keeps changing before it is a `Changed` error.
pub(super) const READ_TRIES: u32 = 3;
/// A file whose ctime is this close to the (coarse) clock may still be being written.
const RECENT_NS: i64 = 2_000_000_000;
/// The second read of a recently changed file starts at least this long after its ctime.
const SETTLE_NS: i64 = 50_000_000;

/// What `fstat` says of a file's identity and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

fn ns(s: i64, n: i64) -> i64 {
    s.saturating_mul(1_000_000_000).saturating_add(n)
}

impl Stamp {
    /// The stamp of a sample handed over as bytes (no file: only its size).
    pub fn of_bytes(size: u64) -> Stamp {
        Stamp { size, mtime_ns: 0, ctime_ns: 0, ino: 0, dev: 0 }
    }

    pub fn of(md: &fs::Metadata) -> Stamp {
        Stamp { size: md.len(), mtime_ns: ns(md.mtime(), md.mtime_nsec()), ctime_ns: ns(md.ctime(), md.ctime_nsec()), ino: md.ino(), dev: md.dev() }
    }

    /// The stamp of an open file now.
    pub fn now(f: &File, path: &Path) -> Result<Stamp> {
        Ok(Stamp::of(&f.metadata().ctx("stat", path)?))
    }

    /// Changed (ctime) within [`RECENT_NS`] of the coarse clock, or in its future: a write may
    /// still be going on without moving the timestamps again.
    pub fn recent(&self) -> bool {
        self.ctime_ns >= coarse_now_ns().saturating_sub(RECENT_NS)
    }

    /// What differs between two stamps of one file, e.g. "size, mtime".
    fn diff(&self, o: &Stamp) -> String {
        let mut v = Vec::new();
        for (name, differs) in [
            ("size", self.size != o.size),
            ("mtime", self.mtime_ns != o.mtime_ns),
            ("ctime", self.ctime_ns != o.ctime_ns),
            ("inode", (self.ino, self.dev) != (o.ino, o.dev)),
        ] {
            if differs {
                v.push(name);
            }
        }
        v.join(", ")
    }

    /// Ok when `after` (taken after a read) equals this stamp, else the `Changed` error.
    pub fn check(&self, after: &Stamp, path: &Path) -> Result<()> {
        if self == after {
            return Ok(());
        }
        Err(changed(path, &format!("{} moved", self.diff(after))))
    }
}

/// The error of a file that changed while it was read.
pub(super) fn changed(path: &Path, detail: &str) -> Error {
    Error::Changed { path: path.to_path_buf(), what: format!("it changed while it was read ({detail})") }
}

/// CLOCK_REALTIME_COARSE in ns (what the kernel stamps files with).
fn coarse_now_ns() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } != 0 {
        return i64::MAX; // no clock: treat every file as recent (safe, slower)
    }
    ns(ts.tv_sec, ts.tv_nsec)
}

/// CLOCK_REALTIME in ns.
fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// The pause before read number `attempt` (1, 2, ...) of a file that changed.
pub(super) fn backoff(attempt: u32) {
    std::thread::sleep(Duration::from_millis(5 << attempt.min(6)));
}

/// The second read of a recently changed file: the CRC32C of its `size` bytes (read with
/// `pread` in `scratch`-sized pieces), a `Changed` error when it is shorter or longer.
pub(super) fn crc_again(f: &File, path: &Path, size: u64, scratch: &mut Vec<u8>) -> Result<u32> {
    if scratch.len() < 1 << 16 {
        scratch.resize(1 << 16, 0);
    }
    let (mut at, mut crc) = (0u64, 0u32);
    while at < size {
        let want = (size - at).min(scratch.len() as u64) as usize;
        let got = f.read_at(&mut scratch[..want], at).ctx("read", path)?;
        if got == 0 {
            return Err(changed(path, "it shrank"));
        }
        crc = crc32c::crc32c_append(crc, &scratch[..got]);
        at += got as u64;
    }
    if f.read_at(&mut scratch[..1], size).ctx("read", path)? != 0 {
        return Err(changed(path, "it grew"));
    }
    Ok(crc)
}

/// The second read of a recently changed file, compared with the first (`crc`, `before`). It
/// starts no sooner than [`SETTLE_NS`] after the file's ctime: a writer stopped in the middle
/// of a write (the timestamps move when a write begins) has that long to go on, and a torn file
/// read twice in the meantime reads the same.
pub(super) fn confirm(f: &File, path: &Path, before: &Stamp, crc: u32, scratch: &mut Vec<u8>) -> Result<()> {
    let wait = before.ctime_ns.saturating_add(SETTLE_NS).saturating_sub(now_ns());
    if wait > 0 {
        // Capped: a clock behind the file server's would otherwise wait for a long time.
        std::thread::sleep(Duration::from_nanos(wait.min(SETTLE_NS) as u64));
    }
    let again = crc_again(f, path, before.size, scratch)?;
    before.check(&Stamp::now(f, path)?, path)?;
    if again != crc {
        return Err(changed(path, "two reads differ"));
    }
    Ok(())
}

/// Bytes per file in a shard's stamp record: size, then mtime in ns (little-endian).
pub(super) const STAMP_LEN: usize = 16;
/// A file's record in a shard's stamps: size, mtime in ns.
pub(super) type SizeMtime = (u64, i64);

/// Stamps only (a state written before hard links and sparse files were recorded).
const MAGIC: &[u8; 8] = b"PDSSTMP1";
/// Stamps, then the shard's [`ShardExtra`]: u64 sparse files, u64 links, (u32, u32) per link.
const MAGIC2: &[u8; 8] = b"PDSSTMP2";

/// What a completed shard holds besides its samples: its hard links (pairs of positions in
/// the shard: the first name, another name sharing its data) and how many sparse files it has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ShardExtra {
    pub links: Vec<(u32, u32)>,
    pub sparse: u64,
}

/// Appends one file's record (see [`STAMP_LEN`]).
pub(super) fn push_record(out: &mut Vec<u8>, s: &Stamp) {
    out.extend_from_slice(&s.size.to_le_bytes());
    out.extend_from_slice(&s.mtime_ns.to_le_bytes());
}

/// Writes a shard's records (`records`: [`STAMP_LEN`] bytes a file) and `extra` to `path`,
/// atomically.
pub(super) fn write_records(path: &Path, records: &[u8], extra: &ShardExtra) -> Result<()> {
    let mut b = Vec::with_capacity(records.len() + 40 + extra.links.len() * 8);
    b.extend_from_slice(MAGIC2);
    b.extend_from_slice(&((records.len() / STAMP_LEN) as u64).to_le_bytes());
    b.extend_from_slice(records);
    b.extend_from_slice(&extra.sparse.to_le_bytes());
    b.extend_from_slice(&(extra.links.len() as u64).to_le_bytes());
    for &(a, o) in &extra.links {
        b.extend_from_slice(&a.to_le_bytes());
        b.extend_from_slice(&o.to_le_bytes());
    }
    let h = xxhash_rust::xxh3::xxh3_64(&b);
    b.extend_from_slice(&h.to_le_bytes());
    fsx::write_atomic(path, &b)
}

/// A shard's records and extra as written by [`write_records`] (a state of an older packds has
/// no extra: none); None when the file is not there.
pub(super) fn read_records(path: &Path, files: usize) -> Result<Option<(Vec<SizeMtime>, ShardExtra)>> {
    let b = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    let bad = || Error::format(path, "damaged record of the packed files");
    if b.len() < 24 || (&b[..8] != MAGIC && &b[..8] != MAGIC2) {
        return Err(bad());
    }
    let (body, tail) = b.split_at(b.len() - 8);
    if xxhash_rust::xxh3::xxh3_64(body).to_le_bytes() != tail {
        return Err(bad());
    }
    let n = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let le = |x: &[u8]| u64::from_le_bytes(x.try_into().expect("8 bytes"));
    let recs_end = files.checked_mul(STAMP_LEN).and_then(|l| l.checked_add(16)).filter(|&e| e <= body.len()).ok_or_else(bad)?;
    let (recs, rest) = (&body[16..recs_end], &body[recs_end..]);
    let mut extra = ShardExtra::default();
    if &b[..8] == MAGIC2 {
        if rest.len() < 16 {
            return Err(bad());
        }
        extra.sparse = le(&rest[..8]);
        let nl = le(&rest[8..16]);
        let links = &rest[16..];
        if nl.checked_mul(8) != Some(links.len() as u64) {
            return Err(bad());
        }
        let u = |x: &[u8]| u32::from_le_bytes(x.try_into().expect("4 bytes"));
        extra.links = links.chunks_exact(8).map(|l| (u(&l[..4]), u(&l[4..]))).collect();
    } else if !rest.is_empty() {
        return Err(bad());
    }
    if n != files as u64 {
        return Err(bad());
    }
    Ok(Some((recs.chunks_exact(STAMP_LEN).map(|r| (le(&r[..8]), le(&r[8..]) as i64)).collect(), extra)))
}

/// Files of a resumed pack that are no longer as they were packed: how many, and the first few
/// (in key order) with what changed.
pub(super) struct Moved {
    pub count: usize,
    pub first: Vec<(PathBuf, String)>,
}

/// How many changed files a refused resume names.
const NAMED: usize = 5;

/// Stats files `start..start + want.len()` of `files` again (on `threads` threads: on a network
/// filesystem each stat is a round-trip) and compares them with `want` (size, mtime ns).
pub(super) fn restat(files: &FileList, roots: &[SourceRoot], start: usize, want: &[(u64, i64)], follow: bool, threads: usize) -> Moved {
    const PIECE: usize = 256;
    let next = AtomicUsize::new(0);
    let found: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());
    let work = || {
        let mut mine = Vec::new();
        loop {
            let a = next.fetch_add(PIECE, Relaxed);
            if a >= want.len() {
                break;
            }
            for (j, &(size, mtime_ns)) in want.iter().enumerate().take((a + PIECE).min(want.len())).skip(a) {
                let path = files.path(start + j, roots);
                let md = if follow { fs::metadata(&path) } else { fs::symlink_metadata(&path) };
                let what = match md {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("deleted".to_string()),
                    Err(e) => Some(format!("cannot stat: {e}")),
                    Ok(md) if !md.is_file() => Some("no longer a regular file".to_string()),
                    Ok(md) if md.len() != size => Some(format!("size {size} -> {}", md.len())),
                    Ok(md) if ns(md.mtime(), md.mtime_nsec()) != mtime_ns => Some("modified (mtime)".to_string()),
                    Ok(_) => None,
                };
                if let Some(w) = what {
                    mine.push((start + j, w));
                }
            }
        }
        if !mine.is_empty() {
            found.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
        }
    };
    pool::run_with_caller(threads.clamp(1, 64).min(want.len().div_ceil(PIECE)), "packds-stat", &work);
    let mut v = found.into_inner().unwrap_or_else(|p| p.into_inner());
    v.sort_by_key(|(i, _)| *i);
    Moved { count: v.len(), first: v.into_iter().take(NAMED).map(|(i, w)| (files.path(i, roots), w)).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_found() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.stamps");
        let mut r = Vec::new();
        let s = Stamp { size: 7, mtime_ns: -3, ctime_ns: 0, ino: 1, dev: 2 };
        push_record(&mut r, &s);
        push_record(&mut r, &Stamp { size: 1 << 40, mtime_ns: 1_700_000_000_123_456_789, ..s });
        let extra = ShardExtra { links: vec![(0, 1)], sparse: 1 };
        write_records(&p, &r, &extra).unwrap();
        assert_eq!(read_records(&p, 2).unwrap().unwrap(), (vec![(7, -3), (1 << 40, 1_700_000_000_123_456_789)], extra));
        assert!(read_records(&p, 3).is_err(), "another count");
        let mut b = fs::read(&p).unwrap();
        b[20] ^= 1;
        fs::write(&p, &b).unwrap();
        assert!(read_records(&p, 2).is_err(), "a flipped bit");
        assert!(read_records(&d.path().join("none"), 2).unwrap().is_none());
        // A state written before the extra was recorded: stamps only, no links, no sparse files.
        let mut old = MAGIC.to_vec();
        old.extend_from_slice(&1u64.to_le_bytes());
        old.extend_from_slice(&r[..STAMP_LEN]);
        let h = xxhash_rust::xxh3::xxh3_64(&old);
        old.extend_from_slice(&h.to_le_bytes());
        fs::write(&p, &old).unwrap();
        assert_eq!(read_records(&p, 1).unwrap().unwrap(), (vec![(7, -3)], ShardExtra::default()));
    }

    #[test]
    fn a_file_written_now_is_recent_an_old_one_is_not() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, b"abc").unwrap();
        let f = File::open(&p).unwrap();
        let s = Stamp::now(&f, &p).unwrap();
        assert!(s.recent());
        assert!(!Stamp { ctime_ns: s.ctime_ns - 3 * RECENT_NS, ..s }.recent());
        assert_eq!(crc_again(&f, &p, 3, &mut Vec::new()).unwrap(), crc32c::crc32c(b"abc"));
        assert!(crc_again(&f, &p, 2, &mut Vec::new()).unwrap_err().to_string().contains("grew"));
        assert!(crc_again(&f, &p, 4, &mut Vec::new()).unwrap_err().to_string().contains("shrank"));
        let moved = Stamp { mtime_ns: s.mtime_ns + 1, ..s };
        let e = s.check(&moved, &p).unwrap_err().to_string();
        assert!(e.contains("it changed while it was read (mtime moved)"), "{e}");
    }

    #[test]
    fn restat_names_what_changed_in_key_order() {
        let d = tempfile::tempdir().unwrap();
        let mut files = FileList::default();
        let mut want = Vec::new();
        for i in 0..600 {
            let k = format!("f{i:04}");
            fs::write(d.path().join(&k), b"x").unwrap();
            let md = fs::metadata(d.path().join(&k)).unwrap();
            files.push(k.as_bytes(), 0);
            want.push((md.len(), ns(md.mtime(), md.mtime_nsec())));
        }
        let roots = [SourceRoot { path: d.path().to_path_buf(), is_file: false }];
        assert_eq!(restat(&files, &roots, 0, &want, false, 4).count, 0);
        fs::write(d.path().join("f0500"), b"xy").unwrap();
        fs::remove_file(d.path().join("f0007")).unwrap();
        want[300].1 += 1;
        let m = restat(&files, &roots, 0, &want, false, 4);
        assert_eq!(m.count, 3);
        let got: Vec<_> = m.first.iter().map(|(p, w)| (p.file_name().unwrap().to_string_lossy().into_owned(), w.as_str())).collect();
        assert_eq!(got, [("f0007".into(), "deleted"), ("f0300".into(), "modified (mtime)"), ("f0500".into(), "size 1 -> 2")]);
    }
}
