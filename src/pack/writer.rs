//! The shard writer: appends members to the open shard in key order, cuts shards (by
//! `--shard-size`, or where the pipeline says: a plan's boundaries), and completes each shard:
//! tar end blocks (or the HDF5 file), fsync, rename, then its per-shard index in the state
//! directory (what `--resume` trusts). A later name of a file already stored in the open shard
//! (a hard link) becomes a tar hard link member and an index entry sharing the first name's
//! data; the empty directories go at the end of the last shard.

use super::h5::finish_h5;
use super::large::{write_large_coded, write_large_raw};
use super::member::{member_name, meta_of, Large, Shape, Small};
use super::remove::{self, Remover};
use super::stamp::{self, ShardExtra, Stamp, READ_TRIES};
use super::{planned_len, shard_name, shard_state_name, PackOptions, ShardFormat, SHARD_END, STATE_DIR, WRITEBACK_EVERY};
use crate::codec;
use crate::error::{Error, IoContext, Result};
use crate::fault;
use crate::fsx;
use crate::index::{Index, IndexBuilder, ShardInfo};
use crate::layout;
use crate::manifest::{hex128, ShardRecord};
use crate::tar;
use crate::walk::{EmptyDir, OnError, Skipped};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

/// Small members are gathered up to this many bytes before one write.
const WRITE_BUFFER: usize = 1 << 20;

/// The shard being written: `.shard-NNNNN.tar.tmp` (for HDF5: the stored samples back to back,
/// turned into the HDF5 file when it is complete), hashed as it is written.
pub(super) struct ShardOut {
    pub k: usize,
    pub tmp: PathBuf,
    pub w: File,
    /// Bytes `put` but not yet written to `w` (see [`ShardOut::flush`]).
    pending: Vec<u8>,
    /// Where the data starts in the file (HDF5: the data array's offset; tar: 0); `pos` counts
    /// from there.
    pub base: u64,
    pub pos: u64,
    /// Sum of the planned (uncompressed) lengths of the members so far.
    pub raw: u64,
    pub hash: Xxh3,
    pub index: IndexBuilder,
    /// The members' source files as they were read ([`stamp::STAMP_LEN`] bytes each).
    stamps: Vec<u8>,
    /// The same, whole (identity and ctime too), for `--remove-source`.
    sources: Vec<Stamp>,
    flushed_at: u64,
    /// Files with more than one name, by (device, inode): the first name stored in this shard,
    /// which later names in the shard link to.
    firsts: HashMap<(u64, u64), First>,
    /// The shard's hard links and sparse files.
    extra: ShardExtra,
}

/// The first name in a shard of a file with several names (hard links).
struct First {
    /// Its position in the shard's index.
    pos: u32,
    /// Its member name (the key, plus `.zst` when stored compressed).
    name: Vec<u8>,
    codec: u8,
    /// The file as it was read, and the CRC32C of its bytes.
    stamp: Stamp,
    crc: u32,
}

