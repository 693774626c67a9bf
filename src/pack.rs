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

use crate::codec::Compress;
use crate::error::{Error, IoContext, Result};
use crate::fault;
use crate::fsx;
use crate::index::Index;
use crate::layout::{self, state_index_name as shard_state_name, Mode, OutputDir, Prepared};
use crate::manifest::{self, hex128, Manifest, ShardRecord};
use crate::tar::{self, Meta};
use crate::walk::{self, EmptyDir, FileList, OnError, Skipped, SourceRoot, WalkOptions};
use globset::{Glob, GlobSet, GlobSetBuilder};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

pub use crate::layout::{shard_name, ShardFormat, STATE_DIR};
const STATE_OPTIONS: &str = "options.json";
/// `--remove-source`: the walked file list (plan format), for a resume after sources went.
const STATE_FILES: &str = "files.plan";
pub const DEFAULT_SHARD_SIZE: u64 = 1 << 30;
const STREAM_CHUNK: usize = 1 << 20;
const INFLIGHT_BYTES: usize = 256 << 20;
const WRITEBACK_EVERY: u64 = 32 << 20;

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
    /// `--part I/N`: pack only part I of N of the plan into `output/part-I/` (see [`crate::plan`]);
    /// `--part I` (N None): N is the number of parts the plan was made for (`plan --parts N`).
    pub part: Option<(u32, Option<u32>)>,
    /// `--plan FILE`: the file list and shard boundaries, made once by `packds plan`.
    pub plan: Option<PathBuf>,
    /// `packds plan --parts N`: the number of parts (array tasks) the plan is made for.
    pub plan_parts: Option<u32>,
    /// `--remove-source`: remove each packed file once its shard is safely on disk, then the
    /// directories that became empty (see [`remove`]).
    pub remove_source: bool,
    /// `--dry-run` (with `remove_source`): pack nothing, list the files that would be removed.
    pub dry_run: bool,
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
    /// The empty directories: given to the part that writes the last shard.
    pub empty_dirs: &'a [EmptyDir],
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
            plan_parts: None,
            plan: None,
            remove_source: false,
            dry_run: false,
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

pub use crate::job::Progress;

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
    /// `--remove-source`: what was removed (or, with `--dry-run`, would be).
    pub removed: Option<RemoveSummary>,
    /// Empty directories kept.
    pub empty_dirs: u64,
    /// Names stored as hard links of another name (their bytes stored once).
    pub hard_links: u64,
    /// Sparse files, stored at full size.
    pub sparse_files: u64,
}

impl PackSummary {
    /// The summary of the dataset `m` in `output`: what it holds, and how long it took.
    pub fn of(output: &Path, m: &Manifest, resumed_shards: u64, t0: Instant, already_complete: bool) -> PackSummary {
        PackSummary {
            output: output.to_path_buf(),
            files: m.samples,
            bytes: m.total_bytes,
            shards: m.shards.len() as u64,
            resumed_shards,
            skipped: m.skipped.clone(),
            seconds: t0.elapsed().as_secs_f64(),
            already_complete,
            empty_dirs: m.empty_dirs.len() as u64,
            hard_links: m.hard_links.len() as u64,
            sparse_files: m.sparse_files,
            removed: None,
        }
    }
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

/// What the stored state says about completed shards (for `--resume`): the sources and every
/// option that shapes the output. A resume with other ones is refused.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct StateOptions {
    /// [`STATE_VERSION`]; 0 (absent) in a state written before the source files were recorded.
    #[serde(default)]
    version: u32,
    shard_size: u64,
    /// Canonical absolute paths of the source roots.
    sources: Vec<String>,
    #[serde(default)]
    format: ShardFormat,
    #[serde(default)]
    compress: String,
    #[serde(default)]
    dict_size: usize,
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    follow_symlinks: bool,
    /// `--remove-source`: the sources of completed shards may be gone; the file list is kept in
    /// [`STATE_FILES`].
    #[serde(default)]
    remove_source: bool,
}

/// The state's version: 2 records the source files of every completed shard (their stamps).
const STATE_VERSION: u32 = 2;

