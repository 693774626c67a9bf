//! Partitioned packing, for Slurm job arrays: `packds plan` walks the tree once, stats every
//! file and fixes the shard boundaries a single pack would make; `pack --part I/N` packs a
//! deterministic 1/N of those shards into `OUT/part-I/`; `packds merge OUT` moves the shards
//! into place (renames, no copy) and streams the final index from the parts' indexes.
//!
//! Shard boundaries depend only on the file list and the files' sizes before compression
//! ([`pack::planned_len`]), so the merged dataset is byte-identical (index and shards) to a
//! single-process pack of the same, unchanged tree.
//!
//! Plan file (little-endian, one file):
//! ```text
//! "PACKDSPL" u32 version=1 u32 flags=0
//! u64 json_len, JSON header (tool, options, counts, skipped)
//! u32 n_roots, per root: u8 is_file, u32 len, path bytes
//! u64 n_files, per file: u32 root, u32 key_len; u64 keys_len, keys back to back
//! u64 n_shards, per shard: u64 index of its first file
//! u32 CRC32C of everything before
//! ```

use crate::error::{Error, IoContext, Result};
use crate::fsx;
use crate::index::Index;
use crate::layout::{self, ShardFormat};
use crate::manifest::{self, hex128, CompressionRecord, Manifest};
use crate::pack::{self, planned_len, PackOptions, PackSummary, Progress, Selection};
use crate::tar::Meta;
use crate::walk::{self, EmptyDir, FileList, Skipped, SourceRoot, WalkOptions};
use serde::{Deserialize, Serialize};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

const MAGIC: &[u8; 8] = b"PACKDSPL";
const VERSION: u32 = 1;
pub use crate::layout::{part_dir, PART_FILE};

/// The pack options a plan fixes (every part uses these).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlanOptions {
    pub shard_size: u64,
    pub format: ShardFormat,
    /// Serialized as its command-line form (`none`, `zstd:3`, ...), as before it was typed.
    pub compress: crate::codec::Compress,
    pub dict_size: usize,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub follow_symlinks: bool,
}

impl PlanOptions {
    pub(crate) fn of(o: &PackOptions) -> PlanOptions {
        PlanOptions {
            shard_size: o.shard_size,
            format: o.format,
            compress: o.compress,
            dict_size: o.dict_size,
            include: o.include.clone(),
            exclude: o.exclude.clone(),
            follow_symlinks: o.follow_symlinks,
        }
    }

