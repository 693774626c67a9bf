//! packds: pack many small files into a few indexed tar shards, and read any sample back fast.
//!
//! Modules in pipeline order:
//! - [`error`]   one error type; every variant names the path or key a user can act on
//! - [`fsx`]     filesystem helpers: atomic write (temp + fsync + rename), directory fsync, file hash
//! - [`walk`]    parallel discovery of the input tree, odd files, deterministic order
//! - [`tar`]     pax/ustar header writer and header reader for the shard format
//! - [`codec`]   per-sample zstd compression, bounded decompression, dictionaries
//! - [`index`]   the binary index: builder, validation at open, O(1)/O(log n) lookups (mapped)
//! - [`layout`]  the dataset directory contract: file names, owned files, output preflight, staging checks
//! - [`manifest`] the human-readable `manifest.json`: its one constructor, loading and checks
//! - [`pack`]    the pipeline: walk → parallel read + checksum → shard writer → index; resume
//! - [`append`]  `pack --append`: new shards, a new index version, the manifest switched last
//! - [`job`]     a long operation on its own thread: progress, cancel (pack, plan, index)
//! - [`plan`]    partitioned packing (job arrays): plan, pack --part I/N, merge
//! - [`read`]    `Reader`: mapped shards, get / get_many, verify, unpack
//! - [`sigbus`]  a SIGBUS guard for shards truncated under a reader's mappings
//! - [`stage`]   copy a dataset to node-local storage, verified in the same pass; preload
//! - [`cache`]   a node-local shard cache shared by the processes of a node (fetch, pin, evict)
//! - [`tarindex`] `packds index`: an index over existing tar files (WebDataset shards), in place
//! - [`compose`] `packds concat` and `packds subset`: datasets made of other datasets' shards
//! - [`pool`]    scoped worker threads (no pool outlives a call)
//! - `fault`     test-only fault injection (`PACKDS_FAULT`; feature `fault-injection`)
//! - `py`        the only code that names pyo3 (feature `python`)

pub mod append;
pub mod cache;
pub mod codec;
pub mod compose;
pub mod error;
pub(crate) mod fault;
pub mod fsx;
pub mod index;
pub mod job;
pub mod layout;
pub mod manifest;
pub mod pack;
pub mod plan;
pub mod pool;
pub mod read;
pub mod sigbus;
pub mod stage;
pub mod tar;
pub mod tarindex;
pub mod walk;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};

/// Version of this library, written into every manifest.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
