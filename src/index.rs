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

use crate::error::{Error, IoContext, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"PACKDSIX";
pub const VERSION: u32 = 1;
pub const HEADER_SIZE: usize = 128;
pub const ENTRY_SIZE: usize = 32;
pub const SHARD_SIZE: usize = 32;
/// Upper bound on shards in one index (a sanity limit against hostile counts).
pub const MAX_SHARDS: u64 = 1 << 24;

/// One sample's location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub size: u64,
    pub key_off: u64,
    pub shard: u32,
    pub crc: u32,
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

/// Builds an index in memory (about 32 bytes + key length per sample) and writes it.
#[derive(Default)]
pub struct IndexBuilder {
    entries: Vec<u8>,
    keys: Vec<u8>,
    shards: Vec<ShardInfo>,
    total_bytes: u64,
}

impl IndexBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len() / ENTRY_SIZE
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of the sizes of all samples pushed.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn push(&mut self, key: &[u8], shard: u32, offset: u64, size: u64, crc: u32) {
        self.total_bytes += size;
        let e = &mut self.entries;
        e.extend_from_slice(&offset.to_le_bytes());
        e.extend_from_slice(&size.to_le_bytes());
        e.extend_from_slice(&(self.keys.len() as u64).to_le_bytes());
        e.extend_from_slice(&shard.to_le_bytes());
        e.extend_from_slice(&crc.to_le_bytes());
        self.keys.extend_from_slice(key);
    }

    pub fn push_shard(&mut self, s: ShardInfo) {
        self.shards.push(s);
    }

    pub fn shards(&self) -> &[ShardInfo] {
        &self.shards
    }

    /// Serializes the index.
    /// The header, the zero padding after the keys, and the shard table + names; the entries
    /// and keys go between them as they are.
    fn frame(&self) -> ([u8; HEADER_SIZE], usize, Vec<u8>) {
        let keys_off = HEADER_SIZE + self.entries.len();
        let shards_off = align8(keys_off + self.keys.len());
        let pad = shards_off - (keys_off + self.keys.len());
        let (mut tail, names) = shard_table(&self.shards);
        let names_off = shards_off + tail.len();
        tail.extend_from_slice(&names);
        let body_crc = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&self.entries), &self.keys), &[0u8; 8][..pad]);
        let h = write_header(self.len() as u64, self.shards.len() as u64, keys_off, self.keys.len(), shards_off, names_off, names.len(), body_crc, crc32c::crc32c(&tail));
        (h, pad, tail)
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

#[allow(clippy::too_many_arguments)]
fn write_header(n: u64, nshards: u64, keys_off: usize, keys_len: usize, shards_off: usize, names_off: usize, names_len: usize, body_crc: u32, shards_crc: u32) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    {
        let h = &mut h[..];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        h[16..24].copy_from_slice(&n.to_le_bytes());
        h[24..32].copy_from_slice(&nshards.to_le_bytes());
        h[32..40].copy_from_slice(&(HEADER_SIZE as u64).to_le_bytes());
        h[40..48].copy_from_slice(&(keys_off as u64).to_le_bytes());
        h[48..56].copy_from_slice(&(keys_len as u64).to_le_bytes());
        h[56..64].copy_from_slice(&(shards_off as u64).to_le_bytes());
        h[64..72].copy_from_slice(&(names_off as u64).to_le_bytes());
        h[72..80].copy_from_slice(&(names_len as u64).to_le_bytes());
        h[80..84].copy_from_slice(&body_crc.to_le_bytes());
        h[84..88].copy_from_slice(&shards_crc.to_le_bytes());
        // 88..96 flags (0), 96..124 reserved (0)
        let hc = crc32c::crc32c(&h[..124]);
        h[124..128].copy_from_slice(&hc.to_le_bytes());
    }
    h
}

/// What [`concat`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcatSummary {
    pub samples: u64,
    pub total_bytes: u64,
    pub file_size: u64,
    pub xxh3_128: u128,
}

