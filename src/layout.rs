//! The dataset directory contract: what a packds dataset directory holds and what packds may
//! do to one. Every other module (and, through `_core`, `python/packds/stage.py`) asks here.
//!
//! ```text
//! DATASET/manifest.json            written last: its presence marks the dataset complete
//! DATASET/index.pdsi               the binary index
//! DATASET/shard-NNNNN.tar | .h5    the shards (NNNNN: five or more digits)
//! DATASET/.pack-state/             an interrupted pack (per-shard indexes and source stamps, options, dictionary)
//! DATASET/part-I/ + part.json      one part of a partitioned pack, not merged yet
//! DATASET/.NAME.tmp                a file being written (renamed into place when complete)
//! ```
//!
//! The manifest itself (its type, its one constructor, loading) is [`crate::manifest`]; the names
//! it lists are checked here ([`check_manifest_names`]).

use crate::error::{Error, IoContext, Result};
use crate::manifest::Manifest;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const INDEX_FILE: &str = "index.pdsi";
/// The state of a pack in progress (removed when the pack completes).
pub const STATE_DIR: &str = ".pack-state";
/// Written last into a finished part's directory.
pub const PART_FILE: &str = "part.json";
const SHARD_PREFIX: &str = "shard-";
const PART_PREFIX: &str = "part-";
/// The extension of a per-shard index in [`STATE_DIR`].
const STATE_INDEX_EXT: &str = "pdsi";

/// How shards are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardFormat {
    /// POSIX pax tar.
    #[default]
    Tar,
    /// HDF5, written through an [`crate::pack::H5Writer`] (h5py on the Python side).
    H5,
}

impl ShardFormat {
    const ALL: [ShardFormat; 2] = [ShardFormat::Tar, ShardFormat::H5];

    /// The shard file extension, also the manifest's `shard_format`.
    pub fn ext(self) -> &'static str {
        match self {
            ShardFormat::Tar => "tar",
            ShardFormat::H5 => "h5",
        }
    }

    /// The format whose extension (or manifest `shard_format`) is `ext`.
    pub fn from_ext(ext: &str) -> Option<ShardFormat> {
        Self::ALL.into_iter().find(|f| f.ext() == ext)
    }
}

impl ShardFormat {
    pub const ACCEPTED: &'static str = "tar, h5";
}

impl std::str::FromStr for ShardFormat {
    type Err = Error;

    /// `tar`, `h5` (or `hdf5`).
    fn from_str(s: &str) -> Result<ShardFormat> {
        match s {
            "tar" => Ok(ShardFormat::Tar),
            "h5" | "hdf5" => Ok(ShardFormat::H5),
            _ => Err(Error::bad_choice("--format", s, "known", Self::ACCEPTED)),
        }
    }
}

impl std::fmt::Display for ShardFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.ext())
    }
}

/// `shard-NNNNN.EXT`, the name of shard `k`.
pub fn shard_name(k: usize, format: ShardFormat) -> String {
    format!("{SHARD_PREFIX}{k:05}.{}", format.ext())
}

/// `DIGITS` of `PREFIX DIGITS . EXT` (five digits or more), or None.
fn numbered<'a>(name: &'a str, prefix: &str, ext: &str) -> Option<&'a str> {
    let digits = name.strip_prefix(prefix)?.strip_suffix(ext)?.strip_suffix('.')?;
    (digits.len() >= 5 && digits.bytes().all(|b| b.is_ascii_digit())).then_some(digits)
}

/// The number and format of a shard named like [`shard_name`] makes them, or None.
pub fn parse_shard_name(name: &str) -> Option<(usize, ShardFormat)> {
    ShardFormat::ALL.into_iter().find_map(|f| Some((numbered(name, SHARD_PREFIX, f.ext())?.parse().ok()?, f)))
}

/// The per-shard index of shard `k` in [`STATE_DIR`].
pub fn state_index_name(k: usize) -> String {
    format!("{SHARD_PREFIX}{k:05}.{STATE_INDEX_EXT}")
}

/// The shard number of a per-shard index name ([`state_index_name`]), or None.
pub fn parse_state_index_name(name: &str) -> Option<usize> {
    numbered(name, SHARD_PREFIX, STATE_INDEX_EXT)?.parse().ok()
}

/// The extension of a per-shard record of the source files (size, mtime) in [`STATE_DIR`].
const STATE_STAMPS_EXT: &str = "stamps";

/// The record of the source files of shard `k` (as they were read) in [`STATE_DIR`].
pub fn state_stamps_name(k: usize) -> String {
    format!("{SHARD_PREFIX}{k:05}.{STATE_STAMPS_EXT}")
}

/// The shard number of a [`state_stamps_name`], or None.
pub fn parse_state_stamps_name(name: &str) -> Option<usize> {
    numbered(name, SHARD_PREFIX, STATE_STAMPS_EXT)?.parse().ok()
}

/// The extension of a per-shard record of the source files' identities (`--remove-source`).
const STATE_SOURCES_EXT: &str = "sources";

/// The record of the source files of shard `k` that `--remove-source` checks before removing
/// them (size, mtime, ctime, inode, device), in [`STATE_DIR`].
pub fn state_sources_name(k: usize) -> String {
    format!("{SHARD_PREFIX}{k:05}.{STATE_SOURCES_EXT}")
}

