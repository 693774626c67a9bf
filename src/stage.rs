//! Staging: copy a dataset (or one file) to node-local storage, verifying the XXH3-128 of every
//! file in the same pass as the copy, and make it appear atomically.
//!
//! A dataset is copied into a temporary directory next to its final place (the caller names
//! it, e.g. `DEST/.NAME.staging-PID`): the index and the shards in parallel (large sequential
//! reads and writes, each file fsynced), then `manifest.json` last, then the directory is
//! fsynced and renamed into place. A copy that was interrupted is therefore never a directory
//! that `Reader::open` accepts (no manifest) and never at the final path. Policy, locking and
//! the up-to-date check live in `python/packds/stage.py`; what a copy holds, in [`crate::layout`].

use crate::error::{Error, IoContext, Result};
use crate::layout::{self, CopyList, DataFile, MANIFEST_FILE};
use crate::manifest::hex128;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;
use xxhash_rust::xxh3::Xxh3;

/// Size of each read and write.
pub const BUF: usize = 8 << 20;

/// Counters the caller may read while a stage runs (progress), and a cancel switch.
#[derive(Default)]
pub struct StageProgress {
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    /// Files taken from an earlier staged copy instead of copied.
    pub reused: AtomicU64,
    pub cancel: AtomicBool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StageSummary {
    pub path: PathBuf,
    pub bytes: u64,
    pub files: u64,
    pub seconds: f64,
}

/// Copies the packds dataset `src` to `dest` through the temporary directory `tmp` (same
/// filesystem as `dest`; removed first if it exists). `dest` must not exist. Up to `jobs`
/// files are copied at once. On any error `tmp` is removed and nothing appears at `dest`.
///
/// `durable`: fsync every file and directory before the rename (for a destination that
/// outlives the job). A job's `$SLURM_TMPDIR` does not survive a node crash, so there only
/// the page cache matters: an interrupted copy is never renamed into place either way.
pub fn stage_dataset(src: &Path, dest: &Path, tmp: &Path, jobs: usize, durable: bool, progress: &StageProgress) -> Result<StageSummary> {
    stage_dataset_reusing(src, dest, tmp, jobs, durable, progress, None)
}

/// [`stage_dataset`], taking from `previous` (an earlier staged copy of the same dataset, ours,
/// on the same filesystem) every file whose name and size match and whose XXH3-128, read
/// there, is the one the manifest records: hard-linked instead of copied. After a
/// `pack --append`, a re-stage then copies only the new shards and the index.
pub fn stage_dataset_reusing(
    src: &Path,
    dest: &Path,
    tmp: &Path,
    jobs: usize,
    durable: bool,
    progress: &StageProgress,
    previous: Option<&Path>,
) -> Result<StageSummary> {
    let t0 = Instant::now();
    // The manifest is read once (and checked, its file names too); those exact bytes are copied.
    let CopyList { manifest: mbytes, files: mut list } = CopyList::load(src)?;
    // Largest first: the parallel copy then ends with small files and finishes together.
    list.sort_by_key(|j| std::cmp::Reverse(j.size));
    progress.bytes_total.store(list.iter().fold(mbytes.len() as u64, |n, j| n.saturating_add(j.size)), Relaxed);
    progress.files_total.store(list.len() as u64 + 1, Relaxed);

    prepare_tmp_dir(tmp)?;
    let r = copy_all(src, tmp, &list, jobs, durable, progress, previous).and_then(|()| {
        let mp = tmp.join(MANIFEST_FILE);
        write_file(&mp, &mbytes, durable)?;
        progress.bytes_done.fetch_add(mbytes.len() as u64, Relaxed);
        progress.files_done.fetch_add(1, Relaxed);
        if durable {
            crate::fsx::sync_dir(tmp)?;
        }
        rename_into_place(tmp, dest)
    });
    if let Err(e) = r {
        let _ = fs::remove_dir_all(tmp);
        return Err(e);
    }
    Ok(StageSummary { path: dest.to_path_buf(), bytes: progress.bytes_done.load(Relaxed), files: list.len() as u64 + 1, seconds: t0.elapsed().as_secs_f64() })
}

/// Copies one file `src` to `dest` through the temporary file `tmp` (same directory as
/// `dest`): read + write with large buffers, fsync, mode and mtime kept, rename, directory
/// fsync. `dest` is replaced if it exists. On error `tmp` is removed.
pub fn stage_file(src: &Path, dest: &Path, tmp: &Path, durable: bool, progress: &StageProgress) -> Result<StageSummary> {
    let t0 = Instant::now();
    let md = fs::metadata(src).ctx("stat", src)?;
    if !md.is_file() {
        return Err(Error::usage(format!("{} is not a regular file", src.display()), "stage a packds dataset directory, a directory of files, or one file"));
    }
    progress.bytes_total.store(md.len(), Relaxed);
    progress.files_total.store(1, Relaxed);
    remove_own_leftover(tmp)?;
    let stop = AtomicBool::new(false);
    let r = copy_one(src, tmp, None, durable, progress, &stop).and_then(|_| {
        let f = File::open(tmp).ctx("open", tmp)?;
        // The source's mode, less group/world write: no other user may change a staged copy.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(md.permissions().mode() & 0o7755)).ctx("chmod", tmp)?;
        use std::os::unix::fs::MetadataExt;
        let ts = [libc::timespec { tv_sec: md.mtime() as libc::time_t, tv_nsec: md.mtime_nsec() as _ }; 2];
        // SAFETY: valid fd and a 2-element timespec array, as futimens requires.
        unsafe { libc::futimens(f.as_raw_fd(), ts.as_ptr()) };
        fs::rename(tmp, dest).ctx("rename", dest)?;
        if durable {
            crate::fsx::sync_parent(dest)?;
        }
        Ok(())
    });
    if let Err(e) = r {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    progress.files_done.store(1, Relaxed);
    Ok(StageSummary { path: dest.to_path_buf(), bytes: md.len(), files: 1, seconds: t0.elapsed().as_secs_f64() })
}

/// Pulls `files` into the page cache: `posix_fadvise(WILLNEED)`, then sequential 8 MiB reads
/// (the advice alone is asynchronous and may be dropped), up to `jobs` files at once.
/// Regular files only (a FIFO or a device is refused), each read up to its size.
/// Returns the number of bytes read.
pub fn preload(files: &[PathBuf], jobs: usize, progress: &StageProgress) -> Result<u64> {
    let sized: Vec<(PathBuf, Option<u64>)> = files.iter().map(|p| (p.clone(), None)).collect();
    preload_sized(&sized, jobs, progress)
}

/// [`preload`] of files whose size is known (a dataset's files, from its manifest): a file of
/// another size is refused (FormatError naming it) and never read past that size plus one byte.
pub fn preload_sized(files: &[(PathBuf, Option<u64>)], jobs: usize, progress: &StageProgress) -> Result<u64> {
    let next = AtomicUsize::new(0);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let total = AtomicU64::new(0);
    let work = || {
        let mut buf = vec![0u8; BUF];
        loop {
            let i = next.fetch_add(1, Relaxed);
            if i >= files.len() || progress.cancel.load(Relaxed) {
                return;
            }
            let (p, want) = &files[i];
            let r = (|| -> Result<u64> {
                let (f, len) = layout::open_data_file(p, |e| Error::io("open", p, e))?;
                let size = match *want {
                    Some(w) if w != len => return Err(size_differs(p, len, w)),
                    _ => len,
                };
                // SAFETY: advisory calls on a descriptor we own.
                unsafe {
                    libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
                    libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
                }
                let mut f = f.take(size.saturating_add(1));
                let mut n = 0u64;
                loop {
                    let got = read_retry(&mut f, &mut buf).ctx("read", p)?;
                    if got == 0 {
                        return if want.is_some() && n != size { Err(size_differs(p, n, size)) } else { Ok(n) };
                    }
                    n += got as u64;
                    if n > size {
                        return Err(Error::format(p, format!("is larger than {size} bytes (replaced or growing)")));
                    }
                    progress.bytes_done.fetch_add(got as u64, Relaxed);
                    if progress.cancel.load(Relaxed) {
                        return Err(Error::Cancelled);
                    }
                }
            })();
            match r {
                Ok(n) => {
                    total.fetch_add(n, Relaxed);
                    progress.files_done.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    first_err.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                    progress.cancel.store(true, Relaxed);
                    return;
                }
            }
        }
    };
    run_workers(jobs, files.len(), "packds-preload", &work);
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(total.load(Relaxed))
}

/// Runs `work` on up to `jobs` threads (at most 64, no more than there are items), the calling
/// thread one of them.
fn run_workers<F: Fn() + Sync>(jobs: usize, items: usize, name: &str, work: &F) {
    crate::pool::run_with_caller(jobs.clamp(1, 64).min(items.max(1)), name, work);
}

/// Removes what is at `tmp` (a leftover of ours), refusing anything another user owns.
fn remove_own_leftover(tmp: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    match fs::symlink_metadata(tmp) {
        Ok(md) if md.uid() != crate::layout::euid() => Err(Error::usage(
            format!("{} exists and is owned by {}; packds leaves it alone", tmp.display(), crate::layout::describe_uid(md.uid())),
            "stage into a directory only you can write (e.g. $SLURM_TMPDIR), or ask its owner to remove it",
        )),
        Ok(md) if md.is_dir() => fs::remove_dir_all(tmp).ctx("remove", tmp),
        Ok(_) => fs::remove_file(tmp).ctx("remove", tmp),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("stat", tmp, e)),
    }
}

/// A fresh temporary directory of ours, mode 755 whatever the umask (no other user may write
/// into a staged copy: that is what lets a later stage trust it).
fn prepare_tmp_dir(tmp: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    remove_own_leftover(tmp)?;
    fs::create_dir(tmp).ctx("create directory", tmp)?;
    fs::set_permissions(tmp, fs::Permissions::from_mode(0o755)).ctx("chmod", tmp)
}

fn copy_all(src: &Path, tmp: &Path, list: &[DataFile], jobs: usize, durable: bool, progress: &StageProgress, previous: Option<&Path>) -> Result<()> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let work = || loop {
        let i = next.fetch_add(1, Relaxed);
        if i >= list.len() || stop.load(Relaxed) {
            return;
        }
        let j = &list[i];
        let (s, d) = (src.join(&j.name), tmp.join(&j.name));
        if previous.is_some_and(|p| reuse_one(&p.join(&j.name), &d, j)) {
            progress.bytes_done.fetch_add(j.size, Relaxed);
            progress.files_done.fetch_add(1, Relaxed);
            progress.reused.fetch_add(1, Relaxed);
            continue;
        }
        match copy_one(&s, &d, Some(j), durable, progress, &stop) {
            Ok(_) => {
                progress.files_done.fetch_add(1, Relaxed);
            }
            Err(e) => {
                first_err.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                stop.store(true, Relaxed);
                return;
            }
        }
    };
    run_workers(jobs, list.len(), "packds-stage", &work);
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Hard-links `prev` (a file of an earlier staged copy) as `dst` when it is a regular file of
/// the size and XXH3-128 `j` records; false (nothing done) otherwise.
fn reuse_one(prev: &Path, dst: &Path, j: &DataFile) -> bool {
    let Ok(md) = fs::symlink_metadata(prev) else { return false };
    if !md.is_file() || md.len() != j.size {
        return false;
    }
    match crate::fsx::hash_file(prev) {
        Ok(h) if crate::manifest::hex128(h) == j.xxh3_128 => fs::hard_link(prev, dst).is_ok(),
        _ => false,
    }
}

/// Copies `src` to the new file `dst` with large reads and writes, hashing in the same pass;
/// fsyncs `dst`. With `expect`, checks the size and XXH3-128 (ChecksumError names the shard).
fn copy_one(src: &Path, dst: &Path, expect: Option<&DataFile>, durable: bool, progress: &StageProgress, stop: &AtomicBool) -> Result<u128> {
    // A regular file only (a FIFO would block, a device never end), opened without blocking.
    let (f, len) = layout::open_data_file(src, |e| {
        if e.kind() == ErrorKind::NotFound && expect.is_some() {
            Error::format(src, "file listed in manifest.json is missing")
        } else {
            Error::io("open", src, e)
        }
    })?;
    // The size to copy: what the manifest records (or the file's size), nothing is read past
    // it but one byte, to see a file that is larger (or growing).
    let size = match expect {
        Some(j) if len != j.size => return Err(size_differs(src, len, j.size)),
        Some(j) => j.size,
        None => len,
    };
    // SAFETY: advisory call on a descriptor we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    let mut f = f.take(size.saturating_add(1));
    let mut out = OpenOptions::new().write(true).create_new(true).mode(0o644).open(dst).ctx("create", dst)?;
    let mut buf = vec![0u8; BUF];
    let mut h = Xxh3::new();
    let mut n = 0u64;
    loop {
        if progress.cancel.load(Relaxed) {
            return Err(Error::Cancelled);
        }
        if stop.load(Relaxed) {
            // Another file failed; this copy is abandoned (the caller removes the directory).
            return Err(Error::Cancelled);
        }
        let got = fill(&mut f, &mut buf, src)?;
        if got == 0 {
            break;
        }
        if n + got as u64 > size {
            return Err(match expect {
                Some(j) => Error::format(src, format!("is larger than the {} bytes manifest.json says (replaced or growing)", j.size)),
                None => Error::usage(format!("{} grew while it was copied", src.display()), "stage it again once nothing writes it"),
            });
        }
        // Ask for the next buffers now, so the disk reads ahead while this one is hashed and
        // written (plain readahead windows are far smaller than a MiB-sized read).
        // SAFETY: advisory call on a descriptor we own.
        unsafe { libc::posix_fadvise(f.get_ref().as_raw_fd(), (n + got as u64) as libc::off_t, 2 * BUF as libc::off_t, libc::POSIX_FADV_WILLNEED) };
        h.update(&buf[..got]);
        out.write_all(&buf[..got]).ctx("write", dst)?;
        // Start writeback of what was just written now, so the fsync at the end finds little
        // left to do and the kernel's dirty-page throttling does not stall the copy.
        if durable {
            // SAFETY: plain syscall on a descriptor we own.
            unsafe { libc::sync_file_range(out.as_raw_fd(), n as libc::off64_t, got as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE) };
        }
        n += got as u64;
        let done = progress.bytes_done.fetch_add(got as u64, Relaxed) + got as u64;
        crate::fault::stage_copied(done);
        if got < buf.len() {
            break;
        }
    }
    let digest = h.digest128();
    check_copied(src, expect, n, size, digest)?;
    if durable {
        out.sync_all().ctx("fsync", dst)?;
    }
    Ok(digest)
}

/// Fills `buf` from `f` (large writes follow), stopping early only at end of file.
fn fill(f: &mut impl Read, buf: &mut [u8], src: &Path) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let r = read_retry(f, &mut buf[got..]).ctx("read", src)?;
        if r == 0 {
            break;
        }
        got += r;
    }
    Ok(got)
}

