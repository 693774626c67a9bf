//! Files larger than the window's per-file limit: streamed by the writer in chunks, stored raw
//! or compressed through a spool file beside the shard.

use super::member::{force_compress, member_name};
use super::writer::ShardOut;
use super::{PackOptions, ShardFormat, STREAM_CHUNK};
use crate::codec::{self, Compress};
use crate::error::{Error, IoContext, Result};
use crate::tar::{self, Meta};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Reads exactly `size` bytes of `f` in chunks into `sink` and returns their CRC32C; a file
/// that ends early or goes on is a `Changed` error.
fn read_checked(f: &mut File, path: &Path, size: u64, buf: &mut [u8], mut sink: impl FnMut(&[u8]) -> Result<()>) -> Result<u32> {
    let mut left = size;
    let mut crc = 0u32;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let got = f.read(&mut buf[..want]).ctx("read", path)?;
        if got == 0 {
            return Err(Error::Changed { path: path.to_path_buf(), what: format!("it shrank: {} of {size} bytes were there", size - left) });
        }
        crc = crc32c::crc32c_append(crc, &buf[..got]);
        sink(&buf[..got])?;
        left -= got as u64;
    }
    if f.read(&mut buf[..1]).ctx("read", path)? != 0 {
        return Err(Error::Changed { path: path.to_path_buf(), what: format!("it grew past {size} bytes") });
    }
    Ok(crc)
}

/// Writes a large file stored raw: header (tar), data streamed in chunks, padding.
/// Returns (data offset, CRC32C).
pub(super) fn write_large_raw(s: &mut ShardOut, tar: bool, file: &mut File, path: &Path, key: &[u8], meta: &Meta, hdr: &mut Vec<u8>) -> Result<(u64, u32)> {
    hdr.clear();
    if tar {
        tar::write_header(hdr, key, meta);
    }
    s.put(hdr)?;
    let off = s.pos;
    let crc = read_checked(file, path, meta.size, &mut vec![0u8; STREAM_CHUNK], |b| s.put(b))?;
    if tar {
        s.put(&[0u8; 512][..tar::padding(meta.size) as usize])?;
    }
    Ok((off, crc))
}

/// Writes a large file with compression: the file is compressed (zstd's own worker threads)
/// into a spool file beside the shard, then either the frame or, when it does not pay, the
/// file itself is written. Returns (data offset, stored size, codec, CRC32C of the original).
#[allow(clippy::too_many_arguments)]
pub(super) fn write_large_coded(
    opts: &PackOptions,
    s: &mut ShardOut,
    file: &mut File,
    path: &Path,
    key: &[u8],
    meta: &Meta,
    dict: &[u8],
    hdr: &mut Vec<u8>,
) -> Result<(u64, u64, u8, u32)> {
    let tar = opts.format == ShardFormat::Tar;
    let spool_path = opts.output.join(crate::layout::tmp_file_name("large.zst"));
    let _cleanup = RemoveOnDrop(&spool_path);
    let mut buf = vec![0u8; STREAM_CHUNK];
    let (mut spool, clen, crc) = compress_to_spool(opts, file, path, meta.size, dict, &spool_path, &mut buf)?;
    let pays = match opts.compress {
        Compress::Auto(_) => clen <= meta.size - meta.size / 16,
        _ => clen < meta.size,
    };
    if !(pays || force_compress(opts.format, key)) {
        file.seek(SeekFrom::Start(0)).ctx("seek", path)?;
        let (off, again) = write_large_raw(s, tar, file, path, key, meta, hdr)?;
        if again != crc {
            return Err(Error::Changed { path: path.to_path_buf(), what: "its contents changed between two reads".into() });
        }
        return Ok((off, meta.size, codec::RAW, crc));
    }
    let codec = if dict.is_empty() { codec::ZSTD } else { codec::ZSTD_DICT };
    hdr.clear();
    if tar {
        tar::write_header(hdr, &member_name(key, codec), &Meta { size: clen, ..*meta });
    }
    s.put(hdr)?;
    let off = s.pos;
    spool.seek(SeekFrom::Start(0)).ctx("seek", &spool_path)?;
    let mut left = clen;
    while left > 0 {
        let got = spool.read(&mut buf[..left.min(STREAM_CHUNK as u64) as usize]).ctx("read", &spool_path)?;
        if got == 0 {
            return Err(Error::format(&spool_path, "spool file shrank while packing"));
        }
        s.put(&buf[..got])?;
        left -= got as u64;
    }
    if tar {
        s.put(&[0u8; 512][..tar::padding(clen) as usize])?;
    }
    Ok((off, clen, codec, crc))
}

/// Compresses the `size` bytes of `file` into a new spool file at `spool_path` (one zstd frame
/// with its content size, no checksum). Returns the spool, the frame's length and the CRC32C
/// of the original bytes.
fn compress_to_spool(opts: &PackOptions, file: &mut File, path: &Path, size: u64, dict: &[u8], spool_path: &Path, buf: &mut [u8]) -> Result<(File, u64, u32)> {
    let zerr = |e: std::io::Error| Error::io("compress into", spool_path, e);
    let spool = File::options().read(true).write(true).create(true).truncate(true).open(spool_path).ctx("create", spool_path)?;
    let mut enc = zstd::stream::Encoder::with_dictionary(spool, opts.compress.level(), dict).map_err(zerr)?;
    enc.include_contentsize(true).map_err(zerr)?;
    enc.set_pledged_src_size(Some(size)).map_err(zerr)?;
    enc.include_checksum(false).map_err(zerr)?;
    let workers = opts.threads.clamp(1, 16) as u32;
    if workers > 1 {
        enc.multithread(workers).map_err(zerr)?;
    }
    let crc = read_checked(file, path, size, buf, |b| enc.write_all(b).map_err(zerr))?;
    let spool = enc.finish().map_err(zerr)?;
    let clen = spool.metadata().ctx("stat", spool_path)?.len();
    Ok((spool, clen, crc))
}

/// Removes a temporary file when dropped (on success and on error alike).
pub(super) struct RemoveOnDrop<'a>(pub &'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.0);
    }
}
