//! The pack pipeline: walk → parallel open/read/CRC (a pool of I/O threads) → one writer that
//! lays members into tar shards in key order → index → manifest (last).
//!
//! Crash safety: a shard is written as `.shard-NNNNN.tar.tmp`, fsynced and renamed; then a
//! per-shard index goes into `.pack-state/`. The final index and `manifest.json` are written
//! atomically at the end and `.pack-state/` is removed. A directory without `manifest.json` is
//! never opened as a dataset. `--resume` reuses every shard that has its per-shard index.
//!
//! Memory: the in-flight window holds at most `window` files of at most `small_max` bytes each;
//! larger files are streamed by the writer. The index costs 32 bytes + key length per file.

use crate::codec::{self, Compress, Encoder};
use crate::error::{Error, IoContext, Result};
use crate::fsx;
use crate::index::{Index, IndexBuilder, ShardInfo};
use crate::manifest::{self, hex128, IndexRecord, Manifest, ShardRecord};
use crate::tar::{self, Meta};
use crate::walk::{self, FileList, OnError, Skipped, SourceRoot, WalkOptions};
use globset::{Glob, GlobSet, GlobSetBuilder};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};
use std::time::Instant;
use xxhash_rust::xxh3::Xxh3;

pub const STATE_DIR: &str = ".pack-state";
const STATE_OPTIONS: &str = "options.json";
pub const DEFAULT_SHARD_SIZE: u64 = 1 << 30;
const STREAM_CHUNK: usize = 1 << 20;
const INFLIGHT_BYTES: usize = 256 << 20;
const WRITEBACK_EVERY: u64 = 32 << 20;

/// How shards are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardFormat {
    /// POSIX pax tar.
    #[default]
    Tar,
    /// HDF5, written through a [`H5Writer`] (h5py on the Python side).
    H5,
}

impl ShardFormat {
    pub fn ext(self) -> &'static str {
        match self {
            ShardFormat::Tar => "tar",
            ShardFormat::H5 => "h5",
        }
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

pub fn shard_name(k: usize, format: ShardFormat) -> String {
    format!("shard-{k:05}.{}", format.ext())
}

/// What an HDF5 shard writer gets: the per-sample columns of one shard (little-endian arrays,
/// data offsets relative to the start of the shard's data array). It creates the HDF5 file at
/// `path` with a contiguous `data` array of `data_len` bytes allocated but not written, and
/// returns that array's byte offset in the file; packds then writes the data there itself.
pub struct H5Shard<'a> {
    pub path: &'a Path,
    pub data_len: u64,
    pub offsets: Vec<u8>,
    pub sizes: Vec<u8>,
    pub raw_sizes: Vec<u8>,
    pub codecs: Vec<u8>,
    pub crcs: Vec<u8>,
    pub keys: &'a [u8],
    pub key_offsets: Vec<u8>,
    pub dict: &'a [u8],
    pub compression: String,
}

/// Creates an HDF5 shard skeleton (see [`H5Shard`]); returns the data array's file offset.
#[derive(Clone)]
pub struct H5Writer(pub std::sync::Arc<H5WriteFn>);

/// The function behind an [`H5Writer`].
pub type H5WriteFn = dyn Fn(&H5Shard) -> Result<u64> + Send + Sync;

impl std::fmt::Debug for H5Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("H5Writer")
    }
}

/// The dictionary a pack trains (`--zstd-dict`), kept in the state directory for `--resume`.
const STATE_DICT: &str = "zstd.dict";
/// Dictionary training reads at most this many samples, and this much of each.
const DICT_SAMPLES: usize = 4000;
const DICT_SAMPLE_BYTES: usize = 64 << 10;

fn shard_state_name(k: usize) -> String {
    format!("shard-{k:05}.pdsi")
}

#[derive(Debug, Clone)]
pub struct PackOptions {
    pub sources: Vec<PathBuf>,
    pub output: PathBuf,
    pub shard_size: u64,
    /// I/O threads; 0 = automatic (see [`auto_threads`]).
    pub threads: usize,
    pub follow_symlinks: bool,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub on_error: OnError,
    pub force: bool,
    pub resume: bool,
    /// Recorded verbatim in the manifest's `options`.
    pub options_json: serde_json::Value,
    pub compress: Compress,
    /// Train a zstd dictionary of at most this many bytes on the input (0: none).
    pub dict_size: usize,
    pub format: ShardFormat,
    /// Needed for `ShardFormat::H5`.
    pub h5_writer: Option<H5Writer>,
    /// `--part I/N`: pack only part I of N of the plan into `output/part-I/` (see [`crate::plan`]).
    pub part: Option<(u32, u32)>,
    /// `--plan FILE`: the file list and shard boundaries, made once by `packds plan`.
    pub plan: Option<PathBuf>,
}

/// What a pack covers when it is one part of a plan: files `range` of the plan's list, shards
/// starting at the plan's `cuts` (file indices), numbered from `first_shard`.
pub struct Selection<'a> {
    pub roots: &'a [SourceRoot],
    pub files: &'a FileList,
    pub skipped: Vec<Skipped>,
    pub range: std::ops::Range<usize>,
    pub cuts: &'a [u64],
    pub first_shard: usize,
}

/// The bytes a file takes in a shard before compression: what `--shard-size` counts. Shard
/// boundaries depend only on these (never on compressed sizes), so a plan made from `stat`
/// sizes predicts them exactly.
pub fn planned_len(format: ShardFormat, key: &[u8], meta: &Meta) -> u64 {
    match format {
        ShardFormat::Tar => tar::header_len(key, meta) + meta.size + tar::padding(meta.size),
        ShardFormat::H5 => meta.size,
    }
}

/// Room kept at the end of every shard (the tar end blocks).
pub const SHARD_END: u64 = tar::END.len() as u64;

/// Shard boundaries for files of these planned lengths: the file indices where shards start.
pub fn plan_cuts(lens: impl IntoIterator<Item = u64>, shard_size: u64) -> Vec<u64> {
    let mut cuts = vec![0u64];
    let (mut pos, mut any) = (0u64, false);
    for (i, l) in lens.into_iter().enumerate() {
        if any && pos + l + SHARD_END > shard_size {
            cuts.push(i as u64);
            pos = 0;
        }
        pos += l;
        any = true;
    }
    cuts
}

impl PackOptions {
    pub fn new(sources: Vec<PathBuf>, output: PathBuf) -> Self {
        PackOptions {
            sources,
            output,
            shard_size: DEFAULT_SHARD_SIZE,
            threads: 0,
            follow_symlinks: false,
            include: vec![],
            exclude: vec![],
            on_error: OnError::Fail,
            force: false,
            resume: false,
            options_json: serde_json::Value::Null,
            compress: Compress::None,
            dict_size: 0,
            format: ShardFormat::Tar,
            h5_writer: None,
            part: None,
            plan: None,
        }
    }
}