/// Packs `opts.sources` into `opts.output` (or one part of a plan: see [`crate::plan`]).
pub fn pack(opts: &PackOptions, progress: &Progress) -> Result<PackSummary> {
    check_remove_options(opts)?;
    if opts.dry_run {
        return dry_run(opts, progress);
    }
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
    check_force_keeps_removed(opts)?;
    let dir = match OutputDir::prepare(out, Mode::pack(opts.force, opts.resume))? {
        Prepared::Open(dir) => dir,
        Prepared::Complete(m) => {
            progress.phase.store(3, Relaxed);
            return Ok(PackSummary { removed: opts.remove_source.then(RemoveSummary::default), ..PackSummary::of(out, &m, m.shards.len() as u64, t0, true) });
        }
    };
    let res = pack_locked(opts, progress, t0, sel);
    // Nothing worth resuming unless a shard was completed.
    if res.is_err() && dir.created() && !dir.has_completed_shard() {
        dir.remove();
    }
    res
}

/// What a pack covers: the walk's roots and files (or a plan's), the range of files this pack
/// writes, the plan's shard cuts and the first shard's number.
struct Scope<'a> {
    roots: &'a [SourceRoot],
    files: &'a FileList,
    skipped: Vec<Skipped>,
    range: std::ops::Range<usize>,
    cuts: Option<&'a [u64]>,
    first_shard: usize,
    /// The files come from the list a `--remove-source` pack recorded (a resume), not a walk of
    /// `sources` (nor a plan).
    recorded: bool,
    empty_dirs: &'a [EmptyDir],
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
    progress.phase.store(0, Relaxed);
    check_resume_remove_source(opts)?;
    let (walked, stored);
    let state_files = out.join(STATE_DIR).join(STATE_FILES);
    let scope = match sel {
        Some(sel) => Scope {
            roots: sel.roots,
            files: sel.files,
            skipped: sel.skipped.clone(),
            range: sel.range.clone(),
            cuts: Some(sel.cuts),
            first_shard: sel.first_shard,
            recorded: false,
            empty_dirs: sel.empty_dirs,
        },
        // A resumed --remove-source pack: the list the interrupted one walked (the files of its
        // completed shards may be gone).
        None if opts.remove_source && opts.resume && out.join(STATE_DIR).join(STATE_OPTIONS).is_file() && state_files.is_file() => {
            stored = crate::plan::read_plan(&state_files)?;
            let n = stored.files.len();
            Scope {
                roots: &stored.roots,
                files: &stored.files,
                skipped: stored.skipped.clone(),
                range: 0..n,
                cuts: None,
                first_shard: 0,
                empty_dirs: &stored.empty_dirs,
                recorded: true,
            }
        }
        None => {
            walked = walk::walk(&opts.sources, &walk_options(opts)?, &progress.cancel)?;
            let n = walked.files.len();
            Scope {
                roots: &walked.roots,
                files: &walked.files,
                skipped: walked.skipped.clone(),
                range: 0..n,
                cuts: None,
                first_shard: 0,
                empty_dirs: &walked.empty_dirs,
                recorded: false,
            }
        }
    };
    if scope.files.is_empty() {
        let srcs: Vec<String> = opts.sources.iter().map(|s| s.display().to_string()).collect();
        return Err(Error::usage(
            format!("no files to pack in {} ({} entries skipped)", srcs.join(", "), scope.skipped.len()),
            "check the source path and the --include/--exclude patterns",
        ));
    }
    progress.files_total.store(scope.range.len() as u64, Relaxed);
    progress.phase.store(1, Relaxed);
    if opts.remove_source {
        remove::preflight(scope.files, scope.roots, scope.range.clone())?;
    }

    let mut done = if opts.resume && out.join(STATE_DIR).join(STATE_OPTIONS).is_file() {
        resume_state(opts, &scope, progress)?
    } else {
        new_state(opts, &scope, sel.is_none())?
    };
    let dict = dictionary(opts, &scope)?;
    let remover = opts.remove_source.then(|| remove::Remover::new(opts, scope.roots, scope.files, &dict));
    if let Some(rm) = &remover {
        // The completed shards of an interrupted pack: their sources not yet removed go first.
        for (j, ix) in done.parts.iter().enumerate() {
            rm.shard(scope.first_shard + j, ix, &done.sources[j], true)?;
        }
    }
    let mut skipped = scope.skipped.clone();
    let resumed = done.records.len() as u64;
    let range = PipeRange {
        start: done.next_file,
        end: scope.range.end,
        first_file: scope.range.start,
        first_shard: scope.first_shard + done.records.len(),
        cuts: scope.cuts,
    };
    let completed = Completed { parts: &mut done.parts, records: &mut done.records, extras: &mut done.extras };
    let pipe = Pipeline { opts, progress, roots: scope.roots, files: scope.files, dict: &dict, range, remover: remover.as_ref(), empty_dirs: scope.empty_dirs };
    pipe.run(completed, &mut skipped)?;

    progress.phase.store(2, Relaxed);
    let removed = remover.map(|rm| rm.summary(rm.remove_dirs()));
    fault::kill_before_manifest();
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    let tree = Tree::of(&done.parts, &done.extras, scope.empty_dirs);
    let m = finish(opts, done.parts, &dict, done.records, skipped, tree)?;
    progress.phase.store(3, Relaxed);
    Ok(PackSummary { removed, ..PackSummary::of(out, &m, resumed, t0, false) })
}