impl ShardOut {
    fn create(opts: &PackOptions, k: usize, dict: &[u8]) -> Result<ShardOut> {
        let tmp = opts.output.join(layout::tmp_file_name(&shard_name(k, opts.format)));
        // Read too: an HDF5 shard is hashed from this file when it is finished.
        let mut w = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp).ctx("create", &tmp)?;
        let index = if opts.compress.is_none() { IndexBuilder::new() } else { IndexBuilder::new_coded(dict) };
        // HDF5: the samples go where h5py puts the data array (see h5::DATA_OFFSET); the head
        // is filled in when the shard is finished.
        let base = if opts.format == ShardFormat::H5 { super::h5::DATA_OFFSET } else { 0 };
        if base > 0 {
            w.seek(SeekFrom::Start(base)).ctx("seek", &tmp)?;
        }
        Ok(ShardOut {
            k,
            tmp,
            w,
            pending: Vec::with_capacity(WRITE_BUFFER),
            base,
            pos: 0,
            raw: 0,
            hash: Xxh3::new(),
            index,
            stamps: Vec::new(),
            sources: Vec::new(),
            flushed_at: 0,
            firsts: HashMap::new(),
            extra: ShardExtra::default(),
        })
    }

    /// Stores `key` as another name of a file already stored in this shard, when it is one
    /// (same device and inode, more than one name) and is as it was when that name was read
    /// (the same stamp, and the same CRC32C when `crc` is known): a tar hard link member
    /// (nothing in an HDF5 shard) and an index entry sharing the first name's data. Returns
    /// whether it did. The caller adds the planned length: shard boundaries never depend on
    /// which names are links.
    #[allow(clippy::too_many_arguments)]
    fn link(&mut self, tar: bool, key: &[u8], meta: &tar::Meta, stamp: &Stamp, shape: Shape, crc: Option<u32>, hdr: &mut Vec<u8>) -> Result<bool> {
        if shape.nlink < 2 {
            return Ok(false);
        }
        let Some(f) = self.firsts.get(&(stamp.dev, stamp.ino)) else { return Ok(false) };
        if f.stamp != *stamp || crc.is_some_and(|c| c != f.crc) {
            return Ok(false); // changed since its first name was read: stored again
        }
        let target = f.pos;
        if tar {
            hdr.clear();
            tar::write_link_header(hdr, &member_name(key, f.codec), &f.name, meta);
            self.put(hdr)?;
        }
        let pos = self.index.len() as u32;
        self.index.push_shared(key, target as usize);
        stamp::push_record(&mut self.stamps, stamp);
        self.sources.push(*stamp);
        self.extra.links.push((target, pos));
        Ok(true)
    }

    /// Notes a member just stored at index position `pos`: a sparse file is counted, a file
    /// with several names remembered for [`ShardOut::link`].
    fn stored(&mut self, key: &[u8], pos: usize, codec: u8, stamp: &Stamp, crc: u32, shape: Shape) {
        if shape.sparse {
            self.extra.sparse += 1;
        }
        if shape.nlink > 1 {
            let name = member_name(key, codec).into_owned();
            self.firsts.entry((stamp.dev, stamp.ino)).or_insert(First { pos: pos as u32, name, codec, stamp: *stamp, crc });
        }
    }

    /// Appends `b` to the shard (through a buffer of [`WRITE_BUFFER`] bytes: one system call for
    /// many small members), hashing it.
    pub fn put(&mut self, b: &[u8]) -> Result<()> {
        self.hash.update(b);
        self.pos += b.len() as u64;
        if self.pending.len() + b.len() > WRITE_BUFFER {
            self.flush()?;
        }
        if b.len() >= WRITE_BUFFER {
            self.w.write_all(b).ctx("write", &self.tmp)?;
        } else {
            self.pending.extend_from_slice(b);
        }
        if self.pos - self.flushed_at >= WRITEBACK_EVERY {
            self.flush()?;
            // Start writeback of what is written so far (asynchronously), so the fsync at the
            // end of the shard has little left to wait for and the disk works while we read.
            // SAFETY: a hint on a descriptor we own; no memory is involved.
            unsafe { libc::sync_file_range(self.w.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
            self.flushed_at = self.pos;
        }
        Ok(())
    }

    /// Hands the buffered bytes to the kernel.
    pub fn flush(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            self.w.write_all(&self.pending).ctx("write", &self.tmp)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// Rolls the shard back to `pos` (where a member that failed began), with the hash then.
    fn rewind(&mut self, pos: u64, hash: Xxh3) -> Result<()> {
        self.flush()?;
        self.w.set_len(self.base + pos).ctx("truncate", &self.tmp)?;
        self.w.seek(SeekFrom::Start(self.base + pos)).ctx("seek", &self.tmp)?;
        self.pos = pos;
        self.hash = hash;
        Ok(())
    }

    /// Publishes the complete shard as `dst`; returns what the index records of it.
    fn finish(&mut self, opts: &PackOptions, dst: &Path, dict: &[u8]) -> Result<ShardInfo> {
        match opts.format {
            ShardFormat::Tar => {
                self.put(&tar::END)?;
                self.flush()?;
                self.w.sync_all().ctx("fsync", &self.tmp)?;
                fs::rename(&self.tmp, dst).ctx("rename", dst)?;
                Ok(ShardInfo { name: shard_name(self.k, opts.format), size: self.pos, hash: self.hash.digest128() })
            }
            ShardFormat::H5 => {
                self.flush()?;
                finish_h5(opts, self, dst, dict)
            }
        }
    }
}

/// Writes shards numbered from `first`; completed ones go to `parts` (their per-shard indexes)
/// and `records` (for the manifest). A shard left open when the writer is dropped (an error)
/// is removed.
pub(super) struct ShardWriter<'a> {
    opts: &'a PackOptions,
    dict: &'a [u8],
    /// Cut shards by `--shard-size` (else the caller cuts them at a plan's boundaries).
    by_size: bool,
    cur: Option<ShardOut>,
    /// Number of the open shard, or of the next one.
    k: usize,
    first: usize,
    hdr: Vec<u8>,
    /// Scratch for the second read of a recently changed large file.
    check: Vec<u8>,
    /// Written as directory members at the end of the last shard (tar).
    dirs: &'a [EmptyDir],
    parts: &'a mut Vec<Index>,
    records: &'a mut Vec<ShardRecord>,
    extras: &'a mut Vec<ShardExtra>,
    /// `--remove-source`: removes the sources of each completed shard.
    remover: Option<&'a Remover<'a>>,
}

/// Where a [`ShardWriter`] puts what it completes: per-shard indexes, manifest records, and
/// each shard's hard links and sparse count.
pub(super) struct Completed<'a> {
    pub parts: &'a mut Vec<Index>,
    pub records: &'a mut Vec<ShardRecord>,
    pub extras: &'a mut Vec<ShardExtra>,
}

