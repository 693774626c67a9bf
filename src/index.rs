//! The binary index (`index.pdsi`): one fixed-size entry per sample, sorted by key, memory-mapped.
//!
//! Layout (little-endian; `docs/FORMAT.md` is the reference):
//! ```text
//! header   128 B   magic "PACKDSIX", version, section offsets, CRC32C of header/sections
//! entries  32 B×n  data offset u64 | size u64 | key offset u64 | shard u32 | CRC32C u32
//! keys     bytes   all keys back to back (key i = keys[key_off[i] .. key_off[i+1]])
//! shards   32 B×m  file size u64 | XXH3-128 lo u64 | hi u64 | name offset u32 | name length u32
//! names    bytes   shard file names
//! ```
//! Opening checks the header, its checksum, the section bounds and the shard table: O(number of
//! shards), never O(number of samples). Every entry is bounds-checked when it is used (offset +
//! size within its shard, key within the key section, no overlap with its neighbours), so a
//! hostile index yields an error, never an out-of-bounds read. `validate_all` checks the rest.

use crate::codec;
use crate::error::{Error, IoContext, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"PACKDSIX";
/// The newest index format version this library reads and writes (1: no codec section, as
/// written for uncompressed datasets; 2: with a codec section, or unordered; 3: with entries
/// that share their data, [`FLAG_SHARED`]).
pub const VERSION: u32 = 3;
pub const HEADER_SIZE: usize = 128;
pub const ENTRY_SIZE: usize = 32;
pub const SHARD_SIZE: usize = 32;
/// Upper bound on shards in one index (a sanity limit against hostile counts).
pub const MAX_SHARDS: u64 = 1 << 24;

/// One sample's location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    /// Stored size (bytes in the shard).
    pub size: u64,
    pub key_off: u64,
    pub shard: u32,
    /// CRC32C of the original bytes.
    pub crc: u32,
    /// Original size (equals `size` when stored raw).
    pub raw: u64,
    /// How the sample is stored: [`codec::RAW`], [`codec::ZSTD`], [`codec::ZSTD_DICT`].
    pub codec: u8,
}

/// One shard file, as recorded in the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub name: String,
    pub size: u64,
    pub hash: u128,
}

fn align8(x: usize) -> usize {
    (x + 7) & !7
}

/// Header flag: the index has a codec section (format version 2).
pub const FLAG_CODEC: u64 = 1;
/// Header flag (format version 2): entries are in key order, but their data may lie anywhere in
/// the shards (an index of existing tar files, `packds index`). Access checks bounds only;
/// `validate_all` sorts the extents once and refuses overlaps.
pub const FLAG_UNORDERED: u64 = 2;
/// Header flag (format version 3): an entry may have exactly the data of an earlier entry of
/// the same shard (hard links stored once). Access checks that an entry follows the previous
/// one, lies wholly before it, or is the same extent; `validate_all` sorts the extents once and
/// refuses any overlap other than identical extents with identical CRC32C, sizes and codec.
pub const FLAG_SHARED: u64 = 4;
const RAW_MASK: u64 = (1 << 56) - 1;

/// Per-sample columns of an [`IndexBuilder`]'s entries, little-endian arrays (u64 offsets,
/// stored sizes, original sizes and key offsets, u8 codecs, u32 CRC32Cs). `key_offsets` has one
/// more element, the keys' total length.
pub struct Columns {
    pub offsets: Vec<u8>,
    pub sizes: Vec<u8>,
    pub raw_sizes: Vec<u8>,
    pub codecs: Vec<u8>,
    pub crcs: Vec<u8>,
    pub key_offsets: Vec<u8>,
}

