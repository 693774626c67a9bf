//! `Reader`: an opened dataset. The index and every shard are memory-mapped read-only; a
//! sample is a bounds-checked slice of its shard's mapping.

use crate::cache::LocalShard;
use crate::codec::{self, DecodeError, Decoder};
use crate::error::{Error, IoContext, Result};
use crate::index::{Entry, Index, ShardInfo};
use crate::job::Progress;
use crate::manifest::{hex128, Manifest};
use crate::tar;
use memmap2::{Mmap, MmapOptions};
use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptionsPds {
    /// Map shards with MAP_POPULATE: page tables filled at open, so no read faults later
    /// (reads every shard into memory once; for staged or in-memory datasets).
    pub populate: bool,
}

pub struct Reader {
    dir: PathBuf,
    index: Index,
    manifest: Manifest,
    maps: Vec<ShardData>,
    decoder: Decoder,
}

/// How a shard's bytes are reached.
enum ShardData {
    Empty,
    Mapped(Mapped),
    /// A filesystem that cannot map files (a FUSE mount with direct I/O answers ENODEV): read
    /// with `pread`, one read per access.
    Unmapped(File),
}

/// Decoding at least this many bytes is worth releasing the interpreter lock for (a binding
/// asks [`Reader::is_long_read`]); below it, releasing and retaking the lock costs more.
pub const LONG_READ_BYTES: u64 = 64 << 10;
/// A batch with at least this many bytes to decode is decoded by several threads.
const PARALLEL_DECODE_BYTES: u64 = 16 * LONG_READ_BYTES;
/// Most threads one batch is decoded with (scoped: none outlives the call, none survives a fork).
const MAX_DECODE_THREADS: usize = 8;
/// A batch of raw samples this large is copied by several threads (`get_batch`).
const PARALLEL_COPY_BYTES: u64 = 8 << 20;
/// `read_range` reads the whole byte span of a range in one go only if the gaps between its
/// samples (tar headers, padding) add at most this much to it, plus as much as the samples.
const SPAN_SLACK: u64 = 1 << 20;

/// (sample, offset, stored size, CRC32C, codec) of one sample, in a per-shard verify list.
type ShardSample = (usize, u64, u64, u32, u8);
/// A shard's verify outcome: problems found, compressed samples decoded.
type ShardCheck = Result<(Vec<String>, u64)>;

/// A shard mapping and its SIGBUS guard (declared first: unregistered before the unmap).
struct Mapped {
    guard: crate::sigbus::Guard,
    map: Mmap,
}

/// The outcome of `verify`: what was checked and every problem found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub samples: u64,
    /// Compressed samples decoded and checked against their CRC32C (`deep`).
    pub decoded: u64,
    pub shards: u64,
    pub bytes: u64,
    pub problems: Vec<String>,
}

impl Reader {
    pub fn open(dir: &Path) -> Result<Reader> {
        Self::open_with(dir, OpenOptionsPds::default())
    }

    /// Opens a dataset: reads the manifest, maps and checks the index header and maps every
    /// shard after checking its size. O(shards), independent of the number of samples.
    pub fn open_with(dir: &Path, opts: OpenOptionsPds) -> Result<Reader> {
        let md = fs::metadata(dir).ctx("open", dir)?;
        if !md.is_dir() {
            return Err(Error::format_hint(dir, "not a packds dataset (a dataset is a directory)", "give the directory written by `packds pack -o DATASET`"));
        }
        let manifest = Manifest::load(dir)?;
        // The manifest's index file (its name checked by Manifest::load).
        let ipath = dir.join(&manifest.index.file);
        let index = Index::open(&ipath)?;
        let isize = fs::metadata(&ipath).ctx("stat", &ipath)?.len();
        if isize != manifest.index.size
            || index.len() as u64 != manifest.samples
            || index.shards().len() != manifest.shards.len()
            || index.version() != manifest.format_version
        {
            return Err(Error::format(dir, format!("manifest.json and {} disagree (index replaced or damaged)", manifest.index.file)));
        }
        let mut maps = Vec::with_capacity(index.shards().len());
        for (s, rec) in index.shards().iter().zip(&manifest.shards) {
            if s.name != rec.file || s.size != rec.size || hex128(s.hash) != rec.xxh3_128 {
                return Err(Error::format(dir, format!("manifest.json and index.pdsi disagree about shard {}", s.name)));
            }
            maps.push(map_shard(dir, s, opts)?);
        }
        let decoder = Decoder::new(index.dict());
        Ok(Reader { dir: dir.to_path_buf(), index, manifest, maps, decoder })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn key(&self, i: usize) -> Result<&[u8]> {
        self.index.key(i)
    }

    pub fn find(&self, key: &[u8]) -> Result<Option<usize>> {
        self.index.find(key)
    }

    /// Original size of sample `i` (what `read` returns).
    pub fn size(&self, i: usize) -> Result<u64> {
        Ok(self.index.entry(i)?.raw)
    }

    /// Stored size of sample `i` (what `get` returns).
    pub fn stored_size(&self, i: usize) -> Result<u64> {
        Ok(self.index.entry(i)?.size)
    }

    /// Are any samples compressed (format version 2)?
    pub fn is_coded(&self) -> bool {
        self.index.is_coded()
    }

    /// (shard file, data offset, stored size) of sample `i`.
    pub fn locate(&self, i: usize) -> Result<(PathBuf, u64, u64)> {
        let e = self.index.entry(i)?;
        Ok((self.dir.join(&self.index.shards()[e.shard as usize].name), e.offset, e.size))
    }

    /// The stored bytes of sample `i` (borrowed from the mapping when the shard is mapped).
    #[inline]
    pub fn get(&self, i: usize) -> Result<Cow<'_, [u8]>> {
        let e = self.index.entry(i)?;
        self.stored(&e)
    }