/// Filesystems where every metadata call and read is a network round-trip: latency-bound, so
/// many requests must be in flight (statfs f_type magic numbers).
const NETWORK_FS: &[(i64, &str)] = &[
    (0x0BD0_0BD0, "lustre"),
    (0x4750_4653, "gpfs"),
    (0x6969, "nfs"),
    (0x6573_5546, "fuse"),
    (0xFF53_4D42, "cifs"),
    (0xFE53_4D42, "smb2"),
    (0x1983_0326, "beegfs"),
    (0x00C3_6400, "ceph"),
    (0x5346_414F, "afs"),
];

/// Is `path` on a network (latency-bound) filesystem? Returns its name when it is.
pub fn network_fs(path: &Path) -> Option<&'static str> {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str())).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a statfs struct to fill.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let t = st.f_type as i64;
    NETWORK_FS.iter().find(|(m, _)| *m == t).map(|(_, n)| *n)
}

/// Default I/O threads: 32 when reading from a network filesystem (requests mostly wait on
/// the network), else 4 per available CPU (capped at 16): on a local disk or page cache the
/// work is CPU-bound and more threads only contend.
pub fn auto_threads(src: &Path) -> usize {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    if network_fs(src).is_some() {
        32
    } else {
        (cpus * 4).clamp(4, 16)
    }
}

/// Counters the caller may read while a pack runs (progress), and a cancel switch.
#[derive(Default)]
pub struct Progress {
    /// 0 walking, 1 packing, 2 finishing, 3 done.
    pub phase: AtomicU8,
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
    pub cancel: AtomicBool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PackSummary {
    pub output: PathBuf,
    pub files: u64,
    pub bytes: u64,
    pub shards: u64,
    pub resumed_shards: u64,
    pub skipped: Vec<Skipped>,
    pub seconds: f64,
    /// The dataset was already complete (`--resume` on a finished pack): nothing was done.
    pub already_complete: bool,
}

pub(crate) fn globset(pats: &[String], what: &str) -> Result<Option<GlobSet>> {
    if pats.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in pats {
        let g = Glob::new(p).map_err(|e| Error::usage(format!("bad --{what} pattern {p:?}: {e}"), "see the glob syntax in `packds pack --help`"))?;
        b.add(g);
    }
    b.build().map(Some).map_err(|e| Error::usage(format!("bad --{what} patterns: {e}"), "check the patterns"))
}

/// Test-only fault injection (`PACKDS_FAULT=kill-after-shards:N` or `kill-after-files:N`): the
/// process kills itself with SIGKILL at that point, as a node failure would.
/// `pack-slow-us:N` makes every file read N µs slower (to reach a moment in the middle of a pack).
#[derive(Clone, Copy, Default)]
struct Fault {
    after_shards: Option<u64>,
    after_files: Option<u64>,
    slow_us: Option<u64>,
    /// Killed after the N-th HDF5 shard skeleton is written, before its data goes in.
    in_h5: Option<u64>,
}

impl Fault {
    fn from_env() -> Fault {
        let mut f = Fault::default();
        if let Ok(v) = std::env::var("PACKDS_FAULT") {
            if let Some((what, n)) = v.split_once(':') {
                let n = n.parse().ok();
                match what {
                    "kill-after-shards" => f.after_shards = n,
                    "kill-after-files" => f.after_files = n,
                    "pack-slow-us" => f.slow_us = n,
                    "kill-in-h5-shard" => f.in_h5 = n,
                    _ => {}
                }
            }
        }
        f
    }

    fn check(limit: Option<u64>, count: u64) {
        if limit == Some(count) {
            // SAFETY: raising a signal in our own process.
            unsafe {
                libc::raise(libc::SIGKILL);
            }
        }
    }
}

/// Is every entry of `dir` something packds writes? (Only then may `--force` clear it.)
/// Creates a new output directory; a missing parent is a usage error with a hint.
pub(crate) fn create_output_dir(out: &Path) -> Result<()> {
    fs::create_dir(out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::usage(format!("cannot create {}: its parent directory does not exist", out.display()), "create the parent directory first")
        } else {
            Error::io("create directory", out, e)
        }
    })
}

pub(crate) fn only_packds_files(dir: &Path) -> Result<bool> {
    for e in fs::read_dir(dir).ctx("list directory", dir)? {
        let e = e.ctx("list directory", dir)?;
        let n = e.file_name();
        let n = n.to_string_lossy();
        let ours = n == manifest::FILE
            || n == manifest::INDEX_FILE
            || n == STATE_DIR
            || (n.starts_with("shard-") && (n.ends_with(".tar") || n.ends_with(".h5")))
            || (n.starts_with('.') && n.ends_with(".tmp"));
        if !ours {
            return Ok(false);
        }
    }
    Ok(true)
}

fn clear_dir(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).ctx("list directory", dir)? {
        let p = e.ctx("list directory", dir)?.path();
        if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(&p).ctx("remove", &p)?;
        } else {
            fs::remove_file(&p).ctx("remove", &p)?;
        }
    }
    Ok(())
}

/// Holds an exclusive flock on the output directory for the life of the pack.
pub(crate) struct DirLock {
    _file: File,
}

pub(crate) fn lock_dir(dir: &Path) -> Result<DirLock> {
    let f = File::open(dir).ctx("open", dir)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::usage(format!("another packds process is writing {}", dir.display()), "wait for it to finish, or write to another directory"));
    }
    Ok(DirLock { _file: f })
}

/// What the stored state says about completed shards (for `--resume`).
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct StateOptions {
    shard_size: u64,
    sources: Vec<String>,
    #[serde(default)]
    format: ShardFormat,
    #[serde(default)]
    compress: String,
    #[serde(default)]
    dict_size: usize,
}

/// Packs `opts.sources` into `opts.output` (or one part of a plan: see [`crate::plan`]).
pub fn pack(opts: &PackOptions, progress: &Progress) -> Result<PackSummary> {
    if opts.part.is_some() {
        return crate::plan::pack_part(opts, progress);
    }
    pack_selected(opts, progress, None)
}