/// The walk's options: filters, threads, and the output directory pruned from the walk (when
/// it exists: a `--dry-run` makes none).
fn walk_options(opts: &PackOptions) -> Result<WalkOptions> {
    walk_options_pruning(opts, &opts.output)
}

/// The walk's options for `opts`, leaving out the directory `prune` (the output: a dataset
/// inside a source tree is not packed into itself; none yet under `--dry-run`).
pub(crate) fn walk_options_pruning(opts: &PackOptions, prune: &Path) -> Result<WalkOptions> {
    let prune = match fs::metadata(prune) {
        Ok(md) => vec![(md.dev(), md.ino())],
        Err(e) if opts.dry_run && e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io("stat", prune, e)),
    };
    Ok(WalkOptions {
        follow_symlinks: opts.follow_symlinks,
        include: globset(&opts.include, "include")?,
        exclude: globset(&opts.exclude, "exclude")?,
        threads: opts.threads.min(64),
        on_error: opts.on_error,
        prune,
    })
}

/// The combinations `--remove-source` refuses.
fn check_remove_options(opts: &PackOptions) -> Result<()> {
    if opts.dry_run && !opts.remove_source {
        return Err(Error::usage("--dry-run only goes with --remove-source", "add --remove-source to list the files it would remove"));
    }
    if !opts.remove_source {
        return Ok(());
    }
    if opts.follow_symlinks {
        return Err(Error::usage(
            "--remove-source does not go with --follow-symlinks: the files packed through a link lie outside the source tree, and packds never removes anything outside it",
            "drop --follow-symlinks (links are then skipped and kept), or pack with --follow-symlinks but without --remove-source",
        ));
    }
    if opts.part.is_some() && opts.plan.is_none() {
        return Err(Error::usage(
            "--part with --remove-source needs --plan: without one every task walks the tree, and a tree whose files other tasks already removed gives another plan",
            "make the plan once (packds plan SRC -o PLAN --parts N), then pack --plan PLAN --part I --remove-source",
        ));
    }
    Ok(())
}

/// `--dry-run`: walks (or reads the part of the plan), checks the directories can be written,
/// and lists the files a pack with `--remove-source` would remove. Nothing is written.
fn dry_run(opts: &PackOptions, progress: &Progress) -> Result<PackSummary> {
    let t0 = Instant::now();
    let (roots, files, skipped, range) = match opts.part {
        Some((p, n)) => {
            let plan = crate::plan::read_plan(opts.plan.as_deref().expect("checked: --part needs --plan"))?;
            let r = crate::plan::part_files(&plan, p, n)?;
            let skipped = if r.start == 0 { plan.skipped.clone() } else { Vec::new() };
            (plan.roots, plan.files, skipped, r)
        }
        None => {
            let mut o = opts.clone();
            if o.threads == 0 {
                o.threads = opts.sources.first().map_or(8, |s| auto_threads(s));
            }
            let w = walk::walk(&opts.sources, &walk_options(&o)?, &progress.cancel)?;
            let n = w.files.len();
            (w.roots, w.files, w.skipped, 0..n)
        }
    };
    remove::preflight(&files, &roots, range.clone())?;
    let would_remove: Vec<PathBuf> = range.clone().map(|i| files.path(i, &roots)).collect();
    progress.phase.store(3, Relaxed);
    Ok(PackSummary {
        output: opts.output.clone(),
        files: would_remove.len() as u64,
        bytes: 0,
        shards: 0,
        resumed_shards: 0,
        skipped,
        seconds: t0.elapsed().as_secs_f64(),
        already_complete: false,
        removed: Some(RemoveSummary { dry_run: true, would_remove, ..RemoveSummary::default() }),
        empty_dirs: 0,
        hard_links: 0,
        sparse_files: 0,
    })
}

