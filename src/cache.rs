//! A node-local shard cache: shards of datasets on shared storage copied, on first use, into a
//! directory on node-local disk that every process of the node shares, verified against the
//! manifest's XXH3-128 and size, and read from there afterwards.
//!
//! Entries are content-addressed (`<xxh3_128 hex>-<size>`), so datasets that link the same
//! shards (`concat`, `subset`) share them. The layout of a cache directory `DIR`:
//! - `DIR/shards/<hash>-<size>`: verified copies;
//! - `DIR/tmp/<hash>-<size>.<pid>.<n>`: copies in progress, each held with `flock(LOCK_EX)` by
//!   its writer and as large as the shard from its creation (so others count it);
//! - `DIR/locks/<hash>-<size>.lock`: a shard's fetch lock (`LOCK_EX` while fetching it);
//! - `DIR/evict.lock`: serialises room-making (eviction, creating a temporary file, and the
//!   rename of a finished copy into `shards/`);
//! - `DIR/fetch.log`: one line `hash size pid` appended per completed fetch.
//!
//! A [`LocalShard`] pins its entry: it holds the file open with `flock(LOCK_SH)` and mapped
//! until dropped. Eviction (least recently used first: every pin sets the entry's mtime) only
//! removes an entry it can lock with `LOCK_EX | LOCK_NB`, so a pinned entry is never removed;
//! a pin re-checks, once locked, that the path still names the file it opened (else it was
//! evicted in between). A copy is renamed into `shards/` only once its size and hash match,
//! so a process killed at any point leaves at most a temporary file, which the next
//! room-making pass removes (its lock died with its writer). No fsync: the cache is scratch
//! space for one job.
//!
//! The directory must be ours and writable by no one else: a cache in a shared directory must
//! not trust files others planted. Objects are per process: a [`ShardCache`] or [`LocalShard`]
//! inherited across `fork` corrupts nothing (a pin inherited keeps the entry pinned while
//! either process holds it), but a child should open its own.

use crate::error::{Error, IoContext, Result};
use crate::layout::DataFile;
use crate::manifest::hex128;
use memmap2::Mmap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Verified copies.
pub const SHARDS_DIR: &str = "shards";
/// Copies in progress.
pub const TMP_DIR: &str = "tmp";
/// Per-shard fetch locks.
pub const LOCKS_DIR: &str = "locks";
/// Serialises room-making.
pub const EVICT_LOCK: &str = "evict.lock";
/// One line per completed fetch.
pub const FETCH_LOG: &str = "fetch.log";

/// Threads copying one shard (one reads while the other writes).
const COPY_THREADS: usize = 2;
/// How many times a pin retries when its entry was evicted (or replaced) between open and lock.
const PIN_TRIES: usize = 8;

/// What this process (this [`ShardCache`]) did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Shards copied into the cache.
    pub fetches: u64,
    pub fetched_bytes: u64,
    /// Pins of a shard already cached (by `fetch` or `lookup`).
    pub hits: u64,
    /// Entries removed to make room.
    pub evictions: u64,
    pub evicted_bytes: u64,
}

/// A shard cache directory. Safe to use from several threads at once.
#[derive(Debug)]
pub struct ShardCache {
    dir: PathBuf,
    limit: u64,
    fetches: AtomicU64,
    fetched_bytes: AtomicU64,
    hits: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
}

/// Numbers this process's temporary files (one counter for every [`ShardCache`] of the process).
static SEQ: AtomicU64 = AtomicU64::new(0);

/// A pinned, mapped cached shard: its entry is not evicted while this lives.
pub struct LocalShard {
    path: PathBuf,
    size: u64,
    hash: u128,
    /// The mapping (None for an empty shard); its guard is dropped before the unmap.
    map: Option<Mapped>,
    /// Holds the `LOCK_SH` pin (released when closed).
    _file: File,
}

struct Mapped {
    guard: crate::sigbus::Guard,
    map: Mmap,
}

impl std::fmt::Debug for LocalShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalShard").field("path", &self.path).field("size", &self.size).finish()
    }
}