    /// The original bytes of sample `i`: borrowed from the mapping when stored raw, decoded
    /// otherwise.
    pub fn read(&self, i: usize) -> Result<Cow<'_, [u8]>> {
        let e = self.index.entry(i)?;
        let stored = self.stored(&e)?;
        if e.codec == codec::RAW {
            return Ok(stored);
        }
        let r = self.decoder.decode(e.codec, &stored, e.raw);
        self.check_intact(e.shard)?;
        r.map(Cow::Owned).map_err(|d| self.decode_error(i, e.shard, d))
    }

    /// Decodes sample `i` into `dst`, which must have exactly its original size.
    pub fn read_into(&self, i: usize, dst: &mut [u8]) -> Result<()> {
        let e = self.index.entry(i)?;
        let r = self.decoder.decode_into(e.codec, &self.stored(&e)?, dst);
        self.check_intact(e.shard)?;
        r.map_err(|d| self.decode_error(i, e.shard, d))
    }

    /// The checks on sample `i` that need no output buffer (codec, sizes, the frame's recorded
    /// size): callers that allocate the output themselves run this first.
    pub fn precheck(&self, i: usize) -> Result<()> {
        let e = self.index.entry(i)?;
        if e.codec == codec::RAW {
            return Ok(());
        }
        let r = self.decoder.check(e.codec, &self.stored(&e)?, e.raw);
        self.check_intact(e.shard)?;
        r.map_err(|d| self.decode_error(i, e.shard, d))
    }

    /// Like `read_into`, then checks the CRC32C of the original bytes.
    /// A frame that does not decode counts as a checksum mismatch here.
    pub fn read_into_checked(&self, i: usize, dst: &mut [u8]) -> Result<()> {
        let e = self.index.entry(i)?;
        let r = self.decoder.decode_into(e.codec, &self.stored(&e)?, dst);
        self.check_intact(e.shard)?;
        if r.is_err() || crc32c::crc32c(dst) != e.crc {
            return Err(self.checksum_error(i, e.shard));
        }
        Ok(())
    }

    /// Checks that sample `i` can be read, before the caller allocates its output, and returns
    /// its original size. With `verify` (a dataset opened with `verify=True`), a sample whose
    /// stored frame is damaged is reported as a checksum mismatch naming its key
    /// ([`Error::Checksum`]), as a verified read of it would.
    pub fn prepare(&self, i: usize, verify: bool) -> Result<u64> {
        let e = self.index.entry(i)?;
        match self.precheck(i) {
            Ok(()) => Ok(e.raw),
            Err(err) if verify => Err(self.get_checked(i).err().unwrap_or(err)),
            Err(err) => Err(err),
        }
    }

    /// Whether reading `len` original bytes of a sample takes long enough to be worth
    /// releasing an interpreter lock around it.
    pub fn is_long_read(len: u64) -> bool {
        len >= LONG_READ_BYTES
    }

    /// Fills `dst`, which must have exactly sample `i`'s original size, with its bytes: copied
    /// when stored raw, decoded otherwise; with `verify` checked against its CRC32C.
    pub fn read_sample_into(&self, i: usize, dst: &mut [u8], verify: bool) -> Result<()> {
        if verify {
            self.read_into_checked(i, dst)
        } else {
            self.read_into(i, dst)
        }
    }

    /// Fills `out[k]` with sample `indices[k]` (each buffer of exactly that sample's original
    /// size, see [`Reader::prepare`]). A batch with much to decode is decoded by up to 8 scoped
    /// threads; the first error found is returned.
    /// Where each of the samples `indices` goes in one buffer, back to back: `len + 1` offsets,
    /// sample `k` at `offsets[k]..offsets[k + 1]` (its original size).
    pub fn batch_offsets(&self, indices: &[usize], verify: bool) -> Result<Vec<u64>> {
        let mut offsets = Vec::with_capacity(indices.len() + 1);
        let mut at = 0u64;
        offsets.push(0);
        for &i in indices {
            at = at.checked_add(self.prepare(i, verify)?).ok_or_else(|| Error::usage("the batch is too large", "read fewer samples at once"))?;
            offsets.push(at);
        }
        Ok(offsets)
    }

    /// The samples `indices` into `dst` at `offsets` (from [`Reader::batch_offsets`]): copied,
    /// or decoded, by several threads when the batch is large.
    pub fn get_batch_into(&self, indices: &[usize], offsets: &[u64], dst: &mut [u8], verify: bool) -> Result<()> {
        let need = offsets.last().copied().unwrap_or(0);
        if offsets.len() != indices.len() + 1 || (dst.len() as u64) < need {
            return Err(Error::usage("the batch buffer does not fit the batch", "use the offsets batch_offsets gives"));
        }
        let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(indices.len());
        let mut rest = &mut dst[..need as usize];
        for w in offsets.windows(2) {
            let (a, b) = rest.split_at_mut((w[1] - w[0]) as usize);
            bufs.push(a);
            rest = b;
        }
        self.get_many_into_with(indices, &mut bufs, verify, need >= PARALLEL_COPY_BYTES)
    }

    pub fn get_many_into(&self, indices: &[usize], out: &mut [&mut [u8]], verify: bool) -> Result<()> {
        self.get_many_into_with(indices, out, verify, false)
    }

    /// [`Reader::get_many_into`]; `big`: copy with several threads even when nothing is
    /// compressed (a large batch: the copies are bound by page faults and memory bandwidth).
    fn get_many_into_with(&self, indices: &[usize], out: &mut [&mut [u8]], verify: bool, big: bool) -> Result<()> {
        self.get_many_into_from(indices, out, verify, big, None)
    }

    /// [`Reader::get_many_into_with`], the stored bytes taken from `local` (a cached copy of
    /// the one shard holding every sample of `indices`, see [`Reader::check_local`]) when given.
    fn get_many_into_from(&self, indices: &[usize], out: &mut [&mut [u8]], verify: bool, big: bool, local: Option<&LocalShard>) -> Result<()> {
        if indices.len() != out.len() {
            return Err(Error::usage(format!("{} samples but {} buffers", indices.len(), out.len()), "give one buffer per sample"));
        }
        let mut work = 0u64;
        for &i in indices {
            let e = self.index.entry(i)?;
            if e.codec != codec::RAW {
                work = work.saturating_add(e.raw);
            }
        }
        let threads =
            if big || work >= PARALLEL_DECODE_BYTES { std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_DECODE_THREADS) } else { 1 };
        if threads <= 1 || indices.len() < 2 {
            return indices.iter().zip(out.iter_mut()).try_for_each(|(&i, b)| self.read_sample_into_from(i, b, verify, local));
        }
        let jobs = std::sync::Mutex::new(indices.iter().zip(out.iter_mut()));
        let stop = std::sync::atomic::AtomicBool::new(false);
        let first_err: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
        let run = || loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let next = jobs.lock().unwrap_or_else(|p| p.into_inner()).next();
            let Some((&i, buf)) = next else { return };
            if let Err(e) = self.read_sample_into_from(i, buf, verify, local) {
                first_err.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        };
        std::thread::scope(|sc| {
            for _ in 1..threads {
                let _ = std::thread::Builder::new().name("packds-decode".into()).spawn_scoped(sc, run);
            }
            run(); // this thread helps too (and does it all if none could be started)
        });
        match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The original bytes of many samples (see [`Reader::get_many_into`]).
    pub fn get_many(&self, indices: &[usize], verify: bool) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::with_capacity(indices.len());
        for &i in indices {
            out.push(vec![0u8; self.prepare(i, verify)? as usize]);
        }
        let mut bufs: Vec<&mut [u8]> = out.iter_mut().map(|v| v.as_mut_slice()).collect();
        self.get_many_into(indices, &mut bufs, verify)?;
        Ok(out)
    }

    fn check_range(&self, start: usize, stop: usize) -> Result<()> {
        if start > stop || stop > self.len() {
            return Err(Error::usage(format!("sample range {start}..{stop} is not within 0..{}", self.len()), "give 0 <= start <= stop <= len(ds)"));
        }
        Ok(())
    }

    /// Where each of samples `[start, stop)` lies in the output of [`Reader::read_range_into`]:
    /// `stop - start + 1` offsets from 0 (sample `start + k` is `offsets[k]..offsets[k + 1]`),
    /// after the checks of [`Reader::prepare`].
    pub fn range_offsets(&self, start: usize, stop: usize, verify: bool) -> Result<Vec<u64>> {
        self.range_offsets_from(start, stop, verify, None)
    }

    /// [`Reader::range_offsets`]; with `local` (a cached copy of the one shard holding samples
    /// `[start, stop)`, else a usage error), the checks read the stored bytes from it.
    pub fn range_offsets_from(&self, start: usize, stop: usize, verify: bool, local: Option<&LocalShard>) -> Result<Vec<u64>> {
        self.check_range(start, stop)?;
        if let Some(l) = local {
            self.check_local(start, stop, l)?;
        }
        let mut out = Vec::with_capacity(stop - start + 1);
        let mut at = 0u64;
        out.push(0);
        for i in start..stop {
            let n = match local {
                Some(l) => self.prepare_local(i, verify, l)?,
                None => self.prepare(i, verify)?,
            };
            at = at.checked_add(n).ok_or_else(|| Error::format(&self.dir, format!("samples {start}..{stop} add up to more than 2^64 bytes")))?;
            out.push(at);
        }
        Ok(out)
    }

    /// Reads samples `[start, stop)` back to back into `dst` (laid out as
    /// [`Reader::range_offsets`] says; `dst` may be longer). Samples stored raw and in order in
    /// one shard (the usual case: a block of a packed dataset) are read as one byte span: with
    /// one `pread` from a shard that cannot be mapped, or copied from the mapping after asking
    /// the kernel to read the span ahead (SIGBUS-guarded either way). Others are decoded (and
    /// checked with `verify`) one by one, by several threads for a large compressed range.
    pub fn read_range_into(&self, start: usize, stop: usize, dst: &mut [u8], verify: bool) -> Result<()> {
        self.read_range_into_from(start, stop, dst, verify, None)
    }

    /// [`Reader::read_range_into`]; with `local` (a cached copy of the one shard holding
    /// samples `[start, stop)`: its size and XXH3-128 must be that shard's, else a usage
    /// error), the stored bytes are taken from its mapping instead of the dataset's shard: raw
    /// samples copied, compressed ones decoded (with `verify`, every sample's CRC32C checked).
    pub fn read_range_into_from(&self, start: usize, stop: usize, dst: &mut [u8], verify: bool, local: Option<&LocalShard>) -> Result<()> {
        self.check_range(start, stop)?;
        if let Some(l) = local {
            self.check_local(start, stop, l)?;
        }
        if start == stop {
            return Ok(());
        }
        let mut entries = Vec::with_capacity(stop - start);
        let mut total = 0u64;
        for i in start..stop {
            let e = self.index.entry(i)?;
            total = total.saturating_add(e.raw);
            entries.push(e);
        }
        if (dst.len() as u64) < total {
            return Err(Error::usage(format!("the buffer holds {} bytes, samples {start}..{stop} need {total}", dst.len()), "give a larger buffer"));
        }
        let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(entries.len());
        let mut rest = &mut dst[..total as usize];
        for e in &entries {
            let (a, b) = rest.split_at_mut(e.raw as usize);
            bufs.push(a);
            rest = b;
        }
        let first = entries[0];
        let contiguous = !verify
            && entries.iter().all(|e| e.codec == codec::RAW && e.raw == e.size && e.shard == first.shard)
            && entries.windows(2).all(|w| w[1].offset >= w[0].offset + w[0].size);
        let last = entries[entries.len() - 1];
        let span = (last.offset + last.size).saturating_sub(first.offset);
        if local.is_none() && contiguous && span <= total.saturating_mul(2).saturating_add(SPAN_SLACK) {
            match &self.maps[first.shard as usize] {
                ShardData::Unmapped(_) => {
                    // One read of the whole span (headers between samples included), then
                    // each sample copied out of it.
                    let all = self.bytes(first.shard, first.offset, span)?;
                    for (e, b) in entries.iter().zip(bufs.iter_mut()) {
                        let a = (e.offset - first.offset) as usize;
                        b.copy_from_slice(&all[a..a + e.size as usize]);
                    }
                    return Ok(());
                }
                ShardData::Mapped(m) => {
                    // Advisory: the kernel starts reading the span in large requests.
                    let _ = m.map.advise_range(memmap2::Advice::WillNeed, first.offset as usize, span as usize);
                }
                ShardData::Empty => {}
            }
        }
        let indices: Vec<usize> = (start..stop).collect();
        self.get_many_into_from(&indices, &mut bufs, verify, false, local)
    }

    /// The shard number of sample `i`.
    pub fn shard_of(&self, i: usize) -> Result<u32> {
        Ok(self.index.entry(i)?.shard)
    }

    /// Usage error unless samples `[start, stop)` all lie in one shard of which `local` is a
    /// copy (same size and XXH3-128).
    pub fn check_local(&self, start: usize, stop: usize, local: &LocalShard) -> Result<()> {
        let mismatch = |what: String| {
            Error::usage(
                format!("samples {start}..{stop} of {}: {what}, so they cannot be read from the cached copy {}", self.dir.display(), local.path().display()),
                "give the LocalShard of the shard that holds them (Reader.shard_of(i) and the manifest's shard list), and a range inside one shard",
            )
        };
        let mut shard = None;
        for i in start..stop {
            let s = self.index.entry(i)?.shard;
            match shard {
                None => shard = Some(s),
                Some(t) if t != s => return Err(mismatch(format!("samples lie in shards {t} and {s}"))),
                _ => {}
            }
        }
        if let Some(s) = shard {
            let info = &self.index.shards()[s as usize];
            if info.size != local.size() || info.hash != local.hash() {
                return Err(mismatch(format!("their shard {} is not the one cached ({} bytes, XXH3-128 {})", info.name, local.size(), hex128(local.hash()))));
            }
        }
        Ok(())
    }

    /// The stored bytes of entry `e` in the cached copy `local` of its shard.
    fn local_stored<'a>(&self, e: &Entry, local: &'a LocalShard) -> Result<&'a [u8]> {
        let (a, b) = (e.offset as usize, e.offset.saturating_add(e.size) as usize);
        local.bytes().get(a..b).ok_or_else(|| Error::format(local.path(), format!("cached shard is {} bytes, a sample lies at {a}..{b}", local.size())))
    }

    /// [`Reader::prepare`] of sample `i` from the cached copy `local` of its shard.
    fn prepare_local(&self, i: usize, verify: bool, local: &LocalShard) -> Result<u64> {
        let e = self.index.entry(i)?;
        if e.codec == codec::RAW && e.size == e.raw {
            return Ok(e.raw);
        }
        let r = self.decoder.check(e.codec, self.local_stored(&e, local)?, e.raw);
        local.check_intact()?;
        match r {
            Ok(()) => Ok(e.raw),
            Err(_) if verify => Err(self.local_checksum_error(i, local)),
            Err(d) => Err(self.local_decode_error(i, local, d)),
        }
    }

    /// [`Reader::read_sample_into`], the stored bytes from `local` when given.
    fn read_sample_into_from(&self, i: usize, dst: &mut [u8], verify: bool, local: Option<&LocalShard>) -> Result<()> {
        let Some(local) = local else { return self.read_sample_into(i, dst, verify) };
        let e = self.index.entry(i)?;
        let r = self.decoder.decode_into(e.codec, self.local_stored(&e, local)?, dst);
        local.check_intact()?;
        if verify {
            if r.is_err() || crc32c::crc32c(dst) != e.crc {
                return Err(self.local_checksum_error(i, local));
            }
            return Ok(());
        }
        r.map_err(|d| self.local_decode_error(i, local, d))
    }

    fn local_checksum_error(&self, i: usize, local: &LocalShard) -> Error {
        let key = self.index.key(i).map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_else(|_| format!("#{i}"));
        Error::Checksum { key, shard: local.path().to_path_buf() }
    }

    fn local_decode_error(&self, i: usize, local: &LocalShard, d: DecodeError) -> Error {
        let key = self.index.key(i).map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_else(|_| format!("#{i}"));
        Error::format_hint(
            local.path(),
            format!("sample {key:?} cannot be decoded: {}", d.0),
            "the cached copy or the index is damaged; remove the shard cache directory, then run `packds verify --deep` on the dataset",
        )
    }

    /// Samples `[start, stop)` back to back, and their offsets (see [`Reader::read_range_into`]).
    pub fn read_range(&self, start: usize, stop: usize, verify: bool) -> Result<(Vec<u8>, Vec<u64>)> {
        let offsets = self.range_offsets(start, stop, verify)?;
        let mut buf = vec![0u8; offsets[offsets.len() - 1] as usize];
        self.read_range_into(start, stop, &mut buf, verify)?;
        Ok((buf, offsets))
    }

    /// The dataset cut into blocks for sequential reading: `(start, stop)` sample ranges, in
    /// order, covering every sample once. A block lies in one shard (when the index keeps each
    /// shard's samples together, as packed datasets do) and spans about `target` stored bytes:
    /// each shard's samples are cut every `max(1, round(target * samples / span))` samples.
    pub fn blocks(&self, target: u64) -> Result<Vec<(usize, usize)>> {
        let n = self.len();
        let mut out = Vec::new();
        let mut i = 0;
        while i < n {
            let e0 = self.index.entry(i)?;
            let (mut lo, mut hi) = (i + 1, n); // end of this shard's run of samples
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if self.index.entry(mid)?.shard == e0.shard {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            let end = lo;
            let el = self.index.entry(end - 1)?;
            let span = (el.offset + el.size).saturating_sub(e0.offset).max(1);
            // As f64 and rounded half to even: the same cut points as before this was in Rust.
            let per = ((target as f64 * (end - i) as f64) / span as f64).round_ties_even().max(1.0) as usize;
            let mut s = i;
            while s < end {
                let t = s.saturating_add(per).min(end);
                out.push((s, t));
                s = t;
            }
            i = end;
        }
        Ok(out)
    }

    /// `(start, stop)`: the samples whose key starts with `prefix` (keys are sorted byte-wise,
    /// so they are one run; `start == stop` where there is none). O(log n).
    pub fn key_range(&self, prefix: &[u8]) -> Result<(usize, usize)> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.key(mid)? < prefix {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let start = lo;
        hi = self.len();
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.key(mid)?.starts_with(prefix) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok((start, lo))
    }

    /// Positions of the keys matching a glob pattern (the syntax of `pack --include`).
    pub fn glob(&self, pattern: &str) -> Result<Vec<usize>> {
        let g = globset::Glob::new(pattern)
            .map_err(|e| Error::usage(format!("bad pattern {pattern:?}: {e}"), "see the glob syntax: * ? [abc] {a,b} **"))?
            .compile_matcher();
        let mut out = Vec::new();
        for i in 0..self.len() {
            if g.is_match(std::ffi::OsStr::from_bytes(self.key(i)?)) {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// The index entry of sample `i` (bounds-checked).
    pub fn entry(&self, i: usize) -> Result<Entry> {
        self.index.entry(i)
    }

    /// The stored bytes of an entry (from [`Reader::entry`]): borrowed from the mapping, or
    /// read with `pread` from a shard that could not be mapped.
    #[inline]
    pub fn stored(&self, e: &Entry) -> Result<Cow<'_, [u8]>> {
        self.bytes(e.shard, e.offset, e.size)
    }

    /// Bytes `[off, off + len)` of shard `shard`; the caller has bounds-checked them against the
    /// shard size recorded in the index.
    #[inline]
    fn bytes(&self, shard: u32, off: u64, len: u64) -> Result<Cow<'_, [u8]>> {
        match &self.maps[shard as usize] {
            // In bounds: `entry` checked offset + size <= the shard size recorded in the index,
            // and `map_shard` checked that the mapped file has exactly that size.
            ShardData::Mapped(m) => Ok(Cow::Borrowed(&m.map[off as usize..(off + len) as usize])),
            ShardData::Empty => Ok(Cow::Borrowed(&[])),
            ShardData::Unmapped(f) => {
                let path = || self.dir.join(&self.index.shards()[shard as usize].name);
                let mut v = Vec::new();
                v.try_reserve_exact(len as usize).map_err(|_| Error::format(path(), format!("cannot allocate {len} bytes for a sample")))?;
                v.resize(len as usize, 0);
                std::os::unix::fs::FileExt::read_exact_at(f, &mut v, off).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        Error::format_hint(
                            path(),
                            "shard was truncated or overwritten while this dataset was open",
                            "never modify a dataset in place while jobs read it; re-stage or re-pack it into a new directory, then open it again",
                        )
                    } else {
                        Error::io("read", path(), e)
                    }
                })?;
                Ok(Cow::Owned(v))
            }
        }
    }

    /// Err when shard `shard` shrank under its mapping since the dataset was opened (a read
    /// of it faulted and got zeros; see [`crate::sigbus`]). Call after using bytes from it.
    #[inline]
    pub fn check_intact(&self, shard: u32) -> Result<()> {
        match self.maps.get(shard as usize) {
            Some(ShardData::Mapped(m)) if m.guard.tripped() => {
                let path = self.dir.join(&self.index.shards()[shard as usize].name);
                Err(Error::format_hint(
                    &path,
                    "shard was truncated or overwritten while this dataset was open",
                    "never modify a dataset in place while jobs read it; re-stage or re-pack it into a new directory, then open it again",
                ))
            }
            _ => Ok(()),
        }
    }

    fn decode_error(&self, i: usize, shard: u32, d: DecodeError) -> Error {
        let key = self.index.key(i).map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_else(|_| format!("#{i}"));
        let path = self.dir.join(&self.index.shards()[shard as usize].name);
        Error::format_hint(
            &path,
            format!("sample {key:?} cannot be decoded: {}", d.0),
            "the shard or index is damaged; run `packds verify --deep` and re-pack or re-stage",
        )
    }

    /// Like `read`, and checks the CRC32C of the original bytes (raises a checksum error).
    /// A frame that does not decode counts as a checksum mismatch here.
    pub fn get_checked(&self, i: usize) -> Result<Cow<'_, [u8]>> {
        let e = self.index.entry(i)?;
        let b = match self.read(i) {
            Err(Error::Format { .. }) => {
                self.check_intact(e.shard)?;
                return Err(self.checksum_error(i, e.shard));
            }
            r => r?,
        };
        let crc = crc32c::crc32c(&b);
        self.check_intact(e.shard)?;
        if crc != e.crc {
            return Err(self.checksum_error(i, e.shard));
        }
        Ok(b)
    }

    fn checksum_error(&self, i: usize, shard: u32) -> Error {
        let key = self.index.key(i).map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_else(|_| format!("#{i}"));
        Error::Checksum { key, shard: self.dir.join(&self.index.shards()[shard as usize].name) }
    }

    /// Checks everything: the index (all entries, key order, checksum), each shard's size and
    /// XXH3-128 against the manifest, and every sample's CRC32C. Each shard is read once,
    /// sequentially with large reads; shards are checked by up to `threads` threads.
    /// Samples stored compressed are checked against their CRC32C only with `deep` (decoded
    /// from the mapping after the shard's sequential pass); their stored bytes are covered by
    /// the shard's XXH3-128 either way.
    pub fn verify(&self) -> Result<VerifyReport> {
        self.verify_with(4, false)
    }

    pub fn verify_with(&self, threads: usize, deep: bool) -> Result<VerifyReport> {
        self.verify_progress(threads, deep, &Progress::default())
    }

    /// [`Reader::verify_with`], counting samples and bytes checked in `progress` (phase 1) and
    /// stopping with `Error::Cancelled` within one 8 MiB read of `progress.cancel` being set.
    pub fn verify_progress(&self, threads: usize, deep: bool, progress: &Progress) -> Result<VerifyReport> {
        let mut rep = VerifyReport::default();
        progress.start(0, 0, 0);
        if let Err(e) = self.index.validate_all() {
            rep.problems.push(e.to_string());
            return Ok(rep);
        }
        let ipath = self.dir.join(&self.manifest.index.file);
        let ibytes = fs::read(&ipath).ctx("read", &ipath)?;
        if hex128(xxhash_rust::xxh3::xxh3_128(&ibytes)) != self.manifest.index.xxh3_128 {
            rep.problems.push(format!("{}: checksum does not match manifest.json", ipath.display()));
        }
        // Samples per shard, in offset order.
        let mut per: Vec<Vec<ShardSample>> = vec![Vec::new(); self.index.shards().len()];
        for i in 0..self.index.len() {
            let e = self.index.entry(i)?;
            per[e.shard as usize].push((i, e.offset, e.size, e.crc, e.codec));
        }
        if self.index.is_unordered() || self.index.is_shared() {
            // Entries are in key order, the data is not (or is shared by hard links): stream
            // each shard once, in offset order (validate_all above refused overlaps other than
            // shared extents).
            for p in &mut per {
                p.sort_by_key(|s| (s.1, s.2));
            }
        }
        progress.start(1, self.index.len() as u64, self.index.shards().iter().map(|s| s.size).sum());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: std::sync::Mutex<Vec<(usize, ShardCheck)>> = Default::default();
        let work = || loop {
            let s = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if s >= per.len() || progress.cancel.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let r = self.verify_shard(s, &per[s], deep, progress);
            results.lock().unwrap_or_else(|p| p.into_inner()).push((s, r));
        };
        // This thread helps too (and does it all if none could be started).
        crate::pool::run_with_caller(threads.clamp(1, 64).min(per.len().max(1)) + 1, "packds-verify", &work);
        let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        results.sort_by_key(|r| r.0);
        progress.check()?;
        for (s, r) in results {
            let (problems, decoded) = r?;
            rep.problems.extend(problems);
            rep.decoded += decoded;
            rep.shards += 1;
            rep.bytes += self.index.shards()[s].size;
            rep.samples += per[s].len() as u64;
        }
        rep.problems.extend(self.check_hard_links());
        Ok(rep)
    }

    /// The manifest's `hard_links` pairs that are not two samples sharing their data, as
    /// problems (`unpack` does not link those).
    fn check_hard_links(&self) -> Vec<String> {
        let path = self.dir.join(crate::layout::MANIFEST_FILE);
        let mut problems = Vec::new();
        for &[a, o] in &self.manifest.hard_links {
            let ok = a < o && o < self.len() as u64 && self.same_data(a as usize, o as usize);
            if !ok {
                problems.push(format!("{}: hard_links pair [{a}, {o}] is not two samples that share their data", path.display()));
            }
        }
        problems
    }

    fn verify_shard(&self, s: usize, samples: &[ShardSample], deep: bool, progress: &Progress) -> ShardCheck {
        let info = &self.index.shards()[s];
        let path = self.dir.join(&info.name);
        let (f, _) = crate::layout::open_data_file(&path, |e| Error::io("open", &path, e))?;
        advise_sequential(&f);
        // Never more than the index says, plus one byte to see that it grew.
        let mut f = f.take(info.size.saturating_add(1));
        let mut buf = vec![0u8; 8 << 20];
        let mut h = Xxh3::new();
        let mut pos = 0u64;
        // The distinct extents (names of one file share theirs), and each sample's extent.
        let mut ext: Vec<(u64, u64)> = Vec::with_capacity(samples.len());
        let mut ext_of: Vec<usize> = Vec::with_capacity(samples.len());
        for &(_, off, size, _, _) in samples {
            if ext.last() != Some(&(off, size)) {
                ext.push((off, size));
            }
            ext_of.push(ext.len() - 1);
        }
        let mut crcs: Vec<u32> = vec![0; ext.len()];
        let mut first = 0usize; // first extent not yet complete
        loop {
            progress.check()?;
            let got = f.read(&mut buf).ctx("read", &path)?;
            if got == 0 {
                break;
            }
            let chunk = &buf[..got];
            h.update(chunk);
            let before = first;
            let end = pos + got as u64;
            let mut j = first;
            while j < ext.len() && ext[j].0 < end {
                let (off, size) = ext[j];
                let a = off.max(pos);
                let b = (off + size).min(end);
                if a < b {
                    crcs[j] = crc32c::crc32c_append(crcs[j], &chunk[(a - pos) as usize..(b - pos) as usize]);
                }
                if off + size <= end {
                    if j == first {
                        first += 1;
                    }
                } else {
                    break;
                }
                j += 1;
            }
            progress.add((first - before) as u64, got as u64);
            pos = end;
        }
        let mut problems = Vec::new();
        if pos > info.size {
            problems.push(format!("{}: larger than the {} bytes the index says (replaced or growing)", path.display(), info.size));
        } else if pos != info.size {
            problems.push(format!("{}: size is {pos} bytes, the index says {}", path.display(), info.size));
        } else if h.digest128() != info.hash {
            problems.push(format!("{}: checksum does not match the index and manifest", path.display()));
        }
        let mut decoded = 0u64;
        for (j, &(i, _, _, want, codec)) in samples.iter().enumerate() {
            if codec == codec::RAW {
                if crcs[ext_of[j]] != want {
                    problems.push(self.checksum_error(i, s as u32).to_string());
                }
            } else if deep && problems.is_empty() {
                progress.check()?;
                match self.get_checked(i) {
                    Ok(_) => decoded += 1,
                    Err(e) => problems.push(e.to_string()),
                }
            }
        }
        Ok((problems, decoded))
    }

    /// Extracts every sample into `dest` (created if needed), refusing keys that are absolute,
    /// contain `..`, or would pass through a symlink; never overwrites an existing file.
    /// Restores mode and mtime from the tar header, the hard links the dataset records (as
    /// links, where the filesystem allows; else as copies), the empty directories, and leaves
    /// runs of zeros of at least [`MIN_HOLE`] bytes as holes (a sparse file is sparse again).
    /// Returns the number of files written (hard links included).
    pub fn unpack(&self, dest: &Path) -> Result<u64> {
        self.unpack_progress(dest, &Progress::default())
    }

    /// [`Reader::unpack`], counting files and bytes written in `progress` (phase 1) and stopping
    /// with `Error::Cancelled` between two files once `progress.cancel` is set (the files
    /// written so far stay, each complete).
    pub fn unpack_progress(&self, dest: &Path, progress: &Progress) -> Result<u64> {
        fs::create_dir_all(dest).ctx("create directory", dest)?;
        let mut made: HashSet<Vec<u8>> = HashSet::new();
        // Hard links: each other name, by position, to its first name's.
        let mut link_to: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
        for &[a, o] in &self.manifest.hard_links {
            if let (Ok(a), Ok(o)) = (usize::try_from(a), usize::try_from(o)) {
                link_to.insert(o, a);
            }
        }
        let firsts: HashSet<usize> = link_to.values().copied().collect();
        let mut written: std::collections::HashMap<usize, PathBuf> = std::collections::HashMap::new();
        let mut n = 0u64;
        progress.start(1, self.len() as u64, self.manifest.total_bytes);
        let mut prev: Option<Entry> = None; // the last sample stored in its own member
        for i in 0..self.len() {
            progress.check()?;
            let key = self.key(i)?;
            let comps = safe_components(key)?;
            make_dirs(dest, key, &comps[..comps.len() - 1], &mut made)?;
            let p = dest.join(std::ffi::OsStr::from_bytes(key));
            let e = self.index.entry(i)?;
            match link_to.get(&i).filter(|&&a| self.same_data(a, i)) {
                Some(a) => match written.get(a).map(|fp| fs::hard_link(fp, &p)) {
                    Some(Ok(())) => {}
                    Some(Err(e)) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(exists(&p)),
                    // No hard links here (a filesystem without them): a copy.
                    _ => self.write_file(i, &p, self.header_meta(i, None))?,
                },
                None => {
                    let meta = self.header_meta(i, prev.filter(|p| p.shard == e.shard));
                    prev = Some(e);
                    self.write_file(i, &p, meta)?;
                    if firsts.contains(&i) {
                        written.insert(i, p);
                    }
                }
            }
            progress.add(1, e.raw);
            n += 1;
        }
        for d in &self.manifest.empty_dirs {
            make_dirs(dest, d.as_bytes(), &safe_components(d.as_bytes())?, &mut made)?;
        }
        Ok(n)
    }

    /// Do samples `a` and `b` share their data (as the names of one file do)?
    fn same_data(&self, a: usize, b: usize) -> bool {
        match (self.index.entry(a), self.index.entry(b)) {
            (Ok(x), Ok(y)) => (x.shard, x.offset, x.size, x.crc, x.codec) == (y.shard, y.offset, y.size, y.crc, y.codec),
            _ => false,
        }
    }

    /// Writes sample `i` (checked) to the new file `p` with `meta`'s permission bits and mtime.
    fn write_file(&self, i: usize, p: &Path, meta: Option<(u32, i64)>) -> Result<()> {
        let data = self.get_checked(i)?;
        // Permission bits only: setuid, setgid and sticky bits are never restored.
        let mode = meta.map_or(0o644, |m| m.0 & 0o777);
        let f = OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                exists(p)
            } else {
                Error::io("create", p, e)
            }
        })?;
        write_with_holes(&f, p, &data)?;
        f.set_permissions(fs::Permissions::from_mode(mode)).ctx("chmod", p)?;
        if let Some((_, mtime)) = meta {
            let ts = [libc::timespec { tv_sec: mtime as libc::time_t, tv_nsec: 0 }; 2];
            // SAFETY: valid fd and a 2-element timespec array, as futimens requires.
            unsafe { libc::futimens(f.as_raw_fd(), ts.as_ptr()) };
        }
        Ok(())
    }

    /// Mode and mtime of sample `i`'s tar member, from the ustar header block right before its
    /// data (None for an HDF5 shard, or a header that does not parse).
    pub(crate) fn member_mode_mtime(&self, i: usize) -> Option<(u32, i64)> {
        let e = self.index.entry(i).ok()?;
        if !self.index.shards()[e.shard as usize].name.ends_with(".tar") {
            return None;
        }
        let b = e.offset.checked_sub(tar::BLOCK)?;
        tar::parse_mode_mtime(&self.bytes(e.shard, b, tar::BLOCK).ok()?)
    }

    /// Mode and mtime from the ustar header right before sample `i`'s data; `prev` is the sample
    /// of the same shard whose member comes before (None: the first, or unknown).
    fn header_meta(&self, i: usize, prev: Option<Entry>) -> Option<(u32, i64)> {
        let e = self.index.entry(i).ok()?;
        if !self.index.shards()[e.shard as usize].name.ends_with(".tar") {
            return None;
        }
        let shard_len = self.index.shards()[e.shard as usize].size;
        let region = |a: u64, b: u64| -> Option<Cow<'_, [u8]>> { (a <= b && b <= shard_len).then(|| self.bytes(e.shard, a, b - a).ok()).flatten() };
        if self.index.is_unordered() {
            // A tar packds did not write: its member's ustar header is the block right before
            // the data (after any pax or GNU long-name header). Only the permission bits are
            // kept (no setuid, setgid or sticky bits from a foreign archive).
            let b = e.offset.checked_sub(tar::BLOCK)?;
            return tar::parse_mode_mtime(&region(b, b + tar::BLOCK)?).map(|(mode, mtime)| (mode & 0o777, mtime));
        }
        // Members are contiguous: this one's headers start where the previous member ends
        // (hard link members, which have no data, may lie between).
        let start = match prev {
            Some(p) if p.shard == e.shard => p.offset + p.size + tar::padding(p.size),
            _ => 0,
        };
        let hdrs = region(start, e.offset)?;
        tar::parse_member_meta(&hdrs).or_else(|| {
            let b = e.offset.checked_sub(tar::BLOCK)?;
            tar::parse_mode_mtime(&region(b, b + tar::BLOCK)?)
        })
    }
}