    fn apply(&self, o: &mut PackOptions) -> Result<()> {
        o.shard_size = self.shard_size;
        o.format = self.format;
        o.compress = self.compress;
        o.dict_size = self.dict_size;
        o.include = self.include.clone();
        o.exclude = self.exclude.clone();
        o.follow_symlinks = self.follow_symlinks;
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    tool: String,
    options: PlanOptions,
    files: u64,
    shards: u64,
    /// Sum of the planned (uncompressed) member lengths.
    bytes: u64,
    skipped: Vec<Skipped>,
    /// `plan --parts N`: the number of parts (array tasks) the plan is made for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parts: Option<u32>,
    /// The empty directories (a plan made before they were kept has none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    empty_dirs: Vec<EmptyDir>,
}

/// The file list and shard boundaries of a pack, fixed once.
pub struct Plan {
    pub options: PlanOptions,
    pub roots: Vec<SourceRoot>,
    pub files: FileList,
    pub skipped: Vec<Skipped>,
    /// The index of the first file of each shard (the first is 0).
    pub cuts: Vec<u64>,
    pub bytes: u64,
    /// XXH3-128 of the serialized plan: every part records it; merge checks they agree.
    pub hash: u128,
    /// `plan --parts N`: the number of parts the plan is made for (`pack --part I` takes it).
    pub parts: Option<u32>,
    /// The empty directories, written by the part that packs the last shard.
    pub empty_dirs: Vec<EmptyDir>,
}

/// Walks `opts.sources`, stats every file (in parallel) and computes the shard boundaries.
/// `prune`: a directory never to enter (the output).
pub fn make_plan(opts: &PackOptions, progress: &Progress, prune: Option<&Path>) -> Result<Plan> {
    if opts.sources.is_empty() {
        return Err(Error::usage("no sources to plan", "name the directories (or files) to pack"));
    }
    let threads = if opts.threads == 0 { pack::auto_threads(&opts.sources[0]) } else { opts.threads };
    let mut prune_ids = Vec::new();
    if let Some(md) = prune.and_then(|p| fs::metadata(p).ok()) {
        prune_ids.push((md.dev(), md.ino()));
    }
    let wopts = WalkOptions {
        follow_symlinks: opts.follow_symlinks,
        include: pack::globset(&opts.include, "include")?,
        exclude: pack::globset(&opts.exclude, "exclude")?,
        threads: threads.min(64),
        on_error: opts.on_error,
        prune: prune_ids,
    };
    // Absolute roots: array tasks may start elsewhere.
    let sources: Vec<PathBuf> = opts.sources.iter().map(|s| std::path::absolute(s).unwrap_or_else(|_| s.clone())).collect();
    let walked = walk::walk(&sources, &wopts, &progress.cancel)?;
    let n = walked.files.len();
    if n == 0 {
        return Err(Error::usage(
            format!("no files to pack ({} entries skipped)", walked.skipped.len()),
            "check the source path and the --include/--exclude patterns",
        ));
    }
    progress.start(1, n as u64, 0);
    let lens = stat_all(&walked.files, &walked.roots, opts, threads, progress)?;
    let cuts = pack::plan_cuts(lens.iter().copied(), opts.shard_size);
    let bytes = lens.iter().sum();
    if opts.plan_parts == Some(0) {
        return Err(Error::usage("--parts 0: a plan needs at least one part", "give the number of array tasks, e.g. --parts 4"));
    }
    let mut plan = Plan {
        options: PlanOptions::of(opts),
        roots: walked.roots,
        files: walked.files,
        skipped: walked.skipped,
        cuts,
        bytes,
        hash: 0,
        parts: opts.plan_parts,
        empty_dirs: walked.empty_dirs,
    };
    plan.hash = xxhash_rust::xxh3::xxh3_128(&to_bytes(&plan)?);
    Ok(plan)
}

/// Planned length of every file, from `stat` (parallel: on a network filesystem each stat is a
/// round-trip). A file that cannot be stat'ed fails the plan, or counts as empty with
/// `--on-error skip` (the pack then skips it).
pub(crate) fn stat_all(files: &FileList, roots: &[SourceRoot], opts: &PackOptions, threads: usize, progress: &Progress) -> Result<Vec<u64>> {
    const CHUNK: usize = 256;
    let n = files.len();
    let next = AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<(usize, Result<Vec<u64>>)>> = Default::default();
    let work = || loop {
        let c = next.fetch_add(1, Relaxed);
        let a = c * CHUNK;
        if a >= n {
            return;
        }
        if progress.cancel.load(Relaxed) {
            results.lock().unwrap_or_else(|p| p.into_inner()).push((a, Err(Error::Cancelled)));
            return;
        }
        let r = (a..(a + CHUNK).min(n))
            .map(|i| {
                crate::fault::slow_read();
                let path = files.path(i, roots);
                let md = if opts.follow_symlinks { fs::metadata(&path) } else { fs::symlink_metadata(&path) };
                match md {
                    Ok(md) => {
                        Ok(planned_len(opts.format, files.key(i), &Meta { size: md.len(), mode: md.mode(), mtime: md.mtime(), uid: md.uid(), gid: md.gid() }))
                    }
                    Err(_) if opts.on_error == walk::OnError::Skip => Ok(0),
                    Err(e) => Err(Error::io("stat", &path, e)),
                }
            })
            .collect::<Result<Vec<u64>>>();
        progress.files_done.fetch_add((CHUNK).min(n - a) as u64, Relaxed);
        results.lock().unwrap_or_else(|p| p.into_inner()).push((a, r));
    };
    crate::pool::run_with_caller(threads.clamp(1, 64), "packds-stat", &work);
    let mut parts = results.into_inner().unwrap_or_else(|p| p.into_inner());
    parts.sort_by_key(|p| p.0);
    let mut lens = Vec::with_capacity(n);
    for (_, r) in parts {
        lens.extend(r?);
    }
    Ok(lens)
}

fn to_bytes(plan: &Plan) -> Result<Vec<u8>> {
    let header = Header {
        tool: format!("packds {}", crate::VERSION),
        options: plan.options.clone(),
        files: plan.files.len() as u64,
        shards: plan.cuts.len() as u64,
        bytes: plan.bytes,
        skipped: plan.skipped.clone(),
        parts: plan.parts,
        empty_dirs: plan.empty_dirs.clone(),
    };
    let json = manifest::json_bytes(&header, false, Path::new("plan"))?;
    let mut b = Vec::with_capacity(64 + json.len() + plan.files.len() * 40);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(json.len() as u64).to_le_bytes());
    b.extend_from_slice(&json);
    b.extend_from_slice(&(plan.roots.len() as u32).to_le_bytes());
    for r in &plan.roots {
        let p = r.path.as_os_str().as_bytes();
        b.push(r.is_file as u8);
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
        b.extend_from_slice(p);
    }
    let n = plan.files.len();
    b.extend_from_slice(&(n as u64).to_le_bytes());
    let mut keys_len = 0u64;
    for i in 0..n {
        let k = plan.files.key(i);
        b.extend_from_slice(&plan.files.root(i).to_le_bytes());
        b.extend_from_slice(&(k.len() as u32).to_le_bytes());
        keys_len += k.len() as u64;
    }
    b.extend_from_slice(&keys_len.to_le_bytes());
    for i in 0..n {
        b.extend_from_slice(plan.files.key(i));
    }
    b.extend_from_slice(&(plan.cuts.len() as u64).to_le_bytes());
    for c in &plan.cuts {
        b.extend_from_slice(&c.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    Ok(b)
}

/// Writes the plan atomically; returns its size in bytes.
pub fn write_plan(plan: &Plan, path: &Path) -> Result<u64> {
    let b = to_bytes(plan)?;
    fsx::write_atomic(path, &b)?;
    Ok(b.len() as u64)
}

struct Rd<'a> {
    b: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let end = usize::try_from(n).ok().and_then(|n| self.at.checked_add(n)).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| Error::format(self.path, "plan file is truncated or corrupt"))?;
        let b: &'a [u8] = self.b;
        let s = &b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

/// Reads and checks a plan file.
pub fn read_plan(path: &Path) -> Result<Plan> {
    let b = fs::read(path).ctx("read", path)?;
    let bad = |what: &str| Error::format_hint(path, format!("not a valid packds plan: {what}"), "make it again with `packds plan SRC... -o PLAN`");
    if b.len() < 28 || &b[..8] != MAGIC {
        return Err(bad("bad magic"));
    }
    let (body, tail) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(tail.try_into().expect("4 bytes")) {
        return Err(bad("checksum mismatch (damaged or truncated)"));
    }
    let mut r = Rd { b: body, at: 8, path };
    let v = r.u32()?;
    if v != VERSION || r.u32()? != 0 {
        return Err(Error::format(path, format!("plan format version {v} is not supported by packds {} (upgrade packds)", crate::VERSION)));
    }
    let jl = r.u64()?;
    let header: Header = serde_json::from_slice(r.take(jl)?).map_err(|e| bad(&e.to_string()))?;
    let nroots = r.u32()?;
    let mut roots = Vec::new();
    for _ in 0..nroots {
        let is_file = r.take(1)?[0] != 0;
        let l = r.u32()?;
        let p = std::ffi::OsString::from_vec(r.take(u64::from(l))?.to_vec());
        roots.push(SourceRoot { path: PathBuf::from(p), is_file });
    }
    let n = r.u64()?;
    if n != header.files || n.checked_mul(8).map_or(true, |x| x > body.len() as u64) {
        return Err(bad("file count"));
    }
    let table = r.take(n * 8)?;
    let keys_len = r.u64()?;
    let keys = r.take(keys_len)?;
    let mut files = FileList::default();
    let mut at = 0usize;
    for e in table.chunks_exact(8) {
        let root = u32::from_le_bytes(e[0..4].try_into().expect("4 bytes"));
        let kl = u32::from_le_bytes(e[4..8].try_into().expect("4 bytes")) as usize;
        let key = keys.get(at..at + kl).ok_or_else(|| bad("key table"))?;
        if root >= nroots || (!files.is_empty() && files.key(files.len() - 1) >= key) {
            return Err(bad("file list is not sorted or names a missing root"));
        }
        files.push(key, root);
        at += kl;
    }
    if at != keys.len() {
        return Err(bad("key table"));
    }
    let k = r.u64()?;
    if k != header.shards || k == 0 || k > n {
        return Err(bad("shard count"));
    }
    let mut cuts = Vec::with_capacity(k as usize);
    for _ in 0..k {
        cuts.push(r.u64()?);
    }
    if cuts[0] != 0 || cuts.windows(2).any(|w| w[0] >= w[1]) || cuts[cuts.len() - 1] >= n {
        return Err(bad("shard boundaries"));
    }
    if r.at != body.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(Plan {
        options: header.options,
        roots,
        files,
        skipped: header.skipped,
        cuts,
        bytes: header.bytes,
        hash: xxhash_rust::xxh3::xxh3_128(&b),
        parts: header.parts,
        empty_dirs: header.empty_dirs,
    })
}

/// What a finished part records (`part.json`, written last).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PartInfo {
    pub part: u32,
    pub parts: u32,
    /// XXH3-128 of the plan (hex).
    pub plan: String,
    pub first_shard: u64,
    pub shards: u64,
    pub first_file: u64,
    pub end_file: u64,
}

