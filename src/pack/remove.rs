//! `pack --remove-source`: frees the source files of every shard once the shard is safely on
//! disk, then the directories that became empty (for file-count quotas).
//!
//! For each shard, in this order: the shard is fsynced and renamed into place; the records of
//! its source files ([`write_sources`]) and its per-shard index go into the state directory
//! (from then on `--resume` keeps the shard); the shard is read back from disk (its cached pages
//! dropped first, best effort) and its XXH3-128 and every member's CRC32C are checked against
//! the index; only then is each member's source file removed, and only when it is still the file
//! that was read: same inode and device, size, mtime and ctime. A file that differs is left in
//! place and reported (`left`). Paths are opened one directory at a time from the source root
//! with `O_NOFOLLOW`, and files removed with `unlinkat` on their directory: a directory swapped
//! for a symlink since the walk is never followed out of SRC. A shard that reads back wrong
//! fails the pack before anything of it is removed, and loses its per-shard index, so that
//! `--resume` writes it again.
//!
//! Directories: at the end, before the manifest, every directory below a source root that held
//! a packed file is removed if it is empty (`rmdir`, deepest first; one that still holds
//! anything stays). The source roots themselves stay: they are what the user named (a mount
//! point, a project directory with its permissions and ACLs) and cost one inode each.
//!
//! Resume: a walk after some sources were removed would not find them, so a pack with
//! `--remove-source` records its file list in the state directory ([`super::STATE_FILES`]) and a
//! resume packs from that list, not from a new walk. The files of the completed shards are then
//! treated as above: removed when unchanged, counted as `gone` when already removed, left and
//! reported when changed. A file-by-file re-check replaces the resume's refusal of a changed
//! tree: a changed packed file is left, exactly as in an uninterrupted run.

use super::stamp::Stamp;
use super::{shard_name, PackOptions, STATE_DIR};
use crate::codec::{self, Decoder};
use crate::error::{Error, IoContext, Result};
use crate::fault;
use crate::fsx;
use crate::index::Index;
use crate::layout;
use crate::pool;
use crate::walk::{FileList, Skipped, SourceRoot};
use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

/// What `--remove-source` did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RemoveSummary {
    /// Source files removed by this run.
    pub files: u64,
    /// Directories removed (they became empty).
    pub dirs: u64,
    /// Packed files already gone (removed by an interrupted run this one resumed).
    pub gone: u64,
    /// Packed files left in place, with the reason (changed since they were read, ...).
    pub left: Vec<Skipped>,
    /// `--dry-run`: nothing was packed or removed; these files would be removed.
    pub dry_run: bool,
    pub would_remove: Vec<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// The record of a shard's source files (identity and version), beside its per-shard index.

/// Bytes per file: size, mtime ns, ctime ns, inode, device (little-endian).
const SOURCE_LEN: usize = 40;
const SOURCE_MAGIC: &[u8; 8] = b"PDSSRC01";

