//! Parallel discovery of the input tree.
//!
//! Directories are listed by a small pool of threads (on a network filesystem every `readdir`
//! and `stat` is a round-trip, so several must be in flight). Nothing is filtered silently:
//! hidden files are included, symlinks / FIFOs / sockets / devices are reported as skipped
//! (never opened), and the result is sorted byte-wise by key so that packing the same tree twice
//! gives the same shards.

use crate::error::{Error, Result};
use globset::{Candidate, GlobSet};
use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};

/// The files to pack: keys (paths relative to their source root, `/`-separated, raw bytes) in
/// one arena, plus 16 bytes per file. About key length + 16 bytes per file in all.
#[derive(Debug, Default, Clone)]
pub struct FileList {
    arena: Vec<u8>,
    items: Vec<FileItem>,
}

#[derive(Debug, Clone, Copy)]
struct FileItem {
    off: u64,
    len: u32,
    root: u32,
}

impl FileList {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn push(&mut self, key: &[u8], root: u32) {
        self.items.push(FileItem { off: self.arena.len() as u64, len: key.len() as u32, root });
        self.arena.extend_from_slice(key);
    }

    fn append(&mut self, other: FileList) {
        let base = self.arena.len() as u64;
        self.arena.extend_from_slice(&other.arena);
        self.items.extend(other.items.iter().map(|it| FileItem { off: it.off + base, ..*it }));
    }

    fn item_key(&self, it: &FileItem) -> &[u8] {
        &self.arena[it.off as usize..it.off as usize + it.len as usize]
    }

    pub fn key(&self, i: usize) -> &[u8] {
        self.item_key(&self.items[i])
    }

    /// Which source root file `i` came from.
    pub fn root(&self, i: usize) -> u32 {
        self.items[i].root
    }

    /// Where file `i` is read from.
    pub fn path(&self, i: usize, roots: &[SourceRoot]) -> PathBuf {
        let it = &self.items[i];
        let r = &roots[it.root as usize];
        if r.is_file {
            r.path.clone()
        } else {
            r.path.join(OsStr::from_bytes(self.item_key(it)))
        }
    }

    fn sort(&mut self) {
        let arena = &self.arena;
        let key = |it: &FileItem| &arena[it.off as usize..it.off as usize + it.len as usize];
        self.items.sort_unstable_by(|a, b| key(a).cmp(key(b)));
    }
}

/// A source given on the command line.
#[derive(Debug, Clone)]
pub struct SourceRoot {
    pub path: PathBuf,
    /// A single file given directly: its key is its file name.
    pub is_file: bool,
}

/// Something the walk left out, and why.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// `--on-error`: what a file that cannot be read does to the pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop with the error (the default).
    #[default]
    Fail,
    /// Leave the file out and list it with the reason.
    Skip,
}

impl OnError {
    pub const ACCEPTED: &'static str = "fail, skip";

    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Fail => "fail",
            OnError::Skip => "skip",
        }
    }
}

impl std::str::FromStr for OnError {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<OnError> {
        match s {
            "fail" => Ok(OnError::Fail),
            "skip" => Ok(OnError::Skip),
            _ => Err(crate::Error::bad_choice("--on-error", s, "known", Self::ACCEPTED)),
        }
    }
}

impl std::fmt::Display for OnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub struct WalkOptions {
    pub follow_symlinks: bool,
    pub include: Option<GlobSet>,
    pub exclude: Option<GlobSet>,
    pub threads: usize,
    pub on_error: OnError,
    /// (dev, ino) of directories never to enter (the output directory).
    pub prune: Vec<(u64, u64)>,
}

pub struct WalkResult {
    pub roots: Vec<SourceRoot>,
    pub files: FileList,
    pub skipped: Vec<Skipped>,
    /// Directories with nothing in them (see [`EmptyDir`]), sorted by key.
    pub empty_dirs: Vec<EmptyDir>,
}

/// A directory that is empty in the source (no entry at all), not excluded, and matched by an
/// `--include` pattern when there are any. A directory whose entries were all excluded or
/// skipped is not one: it was not empty. Kept so that `unpack` (and `tar -x` of a tar shard)
/// recreates it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EmptyDir {
    /// Its path relative to its source root, `/`-separated (UTF-8: a name that is not is
    /// listed as skipped instead, as `manifest.json` cannot record it).
    pub key: String,
    pub mode: u32,
    pub mtime: i64,
    pub uid: u32,
    pub gid: u32,
}

