//! `manifest.json`: the human-readable description of a dataset, written last.

use crate::error::{Error, IoContext, Result};
use crate::walk::Skipped;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FILE: &str = "manifest.json";
pub const INDEX_FILE: &str = "index.pdsi";
pub const FORMAT_NAME: &str = "packds";
/// The newest format version this library reads (1: samples stored raw; 2: per-sample
/// compression, a codec section in the index). It writes 1 whenever it can.
pub const FORMAT_VERSION: u32 = 2;

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

impl Manifest {
    pub fn load(dir: &Path) -> Result<Manifest> {
        let p = dir.join(FILE);
        let text = std::fs::read(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                if dir.join("part-0").is_dir() || dir.join("part-1").is_dir() {
                    Error::format_hint(dir, "a partitioned pack that is not merged yet", "run `packds merge DATASET` once every part is done")
                } else if dir.join(".pack-state").is_dir() {
                    Error::format_hint(
                        dir,
                        "incomplete dataset: its pack was interrupted",
                        "finish it with the same `packds pack ... -o DATASET` command plus --resume",
                    )
                } else if !dir.exists() {
                    Error::io("open", dir, e)
                } else {
                    Error::format_hint(dir, "not a packds dataset (no manifest.json)", "give the directory written by `packds pack -o DATASET`")
                }
            } else {
                Error::io("read", &p, e)
            }
        })?;
        let m: Manifest = serde_json::from_slice(&text).map_err(|e| Error::format(&p, format!("manifest is not valid: {e}")))?;
        if m.format != FORMAT_NAME {
            return Err(Error::format(&p, "not a packds manifest"));
        }
        if m.format_version == 0 || m.format_version > FORMAT_VERSION {
            return Err(Error::format(&p, format!("format version {} is not supported by packds {} (upgrade packds)", m.format_version, crate::VERSION)));
        }
        Ok(m)
    }

    pub fn to_json(&self) -> Result<Vec<u8>> {
        let mut v = serde_json::to_vec_pretty(self).map_err(|e| Error::format(FILE, e.to_string()))?;
        v.push(b'\n');
        Ok(v)
    }
}

/// Reads and parses a JSON file, naming it in errors.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read(path).ctx("read", path)?;
    serde_json::from_slice(&text).map_err(|e| Error::format(path, e.to_string()))
}