/// Packs into `opts.output`: everything the walk finds, or the files of `sel`.
pub fn pack_selected(opts: &PackOptions, progress: &Progress, sel: Option<&Selection>) -> Result<PackSummary> {
    let t0 = Instant::now();
    let out = &opts.output;
    if opts.shard_size < 4096 {
        return Err(Error::usage(format!("--shard-size {} is too small", opts.shard_size), "use at least 4 KiB (default 1 GiB)"));
    }
    if opts.format == ShardFormat::H5 && opts.h5_writer.is_none() {
        return Err(Error::usage("HDF5 shards are written through h5py", "pack with the packds Python package (`packds pack --format h5`), which has h5py"));
    }
    if opts.dict_size > 0 && opts.compress.is_none() {
        return Err(Error::usage("--zstd-dict needs compression", "add --compress zstd (or auto)"));
    }
    if opts.dict_size > 0 && !(256..=(16 << 20)).contains(&opts.dict_size) {
        return Err(Error::usage(format!("--zstd-dict size {} is out of range", opts.dict_size), "use 256 bytes to 16 MiB (default 112 KiB)"));
    }
    let mut created = false;
    match fs::symlink_metadata(out) {
        Ok(md) if md.is_dir() => {
            if out.join(manifest::FILE).exists() && opts.resume && !opts.force {
                let m = Manifest::load(out)?;
                // A pack killed while it removed its state after writing the manifest is
                // complete; tidy up what it left.
                if out.join(STATE_DIR).exists() {
                    let _lock = lock_dir(out)?;
                    fs::remove_dir_all(out.join(STATE_DIR)).ctx("remove", out.join(STATE_DIR))?;
                }
                progress.phase.store(3, Relaxed);
                return Ok(PackSummary {
                    output: out.clone(),
                    files: m.samples,
                    bytes: m.total_bytes,
                    shards: m.shards.len() as u64,
                    resumed_shards: m.shards.len() as u64,
                    skipped: m.skipped,
                    seconds: t0.elapsed().as_secs_f64(),
                    already_complete: true,
                });
            }
            let empty = fs::read_dir(out).ctx("list directory", out)?.next().is_none();
            if !(empty || opts.force || opts.resume && out.join(STATE_DIR).is_dir()) {
                return Err(Error::usage(
                    format!("output {} already exists", out.display()),
                    "pass --force to replace it, --resume to finish an interrupted pack, or choose another -o",
                ));
            }
            if opts.force && !only_packds_files(out)? {
                return Err(Error::usage(
                    format!("output {} holds files that packds did not write; refusing to delete them", out.display()),
                    "choose another -o, or remove that directory yourself",
                ));
            }
        }
        Ok(_) => {
            return Err(Error::usage(format!("output {} exists and is not a directory", out.display()), "choose another -o"));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::pack::create_output_dir(out)?;
            created = true;
        }
        Err(e) => return Err(Error::io("stat", out, e)),
    }
    let lock = lock_dir(out)?;
    let res = pack_locked(opts, progress, t0, sel);
    if res.is_err() && created {
        // Nothing worth resuming unless a shard was completed.
        let has_shards =
            fs::read_dir(out.join(STATE_DIR)).map(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".pdsi")))).unwrap_or(false);
        if !has_shards {
            let _ = fs::remove_dir_all(out);
        }
    }
    drop(lock);
    res
}

fn pack_locked(opts: &PackOptions, progress: &Progress, t0: Instant, sel: Option<&Selection>) -> Result<PackSummary> {
    let out = &opts.output;
    let mut resolved;
    let opts = if opts.threads == 0 {
        resolved = opts.clone();
        resolved.threads = opts.sources.first().map_or(8, |s| auto_threads(s));
        &resolved
    } else {
        opts
    };
    if opts.force && !opts.resume {
        clear_dir(out)?;
    }
    let out_md = fs::metadata(out).ctx("stat", out)?;
    let wopts = WalkOptions {
        follow_symlinks: opts.follow_symlinks,
        include: globset(&opts.include, "include")?,
        exclude: globset(&opts.exclude, "exclude")?,
        threads: opts.threads.min(64),
        on_error: opts.on_error,
        prune: vec![(out_md.dev(), out_md.ino())],
    };
    progress.phase.store(0, Relaxed);
    let walked_own;
    let (roots, files, walk_skipped, range, cuts, first_shard) = match sel {
        Some(sel) => (sel.roots, sel.files, sel.skipped.clone(), sel.range.clone(), Some(sel.cuts), sel.first_shard),
        None => {
            walked_own = walk::walk(&opts.sources, &wopts)?;
            let n = walked_own.files.len();
            (&walked_own.roots[..], &walked_own.files, walked_own.skipped.clone(), 0..n, None, 0)
        }
    };
    if files.is_empty() {
        let srcs: Vec<String> = opts.sources.iter().map(|s| s.display().to_string()).collect();
        return Err(Error::usage(
            format!("no files to pack in {} ({} entries skipped)", srcs.join(", "), walk_skipped.len()),
            "check the source path and the --include/--exclude patterns",
        ));
    }
    progress.files_total.store(range.len() as u64, Relaxed);
    progress.phase.store(1, Relaxed);

    let state = out.join(STATE_DIR);
    let state_opts = StateOptions {
        shard_size: opts.shard_size,
        sources: opts.sources.iter().map(|s| s.display().to_string()).collect(),
        format: opts.format,
        compress: opts.compress.name(),
        dict_size: opts.dict_size,
    };
    // Resume: take every completed shard whose keys match the walk, in order.
    // Per-shard indexes of completed shards (mapped files in .pack-state/); the final index is
    // streamed from them, so the pack never holds the whole index in memory.
    let mut parts: Vec<Index> = Vec::new();
    let mut shard_records = Vec::new();
    let mut start = range.start;
    let mut resumed = 0u64;
    // The state is usable once its options file exists (written before any shard).
    if opts.resume && state.join(STATE_OPTIONS).is_file() {
        let prev: StateOptions = manifest::read_json(&state.join(STATE_OPTIONS))?;
        if prev.shard_size != opts.shard_size {
            return Err(Error::usage(
                format!("the interrupted pack in {} used --shard-size {}, not {}", out.display(), prev.shard_size, opts.shard_size),
                "resume with the same options, or start over with --force",
            ));
        }
        if (prev.format, &prev.compress, prev.dict_size) != (opts.format, &state_opts.compress, opts.dict_size) {
            return Err(Error::usage(
                format!(
                    "the interrupted pack in {} used --format {} --compress {}{}",
                    out.display(),
                    prev.format.ext(),
                    prev.compress,
                    if prev.dict_size > 0 { format!(" --zstd-dict {}", prev.dict_size) } else { String::new() }
                ),
                "resume with the same options, or start over with --force",
            ));
        }
        let mut k = first_shard;
        loop {
            let ip = state.join(shard_state_name(k));
            let sp = out.join(shard_name(k, opts.format));
            if !ip.exists() {
                break;
            }
            let ix = Index::open(&ip)?;
            let info = ix.shards().first().cloned().ok_or_else(|| Error::format(&ip, "per-shard index without a shard"))?;
            let actual = fs::metadata(&sp).map(|m| m.len()).unwrap_or(u64::MAX);
            if actual != info.size {
                break; // shard missing or damaged: write it again from here
            }
            let n = ix.len();
            let matches = start + n <= range.end && (0..n).all(|i| ix.key(i).ok() == Some(files.key(start + i)));
            if !matches {
                return Err(Error::usage(format!("the source tree changed since the pack into {} was interrupted", out.display()), "start over with --force"));
            }
            shard_records.push(ShardRecord { file: shard_name(k, opts.format), size: info.size, samples: n as u64, xxh3_128: hex128(info.hash) });
            start += n;
            parts.push(ix);
            k += 1;
            resumed += 1;
            progress.files_done.store((start - range.start) as u64, Relaxed);
        }
        // Anything after the first gap is rewritten.
        for e in fs::read_dir(&state).ctx("list directory", &state)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(num) = name.strip_prefix("shard-").and_then(|r| r.strip_suffix(".pdsi")).and_then(|r| r.parse::<usize>().ok()) {
                if num >= k {
                    fs::remove_file(e.path()).ctx("remove", e.path())?;
                }
            }
        }
    } else {
        if state.exists() {
            fs::remove_dir_all(&state).ctx("remove", &state)?;
        }
        fs::create_dir(&state).ctx("create directory", &state)?;
        fsx::write_atomic(&state.join(STATE_OPTIONS), &serde_json::to_vec(&state_opts).unwrap_or_default())?;
        fsx::sync_dir(out)?;
    }

    // The dictionary: trained once, before any shard, and kept for --resume.
    let dict = if opts.dict_size > 0 {
        let dp = state.join(STATE_DICT);
        match fs::read(&dp) {
            Ok(d) if opts.resume => d,
            _ => {
                let d = train_dict(opts, roots, files)?;
                fsx::write_atomic(&dp, &d)?;
                d
            }
        }
    } else {
        Vec::new()
    };

    let mut skipped = walk_skipped;
    let sel = PipeRange { start, end: range.end, first_file: range.start, first_shard: first_shard + shard_records.len(), cuts };
    run_pipeline(opts, progress, roots, files, &sel, &dict, &mut parts, &mut shard_records, &mut skipped)?;

    // Final index, then manifest (last: its presence marks the dataset complete).
    progress.phase.store(2, Relaxed);
    let index_path = out.join(manifest::INDEX_FILE);
    let coded = !opts.compress.is_none();
    let ix = crate::index::concat(&parts, &index_path, coded.then_some(&dict[..]))?;
    drop(parts);
    let total_bytes = ix.total_bytes;
    let compression = coded.then(|| manifest::CompressionRecord {
        mode: opts.compress.name(),
        stored_bytes: ix.stored_bytes,
        zstd_dict: (!dict.is_empty()).then(|| manifest::DictRecord { size: dict.len() as u64, xxh3_128: hex128(xxhash_rust::xxh3::xxh3_128(&dict)) }),
    });
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    let m = Manifest {
        format: manifest::FORMAT_NAME.into(),
        format_version: if coded { 2 } else { 1 },
        shard_format: opts.format.ext().into(),
        tool: format!("packds {}", crate::VERSION),
        created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        options: opts.options_json.clone(),
        samples: ix.samples,
        total_bytes,
        index: IndexRecord { file: manifest::INDEX_FILE.into(), size: ix.file_size, xxh3_128: hex128(ix.xxh3_128) },
        shards: shard_records,
        skipped: skipped.clone(),
        compression,
    };
    fsx::write_atomic(&out.join(manifest::FILE), &m.to_json()?)?;
    fs::remove_dir_all(&state).ctx("remove", &state)?;
    fsx::sync_dir(out)?;
    progress.phase.store(3, Relaxed);
    Ok(PackSummary {
        output: out.clone(),
        files: m.samples,
        bytes: total_bytes,
        shards: m.shards.len() as u64,
        resumed_shards: resumed,
        skipped,
        seconds: t0.elapsed().as_secs_f64(),
        already_complete: false,
    })
}