/// One entry of the table, as [`decode_entry`] reads it back.
fn encode_entry(offset: u64, size: u64, key_off: u64, shard: u32, crc: u32) -> [u8; ENTRY_SIZE] {
    let mut b = [0u8; ENTRY_SIZE];
    b[0..8].copy_from_slice(&offset.to_le_bytes());
    b[8..16].copy_from_slice(&size.to_le_bytes());
    b[16..24].copy_from_slice(&key_off.to_le_bytes());
    b[24..28].copy_from_slice(&shard.to_le_bytes());
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A sample's word in the codec section: its original size, and its codec in the top byte.
fn codec_word(raw: u64, codec: u8) -> u64 {
    raw & RAW_MASK | u64::from(codec) << 56
}

/// The entry at byte `at` of an entry table ([`ENTRY_SIZE`] bytes: offset u64, stored size u64,
/// key offset u64, shard u32, CRC32C u32), with its codec word (original size | codec << 56)
/// when there is a codec section.
fn decode_entry(b: &[u8], at: usize, codec_word: Option<u64>) -> Entry {
    let size = rd_u64(b, at + 8);
    let (raw, codec) = match codec_word {
        Some(w) => (w & RAW_MASK, (w >> 56) as u8),
        None => (size, codec::RAW),
    };
    Entry { offset: rd_u64(b, at), size, key_off: rd_u64(b, at + 16), shard: rd_u32(b, at + 24), crc: rd_u32(b, at + 28), raw, codec }
}

/// Builds an index in memory (about 32 bytes + key length per sample; 8 more with a codec
/// section) and writes it.
#[derive(Default)]
pub struct IndexBuilder {
    entries: Vec<u8>,
    keys: Vec<u8>,
    shards: Vec<ShardInfo>,
    /// Some: a codec section (8 bytes per entry) is written.
    codecs: Option<Vec<u8>>,
    dict: Vec<u8>,
    total_bytes: u64,
    /// Entries in key order whose data is in no particular order ([`FLAG_UNORDERED`]).
    unordered: bool,
    /// Some entries share their data with an earlier one ([`FLAG_SHARED`]).
    shared: bool,
}

impl IndexBuilder {
    /// An index for samples stored as they are (format version 1).
    pub fn new() -> Self {
        Self::default()
    }

    /// An index with a codec section (format version 2): samples may be compressed.
    pub fn new_coded(dict: &[u8]) -> Self {
        IndexBuilder { codecs: Some(Vec::new()), dict: dict.to_vec(), ..Self::default() }
    }

    /// An index of raw samples whose data need not follow key order (format version 2 with
    /// [`FLAG_UNORDERED`], no codec section): samples indexed in place in existing tar files.
    pub fn new_unordered() -> Self {
        IndexBuilder { unordered: true, ..Self::default() }
    }

    pub fn len(&self) -> usize {
        self.entries.len() / ENTRY_SIZE
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of the original sizes of all samples pushed.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn push(&mut self, key: &[u8], shard: u32, offset: u64, size: u64, crc: u32) {
        self.push_coded(key, shard, offset, size, size, codec::RAW, crc);
    }

    /// A sample stored with `codec` in `size` bytes, `raw` bytes originally; `crc` is the
    /// CRC32C of the original bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn push_coded(&mut self, key: &[u8], shard: u32, offset: u64, size: u64, raw: u64, codec: u8, crc: u32) {
        self.total_bytes += raw;
        self.entries.extend_from_slice(&encode_entry(offset, size, self.keys.len() as u64, shard, crc));
        self.keys.extend_from_slice(key);
        match &mut self.codecs {
            Some(c) => c.extend_from_slice(&codec_word(raw, codec).to_le_bytes()),
            None => assert!(codec == codec::RAW && raw == size, "a compressed sample needs IndexBuilder::new_coded"),
        }
    }

    /// Another name for the data of an earlier entry `target` (a hard link stored once): an entry
    /// with its offset, sizes, codec and CRC32C ([`FLAG_SHARED`]).
    pub fn push_shared(&mut self, key: &[u8], target: usize) {
        let t = self.entry_at(target);
        self.shared = true;
        self.push_coded(key, t.shard, t.offset, t.size, t.raw, t.codec, t.crc);
    }

    /// The keys pushed so far, back to back.
    pub fn keys(&self) -> &[u8] {
        &self.keys
    }

    /// Entry `j` as pushed.
    fn entry_at(&self, j: usize) -> Entry {
        decode_entry(&self.entries, j * ENTRY_SIZE, self.codecs.as_ref().map(|c| rd_u64(c, j * 8)))
    }

    /// The per-sample columns of the entries pushed so far (what an HDF5 shard stores).
    pub fn columns(&self) -> Columns {
        let n = self.len();
        let mut c = Columns {
            offsets: Vec::with_capacity(n * 8),
            sizes: Vec::with_capacity(n * 8),
            raw_sizes: Vec::with_capacity(n * 8),
            codecs: Vec::with_capacity(n),
            crcs: Vec::with_capacity(n * 4),
            key_offsets: Vec::with_capacity(n * 8 + 8),
        };
        for j in 0..n {
            let e = self.entry_at(j);
            c.offsets.extend_from_slice(&e.offset.to_le_bytes());
            c.sizes.extend_from_slice(&e.size.to_le_bytes());
            c.raw_sizes.extend_from_slice(&e.raw.to_le_bytes());
            c.codecs.push(e.codec);
            c.crcs.extend_from_slice(&e.crc.to_le_bytes());
            c.key_offsets.extend_from_slice(&e.key_off.to_le_bytes());
        }
        c.key_offsets.extend_from_slice(&(self.keys.len() as u64).to_le_bytes());
        c
    }

    /// Adds `delta` to every data offset.
    pub fn shift_offsets(&mut self, delta: u64) {
        for e in self.entries.chunks_exact_mut(ENTRY_SIZE) {
            let off = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes")) + delta;
            e[0..8].copy_from_slice(&off.to_le_bytes());
        }
    }

    pub fn push_shard(&mut self, s: ShardInfo) {
        self.shards.push(s);
    }

    pub fn shards(&self) -> &[ShardInfo] {
        &self.shards
    }

    /// The header, the zero padding after the keys, the shard table + names, and the codec
    /// section (with its leading padding); entries and keys go between them as they are.
    fn frame(&self) -> ([u8; HEADER_SIZE], usize, Vec<u8>) {
        let keys_off = HEADER_SIZE + self.entries.len();
        let shards_off = align8(keys_off + self.keys.len());
        let pad = shards_off - (keys_off + self.keys.len());
        let (mut tail, names) = shard_table(&self.shards);
        let names_off = shards_off + tail.len();
        tail.extend_from_slice(&names);
        let shards_crc = crc32c::crc32c(&tail);
        let body_crc = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&self.entries), &self.keys), &[0u8; 8][..pad]);
        let mut l = Layout {
            n: self.len() as u64,
            nshards: self.shards.len() as u64,
            keys_off,
            keys_len: self.keys.len(),
            shards_off,
            names_off,
            names_len: names.len(),
            body_crc,
            shards_crc,
            codec: None,
            unordered: self.unordered,
            shared: self.shared,
        };
        if let Some(c) = &self.codecs {
            let end = names_off + names.len();
            let codec_off = align8(end);
            tail.extend_from_slice(&[0u8; 8][..codec_off - end]);
            let crc = crc32c::crc32c_append(crc32c::crc32c(c), &self.dict);
            tail.extend_from_slice(c);
            tail.extend_from_slice(&self.dict);
            l.codec = Some(CodecLayout { off: codec_off, dict_len: self.dict.len(), raw_total: self.total_bytes, crc });
        }
        (write_header(&l), pad, tail)
    }

    /// Serializes the index.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (h, pad, tail) = self.frame();
        let mut out = Vec::with_capacity(HEADER_SIZE + self.entries.len() + self.keys.len() + pad + tail.len());
        out.extend_from_slice(&h);
        out.extend_from_slice(&self.entries);
        out.extend_from_slice(&self.keys);
        out.extend_from_slice(&[0u8; 8][..pad]);
        out.extend_from_slice(&tail);
        out
    }

    /// Writes the index to `path` atomically (temporary file, fsync, rename) without building
    /// a second copy of it in memory.
    pub fn write_atomic(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let (h, pad, tail) = self.frame();
        let tmp = crate::fsx::tmp_name(path);
        let mut f = File::create(&tmp).ctx("create", &tmp)?;
        for part in [&h[..], &self.entries, &self.keys, &[0u8; 8][..pad], &tail] {
            f.write_all(part).ctx("write", &tmp)?;
        }
        f.sync_all().ctx("fsync", &tmp)?;
        drop(f);
        std::fs::rename(&tmp, path).ctx("rename", path)?;
        crate::fsx::sync_parent(path)
    }
}