struct Ancestors {
    dev_ino: (u64, u64),
    parent: Option<Arc<Ancestors>>,
}

impl Ancestors {
    fn contains(&self, id: (u64, u64)) -> bool {
        let mut cur = Some(self);
        while let Some(a) = cur {
            if a.dev_ino == id {
                return true;
            }
            cur = a.parent.as_deref();
        }
        false
    }
}

struct DirJob {
    root: u32,
    rel: Vec<u8>,
    abs: PathBuf,
    ancestors: Arc<Ancestors>,
    /// Recorded as an [`EmptyDir`] when it has no entries (None: a source root, or filtered out).
    keep_empty: Option<EmptyDir>,
}

struct Queue {
    jobs: VecDeque<DirJob>,
    active: usize,
    failed: bool,
}

/// What the walk's threads found: files, skipped entries, the first error, empty directories.
type Found = (FileList, Vec<Skipped>, Option<Error>, Vec<EmptyDir>);

struct Shared<'a> {
    opts: &'a WalkOptions,
    /// Set by the caller to stop the walk (Ctrl-C, SIGTERM): checked before every directory
    /// entry, so a walk over a slow filesystem stops within one metadata round-trip.
    cancel: &'a AtomicBool,
    queue: Mutex<Queue>,
    cv: Condvar,
    out: Mutex<Found>,
}

fn lossy(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Walks every source and returns the files sorted by key; `cancel` stops it
/// ([`Error::Cancelled`]).
pub fn walk(sources: &[PathBuf], opts: &WalkOptions, cancel: &AtomicBool) -> Result<WalkResult> {
    let mut roots = Vec::new();
    let mut files = FileList::default();
    let mut skipped = Vec::new();
    let mut jobs = VecDeque::new();
    for (i, src) in sources.iter().enumerate() {
        let md = fs::metadata(src).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::usage(format!("source {} does not exist", src.display()), "check the path (a source is a directory or a file)")
            }
            _ => Error::io("stat", src, e),
        })?;
        let root = i as u32;
        if md.is_file() {
            let name = src.file_name().ok_or_else(|| Error::usage(format!("source {} has no file name", src.display()), "name a file or a directory"))?;
            roots.push(SourceRoot { path: src.clone(), is_file: true });
            files.push(name.as_bytes(), root);
        } else if md.is_dir() {
            roots.push(SourceRoot { path: src.clone(), is_file: false });
            let ancestors = Arc::new(Ancestors { dev_ino: (md.dev(), md.ino()), parent: None });
            jobs.push_back(DirJob { root, rel: Vec::new(), abs: src.clone(), ancestors, keep_empty: None });
        } else {
            return Err(Error::usage(format!("source {} is neither a regular file nor a directory", src.display()), "name a directory or regular files"));
        }
    }
    let shared = Shared {
        opts,
        cancel,
        queue: Mutex::new(Queue { jobs, active: 0, failed: false }),
        cv: Condvar::new(),
        out: Mutex::new((FileList::default(), Vec::new(), None, Vec::new())),
    };
    let nthreads = opts.threads.clamp(1, 256);
    if crate::pool::scoped_workers(nthreads, "packds-walk", &|| worker(&shared)) == 0 {
        worker(&shared); // no thread could be started (ulimit -u): walk on this one
    }
    let (f, mut sk, err, empty_dirs) = shared.out.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = err {
        return Err(e);
    }
    files.append(f);
    skipped.append(&mut sk);
    files.sort();
    for i in 1..files.len() {
        if files.key(i - 1) == files.key(i) {
            let a = files.path(i - 1, &roots);
            let b = files.path(i, &roots);
            return Err(Error::usage(
                format!("two sources give the same key {:?}: {} and {}", String::from_utf8_lossy(files.key(i)), a.display(), b.display()),
                "keys are paths relative to each source; pack these sources separately or rename one",
            ));
        }
    }
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    let empty_dirs = empty_in_all(empty_dirs, &files, &roots, sources)?;
    Ok(WalkResult { roots, files, skipped, empty_dirs })
}