impl LocalShard {
    fn new(path: PathBuf, file: File, size: u64, hash: u128) -> Result<LocalShard> {
        let map = if size == 0 {
            None
        } else {
            // SAFETY: an entry is never written after it is renamed into shards/, and it cannot
            // be removed while we hold LOCK_SH; its size was checked. A file truncated by
            // someone else under the mapping is caught by the SIGBUS guard (check_intact).
            let m = unsafe { Mmap::map(&file) }.ctx("map", &path)?;
            if m.len() as u64 != size {
                return Err(Error::format(&path, format!("cached shard is {} bytes, expected {size}", m.len())));
            }
            Some(Mapped { guard: crate::sigbus::register(m.as_ptr(), m.len()), map: m })
        };
        Ok(LocalShard { path, size, hash, map, _file: file })
    }

    /// The cached file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The shard's XXH3-128.
    pub fn hash(&self) -> u128 {
        self.hash
    }

    /// The shard's bytes (mapped).
    pub fn bytes(&self) -> &[u8] {
        self.map.as_ref().map_or(&[], |m| &m.map[..])
    }

    /// Err when the cached file shrank under its mapping (a read of it faulted and got zeros;
    /// see [`crate::sigbus`]). Call after using bytes from it.
    pub fn check_intact(&self) -> Result<()> {
        match &self.map {
            Some(m) if m.guard.tripped() => Err(Error::format_hint(
                &self.path,
                "cached shard was truncated or overwritten while in use",
                "never modify a shard cache directory by hand; remove the directory when no job uses it",
            )),
            _ => Ok(()),
        }
    }
}

/// The outcome of trying to pin an entry.
enum Pin {
    Pinned(LocalShard),
    Absent,
    /// Something is there but not a copy we made: not a regular file, not ours, or not of
    /// the size its name says.
    Untrusted,
}

/// A shard file in the cache, as a room-making pass sees it.
struct Entry {
    path: PathBuf,
    len: u64,
    mtime: (i64, i64),
}

impl ShardCache {
    /// Opens (creating it, mode 0700) the cache directory `dir`, to hold at most `limit` bytes
    /// of shards and copies in progress. Refuses a directory that is not ours or that others
    /// can write into.
    pub fn open(dir: &Path, limit: u64) -> Result<ShardCache> {
        own_dir(dir, true)?;
        for sub in [SHARDS_DIR, TMP_DIR, LOCKS_DIR] {
            own_dir(&dir.join(sub), false)?;
        }
        Ok(ShardCache {
            dir: dir.to_path_buf(),
            limit,
            fetches: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            fetches: self.fetches.load(Relaxed),
            fetched_bytes: self.fetched_bytes.load(Relaxed),
            hits: self.hits.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            evicted_bytes: self.evicted_bytes.load(Relaxed),
        }
    }

    /// The shard `src` (`size` bytes, XXH3-128 `xxh3_128` in hex, as its manifest says) pinned
    /// from the cache, copied in first when absent. Blocks while another process or thread
    /// fetches the same shard, then uses its copy. `Ok(None)`: it cannot be cached (larger than
    /// the limit, or no room left because every cached shard is pinned, or the disk is full).
    /// A copy whose size or hash differs fails (naming `src`) and leaves nothing cached.
    pub fn fetch(&self, src: &Path, size: u64, xxh3_128: &str) -> Result<Option<LocalShard>> {
        let hash = parse_hash(xxh3_128)?;
        if size > self.limit {
            return Ok(None);
        }
        let name = entry_name(hash, size);
        if let Pin::Pinned(s) = self.pin(&name, size, hash)? {
            self.hits.fetch_add(1, Relaxed);
            return Ok(Some(s));
        }
        let lpath = self.dir.join(LOCKS_DIR).join(format!("{name}.lock"));
        let _lock = lock_file(&lpath, libc::LOCK_EX)?;
        match self.pin(&name, size, hash)? {
            Pin::Pinned(s) => {
                self.hits.fetch_add(1, Relaxed);
                return Ok(Some(s));
            }
            Pin::Untrusted => {
                let p = self.dir.join(SHARDS_DIR).join(&name);
                match fs::remove_file(&p) {
                    Err(e) if e.kind() != ErrorKind::NotFound => return Err(Error::io("remove", &p, e)),
                    _ => {}
                }
            }
            Pin::Absent => {}
        }
        let Some((tmp, out)) = self.reserve(&name, size)? else { return Ok(None) };
        match self.fill(src, &tmp, out, &name, size, hash) {
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                match e {
                    // The node-local disk is full (smaller than the limit says): not cached.
                    Error::NoSpace { .. } => Ok(None),
                    e => Err(e),
                }
            }
        }
    }