/// The error of an unpack that would overwrite `p`.
fn exists(p: &Path) -> Error {
    Error::usage(format!("{} already exists", p.display()), "unpack into an empty directory")
}

/// Creates the directories `comps` (path components of `key`) under `dest`, one level at a time,
/// refusing a component that exists and is not a directory (a symlink); `made` remembers them.
fn make_dirs(dest: &Path, key: &[u8], comps: &[&[u8]], made: &mut HashSet<Vec<u8>>) -> Result<()> {
    let mut rel: Vec<u8> = Vec::new();
    for c in comps {
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(c);
        if made.contains(&rel) {
            continue;
        }
        let p = dest.join(std::ffi::OsStr::from_bytes(&rel));
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::Escape {
                    member: String::from_utf8_lossy(key).into_owned(),
                    why: "a path component exists and is not a directory (symlink?)",
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::create_dir(&p).ctx("create directory", &p)?,
            Err(e) => return Err(Error::io("stat", &p, e)),
        }
        made.insert(rel.clone());
    }
    Ok(())
}

/// `unpack` leaves runs of zeros of at least this many bytes (whole 4 KiB blocks) as holes.
pub const MIN_HOLE: usize = 64 << 10;
const HOLE_BLOCK: usize = 4096;

/// Writes `data` to the new, empty file `f` (at `p`): runs of zero bytes of at least
/// [`MIN_HOLE`] bytes, in whole 4 KiB blocks, are skipped (left as holes), then the length is set.
fn write_with_holes(f: &File, p: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
    let (mut at, mut i) = (0usize, 0usize); // `at`: start of what is not written yet
    while data.len() >= MIN_HOLE && i < data.len() {
        let mut j = i;
        while j + HOLE_BLOCK <= data.len() && zero(&data[j..j + HOLE_BLOCK]) {
            j += HOLE_BLOCK;
        }
        if j - i >= MIN_HOLE {
            f.write_all_at(&data[at..i], at as u64).ctx("write", p)?;
            at = j;
        }
        i = j + HOLE_BLOCK; // the block at j is not all zeros (or is the short tail)
    }
    f.write_all_at(&data[at..], at as u64).ctx("write", p)?;
    f.set_len(data.len() as u64).ctx("truncate", p)
}