/// `pack --part I/N`: packs part I of the plan (`opts.plan`, or one made here by walking and
/// stat'ing the sources, the same in every task) into `opts.output/part-I/`. Rerunning a
/// finished part does nothing; an interrupted one resumes.
pub fn pack_part(opts: &PackOptions, progress: &Progress) -> Result<PackSummary> {
    let t0 = Instant::now();
    let (p, given_n) = opts.part.ok_or_else(|| Error::usage("no part given", "pass --part I/N"))?;
    if given_n.is_none() && opts.plan.is_none() {
        return Err(Error::usage(format!("--part {p} without /N needs --plan"), "give --part I/N, or --plan PLAN made with --parts N"));
    }
    fs::create_dir_all(&opts.output).ctx("create directory", &opts.output)?;
    if layout::DirKind::of(&opts.output) == layout::DirKind::Dataset {
        return Err(Error::usage(format!("{} is already a merged dataset", opts.output.display()), "nothing to do; pack into another directory to start over"));
    }
    let plan = match &opts.plan {
        Some(pp) => read_plan(pp)?,
        None => make_plan(opts, progress, Some(&opts.output))?,
    };
    let (nparts, a, b, first_file, end_file) = part_bounds(&plan, p, given_n)?;
    let info = PartInfo { part: p, parts: nparts, plan: hex128(plan.hash), first_shard: a, shards: b - a, first_file, end_file };
    let dir = part_dir(&opts.output, p);
    let pj = dir.join(PART_FILE);
    if let Ok(prev) = manifest::read_json::<PartInfo>(&pj) {
        if prev == info {
            return Ok(summary_of(&dir, t0, true));
        }
        return Err(Error::usage(
            format!("{} holds part {}/{} of another plan", dir.display(), prev.part, prev.parts),
            "use the same plan (and --part N) for every task of the array, or another -o",
        ));
    }
    if a == b {
        // More parts than shards: this one has nothing to pack.
        fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        fsx::write_atomic(&pj, &manifest::json_bytes(&info, true, &pj)?)?;
        fsx::sync_dir(&opts.output)?;
        return Ok(summary_of(&dir, t0, false));
    }
    let mut o = opts.clone();
    plan.options.apply(&mut o)?;
    o.output = dir.clone();
    let mut recorded = serde_json::to_value(&plan.options).map_err(|e| Error::format(&pj, format!("cannot record the plan options: {e}")))?;
    if let Some(m) = recorded.as_object_mut() {
        m.insert("part".into(), serde_json::json!([p, nparts]));
    }
    o.options_json = recorded;
    o.part = None;
    o.plan = None;
    o.resume = true; // a rerun array task finishes what an earlier try began
    o.force = false;
    if o.threads == 0 {
        o.threads = plan.roots.first().map_or(8, |r| pack::auto_threads(&r.path));
    }
    let sel = Selection {
        roots: &plan.roots,
        files: &plan.files,
        // The walk's skipped files go with the part that packs the first shard (part 0 may be
        // empty when there are more parts than shards), so the merged manifest lists them once.
        skipped: if a == 0 { plan.skipped.clone() } else { Vec::new() },
        range: first_file as usize..end_file as usize,
        cuts: &plan.cuts[a as usize..b as usize],
        first_shard: a as usize,
        empty_dirs: if b == plan.cuts.len() as u64 { &plan.empty_dirs } else { &[] },
    };
    let mut s = pack::pack_selected(&o, progress, Some(&sel))?;
    fsx::write_atomic(&pj, &manifest::json_bytes(&info, true, &pj)?)?;
    fsx::sync_dir(&opts.output)?;
    s.seconds = t0.elapsed().as_secs_f64();
    Ok(s)
}