/// The completed shards a pack starts from: their per-shard indexes (mapped files in
/// `.pack-state/`; the final index is streamed from them, so the pack never holds the whole
/// index in memory), their manifest records, and the first file still to pack.
struct Done {
    parts: Vec<Index>,
    records: Vec<ShardRecord>,
    /// Each completed shard's hard links and sparse count.
    extras: Vec<ShardExtra>,
    next_file: usize,
    /// `--remove-source`: the source files of each completed shard as they were read.
    sources: Vec<Vec<stamp::Stamp>>,
}

fn state_options(opts: &PackOptions, scope: &Scope) -> StateOptions {
    // A recorded list has the roots the interrupted pack walked: this one names its own.
    let sources = if scope.recorded { opts.sources.iter().map(|p| canonical(p)).collect() } else { scope.roots.iter().map(|r| canonical(&r.path)).collect() };
    state_options_for(opts, sources)
}

/// The state's record of the options that shape the shards, for these source roots.
fn state_options_for(opts: &PackOptions, sources: Vec<String>) -> StateOptions {
    StateOptions {
        version: STATE_VERSION,
        shard_size: opts.shard_size,
        sources,
        format: opts.format,
        compress: opts.compress.name(),
        dict_size: opts.dict_size,
        include: opts.include.clone(),
        exclude: opts.exclude.clone(),
        follow_symlinks: opts.follow_symlinks,
        remove_source: opts.remove_source,
    }
}