/// The directories empty in their source that stay empty once every source is packed, sorted:
/// one that another source has a file in, or another empty directory in, is not (that source
/// makes it). A file of one source with the name of an empty directory of another is refused,
/// as two files with one key are.
fn empty_in_all(mut dirs: Vec<EmptyDir>, files: &FileList, roots: &[SourceRoot], sources: &[PathBuf]) -> Result<Vec<EmptyDir>> {
    dirs.sort_by(|a, b| a.key.cmp(&b.key));
    dirs.dedup_by(|a, b| a.key == b.key); // the same empty directory under two sources
    if sources.len() < 2 {
        return Ok(dirs);
    }
    // First file whose key is at least `k`.
    let first_at = |k: &[u8]| {
        let (mut lo, mut hi) = (0, files.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if files.key(mid) < k {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    };
    let mut keep = Vec::with_capacity(dirs.len());
    for d in &dirs {
        let k = d.key.as_bytes();
        let i = first_at(k);
        if i < files.len() && files.key(i) == k {
            return Err(Error::usage(
                format!("one source has a file {:?} ({}), another an empty directory of that name", d.key, files.path(i, roots).display()),
                "keys are paths relative to each source; pack these sources separately or rename one",
            ));
        }
        let under = [k, b"/"].concat();
        let i = first_at(&under);
        let has_file = i < files.len() && files.key(i).starts_with(&under);
        let p = dirs.partition_point(|e| e.key.as_bytes() < &under[..]);
        let has_dir = dirs.get(p).is_some_and(|e| e.key.as_bytes().starts_with(&under));
        if !has_file && !has_dir {
            keep.push(d.clone());
        }
    }
    Ok(keep)
}

fn worker(sh: &Shared) {
    loop {
        let job = {
            let mut q = sh.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if q.failed {
                    return;
                }
                if let Some(j) = q.jobs.pop_front() {
                    q.active += 1;
                    break j;
                }
                if q.active == 0 {
                    sh.cv.notify_all();
                    return;
                }
                q = sh.cv.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let mut files = FileList::default();
        let mut skipped = Vec::new();
        let mut subdirs = Vec::new();
        let res = list_dir(sh.opts, sh.cancel, &job, &mut files, &mut skipped, &mut subdirs);
        {
            let mut out = sh.out.lock().unwrap_or_else(|p| p.into_inner());
            out.0.append(files);
            out.1.append(&mut skipped);
            if let (Ok(true), Some(d)) = (&res, job.keep_empty) {
                out.3.push(d);
            }
            if let Err(e) = res {
                if out.2.is_none() {
                    out.2 = Some(e);
                }
                drop(out);
                let mut q = sh.queue.lock().unwrap_or_else(|p| p.into_inner());
                q.failed = true;
                sh.cv.notify_all();
                return;
            }
        }
        let mut q = sh.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.jobs.extend(subdirs);
        q.active -= 1;
        sh.cv.notify_all();
    }
}

fn child_key(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parent.len() + 1 + name.len());
    if !parent.is_empty() {
        k.extend_from_slice(parent);
        k.push(b'/');
    }
    k.extend_from_slice(name);
    k
}

fn matches(set: &Option<GlobSet>, key: &[u8]) -> bool {
    set.as_ref().is_some_and(|s| s.is_match_candidate(&Candidate::new(OsStr::from_bytes(key))))
}

/// What a directory entry is to the walk, after following a symlink when asked to.
enum Kind {
    Dir,
    File,
    /// Left out, with the reason listed in the manifest.
    Skip(String),
}

fn kind_of(opts: &WalkOptions, job: &DirJob, abs: &Path, ft: fs::FileType) -> Kind {
    if !ft.is_symlink() {
        return if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else {
            let kind = if ft.is_fifo() { "FIFO" } else { "special file (socket or device)" };
            Kind::Skip(format!("{kind}, not a regular file"))
        };
    }
    if !opts.follow_symlinks {
        return Kind::Skip("symlink (use --follow-symlinks to follow)".into());
    }
    match fs::metadata(abs) {
        Ok(md) if md.is_dir() && job.ancestors.contains((md.dev(), md.ino())) => Kind::Skip("symlink loop".into()),
        Ok(md) if md.is_dir() => Kind::Dir,
        Ok(md) if md.is_file() => Kind::File,
        Ok(_) => Kind::Skip("symlink to a special file".into()),
        Err(e) => Kind::Skip(format!("broken symlink: {e}")),
    }
}

/// Lists one directory; returns whether it had no entries at all.
fn list_dir(
    opts: &WalkOptions,
    cancel: &AtomicBool,
    job: &DirJob,
    files: &mut FileList,
    skipped: &mut Vec<Skipped>,
    subdirs: &mut Vec<DirJob>,
) -> Result<bool> {
    let skip_or_fail = |skipped: &mut Vec<Skipped>, path: &Path, err: std::io::Error, op: &'static str| -> Result<()> {
        match opts.on_error {
            OnError::Fail => Err(Error::io(op, path, err)),
            OnError::Skip => {
                skipped.push(Skipped { path: lossy(path), reason: format!("cannot {op}: {err}") });
                Ok(())
            }
        }
    };
    let rd = match fs::read_dir(&job.abs) {
        Ok(rd) => rd,
        Err(e) => return skip_or_fail(skipped, &job.abs, e, "list directory").map(|()| false),
    };
    let mut empty = true;
    for ent in rd {
        empty = false;
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let ent = match ent {
            Ok(e) => e,
            Err(e) => return skip_or_fail(skipped, &job.abs, e, "list directory").map(|()| false),
        };
        let key = child_key(&job.rel, ent.file_name().as_bytes());
        let abs = ent.path();
        let ft = match ent.file_type() {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // deleted meanwhile
            Err(e) => {
                skip_or_fail(skipped, &abs, e, "stat")?;
                continue;
            }
        };
        match kind_of(opts, job, &abs, ft) {
            Kind::Skip(reason) => skipped.push(Skipped { path: lossy(&abs), reason }),
            Kind::Dir if matches(&opts.exclude, &key) => {}
            Kind::Dir => {
                let md = match fs::metadata(&abs) {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        skip_or_fail(skipped, &abs, e, "stat")?;
                        continue;
                    }
                };
                let id = (md.dev(), md.ino());
                if opts.prune.contains(&id) {
                    skipped.push(Skipped { path: lossy(&abs), reason: "the output directory (never packed into itself)".into() });
                    continue;
                }
                let keep_empty = empty_dir_record(opts, &key, &abs, &md, skipped);
                let ancestors = Arc::new(Ancestors { dev_ino: id, parent: Some(job.ancestors.clone()) });
                subdirs.push(DirJob { root: job.root, rel: key, abs, ancestors, keep_empty });
            }
            Kind::File => {
                if !matches(&opts.exclude, &key) && (opts.include.is_none() || matches(&opts.include, &key)) {
                    files.push(&key, job.root);
                }
            }
        }
    }
    Ok(empty)
}