/// The copy of `src` has `n` bytes with this digest: exactly the `size` expected and, with a
/// manifest record, its XXH3-128.
fn check_copied(src: &Path, expect: Option<&DataFile>, n: u64, size: u64, digest: u128) -> Result<()> {
    if n != size {
        return Err(match expect {
            Some(j) => size_differs(src, n, j.size),
            None => Error::usage(format!("{} shrank while it was copied", src.display()), "stage it again once nothing writes it"),
        });
    }
    match expect {
        Some(j) if hex128(digest) != j.xxh3_128 => {
            Err(Error::Checksum { key: format!("{} (XXH3-128 of the whole file differs from manifest.json)", j.name), shard: src.to_path_buf() })
        }
        _ => Ok(()),
    }
}

fn size_differs(src: &Path, n: u64, want: u64) -> Error {
    Error::format(src, format!("is {n} bytes, manifest.json says {want} (truncated or replaced)"))
}

fn read_retry(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match f.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn write_file(path: &Path, data: &[u8], durable: bool) -> Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o644).open(path).ctx("create", path)?;
    f.write_all(data).ctx("write", path)?;
    if durable {
        f.sync_all().ctx("fsync", path)?;
    }
    Ok(())
}

fn rename_into_place(tmp: &Path, dest: &Path) -> Result<()> {
    // rename(2) of a directory onto an existing non-empty directory fails (ENOTEMPTY/EEXIST):
    // the caller removes a stale copy first, under its lock.
    fs::rename(tmp, dest).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => {
            Error::usage(format!("{} already exists", dest.display()), "remove it, or stage to another directory with --to")
        }
        _ => Error::io("rename", dest, e),
    })?;
    crate::fsx::sync_parent(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_dataset(dir: &Path) -> PathBuf {
        let src = dir.join("tree");
        for i in 0..50u32 {
            let p = src.join(format!("d{}/f{i}.bin", i % 3));
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, vec![i as u8; (i as usize) * 997]).unwrap();
        }
        let out = dir.join("ds.pds");
        let mut o = crate::pack::PackOptions::new(vec![src], out.clone());
        o.shard_size = 16 << 10;
        crate::pack::pack(&o, &crate::pack::Progress::default()).unwrap();
        out
    }

    #[test]
    fn stage_copies_and_verifies() {
        let t = tempfile::tempdir().unwrap();
        let src = make_dataset(t.path());
        let dest_dir = t.path().join("local");
        fs::create_dir(&dest_dir).unwrap();
        let dest = dest_dir.join("ds.pds");
        let p = StageProgress::default();
        let s = stage_dataset(&src, &dest, &dest_dir.join(".ds.pds.staging-1"), 3, true, &p).unwrap();
        assert_eq!(s.bytes, p.bytes_total.load(Relaxed));
        assert!(!dest_dir.join(".ds.pds.staging-1").exists());
        let r = crate::read::Reader::open(&dest).unwrap();
        assert!(r.verify().unwrap().problems.is_empty());
        assert_eq!(fs::read(dest.join("manifest.json")).unwrap(), fs::read(src.join("manifest.json")).unwrap());
    }

    #[test]
    fn corrupt_source_fails_and_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let src = make_dataset(t.path());
        let shard = src.join("shard-00001.tar");
        let mut b = fs::read(&shard).unwrap();
        b[700] ^= 1;
        fs::write(&shard, b).unwrap();
        let dest = t.path().join("ds2.pds");
        let tmp = t.path().join(".ds2.staging");
        let e = stage_dataset(&src, &dest, &tmp, 4, false, &StageProgress::default()).unwrap_err();
        assert!(matches!(&e, Error::Checksum { shard, .. } if shard.ends_with("shard-00001.tar")), "{e}");
        assert!(!dest.exists() && !tmp.exists());
    }

    #[test]
    fn copies_read_at_most_one_byte_past_the_recorded_size() {
        // A regular file that holds more than its size says (a /proc file: size 0).
        let t = tempfile::tempdir().unwrap();
        let src = Path::new("/proc/self/mountinfo");
        assert_eq!(fs::metadata(src).unwrap().len(), 0);
        let j = DataFile { name: "shard-00000.tar".into(), size: 0, xxh3_128: hex128(0) };
        let dst = t.path().join("x");
        let e = copy_one(src, &dst, Some(&j), false, &StageProgress::default(), &AtomicBool::new(false)).unwrap_err().to_string();
        assert!(e.contains("is larger than the 0 bytes manifest.json says"), "{e}");
        assert_eq!(fs::metadata(&dst).unwrap().len(), 0);
        let e = stage_file(src, &t.path().join("y"), &t.path().join(".y.tmp"), false, &StageProgress::default()).unwrap_err().to_string();
        assert!(e.contains("grew while it was copied"), "{e}");
        assert!(!t.path().join("y").exists() && !t.path().join(".y.tmp").exists());
        let e = preload_sized(&[(src.to_path_buf(), Some(0))], 1, &StageProgress::default()).unwrap_err().to_string();
        assert!(e.contains("is larger than 0 bytes"), "{e}");
        // A device is refused before anything is read.
        let e = preload(&[PathBuf::from("/dev/zero")], 1, &StageProgress::default()).unwrap_err().to_string();
        assert!(e.contains("is a character device, not a regular file"), "{e}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("shard-00000.tar");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let j = DataFile { name: "shard-00000.tar".into(), size: 10, xxh3_128: hex128(0) };
        let e = copy_one(&fifo, &t.path().join("x"), Some(&j), false, &StageProgress::default(), &AtomicBool::new(false)).unwrap_err().to_string();
        assert!(e.contains("is a FIFO (named pipe), not a regular file"), "{e}");
        let e = preload(&[fifo], 1, &StageProgress::default()).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
    }

    #[test]
    fn stage_file_keeps_bytes_and_mtime() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a.h5");
        fs::write(&a, vec![7u8; BUF + 123]).unwrap();
        let b = t.path().join("b.h5");
        stage_file(&a, &b, &t.path().join(".b.tmp"), true, &StageProgress::default()).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        let (ma, mb) = (fs::metadata(&a).unwrap(), fs::metadata(&b).unwrap());
        assert_eq!(ma.modified().unwrap(), mb.modified().unwrap());
        let n = preload(&[a, b], 2, &StageProgress::default()).unwrap();
        assert_eq!(n, 2 * (BUF as u64 + 123));
    }
}