/// A source root as the state records it: its canonical absolute path (a file that is gone,
/// e.g. removed by `--remove-source`: its directory's, plus its name; as given when neither can
/// be resolved).
fn canonical(p: &Path) -> String {
    fs::canonicalize(p)
        .or_else(|e| match (p.parent(), p.file_name()) {
            (Some(d), Some(name)) => fs::canonicalize(if d.as_os_str().is_empty() { Path::new(".") } else { d }).map(|d| d.join(name)),
            _ => Err(e),
        })
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// A fresh state directory (any earlier one is removed); its options file is written before
/// any shard, which makes the state usable by `--resume`. With `--remove-source` (`walked`: the
/// files come from a walk, not a plan) the file list goes in first ([`STATE_FILES`]).
fn new_state(opts: &PackOptions, scope: &Scope, walked: bool) -> Result<Done> {
    let state = opts.output.join(STATE_DIR);
    if state.exists() {
        fs::remove_dir_all(&state).ctx("remove", &state)?;
    }
    fs::create_dir(&state).ctx("create directory", &state)?;
    if opts.remove_source && walked {
        let list = crate::plan::Plan {
            options: crate::plan::PlanOptions::of(opts),
            // Absolute: a resume may run from another directory.
            roots: scope
                .roots
                .iter()
                .map(|r| SourceRoot { path: std::path::absolute(&r.path).unwrap_or_else(|_| r.path.clone()), is_file: r.is_file })
                .collect(),
            files: scope.files.clone(),
            skipped: scope.skipped.clone(),
            cuts: vec![0],
            bytes: 0,
            hash: 0,
            parts: None,
            empty_dirs: scope.empty_dirs.to_vec(),
        };
        crate::plan::write_plan(&list, &state.join(STATE_FILES))?;
    }
    let options_path = state.join(STATE_OPTIONS);
    fsx::write_atomic(&options_path, &manifest::json_bytes(&state_options(opts, scope), false, &options_path)?)?;
    fsx::sync_dir(&opts.output)?;
    Ok(Done { parts: Vec::new(), records: Vec::new(), extras: Vec::new(), next_file: scope.range.start, sources: Vec::new() })
}

/// `--resume`: checks the interrupted pack used the same sources and options, then takes every
/// completed shard, in order, whose keys match this pack's files (anything after the first gap
/// is written again), and checks that the files of those shards are still as they were read
/// (size and mtime, stat'ed again in parallel).
fn resume_state(opts: &PackOptions, scope: &Scope, progress: &Progress) -> Result<Done> {
    let (out, state) = (&opts.output, opts.output.join(STATE_DIR));
    check_same_options(opts, &manifest::read_json(&state.join(STATE_OPTIONS))?, &state_options(opts, scope))?;
    let mut done = Done { parts: Vec::new(), records: Vec::new(), extras: Vec::new(), next_file: scope.range.start, sources: Vec::new() };
    let mut stamps = Vec::new();
    let mut k = scope.first_shard;
    while let Some(ix) = completed_shard(opts, k)? {
        let (start, n) = (done.next_file, ix.len());
        let matches = start + n <= scope.range.end && (0..n).all(|i| ix.key(i).ok() == Some(scope.files.key(start + i)));
        if !matches {
            return Err(Error::usage(format!("the source tree changed since the pack into {} was interrupted", out.display()), START_OVER));
        }
        let sp = state.join(layout::state_stamps_name(k));
        let Some((st, extra)) = stamp::read_records(&sp, n)? else {
            return Err(old_state(out, &format!("{} has no record of the files of {}", STATE_DIR, shard_name(k, opts.format))));
        };
        stamps.extend(st);
        if opts.remove_source {
            let sp = state.join(layout::state_sources_name(k));
            let Some(src) = remove::read_sources(&sp, n)? else {
                return Err(old_state(out, &format!("{} has no record of the source files of {}", STATE_DIR, shard_name(k, opts.format))));
            };
            done.sources.push(src);
        }
        done.extras.push(extra);
        let info = &ix.shards()[0];
        done.records.push(ShardRecord { file: shard_name(k, opts.format), size: info.size, samples: n as u64, xxh3_128: hex128(info.hash) });
        done.next_file += n;
        done.parts.push(ix);
        k += 1;
    }
    // With --remove-source the files of completed shards are checked one by one before they
    // are removed (a changed one is left and reported, as in an uninterrupted run; one already
    // removed is fine), not all at once here.
    let moved = if opts.remove_source {
        stamp::Moved { count: 0, first: Vec::new() }
    } else {
        stamp::restat(scope.files, scope.roots, scope.range.start, &stamps, opts.follow_symlinks, opts.threads)
    };
    if moved.count > 0 {
        let named: Vec<String> = moved.first.iter().map(|(p, w)| format!("{} ({w})", p.display())).collect();
        let more = if moved.count > named.len() { format!(", and {} more", moved.count - named.len()) } else { String::new() };
        return Err(Error::usage(
            format!(
                "the source tree changed since the pack into {} was interrupted: {} already packed file{} changed: {}{more}",
                out.display(),
                moved.count,
                if moved.count == 1 { "" } else { "s" },
                named.join(", ")
            ),
            START_OVER,
        ));
    }
    progress.files_done.store((done.next_file - scope.range.start) as u64, Relaxed);
    for e in fs::read_dir(&state).ctx("list directory", &state)?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let num = layout::parse_state_index_name(&name).or_else(|| layout::parse_state_stamps_name(&name)).or_else(|| layout::parse_state_sources_name(&name));
        if num.is_some_and(|num| num >= k) {
            fs::remove_file(e.path()).ctx("remove", e.path())?;
        }
    }
    Ok(done)
}

/// The hint of a refused `--resume`.
const START_OVER: &str = "start over with --force (a job-array part: remove its part directory and run the task again)";

/// The refusal to resume from a state written by an older packds (or damaged): it does not
/// record the source files, so it cannot prove the pack continues the same tree.
fn old_state(out: &Path, why: &str) -> Error {
    Error::usage(
        format!(
            "cannot resume the pack into {}: {why} (an older packds wrote it, or it is damaged), so an unchanged source tree cannot be told from a changed one",
            out.display()
        ),
        START_OVER,
    )
}

/// Shard `k`'s per-shard index when the shard is complete (its file has the recorded size).
fn completed_shard(opts: &PackOptions, k: usize) -> Result<Option<Index>> {
    let ip = opts.output.join(STATE_DIR).join(shard_state_name(k));
    if !ip.exists() {
        return Ok(None);
    }
    let ix = Index::open(&ip)?;
    let info = ix.shards().first().cloned().ok_or_else(|| Error::format(&ip, "per-shard index without a shard"))?;
    let actual = fs::metadata(opts.output.join(shard_name(k, opts.format))).map(|m| m.len()).unwrap_or(u64::MAX);
    // A shard missing or damaged is written again from there.
    Ok((actual == info.size).then_some(ix))
}

