//! Datasets made of other datasets' shards, no data copied: `packds concat` (several datasets
//! as one, keys optionally prefixed) and `packds subset` (the samples a selection picks, e.g. a
//! train/validation split). The new dataset links to the shards it needs (symlink or hard link,
//! as `packds index` does; or a verified copy) and has its own index and manifest (written
//! last). Its index is unordered (flag 2): entries sorted by key over data in the sources' order.

use crate::error::{Error, IoContext, Result};
use crate::fsx;
use crate::index::{self, Entry, ShardInfo};
use crate::layout::{self, Mode, OutputDir, Prepared, ShardFormat};
use crate::manifest::{hex128, CompressionRecord, DictRecord, Manifest, ShardRecord};
use crate::read::Reader;
use globset::{Candidate, GlobSet};
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How the new dataset refers to a source shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refer {
    /// A symlink to the shard's absolute path (the default; the sources must stay in place).
    Symlink,
    /// A hard link (same filesystem; survives moving or removing the source dataset).
    Hard,
    /// A copy, checked against the shard's XXH3-128 (a dataset of its own).
    Copy,
}

impl std::str::FromStr for Refer {
    type Err = Error;
    fn from_str(s: &str) -> Result<Refer> {
        match s {
            "symlink" => Ok(Refer::Symlink),
            "hard" => Ok(Refer::Hard),
            "copy" => Ok(Refer::Copy),
            _ => Err(Error::usage(format!("unknown link mode {s:?}"), "use symlink, hard or copy")),
        }
    }
}

impl Refer {
    fn name(self) -> &'static str {
        match self {
            Refer::Symlink => "symlink",
            Refer::Hard => "hard",
            Refer::Copy => "copy",
        }
    }
}

/// What `concat` and `subset` report.
#[derive(Debug, Clone, PartialEq)]
pub struct ComposeSummary {
    pub output: PathBuf,
    pub samples: u64,
    pub bytes: u64,
    pub shards: u64,
    /// Shards of the sources that hold no selected sample (not referenced).
    pub shards_left_out: u64,
    pub seconds: f64,
}

/// One source dataset and what is taken from it.
struct Part {
    dir: PathBuf,
    reader: Reader,
    prefix: Vec<u8>,
    /// Selected samples (positions in the source), in key order.
    take: Vec<usize>,
}

/// Which samples `subset` takes.
#[derive(Debug, Clone, Default)]
pub struct Select {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Only these keys (each must exist).
    pub keys: Option<Vec<Vec<u8>>>,
    /// About this fraction of the samples, picked by a hash of each key and `seed`: the same
    /// key, fraction and seed always give the same answer, whatever the dataset's size.
    pub fraction: Option<f64>,
    pub seed: u64,
    /// Everything the rest does not select (with the same options: the other side of a split).
    pub complement: bool,
}

/// Concatenates the datasets `sources` into `out`, each key prefixed with its `prefixes`
/// entry (none: as they are). Refuses two samples with the same key, naming both datasets.
pub fn concat(sources: &[PathBuf], prefixes: &[String], out: &Path, refer: Refer, force: bool) -> Result<ComposeSummary> {
    if sources.is_empty() {
        return Err(Error::usage("no datasets to concatenate", "packds concat A.pds B.pds ... -o OUT"));
    }
    if !prefixes.is_empty() && prefixes.len() != sources.len() {
        return Err(Error::usage(
            format!("{} prefixes for {} datasets", prefixes.len(), sources.len()),
            "give one --prefix per dataset, in the same order (--prefix '' for none)",
        ));
    }
    let mut parts = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        let reader = Reader::open(s)?;
        let take = (0..reader.len()).collect();
        let prefix = prefixes.get(i).map(|p| p.as_bytes().to_vec()).unwrap_or_default();
        parts.push(Part { dir: s.clone(), reader, prefix, take });
    }
    let sources_json: Vec<String> = sources.iter().map(|s| absolute(s)).collect();
    let options = serde_json::json!({"concat": sources_json, "prefixes": prefixes, "link": refer.name()});
    compose(parts, out, refer, force, options)
}