fn shard_table(shards: &[ShardInfo]) -> (Vec<u8>, Vec<u8>) {
    let mut names = Vec::new();
    let mut table = Vec::with_capacity(shards.len() * SHARD_SIZE);
    for s in shards {
        table.extend_from_slice(&s.size.to_le_bytes());
        table.extend_from_slice(&(s.hash as u64).to_le_bytes());
        table.extend_from_slice(&((s.hash >> 64) as u64).to_le_bytes());
        table.extend_from_slice(&(names.len() as u32).to_le_bytes());
        table.extend_from_slice(&(s.name.len() as u32).to_le_bytes());
        names.extend_from_slice(s.name.as_bytes());
    }
    (table, names)
}

struct CodecLayout {
    off: usize,
    dict_len: usize,
    raw_total: u64,
    crc: u32,
}

struct Layout {
    n: u64,
    nshards: u64,
    keys_off: usize,
    keys_len: usize,
    shards_off: usize,
    names_off: usize,
    names_len: usize,
    body_crc: u32,
    shards_crc: u32,
    codec: Option<CodecLayout>,
    unordered: bool,
    shared: bool,
}

/// The format version an index of this layout has: the oldest that reads it.
fn layout_version(l: &Layout) -> u32 {
    if l.shared {
        3
    } else if l.codec.is_some() || l.unordered {
        2
    } else {
        1
    }
}

fn write_header(l: &Layout) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    {
        let h = &mut h[..];
        h[0..8].copy_from_slice(MAGIC);
        let version = layout_version(l);
        h[8..12].copy_from_slice(&version.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        h[16..24].copy_from_slice(&l.n.to_le_bytes());
        h[24..32].copy_from_slice(&l.nshards.to_le_bytes());
        h[32..40].copy_from_slice(&(HEADER_SIZE as u64).to_le_bytes());
        h[40..48].copy_from_slice(&(l.keys_off as u64).to_le_bytes());
        h[48..56].copy_from_slice(&(l.keys_len as u64).to_le_bytes());
        h[56..64].copy_from_slice(&(l.shards_off as u64).to_le_bytes());
        h[64..72].copy_from_slice(&(l.names_off as u64).to_le_bytes());
        h[72..80].copy_from_slice(&(l.names_len as u64).to_le_bytes());
        h[80..84].copy_from_slice(&l.body_crc.to_le_bytes());
        h[84..88].copy_from_slice(&l.shards_crc.to_le_bytes());
        let flags = if l.codec.is_some() { FLAG_CODEC } else { 0 } | if l.unordered { FLAG_UNORDERED } else { 0 } | if l.shared { FLAG_SHARED } else { 0 };
        h[88..96].copy_from_slice(&flags.to_le_bytes());
        if let Some(c) = &l.codec {
            h[96..104].copy_from_slice(&(c.off as u64).to_le_bytes());
            h[104..112].copy_from_slice(&(c.dict_len as u64).to_le_bytes());
            h[112..120].copy_from_slice(&c.raw_total.to_le_bytes());
            h[120..124].copy_from_slice(&c.crc.to_le_bytes());
        }
        let hc = crc32c::crc32c(&h[..124]);
        h[124..128].copy_from_slice(&hc.to_le_bytes());
    }
    h
}

/// What [`concat`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcatSummary {
    pub samples: u64,
    /// Sum of the original sizes.
    pub total_bytes: u64,
    /// Sum of the stored sizes.
    pub stored_bytes: u64,
    pub file_size: u64,
    pub xxh3_128: u128,
    /// The index's format version (what the manifest records).
    pub version: u32,
}

/// The entry table of `parts` one after another (key offsets and shard numbers renumbered),
/// their keys, then `pad` zero bytes; returns the sums of the original and stored sizes.
fn concat_body(parts: &[Index], pad: usize, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<(u64, u64)> {
    let (mut raw_total, mut stored_total) = (0u64, 0u64);
    let (mut key_base, mut shard_base) = (0u64, 0u32);
    for p in parts {
        for i in 0..p.len() {
            let e = p.entry(i)?;
            raw_total += e.raw;
            stored_total += e.size;
            sink(&encode_entry(e.offset, e.size, e.key_off + key_base, e.shard + shard_base, e.crc))?;
        }
        key_base += p.keys_len as u64;
        shard_base += p.shards().len() as u32;
    }
    for p in parts {
        sink(&p.bytes()[p.keys_off..p.keys_off + p.keys_len])?;
    }
    sink(&[0u8; 8][..pad])?;
    Ok((raw_total, stored_total))
}

/// The codec section of `parts` one after another (a word per sample), then `dict`; nothing
/// without a dictionary (`None`: the index has no codec section).
fn concat_codecs(parts: &[Index], dict: Option<&[u8]>, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    if let Some(d) = dict {
        for p in parts {
            for i in 0..p.len() {
                let e = p.entry(i)?;
                sink(&codec_word(e.raw, e.codec).to_le_bytes())?;
            }
        }
        sink(d)?;
    }
    Ok(())
}

/// Writes to `out` (atomically) the index made of `parts` one after another (each part's
/// shards are renumbered after the previous parts'; keys must be increasing across parts).
/// With `dict` (Some, possibly empty) the result has a codec section holding that dictionary;
/// parts without one count as all raw. Streams: memory is O(number of shards), not O(samples).
pub fn concat(parts: &[Index], out: &Path, dict: Option<&[u8]>) -> Result<ConcatSummary> {
    let n: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let keys_len: usize = parts.iter().map(|p| p.keys_len).sum();
    let shards: Vec<ShardInfo> = parts.iter().flat_map(|p| p.shards().iter().cloned()).collect();
    let keys_off = HEADER_SIZE + n as usize * ENTRY_SIZE;
    let shards_off = align8(keys_off + keys_len);
    let (table, names) = shard_table(&shards);
    let names_off = shards_off + table.len();
    let names_end = names_off + names.len();
    // Pass 1 computes the checksums and totals; pass 2 writes (the header comes first).
    let pad = shards_off - (keys_off + keys_len);
    let body = |sink: &mut dyn FnMut(&[u8]) -> Result<()>| concat_body(parts, pad, sink);
    let codec_section = |sink: &mut dyn FnMut(&[u8]) -> Result<()>| concat_codecs(parts, dict, sink);
    let mut crc = 0u32;
    let (raw_total, stored_total) = body(&mut |b| {
        crc = crc32c::crc32c_append(crc, b);
        Ok(())
    })?;
    let mut tail = table;
    tail.extend_from_slice(&names);
    let mut l = Layout {
        n,
        nshards: shards.len() as u64,
        keys_off,
        keys_len,
        shards_off,
        names_off,
        names_len: names.len(),
        body_crc: crc,
        shards_crc: crc32c::crc32c(&tail),
        codec: None,
        unordered: false,
        shared: parts.iter().any(|p| p.shared),
    };
    let mut file_size = names_end;
    if let Some(d) = dict {
        let mut ccrc = 0u32;
        codec_section(&mut |b| {
            ccrc = crc32c::crc32c_append(ccrc, b);
            Ok(())
        })?;
        let off = align8(names_end);
        tail.extend_from_slice(&[0u8; 8][..off - names_end]);
        l.codec = Some(CodecLayout { off, dict_len: d.len(), raw_total, crc: ccrc });
        file_size = off + n as usize * 8 + d.len();
    }
    let header = write_header(&l);
    let version = layout_version(&l);
    let tmp = crate::fsx::tmp_name(out);
    let mut w = std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp).ctx("create", &tmp)?);
    let mut hash = xxhash_rust::xxh3::Xxh3::new();
    let mut put = |b: &[u8]| -> Result<()> {
        hash.update(b);
        std::io::Write::write_all(&mut w, b).ctx("write", &tmp)
    };
    put(&header)?;
    body(&mut put)?;
    put(&tail)?;
    codec_section(&mut put)?;
    let f = w.into_inner().map_err(|e| Error::io("write", &tmp, e.into_error()))?;
    f.sync_all().ctx("fsync", &tmp)?;
    drop(f);
    std::fs::rename(&tmp, out).ctx("rename", out)?;
    crate::fsx::sync_parent(out)?;
    Ok(ConcatSummary { samples: n, total_bytes: raw_total, stored_bytes: stored_total, file_size: file_size as u64, xxh3_128: hash.digest128(), version })
}

