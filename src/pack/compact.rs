//! `packds compact DATASET`: after `pack --append --replace`, the old bytes of replaced samples
//! stay in their shards, unreferenced. Compaction writes the live samples of those shards
//! (only those: the others are kept as they are) into new shards numbered after every existing
//! one — stored bytes copied as they are, no recompression; tar members keep their mode and
//! mtime — then writes the index of the next version and switches the manifest, last, as an
//! append does. The retired shards stay for readers that have the previous version open and are
//! removed by the next compaction or append (files the current and previous manifests do not
//! name).

use super::member::{member_name, Small};
use super::stamp::Stamp;
use super::writer::{Completed, ShardWriter};
use super::{planned_len, PackOptions, STATE_DIR};
use crate::error::{Error, IoContext, Result};
use crate::fsx;
use crate::index::{self, Entry};
use crate::layout::{self, ShardFormat};
use crate::manifest::{CompressionRecord, Manifest};
use crate::read::Reader;
use crate::tar::{self, Meta};
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a compaction reports.
#[derive(Debug, Clone, PartialEq)]
pub struct CompactSummary {
    pub output: PathBuf,
    pub version: u64,
    /// Shards rewritten (they held unreferenced bytes) and shards written in their place.
    pub rewritten: u64,
    pub new_shards: u64,
    /// Bytes on disk the current version no longer needs (freed once the retired shards go).
    pub freed_bytes: u64,
    pub seconds: f64,
}