/// Writes into `out` the dataset of the samples of `source` that `select` picks.
pub fn subset(source: &Path, select: &Select, out: &Path, refer: Refer, force: bool) -> Result<ComposeSummary> {
    let reader = Reader::open(source)?;
    let include = crate::pack::globset(&select.include, "include")?;
    let exclude = crate::pack::globset(&select.exclude, "exclude")?;
    let keys: Option<HashSet<&[u8]>> = select.keys.as_ref().map(|k| k.iter().map(|k| &k[..]).collect());
    if let Some(f) = select.fraction {
        if !(0.0..=1.0).contains(&f) {
            return Err(Error::usage(format!("--fraction {f} is not between 0 and 1"), "e.g. --fraction 0.1 for a tenth of the samples"));
        }
    }
    if let Some(wanted) = &select.keys {
        for k in wanted {
            if reader.find(k)?.is_none() {
                return Err(Error::usage(
                    format!("key {:?} (from the key list) is not in {}", String::from_utf8_lossy(k), source.display()),
                    "list keys as `packds ls` prints them, one per line",
                ));
            }
        }
    }
    let hit = |set: &Option<GlobSet>, key: &[u8]| set.as_ref().is_some_and(|s| s.is_match_candidate(&Candidate::new(OsStr::from_bytes(key))));
    let threshold = select.fraction.map(|f| if f >= 1.0 { u64::MAX } else { (f * 2f64.powi(64)) as u64 });
    let mut take = Vec::new();
    for i in 0..reader.len() {
        let key = reader.key(i)?;
        let mut picked = (include.is_none() || hit(&include, key)) && !hit(&exclude, key) && keys.as_ref().map_or(true, |k| k.contains(key));
        if let Some(t) = threshold {
            picked &= fraction_hash(select.seed, key) < t || t == u64::MAX;
        }
        if picked != select.complement {
            take.push(i);
        }
    }
    if take.is_empty() {
        return Err(Error::usage(format!("the selection picks no sample of {}", source.display()), "check the patterns, the key list or the fraction"));
    }
    let options = serde_json::json!({
        "subset": absolute(source),
        "include": select.include,
        "exclude": select.exclude,
        "keys": select.keys.as_ref().map(|k| k.len()),
        "fraction": select.fraction,
        "seed": select.seed,
        "complement": select.complement,
        "link": refer.name(),
    });
    compose(vec![Part { dir: source.to_path_buf(), reader, prefix: Vec::new(), take }], out, refer, force, options)
}

/// The hash that decides `--fraction`: XXH3-64 of the seed (8 bytes, little-endian) and the key.
pub fn fraction_hash(seed: u64, key: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&seed.to_le_bytes());
    h.update(key);
    h.digest()
}

fn absolute(p: &Path) -> String {
    fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).to_string_lossy().into_owned()
}

fn compose(parts: Vec<Part>, out: &Path, refer: Refer, force: bool, options: serde_json::Value) -> Result<ComposeSummary> {
    let t0 = Instant::now();
    let format = one_format(&parts)?;
    let dict = one_dictionary(&parts)?;
    for p in &parts {
        if let Ok(c) = fs::canonicalize(&p.dir) {
            if fs::canonicalize(out).is_ok_and(|o| o == c) {
                return Err(Error::usage(format!("the output {} is one of the sources", out.display()), "choose another -o"));
            }
        }
    }
    let Prepared::Open(dir) = OutputDir::prepare(out, Mode::index(force))? else {
        return Err(Error::usage(format!("output {} already exists", out.display()), "pass --force to replace it, or choose another -o"));
    };
    let r = write(&parts, out, refer, format, dict.as_deref(), options, t0);
    if r.is_err() {
        if dir.created() {
            dir.remove();
        } else {
            let _ = dir.clear();
        }
    }
    r
}

fn one_format(parts: &[Part]) -> Result<ShardFormat> {
    let f = |p: &Part| ShardFormat::from_ext(&p.reader.manifest().shard_format);
    let first = f(&parts[0]).ok_or_else(|| Error::format(&parts[0].dir, "unknown shard format"))?;
    if let Some(p) = parts.iter().find(|p| f(p) != Some(first)) {
        return Err(Error::usage(
            format!(
                "{} has {} shards, {} has {} shards",
                parts[0].dir.display(),
                parts[0].reader.manifest().shard_format,
                p.dir.display(),
                p.reader.manifest().shard_format
            ),
            "combine datasets of one shard format (repack one of them with --format)",
        ));
    }
    Ok(first)
}

/// The one zstd dictionary of the sources (None: no source is compressed).
fn one_dictionary(parts: &[Part]) -> Result<Option<Vec<u8>>> {
    let mut dict: Option<(&Path, &[u8])> = None;
    let mut coded = false;
    for p in parts {
        coded |= p.reader.is_coded();
        if let Some(d) = p.reader.index().dict().filter(|d| !d.is_empty()) {
            match dict {
                Some((other, od)) if od != d => {
                    return Err(Error::usage(
                        format!("{} and {} were compressed with different zstd dictionaries", other.display(), p.dir.display()),
                        "one index holds one dictionary: repack one of them without --zstd-dict, or with the other's",
                    ))
                }
                _ => dict = Some((&p.dir, d)),
            }
        }
    }
    Ok(coded.then(|| dict.map(|d| d.1.to_vec()).unwrap_or_default()))
}