/// What an I/O thread hands the writer for one file.
enum Item {
    /// A whole member (tar: header, stored data, padding; h5: the stored data); the data starts
    /// at `hlen` and has `stored` bytes, encoded with `codec`; `crc` is of the original bytes.
    /// `planned` is its [`planned_len`], computed here in parallel, off the writer's path.
    Small {
        meta: Meta,
        member: Vec<u8>,
        hlen: usize,
        crc: u32,
        stored: u64,
        codec: u8,
        planned: u64,
    },
    Large {
        meta: Meta,
        file: File,
        path: PathBuf,
    },
    Skip(Skipped),
    Fail(Error),
}

fn meta_of(md: &fs::Metadata) -> Meta {
    Meta { size: md.len(), mode: md.mode(), mtime: md.mtime(), uid: md.uid(), gid: md.gid() }
}

/// Each I/O thread's own compression state and scratch buffers.
struct WorkerState {
    enc: Option<Encoder>,
    data: Vec<u8>,
    frame: Vec<u8>,
}

/// The tar member name of a sample: its key, plus `.zst` when it is stored compressed, so that
/// a plain `tar -x` followed by `zstd -d` on the `.zst` members restores the tree.
fn member_name(key: &[u8], codec: u8) -> std::borrow::Cow<'_, [u8]> {
    if codec == codec::RAW {
        std::borrow::Cow::Borrowed(key)
    } else {
        std::borrow::Cow::Owned([key, b".zst"].concat())
    }
}

/// With compression on, a tar member ending in `.zst` always is a packds frame: a key that
/// ends so is compressed even when that does not pay.
fn force_compress(format: ShardFormat, key: &[u8]) -> bool {
    format == ShardFormat::Tar && key.ends_with(b".zst")
}

/// Reads exactly `want` bytes from `f` onto the end of `buf`; an extra byte (the file grew) or
/// a short read (it shrank) is a `Changed` error.
fn read_exact_file(f: &File, path: &Path, buf: &mut Vec<u8>, want: usize) -> Result<()> {
    buf.reserve(want + 1);
    let mut got = 0;
    loop {
        // Each read asks for everything left plus one byte: getting less means end of file.
        // Straight into the spare capacity: no zero-filling of a buffer about to be overwritten.
        let spare = &mut buf.spare_capacity_mut()[..want + 1 - got];
        // SAFETY: reads at most spare.len() bytes into memory the Vec owns (uninitialised is
        // fine for read(2)); only the bytes the kernel reports written are then marked as set.
        let k = unsafe { libc::read(f.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
        if k < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("read", path, e));
        }
        if k == 0 {
            break;
        }
        // SAFETY: the kernel initialised exactly k bytes after the current length.
        unsafe { buf.set_len(buf.len() + k as usize) };
        got += k as usize;
        if got >= want {
            break;
        }
    }
    if got != want {
        let what = if got > want { format!("it grew past {want} bytes") } else { format!("size was {want} bytes at open, {got} bytes were read") };
        return Err(Error::Changed { path: path.to_path_buf(), what });
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn read_one(path: &Path, key: &[u8], follow: bool, small_max: u64, buf: Vec<u8>, format: ShardFormat, ws: &mut WorkerState) -> Result<Item> {
    let mut oo = OpenOptions::new();
    oo.read(true);
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    oo.custom_flags(flags);
    let f = oo.open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            Error::Changed { path: path.to_path_buf(), what: "it became a symlink".into() }
        } else {
            Error::io("open", path, e)
        }
    })?;
    let md = f.metadata().ctx("stat", path)?;
    if !md.is_file() {
        return Err(Error::Changed { path: path.to_path_buf(), what: "it is no longer a regular file".into() });
    }
    let meta = meta_of(&md);
    if meta.size > small_max {
        return Ok(Item::Large { meta, file: f, path: path.to_path_buf() });
    }
    let want = meta.size as usize;
    let tar = format == ShardFormat::Tar;
    let mut member = buf;
    member.clear();
    if let Some(enc) = ws.enc.as_mut() {
        // Compressing: read, checksum and encode here (in parallel), then lay out the member.
        ws.data.clear();
        read_exact_file(&f, path, &mut ws.data, want)?;
        let crc = crc32c::crc32c(&ws.data);
        let codec = enc.encode(&ws.data, &mut ws.frame, force_compress(format, key));
        let stored: &[u8] = if codec == codec::RAW { &ws.data } else { &ws.frame };
        let hlen = if tar { tar::write_header(&mut member, &member_name(key, codec), &Meta { size: stored.len() as u64, ..meta }) } else { 0 };
        member.extend_from_slice(stored);
        if tar {
            member.resize(member.len() + tar::padding(stored.len() as u64) as usize, 0);
        }
        let planned = planned_len(format, key, &meta);
        return Ok(Item::Small { meta, member, hlen, crc, stored: stored.len() as u64, codec, planned });
    }
    // The whole member is built here, in parallel: header, data, padding. The writer then only
    // appends it.
    let hlen = if tar { tar::write_header(&mut member, key, &meta) } else { 0 };
    member.reserve(want + tar::padding(meta.size) as usize + 1);
    read_exact_file(&f, path, &mut member, want)?;
    let crc = crc32c::crc32c(&member[hlen..]);
    if tar {
        member.resize(hlen + want + tar::padding(meta.size) as usize, 0);
    }
    // Uncompressed, the member is exactly what the shard-size rule counts.
    let planned = if tar { member.len() as u64 } else { meta.size };
    Ok(Item::Small { meta, member, hlen, crc, stored: meta.size, codec: codec::RAW, planned })
}