/// The refusal to resume a pack run with `--remove-source` (`prev`) without it, or the reverse.
fn other_remove_source(out: &Path, prev: bool) -> Error {
    if prev {
        Error::usage(
            format!("the interrupted pack in {} was run with --remove-source: source files of its completed shards may be gone already", out.display()),
            "resume with --remove-source as well",
        )
    } else {
        Error::usage(
            format!("the interrupted pack in {} was run without --remove-source, so it kept no record of which files it may remove", out.display()),
            "resume without --remove-source (remove the sources after it), or start over with --force --remove-source",
        )
    }
}

/// `--force` never deletes an interrupted `--remove-source` pack that completed a shard: its
/// shards may hold the only copy of the source files it removed.
fn check_force_keeps_removed(opts: &PackOptions) -> Result<()> {
    let (out, state) = (&opts.output, opts.output.join(STATE_DIR));
    if !opts.force || out.join(layout::MANIFEST_FILE).exists() {
        return Ok(());
    }
    let Ok(prev) = manifest::read_json::<StateOptions>(&state.join(STATE_OPTIONS)) else { return Ok(()) };
    let completed =
        || fs::read_dir(&state).map(|d| d.flatten().any(|e| e.file_name().to_str().and_then(layout::parse_state_index_name).is_some())).unwrap_or(false);
    if prev.remove_source && completed() {
        return Err(Error::usage(
            format!(
                "{} holds an interrupted pack run with --remove-source: its completed shards may hold the only copy of source files it removed, so --force will not delete it",
                out.display()
            ),
            "finish it with --resume --remove-source (same SRC and options); to start over anyway, move that directory aside yourself",
        ));
    }
    Ok(())
}

/// Before the walk of a resume: a pack run with `--remove-source` is resumed with it (a walk
/// would not find the files it removed), and one run without it, without it.
fn check_resume_remove_source(opts: &PackOptions) -> Result<()> {
    let p = opts.output.join(STATE_DIR).join(STATE_OPTIONS);
    if !opts.resume || !p.is_file() {
        return Ok(());
    }
    let prev: StateOptions = manifest::read_json(&p)?;
    if prev.version >= STATE_VERSION && prev.remove_source != opts.remove_source {
        return Err(other_remove_source(&opts.output, prev.remove_source));
    }
    Ok(())
}

/// Refuses a resume whose sources or output-shaping options differ from the interrupted pack's
/// (`prev`, as stored; `now`, this pack's), naming both values.
fn check_same_options(opts: &PackOptions, prev: &StateOptions, now: &StateOptions) -> Result<()> {
    let out = &opts.output;
    const SAME: &str = "resume with the same options, or start over with --force";
    if prev.version < STATE_VERSION {
        return Err(old_state(out, "its state does not record the source files"));
    }
    if prev.sources != now.sources {
        return Err(Error::usage(
            format!("the interrupted pack in {} packed {}, not {}", out.display(), prev.sources.join(" "), now.sources.join(" ")),
            "resume with the same sources, or start over with --force",
        ));
    }
    if prev.remove_source != opts.remove_source {
        return Err(other_remove_source(out, prev.remove_source));
    }
    if prev.shard_size != opts.shard_size {
        return Err(Error::usage(format!("the interrupted pack in {} used --shard-size {}, not {}", out.display(), prev.shard_size, opts.shard_size), SAME));
    }
    if (prev.format, prev.compress.as_str(), prev.dict_size) != (opts.format, opts.compress.name().as_str(), opts.dict_size) {
        return Err(Error::usage(
            format!(
                "the interrupted pack in {} used --format {} --compress {}{}",
                out.display(),
                prev.format.ext(),
                prev.compress,
                if prev.dict_size > 0 { format!(" --zstd-dict {}", prev.dict_size) } else { String::new() }
            ),
            SAME,
        ));
    }
    let filters = |s: &StateOptions| {
        let mut v: Vec<String> = s.include.iter().map(|p| format!("--include {p:?}")).chain(s.exclude.iter().map(|p| format!("--exclude {p:?}"))).collect();
        if s.follow_symlinks {
            v.push("--follow-symlinks".into());
        }
        if v.is_empty() {
            "no --include, --exclude or --follow-symlinks".to_string()
        } else {
            v.join(" ")
        }
    };
    if (&prev.include, &prev.exclude, prev.follow_symlinks) != (&now.include, &now.exclude, now.follow_symlinks) {
        return Err(Error::usage(format!("the interrupted pack in {} used {}, not {}", out.display(), filters(prev), filters(now)), SAME));
    }
    Ok(())
}

