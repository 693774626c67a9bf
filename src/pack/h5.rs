//! Finishing an HDF5 shard: the writer (h5py) makes the file, packds copies the data in.

use super::large::RemoveOnDrop;
use super::writer::ShardOut;
use super::{shard_name, H5Shard, PackOptions, STREAM_CHUNK};
use crate::error::{Error, IoContext, Result};
use crate::fault;
use crate::index::ShardInfo;
use crate::layout;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use xxhash_rust::xxh3::Xxh3;

/// Where h5py puts the `data` array of a new file when it is the first dataset created (the
/// writer's layout, with the library's default metadata block): the samples are written there
/// from the start, so that the data is written once. Another offset falls back to a copy.
pub(super) const DATA_OFFSET: u64 = 2048;

/// Turns a shard's data (`s.tmp`: the stored samples back to back from `s.base`) into an HDF5
/// file: the writer (h5py) makes a skeleton with its metadata and a contiguous, allocated but
/// unwritten `data` array. When that array starts at `s.base` (h5py's usual layout), the
/// skeleton's metadata, before and after the array, is copied around the data already in place
/// (written once); else the data is copied into the skeleton. The file is then hashed in order,
/// fsynced and renamed to `dst`. Offsets in `s.index` become file offsets.
pub(super) fn finish_h5(opts: &PackOptions, s: &mut ShardOut, dst: &Path, dict: &[u8]) -> Result<ShardInfo> {
    let writer = opts.h5_writer.as_ref().ok_or_else(|| Error::usage("HDF5 shards need an HDF5 writer", "pack with the packds Python package"))?;
    let h5tmp = opts.output.join(layout::tmp_file_name(&format!("{}.new", shard_name(s.k, opts.format))));
    let _cleanup = RemoveOnDrop(&h5tmp);
    let data_off = (writer.0)(&columns(opts, s, &h5tmp, dict))?;
    fault::kill_in_h5_shard(s.k as u64 + 1);
    if data_off == s.base && s.base > 0 {
        return metadata_around_data(s, &h5tmp, dst, data_off);
    }
    let mut out = OpenOptions::new().read(true).write(true).open(&h5tmp).ctx("open", &h5tmp)?;
    let flen = out.metadata().ctx("stat", &h5tmp)?.len();
    let data_end = data_off
        .checked_add(s.pos)
        .filter(|&e| e <= flen)
        .ok_or_else(|| Error::format(&h5tmp, format!("the HDF5 writer put the data array at {data_off}, which does not fit in the {flen}-byte file")))?;
    // Hash the file in order while the data goes in: head (HDF5 metadata), data, tail.
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; STREAM_CHUNK];
    hash_range(&mut out, &h5tmp, 0, data_off, &mut h, &mut buf)?;
    let mut spool = File::open(&s.tmp).ctx("open", &s.tmp)?;
    copy_hashed(&mut spool, &s.tmp, s.base, &mut out, &h5tmp, data_off, s.pos, &mut h, &mut buf)?;
    hash_range(&mut out, &h5tmp, data_end, flen - data_end, &mut h, &mut buf)?;
    out.sync_all().ctx("fsync", &h5tmp)?;
    drop(out);
    fs::rename(&h5tmp, dst).ctx("rename", dst)?;
    let _ = fs::remove_file(&s.tmp);
    s.index.shift_offsets(data_off);
    Ok(ShardInfo { name: dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), size: flen, hash: h.digest128() })
}

/// The per-sample columns of the shard for the HDF5 writer, from its index so far.
fn columns<'a>(opts: &PackOptions, s: &'a ShardOut, path: &'a Path, dict: &'a [u8]) -> H5Shard<'a> {
    let cols = s.index.columns();
    H5Shard {
        path,
        data_len: s.pos,
        offsets: cols.offsets,
        sizes: cols.sizes,
        raw_sizes: cols.raw_sizes,
        codecs: cols.codecs,
        crcs: cols.crcs,
        keys: s.index.keys(),
        key_offsets: cols.key_offsets,
        dict,
        compression: opts.compress.name(),
    }
}

/// Feeds `len` bytes of `f` from `at` into the hash.
fn hash_range(f: &mut File, path: &Path, at: u64, len: u64, h: &mut Xxh3, buf: &mut [u8]) -> Result<()> {
    let mut done = 0u64;
    while done < len {
        let k = (len - done).min(buf.len() as u64) as usize;
        let got = f.read_at(&mut buf[..k], at + done).ctx("read", path)?;
        if got == 0 {
            return Err(Error::format(path, "file ended early"));
        }
        h.update(&buf[..got]);
        done += got as u64;
    }
    Ok(())
}

/// The write-once path of [`finish_h5`]: the skeleton's bytes before and after its data array
/// (at `data_off`, where `s.tmp` holds the data already) are copied into `s.tmp`, which is then
/// hashed in order, fsynced and renamed to `dst`.
fn metadata_around_data(s: &mut ShardOut, h5tmp: &Path, dst: &Path, data_off: u64) -> Result<ShardInfo> {
    let skel = File::open(h5tmp).ctx("open", h5tmp)?;
    let flen = skel.metadata().ctx("stat", h5tmp)?.len();
    let data_end = data_off
        .checked_add(s.pos)
        .filter(|&e| e <= flen)
        .ok_or_else(|| Error::format(h5tmp, format!("the HDF5 writer put the data array at {data_off}, which does not fit in the {flen}-byte file")))?;
    let mut buf = vec![0u8; STREAM_CHUNK];
    for (a, b) in [(0, data_off), (data_end, flen)] {
        let mut at = a;
        while at < b {
            let k = (b - at).min(buf.len() as u64) as usize;
            let got = skel.read_at(&mut buf[..k], at).ctx("read", h5tmp)?;
            if got == 0 {
                return Err(Error::format(h5tmp, "file ended early"));
            }
            s.w.write_all_at(&buf[..got], at).ctx("write", &s.tmp)?;
            at += got as u64;
        }
    }
    let mut h = Xxh3::new();
    hash_range(&mut s.w, &s.tmp, 0, flen, &mut h, &mut buf)?;
    s.w.sync_all().ctx("fsync", &s.tmp)?;
    fs::rename(&s.tmp, dst).ctx("rename", dst)?;
    s.index.shift_offsets(data_off);
    Ok(ShardInfo { name: dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), size: flen, hash: h.digest128() })
}

/// Copies `len` bytes of `from` from offset `from_at` to `to` at offset `at`, hashing them.
#[allow(clippy::too_many_arguments)]
fn copy_hashed(from: &mut File, from_path: &Path, from_at: u64, to: &mut File, to_path: &Path, at: u64, len: u64, h: &mut Xxh3, buf: &mut [u8]) -> Result<()> {
    let mut done = 0u64;
    while done < len {
        let k = (len - done).min(buf.len() as u64) as usize;
        let got = from.read_at(&mut buf[..k], from_at + done).ctx("read", from_path)?;
        if got == 0 {
            return Err(Error::format(from_path, "file ended early"));
        }
        h.update(&buf[..got]);
        to.write_all_at(&buf[..got], at + done).ctx("write", to_path)?;
        done += got as u64;
    }
    Ok(())
}
