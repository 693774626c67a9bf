//! `packds pack SRC... -o DATASET --append`: a dataset grows by new shards; the shards it has are
//! never rewritten.
//!
//! The files whose keys are new (and with `--replace`, the files whose bytes differ from the
//! stored sample: size, then CRC32C) are packed as an ordinary pack into `DATASET/.append.tmp/`,
//! their shards numbered after the dataset's. Then, in this order: the new shards are renamed
//! into `DATASET`; the index of the new version is written under a new name
//! (`index-NNNNNN.pdsi`); the manifest, naming it, replaces the old one (the commit point); the
//! work directory and indexes older than the previous version are removed. A crash before the
//! manifest leaves the previous version as it was (extra shard files it does not name are
//! ignored, and replaced by the next append); readers that have the dataset open keep reading
//! the version they opened (their index and shards are never modified).

use crate::error::{Error, IoContext, Result};
use crate::fsx;
use crate::index::{self, Entry, Index};
use crate::job::Progress;
use crate::layout::{self, shard_name, ShardFormat};
use crate::manifest::{CompressionRecord, Manifest};
use crate::pack::{self, PackOptions, Selection};
use crate::read::Reader;
use crate::walk::{self, FileList};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where an append packs its new shards before they move into the dataset.
pub const WORK_DIR: &str = ".append.tmp";

/// What an append reports.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendSummary {
    pub output: PathBuf,
    /// The dataset's version after the append (unchanged when nothing was added).
    pub version: u64,
    pub added: u64,
    pub replaced: u64,
    /// Files whose keys the dataset has with the same bytes (left alone).
    pub unchanged: u64,
    pub new_shards: u64,
    pub bytes: u64,
    pub samples: u64,
    pub skipped: Vec<walk::Skipped>,
    pub seconds: f64,
}