/// Part `p` of `plan` (`given_n`: the N of `--part I/N`): (number of parts, its first shard,
/// the shard after its last, its first file, the file after its last).
fn part_bounds(plan: &Plan, p: u32, given_n: Option<u32>) -> Result<(u32, u64, u64, u64, u64)> {
    let nparts = parts_of(p, given_n, plan.parts)?;
    let k = plan.cuts.len() as u64;
    let (a, b) = (u64::from(p) * k / u64::from(nparts), (u64::from(p) + 1) * k / u64::from(nparts));
    let n = plan.files.len() as u64;
    let first_file = if a < k { plan.cuts[a as usize] } else { n };
    let end_file = if b < k { plan.cuts[b as usize] } else { n };
    Ok((nparts, a, b, first_file, end_file))
}

/// The files of part `p` of `plan` (as [`pack_part`] packs them), as a range of its list.
pub(crate) fn part_files(plan: &Plan, p: u32, given_n: Option<u32>) -> Result<std::ops::Range<usize>> {
    let (_, _, _, first, end) = part_bounds(plan, p, given_n)?;
    Ok(first as usize..end as usize)
}

/// The number of parts: `--part I/N`'s N, or the plan's (`plan --parts N`) for `--part I`;
/// both given must agree. I must be below it.
fn parts_of(p: u32, given: Option<u32>, planned: Option<u32>) -> Result<u32> {
    let n = match (given, planned) {
        (Some(n), Some(m)) if n != m => {
            return Err(Error::usage(
                format!("--part {p}/{n}, but the plan was made for {m} parts (plan --parts {m})"),
                format!("use --part {p} (the plan's {m} parts), or make a new plan"),
            ))
        }
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => {
            return Err(Error::usage(
                format!("--part {p}: the plan does not say how many parts it is for"),
                "give --part I/N, or make the plan with --parts N (then --part $SLURM_ARRAY_TASK_ID is enough)",
            ))
        }
    };
    if n == 0 || p >= n {
        return Err(Error::usage(
            format!("--part {p}/{n} is out of range"),
            format!("I runs from 0 to {} (e.g. --part $SLURM_ARRAY_TASK_ID)", n.saturating_sub(1)),
        ));
    }
    Ok(n)
}