/// Position `i` in a sequence of `len` items, as a Python sequence takes it: `0..len` as is, a
/// negative one counting from the end (`-1` the last); None when out of range. The binding
/// passes every sample index here (one too large for an `i64` is out of range already).
pub fn sequence_position(i: i64, len: usize) -> Option<usize> {
    let n = i64::try_from(len).ok()?;
    let j = if i < 0 { i.checked_add(n)? } else { i };
    (0..n).contains(&j).then_some(j as usize)
}

/// Splits a key into path components, refusing anything that could leave the destination.
pub fn safe_components(key: &[u8]) -> Result<Vec<&[u8]>> {
    let bad = |why| Err(Error::Escape { member: String::from_utf8_lossy(key).into_owned(), why });
    if key.is_empty() {
        return bad("empty name");
    }
    if key[0] == b'/' {
        return bad("absolute path");
    }
    if key.contains(&0) {
        return bad("NUL byte in name");
    }
    let comps: Vec<&[u8]> = key.split(|&b| b == b'/').collect();
    for c in &comps {
        match *c {
            b"" | b"." => return bad("empty or '.' path component"),
            b".." => return bad("'..' path component"),
            _ => {}
        }
    }
    Ok(comps)
}

fn advise_sequential(f: &File) {
    // SAFETY: advisory call on a descriptor we own.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
}