    /// The shard of this size and hash pinned if it is cached, else None; never fetches.
    pub fn lookup(&self, size: u64, xxh3_128: &str) -> Result<Option<LocalShard>> {
        let hash = parse_hash(xxh3_128)?;
        match self.pin(&entry_name(hash, size), size, hash)? {
            Pin::Pinned(s) => {
                self.hits.fetch_add(1, Relaxed);
                Ok(Some(s))
            }
            _ => Ok(None),
        }
    }

    /// Bytes of cached shards and copies in progress.
    pub fn usage(&self) -> Result<u64> {
        let mut n = 0u64;
        for sub in [SHARDS_DIR, TMP_DIR] {
            for (_, md) in self.files(sub)? {
                n = n.saturating_add(md.len());
            }
        }
        Ok(n)
    }

    /// Removes every cached shard that no process has pinned, and the temporary files of
    /// fetchers that died; under evict.lock, as room-making does. Returns (entries removed,
    /// bytes freed, entries kept because they are pinned).
    pub fn clear(&self) -> Result<(u64, u64, u64)> {
        let _ev = lock_file(&self.dir.join(EVICT_LOCK), libc::LOCK_EX)?;
        let (mut removed, mut freed, mut kept) = (0u64, 0u64, 0u64);
        for (p, md) in self.files(TMP_DIR)? {
            if let Ok(f) = open_nofollow(&p, false) {
                if try_flock(&f, libc::LOCK_EX).unwrap_or(false) && fs::remove_file(&p).is_ok() {
                    freed = freed.saturating_add(md.len());
                }
            }
        }
        for (p, md) in self.files(SHARDS_DIR)? {
            if evict(&p)? {
                removed += 1;
                freed = freed.saturating_add(md.len());
            } else {
                kept += 1;
            }
        }
        Ok((removed, freed, kept))
    }