fn summary_of(dir: &Path, t0: Instant, already: bool) -> PackSummary {
    match Manifest::load(dir) {
        Ok(m) => PackSummary::of(dir, &m, 0, t0, already),
        Err(_) => PackSummary {
            output: dir.to_path_buf(),
            files: 0,
            bytes: 0,
            shards: 0,
            resumed_shards: 0,
            skipped: Vec::new(),
            seconds: t0.elapsed().as_secs_f64(),
            already_complete: already,
            empty_dirs: 0,
            hard_links: 0,
            sparse_files: 0,
            removed: None,
        },
    }
}

/// What `merge` did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSummary {
    pub parts: u32,
    pub samples: u64,
    pub shards: u64,
    pub bytes: u64,
    pub already_merged: bool,
}

/// Joins the finished parts under `out` into one dataset in `out`: every part is checked first
/// (its manifest against its index, every shard's name and size, and with `verify` every
/// shard's XXH3-128), and only then are the shards renamed into place (no copy); the index is
/// streamed from the parts' indexes, the manifest is written last, then the part directories
/// are removed. A part that fails a check is named with how to redo it, and nothing is moved.
/// Idempotent: a merge that was interrupted is finished by running it again.
pub fn merge(out: &Path, verify: bool) -> Result<MergeSummary> {
    merge_progress(out, verify, &Progress::default())
}

/// [`merge`], reporting in `progress`: phase 0 checks the parts (shards checked; with `verify`,
/// bytes hashed), phase 1 moves the shards, phase 2 writes the index and manifest. Cancelled
/// (`Error::Cancelled`) within about a second of `progress.cancel`: before anything moved,
/// nothing changed; after, running merge again finishes the work.
pub fn merge_progress(out: &Path, verify: bool, progress: &Progress) -> Result<MergeSummary> {
    let _lock = layout::lock_dir(out)?;
    let parts = list_parts(out)?;
    if layout::DirKind::of(out) == layout::DirKind::Dataset {
        let m = Manifest::load(out)?;
        for (_, d) in &parts {
            fs::remove_dir_all(d).ctx("remove", d)?;
        }
        return Ok(MergeSummary { parts: parts.len() as u32, samples: m.samples, shards: m.shards.len() as u64, bytes: m.total_bytes, already_merged: true });
    }
    let (infos, nparts) = finished_parts(out, &parts)?;
    progress.start(0, infos.iter().map(|(i, _)| i.shards).sum(), 0);
    let loaded: Vec<LoadedPart> = infos.iter().filter(|(i, _)| i.shards > 0).map(|(i, d)| load_part(out, i, d, progress)).collect::<Result<_>>()?;
    if verify {
        verify_parts(out, &loaded, progress)?;
    }
    let first = loaded.first().ok_or_else(|| Error::usage("every part is empty", "nothing to merge"))?;
    let dict_hash = |m: &Manifest| m.compression.as_ref().and_then(|c| c.zstd_dict.as_ref().map(|d| d.xxh3_128.clone()));
    if loaded.iter().any(|l| dict_hash(&l.manifest) != dict_hash(&first.manifest)) {
        return Err(Error::usage(
            "the parts trained different zstd dictionaries (the tree changed during the array job?)",
            "pack the parts again from one plan",
        ));
    }
    // Everything checked: move the shards into place (an interrupted merge moved some already).
    let mut records = Vec::new();
    let mut moved = 0u64;
    progress.start(1, loaded.iter().map(|l| l.manifest.shards.len() as u64).sum(), 0);
    for l in &loaded {
        for r in &l.manifest.shards {
            progress.check()?;
            progress.add(1, r.size);
            let (src, dst) = (l.dir.join(&r.file), out.join(&r.file));
            if fs::symlink_metadata(&src).is_ok() {
                fs::rename(&src, &dst).ctx("rename", &dst)?;
                moved += 1;
                crate::fault::kill_in_merge(moved);
            }
            records.push(r.clone());
        }
    }
    fsx::sync_dir(out)?;
    progress.start(2, 0, 0);
    let coded = first.manifest.compression.is_some();
    let dict = first.index.dict().map(|d| d.to_vec()).unwrap_or_default();
    let (indexes, manifests): (Vec<Index>, Vec<Manifest>) = loaded.into_iter().map(|l| (l.index, l.manifest)).unzip();
    let ix = crate::index::concat(&indexes, &out.join(layout::INDEX_FILE), coded.then_some(&dict[..]))?;
    drop(indexes);
    let m = merged_manifest(out, nparts, &manifests, ix, records)?;
    fsx::write_atomic(&out.join(layout::MANIFEST_FILE), &m.to_json()?)?;
    fsx::sync_dir(out)?;
    for (_, d) in &parts {
        fs::remove_dir_all(d).ctx("remove", d)?;
    }
    fsx::sync_dir(out)?;
    Ok(MergeSummary { parts: nparts, samples: m.samples, shards: m.shards.len() as u64, bytes: m.total_bytes, already_merged: false })
}