/// The shard number of a [`state_sources_name`], or None.
pub fn parse_state_sources_name(name: &str) -> Option<usize> {
    numbered(name, SHARD_PREFIX, STATE_SOURCES_EXT)?.parse().ok()
}

/// `part-I`: the directory part `p` of a partitioned pack writes into.
pub fn part_dir_name(p: u32) -> String {
    format!("{PART_PREFIX}{p}")
}

/// The directory of part `p` under `out`.
pub fn part_dir(out: &Path, p: u32) -> PathBuf {
    out.join(part_dir_name(p))
}

/// The part number of a [`part_dir_name`], or None.
pub fn parse_part_dir_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(PART_PREFIX)?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// `.NAME.tmp`: where `NAME` is written before it is renamed into place.
pub fn tmp_file_name(name: &str) -> String {
    format!(".{name}.tmp")
}

fn is_tmp_name(name: &str) -> bool {
    name.len() > ".tmp".len() && name.starts_with('.') && name.ends_with(".tmp")
}

/// The index file of version `version` of a dataset: [`INDEX_FILE`] as packed, then
/// `index-NNNNNN.pdsi` for each `pack --append` (a new name each time, so that the manifest,
/// written last, switches from one complete version to the next).
pub fn index_file_name(version: u64) -> String {
    if version <= 1 {
        INDEX_FILE.to_string()
    } else {
        format!("index-{version:06}.pdsi")
    }
}

/// The version of an index file name ([`index_file_name`]), or None.
pub fn parse_index_name(name: &str) -> Option<u64> {
    if name == INDEX_FILE {
        return Some(1);
    }
    let digits = name.strip_prefix("index-")?.strip_suffix(".pdsi")?;
    let v: u64 = digits.parse().ok().filter(|_| digits.len() >= 6 && digits.bytes().all(|b| b.is_ascii_digit()))?;
    (v >= 2 && index_file_name(v) == name).then_some(v)
}

/// Is `name` (an entry of a dataset directory) something packds writes there? Part
/// directories count by name; [`only_owned`] also looks inside them.
pub fn is_owned(name: &str) -> bool {
    name == MANIFEST_FILE
        || parse_index_name(name).is_some()
        || name == STATE_DIR
        || name == PART_FILE
        || parse_shard_name(name).is_some()
        || parse_part_dir_name(name).is_some()
        || is_tmp_name(name)
}

/// Is every entry of `dir` something packds writes (part directories included, looked into)?
/// Only then may packds clear or remove it.
pub fn only_owned(dir: &Path) -> Result<bool> {
    for e in fs::read_dir(dir).ctx("list directory", dir)? {
        let e = e.ctx("list directory", dir)?;
        let name = e.file_name();
        let Some(name) = name.to_str().filter(|n| is_owned(n)) else { return Ok(false) };
        if parse_part_dir_name(name).is_some() {
            let md = fs::symlink_metadata(e.path()).ctx("stat", e.path())?;
            if !md.is_dir() || !only_owned(&e.path())? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// A plain file name: not empty, no `/`, no NUL, not `.` or `..`.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Is `name` a shard file name a manifest may list (`shard-NNNNN.tar|.h5`, a plain name)?
pub fn valid_shard_file_name(name: &str) -> bool {
    is_plain_file_name(name) && parse_shard_name(name).is_some()
}

/// Checks every file name `m` lists: the index is its version's ([`index_file_name`]), every
/// shard a [`valid_shard_file_name`]. Everything that opens a file a manifest names relies on this.
pub fn check_manifest_names(m: &Manifest, manifest_path: &Path) -> Result<()> {
    let bad = |n: &str| Error::format(manifest_path, format!("bad file name {n:?} in {MANIFEST_FILE}"));
    if m.index.file != index_file_name(m.version) {
        return Err(bad(&m.index.file));
    }
    match m.shards.iter().find(|s| !valid_shard_file_name(&s.file)) {
        Some(s) => Err(bad(&s.file)),
        None => Ok(()),
    }
}

/// Opens a file of a dataset (its manifest, index or a shard) for reading and returns it with
/// its size. It must be a regular file (a symlink to one is fine: `packds index` links its
/// shards to the tar files): a FIFO, a device, a socket or a directory is refused with a
/// FormatError naming it, before anything is read from it (a FIFO would block, a device like
/// `/dev/zero` never ends). The open itself never blocks. `open_err` turns an error of the open
/// (a missing file, say) into the caller's error.
pub fn open_data_file(path: &Path, open_err: impl FnOnce(std::io::Error) -> Error) -> Result<(File, u64)> {
    let (f, md) = crate::fsx::open_read_nonblocking(path).map_err(open_err)?;
    if !md.is_file() {
        return Err(not_regular(path, &md));
    }
    Ok((f, md.len()))
}

/// The error for a dataset file that is not a regular file.
fn not_regular(path: &Path, md: &fs::Metadata) -> Error {
    Error::format_hint(
        path,
        format!("is {}, not a regular file (every file of a dataset must be one)", crate::fsx::file_kind(md)),
        "put the file packds wrote back in its place (a symlink to a regular file is fine), or copy or pack the dataset again",
    )
}

/// What a directory is, as far as packds is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    /// A complete dataset (it has its manifest).
    Dataset,
    /// A partitioned pack whose parts are not merged yet.
    UnmergedParts,
    /// A pack that was interrupted (its state directory is there, no manifest).
    InterruptedPack,
    /// A directory that is none of these.
    NotDataset,
    /// Nothing (or no directory) at that path.
    Missing,
}

impl DirKind {
    /// What is at `dir`.
    pub fn of(dir: &Path) -> DirKind {
        if !dir.is_dir() {
            DirKind::Missing
        } else if dir.join(MANIFEST_FILE).exists() {
            DirKind::Dataset
        } else if part_dir(dir, 0).is_dir() || part_dir(dir, 1).is_dir() {
            DirKind::UnmergedParts
        } else if dir.join(STATE_DIR).is_dir() {
            DirKind::InterruptedPack
        } else {
            DirKind::NotDataset
        }
    }

    /// A short name for it (what `_core.dataset_kind` returns).
    pub fn name(self) -> &'static str {
        match self {
            DirKind::Dataset => "dataset",
            DirKind::UnmergedParts => "parts",
            DirKind::InterruptedPack => "interrupted",
            DirKind::NotDataset => "none",
            DirKind::Missing => "missing",
        }
    }
}

/// Holds an exclusive flock on a dataset directory: one packds process writes it at a time.
pub struct DirLock {
    _file: File,
}

/// Locks `dir` (an existing directory) for writing, or says another process is writing it.
pub fn lock_dir(dir: &Path) -> Result<DirLock> {
    let f = File::open(dir).ctx("open", dir)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::usage(format!("another packds process is writing {}", dir.display()), "wait for it to finish, or write to another directory"));
    }
    Ok(DirLock { _file: f })
}