/// Compacts the dataset `out` (see the module docs); `shard_size` cuts the new shards.
pub fn compact(out: &Path, shard_size: u64) -> Result<CompactSummary> {
    let t0 = Instant::now();
    let _lock = layout::lock_dir(out)?;
    let old = Reader::open(out)?;
    let m = old.manifest().clone();
    let nshards = old.index().shards().len();
    // Live samples per shard; a shard with fewer than it was written with holds dead bytes.
    let mut live: Vec<Vec<usize>> = vec![Vec::new(); nshards];
    for i in 0..old.len() {
        live[old.entry(i)?.shard as usize].push(i);
    }
    let dirty: Vec<usize> = (0..nshards).filter(|&s| (live[s].len() as u64) < m.shards[s].samples).collect();
    if dirty.is_empty() {
        return Ok(CompactSummary {
            output: out.to_path_buf(),
            version: m.version,
            rewritten: 0,
            new_shards: 0,
            freed_bytes: 0,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    let linked: HashSet<u64> = m.hard_links.iter().flatten().copied().collect();
    if dirty.iter().flat_map(|&s| &live[s]).any(|&i| linked.contains(&(i as u64))) {
        return Err(Error::usage(
            format!("{} has hard-linked samples in the shards to rewrite: compacting them is not supported", out.display()),
            "pack the tree again into a new dataset",
        ));
    }
    let format = ShardFormat::from_ext(&m.shard_format).ok_or_else(|| Error::format(out, "unknown shard format"))?;
    if format == ShardFormat::H5 {
        return Err(Error::usage(format!("{} has HDF5 shards: compacting them is not supported yet", out.display()), "pack the tree again into a new dataset"));
    }
    if old.index().dict().is_some_and(|d| !d.is_empty()) {
        return Err(Error::usage(
            format!("{} has a zstd dictionary: compacting it is not supported yet", out.display()),
            "pack the tree again into a new dataset",
        ));
    }
    let mut opts = PackOptions::new(Vec::new(), out.to_path_buf());
    opts.format = format;
    opts.shard_size = shard_size;
    opts.compress = m.compression.as_ref().map_or(Ok(crate::codec::Compress::None), |c| c.mode.parse())?;
    let state = out.join(STATE_DIR);
    let _ = fs::remove_dir_all(&state);
    fs::create_dir(&state).ctx("create directory", &state)?;
    // The new shards: numbered after every shard file there is (retired ones included).
    let first = next_shard_number(out)?;
    let (mut parts, mut records, mut extras) = (Vec::new(), Vec::new(), Vec::new());
    let mut moved: Vec<usize> = dirty.iter().flat_map(|&s| live[s].iter().copied()).collect();
    moved.sort_unstable(); // key order
    {
        let mut w = ShardWriter::new(&opts, &[], true, first, &[], Completed { parts: &mut parts, records: &mut records, extras: &mut extras });
        for &i in &moved {
            let e = old.entry(i)?;
            let key = old.key(i)?;
            let (mode, mtime) = old.member_mode_mtime(i).unwrap_or((0o644, 0));
            let member = member_of(key, &e, &old.stored(&e)?, mode, mtime);
            old.check_intact(e.shard)?; // the bytes came from a shard that is still whole
            w.accept_small(key, &member)?;
        }
        w.close()?;
    }
    // The next version: the kept shards' entries, then the new ones.
    let dirty_set: HashSet<usize> = dirty.iter().copied().collect();
    let kept: Vec<usize> = (0..nshards).filter(|s| !dirty_set.contains(s)).collect();
    let mut renumber = vec![u32::MAX; nshards];
    for (k, &s) in kept.iter().enumerate() {
        renumber[s] = k as u32;
    }
    let mut all: Vec<(&[u8], Entry)> = Vec::with_capacity(old.len());
    for &s in &kept {
        for &i in &live[s] {
            let mut e = old.entry(i)?;
            e.shard = renumber[s];
            all.push((old.key(i)?, e));
        }
    }
    for (j, p) in parts.iter().enumerate() {
        for i in 0..p.len() {
            let mut e = p.entry(i)?;
            e.shard = (kept.len() + j) as u32;
            all.push((p.key(i)?, e));
        }
    }
    all.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut shards: Vec<_> = kept.iter().map(|&s| old.index().shards()[s].clone()).collect();
    shards.extend(parts.iter().flat_map(|p| p.shards().iter().cloned()));
    let version = m.version + 1;
    let coded = old.is_coded();
    let ix = index::write_unordered(all.into_iter(), shards, coded.then_some(&[][..]), &out.join(layout::index_file_name(version)))?;
    let mut shard_records: Vec<_> = kept.iter().map(|&s| m.shards[s].clone()).collect();
    shard_records.extend(records.iter().cloned());
    let freed: u64 = dirty.iter().map(|&s| m.shards[s].size).sum::<u64>().saturating_sub(records.iter().map(|r| r.size).sum());
    let mut history = m.history.clone();
    history.push(serde_json::json!({
        "version": version,
        "compacted": dirty.iter().map(|&s| m.shards[s].file.clone()).collect::<Vec<_>>(),
        "shards": [first, first + records.len()],
        "created_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    }));
    let links = relink(&old, &m.hard_links, &index::Index::open(&out.join(layout::index_file_name(version)))?)?;
    let compression = m.compression.as_ref().map(|c| CompressionRecord { mode: c.mode.clone(), stored_bytes: ix.stored_bytes, zstd_dict: None });
    let new_shards = records.len() as u64;
    let nm = Manifest::new(format, m.options.clone(), ix.into(), shard_records)
        .with_skipped(m.skipped.clone())
        .with_compression(compression)
        .with_format_version(m.format_version.max(2))
        .with_version(version, history)
        .with_tree(m.empty_dirs.clone(), links, m.sparse_files);
    fsx::write_atomic(&out.join(layout::MANIFEST_FILE), &nm.to_json()?)?;
    fsx::sync_dir(out)?;
    fs::remove_dir_all(&state).ctx("remove", &state)?;
    retire(out, &m, &nm);
    Ok(CompactSummary {
        output: out.to_path_buf(),
        version,
        rewritten: dirty.len() as u64,
        new_shards,
        freed_bytes: freed,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The member of sample `e` (stored bytes `stored`) as [`ShardWriter::accept_small`] takes it.
fn member_of(key: &[u8], e: &Entry, stored: &[u8], mode: u32, mtime: i64) -> Small {
    let meta = Meta { size: e.raw, mode: 0o100000 | (mode & 0o7777), mtime, uid: 0, gid: 0 };
    let mut member = Vec::with_capacity(stored.len() + 1024);
    let hlen = tar::write_header(&mut member, &member_name(key, e.codec), &Meta { size: stored.len() as u64, ..meta });
    member.extend_from_slice(stored);
    member.resize(member.len() + tar::padding(stored.len() as u64) as usize, 0);
    Small {
        meta,
        stamp: Stamp::of_bytes(e.raw),
        member,
        hlen,
        crc: e.crc,
        stored: e.size,
        codec: e.codec,
        planned: planned_len(ShardFormat::Tar, key, &meta),
        shape: Default::default(),
    }
}

/// One more than the highest shard number of any shard file in `out`.
pub(crate) fn next_shard_number(out: &Path) -> Result<usize> {
    let mut next = 0;
    for e in fs::read_dir(out).ctx("list directory", out)? {
        if let Some((k, _)) = e.ctx("list directory", out)?.file_name().to_str().and_then(layout::parse_shard_name) {
            next = next.max(k + 1);
        }
    }
    Ok(next)
}

/// The hard-link pairs of `old` (positions) as positions in the new index (by key).
fn relink(old: &Reader, links: &[[u64; 2]], new: &index::Index) -> Result<Vec<[u64; 2]>> {
    let mut out = Vec::new();
    for &[a, b] in links {
        if let (Some(x), Some(y)) = (new.find(old.key(a as usize)?)?, new.find(old.key(b as usize)?)?) {
            out.push([x.min(y) as u64, x.max(y) as u64]);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Removes the shard and index files that neither `prev` nor `cur` names (those of versions
/// before the previous one); best effort.
pub(crate) fn retire(out: &Path, prev: &Manifest, cur: &Manifest) {
    let named: HashSet<&str> =
        prev.shards.iter().chain(&cur.shards).map(|r| r.file.as_str()).chain([prev.index.file.as_str(), cur.index.file.as_str()]).collect();
    let Ok(dir) = fs::read_dir(out) else { return };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(n) = name.to_str() else { continue };
        let ours = layout::parse_shard_name(n).is_some() || layout::parse_index_name(n).is_some();
        if ours && !named.contains(n) {
            let _ = fs::remove_file(e.path());
        }
    }
}