/// Writes the records of a shard's source files to `path`, atomically.
pub(super) fn write_sources(path: &Path, stamps: &[Stamp]) -> Result<()> {
    let mut b = Vec::with_capacity(stamps.len() * SOURCE_LEN + 24);
    b.extend_from_slice(SOURCE_MAGIC);
    b.extend_from_slice(&(stamps.len() as u64).to_le_bytes());
    for s in stamps {
        for v in [s.size, s.mtime_ns as u64, s.ctime_ns as u64, s.ino, s.dev] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    let h = xxhash_rust::xxh3::xxh3_64(&b);
    b.extend_from_slice(&h.to_le_bytes());
    fsx::write_atomic(path, &b)
}

/// The records [`write_sources`] wrote for `files` files; None when the file is not there.
pub(super) fn read_sources(path: &Path, files: usize) -> Result<Option<Vec<Stamp>>> {
    let b = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    let bad = || Error::format(path, "damaged record of the packed source files");
    if b.len() < 24 || &b[..8] != SOURCE_MAGIC {
        return Err(bad());
    }
    let (body, tail) = b.split_at(b.len() - 8);
    if xxhash_rust::xxh3::xxh3_64(body).to_le_bytes() != tail {
        return Err(bad());
    }
    let n = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let recs = &body[16..];
    if n != files as u64 || recs.len() != files * SOURCE_LEN {
        return Err(bad());
    }
    let le = |r: &[u8], i: usize| u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Ok(Some(
        recs.chunks_exact(SOURCE_LEN)
            .map(|r| Stamp { size: le(r, 0), mtime_ns: le(r, 1) as i64, ctime_ns: le(r, 2) as i64, ino: le(r, 3), dev: le(r, 4) })
            .collect(),
    ))
}

// ---------------------------------------------------------------------------------------------
// Preflight and dry run.

/// The directory a file of `root` is removed from, as (root, directory key relative to it).
fn dir_key(key: &[u8]) -> &[u8] {
    key.iter().rposition(|&c| c == b'/').map_or(&key[..0], |i| &key[..i])
}

/// The directory holding file `i` (a path).
fn dir_path(files: &FileList, roots: &[SourceRoot], i: usize) -> PathBuf {
    let r = &roots[files.root(i) as usize];
    if r.is_file {
        match r.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    } else {
        let d = dir_key(files.key(i));
        if d.is_empty() {
            r.path.clone()
        } else {
            r.path.join(OsStr::from_bytes(d))
        }
    }
}

/// Before anything is packed: every directory a file of `range` is to be removed from must be
/// writable (and searchable) by this process, else the pack is refused naming the first few.
/// A directory that no longer exists is fine (a resumed pack removed its files already).
pub(super) fn preflight(files: &FileList, roots: &[SourceRoot], range: std::ops::Range<usize>) -> Result<()> {
    let mut seen: HashSet<(u32, &[u8])> = HashSet::new();
    let mut bad: Vec<(PathBuf, std::io::Error)> = Vec::new();
    let mut nbad = 0usize;
    for i in range {
        let r = files.root(i);
        let d = if roots[r as usize].is_file { &[][..] } else { dir_key(files.key(i)) };
        if !seen.insert((r, d)) {
            continue;
        }
        let p = dir_path(files, roots, i);
        let Ok(c) = CString::new(p.as_os_str().as_bytes()) else { continue };
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::NotFound {
                continue;
            }
            nbad += 1;
            if bad.len() < 3 {
                bad.push((p, e));
            }
        }
    }
    if let Some((first, e)) = bad.first() {
        let more = if nbad > 1 { format!(" (and {} more director{})", nbad - 1, if nbad == 2 { "y" } else { "ies" }) } else { String::new() };
        return Err(Error::usage(
            format!("--remove-source cannot remove files from {}: {}{more}; nothing was packed or removed", first.display(), strerror(e)),
            format!(
                "drop --remove-source (pack only), or make the directories writable (e.g. chmod -R u+w {}) and pack again",
                roots.first().map_or_else(|| first.display().to_string(), |r| r.path.display().to_string())
            ),
        ));
    }
    Ok(())
}

/// Text of an io::Error without std's " (os error N)" suffix.
fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

// ---------------------------------------------------------------------------------------------
// Opening directories without following symlinks.