/// Removes everything in `dir`, the manifest first (so it stops being a dataset at once).
pub fn clear_dir(dir: &Path) -> Result<()> {
    let m = dir.join(MANIFEST_FILE);
    match fs::remove_file(&m) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io("remove", &m, e)),
        _ => crate::fsx::sync_dir(dir)?,
    }
    for e in fs::read_dir(dir).ctx("list directory", dir)? {
        let p = e.ctx("list directory", dir)?.path();
        let md = fs::symlink_metadata(&p).ctx("stat", &p)?;
        if md.is_dir() {
            fs::remove_dir_all(&p).ctx("remove", &p)?;
        } else {
            fs::remove_file(&p).ctx("remove", &p)?;
        }
    }
    Ok(())
}

/// How an output directory may be taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// `--force`: replace what is there (only files packds wrote).
    pub force: bool,
    /// `--resume`: finish the interrupted pack that is there.
    pub resume: bool,
    /// Whether the command has a `--resume` (its hint offers it).
    offers_resume: bool,
}

impl Mode {
    /// `packds pack` (and each part of a partitioned pack).
    pub fn pack(force: bool, resume: bool) -> Mode {
        Mode { force, resume, offers_resume: true }
    }

    /// `packds index` (no `--resume`).
    pub fn index(force: bool) -> Mode {
        Mode { force, resume: false, offers_resume: false }
    }
}

/// What [`OutputDir::prepare`] found.
pub enum Prepared {
    /// Ready to write (locked; cleared under `--force`).
    Open(OutputDir),
    /// `--resume` of a pack that had already completed: its manifest (leftover state removed).
    Complete(Box<Manifest>),
}

/// A locked output directory, ready to be written.
pub struct OutputDir {
    path: PathBuf,
    created: bool,
    _lock: DirLock,
}

impl OutputDir {
    /// The output preflight: creates `path` (its parent must exist) or checks what is there
    /// against `mode` (an existing directory must be empty, or `--force` over files packds
    /// wrote, or `--resume` of an interrupted pack), locks it, and clears it under `--force`
    /// without `--resume`.
    pub fn prepare(path: &Path, mode: Mode) -> Result<Prepared> {
        let created = match fs::symlink_metadata(path) {
            Ok(md) if md.is_dir() => {
                if mode.resume && !mode.force && path.join(MANIFEST_FILE).exists() {
                    return complete_dataset(path).map(|m| Prepared::Complete(Box::new(m)));
                }
                check_existing(path, mode)?;
                false
            }
            Ok(_) => return Err(Error::usage(format!("output {} exists and is not a directory", path.display()), "choose another -o")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_output_dir(path)?;
                true
            }
            Err(e) => return Err(Error::io("stat", path, e)),
        };
        let dir = OutputDir { path: path.to_path_buf(), created, _lock: lock_dir(path)? };
        if mode.force && !mode.resume {
            clear_dir(path)?;
        }
        Ok(Prepared::Open(dir))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Did [`OutputDir::prepare`] create the directory?
    pub fn created(&self) -> bool {
        self.created
    }

    /// Has a pack into it completed a shard (worth a `--resume`)?
    pub fn has_completed_shard(&self) -> bool {
        let state = self.path.join(STATE_DIR);
        fs::read_dir(state).map(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_str().and_then(parse_state_index_name).is_some()))).unwrap_or(false)
    }

    /// Removes the directory and everything in it (best effort: after a failure).
    pub fn remove(self) {
        let _ = fs::remove_dir_all(&self.path);
    }

    /// Removes everything in the directory, the manifest first.
    pub fn clear(&self) -> Result<()> {
        clear_dir(&self.path)
    }
}

