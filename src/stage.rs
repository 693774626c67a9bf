//! Staging: copy a dataset (or one file) to node-local storage, verifying the XXH3-128 of every
//! file in the same pass as the copy, and make it appear atomically.
//!
//! A dataset is copied into a temporary directory next to its final place (the caller names
//! it, e.g. `DEST/.NAME.staging-PID`): the index and the shards in 512 KiB chunks at their
//! offsets by `jobs` threads (one reads while another writes; a large shard's ranges in
//! parallel), each file's hash fed in order; for a durable copy, writeback started as ranges
//! complete and one fsync pass over the files at the end; then `manifest.json` last, then
//! the directory is fsynced and renamed into place. A copy that was interrupted is therefore never a directory
//! that `Reader::open` accepts (no manifest) and never at the final path. Policy, locking and
//! the up-to-date check live in `python/packds/stage.py`; what a copy holds, in [`crate::layout`].

use crate::error::{Error, IoContext, Result};
use crate::layout::{self, CopyList, DataFile, MANIFEST_FILE};
use crate::manifest::hex128;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use xxhash_rust::xxh3::Xxh3;

/// Size of each read and write (a copy's chunk): small enough that a chunk read, hashed and
/// written stays in the CPU caches. With 8 MiB buffers the kernel's copy into the page cache
/// ran ten times slower (from memory instead of cache) than with 1 MiB or less.
pub const BUF: usize = 512 << 10;

/// How far ahead of the chunks being copied the source is asked for (`POSIX_FADV_WILLNEED`),
/// advised once per range of this size; also how often (in bytes copied) the staging fault
/// switches are consulted.
const AHEAD: u64 = 8 << 20;

/// A durable copy starts the writeback of each range this large once all of it is written.
const WRITEBACK: u64 = 64 << 20;