/// The finished parts, in order, and their count; refuses missing or unfinished parts (naming
/// them) and parts of different plans.
fn finished_parts(out: &Path, parts: &[(u32, PathBuf)]) -> Result<(Vec<(PartInfo, PathBuf)>, u32)> {
    if parts.is_empty() {
        return Err(Error::usage(format!("no parts in {}", out.display()), "pack the parts first: packds pack --plan PLAN --part I/N -o OUT"));
    }
    let mut infos = Vec::new();
    let mut unfinished = Vec::new();
    for (p, d) in parts {
        match manifest::read_json::<PartInfo>(&d.join(PART_FILE)) {
            Ok(i) if i.part == *p => infos.push((i, d.clone())),
            _ => unfinished.push(*p),
        }
    }
    let nparts = infos.first().map(|i| i.0.parts).unwrap_or(parts.iter().map(|p| p.0 + 1).max().unwrap_or(0));
    let missing: Vec<u32> = (0..nparts).filter(|p| !infos.iter().any(|i| i.0.part == *p)).collect();
    if !missing.is_empty() || !unfinished.is_empty() {
        let mut all: Vec<u32> = missing.into_iter().chain(unfinished).collect();
        all.sort_unstable();
        all.dedup();
        let list: Vec<String> = all.iter().map(|p| p.to_string()).collect();
        return Err(Error::usage(
            format!("part(s) {} of {nparts} in {} are missing or unfinished (no {PART_FILE})", list.join(", "), out.display()),
            "rerun those array tasks (each resumes where it stopped), then merge again",
        ));
    }
    if infos.iter().any(|i| i.0.parts != nparts || i.0.plan != infos[0].0.plan) || infos.len() != nparts as usize {
        return Err(Error::usage(
            format!("the parts in {} come from different plans or part counts", out.display()),
            "pack every part with the same plan and the same --part .../N",
        ));
    }
    infos.sort_by_key(|i| i.0.part);
    Ok((infos, nparts))
}

/// A finished, checked part: its directory, manifest and index.
struct LoadedPart {
    dir: PathBuf,
    manifest: Manifest,
    index: Index,
    info: PartInfo,
}

/// "Part I of N is damaged: WHAT", with how to redo it.
fn damaged(info: &PartInfo, dir: &Path, what: String) -> Error {
    Error::usage(
        format!("part {} of {} ({}) is damaged: {what}", info.part, info.parts, dir.display()),
        format!(
            "nothing was merged; remove {} and rerun array task {} (packds pack --plan PLAN --part {}/{} -o OUT), then merge again",
            dir.display(),
            info.part,
            info.part,
            info.parts
        ),
    )
}