/// Writes to `out` (atomically) one index of `parts` whose keys are in no particular order
/// across parts (a dataset written sample by sample): see [`write_unordered`]. Part `p`'s
/// shards follow those of the parts before it.
pub fn merge_unordered(parts: &[Index], out: &Path, coded: bool) -> Result<ConcatSummary> {
    let mut all: Vec<(&[u8], Entry)> = Vec::new();
    let mut shards = Vec::new();
    for p in parts {
        let base = shards.len() as u32;
        for i in 0..p.len() {
            let mut e = p.entry(i)?;
            e.shard += base;
            all.push((p.key(i)?, e));
        }
        shards.extend(p.shards().iter().cloned());
    }
    all.sort_unstable_by(|a, b| a.0.cmp(b.0));
    if let Some(w) = all.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::usage(format!("duplicate sample key {:?}", String::from_utf8_lossy(w[0].0)), "every key is written once"));
    }
    write_unordered(all.into_iter(), shards, coded.then_some(&[][..]), out)
}

/// Writes to `out` (atomically) the index of `entries` (sorted by key, unique) over `shards`,
/// with [`FLAG_UNORDERED`]: the data need not follow key order. `dict`: a codec section with
/// that dictionary (possibly empty); None: every sample must be stored raw.
pub fn write_unordered<'k>(entries: impl Iterator<Item = (&'k [u8], Entry)>, shards: Vec<ShardInfo>, dict: Option<&[u8]>, out: &Path) -> Result<ConcatSummary> {
    let mut b = match dict {
        Some(d) => IndexBuilder::new_coded(d),
        None => IndexBuilder::new(),
    };
    b.unordered = true;
    let (mut n, mut stored) = (0u64, 0u64);
    // Two entries with one extent (hard links stored once) make the index shared (FLAG_SHARED).
    let mut extents = std::collections::HashSet::new();
    for (k, e) in entries {
        if dict.is_none() && e.codec != codec::RAW {
            return Err(Error::format(out, format!("sample {:?} is compressed but the index has no codec section", String::from_utf8_lossy(k))));
        }
        if e.size > 0 && !extents.insert((e.shard, e.offset, e.size)) {
            b.shared = true;
        }
        b.push_coded(k, e.shard, e.offset, e.size, e.raw, e.codec, e.crc);
        n += 1;
        stored += e.size;
    }
    for sh in shards {
        b.push_shard(sh);
    }
    b.write_atomic(out)?;
    let bytes = std::fs::read(out).ctx("read", out)?;
    Ok(ConcatSummary {
        samples: n,
        total_bytes: b.total_bytes(),
        stored_bytes: stored,
        file_size: bytes.len() as u64,
        xxh3_128: xxhash_rust::xxh3::xxh3_128(&bytes),
        version: rd_u32(&bytes, 8),
    })
}

/// The index file's bytes: mapped, or read whole where the filesystem cannot map files.
enum IndexBytes {
    Mapped(Mmap),
    Read(Vec<u8>),
}

impl std::ops::Deref for IndexBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            IndexBytes::Mapped(m) => m,
            IndexBytes::Read(v) => v,
        }
    }
}

/// A mapped, header-validated index.
pub struct Index {
    path: PathBuf,
    map: Option<IndexBytes>,
    n: usize,
    entries_off: usize,
    keys_off: usize,
    keys_len: usize,
    shards_off: usize,
    body_crc: u32,
    shards: Vec<ShardInfo>,
    /// Format version 2: offset of the codec section, dictionary length, its CRC, raw total.
    codec: Option<(usize, usize, u32, u64)>,
    version: u32,
    /// [`FLAG_UNORDERED`]: data in no particular order.
    unordered: bool,
    /// [`FLAG_SHARED`]: entries may share data (hard links).
    shared: bool,
}

fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Position of `want` among `n` strictly increasing keys (`key(i)` is the i-th), by binary
/// search: O(log n) calls of `key`.
pub fn find_sorted<'k>(n: usize, key: impl Fn(usize) -> Result<&'k [u8]>, want: &[u8]) -> Result<Option<usize>> {
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match key(mid)?.cmp(want) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Ok(Some(mid)),
        }
    }
    Ok(None)
}

/// Checks the fixed header (magic, version, its CRC, size, flags); returns (version, flags).
fn check_header(b: &[u8]) -> std::result::Result<(u32, u64), String> {
    if b.len() < HEADER_SIZE {
        return Err(format!("not a packds index (file is {} bytes, shorter than the header)", b.len()));
    }
    if &b[0..8] != MAGIC {
        return Err("not a packds index (bad magic)".into());
    }
    let version = rd_u32(b, 8);
    if !(1..=VERSION).contains(&version) {
        return Err(format!("index format version {version} is not supported by packds {} (which reads version {VERSION}); upgrade packds", crate::VERSION));
    }
    if rd_u32(b, 124) != crc32c::crc32c(&b[..124]) {
        return Err("index header is corrupt (checksum mismatch)".into());
    }
    let flags = rd_u64(b, 88);
    let coded = flags & FLAG_CODEC != 0;
    let flags_ok = match version {
        1 => flags == 0 && b[96..124].iter().all(|&x| x == 0),
        2 => flags != 0 && flags & !(FLAG_CODEC | FLAG_UNORDERED) == 0 && (coded || b[96..124].iter().all(|&x| x == 0)),
        _ => flags & FLAG_SHARED != 0 && flags & !(FLAG_CODEC | FLAG_UNORDERED | FLAG_SHARED) == 0 && (coded || b[96..124].iter().all(|&x| x == 0)),
    };
    if rd_u32(b, 12) as usize != HEADER_SIZE || !flags_ok {
        return Err("index header has unknown fields or flags".into());
    }
    Ok((version, flags))
}

/// The section table of a header that [`check_header`] accepted, checked against the file's
/// length with overflow-checked arithmetic (nothing is allocated from a count).
struct Sections {
    n: usize,
    nshards: usize,
    keys_off: usize,
    keys_len: usize,
    shards_off: usize,
    names_off: usize,
    names_len: usize,
}

impl Sections {
    fn read(b: &[u8], coded: bool) -> std::result::Result<Sections, String> {
        let len = b.len() as u64;
        let (n, nshards, entries_off, keys_off) = (rd_u64(b, 16), rd_u64(b, 24), rd_u64(b, 32), rd_u64(b, 40));
        let (keys_len, shards_off, names_off, names_len) = (rd_u64(b, 48), rd_u64(b, 56), rd_u64(b, 64), rd_u64(b, 72));
        let layout_ok = (|| {
            let entries_end = n.checked_mul(ENTRY_SIZE as u64)?.checked_add(entries_off)?;
            let keys_end = keys_off.checked_add(keys_len)?;
            let table_end = nshards.checked_mul(SHARD_SIZE as u64)?.checked_add(shards_off)?;
            let names_end = names_off.checked_add(names_len)?;
            let file_end = if !coded {
                names_end
            } else {
                let codec_off = rd_u64(b, 96);
                let dict_len = rd_u64(b, 104);
                if codec_off != names_end.checked_add(7)? & !7 {
                    return Some(false);
                }
                n.checked_mul(8)?.checked_add(codec_off)?.checked_add(dict_len)?
            };
            Some(
                entries_off == HEADER_SIZE as u64
                    && keys_off == entries_end
                    && shards_off >= keys_end
                    && shards_off % 8 == 0
                    && names_off == table_end
                    && file_end == len
                    && nshards <= MAX_SHARDS,
            )
        })();
        if layout_ok != Some(true) {
            return Err(format!("index is truncated or its section table is corrupt ({n} samples, {nshards} shards claimed, file is {len} bytes)"));
        }
        // Every offset and length is within the file now, so they fit in usize.
        let u = |v: u64| v as usize;
        Ok(Sections {
            n: u(n),
            nshards: u(nshards),
            keys_off: u(keys_off),
            keys_len: u(keys_len),
            shards_off: u(shards_off),
            names_off: u(names_off),
            names_len: u(names_len),
        })
    }
}

/// Entry `s` of the shard table, or None when its name is out of bounds or not a valid shard
/// file name ([`crate::layout::valid_shard_file_name`]).
fn shard_entry(b: &[u8], sec: &Sections, s: usize) -> Option<ShardInfo> {
    let at = sec.shards_off + s * SHARD_SIZE;
    let (noff, nlen) = (rd_u32(b, at + 24) as usize, rd_u32(b, at + 28) as usize);
    let end = noff.checked_add(nlen).filter(|&end| end <= sec.names_len)?;
    let name = std::str::from_utf8(&b[sec.names_off + noff..sec.names_off + end]).ok().filter(|n| crate::layout::valid_shard_file_name(n))?;
    let hash = u128::from(rd_u64(b, at + 8)) | (u128::from(rd_u64(b, at + 16)) << 64);
    Some(ShardInfo { name: name.to_string(), size: rd_u64(b, at), hash })
}