fn cstr(b: &[u8]) -> std::io::Result<CString> {
    CString::new(b).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

fn openat_dir(dirfd: RawFd, name: &CStr, follow: bool) -> std::io::Result<OwnedFd> {
    let mut flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    // SAFETY: a valid NUL-terminated name; the returned descriptor is owned below.
    let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `root` (followed: the user named it), then each component of `rel` below it without
/// following a symlink.
fn open_below(root: &Path, rel: &[u8]) -> std::io::Result<OwnedFd> {
    let mut fd = openat_dir(libc::AT_FDCWD, &cstr(root.as_os_str().as_bytes())?, true)?;
    for comp in rel.split(|&c| c == b'/').filter(|c| !c.is_empty()) {
        fd = openat_dir(fd.as_raw_fd(), &cstr(comp)?, false)?;
    }
    Ok(fd)
}

fn fstatat(dirfd: RawFd, name: &CStr) -> std::io::Result<libc::stat> {
    // SAFETY: zeroed plain-data struct to fill, a valid name and descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatat(dirfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

fn unlinkat(dirfd: RawFd, name: &CStr, flags: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a valid name and descriptor.
    if unsafe { libc::unlinkat(dirfd, name.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn stamp_of(st: &libc::stat) -> Stamp {
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    Stamp { size: st.st_size as u64, mtime_ns: ns(st.st_mtime, st.st_mtime_nsec), ctime_ns: ns(st.st_ctime, st.st_ctime_nsec), ino: st.st_ino, dev: st.st_dev }
}

// ---------------------------------------------------------------------------------------------
// The remover.

/// Removes the sources of completed shards, and at the end the directories they emptied.
pub(super) struct Remover<'a> {
    opts: &'a PackOptions,
    roots: &'a [SourceRoot],
    files: &'a FileList,
    decoder: Decoder,
    dict: &'a [u8],
    /// Compressed members up to this original size are decoded in memory ([`DECODE_IN_MEMORY`]).
    in_memory: u64,
    removed: AtomicU64,
    gone: AtomicU64,
    left: Mutex<Vec<Skipped>>,
    /// Directories (root, key of the directory) that held a packed file now gone.
    dirs: Mutex<HashSet<(u32, Vec<u8>)>>,
    /// Inodes with more than one link of which this run removed one: removing a link moves the
    /// ctime of the others, which must not make them look changed.
    unlinked: Mutex<HashSet<(u64, u64)>>,
}

/// Files are removed in pieces of this many consecutive files (one directory opened per piece
/// and directory).
const PIECE: usize = 256;
/// Compressed members up to this original size are decoded in memory; larger ones streamed.
const DECODE_IN_MEMORY: u64 = 64 << 20;

impl<'a> Remover<'a> {
    pub fn new(opts: &'a PackOptions, roots: &'a [SourceRoot], files: &'a FileList, dict: &'a [u8]) -> Self {
        Remover {
            opts,
            roots,
            files,
            decoder: Decoder::new((!dict.is_empty()).then_some(dict)),
            dict,
            in_memory: DECODE_IN_MEMORY,
            removed: AtomicU64::new(0),
            gone: AtomicU64::new(0),
            left: Mutex::new(Vec::new()),
            dirs: Mutex::new(HashSet::new()),
            unlinked: Mutex::new(HashSet::new()),
        }
    }

    /// Shard `k` is complete (`ix`: its per-shard index; `stamps`: its files as they were
    /// read): reads it back from disk and checks it, then removes its members' sources.
    /// `resumed`: a shard of an interrupted pack, whose sources may be gone already (then it
    /// is not read again).
    pub fn shard(&self, k: usize, ix: &Index, stamps: &[Stamp], resumed: bool) -> Result<()> {
        let mut members = Vec::with_capacity(ix.len());
        for (i, st) in stamps.iter().enumerate().take(ix.len()) {
            let key = ix.key(i)?;
            let j = crate::index::find_sorted(self.files.len(), |j| Ok(self.files.key(j)), key)?
                .ok_or_else(|| Error::format(ix.path(), format!("internal: packed key {:?} is not in the file list", String::from_utf8_lossy(key))))?;
            members.push((j, *st));
        }
        if resumed && members.iter().all(|&(j, _)| fs::symlink_metadata(self.files.path(j, self.roots)).is_err()) {
            // Removed before the interruption: nothing to check the shard for.
            for &(j, _) in &members {
                self.note_gone(j);
            }
            return Ok(());
        }
        if let Err(e) = self.verify(k, ix) {
            // Not kept by --resume: it is written again.
            let _ = fs::remove_file(self.opts.output.join(STATE_DIR).join(layout::state_index_name(k)));
            let _ = fsx::sync_dir(&self.opts.output.join(STATE_DIR));
            return Err(e);
        }
        self.remove_files(&members);
        Ok(())
    }

    /// Reads shard `k` back from disk: its size and XXH3-128 as recorded, every stored member's
    /// CRC32C (decoded first when compressed).
    fn verify(&self, k: usize, ix: &Index) -> Result<()> {
        let path = self.opts.output.join(shard_name(k, self.opts.format));
        let info = ix.shards().first().ok_or_else(|| Error::format(ix.path(), "per-shard index without a shard"))?;
        let f = File::open(&path).ctx("open", &path)?;
        // The shard was fsynced, so its cached pages are clean: dropping them makes the reads
        // below come from the storage, not from memory (best effort; a network filesystem may
        // keep its own cache).
        // SAFETY: advice on a descriptor we own.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        let bad = |what: String| {
            Error::format_hint(
                &path,
                format!("read back from disk, it does not match what was written ({what}); no source file of it was removed"),
                "check the storage; --resume writes this shard again",
            )
        };
        let n = ix.len();
        let entries = (0..n).map(|i| ix.entry(i)).collect::<Result<Vec<_>>>()?;
        // The stored members' extents in offset order, each once (the names of a hard-linked
        // file share one, see `ShardOut::link`).
        let mut ext: Vec<(u64, u64)> = entries.iter().filter(|e| e.codec == codec::RAW).map(|e| (e.offset, e.size)).collect();
        ext.sort_unstable();
        ext.dedup();
        let mut crcs = vec![0u32; ext.len()];
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 8 << 20];
        let (mut pos, mut first) = (0u64, 0usize);
        let mut rd = (&f).take(info.size.saturating_add(1));
        loop {
            let got = rd.read(&mut buf).ctx("read", &path)?;
            if got == 0 {
                break;
            }
            let chunk = &buf[..got];
            h.update(chunk);
            let end = pos + got as u64;
            let mut j = first;
            while j < ext.len() && ext[j].0 < end {
                let (off, size) = ext[j];
                let (a, b) = (off.max(pos), (off + size).min(end));
                if a < b {
                    crcs[j] = crc32c::crc32c_append(crcs[j], &chunk[(a - pos) as usize..(b - pos) as usize]);
                }
                if off + size > end {
                    break;
                }
                if j == first {
                    first += 1;
                }
                j += 1;
            }
            pos = end;
        }
        if pos != info.size {
            return Err(bad(format!("{pos} bytes, {} written", info.size)));
        }
        if h.digest128() != info.hash {
            return Err(bad("XXH3-128 differs".into()));
        }
        for (i, e) in entries.iter().enumerate() {
            let crc = match ext.binary_search(&(e.offset, e.size)) {
                Ok(x) if e.codec == codec::RAW => crcs[x],
                _ => self.decoded_crc(&f, &path, e)?,
            };
            if crc != e.crc {
                return Err(bad(format!("CRC32C of {:?} differs", String::from_utf8_lossy(ix.key(i)?))));
            }
        }
        Ok(())
    }

    /// CRC32C of a compressed member's original bytes, decoded from the shard file.
    fn decoded_crc(&self, f: &File, path: &Path, e: &crate::index::Entry) -> Result<u32> {
        let broken = |what: String| Error::format(path, format!("a compressed member does not decode: {what}"));
        if e.raw <= self.in_memory {
            let mut stored = vec![0u8; e.size as usize];
            f.read_exact_at(&mut stored, e.offset).ctx("read", path)?;
            let raw = self.decoder.decode(e.codec, &stored, e.raw).map_err(|d| broken(d.0))?;
            return Ok(crc32c::crc32c(&raw));
        }
        let at = At { f, pos: e.offset, end: e.offset + e.size };
        let mut dec = if e.codec == codec::ZSTD_DICT {
            zstd::stream::read::Decoder::with_dictionary(std::io::BufReader::new(at), self.dict)
        } else {
            zstd::stream::read::Decoder::with_buffer(std::io::BufReader::new(at))
        }
        .map_err(|x| broken(x.to_string()))?
        .single_frame();
        let (mut crc, mut total) = (0u32, 0u64);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let got = dec.read(&mut buf).map_err(|x| broken(x.to_string()))?;
            if got == 0 {
                break;
            }
            crc = crc32c::crc32c_append(crc, &buf[..got]);
            total += got as u64;
        }
        if total != e.raw {
            return Err(broken(format!("{total} bytes decoded, {} recorded", e.raw)));
        }
        Ok(crc)
    }

    fn note_dir(&self, j: usize) {
        let r = self.files.root(j);
        if self.roots[r as usize].is_file {
            return;
        }
        let d = dir_key(self.files.key(j));
        if !d.is_empty() {
            self.dirs.lock().unwrap_or_else(|p| p.into_inner()).insert((r, d.to_vec()));
        }
    }

    fn note_gone(&self, j: usize) {
        self.gone.fetch_add(1, Relaxed);
        self.note_dir(j);
    }

    fn leave(&self, j: usize, reason: String) {
        let path = self.files.path(j, self.roots).display().to_string();
        self.left.lock().unwrap_or_else(|p| p.into_inner()).push(Skipped { path, reason });
    }

    /// Removes the files of `members` (file index, stamp as read) that are unchanged, in
    /// parallel (on a network filesystem each unlink is a round-trip).
    fn remove_files(&self, members: &[(usize, Stamp)]) {
        let next = AtomicUsize::new(0);
        let work = || {
            // The directory of the files before, kept open for the files of one directory in a row.
            let mut cur: Option<OpenDir> = None;
            loop {
                let a = next.fetch_add(PIECE, Relaxed);
                if a >= members.len() {
                    break;
                }
                for &(j, want) in &members[a..(a + PIECE).min(members.len())] {
                    let r = self.files.root(j);
                    let root = &self.roots[r as usize];
                    let (dkey, name): (&[u8], &[u8]) = if root.is_file {
                        (&[], root.path.file_name().map_or(&[][..], |n| n.as_bytes()))
                    } else {
                        let k = self.files.key(j);
                        let d = dir_key(k);
                        (d, if d.is_empty() { k } else { &k[d.len() + 1..] })
                    };
                    if cur.as_ref().map_or(true, |(id, _)| id.0 != r || id.1 != dkey) {
                        let fd = if root.is_file {
                            match root.path.parent() {
                                Some(p) if !p.as_os_str().is_empty() => open_below(p, b""),
                                _ => open_below(Path::new("."), b""),
                            }
                        } else {
                            open_below(&root.path, dkey)
                        };
                        cur = Some(((r, dkey.to_vec()), fd));
                    }
                    let dirfd = match &cur.as_ref().expect("set above").1 {
                        Ok(fd) => fd.as_raw_fd(),
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                            self.note_gone(j);
                            continue;
                        }
                        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                            self.leave(j, "a directory on its path is no longer a directory (a symlink is never followed): not removed".into());
                            continue;
                        }
                        Err(e) => {
                            self.leave(j, format!("cannot open its directory: {}", strerror(e)));
                            continue;
                        }
                    };
                    self.remove_one(j, dirfd, name, &want);
                }
            }
        };
        let threads = self.opts.threads.clamp(1, 64).min(members.len().div_ceil(PIECE)).max(1);
        pool::run_with_caller(threads, "packds-remove", &work);
    }

    /// Removes file `j` (`name` in `dirfd`) if it is still the file that was read (`want`).
    fn remove_one(&self, j: usize, dirfd: RawFd, name: &[u8], want: &Stamp) {
        let Ok(c) = cstr(name) else {
            self.leave(j, "its name holds a NUL byte".into());
            return;
        };
        let st = match fstatat(dirfd, &c) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return self.note_gone(j),
            Err(e) => return self.leave(j, format!("cannot stat: {}", strerror(&e))),
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return self.leave(j, "no longer a regular file since it was packed: not removed".into());
        }
        let now = stamp_of(&st);
        let id = (now.dev, now.ino);
        let same = now == *want || (Stamp { ctime_ns: want.ctime_ns, ..now } == *want && self.unlinked.lock().unwrap_or_else(|p| p.into_inner()).contains(&id));
        if !same {
            let mut what = Vec::new();
            for (n, d) in [
                ("inode", (now.ino, now.dev) != (want.ino, want.dev)),
                ("size", now.size != want.size),
                ("mtime", now.mtime_ns != want.mtime_ns),
                ("ctime", now.ctime_ns != want.ctime_ns),
            ] {
                if d {
                    what.push(n);
                }
            }
            return self.leave(j, format!("changed since it was packed ({}): not removed", what.join(", ")));
        }
        if st.st_nlink > 1 {
            // Before the unlink: another thread may stat another link of it right after.
            self.unlinked.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
        }
        match unlinkat(dirfd, &c, 0) {
            Ok(()) => {
                let n = self.removed.fetch_add(1, Relaxed) + 1;
                self.note_dir(j);
                fault::kill_in_remove(n);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.note_gone(j),
            Err(e) => self.leave(j, format!("cannot remove: {}", strerror(&e))),
        }
    }

    /// Removes the directories that became empty, deepest first; never a source root, never a
    /// directory that holds anything (rmdir refuses it). Returns how many were removed.
    pub fn remove_dirs(&self) -> u64 {
        let noted = std::mem::take(&mut *self.dirs.lock().unwrap_or_else(|p| p.into_inner()));
        let mut all: HashSet<(u32, Vec<u8>)> = HashSet::new();
        for (r, d) in noted {
            let mut d = d.as_slice();
            while !d.is_empty() && all.insert((r, d.to_vec())) {
                d = dir_key(d);
            }
        }
        let mut v: Vec<(u32, Vec<u8>)> = all.into_iter().collect();
        let depth = |d: &[u8]| d.iter().filter(|&&c| c == b'/').count();
        v.sort_by(|a, b| depth(&b.1).cmp(&depth(&a.1)).then_with(|| b.cmp(a)));
        let mut n = 0;
        for (r, d) in v {
            let parent = dir_key(&d);
            let name = if parent.is_empty() { &d[..] } else { &d[parent.len() + 1..] };
            let (Ok(fd), Ok(c)) = (open_below(&self.roots[r as usize].path, parent), cstr(name)) else { continue };
            if unlinkat(fd.as_raw_fd(), &c, libc::AT_REMOVEDIR).is_ok() {
                n += 1;
            }
        }
        n
    }

    pub fn summary(&self, dirs: u64) -> RemoveSummary {
        let mut left = std::mem::take(&mut *self.left.lock().unwrap_or_else(|p| p.into_inner()));
        left.sort_by(|a, b| a.path.cmp(&b.path));
        RemoveSummary { files: self.removed.load(Relaxed), dirs, gone: self.gone.load(Relaxed), left, dry_run: false, would_remove: Vec::new() }
    }
}