impl<'a> ShardWriter<'a> {
    pub fn new(opts: &'a PackOptions, dict: &'a [u8], by_size: bool, first: usize, dirs: &'a [EmptyDir], done: Completed<'a>) -> Self {
        let Completed { parts, records, extras } = done;
        ShardWriter {
            opts,
            dict,
            by_size,
            cur: None,
            k: first,
            first,
            hdr: Vec::with_capacity(2048),
            check: Vec::new(),
            dirs,
            parts,
            records,
            extras,
            remover: None,
        }
    }

    /// Removes the sources of every shard once it is complete (see [`super::remove`]).
    pub fn with_remover(mut self, remover: Option<&'a Remover<'a>>) -> Self {
        self.remover = remover;
        self
    }

    /// Appends a member read whole by an I/O thread (its buffer stays with the caller), or a
    /// hard link to an earlier name of its file in the shard.
    pub fn accept_small(&mut self, key: &[u8], m: &Small) -> Result<()> {
        let tar = self.opts.format == ShardFormat::Tar;
        self.room_for(m.planned)?;
        let (s, hdr) = (self.cur.as_mut().expect("opened by room_for"), &mut self.hdr);
        s.raw += m.planned;
        if s.link(tar, key, &m.meta, &m.stamp, m.shape, Some(m.crc), hdr)? {
            return Ok(());
        }
        let at = s.pos;
        s.put(&m.member)?;
        let pos = s.index.len();
        s.index.push_coded(key, 0, at + m.hlen as u64, m.stored, m.meta.size, m.codec, m.crc);
        stamp::push_record(&mut s.stamps, &m.stamp);
        s.sources.push(m.stamp);
        s.stored(key, pos, m.codec, &m.stamp, m.crc, m.shape);
        Ok(())
    }

    /// Streams a large file in. A file that changes while it is copied is rolled back out of
    /// the shard and copied again (see [`stamp`]); if it keeps changing it fails the pack, or
    /// with `--on-error skip` is returned as skipped.
    pub fn accept_large(&mut self, key: &[u8], l: Large) -> Result<Option<Skipped>> {
        let Large { mut meta, mut file, path, shape } = l;
        let planned = planned_len(self.opts.format, key, &meta);
        let (opts, dict) = (self.opts, self.dict);
        self.room_for(planned)?;
        let (s, hdr, check) = (self.cur.as_mut().expect("opened by room_for"), &mut self.hdr, &mut self.check);
        if shape.nlink > 1 && s.link(opts.format == ShardFormat::Tar, key, &meta, &Stamp::now(&file, &path)?, shape, None, hdr)? {
            s.raw += planned;
            return Ok(None);
        }
        let (at, hash_before) = (s.pos, s.hash.clone());
        let mut attempt = 0;
        let r = loop {
            let r = copy_large(opts, dict, s, hdr, check, key, &mut meta, planned, &mut file, &path);
            match r {
                Err(Error::Changed { .. }) if attempt + 1 < READ_TRIES => {
                    s.rewind(at, hash_before.clone())?;
                    attempt += 1;
                    stamp::backoff(attempt);
                }
                r => break r,
            }
        };
        match r {
            Ok((off, stored, codec, crc, st)) => {
                let pos = s.index.len();
                s.index.push_coded(key, 0, off, stored, meta.size, codec, crc);
                stamp::push_record(&mut s.stamps, &st);
                s.sources.push(st);
                s.raw += planned;
                s.stored(key, pos, codec, &st, crc, shape);
                Ok(None)
            }
            Err(e @ Error::Changed { .. }) if opts.on_error == OnError::Skip => {
                s.rewind(at, hash_before)?;
                Ok(Some(Skipped { path: path.display().to_string(), reason: e.to_string() }))
            }
            Err(e) => Err(e),
        }
    }

    /// The open shard, after cutting it when a member of `planned` bytes would overflow it
    /// (a shard always takes at least one member); a new one is opened as needed.
    fn room_for(&mut self, planned: u64) -> Result<&mut ShardOut> {
        let full = |s: &ShardOut| s.raw + planned + SHARD_END > self.opts.shard_size && !s.index.is_empty();
        if self.by_size && self.cur.as_ref().is_some_and(full) {
            self.cut()?;
        }
        if self.cur.is_none() {
            self.cur = Some(ShardOut::create(self.opts, self.k, self.dict)?);
        }
        Ok(self.cur.as_mut().expect("opened above"))
    }