impl Index {
    /// Maps and validates `path` (header, sections, shard table). O(shards).
    pub fn open(path: &Path) -> Result<Index> {
        let (f, len) = crate::layout::open_data_file(path, |e| Error::io("open", path, e))?;
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the index is an immutable file (written once under a temporary name and
            // renamed into place). Every access below is bounds-checked against the map length.
            match unsafe { Mmap::map(&f) } {
                Ok(m) => Some(IndexBytes::Mapped(m)),
                // A filesystem that cannot map files (FUSE with direct I/O): read it whole.
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(&mut &f, &mut v).ctx("read", path)?;
                    Some(IndexBytes::Read(v))
                }
                Err(e) => return Err(Error::io("map", path, e)),
            }
        };
        Self::from_map(path, map)
    }

    fn from_map(path: &Path, map: Option<IndexBytes>) -> Result<Index> {
        let bad = |what: String| Error::format(path, what);
        let b: &[u8] = map.as_deref().unwrap_or(&[]);
        let (version, flags) = check_header(b).map_err(bad)?;
        let coded = flags & FLAG_CODEC != 0;
        let sec = Sections::read(b, coded).map_err(bad)?;
        let names_end = sec.names_off + sec.names_len;
        if rd_u32(b, 84) != crc32c::crc32c(&b[sec.shards_off..names_end]) || b[names_end..align8(names_end).min(b.len())].iter().any(|&x| x != 0) {
            return Err(bad("index shard table is corrupt (checksum mismatch)".into()));
        }
        let shards = (0..sec.nshards)
            .map(|s| shard_entry(b, &sec, s).ok_or_else(|| bad(format!("index shard table entry {s} has an invalid name"))))
            .collect::<Result<_>>()?;
        let codec = coded.then(|| (rd_u64(b, 96) as usize, rd_u64(b, 104) as usize, rd_u32(b, 120), rd_u64(b, 112)));
        Ok(Index {
            path: path.to_path_buf(),
            body_crc: rd_u32(b, 80),
            map,
            n: sec.n,
            entries_off: HEADER_SIZE,
            keys_off: sec.keys_off,
            keys_len: sec.keys_len,
            shards_off: sec.shards_off,
            shards,
            codec,
            version,
            unordered: flags & FLAG_UNORDERED != 0,
            shared: flags & FLAG_SHARED != 0,
        })
    }

    /// Does the index have a codec section (format version 2: samples may be compressed)?
    pub fn is_coded(&self) -> bool {
        self.codec.is_some()
    }

    /// Format version of this index file.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Is the data in no particular order ([`FLAG_UNORDERED`]: an index of existing tars)?
    pub fn is_unordered(&self) -> bool {
        self.unordered
    }

    /// May entries share their data ([`FLAG_SHARED`]: hard links stored once)?
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// The zstd dictionary stored in the index, if any.
    pub fn dict(&self) -> Option<&[u8]> {
        let (off, dict_len, _, _) = self.codec?;
        let at = off + self.n * 8;
        (dict_len > 0).then(|| &self.bytes()[at..at + dict_len])
    }

    /// Sum of the original sizes (format version 2 records it; version 1 has no cheap answer).
    pub fn raw_total(&self) -> Option<u64> {
        self.codec.map(|c| c.3)
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn shards(&self) -> &[ShardInfo] {
        &self.shards
    }

    fn raw_entry(&self, i: usize) -> Entry {
        let b = self.bytes();
        decode_entry(b, self.entries_off + i * ENTRY_SIZE, self.codec.map(|(off, ..)| rd_u64(b, off + i * 8)))
    }

    fn corrupt(&self, i: usize, what: &str) -> Error {
        Error::format(&self.path, format!("index entry {i} is corrupt: {what}"))
    }

    /// Entry `i`, checked: its shard exists, its bytes lie inside that shard's recorded size and
    /// do not overlap the previous sample of the same shard (an unordered index has no such
    /// order to check here: `validate_all` checks overlaps there).
    pub fn entry(&self, i: usize) -> Result<Entry> {
        if i >= self.n {
            return Err(Error::format(&self.path, format!("sample {i} out of range ({} samples)", self.n)));
        }
        let e = self.raw_entry(i);
        let shard = self.shards.get(e.shard as usize).ok_or_else(|| self.corrupt(i, "shard number out of range"))?;
        match e.offset.checked_add(e.size) {
            Some(end) if end <= shard.size => {}
            _ => return Err(self.corrupt(i, "data lies past the end of its shard")),
        }
        let codec_ok = match e.codec {
            codec::RAW => e.raw == e.size,
            codec::ZSTD => e.raw <= e.size.saturating_mul(codec::MAX_EXPANSION),
            codec::ZSTD_DICT => e.raw <= e.size.saturating_mul(codec::MAX_EXPANSION) && self.dict().is_some(),
            _ => false,
        };
        if !codec_ok {
            return Err(self.corrupt(i, "impossible codec or original size"));
        }
        if i > 0 && !self.unordered {
            let p = self.raw_entry(i - 1);
            let ordered = p.shard < e.shard || (p.shard == e.shard && p.offset.checked_add(p.size).is_some_and(|end| end <= e.offset));
            // A shared entry (a hard link) names data written earlier: wholly before the
            // previous entry's, or the same.
            let back = self.shared && p.shard == e.shard && (e.offset + e.size <= p.offset || (e.offset, e.size) == (p.offset, p.size));
            if !ordered && !back {
                return Err(self.corrupt(i, "overlaps the previous sample"));
            }
        }
        Ok(e)
    }

    fn key_range(&self, i: usize) -> Result<(usize, usize)> {
        if i >= self.n {
            return Err(Error::format(&self.path, format!("sample {i} out of range ({} samples)", self.n)));
        }
        let start = self.raw_entry(i).key_off;
        let end = if i + 1 < self.n { self.raw_entry(i + 1).key_off } else { self.keys_len as u64 };
        if start > end || end > self.keys_len as u64 {
            return Err(self.corrupt(i, "key offsets out of range"));
        }
        Ok((self.keys_off + start as usize, self.keys_off + end as usize))
    }

    /// Key bytes of sample `i`.
    pub fn key(&self, i: usize) -> Result<&[u8]> {
        let (a, b) = self.key_range(i)?;
        Ok(&self.bytes()[a..b])
    }

    /// Position of `key`, by binary search over the sorted keys: O(log n).
    pub fn find(&self, key: &[u8]) -> Result<Option<usize>> {
        find_sorted(self.n, |i| self.key(i), key)
    }

    /// The O(n) checks `open` skips: the body checksum, every entry, keys strictly increasing.
    pub fn validate_all(&self) -> Result<()> {
        let b = self.bytes();
        if crc32c::crc32c(&b[self.entries_off..self.shards_off]) != self.body_crc {
            return Err(Error::format(&self.path, "index entries or keys are corrupt (checksum mismatch)"));
        }
        if let Some((off, _, crc, raw_total)) = self.codec {
            if crc32c::crc32c(&b[off..]) != crc {
                return Err(Error::format(&self.path, "index codec section is corrupt (checksum mismatch)"));
            }
            let sum = (0..self.n).map(|i| self.raw_entry(i).raw).fold(0u64, u64::wrapping_add);
            if sum != raw_total {
                return Err(Error::format(&self.path, "index codec section is corrupt (original sizes do not add up)"));
            }
        }
        let mut prev: Option<&[u8]> = None;
        for i in 0..self.n {
            self.entry(i)?;
            let k = self.key(i)?;
            if prev.is_some_and(|p| p >= k) {
                return Err(self.corrupt(i, "keys are not strictly increasing"));
            }
            prev = Some(k);
        }
        if self.unordered || self.shared {
            // Data in no particular order, or shared: sort the extents once, then no two may
            // overlap (shared: but for the same extent with the same sample).
            let mut ext: Vec<(u32, u64, u64, usize)> = (0..self.n)
                .map(|i| {
                    let e = self.raw_entry(i);
                    (e.shard, e.offset, e.size, i)
                })
                .collect();
            ext.sort_unstable();
            for w in ext.windows(2) {
                let (p, c) = (w[0], w[1]);
                let same = |a: Entry, b: Entry| (a.size, a.raw, a.codec, a.crc) == (b.size, b.raw, b.codec, b.crc);
                if self.shared && (p.0, p.1, p.2) == (c.0, c.1, c.2) && p.2 > 0 && same(self.raw_entry(p.3), self.raw_entry(c.3)) {
                    continue;
                }
                // Bounds were checked by `entry` above: no overflow here.
                if p.0 == c.0 && p.1 + p.2 > c.1 {
                    return Err(self.corrupt(c.3, "overlaps another sample"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut b = IndexBuilder::new();
        b.push(b"a", 0, 512, 3, 7);
        b.push(b"bb", 0, 1536, 0, 0);
        b.push(b"c/d", 1, 512, 10, 9);
        b.push_shard(ShardInfo { name: "shard-00000.tar".into(), size: 3072, hash: 1 });
        b.push_shard(ShardInfo { name: "shard-00001.tar".into(), size: 2048, hash: u128::MAX });
        b.to_bytes()
    }

    fn sample_coded() -> Vec<u8> {
        let mut b = IndexBuilder::new_coded(b"a dictionary");
        b.push_coded(b"a", 0, 512, 3, 3, codec::RAW, 7);
        b.push_coded(b"bb", 0, 1536, 20, 900, codec::ZSTD, 5);
        b.push_coded(b"c/d", 1, 512, 10, 4000, codec::ZSTD_DICT, 9);
        b.push_shard(ShardInfo { name: "shard-00000.tar".into(), size: 3072, hash: 1 });
        b.push_shard(ShardInfo { name: "shard-00001.tar".into(), size: 2048, hash: u128::MAX });
        b.to_bytes()
    }

    #[test]
    fn coded_round_trip() {
        let ix = open_bytes(&sample_coded()).unwrap();
        assert_eq!(ix.version(), 2);
        assert_eq!(ix.dict(), Some(&b"a dictionary"[..]));
        assert_eq!(ix.raw_total(), Some(4903));
        let e = ix.entry(1).unwrap();
        assert_eq!((e.size, e.raw, e.codec), (20, 900, codec::ZSTD));
        assert_eq!(ix.entry(2).unwrap().codec, codec::ZSTD_DICT);
        ix.validate_all().unwrap();
        // concat of one part reproduces it.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p");
        std::fs::write(&p, sample_coded()).unwrap();
        let part = Index::open(&p).unwrap();
        let out = d.path().join("o");
        let sum = concat(&[part], &out, Some(b"a dictionary")).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), sample_coded());
        assert_eq!((sum.total_bytes, sum.stored_bytes), (4903, 33));
    }

    #[test]
    fn impossible_codec_entries_are_refused() {
        let mut b = IndexBuilder::new_coded(b"");
        b.push_coded(b"a", 0, 0, 1, 1 << 40, codec::ZSTD, 0); // a 1-byte frame claiming 1 TiB
        b.push_coded(b"b", 0, 1, 10, 100, codec::ZSTD_DICT, 0); // no dictionary stored
        b.push_coded(b"c", 0, 11, 10, 100, 7, 0); // unknown codec
        b.push_coded(b"d", 0, 21, 10, 100, codec::RAW, 0); // raw but sizes differ
        b.push_shard(ShardInfo { name: "shard-00000.tar".into(), size: 4096, hash: 0 });
        let ix = open_bytes(&b.to_bytes()).unwrap();
        for i in 0..4 {
            assert!(ix.entry(i).is_err(), "entry {i}");
        }
    }

    fn open_bytes(bytes: &[u8]) -> Result<Index> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("index.pdsi");
        std::fs::write(&p, bytes).unwrap();
        Index::open(&p)
    }

    #[test]
    fn round_trip_and_lookup() {
        let ix = open_bytes(&sample()).unwrap();
        assert_eq!(ix.len(), 3);
        assert_eq!(ix.key(1).unwrap(), b"bb");
        assert_eq!(ix.entry(2).unwrap(), Entry { offset: 512, size: 10, key_off: 3, shard: 1, crc: 9, raw: 10, codec: codec::RAW });
        assert_eq!(ix.find(b"c/d").unwrap(), Some(2));
        assert_eq!(ix.find(b"b").unwrap(), None);
        assert_eq!(ix.shards()[1].hash, u128::MAX);
        ix.validate_all().unwrap();
    }

    #[test]
    fn concat_equals_one_builder() {
        let d = tempfile::tempdir().unwrap();
        let mut whole = IndexBuilder::new();
        let mut parts = Vec::new();
        for s in 0..3u32 {
            let mut b = IndexBuilder::new();
            for j in 0..(s as u64 * 5 + 1) {
                let key = format!("k{s}/{j:03}");
                b.push(key.as_bytes(), 0, 512 + j * 1024, j + 1, j as u32 * 7);
                whole.push(key.as_bytes(), s, 512 + j * 1024, j + 1, j as u32 * 7);
            }
            let info = ShardInfo { name: format!("shard-{s:05}.tar"), size: 1 << 20, hash: u128::from(s) << 70 | 9 };
            b.push_shard(info.clone());
            whole.push_shard(info);
            let p = d.path().join(format!("p{s}"));
            std::fs::write(&p, b.to_bytes()).unwrap();
            parts.push(Index::open(&p).unwrap());
        }
        let out = d.path().join("index.pdsi");
        let sum = concat(&parts, &out, None).unwrap();
        let want = whole.to_bytes();
        assert_eq!(std::fs::read(&out).unwrap(), want);
        assert_eq!(sum.samples, 1 + 6 + 11);
        assert_eq!(sum.total_bytes, whole.total_bytes());
        assert_eq!(sum.file_size, want.len() as u64);
        assert_eq!(sum.xxh3_128, xxhash_rust::xxh3::xxh3_128(&want));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for b in [sample(), sample_coded()] {
            for cut in 0..b.len() {
                assert!(matches!(open_bytes(&b[..cut]), Err(Error::Format { .. })), "cut at {cut}");
            }
        }
    }

    #[test]
    fn every_bit_flip_is_caught_by_open_or_validate() {
        for b in [sample(), sample_coded()] {
            for byte in 0..b.len() {
                let mut m = b.clone();
                m[byte] ^= 0x10;
                if let Ok(ix) = open_bytes(&m) {
                    assert!(ix.validate_all().is_err(), "flip at byte {byte} went unnoticed");
                }
            }
        }
    }

    #[test]
    fn unordered_index_checks_bounds_at_access_and_overlaps_in_validate_all() {
        let mk = |second_off: u64| {
            let mut b = IndexBuilder::new_unordered();
            b.push(b"a", 0, 2048, 10, 1); // data after "b"'s: fine in an unordered index
            b.push(b"b", 0, second_off, 10, 2);
            b.push_shard(ShardInfo { name: "shard-00000.tar".into(), size: 4096, hash: 0 });
            b.to_bytes()
        };
        let bytes = mk(512);
        assert_eq!(rd_u32(&bytes, 8), 2);
        assert_eq!(rd_u64(&bytes, 88), FLAG_UNORDERED);
        let ix = open_bytes(&bytes).unwrap();
        assert!(ix.is_unordered() && !ix.is_coded() && ix.version() == 2);
        assert_eq!(ix.entry(1).unwrap().offset, 512);
        ix.validate_all().unwrap();
        // Overlap: each entry passes its own access check; validate_all refuses the pair.
        let ix = open_bytes(&mk(2050)).unwrap();
        assert!(ix.entry(0).is_ok() && ix.entry(1).is_ok());
        assert!(ix.validate_all().unwrap_err().to_string().contains("overlaps"));
        // Every truncation and bit flip is still caught.
        for cut in 0..bytes.len() {
            assert!(open_bytes(&bytes[..cut]).is_err());
        }
        for byte in 0..bytes.len() {
            let mut m = bytes.clone();
            m[byte] ^= 0x10;
            if let Ok(ix) = open_bytes(&m) {
                assert!(ix.validate_all().is_err(), "flip at byte {byte} went unnoticed");
            }
        }
    }

    #[test]
    fn shared_entries_are_version_3_and_only_exact_sharing_passes() {
        let mk = |dup: (u64, u64)| {
            let mut b = IndexBuilder::new_coded(b"");
            b.push_coded(b"a", 0, 512, 10, 10, codec::RAW, 1);
            b.push_coded(b"b", 0, 1536, 20, 90, codec::ZSTD, 2);
            b.push_shared(b"c", 0); // another name of "a"
            b.push_coded(b"d", 0, dup.0, dup.1, dup.1, codec::RAW, 3);
            b.push_shard(ShardInfo { name: "shard-00000.tar".into(), size: 4096, hash: 0 });
            b.to_bytes()
        };
        let bytes = mk((2048, 5));
        assert_eq!((rd_u32(&bytes, 8), rd_u64(&bytes, 88)), (3, FLAG_CODEC | FLAG_SHARED));
        let ix = open_bytes(&bytes).unwrap();
        assert!(ix.is_shared() && ix.version() == 3);
        assert_eq!(ix.entry(2).unwrap().offset, 512);
        ix.validate_all().unwrap();
        // "d" overlapping "b" without being its extent: refused, at access or by validate_all.
        let ix = open_bytes(&mk((1540, 5))).unwrap();
        assert!(ix.entry(3).is_err() || ix.validate_all().is_err());
        let ix = open_bytes(&mk((100, 500))).unwrap();
        assert!(ix.validate_all().unwrap_err().to_string().contains("overlaps"));
        // Every bit flip is still caught.
        for byte in 0..bytes.len() {
            let mut m = bytes.clone();
            m[byte] ^= 0x10;
            if let Ok(ix) = open_bytes(&m) {
                assert!(ix.validate_all().is_err(), "flip at byte {byte} went unnoticed");
            }
        }
        // concat keeps the flag and the version.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p");
        std::fs::write(&p, &bytes).unwrap();
        let s = concat(&[Index::open(&p).unwrap()], &d.path().join("o"), Some(b"")).unwrap();
        assert_eq!((s.version, std::fs::read(d.path().join("o")).unwrap()), (3, bytes));
    }

    #[test]
    fn unknown_flag_bits_are_refused() {
        for flags in [0u64, 4, FLAG_UNORDERED | 8] {
            let mut b = IndexBuilder::new_unordered();
            b.push(b"a", 0, 0, 1, 0);
            b.push_shard(ShardInfo { name: "shard-00000.tar".into(), size: 10, hash: 0 });
            let mut bytes = b.to_bytes();
            bytes[88..96].copy_from_slice(&flags.to_le_bytes());
            let c = crc32c::crc32c(&bytes[..124]);
            bytes[124..128].copy_from_slice(&c.to_le_bytes());
            assert!(open_bytes(&bytes).is_err(), "flags {flags}");
        }
    }

    #[test]
    fn hostile_entry_is_refused_at_access() {
        let mut b = IndexBuilder::new();
        b.push(b"a", 0, u64::MAX - 2, 10, 0); // offset + size overflows
        b.push(b"b", 0, 0, 100, 0);
        b.push_shard(ShardInfo { name: "shard-00000.tar".into(), size: 50, hash: 0 });
        let ix = open_bytes(&b.to_bytes()).unwrap();
        assert!(ix.entry(0).is_err());
        assert!(ix.entry(1).is_err());
        assert!(ix.entry(2).is_err());
    }
}