/// Writes to `out` (atomically) the index made of `parts` one after another (each part's
/// shards are renumbered after the previous parts'; keys must be increasing across parts).
/// Streams: memory is O(number of shards), not O(number of samples).
pub fn concat(parts: &[Index], out: &Path) -> Result<ConcatSummary> {
    let n: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let keys_len: usize = parts.iter().map(|p| p.keys_len).sum();
    let shards: Vec<ShardInfo> = parts.iter().flat_map(|p| p.shards().iter().cloned()).collect();
    let keys_off = HEADER_SIZE + n as usize * ENTRY_SIZE;
    let shards_off = align8(keys_off + keys_len);
    let (table, names) = shard_table(&shards);
    let names_off = shards_off + table.len();
    // Pass 1 computes the body checksum; pass 2 writes (the header comes first in the file).
    let mut total_bytes = 0u64;
    let body = |sink: &mut dyn FnMut(&[u8]) -> Result<()>| -> Result<u64> {
        let mut total = 0u64;
        let (mut key_base, mut shard_base) = (0u64, 0u32);
        for p in parts {
            for i in 0..p.len() {
                let e = p.entry(i)?;
                total += e.size;
                let mut b = [0u8; ENTRY_SIZE];
                b[0..8].copy_from_slice(&e.offset.to_le_bytes());
                b[8..16].copy_from_slice(&e.size.to_le_bytes());
                b[16..24].copy_from_slice(&(e.key_off + key_base).to_le_bytes());
                b[24..28].copy_from_slice(&(e.shard + shard_base).to_le_bytes());
                b[28..32].copy_from_slice(&e.crc.to_le_bytes());
                sink(&b)?;
            }
            key_base += p.keys_len as u64;
            shard_base += p.shards().len() as u32;
        }
        for p in parts {
            sink(&p.bytes()[p.keys_off..p.keys_off + p.keys_len])?;
        }
        sink(&[0u8; 8][..shards_off - (keys_off + keys_len)])?;
        Ok(total)
    };
    let mut crc = 0u32;
    body(&mut |b| {
        crc = crc32c::crc32c_append(crc, b);
        Ok(())
    })?;
    let mut tail = table;
    tail.extend_from_slice(&names);
    let header = write_header(n, shards.len() as u64, keys_off, keys_len, shards_off, names_off, names.len(), crc, crc32c::crc32c(&tail));
    let tmp = crate::fsx::tmp_name(out);
    let mut w = std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp).ctx("create", &tmp)?);
    let mut hash = xxhash_rust::xxh3::Xxh3::new();
    let mut put = |b: &[u8]| -> Result<()> {
        hash.update(b);
        std::io::Write::write_all(&mut w, b).ctx("write", &tmp)
    };
    put(&header)?;
    total_bytes += body(&mut put)?;
    put(&tail)?;
    let f = w.into_inner().map_err(|e| Error::io("write", &tmp, e.into_error()))?;
    f.sync_all().ctx("fsync", &tmp)?;
    drop(f);
    std::fs::rename(&tmp, out).ctx("rename", out)?;
    crate::fsx::sync_parent(out)?;
    Ok(ConcatSummary { samples: n, total_bytes, file_size: (names_off + names.len()) as u64, xxh3_128: hash.digest128() })
}



/// A mapped, header-validated index.
pub struct Index {
    path: PathBuf,
    map: Option<Mmap>,
    n: usize,
    entries_off: usize,
    keys_off: usize,
    keys_len: usize,
    shards_off: usize,
    body_crc: u32,
    shards: Vec<ShardInfo>,
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

/// A shard name must be a plain file name inside the dataset directory.
pub fn valid_shard_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

impl Index {
    /// Maps and validates `path` (header, sections, shard table). O(shards).
    pub fn open(path: &Path) -> Result<Index> {
        let f = File::open(path).ctx("open", path)?;
        let len = f.metadata().ctx("stat", path)?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the index is an immutable file (written once under a temporary name and
            // renamed into place). Every access below is bounds-checked against the map length.
            Some(unsafe { Mmap::map(&f) }.ctx("map", path)?)
        };
        Self::from_map(path, map)
    }