/// A directory (source root, its key below it) and its descriptor, or why it did not open.
type OpenDir = ((u32, Vec<u8>), std::io::Result<OwnedFd>);

/// A reader of `f` from `pos` to `end` (positioned reads).
struct At<'f> {
    f: &'f File,
    pos: u64,
    end: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let got = self.f.read_at(&mut buf[..want], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_records_round_trip_and_damage_is_found() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.sources");
        let v = vec![Stamp { size: 7, mtime_ns: -3, ctime_ns: 5, ino: 1 << 40, dev: 9 }, Stamp { size: 0, mtime_ns: 1, ctime_ns: 2, ino: 3, dev: 4 }];
        write_sources(&p, &v).unwrap();
        assert_eq!(read_sources(&p, 2).unwrap().unwrap(), v);
        assert!(read_sources(&p, 3).is_err(), "another count");
        let mut b = fs::read(&p).unwrap();
        b[30] ^= 1;
        fs::write(&p, &b).unwrap();
        assert!(read_sources(&p, 2).is_err(), "a flipped bit");
        assert!(read_sources(&d.path().join("none"), 2).unwrap().is_none());
    }

    #[test]
    fn open_below_never_follows_a_symlink_below_the_root() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("root/a")).unwrap();
        fs::create_dir_all(d.path().join("outside")).unwrap();
        std::os::unix::fs::symlink(d.path().join("outside"), d.path().join("root/link")).unwrap();
        assert!(open_below(&d.path().join("root"), b"a").is_ok());
        let e = open_below(&d.path().join("root"), b"link").unwrap_err();
        assert!(matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)), "{e}");
    }

    #[test]
    fn compressed_members_are_checked_in_memory_and_streamed() {
        let samples: Vec<Vec<u8>> = (0..500).map(|i| format!("{{\"id\": {i}, \"caption\": \"a thing number {}\"}}", i * 7).into_bytes()).collect();
        let dict = codec::train_dict(&samples, 2048).unwrap();
        let d = tempfile::tempdir().unwrap();
        let opts = PackOptions::new(vec![], d.path().to_path_buf());
        let files = FileList::default();
        let raw: Vec<u8> = (0..300_000u32).flat_map(|i| format!("line {} of a long text\n", i % 977).into_bytes()).collect();
        for with_dict in [false, true] {
            let dict: &[u8] = if with_dict { &dict } else { &[] };
            let mut enc = codec::Encoder::new(crate::codec::Compress::Zstd(3), Some(dict));
            let mut frame = Vec::new();
            let c = enc.encode(&raw, &mut frame, true);
            assert_eq!(c, if with_dict { codec::ZSTD_DICT } else { codec::ZSTD });
            let p = d.path().join("shard");
            fs::write(&p, [&b"0123456789"[..], &frame, b"tail"].concat()).unwrap();
            let f = File::open(&p).unwrap();
            let e =
                crate::index::Entry { offset: 10, size: frame.len() as u64, key_off: 0, shard: 0, crc: crc32c::crc32c(&raw), raw: raw.len() as u64, codec: c };
            for in_memory in [u64::MAX, 0] {
                let mut rm = Remover::new(&opts, &[], &files, dict);
                rm.in_memory = in_memory;
                assert_eq!(rm.decoded_crc(&f, &p, &e).unwrap(), e.crc, "dict {with_dict}, in memory up to {in_memory}");
                let short = crate::index::Entry { raw: e.raw + 1, ..e };
                assert!(rm.decoded_crc(&f, &p, &short).is_err(), "a wrong original size is found");
            }
        }
    }

    #[test]
    fn dir_keys() {
        assert_eq!(dir_key(b"a/b/c"), b"a/b");
        assert_eq!(dir_key(b"c"), b"");
    }
}