/// `--resume` of a completed pack: a pack killed while it removed its state after writing the
/// manifest is complete; tidy up what it left.
fn complete_dataset(path: &Path) -> Result<Manifest> {
    let m = Manifest::load(path)?;
    let state = path.join(STATE_DIR);
    if state.exists() {
        let _lock = lock_dir(path)?;
        fs::remove_dir_all(&state).ctx("remove", &state)?;
    }
    Ok(m)
}

/// An existing output directory may be written when it is empty, under `--force` (if packds
/// wrote everything in it) or under `--resume` of an interrupted pack.
fn check_existing(path: &Path, mode: Mode) -> Result<()> {
    let empty = fs::read_dir(path).ctx("list directory", path)?.next().is_none();
    let interrupted = path.join(STATE_DIR).is_dir() && !path.join(MANIFEST_FILE).exists();
    if interrupted && mode.offers_resume && !mode.force && !mode.resume {
        return Err(Error::usage(
            format!("output {} holds an interrupted pack", path.display()),
            "add --resume to the same command to finish it (its completed shards are kept), or --force to start over",
        ));
    }
    if !(empty || mode.force || mode.resume && interrupted) {
        let hint = if mode.offers_resume {
            "pass --force to replace it, --resume to finish an interrupted pack, or choose another -o"
        } else {
            "pass --force to replace it, or choose another -o"
        };
        return Err(Error::usage(format!("output {} already exists", path.display()), hint));
    }
    if mode.force && !empty && !only_owned(path)? {
        return Err(Error::usage(
            format!("output {} holds files that packds did not write; refusing to delete them", path.display()),
            "choose another -o, or remove that directory yourself",
        ));
    }
    Ok(())
}

/// Creates a new output directory; a missing parent is a usage error with a hint.
fn create_output_dir(out: &Path) -> Result<()> {
    fs::create_dir(out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::usage(format!("cannot create {}: its parent directory does not exist", out.display()), "create the parent directory first")
        } else {
            Error::io("create directory", out, e)
        }
    })
}

// ------------------------------------------------------------------------------------------
// Staging: what a copy holds, whether a copy is current, removing a stale one.

/// One file a copy of the dataset holds, as its manifest records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFile {
    pub name: String,
    pub size: u64,
    /// XXH3-128 of the whole file (hex).
    pub xxh3_128: String,
}

/// What a stager copies: the index and every shard (sizes and hashes from the manifest), then
/// the manifest's exact bytes (last).
#[derive(Debug, Clone)]
pub struct CopyList {
    pub manifest: Vec<u8>,
    pub files: Vec<DataFile>,
}

impl CopyList {
    /// Reads the manifest of the dataset `dir` once (checked like [`Manifest::load`]).
    pub fn load(dir: &Path) -> Result<CopyList> {
        let manifest = Manifest::read_bytes(dir)?;
        let m = Manifest::parse(&manifest, &dir.join(MANIFEST_FILE))?;
        let mut files = vec![DataFile { name: m.index.file, size: m.index.size, xxh3_128: m.index.xxh3_128 }];
        files.extend(m.shards.into_iter().map(|s| DataFile { name: s.file, size: s.size, xxh3_128: s.xxh3_128 }));
        Ok(CopyList { manifest, files })
    }

    /// The bytes a copy takes: every file plus the manifest (saturating: a manifest may lie).
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().fold(self.manifest.len() as u64, |n, f| n.saturating_add(f.size))
    }

    /// Checks (with one `stat` each, no reads) that every listed file is under `dir`, a regular
    /// file (a symlink to one is fine) of its recorded size: a FormatError names the first one
    /// that is missing, a FIFO or a device, or of another size.
    pub fn check_present(&self, dir: &Path) -> Result<()> {
        for f in &self.files {
            let p = dir.join(&f.name);
            let md = fs::metadata(&p).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::format(&p, "file listed in manifest.json is missing")
                } else {
                    Error::io("stat", &p, e)
                }
            })?;
            if !md.is_file() {
                return Err(not_regular(&p, &md));
            }
            if md.len() != f.size {
                return Err(Error::format(&p, format!("is {} bytes, manifest.json says {} (truncated or replaced)", md.len(), f.size)));
            }
        }
        Ok(())
    }

    /// Does every listed file exist under `dir` with its recorded size?
    fn sizes_match(&self, dir: &Path) -> bool {
        self.files.iter().all(|f| fs::metadata(dir.join(&f.name)).is_ok_and(|md| md.is_file() && md.len() == f.size))
    }
}

/// Is `dest` an intact copy of the dataset `src`? Cheap: the manifests' bytes (which hold every
/// file's XXH3-128) and the files' sizes, not the data. Any error reads as "no".
pub fn is_current_copy(src: &Path, dest: &Path) -> bool {
    let (Ok(want), Ok(have)) = (Manifest::read_bytes(src), CopyList::load(dest)) else { return false };
    want == have.manifest && have.sizes_match(dest)
}