#[allow(clippy::too_many_arguments)]
fn write(
    parts: &[Part],
    out: &Path,
    refer: Refer,
    format: ShardFormat,
    dict: Option<&[u8]>,
    options: serde_json::Value,
    t0: Instant,
) -> Result<ComposeSummary> {
    // The shards that hold a selected sample, numbered in order of (source, shard).
    let mut number: HashMap<(usize, u32), u32> = HashMap::new();
    let mut used: Vec<(usize, u32)> = Vec::new();
    let mut entries: Vec<(Vec<u8>, Entry, usize, usize)> = Vec::new();
    let mut total_shards = 0u64;
    for (s, p) in parts.iter().enumerate() {
        total_shards += p.reader.index().shards().len() as u64;
        for &i in &p.take {
            let mut e = p.reader.entry(i)?;
            let k = *number.entry((s, e.shard)).or_insert_with(|| {
                used.push((s, e.shard));
                used.len() as u32 - 1
            });
            let key = [&p.prefix[..], p.reader.key(i)?].concat();
            e.shard = k;
            entries.push((key, e, s, i));
        }
    }
    // Shard numbers follow (source, shard) order, whatever order the samples came in.
    let mut order: Vec<usize> = (0..used.len()).collect();
    order.sort_by_key(|&k| used[k]);
    let mut renumber = vec![0u32; used.len()];
    for (new, &old) in order.iter().enumerate() {
        renumber[old] = new as u32;
    }
    for e in &mut entries {
        e.1.shard = renumber[e.1.shard as usize];
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
        let (a, b) = (&parts[w[0].2].dir, &parts[w[1].2].dir);
        return Err(Error::usage(
            format!("key {:?} is in both {} and {}", String::from_utf8_lossy(&w[0].0), a.display(), b.display()),
            "give each dataset its own --prefix (e.g. --prefix a/ --prefix b/), or leave one of them out",
        ));
    }
    let mut shards = Vec::new();
    let mut records = Vec::new();
    for (new, &old) in order.iter().enumerate() {
        let (s, j) = used[old];
        let info = &parts[s].reader.index().shards()[j as usize];
        let name = layout::shard_name(new, format);
        refer_to(&parts[s].dir.join(&info.name), &out.join(&name), refer, info)?;
        let samples = entries.iter().filter(|e| e.1.shard == new as u32).count() as u64;
        records.push(ShardRecord { file: name.clone(), size: info.size, samples, xxh3_128: hex128(info.hash) });
        shards.push(ShardInfo { name, size: info.size, hash: info.hash });
    }
    fsx::sync_dir(out)?;
    let ix = index::write_unordered(entries.iter().map(|(k, e, ..)| (&k[..], *e)), shards, dict, &out.join(layout::INDEX_FILE))?;
    let modes: HashSet<&str> = parts.iter().filter_map(|p| p.reader.manifest().compression.as_ref().map(|c| c.mode.as_str())).collect();
    let mode = if modes.len() == 1 { modes.into_iter().next().unwrap_or_default().to_string() } else { "mixed".into() };
    let compression = dict.map(|d| CompressionRecord {
        mode,
        stored_bytes: ix.stored_bytes,
        zstd_dict: (!d.is_empty()).then(|| DictRecord { size: d.len() as u64, xxh3_128: hex128(xxhash_rust::xxh3::xxh3_128(d)) }),
    });
    let (samples, bytes, version) = (ix.samples, ix.total_bytes, ix.version.max(2));
    let (dirs, links, sparse) = tree_of(parts, &entries);
    let m = Manifest::new(format, options, ix.into(), records).with_compression(compression).with_format_version(version).with_tree(dirs, links, sparse);
    fsx::write_atomic(&out.join(layout::MANIFEST_FILE), &m.to_json()?)?;
    fsx::sync_dir(out)?;
    Ok(ComposeSummary {
        output: out.to_path_buf(),
        samples,
        bytes,
        shards: order.len() as u64,
        shards_left_out: total_shards - order.len() as u64,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// What the new dataset records of the sources' trees: their hard links whose two names are both
/// taken (as positions among `entries`, sorted by key, which hold (key, entry, source, position
/// in the source)); and of each source taken whole, its empty directories (with its prefix) and
/// sparse-file count.
#[allow(clippy::type_complexity)]
fn tree_of(parts: &[Part], entries: &[(Vec<u8>, Entry, usize, usize)]) -> (Vec<String>, Vec<[u64; 2]>, u64) {
    let at: HashMap<(usize, usize), u64> = entries.iter().enumerate().map(|(n, x)| ((x.2, x.3), n as u64)).collect();
    let (mut dirs, mut links, mut sparse) = (Vec::new(), Vec::new(), 0u64);
    for (s, p) in parts.iter().enumerate() {
        let m = p.reader.manifest();
        for &[a, o] in &m.hard_links {
            if let (Some(&x), Some(&y)) = (at.get(&(s, a as usize)), at.get(&(s, o as usize))) {
                links.push([x.min(y), x.max(y)]);
            }
        }
        if p.take.len() == p.reader.len() {
            let prefix = String::from_utf8_lossy(&p.prefix);
            dirs.extend(m.empty_dirs.iter().map(|d| format!("{prefix}{d}")));
            sparse += m.sparse_files;
        }
    }
    links.sort_unstable();
    dirs.sort();
    dirs.dedup();
    (dirs, links, sparse)
}

/// Makes `dst` refer to the source shard `src` (its final target, if `src` is itself a link).
fn refer_to(src: &Path, dst: &Path, refer: Refer, info: &ShardInfo) -> Result<()> {
    let target = fs::canonicalize(src).ctx("open", src)?;
    let md = fs::metadata(&target).ctx("stat", &target)?;
    if !md.is_file() || md.len() != info.size {
        return Err(Error::format(src, format!("is {} bytes, its index says {} (the dataset changed?)", md.len(), info.size)));
    }
    match refer {
        Refer::Symlink => std::os::unix::fs::symlink(&target, dst).ctx("create", dst),
        Refer::Hard => fs::hard_link(&target, dst).map_err(|e| {
            if e.raw_os_error() == Some(libc::EXDEV) {
                Error::usage(format!("cannot hard-link {} into {}: another filesystem", target.display(), dst.display()), "use --link symlink or copy")
            } else {
                Error::io("create", dst, e)
            }
        }),
        Refer::Copy => {
            let tmp = dst.with_file_name(layout::tmp_file_name(&dst.file_name().unwrap_or_default().to_string_lossy()));
            fs::copy(&target, &tmp).ctx("copy to", &tmp)?;
            fs::File::open(&tmp).and_then(|f| f.sync_all()).ctx("fsync", &tmp)?;
            if fsx::hash_file(&tmp)? != info.hash {
                let _ = fs::remove_file(&tmp);
                return Err(Error::format(&target, "does not match its checksum: the copy was not kept"));
            }
            fs::rename(&tmp, dst).ctx("rename", dst)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(dir: &Path, name: &str, keys: &[&str]) -> PathBuf {
        let src = dir.join(format!("{name}-src"));
        for k in keys {
            let p = src.join(k);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, format!("{name}:{k}").repeat(50)).unwrap();
        }
        let mut o = crate::pack::PackOptions::new(vec![src], dir.join(format!("{name}.pds")));
        o.shard_size = 4096;
        crate::pack::pack(&o, &crate::job::Progress::default()).unwrap();
        o.output
    }

    #[test]
    fn concat_prefixes_and_refuses_collisions() {
        let d = tempfile::tempdir().unwrap();
        let a = ds(d.path(), "a", &["x", "y/1", "z"]);
        let b = ds(d.path(), "b", &["x", "w"]);
        let e = concat(&[a.clone(), b.clone()], &[], &d.path().join("c"), Refer::Symlink, false).unwrap_err().to_string();
        assert!(e.contains("key \"x\" is in both"), "{e}");
        assert!(!d.path().join("c").exists());
        let s = concat(&[a, b], &["a/".into(), "b/".into()], &d.path().join("c"), Refer::Symlink, false).unwrap();
        assert_eq!(s.samples, 5);
        let r = Reader::open(&d.path().join("c")).unwrap();
        let i = r.find(b"b/x").unwrap().unwrap();
        assert_eq!(&r.get_checked(i).unwrap()[..], "b:x".repeat(50).as_bytes());
        assert!(r.verify().unwrap().problems.is_empty());
    }

    #[test]
    fn a_fraction_and_its_complement_split_the_dataset() {
        let d = tempfile::tempdir().unwrap();
        let keys: Vec<String> = (0..300).map(|i| format!("k{i:03}")).collect();
        let a = ds(d.path(), "a", &keys.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let sel = Select { fraction: Some(0.2), seed: 7, ..Select::default() };
        let x = subset(&a, &sel, &d.path().join("x"), Refer::Symlink, false).unwrap();
        let y = subset(&a, &Select { complement: true, ..sel }, &d.path().join("y"), Refer::Hard, false).unwrap();
        assert_eq!(x.samples + y.samples, 300);
        assert!((30..90).contains(&x.samples), "{}", x.samples);
        let (rx, ry) = (Reader::open(&d.path().join("x")).unwrap(), Reader::open(&d.path().join("y")).unwrap());
        for i in 0..rx.len() {
            assert!(ry.find(rx.key(i).unwrap()).unwrap().is_none());
        }
        assert!(rx.verify().unwrap().problems.is_empty() && ry.verify().unwrap().problems.is_empty());
    }
}