fn map_shard(dir: &Path, s: &ShardInfo, opts: OpenOptionsPds) -> Result<ShardData> {
    let path = dir.join(&s.name);
    let (f, len) = crate::layout::open_data_file(&path, |e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::format(&path, "shard is missing")
        } else {
            Error::io("open", &path, e)
        }
    })?;
    if len != s.size {
        return Err(Error::format(&path, format!("shard is {len} bytes, the index says {} (truncated or replaced)", s.size)));
    }
    if len == 0 {
        return Ok(ShardData::Empty);
    }
    let mut mo = MmapOptions::new();
    if opts.populate {
        mo.populate();
    }
    // SAFETY: shards are immutable once renamed into place (packds never writes a finished
    // shard). The length was checked above; every slice taken from it is bounds-checked.
    match unsafe { mo.map(&f) } {
        Ok(m) => Ok(ShardData::Mapped(Mapped { guard: crate::sigbus::register(m.as_ptr(), m.len()), map: m })),
        // A filesystem that cannot map files (FUSE with direct I/O): read with pread instead.
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(ShardData::Unmapped(f)),
        Err(e) => Err(Error::io("map", &path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Reader>();
    }

    /// A packed dataset of `n` samples (keys `cXX/fNNNNN.bin`, sizes 0..6000) and its data.
    #[test]
    fn read_range_from_a_cached_copy_gives_the_same_bytes() {
        for compress in [codec::Compress::None, codec::Compress::Zstd(3)] {
            let d = tempfile::tempdir().unwrap();
            let (r, want) = packed(d.path(), 300, compress);
            assert!(r.index().shards().len() > 2);
            let cache = crate::cache::ShardCache::open(&d.path().join("cache"), 1 << 30).unwrap();
            let local: Vec<_> = r.index().shards().iter().map(|s| cache.fetch(&r.dir().join(&s.name), s.size, &hex128(s.hash)).unwrap().unwrap()).collect();
            for (a, b) in r.blocks(20_000).unwrap() {
                let l = &local[r.shard_of(a).unwrap() as usize];
                for verify in [false, true] {
                    let offs = r.range_offsets_from(a, b, verify, Some(l)).unwrap();
                    assert_eq!(offs, r.range_offsets(a, b, verify).unwrap());
                    let mut buf = vec![0u8; *offs.last().unwrap() as usize];
                    r.read_range_into_from(a, b, &mut buf, verify, Some(l)).unwrap();
                    assert!(buf == want[a..b].concat(), "{a}..{b}");
                }
            }
            // A range over two shards, or another shard's copy: a usage error.
            let n = r.len();
            let (s0, s1) = (r.shard_of(0).unwrap(), r.shard_of(n - 1).unwrap());
            assert_ne!(s0, s1);
            let e = r.range_offsets_from(0, n, false, Some(&local[s0 as usize])).unwrap_err();
            assert!(matches!(e, Error::Usage { .. }) && e.to_string().contains("lie in shards"), "{e}");
            let e = r.read_range_into_from(n - 1, n, &mut [0u8; 1 << 16], false, Some(&local[s0 as usize])).unwrap_err();
            assert!(matches!(e, Error::Usage { .. }) && e.to_string().contains("is not the one cached"), "{e}");
            // A cached copy damaged after its fetch: a verified read names the copy.
            let i = (0..n).rev().find(|&i| r.entry(i).unwrap().size > 100).unwrap();
            let e = r.entry(i).unwrap();
            let l = &local[e.shard as usize];
            let f = fs::OpenOptions::new().write(true).open(l.path()).unwrap();
            let x = l.bytes()[(e.offset + 50) as usize];
            std::os::unix::fs::FileExt::write_all_at(&f, &[x ^ 0x55], e.offset + 50).unwrap();
            let mut buf = vec![0u8; e.raw as usize];
            let err = r.read_range_into_from(i, i + 1, &mut buf, true, Some(l)).unwrap_err();
            assert!(matches!(&err, Error::Checksum { shard, .. } if shard == l.path()), "{err}");
        }
    }

    fn packed(d: &Path, n: usize, compress: codec::Compress) -> (Reader, Vec<Vec<u8>>) {
        let src = d.join("src");
        let mut want = Vec::new();
        for i in 0..n {
            let key = format!("c{:02}/f{i:05}.bin", i % 5);
            let data: Vec<u8> = (0..(i * 53) % 6000).map(|j| ((i * 7 + j / 3) % 251) as u8).collect();
            fs::create_dir_all(src.join(&key).parent().unwrap()).unwrap();
            fs::write(src.join(&key), &data).unwrap();
            want.push((key, data));
        }
        want.sort();
        let mut o = crate::pack::PackOptions::new(vec![src], d.join("out.pds"));
        o.shard_size = 64 << 10;
        o.compress = compress;
        crate::pack::pack(&o, &crate::pack::Progress::default()).unwrap();
        (Reader::open(&o.output).unwrap(), want.into_iter().map(|x| x.1).collect())
    }

    #[test]
    fn get_many_and_read_range_return_the_samples() {
        for compress in [codec::Compress::None, codec::Compress::Zstd(3)] {
            let d = tempfile::tempdir().unwrap();
            let (r, want) = packed(d.path(), 300, compress);
            // A large batch (several threads decode it when compressed), then a small one.
            let all: Vec<usize> = (0..300).rev().chain(0..300).collect();
            for verify in [false, true] {
                let got = r.get_many(&all, verify).unwrap();
                assert!(all.iter().zip(&got).all(|(&i, g)| g == &want[i]));
                assert_eq!(r.get_many(&[5, 5, 0], verify).unwrap(), vec![want[5].clone(), want[5].clone(), want[0].clone()]);
            }
            assert!(r.get_many(&[0, 300], false).is_err());
            for (a, b) in [(0, 0), (0, 1), (10, 40), (0, 300), (299, 300)] {
                let (buf, offs) = r.read_range(a, b, false).unwrap();
                assert_eq!(offs.len(), b - a + 1);
                assert_eq!(buf, want[a..b].concat(), "{a}..{b}");
                for (k, i) in (a..b).enumerate() {
                    assert_eq!(&buf[offs[k] as usize..offs[k + 1] as usize], &want[i][..]);
                }
            }
            assert!(r.read_range(3, 2, false).is_err());
            assert!(r.read_range(0, 301, false).is_err());
            let mut small = vec![0u8; 1];
            assert!(r.read_range_into(10, 40, &mut small, false).is_err());
        }
    }

    #[test]
    fn read_range_through_pread_where_shards_are_not_mapped() {
        let d = tempfile::tempdir().unwrap();
        let (mut r, want) = packed(d.path(), 300, codec::Compress::None);
        // As on a filesystem that cannot map files (FUSE with direct I/O).
        for (s, info) in r.index.shards().to_vec().iter().enumerate() {
            r.maps[s] = ShardData::Unmapped(File::open(d.path().join("out.pds").join(&info.name)).unwrap());
        }
        for (a, b) in r.blocks(8192).unwrap().into_iter().chain([(0, 300), (7, 8)]) {
            assert_eq!(r.read_range(a, b, false).unwrap().0, want[a..b].concat(), "{a}..{b}");
        }
        assert_eq!(r.get_many(&[3, 2, 1], true).unwrap(), vec![want[3].clone(), want[2].clone(), want[1].clone()]);
    }

    #[test]
    fn blocks_cover_every_sample_once_within_shards() {
        let d = tempfile::tempdir().unwrap();
        let (r, _) = packed(d.path(), 300, codec::Compress::None);
        for target in [1, 4096, 1 << 20] {
            let b = r.blocks(target).unwrap();
            assert_eq!(b.first().unwrap().0, 0);
            assert_eq!(b.last().unwrap().1, 300);
            assert!(b.windows(2).all(|w| w[0].1 == w[1].0 && w[0].0 < w[0].1));
            for &(s, t) in &b {
                assert_eq!(r.entry(s).unwrap().shard, r.entry(t - 1).unwrap().shard);
            }
            if target == 1 {
                assert_eq!(b.len(), 300);
            }
        }
    }

    #[test]
    fn key_range_finds_a_prefix_run() {
        let d = tempfile::tempdir().unwrap();
        let (r, _) = packed(d.path(), 300, codec::Compress::None);
        let (a, b) = r.key_range(b"c02/").unwrap();
        assert_eq!(b - a, 60);
        assert!((a..b).all(|i| r.key(i).unwrap().starts_with(b"c02/")));
        assert_eq!(r.key_range(b"").unwrap(), (0, 300));
        let (a, b) = r.key_range(b"c02/x").unwrap();
        assert_eq!(a, b);
        assert_eq!(r.key_range(b"zzz").unwrap(), (300, 300));
    }

    #[test]
    fn positions_count_from_the_end_and_never_overflow() {
        assert_eq!(sequence_position(0, 3), Some(0));
        assert_eq!(sequence_position(-1, 3), Some(2));
        assert_eq!(sequence_position(-3, 3), Some(0));
        for i in [3, -4, i64::MAX, i64::MIN, i64::MIN + 1] {
            assert_eq!(sequence_position(i, 3), None, "{i}");
        }
        assert_eq!(sequence_position(0, 0), None);
        assert_eq!(sequence_position(-1, usize::MAX), None);
    }

    #[test]
    fn long_zero_runs_are_written_as_holes() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 4 << 20];
        data[100] = 1; // a block with data, then a long run of zeros
        data[(2 << 20) + 5] = 2;
        let short = [&[7u8; 5000][..], &[0u8; MIN_HOLE - 4096][..], &[9u8; 3]].concat(); // its zero run is too short
        for (name, bytes) in [("sparse", &data), ("short", &short), ("tail", &[&[1u8][..], &[0u8; 1 << 20][..]].concat())] {
            let p = d.path().join(name);
            let f = File::options().write(true).create_new(true).open(&p).unwrap();
            write_with_holes(&f, &p, bytes).unwrap();
            assert_eq!(&fs::read(&p).unwrap(), bytes, "{name}");
        }
        let md = fs::metadata(d.path().join("sparse")).unwrap();
        assert!(md.blocks() * 512 < md.len() / 4, "{} blocks for {} bytes", md.blocks(), md.len());
    }

    #[test]
    fn unsafe_keys_are_refused() {
        for k in [&b"/etc/passwd"[..], b"../x", b"a/../../x", b"a//b", b"./a", b"", b"a/\0"] {
            assert!(safe_components(k).is_err(), "{:?}", String::from_utf8_lossy(k));
        }
        assert_eq!(safe_components(b"a/b..c/d").unwrap().len(), 3);
    }
}
