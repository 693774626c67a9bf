//! The `--zstd-dict` dictionary, trained once before the first shard.

use super::{PackOptions, DICT_SAMPLES, DICT_SAMPLE_BYTES};
use crate::codec;
use crate::error::{Error, Result};
use crate::walk::{FileList, SourceRoot};
use std::fs::File;
use std::io::Read;

/// Trains the `--zstd-dict` dictionary on up to `DICT_SAMPLES` files spread evenly over the
/// sorted file list (the first `DICT_SAMPLE_BYTES` of each; files that do not compress on their
/// own are passed over): deterministic for a given tree.
pub(super) fn train_dict(opts: &PackOptions, roots: &[SourceRoot], files: &FileList) -> Result<Vec<u8>> {
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