/// Counters the caller may read while a stage runs (progress), and a cancel switch.
#[derive(Default)]
pub struct StageProgress {
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    /// Files taken from an earlier staged copy instead of copied.
    pub reused: AtomicU64,
    /// Bytes actually read from the files copied or preloaded (a preload skips what is
    /// already in the page cache).
    pub bytes_read: AtomicU64,
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
    let r = copy_one(src, tmp, None, md.len(), durable, progress).and_then(|()| {
        let f = File::open(tmp).ctx("open", tmp)?;
        if durable {
            f.sync_all().ctx("fsync", tmp)?;
        }
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

/// Pulls `files` into the page cache, up to `jobs` files at once: each BUF-sized range that
/// `mincore` does not show wholly resident is read (after `posix_fadvise(WILLNEED)`, which
/// alone is asynchronous and may be dropped); what is resident already (e.g. a copy just
/// written) is not read again. Regular files only (a FIFO or a device is refused), each up to
/// its size. Returns the number of bytes now in the page cache (the files' sizes);
/// `progress.bytes_read` counts those that had to be read.
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
                let resident = Residency::of(&f, size);
                if !resident.as_ref().is_some_and(|r| r.all(0, size)) {
                    // SAFETY: advisory calls on a descriptor we own.
                    unsafe {
                        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
                        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
                    }
                }
                let mut off = 0u64;
                while off < size {
                    let len = (size - off).min(BUF as u64);
                    if !resident.as_ref().is_some_and(|r| r.all(off, len)) {
                        let got = pread_full(&f, &mut buf[..len as usize], off, p)?;
                        progress.bytes_read.fetch_add(got as u64, Relaxed);
                        if (got as u64) < len {
                            return if want.is_some() { Err(size_differs(p, off + got as u64, size)) } else { Ok(off + got as u64) };
                        }
                    }
                    off += len;
                    progress.bytes_done.fetch_add(len, Relaxed);
                    if progress.cancel.load(Relaxed) {
                        return Err(Error::Cancelled);
                    }
                }
                if pread_full(&f, &mut buf[..1], size, p)? > 0 {
                    return Err(Error::format(p, format!("is larger than {size} bytes (replaced or growing)")));
                }
                Ok(size)
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

/// A read-only mapping of a file, to ask `mincore` which of its pages are in the page cache
/// (nothing is read through it).
struct Residency {
    addr: *mut libc::c_void,
    len: usize,
    page: usize,
}

impl Residency {
    /// None when it cannot tell (the file is then read).
    fn of(f: &File, size: u64) -> Option<Residency> {
        let len = usize::try_from(size).ok().filter(|&l| l > 0)?;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok().filter(|&p| p > 0)?;
        // SAFETY: a fresh shared read-only mapping of a descriptor we own; unmapped in Drop and
        // never dereferenced.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0) };
        (addr != libc::MAP_FAILED).then_some(Residency { addr, len, page })
    }

    /// Whether every page of `[off, off + len)` is resident (false when mincore fails).
    fn all(&self, off: u64, len: u64) -> bool {
        let start = (off as usize / self.page) * self.page;
        let end = ((off + len) as usize).min(self.len);
        if end <= start {
            return true;
        }
        let mut vec = vec![0u8; (end - start).div_ceil(self.page)];
        // SAFETY: the range lies within our mapping, start is page-aligned, and vec holds one
        // byte per page of it.
        let r = unsafe { libc::mincore(self.addr.cast::<u8>().add(start).cast(), end - start, vec.as_mut_ptr()) };
        r == 0 && vec.iter().all(|b| b & 1 == 1)
    }
}

impl Drop for Residency {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `of`, unmapped once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
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

/// Copies `list` from `src` into `tmp` ([`copy_files`]), first taking from `previous` what it
/// holds intact; with `durable`, then fsyncs every copied file (one pass at the end: their
/// writeback ran while the rest was copied).
fn copy_all(src: &Path, tmp: &Path, list: &[DataFile], jobs: usize, durable: bool, progress: &StageProgress, previous: Option<&Path>) -> Result<()> {
    let mut todo: Vec<&DataFile> = list.iter().collect();
    if let Some(prev) = previous {
        let next = AtomicUsize::new(0);
        let linked: Vec<AtomicBool> = list.iter().map(|_| AtomicBool::new(false)).collect();
        let work = || loop {
            let i = next.fetch_add(1, Relaxed);
            let Some(j) = list.get(i) else { return };
            if progress.cancel.load(Relaxed) {
                return;
            }
            if reuse_one(&prev.join(&j.name), &tmp.join(&j.name), j) {
                linked[i].store(true, Relaxed);
                progress.bytes_done.fetch_add(j.size, Relaxed);
                progress.files_done.fetch_add(1, Relaxed);
                progress.reused.fetch_add(1, Relaxed);
            }
        };
        run_workers(jobs, list.len(), "packds-stage", &work);
        if progress.cancel.load(Relaxed) {
            return Err(Error::Cancelled);
        }
        todo = list.iter().zip(&linked).filter(|(_, l)| !l.load(Relaxed)).map(|(j, _)| j).collect();
    }
    let copies: Vec<CopyJob> =
        todo.iter().map(|j| CopyJob { expect: Some((*j).clone()), ..CopyJob::new(src.join(&j.name), tmp.join(&j.name), j.size) }).collect();
    copy_files(&copies, jobs, durable, progress)?;
    if durable {
        sync_files(&copies.iter().map(|c| c.dst.as_path()).collect::<Vec<_>>(), jobs)?;
    }
    Ok(())
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

/// One file to copy: `src` to the new file `dst`, checked against `expect` when given.
struct CopyJob {
    src: PathBuf,
    dst: PathBuf,
    /// The size expected (to plan the work; what is copied is checked at open).
    size: u64,
    expect: Option<DataFile>,
    /// `dst` already created and opened for writing by the caller (else it is created here).
    out: Option<File>,
    /// Called after each chunk with the bytes copied so far (a fault switch).
    per_chunk: Option<fn(u64)>,
}

impl CopyJob {
    fn new(src: PathBuf, dst: PathBuf, size: u64) -> CopyJob {
        CopyJob { src, dst, size, expect: None, out: None, per_chunk: None }
    }
}

/// Copies `src` into `out` (the file `dst`, created and opened for writing by the caller) with
/// `workers` threads in BUF-sized chunks, and checks the copy against `expect` (size and
/// XXH3-128, computed in the same pass). Nothing is fsynced; `per_chunk(bytes copied)` runs
/// after each chunk. On error `dst` is left for the caller to remove.
pub(crate) fn copy_into(src: &Path, dst: &Path, out: &File, expect: &DataFile, workers: usize, per_chunk: Option<fn(u64)>) -> Result<()> {
    let out = out.try_clone().ctx("open", dst)?;
    let job = CopyJob { expect: Some(expect.clone()), out: Some(out), per_chunk, ..CopyJob::new(src.to_path_buf(), dst.to_path_buf(), expect.size) };
    copy_files(std::slice::from_ref(&job), workers, false, &StageProgress::default())
}

/// A file being copied: both ends open, and the one XXH3-128 hasher, fed chunk by chunk in
/// order by whichever worker copied each chunk.
struct Copying<'a> {
    job: &'a CopyJob,
    inp: File,
    out: File,
    /// Start writeback as ranges complete (a durable copy).
    writeback: bool,
    size: u64,
    chunks: u64,
    /// (next chunk to hash, hasher, a chunk of this file failed)
    hash: Mutex<(u64, Xxh3, bool)>,
    turn: Condvar,
}

/// Where the workers are: the next file to open and the next chunk of the open one.
struct Cursor<'a> {
    next_file: usize,
    cur: Option<(Arc<Copying<'a>>, u64)>,
}

/// Copies `jobs` with `workers` threads, BUF-sized chunks at their offsets (pread/pwrite), so
/// that one thread reads while another writes and the ranges of one large file are copied in
/// parallel. The chunks are handed out in order (file by file), and each file's hasher takes
/// them in order: a worker that copied chunk k hashes it once chunk k-1 is hashed (the bytes
/// are still in its buffer, nothing is read twice). After a file's last chunk its size (one
/// byte past it must not exist) and digest are checked. Nothing is fsynced here.
fn copy_files(jobs: &[CopyJob], workers: usize, durable: bool, progress: &StageProgress) -> Result<()> {
    let chunks: u64 = jobs.iter().map(|j| j.size.div_ceil(BUF as u64).max(1)).sum();
    let cursor = Mutex::new(Cursor { next_file: 0, cur: None });
    let stop = AtomicBool::new(false);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        first_err.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        stop.store(true, Relaxed);
    };
    let work = || {
        let mut buf = vec![0u8; BUF];
        loop {
            if stop.load(Relaxed) {
                return;
            }
            if progress.cancel.load(Relaxed) {
                return fail(Error::Cancelled);
            }
            // Take the next chunk, opening the next file when the open one is handed out.
            let taken = {
                let mut c = cursor.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some((f, k)) = c.cur.as_mut() {
                        if *k < f.chunks {
                            let t = (f.clone(), *k);
                            *k += 1;
                            break Some(t);
                        }
                    }
                    c.cur = None;
                    let Some(job) = jobs.get(c.next_file) else { break None };
                    c.next_file += 1;
                    match open_copy(job, durable) {
                        Ok(f) if f.chunks == 0 => {
                            if let Err(e) = finish_copy(&f, progress) {
                                fail(e);
                                break None;
                            }
                        }
                        Ok(f) => c.cur = Some((Arc::new(f), 0)),
                        Err(e) => {
                            fail(e);
                            break None;
                        }
                    }
                }
            };
            let Some((f, k)) = taken else { return };
            if let Err(e) = copy_chunk(&f, k, &mut buf, progress, &stop) {
                let mut g = f.hash.lock().unwrap_or_else(|p| p.into_inner());
                g.2 = true;
                f.turn.notify_all();
                drop(g);
                return fail(e);
            }
        }
    };
    run_workers(workers.max(2), usize::try_from(chunks).unwrap_or(usize::MAX), "packds-stage", &work);
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn open_copy(job: &CopyJob, writeback: bool) -> Result<Copying<'_>> {
    let src = &job.src;
    // A regular file only (a FIFO would block, a device never end), opened without blocking.
    let (inp, len) = layout::open_data_file(src, |e| {
        if e.kind() == ErrorKind::NotFound && job.expect.is_some() {
            Error::format(src, "file listed in manifest.json is missing")
        } else {
            Error::io("open", src, e)
        }
    })?;
    // The size to copy: what the manifest records (or the file's size); nothing is read past
    // it but one byte, to see a file that is larger (or growing).
    let size = match &job.expect {
        Some(j) if len != j.size => return Err(size_differs(src, len, j.size)),
        Some(j) => j.size,
        None => len,
    };
    // SAFETY: advisory call on a descriptor we own.
    unsafe { libc::posix_fadvise(inp.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    let out = match &job.out {
        Some(f) => f.try_clone().ctx("open", &job.dst)?,
        None => OpenOptions::new().write(true).create_new(true).mode(0o644).open(&job.dst).ctx("create", &job.dst)?,
    };
    Ok(Copying { job, inp, out, writeback, size, chunks: size.div_ceil(BUF as u64), hash: Mutex::new((0, Xxh3::new(), false)), turn: Condvar::new() })
}

/// Copies chunk `k` of `f` (read, write at its offset, hash in turn); after the last chunk
/// checks the whole file.
fn copy_chunk(f: &Copying, k: u64, buf: &mut [u8], progress: &StageProgress, stop: &AtomicBool) -> Result<()> {
    let (src, dst) = (&f.job.src, &f.job.dst);
    let off = k * BUF as u64;
    let len = (f.size - off).min(BUF as u64) as usize;
    // Ask for the next AHEAD bytes whenever a chunk starts a new AHEAD-sized range, so the disk
    // reads ahead while these chunks are written (plain readahead windows are smaller).
    if off % AHEAD == 0 {
        let (from, n) = if off == 0 { (0, 2 * AHEAD) } else { (off + AHEAD, AHEAD) };
        // SAFETY: advisory call on a descriptor we own.
        unsafe { libc::posix_fadvise(f.inp.as_raw_fd(), from as libc::off_t, n as libc::off_t, libc::POSIX_FADV_WILLNEED) };
    }
    let got = pread_full(&f.inp, &mut buf[..len], off, src)?;
    progress.bytes_read.fetch_add(got as u64, Relaxed);
    if got < len {
        return Err(shrank(f, off + got as u64));
    }
    f.out.write_all_at(&buf[..len], off).ctx("write", dst)?;
    {
        let mut g = f.hash.lock().unwrap_or_else(|p| p.into_inner());
        while g.0 != k {
            if g.2 || stop.load(Relaxed) || progress.cancel.load(Relaxed) {
                return Err(Error::Cancelled);
            }
            g = f.turn.wait_timeout(g, Duration::from_millis(50)).unwrap_or_else(|p| p.into_inner()).0;
        }
        g.1.update(&buf[..len]);
        g.0 = k + 1;
        f.turn.notify_all();
    }
    // Chunks 0..=k are written: for a durable copy, start the writeback of each WRITEBACK-sized
    // range once complete (asynchronous), so the disk writes while the copy goes on and the
    // fsync pass at the end finds little left to do.
    let end = off + len as u64;
    if f.writeback && (end % WRITEBACK == 0 || k + 1 == f.chunks) {
        let from = (end - 1) / WRITEBACK * WRITEBACK;
        // SAFETY: plain syscall on a descriptor we own.
        unsafe { libc::sync_file_range(f.out.as_raw_fd(), from as libc::off64_t, (end - from) as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE) };
    }
    let done = progress.bytes_done.fetch_add(len as u64, Relaxed) + len as u64;
    if let Some(hook) = f.job.per_chunk {
        hook(done);
    }
    if done / AHEAD != (done - len as u64) / AHEAD || k + 1 == f.chunks {
        crate::fault::stage_copied(done);
    }
    if k + 1 == f.chunks {
        finish_copy(f, progress)?;
    }
    Ok(())
}

/// All of `f` was copied and hashed: nothing past its size, and the digest the manifest says.
fn finish_copy(f: &Copying, progress: &StageProgress) -> Result<()> {
    let src = &f.job.src;
    let mut one = [0u8; 1];
    if pread_full(&f.inp, &mut one, f.size, src)? > 0 {
        return Err(match &f.job.expect {
            Some(j) => Error::format(src, format!("is larger than the {} bytes manifest.json says (replaced or growing)", j.size)),
            None => Error::usage(format!("{} grew while it was copied", src.display()), "stage it again once nothing writes it"),
        });
    }
    let digest = f.hash.lock().unwrap_or_else(|p| p.into_inner()).1.digest128();
    check_copied(src, f.job.expect.as_ref(), f.size, f.size, digest)?;
    progress.files_done.fetch_add(1, Relaxed);
    Ok(())
}

fn shrank(f: &Copying, n: u64) -> Error {
    match &f.job.expect {
        Some(j) => size_differs(&f.job.src, n, j.size),
        None => Error::usage(format!("{} shrank while it was copied", f.job.src.display()), "stage it again once nothing writes it"),
    }
}

/// Copies one file (two workers: one reads while the other writes); see [`copy_files`].
fn copy_one(src: &Path, dst: &Path, expect: Option<&DataFile>, size: u64, durable: bool, progress: &StageProgress) -> Result<()> {
    let job = CopyJob { expect: expect.cloned(), ..CopyJob::new(src.to_path_buf(), dst.to_path_buf(), size) };
    copy_files(std::slice::from_ref(&job), 2, durable, progress)
}

/// Reads into `buf` at `off` until it is full or the file ends; the bytes read.
fn pread_full(f: &File, buf: &mut [u8], off: u64, path: &Path) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("read", path, e)),
        }
    }
    Ok(got)
}