/// The `--zstd-dict` dictionary: trained once, before any shard, and kept for `--resume`.
fn dictionary(opts: &PackOptions, scope: &Scope) -> Result<Vec<u8>> {
    if opts.dict_size == 0 {
        return Ok(Vec::new());
    }
    let dp = opts.output.join(STATE_DIR).join(STATE_DICT);
    match fs::read(&dp) {
        Ok(d) if opts.resume => Ok(d),
        _ => {
            let d = train_dict(opts, scope.roots, scope.files)?;
            fsx::write_atomic(&dp, &d)?;
            Ok(d)
        }
    }
}

/// What the manifest records of the tree beyond its files (see [`Manifest::with_tree`]).
#[derive(Debug, Default)]
pub(crate) struct Tree {
    empty_dirs: Vec<String>,
    hard_links: Vec<[u64; 2]>,
    sparse_files: u64,
}

impl Tree {
    /// The empty directories, and the completed shards' hard links (as positions in the whole
    /// dataset: each shard's after the samples of the shards before it) and sparse files.
    fn of(parts: &[Index], extras: &[ShardExtra], empty_dirs: &[EmptyDir]) -> Tree {
        let (mut hard_links, mut base, mut sparse_files) = (Vec::new(), 0u64, 0u64);
        for (p, e) in parts.iter().zip(extras) {
            hard_links.extend(e.links.iter().map(|&(a, o)| [base + u64::from(a), base + u64::from(o)]));
            base += p.len() as u64;
            sparse_files += e.sparse;
        }
        Tree { empty_dirs: empty_dirs.iter().map(|d| d.key.clone()).collect(), hard_links, sparse_files }
    }
}

/// The final index (streamed from the per-shard `parts`), then the manifest (last: its presence
/// marks the dataset complete), then the state directory goes.
fn finish(opts: &PackOptions, parts: Vec<Index>, dict: &[u8], shards: Vec<ShardRecord>, skipped: Vec<Skipped>, tree: Tree) -> Result<Manifest> {
    let out = &opts.output;
    let coded = !opts.compress.is_none();
    let ix = crate::index::concat(&parts, &out.join(layout::INDEX_FILE), coded.then_some(dict))?;
    drop(parts);
    write_manifest(opts, ix, dict, shards, skipped, 1, tree)
}

/// The manifest of a dataset whose shards and index (`ix`) are written; written last, then the
/// pack state is removed.
/// `min_version`: the format version at least (2 for an unordered index).
fn write_manifest(
    opts: &PackOptions,
    ix: crate::index::ConcatSummary,
    dict: &[u8],
    shards: Vec<ShardRecord>,
    skipped: Vec<Skipped>,
    min_version: u32,
    tree: Tree,
) -> Result<Manifest> {
    let out = &opts.output;
    let coded = !opts.compress.is_none();
    let version = ix.version.max(min_version);
    let compression = coded.then(|| manifest::CompressionRecord {
        mode: opts.compress.name(),
        stored_bytes: ix.stored_bytes,
        zstd_dict: (!dict.is_empty()).then(|| manifest::DictRecord { size: dict.len() as u64, xxh3_128: hex128(xxhash_rust::xxh3::xxh3_128(dict)) }),
    });
    let m = Manifest::new(opts.format, opts.options_json.clone(), ix.into(), shards)
        .with_skipped(skipped)
        .with_compression(compression)
        .with_format_version(version)
        .with_tree(tree.empty_dirs, tree.hard_links, tree.sparse_files);
    fsx::write_atomic(&out.join(layout::MANIFEST_FILE), &m.to_json()?)?;
    let state = out.join(STATE_DIR);
    fs::remove_dir_all(&state).ctx("remove", &state)?;
    fsx::sync_dir(out)?;
    Ok(m)
}

mod compact;
mod dict;
mod h5;
mod large;
mod member;
mod pipeline;
mod remove;
mod samples;
mod stamp;
mod window;
mod writer;

pub use compact::{compact, CompactSummary};
pub(crate) use compact::{next_shard_number, retire};
use dict::train_dict;
use pipeline::{PipeRange, Pipeline};
pub use remove::RemoveSummary;
pub use samples::{SampleWriter, WriterSummary};
use stamp::ShardExtra;
use writer::Completed;

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