/// What directory `key` is recorded as if it turns out empty: None when `--include` patterns are
/// given and none matches it, or when its name is not UTF-8 (listed in `skipped` when it is
/// empty: `manifest.json` cannot record the name).
fn empty_dir_record(opts: &WalkOptions, key: &[u8], abs: &Path, md: &fs::Metadata, skipped: &mut Vec<Skipped>) -> Option<EmptyDir> {
    if opts.include.is_some() && !matches(&opts.include, key) {
        return None;
    }
    let Ok(k) = std::str::from_utf8(key) else {
        if fs::read_dir(abs).is_ok_and(|mut rd| rd.next().is_none()) {
            skipped.push(Skipped { path: lossy(abs), reason: "empty directory whose name is not UTF-8 (manifest.json cannot record it)".into() });
        }
        return None;
    };
    Some(EmptyDir { key: k.to_string(), mode: md.mode() & 0o7777, mtime: md.mtime(), uid: md.uid(), gid: md.gid() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> WalkOptions {
        WalkOptions { follow_symlinks: false, include: None, exclude: None, threads: 4, on_error: OnError::Fail, prune: vec![] }
    }

    #[test]
    fn sorted_bytewise_with_hidden_and_odd_files() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::write(r.join("a-c"), b"1").unwrap();
        fs::write(r.join("a/b/x"), b"2").unwrap();
        fs::write(r.join(".hidden"), b"3").unwrap();
        std::os::unix::fs::symlink("a-c", r.join("link")).unwrap();
        let res = walk(&[r.to_path_buf()], &opts(), &AtomicBool::new(false)).unwrap();
        let keys: Vec<_> = (0..res.files.len()).map(|i| String::from_utf8_lossy(res.files.key(i)).into_owned()).collect();
        assert_eq!(keys, vec![".hidden", "a-c", "a/b/x"]);
        assert_eq!(res.skipped.len(), 1);
        assert!(res.skipped[0].reason.contains("symlink"));
    }

    #[test]
    fn follows_symlinks_and_detects_loops() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("d")).unwrap();
        fs::write(r.join("d/f"), b"1").unwrap();
        std::os::unix::fs::symlink("..", r.join("d/up")).unwrap();
        std::os::unix::fs::symlink("f", r.join("d/g")).unwrap();
        let mut o = opts();
        o.follow_symlinks = true;
        let res = walk(&[r.to_path_buf()], &o, &AtomicBool::new(false)).unwrap();
        let keys: Vec<_> = (0..res.files.len()).map(|i| String::from_utf8_lossy(res.files.key(i)).into_owned()).collect();
        assert_eq!(keys, vec!["d/f", "d/g"]);
        assert!(res.skipped.iter().any(|s| s.reason == "symlink loop"));
    }

    #[test]
    fn empty_directories_are_found_and_filtered() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for p in ["a/e1", "a/b/e2.jpg", "x/e3", "f"] {
            fs::create_dir_all(r.join(p)).unwrap();
        }
        fs::write(r.join("f/k.jpg"), b"1").unwrap();
        fs::create_dir(r.join("g")).unwrap();
        fs::write(r.join("g/gone.tmp"), b"2").unwrap();
        let dirs =
            |o: &WalkOptions| -> Vec<String> { walk(&[r.to_path_buf()], o, &AtomicBool::new(false)).unwrap().empty_dirs.into_iter().map(|d| d.key).collect() };
        assert_eq!(dirs(&opts()), ["a/b/e2.jpg", "a/e1", "x/e3"]);
        let mut o = opts();
        o.exclude = crate::pack::globset(&["x".into(), "*.tmp".into()], "exclude").unwrap();
        assert_eq!(dirs(&o), ["a/b/e2.jpg", "a/e1"]); // "g" held only an excluded file: not empty
        o.include = crate::pack::globset(&["*.jpg".into()], "include").unwrap();
        assert_eq!(dirs(&o), ["a/b/e2.jpg"]);
        // Two sources: a directory empty in one but not in the other is not empty; a file of
        // one named like an empty directory of the other is refused; a name that is not UTF-8
        // is listed as skipped.
        let s2 = tempfile::tempdir().unwrap();
        for p in ["x/e3/sub", "a", "f"] {
            fs::create_dir_all(s2.path().join(p)).unwrap();
        }
        fs::write(s2.path().join("a/e1"), b"3").unwrap();
        let both = [r.to_path_buf(), s2.path().to_path_buf()];
        let e = walk(&both, &opts(), &AtomicBool::new(false)).err().unwrap().to_string();
        assert!(e.contains("an empty directory of that name") && e.contains("a/e1"), "{e}");
        fs::remove_file(s2.path().join("a/e1")).unwrap();
        fs::create_dir(s2.path().join(OsStr::from_bytes(b"bad\xff"))).unwrap();
        let res = walk(&both, &opts(), &AtomicBool::new(false)).unwrap();
        let got: Vec<_> = res.empty_dirs.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(got, ["a/b/e2.jpg", "a/e1", "x/e3/sub"]);
        assert!(res.skipped.iter().any(|s| s.reason.contains("not UTF-8")), "{:?}", res.skipped);
    }

    #[test]
    fn a_cancelled_walk_stops_with_cancelled() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..50 {
            std::fs::create_dir_all(d.path().join(format!("d{i}"))).unwrap();
            std::fs::write(d.path().join(format!("d{i}/f")), b"x").unwrap();
        }
        let e = walk(&[d.path().to_path_buf()], &opts(), &AtomicBool::new(true)).err().unwrap();
        assert!(matches!(e, Error::Cancelled), "{e}");
    }
}