    /// Every fetch recorded in the cache directory, by any process: `(xxh3_128, size, pid)`.
    pub fn fetch_log(&self) -> Result<Vec<(String, u64, u32)>> {
        let p = self.dir.join(FETCH_LOG);
        let text = match fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("read", &p, e)),
        };
        Ok(text
            .lines()
            .filter_map(|l| {
                let mut it = l.split(' ');
                let (h, s, p) = (it.next()?, it.next()?.parse().ok()?, it.next()?.parse().ok()?);
                Some((h.to_string(), s, p))
            })
            .collect())
    }

    /// Pins the entry `name` if it is there and ours, of `size` bytes.
    fn pin(&self, name: &str, size: u64, hash: u128) -> Result<Pin> {
        let path = self.dir.join(SHARDS_DIR).join(name);
        for _ in 0..PIN_TRIES {
            let f = match open_nofollow(&path, false) {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Pin::Absent),
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(Pin::Untrusted),
                Err(e) => return Err(Error::io("open", &path, e)),
            };
            flock(&f, libc::LOCK_SH).ctx("lock", &path)?;
            let md = f.metadata().ctx("stat", &path)?;
            match fs::symlink_metadata(&path) {
                Ok(now) if now.ino() == md.ino() && now.dev() == md.dev() => {}
                // Evicted (and perhaps fetched again) between our open and our lock.
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("stat", &path, e)),
            }
            if !md.is_file() || md.uid() != crate::layout::euid() || md.len() != size {
                return Ok(Pin::Untrusted);
            }
            touch(&f);
            return LocalShard::new(path, f, size, hash).map(Pin::Pinned);
        }
        Ok(Pin::Absent)
    }

    /// Makes room for `size` bytes (under evict.lock) and creates the temporary file of the
    /// copy, locked and `size` bytes large; None when there is no room.
    fn reserve(&self, name: &str, size: u64) -> Result<Option<(PathBuf, File)>> {
        let _ev = lock_file(&self.dir.join(EVICT_LOCK), libc::LOCK_EX)?;
        let mut usage = 0u64;
        // Copies in progress count; those whose writer died (unlocked) are removed.
        for (p, md) in self.files(TMP_DIR)? {
            if let Ok(f) = open_nofollow(&p, false) {
                if try_flock(&f, libc::LOCK_EX).unwrap_or(false) {
                    match fs::remove_file(&p) {
                        Ok(()) => continue,
                        Err(e) if e.kind() == ErrorKind::NotFound => continue,
                        Err(_) => {}
                    }
                }
            }
            usage = usage.saturating_add(md.len());
        }
        let mut entries: Vec<Entry> =
            self.files(SHARDS_DIR)?.into_iter().map(|(path, md)| Entry { path, len: md.len(), mtime: (md.mtime(), md.mtime_nsec()) }).collect();
        usage = entries.iter().fold(usage, |n, e| n.saturating_add(e.len));
        // Least recently used first (ties by name, for a stable order).
        entries.sort_by(|a, b| a.mtime.cmp(&b.mtime).then_with(|| a.path.cmp(&b.path)));
        for e in &entries {
            if usage.saturating_add(size) <= self.limit {
                break;
            }
            if evict(&e.path)? {
                usage -= e.len.min(usage);
                self.evictions.fetch_add(1, Relaxed);
                self.evicted_bytes.fetch_add(e.len, Relaxed);
            }
        }
        if usage.saturating_add(size) > self.limit {
            return Ok(None);
        }
        let n = SEQ.fetch_add(1, Relaxed);
        let tmp = self.dir.join(TMP_DIR).join(format!("{name}.{}.{n}", std::process::id()));
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .ctx("create", &tmp)?;
        let r = flock(&out, libc::LOCK_EX).ctx("lock", &tmp).and_then(|()| preallocate(&out, size, &tmp));
        match r {
            Ok(true) => Ok(Some((tmp, out))),
            Ok(false) => {
                let _ = fs::remove_file(&tmp);
                Ok(None)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Copies `src` into the temporary file `tmp` (`out`, locked), checks it, pins it and
    /// renames it into shards/; then records the fetch.
    fn fill(&self, src: &Path, tmp: &Path, out: File, name: &str, size: u64, hash: u128) -> Result<LocalShard> {
        let fname = src.file_name().map_or_else(|| src.display().to_string(), |n| n.to_string_lossy().into_owned());
        let expect = DataFile { name: fname, size, xxh3_128: hex128(hash) };
        crate::stage::copy_into(src, tmp, &out, &expect, COPY_THREADS, Some(crate::fault::cache_copied))?;
        let dest = self.dir.join(SHARDS_DIR).join(name);
        {
            // Under evict.lock: turning LOCK_EX into LOCK_SH is not atomic, and no room-making
            // pass may see the copy unlocked in between.
            let _ev = lock_file(&self.dir.join(EVICT_LOCK), libc::LOCK_EX)?;
            flock(&out, libc::LOCK_SH).ctx("lock", tmp)?;
            fs::rename(tmp, &dest).ctx("rename", &dest)?;
        }
        touch(&out);
        self.fetches.fetch_add(1, Relaxed);
        self.fetched_bytes.fetch_add(size, Relaxed);
        self.log_fetch(hash, size)?;
        LocalShard::new(dest, out, size, hash)
    }

    /// Appends `hash size pid` to fetch.log in one write.
    fn log_fetch(&self, hash: u128, size: u64) -> Result<()> {
        let p = self.dir.join(FETCH_LOG);
        let line = format!("{} {size} {}\n", hex128(hash), std::process::id());
        let mut f = OpenOptions::new().append(true).create(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&p).ctx("open", &p)?;
        f.write_all(line.as_bytes()).ctx("write", &p)
    }

    /// The regular files in `DIR/sub` with their metadata (what vanished meanwhile is skipped).
    fn files(&self, sub: &str) -> Result<Vec<(PathBuf, fs::Metadata)>> {
        let d = self.dir.join(sub);
        let mut out = Vec::new();
        for ent in fs::read_dir(&d).ctx("read directory", &d)? {
            let ent = ent.ctx("read directory", &d)?;
            match ent.metadata() {
                Ok(md) if md.is_file() => out.push((ent.path(), md)),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("stat", ent.path(), e)),
            }
        }
        Ok(out)
    }
}

/// Removes the cache entry `path` unless it is pinned (or already gone): true if removed.
fn evict(path: &Path) -> Result<bool> {
    let f = match open_nofollow(path, false) {
        Ok(f) => f,
        Err(_) => return Ok(false),
    };
    if !try_flock(&f, libc::LOCK_EX).ctx("lock", path)? {
        return Ok(false);
    }
    let (a, b) = match (f.metadata(), fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Ok(false),
    };
    if a.ino() != b.ino() || a.dev() != b.dev() {
        return Ok(false);
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// `<hash>-<size>`: an entry's name.
fn entry_name(hash: u128, size: u64) -> String {
    format!("{}-{size}", hex128(hash))
}

/// A manifest's XXH3-128: 32 hex digits.
fn parse_hash(s: &str) -> Result<u128> {
    if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        if let Ok(h) = u128::from_str_radix(s, 16) {
            return Ok(h);
        }
    }
    Err(Error::usage(format!("{s:?} is not an XXH3-128 (32 hex digits)"), "give the shard's xxh3_128 from the dataset's manifest.json"))
}

/// Creates the directory `d` (mode 0700; with its parents when `top`) or checks the existing
/// one: a directory of ours that no one else can write into.
fn own_dir(d: &Path, top: bool) -> Result<()> {
    let made = match fs::DirBuilder::new().mode(0o700).create(d) {
        Ok(()) => true,
        Err(e) if e.kind() == ErrorKind::AlreadyExists => false,
        Err(e) if e.kind() == ErrorKind::NotFound && top => {
            let parent = d.parent().unwrap_or(Path::new("."));
            fs::create_dir_all(parent).ctx("create directory", parent)?;
            match fs::DirBuilder::new().mode(0o700).create(d) {
                Ok(()) => true,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => false,
                Err(e) => return Err(Error::io("create directory", d, e)),
            }
        }
        Err(e) => return Err(Error::io("create directory", d, e)),
    };
    // The cache directory itself may be reached through a symlink; what is inside it may not.
    let md = if top { fs::metadata(d) } else { fs::symlink_metadata(d) }.ctx("stat", d)?;
    if !md.is_dir() {
        return Err(Error::usage(
            format!("shard cache {} is {}, not a directory", d.display(), crate::fsx::file_kind(&md)),
            "give a directory of your own on node-local disk (e.g. $SLURM_TMPDIR/packds-cache), or remove what is there",
        ));
    }
    if md.uid() != crate::layout::euid() {
        return Err(Error::usage(
            format!("shard cache {} is owned by {}, not by you", d.display(), crate::layout::describe_uid(md.uid())),
            "a shard cache trusts the files in it: give a directory of your own (e.g. $SLURM_TMPDIR/packds-cache)",
        ));
    }
    if made {
        fs::set_permissions(d, fs::Permissions::from_mode(0o700)).ctx("chmod", d)?;
    } else if md.mode() & 0o022 != 0 {
        return Err(Error::usage(
            format!("shard cache {} can be written by other users (mode {:o})", d.display(), md.mode() & 0o7777),
            "a shard cache trusts the files in it: `chmod 700` it (if no one else put files there), or give a new directory",
        ));
    }
    Ok(())
}

/// Opens `path` without following a symlink or blocking on a FIFO (read-only, or read-write).
fn open_nofollow(path: &Path, write: bool) -> io::Result<File> {
    OpenOptions::new().read(true).write(write).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC).open(path)
}

/// Opens (creating it) the lock file `path` and locks it with `op` (blocking).
fn lock_file(path: &Path, op: libc::c_int) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ctx("open", path)?;
    flock(&f, op).ctx("lock", path)?;
    Ok(f)
}