/// Loads part `info` from `dir` and checks it before anything is moved: the manifest (its
/// file names included), the index against the manifest's record and shard list, the shard
/// count against `part.json`, and every shard (in the part, or already moved to `out` by an
/// interrupted merge) is a regular file of the recorded size (`verify_parts` checks their
/// XXH3-128).
fn load_part(out: &Path, info: &PartInfo, dir: &Path, progress: &Progress) -> Result<LoadedPart> {
    let bad = |what: String| damaged(info, dir, what);
    let manifest = Manifest::load(dir).map_err(|e| bad(e.to_string()))?;
    let ipath = dir.join(layout::INDEX_FILE);
    // Opened without blocking and checked to be a regular file (a FIFO planted there must not hang
    // the merge), then read up to its recorded size plus one byte.
    let (f, len) = layout::open_data_file(&ipath, |e| bad(format!("cannot open {}: {e}", layout::INDEX_FILE))).map_err(|e| bad(e.to_string()))?;
    if len != manifest.index.size {
        return Err(bad(format!("{} is {len} bytes, its manifest records {}", layout::INDEX_FILE, manifest.index.size)));
    }
    let mut ibytes = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(&f, len + 1), &mut ibytes).map_err(|e| bad(format!("cannot read {}: {e}", layout::INDEX_FILE)))?;
    if ibytes.len() as u64 != manifest.index.size || hex128(xxhash_rust::xxh3::xxh3_128(&ibytes)) != manifest.index.xxh3_128 {
        return Err(bad(format!("{} does not match its manifest", layout::INDEX_FILE)));
    }
    let index = Index::open(&ipath).map_err(|e| bad(e.to_string()))?;
    let listed: Vec<(&str, u64)> = manifest.shards.iter().map(|r| (r.file.as_str(), r.size)).collect();
    let indexed: Vec<(&str, u64)> = index.shards().iter().map(|s| (s.name.as_str(), s.size)).collect();
    if listed != indexed || index.len() as u64 != manifest.samples || manifest.shards.len() as u64 != info.shards {
        return Err(bad("its manifest, index and part.json disagree on its shards".into()));
    }
    for r in &manifest.shards {
        let path = [dir.join(&r.file), out.join(&r.file)].into_iter().find(|p| fs::symlink_metadata(p).is_ok());
        let path = path.ok_or_else(|| bad(format!("{} is missing", r.file)))?;
        let md = fs::symlink_metadata(&path).ctx("stat", &path)?;
        if !md.is_file() || md.len() != r.size {
            return Err(bad(format!("{} is {} bytes (not a regular file of the {} its manifest records)", path.display(), md.len(), r.size)));
        }
        progress.add(1, 0);
    }
    Ok(LoadedPart { dir: dir.to_path_buf(), manifest, index, info: info.clone() })
}

/// `merge --verify`: every part shard's XXH3-128 against its manifest (phase 0 again, with the
/// bytes to read as its total).
fn verify_parts(out: &Path, loaded: &[LoadedPart], progress: &Progress) -> Result<()> {
    let shards = loaded.iter().flat_map(|l| l.manifest.shards.iter().map(move |r| (l, r)));
    progress.start(0, shards.clone().count() as u64, shards.clone().map(|(_, r)| r.size).sum());
    for (l, r) in shards {
        let path = [l.dir.join(&r.file), out.join(&r.file)].into_iter().find(|p| fs::symlink_metadata(p).is_ok()).unwrap_or_else(|| l.dir.join(&r.file));
        if hex128(fsx::hash_file_progress(&path, progress)?) != r.xxh3_128 {
            return Err(damaged(&l.info, &l.dir, format!("{} does not match its checksum", path.display())));
        }
        progress.add(1, 0);
    }
    Ok(())
}

/// The merged dataset's manifest: the first part's format, options (less the part's own) and
/// compression, every part's skipped files, the merged index and shards.
fn merged_manifest(
    out: &Path,
    nparts: u32,
    manifests: &[Manifest],
    ix: crate::index::ConcatSummary,
    records: Vec<crate::manifest::ShardRecord>,
) -> Result<Manifest> {
    let m0 = &manifests[0];
    let mut skipped: Vec<Skipped> = manifests.iter().flat_map(|m| m.skipped.iter().cloned()).collect();
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    let mut options = m0.options.clone();
    if let Some(o) = options.as_object_mut() {
        o.remove("part");
        o.remove("plan");
        o.insert("merged_parts".into(), nparts.into());
    }
    let format =
        ShardFormat::from_ext(&m0.shard_format).ok_or_else(|| Error::format(out, format!("the parts name an unknown shard format {:?}", m0.shard_format)))?;
    let compression =
        m0.compression.as_ref().map(|c| CompressionRecord { mode: c.mode.clone(), stored_bytes: ix.stored_bytes, zstd_dict: c.zstd_dict.clone() });
    // Each part's hard links are positions in the part: after the samples of the parts before.
    let (mut links, mut base) = (Vec::new(), 0u64);
    for m in manifests {
        links.extend(m.hard_links.iter().map(|&[a, o]| [base + a, base + o]));
        base += m.samples;
    }
    let mut dirs: Vec<String> = manifests.iter().flat_map(|m| m.empty_dirs.iter().cloned()).collect();
    dirs.sort();
    let sparse = manifests.iter().map(|m| m.sparse_files).sum();
    let version = ix.version;
    Ok(Manifest::new(format, options, ix.into(), records)
        .with_skipped(skipped)
        .with_compression(compression)
        .with_format_version(version)
        .with_tree(dirs, links, sparse))
}