/// fsyncs `files` (just written; their writeback has been running since), `jobs` at once.
fn sync_files(files: &[&Path], jobs: usize) -> Result<()> {
    let next = AtomicUsize::new(0);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let work = || loop {
        let i = next.fetch_add(1, Relaxed);
        let Some(p) = files.get(i) else { return };
        if let Err(e) = File::open(p).and_then(|f| f.sync_all()).ctx("fsync", p) {
            first_err.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
            return;
        }
    };
    run_workers(jobs, files.len(), "packds-fsync", &work);
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
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
        let e = copy_one(src, &dst, Some(&j), 0, false, &StageProgress::default()).unwrap_err().to_string();
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
        let e = copy_one(&fifo, &t.path().join("x"), Some(&j), 10, false, &StageProgress::default()).unwrap_err().to_string();
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

    #[test]
    fn a_large_file_is_copied_in_parallel_ranges_and_checked() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("shard-00000.tar");
        // Five chunks and a bit, every byte depending on its offset.
        let data: Vec<u8> = (0..5 * BUF + 4099).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        fs::write(&a, &data).unwrap();
        let j = DataFile { name: "shard-00000.tar".into(), size: data.len() as u64, xxh3_128: hex128(xxhash_rust::xxh3::xxh3_128(&data)) };
        for workers in [1, 2, 4, 7] {
            let dst = t.path().join(format!("copy{workers}"));
            let job = CopyJob { expect: Some(j.clone()), ..CopyJob::new(a.clone(), dst.clone(), j.size) };
            let p = StageProgress::default();
            copy_files(std::slice::from_ref(&job), workers, workers % 2 == 0, &p).unwrap();
            assert!(fs::read(&dst).unwrap() == data, "{workers} workers");
            assert_eq!((p.bytes_done.load(Relaxed), p.bytes_read.load(Relaxed), p.files_done.load(Relaxed)), (j.size, j.size, 1));
        }
        // The hash is of the whole file in order: a wrong digest fails, whatever the workers.
        let bad = DataFile { xxh3_128: hex128(1), ..j.clone() };
        let job = CopyJob { expect: Some(bad), ..CopyJob::new(a.clone(), t.path().join("bad"), j.size) };
        let e = copy_files(std::slice::from_ref(&job), 4, false, &StageProgress::default()).unwrap_err();
        assert!(matches!(&e, Error::Checksum { shard, .. } if shard == &a), "{e}");
        // A file shorter than the manifest says (truncated after the size was checked is the
        // same path: a short read) is refused.
        let short = DataFile { size: j.size + 1, ..j.clone() };
        let job = CopyJob { size: short.size, expect: Some(short), ..CopyJob::new(a.clone(), t.path().join("short"), 0) };
        let e = copy_files(std::slice::from_ref(&job), 4, false, &StageProgress::default()).unwrap_err().to_string();
        assert!(e.contains("manifest.json says"), "{e}");
    }

    #[test]
    fn preload_reads_only_what_is_not_resident() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        fs::write(&a, vec![3u8; 2 * BUF + 5]).unwrap();
        // Just written: in the page cache, nothing to read.
        let p = StageProgress::default();
        assert_eq!(preload(std::slice::from_ref(&a), 1, &p).unwrap(), 2 * BUF as u64 + 5);
        assert_eq!((p.bytes_read.load(Relaxed), p.bytes_done.load(Relaxed)), (0, 2 * BUF as u64 + 5));
        // Dropped from the cache (where the filesystem lets clean pages go): read again.
        let f = File::open(&a).unwrap();
        f.sync_all().unwrap();
        // SAFETY: advisory call on a descriptor we own.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let evicted = !Residency::of(&f, 2 * BUF as u64 + 5).unwrap().all(0, 2 * BUF as u64 + 5);
        let p = StageProgress::default();
        preload(std::slice::from_ref(&a), 1, &p).unwrap();
        assert_eq!(p.bytes_read.load(Relaxed) > 0, evicted);
        assert!(Residency::of(&f, 2 * BUF as u64 + 5).unwrap().all(0, 2 * BUF as u64 + 5));
    }
}