/// `flock(op)`, blocking, retried when interrupted.
fn flock(f: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `flock(op | LOCK_NB)`: false when someone else holds a conflicting lock.
fn try_flock(f: &File, op: libc::c_int) -> io::Result<bool> {
    match flock(f, op | libc::LOCK_NB) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sets the file's times to now: its mtime is the LRU clock.
fn touch(f: &File) {
    // SAFETY: futimens with a null times pointer (both set to now) on a descriptor we own.
    unsafe { libc::futimens(f.as_raw_fd(), std::ptr::null()) };
}

/// Makes the new file `f` `size` bytes large, with its blocks allocated where the filesystem
/// can: false when the disk is full.
fn preallocate(f: &File, size: u64, path: &Path) -> Result<bool> {
    if size == 0 {
        return Ok(true);
    }
    let len = libc::off_t::try_from(size).map_err(|_| Error::usage(format!("shard size {size} is too large"), "check the manifest"))?;
    // SAFETY: fallocate on a descriptor we own.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) };
    if r == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Ok(false),
        // No fallocate here (tmpfs on old kernels, some network filesystems): a sparse file
        // of that size still counts for the others.
        _ => f.set_len(size).ctx("truncate", path).map(|()| true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A "shard" of `len` bytes derived from `seed`, and its hex XXH3-128.
    fn shard(dir: &Path, name: &str, len: usize, seed: u8) -> (PathBuf, u64, String) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let p = dir.join(name);
        fs::write(&p, &data).unwrap();
        (p, len as u64, hex128(xxhash_rust::xxh3::xxh3_128(&data)))
    }

    fn names(dir: &Path, sub: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir.join(sub)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    fn set_mtime(p: &Path, secs: i64) {
        let f = File::open(p).unwrap();
        let ts = [libc::timespec { tv_sec: secs as libc::time_t, tv_nsec: 0 }; 2];
        // SAFETY: valid fd and a 2-element timespec array.
        assert_eq!(unsafe { libc::futimens(f.as_raw_fd(), ts.as_ptr()) }, 0);
    }

    #[test]
    fn fetch_copies_then_hits() {
        let t = tempfile::tempdir().unwrap();
        let (src, size, hash) = shard(t.path(), "shard-00000.tar", 700_000, 1);
        let c = ShardCache::open(&t.path().join("cache"), 10 << 20).unwrap();
        let mode = fs::metadata(t.path().join("cache")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(c.lookup(size, &hash).unwrap().is_none());
        let s = c.fetch(&src, size, &hash).unwrap().unwrap();
        assert_eq!(s.bytes(), &fs::read(&src).unwrap()[..]);
        assert_eq!(s.path(), t.path().join("cache/shards").join(format!("{hash}-{size}")));
        drop(s);
        let s = c.fetch(&src, size, &hash).unwrap().unwrap();
        assert_eq!(s.size(), size);
        let l = c.lookup(size, &hash.to_uppercase()).unwrap().unwrap();
        assert_eq!(l.bytes(), s.bytes());
        assert_eq!(c.stats(), CacheStats { fetches: 1, fetched_bytes: size, hits: 2, evictions: 0, evicted_bytes: 0 });
        assert_eq!(c.fetch_log().unwrap(), vec![(hash.clone(), size, std::process::id())]);
        assert_eq!(c.usage().unwrap(), size);
        assert!(names(t.path().join("cache").as_path(), TMP_DIR).is_empty());
        // An empty shard is cached too (nothing mapped).
        let (e, _, eh) = shard(t.path(), "empty.tar", 0, 0);
        assert_eq!(c.fetch(&e, 0, &eh).unwrap().unwrap().bytes(), b"");
        assert!(c.lookup(size, "xyz").unwrap_err().to_string().contains("not an XXH3-128"));
    }

    #[test]
    fn eviction_takes_the_least_recently_used_and_never_exceeds_the_limit() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        let c = ShardCache::open(&dir, 3000).unwrap();
        let s: Vec<_> = (0..4).map(|k| shard(t.path(), &format!("s{k}"), 1000, k as u8)).collect();
        for (k, (p, n, h)) in s.iter().take(3).enumerate() {
            drop(c.fetch(p, *n, h).unwrap().unwrap());
            set_mtime(&dir.join(SHARDS_DIR).join(format!("{h}-{n}")), 1000 + k as i64);
        }
        assert_eq!(c.usage().unwrap(), 3000);
        // Using s0 makes s1 the least recently used.
        drop(c.lookup(s[0].1, &s[0].2).unwrap().unwrap());
        drop(c.fetch(&s[3].0, s[3].1, &s[3].2).unwrap().unwrap());
        assert!(c.usage().unwrap() <= 3000);
        let have = names(&dir, SHARDS_DIR);
        assert!(!have.contains(&format!("{}-1000", s[1].2)), "{have:?}");
        for k in [0, 2, 3] {
            assert!(have.contains(&format!("{}-1000", s[k].2)), "{k}: {have:?}");
        }
        let st = c.stats();
        assert_eq!((st.evictions, st.evicted_bytes, st.fetches), (1, 1000, 4));
        // Larger than the limit: never cached.
        let (big, n, h) = shard(t.path(), "big", 3001, 9);
        assert!(c.fetch(&big, n, &h).unwrap().is_none());
        assert_eq!(names(&dir, SHARDS_DIR).len(), 3);
    }

    #[test]
    fn a_pinned_shard_is_never_evicted() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        let c = ShardCache::open(&dir, 2000).unwrap();
        let s: Vec<_> = (0..4).map(|k| shard(t.path(), &format!("s{k}"), 1000, k as u8)).collect();
        let a = c.fetch(&s[0].0, 1000, &s[0].2).unwrap().unwrap();
        set_mtime(a.path(), 1); // the oldest, but pinned
        drop(c.fetch(&s[1].0, 1000, &s[1].2).unwrap().unwrap());
        let b = c.fetch(&s[2].0, 1000, &s[2].2).unwrap().unwrap();
        assert!(c.lookup(1000, &s[1].2).unwrap().is_none(), "s1 was evicted, not the pinned s0");
        assert_eq!(a.bytes(), &fs::read(&s[0].0).unwrap()[..]);
        // Everything pinned: no room.
        assert!(c.fetch(&s[3].0, 1000, &s[3].2).unwrap().is_none());
        assert!(c.usage().unwrap() <= 2000);
        drop(b);
        assert!(c.fetch(&s[3].0, 1000, &s[3].2).unwrap().is_some());
        assert!(c.lookup(1000, &s[0].2).unwrap().is_some());
    }

    #[test]
    fn a_bad_copy_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        let c = ShardCache::open(&dir, 1 << 20).unwrap();
        let (p, n, h) = shard(t.path(), "shard-00003.tar", 5000, 3);
        let wrong = hex128(7);
        let e = c.fetch(&p, n, &wrong).unwrap_err();
        assert!(matches!(&e, Error::Checksum { shard, .. } if shard == &p), "{e}");
        let e = c.fetch(&p, n + 1, &h).unwrap_err().to_string();
        assert!(e.contains("shard-00003.tar") && e.contains("manifest.json says"), "{e}");
        assert!(names(&dir, SHARDS_DIR).is_empty() && names(&dir, TMP_DIR).is_empty());
        assert!(c.fetch_log().unwrap().is_empty());
        assert_eq!(c.usage().unwrap(), 0);
        assert!(c.fetch(&p, n, &h).unwrap().is_some());
    }

    #[test]
    fn a_dead_fetchers_temporary_file_is_removed_and_a_live_ones_counted() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        let c = ShardCache::open(&dir, 3000).unwrap();
        fs::write(dir.join(TMP_DIR).join("dead.1.0"), vec![0u8; 1000]).unwrap();
        let live = dir.join(TMP_DIR).join("live.2.0");
        fs::write(&live, vec![0u8; 1000]).unwrap();
        let held = File::open(&live).unwrap();
        flock(&held, libc::LOCK_EX).unwrap();
        assert_eq!(c.usage().unwrap(), 2000);
        let (p, n, h) = shard(t.path(), "s", 1500, 5);
        // 1000 (live) + 1500 fits only once the dead one is gone.
        let pinned = c.fetch(&p, n, &h).unwrap();
        assert!(pinned.is_some());
        assert_eq!(names(&dir, TMP_DIR), vec!["live.2.0".to_string()]);
        assert_eq!(c.usage().unwrap(), 2500);
        let (q, m, g) = shard(t.path(), "q", 1000, 6);
        assert!(c.fetch(&q, m, &g).unwrap().is_none(), "the live copy and the pinned one leave no room");
        drop(pinned);
        assert!(c.fetch(&q, m, &g).unwrap().is_some());
    }

    #[test]
    fn a_wrong_entry_is_not_trusted_and_is_replaced() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        let c = ShardCache::open(&dir, 1 << 20).unwrap();
        let (p, n, h) = shard(t.path(), "s", 4000, 8);
        let entry = dir.join(SHARDS_DIR).join(format!("{h}-{n}"));
        fs::write(&entry, b"short").unwrap();
        assert!(c.lookup(n, &h).unwrap().is_none());
        let s = c.fetch(&p, n, &h).unwrap().unwrap();
        assert_eq!(s.bytes(), &fs::read(&p).unwrap()[..]);
        drop(s);
        // A symlink in place of an entry is not followed.
        fs::remove_file(&entry).unwrap();
        std::os::unix::fs::symlink(&p, &entry).unwrap();
        assert!(c.lookup(n, &h).unwrap().is_none());
        assert!(c.fetch(&p, n, &h).unwrap().is_some());
        assert!(!fs::symlink_metadata(&entry).unwrap().file_type().is_symlink());
        assert_eq!(c.stats().fetches, 2);
    }

    #[test]
    fn clear_removes_what_is_not_pinned() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        fs::write(&a, vec![1u8; 1000]).unwrap();
        fs::write(&b, vec![2u8; 2000]).unwrap();
        let c = ShardCache::open(&t.path().join("cache"), 1 << 20).unwrap();
        let ha = hex128(crate::fsx::hash_file(&a).unwrap());
        let hb = hex128(crate::fsx::hash_file(&b).unwrap());
        let held = c.fetch(&a, 1000, &ha).unwrap().unwrap();
        drop(c.fetch(&b, 2000, &hb).unwrap().unwrap());
        assert_eq!(c.clear().unwrap(), (1, 2000, 1));
        assert_eq!(c.usage().unwrap(), 1000);
        assert_eq!(held.bytes(), &vec![1u8; 1000][..]);
        drop(held);
        assert_eq!(c.clear().unwrap(), (1, 1000, 0));
        assert_eq!(c.usage().unwrap(), 0);
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("open");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let e = ShardCache::open(&dir, 1).unwrap_err();
        assert!(e.to_string().contains("can be written by other users") && e.hint().unwrap().contains("chmod 700"), "{e}");
        let f = t.path().join("file");
        fs::write(&f, b"").unwrap();
        assert!(ShardCache::open(&f, 1).unwrap_err().to_string().contains("not a directory"));
        // Parents are created.
        assert!(ShardCache::open(&t.path().join("a/b/c"), 1).is_ok());
    }

    #[test]
    fn threads_fetching_one_shard_copy_it_once() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        let c = Arc::new(ShardCache::open(&dir, 1 << 30).unwrap());
        let (p, n, h) = shard(t.path(), "s", 3 << 20, 4);
        let want = fs::read(&p).unwrap();
        std::thread::scope(|sc| {
            for _ in 0..6 {
                sc.spawn(|| {
                    let s = c.fetch(&p, n, &h).unwrap().unwrap();
                    assert!(s.bytes() == &want[..]);
                });
            }
        });
        assert_eq!(c.fetch_log().unwrap().len(), 1);
        let st = c.stats();
        assert_eq!((st.fetches, st.hits), (1, 5));
    }
}