/// Is `dest` an intact dataset (every file its manifest lists, with its recorded size) whose
/// manifest `options` hold every item of `options` (a JSON object)?
pub fn is_intact_with_options(dest: &Path, options: &serde_json::Value) -> bool {
    let Ok(have) = CopyList::load(dest) else { return false };
    let Ok(m) = Manifest::parse(&have.manifest, &dest.join(MANIFEST_FILE)) else { return false };
    let Some(want) = options.as_object() else { return false };
    want.iter().all(|(k, v)| m.options.get(k) == Some(v)) && have.sizes_match(dest)
}

/// Removes the earlier (stale) copy of a dataset at `path`, refusing anything that is not a
/// directory of files packds wrote, or not all ours ([`staged_copy_trust`]). Nothing at `path` is fine.
pub fn remove_stale_copy(path: &Path) -> Result<()> {
    let refuse = || {
        Error::usage(
            format!("{} already exists and is not a staged copy packds can replace", path.display()),
            "remove it, or stage into another directory with --to DIR",
        )
    };
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("stat", path, e)),
        Ok(md) if !md.is_dir() => Err(refuse()),
        Ok(_) if !only_owned(path)? => Err(refuse()),
        Ok(_) => match not_all_mine(path) {
            Some(why) => Err(Error::usage(
                format!("{} is not a staged copy of yours ({why}); packds leaves it alone", path.display()),
                "stage into a directory only you can write (e.g. $SLURM_TMPDIR), or ask its owner to remove it",
            )),
            None => fs::remove_dir_all(path).ctx("remove", path),
        },
    }
}

/// Why not everything under `dir` (itself included, symlinks not followed) is owned by the
/// effective user, or None.
fn not_all_mine(dir: &Path) -> Option<String> {
    let me = euid();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let md = match fs::symlink_metadata(&d) {
            Ok(md) => md,
            Err(e) => return Some(format!("cannot stat {}: {e}", d.display())),
        };
        if md.uid() != me {
            return Some(format!("{} is owned by {}", d.display(), describe_uid(md.uid())));
        }
        if md.is_dir() {
            match fs::read_dir(&d) {
                Ok(rd) => todo.extend(rd.flatten().map(|e| e.path())),
                Err(e) => return Some(format!("cannot list {}: {e}", d.display())),
            }
        }
    }
    None
}

/// May a staged copy at some path be trusted as ours? (See [`staged_copy_trust`].)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Nothing there.
    Missing,
    /// Not ours (owned by another user, a symlink, not a plain file or directory of plain
    /// files): never reused, replaced or removed. The text says why.
    Foreign(String),
    /// Ours, but in a place another user could have changed (a directory they can write into
    /// that is not sticky, or a file they can write): reused only after a full re-verification.
    Shared(String),
    /// Ours, in a directory no other user can change: the cheap check (sizes and manifest) is enough.
    Private,
}