/// What the pipeline packs: files `start..end` (`start` is past any resumed shards;
/// `first_file` is where this pack's range begins), shards numbered from `first_shard`, cut
/// at a plan's `cuts` when given, else by size.
struct PipeRange<'a> {
    start: usize,
    end: usize,
    first_file: usize,
    first_shard: usize,
    cuts: Option<&'a [u64]>,
}

/// Files are handed from the I/O threads to the writer in chunks of this many consecutive files
/// (one lock round-trip and at most one wake-up per chunk, not per file).
const CHUNK: usize = 8;

/// The ordered window of chunks shared by the I/O threads and the writer.
struct Window {
    /// Next chunk to claim.
    next: usize,
    /// Chunks taken by the writer.
    written: usize,
    slots: Vec<Option<Vec<Item>>>,
    /// The chunk the writer is blocked on, if any (so workers wake it only when it matters).
    waiting: Option<usize>,
    stop: bool,
}

struct ShardOut {
    k: usize,
    tmp: PathBuf,
    w: File,
    pos: u64,
    /// Sum of the planned (uncompressed) lengths of the members so far.
    raw: u64,
    hash: Xxh3,
    index: IndexBuilder,
    flushed_at: u64,
}

impl ShardOut {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.w.write_all(b).ctx("write", &self.tmp)?;
        self.hash.update(b);
        self.pos += b.len() as u64;
        if self.pos - self.flushed_at >= WRITEBACK_EVERY {
            // Start writeback of what is written so far (asynchronously), so the fsync at the
            // end of the shard has little left to wait for and the disk works while we read.
            // SAFETY: a hint on a descriptor we own; no memory is involved.
            unsafe { libc::sync_file_range(self.w.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
            self.flushed_at = self.pos;
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn run_pipeline(
    opts: &PackOptions,
    progress: &Progress,
    roots: &[SourceRoot],
    files: &FileList,
    sel: &PipeRange,
    dict: &[u8],
    parts: &mut Vec<Index>,
    records: &mut Vec<ShardRecord>,
    skipped: &mut Vec<Skipped>,
) -> Result<u64> {
    let (start, n, first_shard) = (sel.start, sel.end, sel.first_shard);
    let threads = opts.threads.clamp(1, 256);
    let nchunks = (n - start).div_ceil(CHUNK);
    let wslots = (threads * 2 + 4).min(1024);
    let small_max = (INFLIGHT_BYTES / (wslots * CHUNK)).clamp(64 << 10, 8 << 20) as u64;
    let shared = Mutex::new(Window { next: 0, written: 0, slots: (0..wslots).map(|_| None).collect(), waiting: None, stop: false });
    let space = Condvar::new();
    let ready = Condvar::new();
    let fault = Fault::from_env();

    // Member buffers go back from the writer to the I/O threads: no allocation, no fresh
    // pages to fault in, per file.
    let pool: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    let pool_cap = wslots * CHUNK;
    let read_item = |i: usize, ws: &mut WorkerState| -> Item {
        let path = files.path(i, roots);
        if progress.cancel.load(Relaxed) {
            return Item::Fail(Error::Cancelled);
        }
        if let Some(us) = fault.slow_us {
            std::thread::sleep(std::time::Duration::from_micros(us));
        }
        let buf = pool.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
        match read_one(&path, files.key(i), opts.follow_symlinks, small_max, buf, opts.format, ws) {
            Ok(it) => it,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound && opts.on_error == OnError::Skip => {
                Item::Skip(Skipped { path: path.display().to_string(), reason: "deleted while packing".into() })
            }
            Err(e) if opts.on_error == OnError::Skip && !matches!(e, Error::NoSpace { .. }) => {
                Item::Skip(Skipped { path: path.display().to_string(), reason: e.to_string() })
            }
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Item::Fail(Error::Changed { path: path.clone(), what: "it was deleted".into() })
            }
            Err(e) => Item::Fail(e),
        }
    };

    let new_encoder = || (!opts.compress.is_none()).then(|| Encoder::new(opts.compress, Some(dict)));
    let worker = || {
        let mut ws = WorkerState { enc: new_encoder(), data: Vec::new(), frame: Vec::new() };
        loop {
            let c = {
                let mut w = shared.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if w.stop || w.next >= nchunks {
                        return;
                    }
                    if w.next < w.written + wslots {
                        break;
                    }
                    w = space.wait(w).unwrap_or_else(|p| p.into_inner());
                }
                w.next += 1;
                w.next - 1
            };
            let a = start + c * CHUNK;
            let items: Vec<Item> = (a..(a + CHUNK).min(n)).map(|i| read_item(i, &mut ws)).collect();
            let mut w = shared.lock().unwrap_or_else(|p| p.into_inner());
            w.slots[c % wslots] = Some(items);
            if w.waiting == Some(c) {
                ready.notify_one();
            }
        }
    };

    let mut write_all = || -> Result<u64> {
        let mut cur: Option<ShardOut> = None;
        let mut k = first_shard;
        let mut files_written = 0u64;
        let mut hdr = Vec::with_capacity(2048);
        let mut pending = std::collections::VecDeque::new();
        let result = (|| -> Result<()> {
            for i in start..n {
                if pending.is_empty() {
                    let c = (i - start) / CHUNK;
                    let mut w = shared.lock().unwrap_or_else(|p| p.into_inner());
                    loop {
                        if let Some(items) = w.slots[c % wslots].take() {
                            w.written = c + 1;
                            w.waiting = None;
                            space.notify_one();
                            pending.extend(items);
                            break;
                        }
                        w.waiting = Some(c);
                        w = ready.wait(w).unwrap_or_else(|p| p.into_inner());
                    }
                }
                let item = pending.pop_front().ok_or_else(|| Error::format(&opts.output, "internal: pack pipeline out of step"))?;
                if progress.cancel.load(Relaxed) {
                    return Err(Error::Cancelled);
                }
                // A plan's shard boundary: the shard so far is complete.
                if sel.cuts.is_some_and(|c| i > sel.first_file && c.binary_search(&(i as u64)).is_ok()) {
                    if let Some(s) = cur.take() {
                        close_shard(opts, s, parts, records, dict)?;
                        k += 1;
                        Fault::check(fault.after_shards, (k - first_shard) as u64);
                    }
                }
                let meta = match &item {
                    Item::Small { meta, .. } | Item::Large { meta, .. } => *meta,
                    Item::Skip(s) => {
                        skipped.push(s.clone());
                        continue;
                    }
                    Item::Fail(_) => {
                        let Item::Fail(e) = item else { unreachable!() };
                        return Err(e);
                    }
                };
                let key = files.key(i);
                let tar = opts.format == ShardFormat::Tar;
                // Large files are streamed here; their member length is known only for raw
                // storage (compressed ones start a new shard check after compressing).
                let _ = tar;
                let member_len = match &item {
                    Item::Small { planned, .. } => *planned,
                    _ => planned_len(opts.format, key, &meta),
                };
                if let Some(s) = &cur {
                    let cut = match sel.cuts {
                        Some(_) => false, // a plan's boundaries were applied above
                        None => s.raw + member_len + SHARD_END > opts.shard_size && !s.index.is_empty(),
                    };
                    if cut {
                        let s = cur.take().expect("checked above");
                        close_shard(opts, s, parts, records, dict)?;
                        k += 1;
                        Fault::check(fault.after_shards, (k - first_shard) as u64);
                    }
                }
                if cur.is_none() {
                    let tmp = opts.output.join(format!(".{}.tmp", shard_name(k, opts.format)));
                    let f = File::create(&tmp).ctx("create", &tmp)?;
                    let index = if opts.compress.is_none() { IndexBuilder::new() } else { IndexBuilder::new_coded(dict) };
                    cur = Some(ShardOut { k, tmp, w: f, pos: 0, raw: 0, hash: Xxh3::new(), index, flushed_at: 0 });
                }
                let s = cur.as_mut().expect("opened above");
                let member_start = s.pos;
                let (data_off, stored, codec, crc) = match item {
                    Item::Small { member, hlen, crc, stored, codec, .. } => {
                        s.put(&member)?;
                        let mut p = pool.lock().unwrap_or_else(|p| p.into_inner());
                        if p.len() < pool_cap {
                            p.push(member);
                        }
                        (member_start + hlen as u64, stored, codec, crc)
                    }
                    Item::Large { mut file, path, .. } => {
                        let hash_before = s.hash.clone();
                        let r = if opts.compress.is_none() {
                            write_large_raw(s, tar, &mut file, &path, key, &meta, &mut hdr).map(|(off, crc)| (off, meta.size, codec::RAW, crc))
                        } else {
                            write_large_coded(opts, s, &mut file, &path, key, &meta, dict, &mut hdr)
                        };
                        match r {
                            Ok(v) => v,
                            Err(e @ Error::Changed { .. }) if opts.on_error == OnError::Skip => {
                                // Roll the shard back to where this member began.
                                s.w.set_len(member_start).ctx("truncate", &s.tmp)?;
                                s.w.seek(SeekFrom::Start(member_start)).ctx("seek", &s.tmp)?;
                                s.pos = member_start;
                                s.hash = hash_before;
                                skipped.push(Skipped { path: path.display().to_string(), reason: e.to_string() });
                                continue;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    _ => unreachable!("skips and failures were handled above"),
                };
                s.index.push_coded(key, 0, data_off, stored, meta.size, codec, crc);
                s.raw += member_len;
                files_written += 1;
                progress.files_done.store((i + 1 - sel.first_file) as u64, Relaxed);
                progress.bytes_done.fetch_add(meta.size, Relaxed);
                Fault::check(fault.after_files, files_written);
            }
            if let Some(s) = cur.take() {
                close_shard(opts, s, parts, records, dict)?;
            }
            Ok(())
        })();
        if let Some(s) = cur.take() {
            let _ = fs::remove_file(&s.tmp);
        }
        let mut w = shared.lock().unwrap_or_else(|p| p.into_inner());
        w.stop = true;
        space.notify_all();
        drop(w);
        result.map(|_| files_written)
    };

    std::thread::scope(|sc| {
        let mut started = 0;
        for _ in 0..threads.min(n - start).max(1) {
            // Under a low process/thread limit (ulimit -u) run with the threads we could get.
            if std::thread::Builder::new().name("packds-io".into()).spawn_scoped(sc, worker).is_ok() {
                started += 1;
            }
        }
        if started == 0 {
            shared.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
            return Err(Error::usage("cannot start any I/O thread", "raise the thread limit (ulimit -u) or lower --threads"));
        }
        write_all()
    })
}

/// Copies a large file into the shard in chunks, checking it has exactly `size` bytes.
fn stream_file(s: &mut ShardOut, f: &mut File, path: &Path, size: u64) -> Result<u32> {
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut left = size;
    let mut crc = 0u32;
    while left > 0 {
        let want = (left.min(STREAM_CHUNK as u64)) as usize;
        let got = f.read(&mut buf[..want]).ctx("read", path)?;
        if got == 0 {
            return Err(Error::Changed { path: path.to_path_buf(), what: format!("it shrank: {} of {size} bytes were there", size - left) });
        }
        crc = crc32c::crc32c_append(crc, &buf[..got]);
        s.put(&buf[..got])?;
        left -= got as u64;
    }
    if f.read(&mut buf[..1]).ctx("read", path)? != 0 {
        return Err(Error::Changed { path: path.to_path_buf(), what: format!("it grew past {size} bytes") });
    }
    Ok(crc)
}

/// Writes a large file stored raw: header (tar), data streamed in chunks, padding.
/// Returns (data offset, CRC32C).
fn write_large_raw(s: &mut ShardOut, tar: bool, file: &mut File, path: &Path, key: &[u8], meta: &Meta, hdr: &mut Vec<u8>) -> Result<(u64, u32)> {
    hdr.clear();
    if tar {
        tar::write_header(hdr, key, meta);
    }
    s.put(hdr)?;
    let off = s.pos;
    let crc = stream_file(s, file, path, meta.size)?;
    if tar {
        s.put(&[0u8; 512][..tar::padding(meta.size) as usize])?;
    }
    Ok((off, crc))
}

/// Writes a large file with compression: the file is compressed (zstd's own worker threads)
/// into a spool file beside the shard, then either the frame or, when it does not pay, the
/// file itself is written. Returns (data offset, stored size, codec, CRC32C of the original).
#[allow(clippy::too_many_arguments)]
fn write_large_coded(
    opts: &PackOptions,
    s: &mut ShardOut,
    file: &mut File,
    path: &Path,
    key: &[u8],
    meta: &Meta,
    dict: &[u8],
    hdr: &mut Vec<u8>,
) -> Result<(u64, u64, u8, u32)> {
    let tar = opts.format == ShardFormat::Tar;
    let spool_path = opts.output.join(".large.zst.tmp");
    let zerr = |e: std::io::Error| Error::io("compress into", &spool_path, e);
    let spool = File::options().read(true).write(true).create(true).truncate(true).open(&spool_path).ctx("create", &spool_path)?;
    let _cleanup = RemoveOnDrop(&spool_path);
    let mut enc = zstd::stream::Encoder::with_dictionary(spool, opts.compress.level(), dict).map_err(zerr)?;
    enc.include_contentsize(true).map_err(zerr)?;
    enc.set_pledged_src_size(Some(meta.size)).map_err(zerr)?;
    enc.include_checksum(false).map_err(zerr)?;
    let workers = opts.threads.clamp(1, 16) as u32;
    if workers > 1 {
        enc.multithread(workers).map_err(zerr)?;
    }
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut crc = 0u32;
    let mut left = meta.size;
    while left > 0 {
        let want = left.min(STREAM_CHUNK as u64) as usize;
        let got = file.read(&mut buf[..want]).ctx("read", path)?;
        if got == 0 {
            return Err(Error::Changed { path: path.to_path_buf(), what: format!("it shrank: {} of {} bytes were there", meta.size - left, meta.size) });
        }
        crc = crc32c::crc32c_append(crc, &buf[..got]);
        enc.write_all(&buf[..got]).map_err(zerr)?;
        left -= got as u64;
    }
    if file.read(&mut buf[..1]).ctx("read", path)? != 0 {
        return Err(Error::Changed { path: path.to_path_buf(), what: format!("it grew past {} bytes", meta.size) });
    }
    let mut spool = enc.finish().map_err(zerr)?;
    let clen = spool.metadata().ctx("stat", &spool_path)?.len();
    let pays = match opts.compress {
        Compress::Auto(_) => clen <= meta.size - meta.size / 16,
        _ => clen < meta.size,
    };
    if !(pays || force_compress(opts.format, key)) {
        file.seek(SeekFrom::Start(0)).ctx("seek", path)?;
        let (off, again) = write_large_raw(s, tar, file, path, key, meta, hdr)?;
        if again != crc {
            return Err(Error::Changed { path: path.to_path_buf(), what: "its contents changed between two reads".into() });
        }
        return Ok((off, meta.size, codec::RAW, crc));
    }
    let codec = if dict.is_empty() { codec::ZSTD } else { codec::ZSTD_DICT };
    hdr.clear();
    if tar {
        tar::write_header(hdr, &member_name(key, codec), &Meta { size: clen, ..*meta });
    }
    s.put(hdr)?;
    let off = s.pos;
    spool.seek(SeekFrom::Start(0)).ctx("seek", &spool_path)?;
    let mut left = clen;
    while left > 0 {
        let got = spool.read(&mut buf[..left.min(STREAM_CHUNK as u64) as usize]).ctx("read", &spool_path)?;
        if got == 0 {
            return Err(Error::format(&spool_path, "spool file shrank while packing"));
        }
        s.put(&buf[..got])?;
        left -= got as u64;
    }
    if tar {
        s.put(&[0u8; 512][..tar::padding(clen) as usize])?;
    }
    Ok((off, clen, codec, crc))
}

struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.0);
    }
}

fn close_shard(opts: &PackOptions, mut s: ShardOut, parts: &mut Vec<Index>, records: &mut Vec<ShardRecord>, dict: &[u8]) -> Result<()> {
    let name = shard_name(s.k, opts.format);
    let dst = opts.output.join(&name);
    let info = match opts.format {
        ShardFormat::Tar => {
            s.put(&tar::END)?;
            s.w.sync_all().ctx("fsync", &s.tmp)?;
            fs::rename(&s.tmp, &dst).ctx("rename", &dst)?;
            ShardInfo { name: name.clone(), size: s.pos, hash: s.hash.digest128() }
        }
        ShardFormat::H5 => finish_h5(opts, &mut s, &dst, dict)?,
    };
    s.index.push_shard(info.clone());
    let ip = opts.output.join(STATE_DIR).join(shard_state_name(s.k));
    s.index.write_atomic(&ip)?; // also fsyncs the state dir
    drop(s.index);
    fsx::sync_dir(&opts.output)?;
    let ix = Index::open(&ip)?;
    records.push(ShardRecord { file: name, size: info.size, samples: ix.len() as u64, xxh3_128: hex128(info.hash) });
    parts.push(ix);
    Ok(())
}

/// Turns a shard's spooled data (`s.tmp`: the stored samples back to back) into an HDF5 file:
/// the writer (h5py) makes the file with its metadata and a contiguous, allocated but unwritten
/// `data` array; the data is then copied into that array's place and the file is hashed in
/// order, fsynced and renamed to `dst`. Offsets in `s.index` become file offsets.
fn finish_h5(opts: &PackOptions, s: &mut ShardOut, dst: &Path, dict: &[u8]) -> Result<ShardInfo> {
    let writer = opts.h5_writer.as_ref().ok_or_else(|| Error::usage("HDF5 shards need an HDF5 writer", "pack with the packds Python package"))?;
    let h5tmp = opts.output.join(format!(".{}.new.tmp", shard_name(s.k, opts.format)));
    let _cleanup = RemoveOnDrop(&h5tmp);
    let (entries, keys, codecs) = s.index.raw_parts();
    let n = entries.len() / crate::index::ENTRY_SIZE;
    let mut spec = H5Shard {
        path: &h5tmp,
        data_len: s.pos,
        offsets: Vec::with_capacity(n * 8),
        sizes: Vec::with_capacity(n * 8),
        raw_sizes: Vec::with_capacity(n * 8),
        codecs: Vec::with_capacity(n),
        crcs: Vec::with_capacity(n * 4),
        keys,
        key_offsets: Vec::with_capacity(n * 8 + 8),
        dict,
        compression: opts.compress.name(),
    };
    for (j, e) in entries.chunks_exact(crate::index::ENTRY_SIZE).enumerate() {
        spec.offsets.extend_from_slice(&e[0..8]);
        spec.sizes.extend_from_slice(&e[8..16]);
        spec.key_offsets.extend_from_slice(&e[16..24]);
        spec.crcs.extend_from_slice(&e[28..32]);
        match codecs {
            Some(c) => {
                let w = u64::from_le_bytes(c[j * 8..j * 8 + 8].try_into().expect("8 bytes"));
                spec.raw_sizes.extend_from_slice(&(w & ((1 << 56) - 1)).to_le_bytes());
                spec.codecs.push((w >> 56) as u8);
            }
            None => {
                spec.raw_sizes.extend_from_slice(&e[8..16]);
                spec.codecs.push(codec::RAW);
            }
        }
    }
    spec.key_offsets.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    let data_off = (writer.0)(&spec)?;
    drop(spec);
    Fault::check(Fault::from_env().in_h5, s.k as u64 + 1);
    let mut out = OpenOptions::new().read(true).write(true).open(&h5tmp).ctx("open", &h5tmp)?;
    let flen = out.metadata().ctx("stat", &h5tmp)?.len();
    let data_end = data_off
        .checked_add(s.pos)
        .filter(|&e| e <= flen)
        .ok_or_else(|| Error::format(&h5tmp, format!("the HDF5 writer put the data array at {data_off}, which does not fit in the {flen}-byte file")))?;
    // Hash the file in order while the data goes in: head (HDF5 metadata), data, tail.
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut copy = |from: &mut File, from_path: &Path, at: u64, len: u64, write_to: Option<&mut File>, h: &mut Xxh3| -> Result<()> {
        let mut w = write_to;
        let mut done = 0u64;
        while done < len {
            let k = (len - done).min(STREAM_CHUNK as u64) as usize;
            let got = std::os::unix::fs::FileExt::read_at(from, &mut buf[..k], if w.is_some() { done } else { at + done }).ctx("read", from_path)?;
            if got == 0 {
                return Err(Error::format(from_path, "file ended early"));
            }
            h.update(&buf[..got]);
            if let Some(w) = w.as_deref_mut() {
                std::os::unix::fs::FileExt::write_all_at(w, &buf[..got], at + done).ctx("write", &h5tmp)?;
            }
            done += got as u64;
        }
        Ok(())
    };
    copy(&mut out, &h5tmp, 0, data_off, None, &mut h)?;
    let mut spool = File::open(&s.tmp).ctx("open", &s.tmp)?;
    copy(&mut spool, &s.tmp, data_off, s.pos, Some(&mut out), &mut h)?;
    copy(&mut out, &h5tmp, data_end, flen - data_end, None, &mut h)?;
    out.sync_all().ctx("fsync", &h5tmp)?;
    drop(out);
    fs::rename(&h5tmp, dst).ctx("rename", dst)?;
    let _ = fs::remove_file(&s.tmp);
    s.index.shift_offsets(data_off);
    Ok(ShardInfo { name: dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), size: flen, hash: h.digest128() })
}

/// Trains the `--zstd-dict` dictionary on up to `DICT_SAMPLES` files spread evenly over the
/// sorted file list (the first `DICT_SAMPLE_BYTES` of each; files that do not compress on their
/// own are passed over): deterministic for a given tree.
fn train_dict(opts: &PackOptions, roots: &[SourceRoot], files: &FileList) -> Result<Vec<u8>> {
    let n = files.len();
    let take = n.min(DICT_SAMPLES);
    let budget = opts.dict_size.saturating_mul(100);
    let mut samples = Vec::with_capacity(take);
    let mut total = 0usize;
    for j in 0..take {
        let i = j * n / take;
        let path = files.path(i, roots);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(_) => continue, // the pack itself reports unreadable files
        };
        let mut b = Vec::new();
        // Only samples that compress on their own teach the dictionary anything.
        let compressible = |b: &[u8]| zstd::bulk::compress(b, 1).is_ok_and(|c| c.len() < b.len() - b.len() / 10);
        if (&mut f).take(DICT_SAMPLE_BYTES as u64).read_to_end(&mut b).is_ok() && b.len() >= 16 && !codec::looks_compressed(&b) && compressible(&b) {
            total += b.len();
            samples.push(b);
        }
        if total >= budget {
            break;
        }
    }
    if samples.len() < 8 || total < 4 * opts.dict_size.min(64 << 10) {
        return Err(Error::usage(
            format!("too little compressible input to train a {}-byte zstd dictionary ({} samples, {total} bytes)", opts.dict_size, samples.len()),
            "drop --zstd-dict (a dictionary helps datasets of many small, similar files)",
        ));
    }
    codec::train_dict(&samples, opts.dict_size)
        .map_err(|e| Error::usage(format!("zstd dictionary training failed: {e}"), "drop --zstd-dict, or give a smaller size"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::Reader;

    fn tree(dir: &Path, n: usize) -> Vec<(String, Vec<u8>)> {
        let mut v = Vec::new();
        for i in 0..n {
            let key = format!("c{:02}/f{i:05}.bin", i % 7);
            let data: Vec<u8> = (0..(i * 37) % 3000).map(|j| (i + j) as u8).collect();
            fs::create_dir_all(dir.join(&key).parent().unwrap()).unwrap();
            fs::write(dir.join(&key), &data).unwrap();
            v.push((key, data));
        }
        v.sort();
        v
    }

    #[test]
    fn pack_read_back_and_deterministic() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let want = tree(&src, 500);
        let mut o = PackOptions::new(vec![src.clone()], d.path().join("a"));
        o.shard_size = 64 << 10;
        o.threads = 8;
        let s = pack(&o, &Progress::default()).unwrap();
        assert_eq!(s.files, 500);
        assert!(s.shards > 5);
        let r = Reader::open(&o.output).unwrap();
        for (i, (k, data)) in want.iter().enumerate() {
            assert_eq!(r.key(i).unwrap(), k.as_bytes());
            assert_eq!(r.get(i).unwrap(), &data[..]);
        }
        r.verify().unwrap();
        let mut o2 = o.clone();
        o2.output = d.path().join("b");
        o2.threads = 3;
        pack(&o2, &Progress::default()).unwrap();
        for name in std::iter::once(manifest::INDEX_FILE.to_string()).chain((0..s.shards as usize).map(|k| shard_name(k, ShardFormat::Tar))) {
            assert_eq!(fs::read(o.output.join(&name)).unwrap(), fs::read(o2.output.join(&name)).unwrap(), "{name}");
        }
    }

    #[test]
    fn refuses_existing_output_and_empty_source() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir(&src).unwrap();
        let o = PackOptions::new(vec![src.clone()], d.path().join("out"));
        let e = pack(&o, &Progress::default()).unwrap_err();
        assert!(e.to_string().contains("no files to pack"), "{e}");
        assert!(!o.output.exists(), "a failed first pack leaves nothing behind");
        fs::write(src.join("x"), b"x").unwrap();
        pack(&o, &Progress::default()).unwrap();
        let e = pack(&o, &Progress::default()).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
    }
}