/// Appends the files of `opts.sources` to the dataset `opts.output` (see the module docs).
/// The dataset's own shard format and compression are used; `opts.shard_size` cuts the new
/// shards.
pub fn append(opts: &PackOptions, replace: bool, progress: &Progress) -> Result<AppendSummary> {
    let t0 = Instant::now();
    let out = &opts.output;
    if opts.remove_source || opts.dry_run {
        return Err(Error::usage("--append does not go with --remove-source or --dry-run yet", "append first, then pack --remove-source separately"));
    }
    let _lock = layout::lock_dir(out)?;
    let old = Reader::open(out)?;
    let m = old.manifest().clone();
    if old.index().dict().is_some_and(|d| !d.is_empty()) {
        return Err(Error::usage(
            format!("{} was packed with a zstd dictionary: appending to it is not supported yet", out.display()),
            "pack the new files into a dataset of their own and combine them with `packds concat`",
        ));
    }
    let format = ShardFormat::from_ext(&m.shard_format).ok_or_else(|| Error::format(out, "unknown shard format"))?;
    let mut o = opts.clone();
    o.format = format;
    o.compress = m.compression.as_ref().map_or(Ok(crate::codec::Compress::None), |c| c.mode.parse())?;
    o.dict_size = 0;
    o.threads = if opts.threads == 0 { opts.sources.first().map_or(8, |s| pack::auto_threads(s)) } else { opts.threads };
    // The walk: every file of the sources, in key order.
    let wopts = pack::walk_options_pruning(&o, out)?;
    let walked = walk::walk(&o.sources, &wopts, &progress.cancel)?;
    let (files, replaced, unchanged) = select(&old, &walked, &o, replace, progress)?;
    let work = out.join(WORK_DIR);
    if opts.force {
        let _ = fs::remove_dir_all(&work); // start the append over
    }
    recover(out, &work, &m)?;
    if files.is_empty() {
        let _ = fs::remove_dir_all(&work);
        return Ok(AppendSummary {
            output: out.clone(),
            version: m.version,
            added: 0,
            replaced: 0,
            unchanged,
            new_shards: 0,
            bytes: 0,
            samples: m.samples,
            skipped: walked.skipped,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    let lens = crate::plan::stat_all(&files, &walked.roots, &o, o.threads, progress)?;
    let cuts = pack::plan_cuts(lens.iter().copied(), o.shard_size);
    // Numbered after every shard file there (a compaction's retired shards included).
    let first_shard = pack::next_shard_number(out)?;
    // Empty directories the dataset does not record yet go at the end of the new shards.
    let new_dirs: Vec<walk::EmptyDir> = walked.empty_dirs.iter().filter(|d| !m.empty_dirs.contains(&d.key)).cloned().collect();
    let sel = Selection {
        roots: &walked.roots,
        files: &files,
        skipped: walked.skipped.clone(),
        range: 0..files.len(),
        cuts: &cuts,
        first_shard,
        empty_dirs: &new_dirs,
    };
    o.output = work.clone();
    o.resume = true; // an append that was killed continues where it stopped
    o.force = false;
    o.options_json = serde_json::json!({"append": true});
    let packed = pack::pack_selected(&o, progress, Some(&sel))?;
    let new = Reader::open(&work)?;
    crate::fault::kill_in_append(1);
    let version = m.version + 1;
    let merged = commit(out, &old, &new, version, format, first_shard)?;
    let added = files.len() as u64 - replaced;
    let mut history = m.history.clone();
    history.push(serde_json::json!({
        "version": version,
        "added": added,
        "replaced": replaced,
        "shards": [first_shard, first_shard + new.index().shards().len()],
        "sources": o.sources.iter().map(|s| fs::canonicalize(s).unwrap_or_else(|_| s.clone()).to_string_lossy().into_owned()).collect::<Vec<_>>(),
        "created_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    }));
    let mut records = m.shards.clone();
    records.extend(new.manifest().shards.iter().cloned());
    let mut skipped = m.skipped.clone();
    skipped.extend(packed.skipped.iter().cloned());
    let compression = m.compression.as_ref().map(|c| CompressionRecord { mode: c.mode.clone(), stored_bytes: merged.stored_bytes, zstd_dict: None });
    let unordered = merged_is_unordered(&old, &new, replaced);
    let format_version = merged.version.max(if unordered { 2 } else { 1 });
    let (dirs, links, sparse) = merged_tree(&old, &new, &Index::open(&out.join(layout::index_file_name(version)))?)?;
    let nm = Manifest::new(format, m.options.clone(), merged.into(), records)
        .with_skipped(skipped)
        .with_compression(compression)
        .with_version(version, history)
        .with_format_version(format_version)
        .with_tree(dirs, links, sparse);
    let samples = nm.samples;
    drop(new);
    crate::fault::kill_in_append(3);
    fsx::write_atomic(&out.join(layout::MANIFEST_FILE), &nm.to_json()?)?;
    fsx::sync_dir(out)?;
    // Committed. The work directory goes, and indexes older than the previous version (a
    // reader that just read the previous manifest may still be opening its index).
    fs::remove_dir_all(&work).ctx("remove", &work)?;
    pack::retire(out, &m, &nm);
    Ok(AppendSummary {
        output: out.clone(),
        version,
        added,
        replaced,
        unchanged,
        new_shards: (nm.shards.len() - m.shards.len()) as u64,
        bytes: packed.bytes,
        samples,
        skipped: packed.skipped,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// An append killed after its pack: committed already (the dataset's manifest names its
/// shards), its work directory is removed; else the shards it had moved into the dataset go
/// back to the work directory, whose complete pack is then committed again.
fn recover(out: &Path, work: &Path, current: &Manifest) -> Result<()> {
    let Ok(m) = Manifest::load(work) else { return Ok(()) };
    if m.shards.iter().any(|r| current.shards.iter().any(|c| c.file == r.file)) {
        return fs::remove_dir_all(work).ctx("remove", work);
    }
    for r in &m.shards {
        let (w, o) = (work.join(&r.file), out.join(&r.file));
        if fs::symlink_metadata(&w).is_err() && fs::symlink_metadata(&o).is_ok_and(|md| md.len() == r.size) {
            fs::rename(&o, &w).ctx("rename", &o)?;
        }
    }
    Ok(())
}

/// The walked files to pack: keys the dataset lacks, and with `replace` those whose bytes
/// differ from the stored sample (size, else CRC32C, read in parallel). Returns them with the
/// number replaced and the number left alone.
fn select(old: &Reader, walked: &walk::WalkResult, o: &PackOptions, replace: bool, progress: &Progress) -> Result<(FileList, u64, u64)> {
    let n = walked.files.len();
    // For each file: None new, Some(i) the dataset's sample with that key.
    let mut existing = Vec::with_capacity(n);
    for i in 0..n {
        existing.push(old.find(walked.files.key(i))?);
    }
    let mut differs = vec![false; n];
    if replace {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let out: std::sync::Mutex<Vec<(usize, Result<bool>)>> = Default::default();
        let work = || loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= n || progress.cancel.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            if let Some(j) = existing[i] {
                let r = old.entry(j).and_then(|e| bytes_differ(&walked.files.path(i, &walked.roots), &e, o.follow_symlinks));
                out.lock().unwrap_or_else(|p| p.into_inner()).push((i, r));
            }
        };
        crate::pool::run_with_caller(o.threads.clamp(1, 64), "packds-compare", &work);
        progress.check()?;
        for (i, r) in out.into_inner().unwrap_or_else(|p| p.into_inner()) {
            differs[i] = r?;
        }
    }
    let mut files = FileList::default();
    let (mut replaced, mut unchanged) = (0, 0);
    for i in 0..n {
        match existing[i] {
            None => files.push(walked.files.key(i), walked.files.root(i)),
            Some(_) if differs[i] => {
                files.push(walked.files.key(i), walked.files.root(i));
                replaced += 1;
            }
            Some(_) => unchanged += 1,
        }
    }
    Ok((files, replaced, unchanged))
}

/// Do the bytes of the file at `path` differ from sample `e` (its original size, then CRC32C)?
fn bytes_differ(path: &Path, e: &Entry, follow: bool) -> Result<bool> {
    use std::io::Read;
    let md = if follow { fs::metadata(path) } else { fs::symlink_metadata(path) }.ctx("stat", path)?;
    if !md.is_file() || md.len() != e.raw {
        return Ok(true);
    }
    let (mut f, _) = fsx::open_read_nonblocking(path).map_err(|err| Error::io("open", path, err))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut crc = 0u32;
    loop {
        let k = f.read(&mut buf).ctx("read", path)?;
        if k == 0 {
            return Ok(crc != e.crc);
        }
        crc = crc32c::crc32c_append(crc, &buf[..k]);
    }
}

/// What the new version records of the tree: the hard links of the old and new samples it keeps
/// (by key: positions move), the empty directories of both that no sample now lies under, and
/// the sparse files of both.
#[allow(clippy::type_complexity)]
fn merged_tree(old: &Reader, new: &Reader, merged: &Index) -> Result<(Vec<String>, Vec<[u64; 2]>, u64)> {
    let mut links = Vec::new();
    for (r, is_old) in [(old, true), (new, false)] {
        for &[a, o] in &r.manifest().hard_links {
            let (Ok(ka), Ok(ko)) = (r.key(a as usize), r.key(o as usize)) else { continue };
            // An old name that was replaced no longer shares the old data.
            if is_old && (new.find(ka)?.is_some() || new.find(ko)?.is_some()) {
                continue;
            }
            if let (Some(x), Some(y)) = (merged.find(ka)?, merged.find(ko)?) {
                links.push([x.min(y) as u64, x.max(y) as u64]);
            }
        }
    }
    links.sort_unstable();
    let mut dirs: Vec<String> = old.manifest().empty_dirs.iter().chain(&new.manifest().empty_dirs).cloned().collect();
    dirs.sort();
    dirs.dedup();
    let mut keep = Vec::with_capacity(dirs.len());
    for d in dirs {
        let under = [d.as_bytes(), b"/"].concat();
        let (mut lo, mut hi) = (0, merged.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if merged.key(mid)? < &under[..] {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo == merged.len() || !merged.key(lo)?.starts_with(&under) {
            keep.push(d);
        }
    }
    Ok((keep, links, old.manifest().sparse_files + new.manifest().sparse_files))
}

/// Is the index of the new version unordered (replaced keys, or new keys among the old ones)?
fn merged_is_unordered(old: &Reader, new: &Reader, replaced: u64) -> bool {
    let last_old = old.len().checked_sub(1).and_then(|i| old.key(i).ok());
    let first_new = new.key(0).ok();
    replaced > 0 || old.index().is_unordered() || matches!((last_old, first_new), (Some(a), Some(b)) if a >= b)
}

/// Moves the new shards into the dataset and writes the index of `version`: the old entries
/// (less the replaced keys) and the new ones. Returns what the manifest records of it.
fn commit(out: &Path, old: &Reader, new: &Reader, version: u64, format: ShardFormat, first_shard: usize) -> Result<index::ConcatSummary> {
    let first = old.index().shards().len();
    for (k, s) in new.index().shards().iter().enumerate() {
        let want = shard_name(first_shard + k, format);
        if s.name != want {
            return Err(Error::format(new.dir(), format!("appended shard {} should be {want}", s.name)));
        }
        let src = new.dir().join(&s.name);
        fs::rename(&src, out.join(&s.name)).ctx("rename", &src)?;
        crate::fault::kill_in_append(2);
    }
    fsx::sync_dir(out)?;
    let ipath = out.join(layout::index_file_name(version));
    let coded = old.is_coded() || new.is_coded();
    let replaced = (0..new.len()).any(|i| new.key(i).is_ok_and(|k| old.find(k).ok().flatten().is_some()));
    if !merged_is_unordered(old, new, replaced as u64) && (coded == old.is_coded()) && (coded == new.is_coded()) {
        return index::concat(&[reopen(old.index())?, reopen(new.index())?], &ipath, coded.then_some(&[][..]));
    }
    // Entries of both, a new one superseding an old one of the same key.
    let mut all: Vec<(&[u8], Entry)> = Vec::with_capacity(old.len() + new.len());
    for i in 0..old.len() {
        let k = old.key(i)?;
        if new.find(k)?.is_none() {
            all.push((k, old.entry(i)?));
        }
    }
    for i in 0..new.len() {
        let mut e = new.entry(i)?;
        e.shard += first as u32;
        all.push((new.key(i)?, e));
    }
    all.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let shards = old.index().shards().iter().chain(new.index().shards()).cloned().collect();
    index::write_unordered(all.into_iter(), shards, coded.then_some(&[][..]), &ipath)
}

/// Another handle on an open index's file (for [`index::concat`], which takes owned indexes).
fn reopen(ix: &Index) -> Result<Index> {
    Index::open(ix.path())
}