impl Trust {
    /// A short name (what `_core.staged_copy_trust` returns) and the reason.
    pub fn parts(&self) -> (&'static str, &str) {
        match self {
            Trust::Missing => ("missing", ""),
            Trust::Foreign(w) => ("foreign", w),
            Trust::Shared(w) => ("shared", w),
            Trust::Private => ("private", ""),
        }
    }
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// "uid N (name)" for messages.
pub fn describe_uid(uid: u32) -> String {
    // SAFETY: getpwuid returns NULL or a pointer to a static record, read at once.
    let name = unsafe {
        let pw = libc::getpwuid(uid);
        if pw.is_null() || (*pw).pw_name.is_null() {
            None
        } else {
            Some(std::ffi::CStr::from_ptr((*pw).pw_name).to_string_lossy().into_owned())
        }
    };
    match name {
        Some(n) => format!("uid {uid} ({n})"),
        None => format!("uid {uid}"),
    }
}

const OTHERS_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// Can another user than us change the entries of the directory `dir` (rename, replace, remove
/// them)? The reason, or None: `dir` must be owned by us or root, and either not group/world
/// writable or sticky.
pub fn others_can_replace_in(dir: &Path) -> Result<Option<String>> {
    let md = fs::metadata(dir).ctx("stat", dir)?;
    Ok(dir_open_to_others(dir, &md, euid()))
}

fn dir_open_to_others(dir: &Path, md: &fs::Metadata, me: u32) -> Option<String> {
    if md.uid() != me && md.uid() != 0 {
        return Some(format!("{} is owned by {}", dir.display(), describe_uid(md.uid())));
    }
    if md.mode() & OTHERS_WRITE != 0 && md.mode() & STICKY == 0 {
        return Some(format!("{} is writable by other users (mode {:o}, not sticky)", dir.display(), md.mode() & 0o7777));
    }
    None
}

/// Can another user than us change what the path `dir` leads to: replace `dir` or any
/// directory above it, or a symbolic link on the way? Every directory from `/` down to `dir`
/// (as resolved) must pass [`others_can_replace_in`], except that a sticky directory others can
/// write (`/tmp`, `/dev/shm`) is fine when the entry below it is ours or root's (in a sticky
/// directory only an entry's owner can rename or remove it). Every symbolic link on the path as
/// given must be ours or root's, in a directory that passes the same rule. The reason, or None.
pub fn others_can_replace_along(dir: &Path) -> Result<Option<String>> {
    let me = euid();
    let abs = if dir.is_absolute() { dir.to_path_buf() } else { std::env::current_dir().ctx("getcwd", dir)?.join(dir) };
    // symbolic links on the path as given
    let mut at = PathBuf::new();
    for c in abs.components() {
        at.push(c);
        let Ok(md) = fs::symlink_metadata(&at) else { break };
        if md.file_type().is_symlink() && md.uid() != me && md.uid() != 0 {
            return Ok(Some(format!("{} is a symbolic link owned by {}", at.display(), describe_uid(md.uid()))));
        }
    }
    let canon = fs::canonicalize(&abs).ctx("resolve", &abs)?;
    let mut at = PathBuf::new();
    let mut sticky_shared_parent: Option<PathBuf> = None;
    for c in canon.components() {
        at.push(c);
        let md = fs::metadata(&at).ctx("stat", &at)?;
        if let Some(p) = &sticky_shared_parent {
            if md.uid() != me && md.uid() != 0 {
                return Ok(Some(format!("{} (in the shared directory {}) is owned by {}", at.display(), p.display(), describe_uid(md.uid()))));
            }
        }
        if let Some(w) = dir_open_to_others(&at, &md, me) {
            return Ok(Some(w));
        }
        sticky_shared_parent = (md.mode() & OTHERS_WRITE != 0 && md.mode() & STICKY != 0).then(|| at.clone());
    }
    Ok(None)
}

/// Whether the staged copy at `path` (a dataset directory or one staged file) is provably ours:
/// `path` and every entry in it (plain files only) owned by the effective user and writable by
/// nobody else, not a symlink; and whether its directory lets other users replace it
/// or any directory above it ([`others_can_replace_along`]). Errors reading it count as
/// [`Trust::Foreign`].
pub fn staged_copy_trust(path: &Path) -> Trust {
    let me = euid();
    let md = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Trust::Missing,
        Err(e) => return Trust::Foreign(format!("cannot stat {}: {e}", path.display())),
        Ok(md) => md,
    };
    let foreign_why = |p: &Path, md: &fs::Metadata| -> Option<String> {
        if md.file_type().is_symlink() {
            Some(format!("{} is a symbolic link", p.display()))
        } else if md.uid() != me {
            Some(format!("{} is owned by {}", p.display(), describe_uid(md.uid())))
        } else {
            None
        }
    };
    if let Some(w) = foreign_why(path, &md) {
        return Trust::Foreign(w);
    }
    let mut writable = None;
    let mut note_writable = |p: &Path, md: &fs::Metadata| {
        if md.mode() & OTHERS_WRITE != 0 && writable.is_none() {
            writable = Some(format!("{} is writable by other users (mode {:o})", p.display(), md.mode() & 0o7777));
        }
    };
    note_writable(path, &md);
    if md.is_dir() {
        let rd = match fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) => return Trust::Foreign(format!("cannot list {}: {e}", path.display())),
        };
        for e in rd {
            let Ok(e) = e else { return Trust::Foreign(format!("cannot list {}", path.display())) };
            let p = e.path();
            let Ok(emd) = fs::symlink_metadata(&p) else { return Trust::Foreign(format!("cannot stat {}", p.display())) };
            if let Some(w) = foreign_why(&p, &emd) {
                return Trust::Foreign(w);
            }
            if !emd.is_file() {
                return Trust::Foreign(format!("{} is not a plain file", p.display()));
            }
            note_writable(&p, &emd);
        }
    } else if !md.is_file() {
        return Trust::Foreign(format!("{} is neither a directory nor a plain file", path.display()));
    }
    if let Some(w) = writable {
        return Trust::Shared(w);
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match others_can_replace_along(parent) {
        Ok(None) => Trust::Private,
        Ok(Some(w)) => Trust::Shared(w),
        Err(e) => Trust::Shared(e.to_string()),
    }
}

/// Opens `path` for reading without following a symlink, and checks it is a plain file owned by
/// the effective user.
fn open_own_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path).ctx("open", path)?;
    let md = f.metadata().ctx("stat", path)?;
    if !md.is_file() || md.uid() != euid() {
        return Err(Error::format(path, format!("is not a plain file of {}", describe_uid(euid()))));
    }
    Ok(f)
}

/// The size and XXH3-128 of the file `f` (read whole).
fn hash_file(mut f: File, path: &Path) -> Result<(u64, u128)> {
    use std::io::Read;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut n = 0u64;
    loop {
        let got = match f.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r.ctx("read", path)?,
        };
        if got == 0 {
            return Ok((n, h.digest128()));
        }
        h.update(&buf[..got]);
        n += got as u64;
    }
}