    /// Completes the open shard, if any; the next member starts a new one.
    pub fn cut(&mut self) -> Result<()> {
        if let Some(s) = self.cur.take() {
            self.close_shard(s)?;
            self.k += 1;
            fault::kill_after_shards((self.k - self.first) as u64);
        }
        Ok(())
    }

    /// The number of shards completed so far by this writer.
    pub fn completed(&self) -> usize {
        self.k - self.first
    }

    /// Completes the last shard; in a tar shard, the empty directories go at its end, after
    /// every sample (not counted against `--shard-size`).
    pub fn close(mut self) -> Result<()> {
        match self.cur.take() {
            Some(mut s) => {
                if self.opts.format == ShardFormat::Tar {
                    for d in self.dirs {
                        self.hdr.clear();
                        tar::write_dir_header(&mut self.hdr, d.key.as_bytes(), &tar::Meta { size: 0, mode: d.mode, mtime: d.mtime, uid: d.uid, gid: d.gid });
                        s.put(&self.hdr)?;
                    }
                }
                self.close_shard(s)
            }
            None => Ok(()),
        }
    }

    /// Publishes shard `s`, then its per-shard index (fsynced): from then on `--resume` keeps it.
    fn close_shard(&mut self, mut s: ShardOut) -> Result<()> {
        let opts = self.opts;
        let name = shard_name(s.k, opts.format);
        // A shard that cannot be completed (the disk filled while its last bytes went out) is
        // removed, as an open one is when the writer is dropped.
        let info = s.finish(opts, &opts.output.join(&name), self.dict).inspect_err(|_| {
            let _ = fs::remove_file(&s.tmp);
        })?;
        if self.remover.is_some() {
            fault::kill_before_remove((s.k - self.first + 1) as u64);
        }
        s.index.push_shard(info.clone());
        // The record of the source files first: a per-shard index is never without it.
        stamp::write_records(&opts.output.join(STATE_DIR).join(layout::state_stamps_name(s.k)), &s.stamps, &s.extra)?;
        if self.remover.is_some() {
            remove::write_sources(&opts.output.join(STATE_DIR).join(layout::state_sources_name(s.k)), &s.sources)?;
        }
        let ip = opts.output.join(STATE_DIR).join(shard_state_name(s.k));
        s.index.write_atomic(&ip)?; // also fsyncs the state dir
        drop(s.index);
        fsx::sync_dir(&opts.output)?;
        let ix = Index::open(&ip)?;
        if let Some(rm) = self.remover {
            rm.shard(s.k, &ix, &s.sources, false)?;
        }
        self.records.push(ShardRecord { file: name, size: info.size, samples: ix.len() as u64, xxh3_128: hex128(info.hash) });
        self.parts.push(ix);
        self.extras.push(std::mem::take(&mut s.extra));
        Ok(())
    }
}

/// One copy of a large file into the shard at its position: the file's stamp is taken before
/// (`meta` follows it; a file whose planned length moved is a `Changed` error, the shard was cut
/// for the old one) and compared after; a recently changed file is read a second time.
/// Returns (data offset, stored size, codec, CRC32C, the stamp).
#[allow(clippy::too_many_arguments)]
fn copy_large(
    opts: &PackOptions,
    dict: &[u8],
    s: &mut ShardOut,
    hdr: &mut Vec<u8>,
    check: &mut Vec<u8>,
    key: &[u8],
    meta: &mut tar::Meta,
    planned: u64,
    file: &mut File,
    path: &Path,
) -> Result<(u64, u64, u8, u32, Stamp)> {
    file.seek(SeekFrom::Start(0)).ctx("seek", path)?;
    let md = file.metadata().ctx("stat", path)?;
    let before = Stamp::of(&md);
    let now = meta_of(&md);
    if planned_len(opts.format, key, &now) != planned {
        return Err(if now.size != meta.size {
            stamp::changed(path, &format!("size {} -> {}", meta.size, now.size))
        } else {
            stamp::changed(path, "mtime moved")
        });
    }
    *meta = now;
    let (off, stored, codec, crc) = if opts.compress.is_none() {
        write_large_raw(s, opts.format == ShardFormat::Tar, file, path, key, meta, hdr).map(|(off, crc)| (off, meta.size, codec::RAW, crc))?
    } else {
        write_large_coded(opts, s, file, path, key, meta, dict, hdr)?
    };
    before.check(&Stamp::now(file, path)?, path)?;
    if before.recent() {
        stamp::confirm(file, path, &before, crc, check)?;
    }
    Ok((off, stored, codec, crc, before))
}

impl Drop for ShardWriter<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.cur.take() {
            let _ = fs::remove_file(&s.tmp);
        }
    }
}