    fn from_map(path: &Path, map: Option<Mmap>) -> Result<Index> {
        let bad = |what: String| Error::format(path, what);
        let b: &[u8] = map.as_deref().unwrap_or(&[]);
        if b.len() < HEADER_SIZE {
            return Err(bad(format!("not a packds index (file is {} bytes, shorter than the header)", b.len())));
        }
        if &b[0..8] != MAGIC {
            return Err(bad("not a packds index (bad magic)".into()));
        }
        let version = rd_u32(b, 8);
        if version != VERSION {
            return Err(bad(format!("index format version {version} is not supported by packds {} (which reads version {VERSION}); upgrade packds", crate::VERSION)));
        }
        if rd_u32(b, 124) != crc32c::crc32c(&b[..124]) {
            return Err(bad("index header is corrupt (checksum mismatch)".into()));
        }
        if rd_u32(b, 12) as usize != HEADER_SIZE || rd_u64(b, 88) != 0 {
            return Err(bad("index header has unknown fields or flags".into()));
        }
        let len = b.len() as u64;
        let n = rd_u64(b, 16);
        let nshards = rd_u64(b, 24);
        let entries_off = rd_u64(b, 32);
        let keys_off = rd_u64(b, 40);
        let keys_len = rd_u64(b, 48);
        let shards_off = rd_u64(b, 56);
        let names_off = rd_u64(b, 64);
        let names_len = rd_u64(b, 72);
        let layout_ok = (|| {
            let entries_end = n.checked_mul(ENTRY_SIZE as u64)?.checked_add(entries_off)?;
            let keys_end = keys_off.checked_add(keys_len)?;
            let table_end = nshards.checked_mul(SHARD_SIZE as u64)?.checked_add(shards_off)?;
            let names_end = names_off.checked_add(names_len)?;
            Some(
                entries_off == HEADER_SIZE as u64
                    && keys_off == entries_end
                    && shards_off >= keys_end
                    && shards_off % 8 == 0
                    && names_off == table_end
                    && names_end == len
                    && nshards <= MAX_SHARDS,
            )
        })();
        if layout_ok != Some(true) {
            return Err(bad(format!("index is truncated or its section table is corrupt ({n} samples, {nshards} shards claimed, file is {len} bytes)")));
        }
        let (shards_off, names_off) = (shards_off as usize, names_off as usize);
        if rd_u32(b, 84) != crc32c::crc32c(&b[shards_off..]) {
            return Err(bad("index shard table is corrupt (checksum mismatch)".into()));
        }
        let mut shards = Vec::with_capacity(nshards as usize);
        for s in 0..nshards as usize {
            let at = shards_off + s * SHARD_SIZE;
            let noff = rd_u32(b, at + 24) as usize;
            let nlen = rd_u32(b, at + 28) as usize;
            let name = noff
                .checked_add(nlen)
                .filter(|&end| end as u64 <= names_len)
                .and_then(|end| std::str::from_utf8(&b[names_off + noff..names_off + end]).ok())
                .filter(|n| valid_shard_name(n))
                .ok_or_else(|| bad(format!("index shard table entry {s} has an invalid name")))?;
            let hash = u128::from(rd_u64(b, at + 8)) | (u128::from(rd_u64(b, at + 16)) << 64);
            shards.push(ShardInfo { name: name.to_string(), size: rd_u64(b, at), hash });
        }
        Ok(Index {
            path: path.to_path_buf(),
            body_crc: rd_u32(b, 80),
            map,
            n: n as usize,
            entries_off: entries_off as usize,
            keys_off: keys_off as usize,
            keys_len: keys_len as usize,
            shards_off,
            shards,
        })
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
        let at = self.entries_off + i * ENTRY_SIZE;
        Entry { offset: rd_u64(b, at), size: rd_u64(b, at + 8), key_off: rd_u64(b, at + 16), shard: rd_u32(b, at + 24), crc: rd_u32(b, at + 28) }
    }

    fn corrupt(&self, i: usize, what: &str) -> Error {
        Error::format(&self.path, format!("index entry {i} is corrupt: {what}"))
    }

    /// Entry `i`, checked: its shard exists, its bytes lie inside that shard's recorded size and
    /// do not overlap the previous sample of the same shard.
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
        if i > 0 {
            let p = self.raw_entry(i - 1);
            let ordered = p.shard < e.shard || (p.shard == e.shard && p.offset.checked_add(p.size).is_some_and(|end| end <= e.offset));
            if !ordered {
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
        let (mut lo, mut hi) = (0usize, self.n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.key(mid)?.cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some(mid)),
            }
        }
        Ok(None)
    }

    /// The O(n) checks `open` skips: the body checksum, every entry, keys strictly increasing.
    pub fn validate_all(&self) -> Result<()> {
        let b = self.bytes();
        if crc32c::crc32c(&b[self.entries_off..self.shards_off]) != self.body_crc {
            return Err(Error::format(&self.path, "index entries or keys are corrupt (checksum mismatch)"));
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
        assert_eq!(ix.entry(2).unwrap(), Entry { offset: 512, size: 10, key_off: 3, shard: 1, crc: 9 });
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
        let sum = concat(&parts, &out).unwrap();
        let want = whole.to_bytes();
        assert_eq!(std::fs::read(&out).unwrap(), want);
        assert_eq!(sum.samples, 1 + 6 + 11);
        assert_eq!(sum.total_bytes, whole.total_bytes());
        assert_eq!(sum.file_size, want.len() as u64);
        assert_eq!(sum.xxh3_128, xxhash_rust::xxh3::xxh3_128(&want));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = sample();
        for cut in 0..b.len() {
            assert!(matches!(open_bytes(&b[..cut]), Err(Error::Format { .. })), "cut at {cut}");
        }
    }

    #[test]
    fn every_bit_flip_is_caught_by_open_or_validate() {
        let b = sample();
        for byte in 0..b.len() {
            let mut m = b.clone();
            m[byte] ^= 0x10;
            if let Ok(ix) = open_bytes(&m) {
                assert!(ix.validate_all().is_err(), "flip at byte {byte} went unnoticed");
            }
        }
    }

    #[test]
    fn hostile_entry_is_refused_at_access() {
        let mut b = IndexBuilder::new();
        b.push(b"a", 0, u64::MAX - 2, 10, 0); // offset + size overflows
        b.push(b"b", 0, 0, 100, 0);
        b.push_shard(ShardInfo { name: "s.tar".into(), size: 50, hash: 0 });
        let ix = open_bytes(&b.to_bytes()).unwrap();
        assert!(ix.entry(0).is_err());
        assert!(ix.entry(1).is_err());
        assert!(ix.entry(2).is_err());
    }
}