/// Reads every byte of the staged copy `dest` and checks it: with `src` (a dataset) against
/// the source's manifest (its exact bytes, then every file's size and XXH3-128); without,
/// against the copy's own manifest (a dataset packed on the fly from a loose tree). Every file
/// must be a plain file of ours (opened without following symlinks). The first difference is
/// the error.
pub fn verify_copy(src: Option<&Path>, dest: &Path) -> Result<()> {
    let mp = dest.join(MANIFEST_FILE);
    open_own_file(&mp)?;
    let have = CopyList::load(dest)?;
    let want = match src {
        Some(src) => {
            let want = CopyList::load(src)?;
            if want.manifest != have.manifest {
                return Err(Error::format(&mp, format!("differs from {}", src.join(MANIFEST_FILE).display())));
            }
            want
        }
        None => have,
    };
    for f in &want.files {
        let p = dest.join(&f.name);
        let (n, h) = hash_file(open_own_file(&p)?, &p)?;
        if n != f.size {
            return Err(Error::format(&p, format!("is {n} bytes, manifest.json says {}", f.size)));
        }
        if crate::manifest::hex128(h) != f.xxh3_128 {
            return Err(Error::Checksum { key: format!("{} (XXH3-128 of the whole file differs from manifest.json)", f.name), shard: p });
        }
    }
    Ok(())
}

/// Reads both files whole and checks that the staged file `dest` (a plain file of ours) holds
/// the bytes of `src`.
pub fn verify_file_copy(src: &Path, dest: &Path) -> Result<()> {
    let a = hash_file(File::open(src).ctx("open", src)?, src)?;
    let b = hash_file(open_own_file(dest)?, dest)?;
    if a != b {
        return Err(Error::Checksum { key: format!("{} (XXH3-128 of the whole file differs from the source)", dest.display()), shard: src.to_path_buf() });
    }
    Ok(())
}

/// A name for the staged copy of `source` (its canonical path) when `name` is taken by another
/// source or by another user: `NAME-<8 hex digits>.EXT` (8 hex digits of the XXH3-64 of the source
/// path, before the last extension), e.g. `train.pds` -> `train-1a2b3c4d.pds`.
pub fn disambiguated_name(name: &str, source: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let tag = format!("{:08x}", xxhash_rust::xxh3::xxh3_64(source.as_os_str().as_bytes()) as u32);
    match name.rfind('.') {
        Some(i) if i > 0 => format!("{}-{tag}{}", &name[..i], &name[i..]),
        _ => format!("{name}-{tag}"),
    }
}

/// What decides whether a dataset packed from a loose tree is still current: its regular files
/// (not following symlinks), their bytes and newest mtime, plus an estimate of the packed size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeFingerprint {
    pub files: u64,
    pub bytes: u64,
    pub mtime_ns_max: i64,
    /// Tar headers and padding included, plus 1 MiB for the index and manifest.
    pub packed_estimate: u64,
}

