//! `manifest.json`: the human-readable description of a dataset, written last.

use crate::error::{Error, IoContext, Result};
use crate::layout::{self, DirKind, ShardFormat};
use crate::walk::Skipped;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub use crate::layout::{INDEX_FILE, MANIFEST_FILE as FILE};
pub const FORMAT_NAME: &str = "packds";
/// The newest format version this library reads (1: samples stored raw; 2: per-sample
/// compression, a codec section in the index; 3: hard links stored once, index entries that
/// share data). It writes the oldest that can hold the dataset: the index's version.
pub const FORMAT_VERSION: u32 = 3;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardRecord {
    pub file: String,
    pub size: u64,
    pub samples: u64,
    /// XXH3-128 of the whole file, 32 lowercase hex digits.
    pub xxh3_128: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IndexRecord {
    pub file: String,
    pub size: u64,
    pub xxh3_128: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub shard_format: String,
    pub tool: String,
    pub created_unix: u64,
    /// The options the dataset was packed with.
    pub options: serde_json::Value,
    pub samples: u64,
    /// Sum of all sample sizes.
    pub total_bytes: u64,
    pub index: IndexRecord,
    pub shards: Vec<ShardRecord>,
    /// Files left out (symlinks, special files, and unreadable files under `--on-error skip`).
    pub skipped: Vec<Skipped>,
    /// Present when the dataset was packed with `--compress` (format version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionRecord>,
    /// The dataset's version: 1 as packed, one more at each `pack --append` (absent: 1).
    #[serde(default = "first_version", skip_serializing_if = "is_first_version")]
    pub version: u64,
    /// What each `pack --append` added, oldest first (absent: nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<serde_json::Value>,
    /// Directories that were empty in the source (keys, `/`-separated, sorted); `unpack`
    /// recreates them. Absent (older datasets): none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub empty_dirs: Vec<String>,
    /// Hard links stored once: pairs `[first, other]` of sample positions (`first < other`, same
    /// shard) where `other` is another name of `first`'s file and its index entry shares
    /// `first`'s data. `unpack` makes `other` a hard link of `first`. Absent: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hard_links: Vec<[u64; 2]>,
    /// Files that were sparse in the source (fewer blocks allocated than their size), stored at
    /// full size. Absent: none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sparse_files: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn first_version() -> u64 {
    1
}

fn is_first_version(v: &u64) -> bool {
    *v == 1
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompressionRecord {
    /// `zstd:LEVEL` or `auto:LEVEL`.
    pub mode: String,
    /// Sum of the stored sizes (`total_bytes` is the sum of the original sizes).
    pub stored_bytes: u64,
    /// The zstd dictionary (stored in the index), when one was trained.
    pub zstd_dict: Option<DictRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DictRecord {
    pub size: u64,
    pub xxh3_128: String,
}

pub fn hex128(h: u128) -> String {
    format!("{h:032x}")
}

/// What a manifest records about the index: from [`crate::index::concat`] or an
/// [`crate::index::IndexBuilder`] and the written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexFacts {
    pub samples: u64,
    /// Sum of the original sample sizes.
    pub total_bytes: u64,
    pub file_size: u64,
    pub xxh3_128: u128,
}

impl From<crate::index::ConcatSummary> for IndexFacts {
    fn from(s: crate::index::ConcatSummary) -> IndexFacts {
        IndexFacts { samples: s.samples, total_bytes: s.total_bytes, file_size: s.file_size, xxh3_128: s.xxh3_128 }
    }
}

impl Manifest {
    /// The one constructor: a format version 1 manifest of a dataset in `shard_format` with the
    /// given index and shards, written by this packds now. See the `with_` methods for the rest.
    pub fn new(shard_format: ShardFormat, options: serde_json::Value, index: IndexFacts, shards: Vec<ShardRecord>) -> Manifest {
        Manifest {
            format: FORMAT_NAME.into(),
            format_version: 1,
            shard_format: shard_format.ext().into(),
            tool: format!("packds {}", crate::VERSION),
            created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            options,
            samples: index.samples,
            total_bytes: index.total_bytes,
            index: IndexRecord { file: INDEX_FILE.into(), size: index.file_size, xxh3_128: hex128(index.xxh3_128) },
            shards,
            skipped: Vec::new(),
            compression: None,
            version: 1,
            history: Vec::new(),
            empty_dirs: Vec::new(),
            hard_links: Vec::new(),
            sparse_files: 0,
        }
    }

    /// Version `version` of a dataset, with its index in `index_file` (see
    /// [`crate::layout::index_file_name`]) and the record of what each append added.
    pub fn with_version(mut self, version: u64, history: Vec<serde_json::Value>) -> Manifest {
        self.version = version;
        self.index.file = crate::layout::index_file_name(version);
        self.history = history;
        self
    }

    /// The tree's other facts: empty directories, hard links (sample positions) and sparse files.
    pub fn with_tree(mut self, empty_dirs: Vec<String>, hard_links: Vec<[u64; 2]>, sparse_files: u64) -> Manifest {
        self.empty_dirs = empty_dirs;
        self.hard_links = hard_links;
        self.sparse_files = sparse_files;
        self
    }

    /// The files left out, as given.
    pub fn with_skipped(mut self, skipped: Vec<Skipped>) -> Manifest {
        self.skipped = skipped;
        self
    }

    /// Per-sample compression (format version 2).
    pub fn with_compression(mut self, compression: Option<CompressionRecord>) -> Manifest {
        if compression.is_some() {
            self.format_version = 2;
        }
        self.compression = compression;
        self
    }

    /// A format version that the index's features require (2: an unordered index).
    pub fn with_format_version(mut self, v: u32) -> Manifest {
        self.format_version = v;
        self
    }

    /// Loads and checks the manifest of the dataset `dir`; its absence is explained (a pack that
    /// was interrupted, parts not merged yet, not a dataset at all).
    pub fn load(dir: &Path) -> Result<Manifest> {
        Manifest::parse(&Manifest::read_bytes(dir)?, &dir.join(FILE))
    }

    /// The manifest file's bytes, with [`Manifest::load`]'s errors.
    /// A regular file only (a FIFO or a device is refused, see [`layout::open_data_file`]),
    /// read up to its size.
    pub fn read_bytes(dir: &Path) -> Result<Vec<u8>> {
        use std::io::Read;
        let p = dir.join(FILE);
        let (f, len) = layout::open_data_file(&p, |e| if e.kind() == std::io::ErrorKind::NotFound { no_manifest(dir, e) } else { Error::io("open", &p, e) })?;
        let mut v = Vec::with_capacity(usize::try_from(len).unwrap_or(0).min(1 << 30));
        f.take(len.saturating_add(1)).read_to_end(&mut v).ctx("read", &p)?;
        if v.len() as u64 > len {
            return Err(Error::format(&p, "manifest.json grew while it was read (is something writing it?)"));
        }
        Ok(v)
    }

    /// Parses and checks manifest bytes read from `path`: format, version, file names.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Manifest> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| Error::format(path, format!("manifest is not valid: {e}")))?;
        if m.format != FORMAT_NAME {
            return Err(Error::format(path, "not a packds manifest"));
        }
        if m.format_version == 0 || m.format_version > FORMAT_VERSION {
            return Err(Error::format(path, format!("format version {} is not supported by packds {} (upgrade packds)", m.format_version, crate::VERSION)));
        }
        layout::check_manifest_names(&m, path)?;
        Ok(m)
    }

    pub fn to_json(&self) -> Result<Vec<u8>> {
        let mut v = serde_json::to_vec_pretty(self).map_err(|e| Error::format(FILE, e.to_string()))?;
        v.push(b'\n');
        Ok(v)
    }
}

/// Why `dir` has no manifest, for the user.
fn no_manifest(dir: &Path, e: std::io::Error) -> Error {
    match DirKind::of(dir) {
        DirKind::UnmergedParts => Error::format_hint(dir, "a partitioned pack that is not merged yet", "run `packds merge DATASET` once every part is done"),
        DirKind::InterruptedPack => Error::format_hint(
            dir,
            "incomplete dataset: its pack was interrupted",
            "finish it with the same `packds pack ... -o DATASET` command plus --resume",
        ),
        _ if !dir.exists() => Error::io("open", dir, e),
        _ => Error::format_hint(dir, "not a packds dataset (no manifest.json)", "give the directory written by `packds pack -o DATASET`"),
    }
}

/// Serializes `value` as JSON for the file `path` (an error, never an empty file).
pub fn json_bytes<T: Serialize>(value: &T, pretty: bool, path: &Path) -> Result<Vec<u8>> {
    let r = if pretty { serde_json::to_vec_pretty(value) } else { serde_json::to_vec(value) };
    r.map_err(|e| Error::format(path, format!("cannot write as JSON: {e}")))
}

/// Reads and parses a JSON file, naming it in errors.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read(path).ctx("read", path)?;
    serde_json::from_slice(&text).map_err(|e| Error::format(path, e.to_string()))
}