fn list_parts(out: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let mut v = Vec::new();
    for e in fs::read_dir(out).ctx("list directory", out)? {
        let e = e.ctx("list directory", out)?;
        let name = e.file_name();
        if let Some(p) = name.to_str().and_then(layout::parse_part_dir_name) {
            if e.path().is_dir() {
                v.push((p, e.path()));
            }
        }
    }
    v.sort();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::Reader;

    #[test]
    fn plan_options_are_written_as_before_the_options_were_typed() {
        let o = PlanOptions {
            shard_size: 1024,
            format: ShardFormat::H5,
            compress: crate::codec::Compress::Auto(5),
            dict_size: 0,
            include: vec!["*.jpg".into()],
            exclude: vec![],
            follow_symlinks: true,
        };
        let j = r#"{"shard_size":1024,"format":"h5","compress":"auto:5","dict_size":0,"include":["*.jpg"],"exclude":[],"follow_symlinks":true}"#;
        assert_eq!(serde_json::to_string(&o).unwrap(), j);
        assert_eq!(serde_json::from_str::<PlanOptions>(j).unwrap(), o);
        let none = j.replace("auto:5", "none");
        assert_eq!(serde_json::from_str::<PlanOptions>(&none).unwrap().compress, crate::codec::Compress::None);
        assert!(serde_json::from_str::<PlanOptions>(&j.replace("auto:5", "gzip")).is_err());
    }

    fn tree(dir: &Path, n: usize) {
        for i in 0..n {
            let p = dir.join(format!("d{:02}/f{i:05}", i % 13));
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, vec![(i % 251) as u8; (i * 53) % 4000]).unwrap();
        }
    }

    #[test]
    fn parts_merge_to_the_single_pack_byte_for_byte() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        tree(&src, 700);
        let mut o = PackOptions::new(vec![src.clone()], d.path().join("single"));
        o.shard_size = 64 << 10;
        o.threads = 3;
        pack::pack(&o, &Progress::default()).unwrap();
        // Plan once, then 4 parts (one of them empty-free), then merge.
        let plan = make_plan(&o, &Progress::default(), None).unwrap();
        let pp = d.path().join("plan");
        write_plan(&plan, &pp).unwrap();
        let back = read_plan(&pp).unwrap();
        assert_eq!((back.cuts.clone(), back.hash), (plan.cuts.clone(), plan.hash));
        let out = d.path().join("merged");
        for p in (0..4).rev() {
            let mut po = o.clone();
            po.output = out.clone();
            po.plan = Some(pp.clone());
            po.part = Some((p, Some(4)));
            pack::pack(&po, &Progress::default()).unwrap();
        }
        let s = merge(&out, false).unwrap();
        assert_eq!(s.samples, 700);
        let single = Reader::open(&o.output).unwrap();
        let merged = Reader::open(&out).unwrap();
        assert_eq!(fs::read(o.output.join("index.pdsi")).unwrap(), fs::read(out.join("index.pdsi")).unwrap());
        for sh in single.index().shards() {
            assert_eq!(fs::read(o.output.join(&sh.name)).unwrap(), fs::read(out.join(&sh.name)).unwrap(), "{}", sh.name);
        }
        merged.verify().unwrap();
        assert!(merge(&out, false).unwrap().already_merged);
    }

    #[test]
    fn merge_names_missing_parts_and_corrupt_plans_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        tree(&src, 200);
        let mut o = PackOptions::new(vec![src], d.path().join("out"));
        o.shard_size = 16 << 10;
        o.part = Some((1, Some(3)));
        pack::pack(&o, &Progress::default()).unwrap();
        let e = merge(&o.output, false).unwrap_err().to_string();
        assert!(e.contains("part(s) 0, 2 of 3"), "{e}");
        let plan = make_plan(&o, &Progress::default(), None).unwrap();
        let pp = d.path().join("plan");
        write_plan(&plan, &pp).unwrap();
        let mut b = fs::read(&pp).unwrap();
        for cut in [0, 8, b.len() / 2, b.len() - 1] {
            assert!(matches!(read_plan_bytes(d.path(), &b[..cut]), Err(Error::Format { .. })), "cut {cut}");
        }
        let mid = b.len() / 2;
        b[mid] ^= 1;
        assert!(matches!(read_plan_bytes(d.path(), &b), Err(Error::Format { .. })));
    }

    fn read_plan_bytes(dir: &Path, b: &[u8]) -> Result<Plan> {
        let p = dir.join("bad-plan");
        fs::write(&p, b).unwrap();
        read_plan(&p)
    }
}