/// Walks the tree `dir` (unreadable entries are passed over) and fingerprints it.
pub fn tree_fingerprint(dir: &Path) -> TreeFingerprint {
    let mut fp = TreeFingerprint::default();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = fs::symlink_metadata(e.path()) else { continue };
            if md.is_dir() {
                todo.push(e.path());
            } else if md.is_file() {
                fp.files += 1;
                fp.bytes += md.len();
                fp.packed_estimate += 1536 + md.len().div_ceil(512) * 512; // pax + ustar header, padding
                fp.mtime_ns_max = fp.mtime_ns_max.max(md.mtime().saturating_mul(1_000_000_000).saturating_add(md.mtime_nsec()));
            }
        }
    }
    fp.packed_estimate += 1 << 20;
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_names_cover_both_shard_formats() {
        for n in ["manifest.json", "index.pdsi", ".pack-state", "part.json", "part-0", "part-12", ".shard-00001.tar.tmp", ".index.pdsi.tmp"] {
            assert!(is_owned(n), "{n}");
        }
        for f in [ShardFormat::Tar, ShardFormat::H5] {
            let n = shard_name(3, f);
            assert!(is_owned(&n) && valid_shard_file_name(&n), "{n}");
            assert_eq!(parse_shard_name(&n), Some((3, f)));
            assert_eq!(ShardFormat::from_ext(f.ext()), Some(f));
        }
        assert!(is_owned("shard-123456.h5"));
        for n in [
            "shard-0001.tar",
            "shard-00001.zip",
            "shard-00001.tar.gz",
            "shard-abcde.tar",
            "part-",
            "part-x",
            ".tmp",
            "data.h5",
            "notes.txt",
            "shard-00001.pdsi",
        ] {
            assert!(!is_owned(n), "{n}");
        }
        assert_eq!(parse_state_index_name(&state_index_name(7)), Some(7));
        assert_eq!(parse_part_dir_name(&part_dir_name(4)), Some(4));
        assert_eq!(tmp_file_name("index.pdsi"), ".index.pdsi.tmp");
    }

    #[test]
    fn paths_others_can_change() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let mine = t.path().join("mine");
        fs::create_dir(&mine).unwrap();
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(&mine, fs::Permissions::from_mode(0o755)).unwrap();
        // the temporary directory's own ancestors (/tmp: root's, sticky) are fine
        assert_eq!(others_can_replace_along(&mine).unwrap(), None);
        // a group-writable directory above the destination, not sticky
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o770)).unwrap();
        let w = others_can_replace_along(&mine).unwrap().expect("group-writable parent");
        assert!(w.contains("writable by other users"), "{w}");
        // sticky: fine, because the entry below it is ours
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(others_can_replace_along(&mine).unwrap(), None);
        // the destination itself open to others (not sticky) and a symlink of ours on the way
        fs::set_permissions(&mine, fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink(&mine, t.path().join("link")).unwrap();
        assert!(others_can_replace_along(&t.path().join("link")).unwrap().is_some());
        fs::set_permissions(&mine, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(others_can_replace_along(&t.path().join("link")).unwrap(), None);
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn manifest_names_must_be_plain_shard_names() {
        for n in ["../x", "a/b", "/etc/passwd", "", "shard-00001.tar\0", "..", ".", "../shard-00001.tar", "sub/shard-00001.h5", "manifest.json", "index.pdsi"] {
            assert!(!valid_shard_file_name(n), "{n:?}");
        }
        assert!(valid_shard_file_name("shard-00000.tar") && valid_shard_file_name("shard-00042.h5"));
    }

    #[test]
    fn only_owned_looks_into_part_dirs_and_stale_copies_are_removed_only_then() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("ds");
        fs::create_dir_all(d.join("part-1").join(STATE_DIR)).unwrap();
        for n in ["manifest.json", "index.pdsi", "shard-00000.tar", "shard-00001.h5", ".x.tmp", "part-1/part.json"] {
            fs::write(d.join(n), b"x").unwrap();
        }
        assert!(only_owned(&d).unwrap());
        fs::write(d.join("part-1/mine.txt"), b"x").unwrap();
        assert!(!only_owned(&d).unwrap());
        let e = remove_stale_copy(&d).unwrap_err().to_string();
        assert!(e.contains("is not a staged copy packds can replace"), "{e}");
        fs::remove_file(d.join("part-1/mine.txt")).unwrap();
        remove_stale_copy(&d).unwrap();
        assert!(!d.exists());
        remove_stale_copy(&d).unwrap();
    }

    #[test]
    fn dir_kinds() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        assert_eq!(DirKind::of(&d.join("nope")), DirKind::Missing);
        assert_eq!(DirKind::of(d), DirKind::NotDataset);
        fs::create_dir(d.join(STATE_DIR)).unwrap();
        assert_eq!(DirKind::of(d), DirKind::InterruptedPack);
        fs::create_dir(d.join("part-0")).unwrap();
        assert_eq!(DirKind::of(d), DirKind::UnmergedParts);
        fs::write(d.join(MANIFEST_FILE), b"{}").unwrap();
        assert_eq!(DirKind::of(d), DirKind::Dataset);
    }

    #[test]
    fn preflight_refuses_foreign_files_and_creates_only_under_an_existing_parent() {
        let t = tempfile::tempdir().unwrap();
        let e = OutputDir::prepare(&t.path().join("a/b"), Mode::pack(false, false)).err().unwrap().to_string();
        assert!(e.contains("its parent directory does not exist"), "{e}");
        let d = t.path().join("out");
        fs::create_dir(&d).unwrap();
        fs::write(d.join("mine.txt"), b"x").unwrap();
        let e = OutputDir::prepare(&d, Mode::index(false)).err().unwrap().to_string();
        assert!(e.contains("already exists"), "{e}");
        let e = OutputDir::prepare(&d, Mode::pack(true, false)).err().unwrap().to_string();
        assert!(e.contains("holds files that packds did not write"), "{e}");
        fs::remove_file(d.join("mine.txt")).unwrap();
        fs::write(d.join("shard-00000.h5"), b"x").unwrap();
        let Prepared::Open(o) = OutputDir::prepare(&d, Mode::pack(true, false)).unwrap() else { panic!("not open") };
        assert!(!o.created() && fs::read_dir(&d).unwrap().next().is_none());
        let e = lock_dir(&d).err().unwrap().to_string();
        assert!(e.contains("another packds process is writing"), "{e}");
    }

    #[test]
    fn staged_copy_trust_and_disambiguated_names() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let d = t.path().join("ds.pds");
        assert_eq!(staged_copy_trust(&d), Trust::Missing);
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(d.join("manifest.json"), b"{}").unwrap();
        fs::set_permissions(d.join("manifest.json"), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(staged_copy_trust(&d), Trust::Private);
        fs::set_permissions(d.join("manifest.json"), fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(staged_copy_trust(&d), Trust::Shared(w) if w.contains("writable by other users")));
        fs::set_permissions(d.join("manifest.json"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(staged_copy_trust(&d), Trust::Shared(w) if w.contains("not sticky")));
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(staged_copy_trust(&d), Trust::Private);
        std::os::unix::fs::symlink(&d, t.path().join("link.pds")).unwrap();
        assert!(matches!(staged_copy_trust(&t.path().join("link.pds")), Trust::Foreign(w) if w.contains("symbolic link")));
        std::os::unix::fs::symlink("/etc/passwd", d.join("index.pdsi")).unwrap();
        assert!(matches!(staged_copy_trust(&d), Trust::Foreign(_)));
        let src = Path::new("/project/a/train.pds");
        let n = disambiguated_name("train.pds", src);
        assert!(n.starts_with("train-") && n.ends_with(".pds") && n.len() == "train-12345678.pds".len(), "{n}");
        assert_ne!(n, disambiguated_name("train.pds", Path::new("/project/b/train.pds")));
        assert_eq!(n, disambiguated_name("train.pds", src));
        assert!(disambiguated_name("data", src).starts_with("data-"));
        assert!(disambiguated_name(".hidden", src).starts_with(".hidden-"));
    }
}
