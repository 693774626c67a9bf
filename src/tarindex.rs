//! `packds index`: a packds index over existing tar files (GNU tar, pax, WebDataset shards),
//! built in place, without rewriting them.
//!
//! Each tar is read once, sequentially, with 8 MiB reads: its member headers are parsed, the
//! CRC32C of every regular member and the XXH3-128 of the whole file are computed in the same
//! pass. The dataset directory gets `shard-NNNNN.tar` links to the tars (symlinks by default,
//! or hard links), an index with [`FLAG_UNORDERED`](crate::index::FLAG_UNORDERED) (entries in
//! key order, data wherever the tar has it) and `manifest.json`, written last.
//!
//! What the scanner accepts, skips and refuses:
//! - Regular members (`0`, `\0`, `7`) become samples; names come from a pax `path` record, else a
//!   GNU `L` long name, else the ustar name (with the POSIX ustar `prefix`). Leading `./` is
//!   removed. A pax `size` record overrides the ustar size field.
//! - Directories (`5`, GNU dumpdirs `D`, old-style names ending in `/`) are skipped silently;
//!   hard links, symlinks, devices, FIFOs, sparse files (GNU `S` or pax `GNU.sparse.*`),
//!   multi-volume parts (`M`), volume labels (`V`), unknown types, and names that could not be
//!   extracted safely (absolute, `..`, empty or `.` components, NUL bytes) are skipped and
//!   reported.
//! - Refused with a [`Error::Format`] naming the tar and the byte offset: a bad header checksum,
//!   an unreadable size field, a member or header that runs past the end of the file, a pax or
//!   GNU long-name record above [`MAX_EXTENSION`], a malformed pax record, and ambiguous header
//!   sequences that tar readers interpret differently (a pax header together with a GNU
//!   long-name header for one member, two of either, a global header that sets `path` or
//!   `size`, a link, device or directory member with data).
//! - Reading stops at the first zero block (as GNU tar and Python's `tarfile` do); non-zero
//!   bytes after the end-of-archive blocks give a warning, not an error.

use crate::error::{Error, IoContext, Result};
use crate::index::IndexBuilder;
use crate::index::ShardInfo;
use crate::job::Progress;
use crate::layout::{self, Mode, OutputDir, Prepared, ShardFormat};
use crate::manifest::{hex128, IndexFacts, Manifest, ShardRecord};
use crate::walk::Skipped;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;
use xxhash_rust::xxh3::Xxh3;

/// Size of each read.
pub const BUF: usize = 8 << 20;
/// Largest pax or GNU long-name record accepted (a hostile one could claim terabytes).
pub const MAX_EXTENSION: u64 = 1 << 20;
const BLOCK: usize = 512;

/// A regular member of a tar: a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name (the sample key), normalised (no leading `./`).
    pub name: Vec<u8>,
    /// Offset of its first header (pax / GNU long name / ustar).
    pub header: u64,
    /// Offset of its data.
    pub offset: u64,
    pub size: u64,
    /// CRC32C of its data.
    pub crc: u32,
}

/// What one tar holds.
#[derive(Debug, Default)]
pub struct Scan {
    pub members: Vec<Member>,
    /// (member name, why it was left out).
    pub skipped: Vec<(String, String)>,
    /// Harmless oddities (trailing bytes after the end blocks, no end blocks).
    pub warnings: Vec<String>,
    /// Bytes read (the file's size).
    pub size: u64,
    pub hash: u128,
}

/// A name as a report line shows it: UTF-8 as it is, other bytes escaped.
pub fn show(name: &[u8]) -> String {
    match std::str::from_utf8(name) {
        Ok(s) => s.to_string(),
        Err(_) => name.escape_ascii().to_string(),
    }
}

/// The file read in large chunks, hashed as it goes; hands out blocks and byte ranges.
struct Stream<'a> {
    f: File,
    path: &'a Path,
    buf: Vec<u8>,
    lo: usize,
    hi: usize,
    /// File offset of `buf[lo]`.
    pos: u64,
    hash: Xxh3,
    /// Either flag stops the scan: the caller's cancel, or another tar's error.
    stop: [&'a AtomicBool; 2],
    /// Counts the bytes read (progress).
    read: &'a AtomicU64,
}

impl<'a> Stream<'a> {
    /// Makes bytes available; false at end of file.
    fn fill(&mut self) -> Result<bool> {
        if self.lo < self.hi {
            return Ok(true);
        }
        crate::fault::slow_step();
        if self.stop.iter().any(|s| s.load(Relaxed)) {
            return Err(Error::Cancelled);
        }
        let n = loop {
            match self.f.read(&mut self.buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("read", self.path, e)),
            }
        };
        self.hash.update(&self.buf[..n]);
        self.read.fetch_add(n as u64, Relaxed);
        self.lo = 0;
        self.hi = n;
        Ok(n > 0)
    }

    /// Passes the next `n` bytes (or fewer, at end of file) to `f`; returns how many there were.
    fn take(&mut self, mut n: u64, mut f: impl FnMut(&[u8])) -> Result<u64> {
        let want = n;
        while n > 0 && self.fill()? {
            let k = (self.hi - self.lo).min(usize::try_from(n).unwrap_or(usize::MAX));
            f(&self.buf[self.lo..self.lo + k]);
            self.lo += k;
            self.pos += k as u64;
            n -= k as u64;
        }
        Ok(want - n)
    }

    /// The next 512-byte block; returns the bytes there were (0 at end of file).
    fn block(&mut self, out: &mut [u8; BLOCK]) -> Result<usize> {
        let mut at = 0;
        self.take(BLOCK as u64, |b| {
            out[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        })?;
        Ok(at)
    }
}

fn fmt_err(path: &Path, what: String) -> Error {
    Error::format_hint(path, what, "this tar cannot be indexed as it is: check it with `tar -tvf`, or repack its files with `packds pack`")
}

fn cstr(f: &[u8]) -> &[u8] {
    &f[..f.iter().position(|&b| b == 0).unwrap_or(f.len())]
}

/// An octal (or GNU base-256) numeric field.
fn number(f: &[u8]) -> Option<u64> {
    if f[0] & 0x80 != 0 {
        if f[0] != 0x80 {
            return None; // negative, or more than 8 bytes of magnitude
        }
        return f[1..].iter().try_fold(0u64, |v, &b| v.checked_mul(256).map(|v| v | u64::from(b)));
    }
    let s = f.iter().position(|&b| b != b' ' && b != 0).map_or(&f[..0], |i| &f[i..]);
    let end = s.iter().position(|&b| b == b' ' || b == 0).unwrap_or(s.len());
    if s[end..].iter().any(|&b| b != b' ' && b != 0) {
        return None;
    }
    s[..end].iter().try_fold(0u64, |v, &b| match b {
        b'0'..=b'7' => v.checked_mul(8).map(|v| v + u64::from(b - b'0')),
        _ => None,
    })
}

fn checksum_ok(h: &[u8; BLOCK]) -> bool {
    let Some(want) = number(&h[148..156]) else { return false };
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    want == unsigned || i64::try_from(want).is_ok_and(|w| w == signed)
}

/// Extension records of one member (pax `x`).
#[derive(Default)]
struct Pax {
    at: u64,
    path: Option<Vec<u8>>,
    size: Option<u64>,
    linkpath: Option<Vec<u8>>,
    sparse: bool,
}

/// Parses pax records (`"<len> key=value\n"`, `len` counting the whole record).
fn parse_pax(data: &[u8], at: u64, path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let bad = |why: &str| fmt_err(path, format!("malformed pax record in the header at offset {at}: {why}"));
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break; // some writers pad with NULs
        }
        let sp = rest.iter().take(20).position(|&b| b == b' ').ok_or_else(|| bad("no length"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad length"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad("length does not match the record"));
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec.iter().position(|&b| b == b'=').ok_or_else(|| bad("no '='"))?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

/// Where a webdataset sample key ends in a member name: the first `.` of the last path
/// component, when at least one other character precedes it there (`dir/000123.seg.png` →
/// 10, key `dir/000123`, field `seg.png`). None: the member belongs to no sample.
pub fn basename_split(name: &[u8]) -> Option<usize> {
    let start = name.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
    let dot = name[start..].iter().position(|&b| b == b'.')?;
    (dot > 0).then_some(start + dot)
}

/// Why a name cannot be a sample key (None: it can).
fn unsafe_name(name: &[u8]) -> Option<&'static str> {
    match crate::read::safe_components(name) {
        Ok(_) => None,
        Err(Error::Escape { why, .. }) => Some(why),
        Err(_) => Some("unsafe name"),
    }
}

fn strip_dot_slash(mut name: &[u8]) -> &[u8] {
    while let Some(r) = name.strip_prefix(b"./") {
        name = r;
        while let Some(r) = name.strip_prefix(b"/") {
            name = r; // ".//a" as GNU tar writes it never, but "./" then "a" is meant
        }
    }
    name
}

/// Reads one tar once, sequentially, and lists its regular members (with CRC32C) and what
/// it left out. `cancel` stops it between reads ([`Error::Cancelled`]).
pub fn scan(path: &Path, cancel: &AtomicBool) -> Result<Scan> {
    scan_until(path, [cancel, cancel], &AtomicU64::new(0))
}

fn scan_until(path: &Path, stop: [&AtomicBool; 2], read: &AtomicU64) -> Result<Scan> {
    let mut sc = Scanner::open(path, stop, read)?;
    let ended = loop {
        match sc.next_header()? {
            Next::Header(h) if matches!(h.typ, b'x' | b'g' | b'L' | b'K') => sc.extension(&h)?,
            Next::Header(h) => sc.member(&h)?,
            Next::End => break true,
            Next::EndOfFile => break false,
        }
    };
    sc.finish(ended)
}

/// One tar being scanned: the stream, what was found so far, and the extended headers read for
/// the member that comes next.
struct Scanner<'a> {
    st: Stream<'a>,
    path: &'a Path,
    /// The file's size at open.
    fsize: u64,
    out: Scan,
    ext: Extended,
    /// The last header block read.
    block: [u8; BLOCK],
}

/// The extended headers (pax `x`, GNU `L` / `K`) read since the last member.
#[derive(Default)]
struct Extended {
    pax: Option<Pax>,
    long_name: Option<(u64, Vec<u8>)>,
    long_link: Option<(u64, Vec<u8>)>,
    /// Offset of the member's first header.
    first: Option<u64>,
}

impl Extended {
    /// Offset of an extended header still waiting for its member.
    fn pending(&self) -> Option<u64> {
        self.pax.as_ref().map(|p| p.at).or(self.long_name.as_ref().map(|l| l.0)).or(self.long_link.as_ref().map(|l| l.0))
    }
}

/// A header block with a valid checksum, at offset `at` (its bytes: [`Scanner::block`]).
struct Header {
    at: u64,
    /// Its size field.
    size: u64,
    typ: u8,
}

enum Next {
    Header(Header),
    /// A zero block: the end-of-archive marker.
    End,
    /// End of file at a header boundary, without the end-of-archive marker.
    EndOfFile,
}

/// A member header with what its extended headers say.
struct Entry {
    at: u64,
    typ: u8,
    size: u64,
    /// As the archive has it (before `./` is removed).
    raw_name: Vec<u8>,
    link: Vec<u8>,
    sparse: bool,
}

fn ambiguous(path: &Path, at: u64, what: &str) -> Error {
    fmt_err(path, format!("ambiguous archive: {what} (header at offset {at}); tar readers disagree about such members, so packds refuses them"))
}

/// The name in the ustar header itself (with the POSIX `prefix`).
fn ustar_name(h: &[u8; BLOCK]) -> Vec<u8> {
    let name = cstr(&h[..100]);
    let prefix = cstr(&h[345..500]);
    if &h[257..263] == b"ustar\0" && !prefix.is_empty() {
        [prefix, b"/", name].concat()
    } else {
        name.to_vec()
    }
}

/// Why a member is not a sample: `None` it is one, `Some("")` it is left out silently
/// (directories), else the reason reported. Links, devices and directories with data are errors.
fn skip_reason(path: &Path, e: &Entry) -> Result<Option<String>> {
    let (typ, size) = (e.typ, e.size);
    Ok(match typ {
        b'0' | 0 | b'7' if typ == 0 && e.raw_name.ends_with(b"/") => Some(String::new()), // old-style directory
        b'0' | 0 | b'7' if e.sparse => Some("sparse file: pax GNU.sparse records, not supported; extract it and pack it instead".into()),
        b'0' | 0 | b'7' => None,
        b'5' | b'D' | b'1' | b'2' | b'3' | b'4' | b'6' if size != 0 && typ != b'D' => {
            return Err(ambiguous(path, e.at, &format!("member {:?} of type '{}' has {size} bytes of data", show(&e.raw_name), typ as char)));
        }
        b'5' | b'D' => Some(String::new()),
        b'1' => Some(format!("hard link: to {:?}, not indexed (its target is, if it is a regular member)", show(&e.link))),
        b'2' => Some(format!("symlink: to {:?}, not indexed", show(&e.link))),
        b'3' | b'4' => Some("device file: not indexed".into()),
        b'6' => Some("FIFO: not indexed".into()),
        b'S' => Some("GNU sparse file: not supported; extract it and pack it instead".into()),
        b'M' => Some("GNU multi-volume continuation: not supported".into()),
        b'V' => Some("GNU volume label: not a file".into()),
        t => Some(format!("unsupported member type {:?}: not indexed", t as char)),
    })
}

/// The records of a pax `x` header that matter for the member after it.
fn pax_of(data: &[u8], at: u64, path: &Path) -> Result<Pax> {
    let mut p = Pax { at, ..Pax::default() };
    for (k, v) in parse_pax(data, at, path)? {
        match &k[..] {
            b"path" => p.path = (!v.is_empty()).then_some(v),
            b"linkpath" => p.linkpath = Some(v),
            b"size" => {
                let s = std::str::from_utf8(&v).ok().filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).and_then(|s| s.parse().ok());
                p.size = Some(s.ok_or_else(|| fmt_err(path, format!("malformed pax record in the header at offset {at}: bad size {:?}", show(&v))))?);
            }
            b"GNU.sparse.name" => {
                p.sparse = true;
                p.path = Some(v); // the real name (the ustar one is a placeholder)
            }
            k if k.starts_with(b"GNU.sparse.") => p.sparse = true,
            _ => {}
        }
    }
    Ok(p)
}

impl<'a> Scanner<'a> {
    fn open(path: &'a Path, stop: [&'a AtomicBool; 2], read: &'a AtomicU64) -> Result<Self> {
        let f = File::open(path).ctx("open", path)?;
        let md = f.metadata().ctx("stat", path)?;
        if !md.is_file() {
            return Err(Error::usage(format!("{} is not a regular file", path.display()), "give tar files (symlinks to them are followed)"));
        }
        let fsize = md.len();
        // SAFETY: advisory call on a descriptor we own.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        let st = Stream { f, path, buf: vec![0u8; BUF.min(fsize as usize + BLOCK).max(BLOCK)], lo: 0, hi: 0, pos: 0, hash: Xxh3::new(), stop, read };
        Ok(Scanner { st, path, fsize, out: Scan::default(), ext: Extended::default(), block: [0u8; BLOCK] })
    }

    /// Reads the next header block: a header with a valid checksum and size field, or the end.
    fn next_header(&mut self) -> Result<Next> {
        let (path, at) = (self.path, self.st.pos);
        let got = self.st.block(&mut self.block)?;
        let block = &self.block;
        let pending = self.ext.pending();
        if got == 0 {
            if let Some(p) = pending {
                return Err(fmt_err(path, format!("truncated archive: it ends after the extended header at offset {p}, before the member it describes")));
            }
            if at == 0 {
                return Err(fmt_err(path, "empty file: not a tar archive".into()));
            }
            self.out.warnings.push(format!("{}: no end-of-archive blocks (the archive may have been cut at a member boundary)", path.display()));
            return Ok(Next::EndOfFile);
        }
        if got < BLOCK {
            return Err(fmt_err(path, format!("truncated archive: it ends inside the header at offset {at} ({got} of 512 bytes)")));
        }
        if block.iter().all(|&b| b == 0) {
            if let Some(p) = pending {
                return Err(fmt_err(path, format!("the extended header at offset {p} is followed by the end-of-archive marker at offset {at}")));
            }
            // At offset 0 too: an empty archive (`tar -cf x.tar -T /dev/null`), as GNU tar reads it.
            return Ok(Next::End);
        }
        if !checksum_ok(block) {
            return Err(fmt_err(path, format!("bad header checksum at offset {at} (not a tar archive, or damaged)")));
        }
        self.ext.first.get_or_insert(at);
        let size = number(&block[124..136]).ok_or_else(|| fmt_err(path, format!("bad size field in the header at offset {at}")))?;
        Ok(Next::Header(Header { at, typ: block[156], size }))
    }

    /// A pax (`x`, `g`) or GNU long-name (`L`, `K`) header: its records are read and kept for
    /// the member that follows (a global header's are checked and dropped).
    fn extension(&mut self, h: &Header) -> Result<()> {
        let (path, at, size, fsize) = (self.path, h.at, h.size, self.fsize);
        let kind = if matches!(h.typ, b'x' | b'g') { "pax" } else { "GNU long-name" };
        if size > MAX_EXTENSION {
            return Err(fmt_err(path, format!("{kind} header at offset {at} claims {size} bytes of records (limit {MAX_EXTENSION})")));
        }
        if self.st.pos + size > fsize {
            return Err(fmt_err(
                path,
                format!("truncated archive: the {kind} header at offset {at} claims {size} bytes, past the end of the file ({fsize} bytes)"),
            ));
        }
        let mut data = Vec::with_capacity(size as usize);
        let n = self.st.take(size + crate::tar::padding(size), |b| data.extend_from_slice(b))?;
        if n < size + crate::tar::padding(size) {
            return Err(fmt_err(path, format!("truncated archive: it ends inside the {kind} header at offset {at}")));
        }
        data.truncate(size as usize);
        let ext = &mut self.ext;
        match h.typ {
            b'x' if ext.pax.is_some() => return Err(ambiguous(path, at, "two pax headers for one member")),
            b'x' if ext.long_name.is_some() || ext.long_link.is_some() => {
                return Err(ambiguous(path, at, "a pax header after a GNU long-name header for the same member"));
            }
            b'x' => ext.pax = Some(pax_of(&data, at, path)?),
            b'g' if ext.pending().is_some() => return Err(ambiguous(path, at, "a global pax header between a member's extended headers and the member")),
            b'g' => {
                for (k, _) in parse_pax(&data, at, path)? {
                    if matches!(&k[..], b"path" | b"size" | b"linkpath") {
                        return Err(ambiguous(path, at, &format!("a global pax header sets {:?} for every member", show(&k))));
                    }
                }
                ext.first = None;
            }
            _ if ext.pax.is_some() => return Err(ambiguous(path, at, "a GNU long-name header after a pax header for the same member")),
            typ => {
                let slot = if typ == b'L' { &mut ext.long_name } else { &mut ext.long_link };
                if slot.is_some() {
                    return Err(ambiguous(path, at, "two GNU long-name headers of the same kind for one member"));
                }
                *slot = Some((at, cstr(&data).to_vec()));
            }
        }
        Ok(())
    }

    /// A member header: resolves it with its extended headers, then reads its data (a sample,
    /// with its CRC32C) or passes over it (left out), and its padding.
    fn member(&mut self, h: &Header) -> Result<()> {
        let ext = std::mem::take(&mut self.ext);
        let header = ext.first.unwrap_or(h.at);
        let p = ext.pax.unwrap_or_default();
        let e = Entry {
            at: h.at,
            typ: h.typ,
            size: p.size.unwrap_or(h.size),
            raw_name: p.path.or(ext.long_name.map(|l| l.1)).unwrap_or_else(|| ustar_name(&self.block)),
            link: p.linkpath.or(ext.long_link.map(|l| l.1)).unwrap_or_else(|| cstr(&self.block[157..257]).to_vec()),
            sparse: p.sparse,
        };
        self.check_fits(&e)?;
        // GNU old-style sparse members may carry extension blocks of sparse maps after the header.
        if e.typ == b'S' && self.block[482] != 0 {
            self.skip_sparse_map(e.at)?;
            self.check_fits(&e)?;
        }
        let data_at = self.st.pos;
        let name = strip_dot_slash(&e.raw_name);
        let skip = skip_reason(self.path, &e)?.or_else(|| unsafe_name(name).map(|why| format!("unsafe name: {why}, not indexed")));
        let (path, at, size) = (self.path, e.at, e.size);
        let truncated = || fmt_err(path, format!("truncated archive: it ends inside member {:?} (header at offset {at})", show(&e.raw_name)));
        match skip {
            Some(why) => {
                if !why.is_empty() {
                    self.out.skipped.push((show(&e.raw_name), format!("{why} (header at offset {at})")));
                }
                if self.st.take(size, |_| {})? < size {
                    return Err(truncated());
                }
            }
            None => {
                let mut crc = 0u32;
                if self.st.take(size, |b| crc = crc32c::crc32c_append(crc, b))? < size {
                    return Err(truncated());
                }
                self.out.members.push(Member { name: name.to_vec(), header, offset: data_at, size, crc });
            }
        }
        let pad = crate::tar::padding(size);
        if self.st.take(pad, |_| {})? < pad {
            return Err(fmt_err(path, format!("truncated archive: it ends inside the padding of member {:?} (header at offset {at})", show(&e.raw_name))));
        }
        Ok(())
    }

    /// The member's data, starting here, must end within the file.
    fn check_fits(&self, e: &Entry) -> Result<()> {
        let (size, fsize) = (e.size, self.fsize);
        if self.st.pos.checked_add(size).map_or(true, |end| end > fsize) {
            return Err(fmt_err(
                self.path,
                format!("member {:?} (header at offset {}) claims {size} bytes of data, past the end of the file ({fsize} bytes)", show(&e.raw_name), e.at),
            ));
        }
        Ok(())
    }

    /// Passes over the extension blocks of a GNU old-style sparse member's map.
    fn skip_sparse_map(&mut self, at: u64) -> Result<()> {
        let mut ext = [0u8; BLOCK];
        loop {
            let eat = self.st.pos;
            if self.st.block(&mut ext)? < BLOCK {
                return Err(fmt_err(self.path, format!("truncated archive: it ends inside the sparse map of the member at offset {at} (at {eat})")));
            }
            if ext[504] == 0 {
                return Ok(());
            }
        }
    }

    /// After the end-of-archive marker (`ended`) the rest of the file (the second end block,
    /// blocking padding) is read for the hash; anything but zeros there is ignored by tar
    /// readers: a warning. The whole file must have been read.
    fn finish(mut self, ended: bool) -> Result<Scan> {
        let path = self.path;
        if ended {
            let mut junk: Option<u64> = None;
            let mut off = self.st.pos;
            self.st.take(u64::MAX, |b| {
                if junk.is_none() {
                    if let Some(i) = b.iter().position(|&x| x != 0) {
                        junk = Some(off + i as u64);
                    }
                }
                off += b.len() as u64;
            })?;
            if let Some(j) = junk {
                self.out.warnings.push(format!("{}: ignored non-zero bytes after the end-of-archive marker (from offset {j})", path.display()));
            }
        }
        if self.st.pos != self.fsize {
            return Err(Error::Changed { path: path.to_path_buf(), what: format!("it was {} bytes at open, {} bytes were read", self.fsize, self.st.pos) });
        }
        self.out.size = self.st.pos;
        self.out.hash = self.st.hash.digest128();
        Ok(self.out)
    }
}

/// How the dataset refers to the tars (`--link`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    /// `shard-NNNNN.tar` → the tar's absolute path.
    #[default]
    Symlink,
    /// A hard link (same filesystem only): the dataset survives moving or deleting the tars.
    Hard,
}

impl Link {
    pub const ACCEPTED: &'static str = "symlink, hard";

    pub fn as_str(self) -> &'static str {
        match self {
            Link::Symlink => "symlink",
            Link::Hard => "hard",
        }
    }
}

impl std::str::FromStr for Link {
    type Err = Error;

    fn from_str(s: &str) -> Result<Link> {
        match s {
            "symlink" => Ok(Link::Symlink),
            "hard" => Ok(Link::Hard),
            _ => Err(Error::bad_choice("--link", s, "known", Self::ACCEPTED)),
        }
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct IndexTarsOptions {
    pub tars: Vec<PathBuf>,
    pub output: PathBuf,
    /// WebDataset grouping: checked here (every sample's members contiguous in key order),
    /// recorded in the manifest options.
    pub group_by_basename: bool,
    pub force: bool,
    pub link: Link,
    /// Tars scanned at once (0: up to 4).
    pub threads: usize,
}

#[derive(Debug, Clone)]
pub struct IndexTarsSummary {
    pub output: PathBuf,
    pub tars: u64,
    pub samples: u64,
    pub bytes: u64,
    /// Number of webdataset samples (with `group_by_basename`).
    pub groups: Option<u64>,
    pub skipped: Vec<Skipped>,
    pub warnings: Vec<String>,
    pub seconds: f64,
}

/// WebDataset samples: (first member, member count, sample key length) each.
pub type Groups = Vec<(u64, u32, u32)>;

/// Sample boundaries over keys in sorted order: (first member, member count, key length) per
/// sample; members whose name has no extension belong to none. Sample keys must be strictly
/// increasing (so that the members of one sample are contiguous and lookup can bisect); `Err`
/// names the first key where they are not.
pub fn group_ranges<'k>(n: usize, key: impl Fn(usize) -> Result<&'k [u8]>) -> Result<std::result::Result<Groups, String>> {
    let mut out: Vec<(u64, u32, u32)> = Vec::new();
    let mut prev: Option<&[u8]> = None;
    for i in 0..n {
        let k = key(i)?;
        let Some(dot) = basename_split(k) else { continue };
        let g = &k[..dot];
        match prev {
            Some(p) if p == g && out.last().is_some_and(|l| l.0 + u64::from(l.1) == i as u64) => {
                let last = out.last_mut().expect("a group");
                last.1 = last.1.checked_add(1).ok_or_else(|| Error::format("", "a sample with more than 2^32 members"))?;
            }
            Some(p) if p >= g => {
                return Ok(Err(format!(
                    "the members of sample {:?} are not contiguous in key order (a directory name with a '.' in it?); member {:?}",
                    show(g),
                    show(k)
                )));
            }
            _ => out.push((i as u64, 1, dot as u32)),
        }
        prev = Some(g);
    }
    Ok(Ok(out))
}

/// Builds the dataset `opts.output` (index, manifest, links) over the tars in `opts.tars`.
/// Progress: phase 1 scans the tars (tars done of all, bytes read of their total), phase 2
/// writes the index and manifest; `progress.cancel` stops it between two reads, and the output
/// is removed.
pub fn index_tars(opts: &IndexTarsOptions, progress: &Progress) -> Result<IndexTarsSummary> {
    let t0 = Instant::now();
    let out = &opts.output;
    if opts.tars.is_empty() {
        return Err(Error::usage("no tar files given", "packds index SHARD.tar... -o DATASET"));
    }
    let mut tars = Vec::with_capacity(opts.tars.len());
    let mut bytes = 0;
    for t in &opts.tars {
        let c = fs::canonicalize(t).ctx("open", t)?;
        let md = fs::metadata(&c).ctx("stat", &c)?;
        if !md.is_file() {
            return Err(Error::usage(format!("{} is not a regular file", t.display()), "give tar files (uncompressed; symlinks to them are followed)"));
        }
        bytes += md.len();
        if tars.contains(&c) {
            return Err(Error::usage(format!("{} is given twice", t.display()), "name each tar once"));
        }
        tars.push(c);
    }
    if u32::try_from(tars.len()).is_err() || tars.len() as u64 > crate::index::MAX_SHARDS {
        return Err(Error::usage(format!("{} tar files are too many for one index", tars.len()), "index them in several datasets"));
    }
    if let Ok(cout) = fs::canonicalize(out) {
        if let Some(t) = tars.iter().find(|t| t.parent() == Some(cout.as_path())) {
            return Err(Error::usage(format!("{} lies inside the output directory {}", t.display(), out.display()), "choose another -o"));
        }
    }
    let Prepared::Open(dir) = OutputDir::prepare(out, Mode::index(opts.force))? else {
        return Err(Error::usage(format!("output {} already exists", out.display()), "pass --force to replace it, or choose another -o"));
    };
    progress.start(1, tars.len() as u64, bytes);
    let r = index_into(opts, &tars, progress, t0);
    if r.is_err() {
        if dir.created() {
            dir.remove();
        } else {
            let _ = dir.clear();
        }
    }
    r
}

fn index_into(opts: &IndexTarsOptions, tars: &[PathBuf], progress: &Progress, t0: Instant) -> Result<IndexTarsSummary> {
    let out = &opts.output;
    let scans = scan_all(opts, tars, progress)?;
    progress.start(2, 0, 0);
    let order = sorted_members(&scans, tars)?;
    let member = |&(t, m): &(u32, u32)| &scans[t as usize].members[m as usize];
    let skipped: Vec<Skipped> = scans
        .iter()
        .zip(tars)
        .flat_map(|(s, t)| s.skipped.iter().map(move |(n, why)| Skipped { path: format!("{}:{n}", t.display()), reason: why.clone() }))
        .collect();
    if order.is_empty() {
        return Err(Error::usage(
            format!("no regular members to index in {} tar file(s) ({} skipped)", tars.len(), skipped.len()),
            "packds indexes regular files; see the skipped members with --json",
        ));
    }
    let groups = if opts.group_by_basename {
        match group_ranges(order.len(), |i| Ok(&member(&order[i]).name[..]))? {
            Ok(g) => Some(g.len() as u64),
            Err(why) => return Err(Error::usage(format!("--group-by-basename: {why}"), "index without --group-by-basename (every member is still a sample)")),
        }
    } else {
        None
    };
    // Links first, index next, manifest last.
    let mut b = IndexBuilder::new_unordered();
    let mut per_shard = vec![0u64; tars.len()];
    for k in &order {
        let m = member(k);
        b.push(&m.name, k.0, m.offset, m.size, m.crc);
        per_shard[k.0 as usize] += 1;
    }
    let mut shards = Vec::with_capacity(tars.len());
    for (i, (t, s)) in tars.iter().zip(&scans).enumerate() {
        let name = link_shard(opts, i, t)?;
        b.push_shard(ShardInfo { name: name.clone(), size: s.size, hash: s.hash });
        shards.push(ShardRecord { file: name, size: s.size, samples: per_shard[i], xxh3_128: hex128(s.hash) });
    }
    crate::fsx::sync_dir(out)?;
    let ipath = out.join(layout::INDEX_FILE);
    b.write_atomic(&ipath)?;
    let ibytes = fs::read(&ipath).ctx("read", &ipath)?;
    let total = b.total_bytes();
    let facts = IndexFacts { samples: order.len() as u64, total_bytes: total, file_size: ibytes.len() as u64, xxh3_128: xxhash_rust::xxh3::xxh3_128(&ibytes) };
    let m = manifest_of(opts, tars, facts, shards, skipped.clone());
    progress.check()?;
    crate::fsx::write_atomic(&out.join(layout::MANIFEST_FILE), &m.to_json()?)?;
    Ok(IndexTarsSummary {
        output: out.clone(),
        tars: tars.len() as u64,
        samples: order.len() as u64,
        bytes: total,
        groups,
        skipped,
        warnings: scans.into_iter().flat_map(|s| s.warnings).collect(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Scans the tars, a few at once (each read sequentially); the first error stops the others
/// and is the one returned.
fn scan_all(opts: &IndexTarsOptions, tars: &[PathBuf], progress: &Progress) -> Result<Vec<Scan>> {
    let cancel = &progress.cancel;
    let threads = if opts.threads == 0 { 4 } else { opts.threads }.clamp(1, 64).min(tars.len());
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Result<Scan>>>> = Mutex::new((0..tars.len()).map(|_| None).collect());
    let work = || loop {
        let i = next.fetch_add(1, Relaxed);
        if i >= tars.len() || stop.load(Relaxed) {
            return;
        }
        let r = scan_until(&tars[i], [cancel, &stop], &progress.bytes_done);
        progress.add(1, 0);
        if r.is_err() {
            stop.store(true, Relaxed);
        }
        results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
    };
    crate::pool::run_with_caller(threads, "packds-index", &work);
    if cancel.load(Relaxed) {
        return Err(Error::Cancelled);
    }
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    // The error that stopped the others (theirs read "cancelled").
    if let Some(e) = results.iter().position(|r| matches!(r, Some(Err(e)) if !matches!(e, Error::Cancelled))) {
        return Err(results.into_iter().nth(e).flatten().expect("an error").expect_err("an error"));
    }
    let scans: Vec<Scan> =
        results.into_iter().collect::<Option<Result<Vec<Scan>>>>().ok_or_else(|| Error::format(&opts.output, "a tar was not scanned (internal error)"))??;
    Ok(scans)
}

/// Every regular member as (tar, member) sorted by name, byte-wise; a duplicate name is an
/// error naming both places.
fn sorted_members(scans: &[Scan], tars: &[PathBuf]) -> Result<Vec<(u32, u32)>> {
    let mut order: Vec<(u32, u32)> = Vec::new();
    for (t, s) in scans.iter().enumerate() {
        order.extend((0..s.members.len() as u32).map(|m| (t as u32, m)));
    }
    let member = |&(t, m): &(u32, u32)| &scans[t as usize].members[m as usize];
    order.sort_unstable_by(|a, b| member(a).name.cmp(&member(b).name));
    for w in order.windows(2) {
        let (a, b) = (member(&w[0]), member(&w[1]));
        if a.name == b.name {
            let (ta, tb) = (&tars[w[0].0 as usize], &tars[w[1].0 as usize]);
            let (first, second) = if (w[0].0, a.header) < (w[1].0, b.header) { ((ta, a), (tb, b)) } else { ((tb, b), (ta, a)) };
            return Err(Error::format_hint(
                second.0,
                format!(
                    "duplicate key {:?}: the member at offset {} of {} and the member at offset {} of {}",
                    show(&a.name),
                    first.1.header,
                    first.0.display(),
                    second.1.header,
                    second.0.display()
                ),
                "keys must be unique: index the tars into separate datasets, or rename the members",
            ));
        }
    }
    Ok(order)
}

/// Links tar `i` into the dataset as its shard (a symlink, or a hard link with `--link hard`);
/// returns the shard's name.
fn link_shard(opts: &IndexTarsOptions, i: usize, tar: &Path) -> Result<String> {
    let (out, name) = (&opts.output, layout::shard_name(i, ShardFormat::Tar));
    let lp = out.join(&name);
    let _ = fs::remove_file(&lp);
    match opts.link {
        Link::Symlink => std::os::unix::fs::symlink(tar, &lp).ctx("create", &lp)?,
        Link::Hard => fs::hard_link(tar, &lp).map_err(|e| {
            if e.raw_os_error() == Some(libc::EXDEV) {
                Error::usage(
                    format!("cannot hard-link {} into {}: another filesystem", tar.display(), out.display()),
                    "use --link symlink, or put DATASET on the same filesystem as the tars",
                )
            } else {
                Error::io("create", &lp, e)
            }
        })?,
    }
    Ok(name)
}

/// The manifest of an index over `tars`: format version 2 (the index is unordered).
fn manifest_of(opts: &IndexTarsOptions, tars: &[PathBuf], facts: IndexFacts, shards: Vec<ShardRecord>, skipped: Vec<Skipped>) -> Manifest {
    let sources: Vec<String> = tars.iter().map(|t| t.to_string_lossy().into_owned()).collect();
    let options = serde_json::json!({
        "indexed": true,
        "group_by_basename": opts.group_by_basename,
        "link": match opts.link { Link::Symlink => "symlink", Link::Hard => "hard" },
        "sources": sources,
    });
    Manifest::new(ShardFormat::Tar, options, facts, shards).with_skipped(skipped).with_format_version(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tar::{write_header, Meta};

    fn meta(size: u64) -> Meta {
        Meta { size, mode: 0o644, mtime: 1_700_000_000, uid: 0, gid: 0 }
    }

    /// A raw ustar-ish header block with a valid checksum.
    fn raw_header(name: &[u8], typ: u8, size: u64, magic: &[u8]) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name);
        h[100..107].copy_from_slice(b"0000644");
        if size > 0o77777777777 {
            h[124] = 0x80;
            h[128..136].copy_from_slice(&size.to_be_bytes());
        } else {
            h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        }
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = typ;
        h[257..257 + magic.len()].copy_from_slice(magic);
        fix_sum(&mut h);
        h
    }

    fn fix_sum(h: &mut [u8; 512]) {
        h[148..156].copy_from_slice(b"        ");
        let s: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{s:06o}\0 ").as_bytes());
    }

    fn push_data(v: &mut Vec<u8>, data: &[u8]) {
        v.extend_from_slice(data);
        v.resize(v.len() + crate::tar::padding(data.len() as u64) as usize, 0);
    }

    fn member(v: &mut Vec<u8>, name: &[u8], data: &[u8]) {
        write_header(v, name, &meta(data.len() as u64));
        push_data(v, data);
    }

    fn gnu_long(v: &mut Vec<u8>, typ: u8, name: &[u8]) {
        let mut n = name.to_vec();
        n.push(0);
        v.extend_from_slice(&raw_header(b"././@LongLink", typ, n.len() as u64, b"ustar  \0"));
        push_data(v, &n);
    }

    fn pax(v: &mut Vec<u8>, typ: u8, records: &[u8]) {
        v.extend_from_slice(&raw_header(b"././@PaxHeader", typ, records.len() as u64, b"ustar\0"));
        push_data(v, records);
    }

    fn end(v: &mut Vec<u8>) {
        v.extend_from_slice(&[0u8; 1024]);
    }

    fn scan_bytes(b: &[u8]) -> Result<Scan> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.tar");
        std::fs::write(&p, b).unwrap();
        scan(&p, &AtomicBool::new(false))
    }

    fn names(s: &Scan) -> Vec<String> {
        s.members.iter().map(|m| show(&m.name)).collect()
    }

    fn err_of(b: &[u8]) -> String {
        match scan_bytes(b) {
            Err(e @ Error::Format { .. }) => e.to_string(),
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn packds_own_headers_pax_names_and_crcs() {
        let mut v = Vec::new();
        member(&mut v, b"a.txt", b"hello");
        let long = [b'n'; 150];
        member(&mut v, &long, b"long one");
        member(&mut v, "caf\u{e9}/\u{1F600}.json".as_bytes(), b"{}");
        member(&mut v, b"empty", b"");
        end(&mut v);
        let s = scan_bytes(&v).unwrap();
        assert_eq!(names(&s), vec!["a.txt".to_string(), "n".repeat(150), "caf\u{e9}/\u{1F600}.json".into(), "empty".into()]);
        assert_eq!(s.members[0].offset, 512);
        assert_eq!(s.members[0].crc, crc32c::crc32c(b"hello"));
        assert_eq!(&v[s.members[1].offset as usize..][..8], b"long one");
        assert_eq!(s.size, v.len() as u64);
        assert_eq!(s.hash, xxhash_rust::xxh3::xxh3_128(&v));
        assert!(s.warnings.is_empty() && s.skipped.is_empty());
    }

    #[test]
    fn gnu_long_names_links_prefix_and_skipped_types() {
        let mut v = Vec::new();
        let long = format!("{}/file.bin", "d".repeat(120));
        gnu_long(&mut v, b'L', long.as_bytes());
        v.extend_from_slice(&raw_header(b"truncated-short-name", b'0', 3, b"ustar  \0"));
        push_data(&mut v, b"abc");
        // ustar prefix field (POSIX magic only).
        let mut h = raw_header(b"leaf.txt", b'0', 2, b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[345..352].copy_from_slice(b"pre/fix");
        fix_sum(&mut h);
        v.extend_from_slice(&h);
        push_data(&mut v, b"xy");
        v.extend_from_slice(&raw_header(b"dir/", b'5', 0, b"ustar  \0"));
        let mut hl = raw_header(b"hard", b'1', 0, b"ustar  \0");
        hl[157..161].copy_from_slice(b"leaf");
        fix_sum(&mut hl);
        v.extend_from_slice(&hl);
        gnu_long(&mut v, b'K', b"some/very/long/link/target");
        v.extend_from_slice(&raw_header(b"sym", b'2', 0, b"ustar  \0"));
        v.extend_from_slice(&raw_header(b"fifo", b'6', 0, b"ustar  \0"));
        v.extend_from_slice(&raw_header(b"sparse", b'S', 5, b"ustar  \0"));
        push_data(&mut v, b"12345");
        v.extend_from_slice(&raw_header(b"./dot/x", b'0', 1, b"ustar  \0"));
        push_data(&mut v, b"!");
        end(&mut v);
        let s = scan_bytes(&v).unwrap();
        assert_eq!(names(&s), vec![long.clone(), "pre/fix/leaf.txt".into(), "dot/x".into()]);
        assert_eq!(s.members[0].header, 0);
        assert_eq!(&v[s.members[0].offset as usize..][..3], b"abc");
        let reasons: Vec<_> = s.skipped.iter().map(|(n, r)| format!("{n}: {r}")).collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}"); // the directory is skipped silently
        assert!(reasons[0].starts_with("hard: hard link: to \"leaf\""), "{reasons:?}");
        assert!(reasons[1].contains("symlink: to \"some/very/long/link/target\""), "{reasons:?}");
        assert!(reasons[2].contains("FIFO") && reasons[3].contains("sparse"), "{reasons:?}");
    }

    #[test]
    fn pax_size_and_path_records_win_and_globals_are_skipped() {
        let mut v = Vec::new();
        pax(&mut v, b'g', b"21 comment=abcdefghi\n");
        pax(&mut v, b'x', b"16 path=rea.lly\n10 size=4\n");
        v.extend_from_slice(&raw_header(b"ignored", b'0', 0, b"ustar\0"));
        push_data(&mut v, b"four");
        pax(&mut v, b'x', b"22 GNU.sparse.major=1\n22 GNU.sparse.minor=0\n");
        v.extend_from_slice(&raw_header(b"sp", b'0', 0, b"ustar\0"));
        end(&mut v);
        let s = scan_bytes(&v).unwrap();
        assert_eq!(names(&s), vec!["rea.lly"]);
        assert_eq!(s.members[0].size, 4);
        assert_eq!(s.members[0].header, 1024); // the pax header's offset
        assert_eq!(s.skipped.len(), 1);
        assert!(s.skipped[0].1.contains("sparse"));
    }

    #[test]
    fn bad_checksum_names_the_offset() {
        let mut v = Vec::new();
        member(&mut v, b"a", b"x");
        member(&mut v, b"b", b"y");
        end(&mut v);
        v[1024 + 10] ^= 1;
        let e = err_of(&v);
        assert!(e.contains("bad header checksum at offset 1024"), "{e}");
    }

    #[test]
    fn every_truncation_is_an_error_or_a_prefix() {
        let mut v = Vec::new();
        member(&mut v, b"a", &[7u8; 700]);
        pax(&mut v, b'x', b"13 path=bbbb\n");
        v.extend_from_slice(&raw_header(b"b", b'0', 3, b"ustar\0"));
        push_data(&mut v, b"abc");
        let end_at = v.len();
        end(&mut v);
        for cut in 0..v.len() {
            match scan_bytes(&v[..cut]) {
                Ok(s) => {
                    // Cut at a member boundary: a valid (shorter) archive, with a warning; or
                    // after the first end block, where tar readers stop.
                    assert!(cut % 512 == 0 && cut > 0 || cut >= end_at + 512, "cut {cut}");
                    assert!(s.members.len() <= 2);
                }
                Err(Error::Format { what, .. }) => {
                    assert!(what.contains("truncated") || what.contains("empty") || what.contains("past the end"), "cut {cut}: {what}")
                }
                Err(e) => panic!("cut {cut}: {e}"),
            }
        }
    }

    #[test]
    fn size_past_eof_and_huge_extensions_are_refused_without_allocating() {
        let mut v = raw_header(b"big", b'0', 1 << 40, b"ustar\0").to_vec();
        v.extend_from_slice(&[0u8; 1024]);
        assert!(err_of(&v).contains("past the end of the file"));
        for typ in [b'x', b'L'] {
            let mut v = raw_header(b"././@LongLink", typ, 1 << 40, b"ustar  \0").to_vec();
            v.extend_from_slice(&[0u8; 1024]);
            let e = err_of(&v);
            assert!(e.contains("header at offset 0 claims 1099511627776 bytes") && e.contains("limit"), "{e}");
        }
        // base-256 sizes: huge → past EOF; negative → bad size field.
        let mut h = raw_header(b"b256", b'0', 0, b"ustar  \0");
        h[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
        fix_sum(&mut h);
        let mut v = h.to_vec();
        push_data(&mut v, b"12345");
        end(&mut v);
        assert_eq!(scan_bytes(&v).unwrap().members[0].size, 5);
        h[124] = 0xff;
        fix_sum(&mut h);
        v[..512].copy_from_slice(&h);
        assert!(err_of(&v).contains("bad size field"));
    }

    #[test]
    fn pax_desync_tricks_are_refused() {
        // A pax size record followed by a GNU long-name header (tar-rs#454 style).
        let mut v = Vec::new();
        pax(&mut v, b'x', b"13 size=1024\n");
        gnu_long(&mut v, b'L', b"evil");
        v.extend_from_slice(&raw_header(b"evil", b'0', 0, b"ustar  \0"));
        end(&mut v);
        assert!(err_of(&v).contains("ambiguous"));
        // GNU long name, then pax.
        let mut v = Vec::new();
        gnu_long(&mut v, b'L', b"x");
        pax(&mut v, b'x', b"10 path=y\n");
        v.extend_from_slice(&raw_header(b"z", b'0', 0, b"ustar\0"));
        end(&mut v);
        assert!(err_of(&v).contains("ambiguous"));
        // Two pax headers; a global one that sets a size; a symlink with data.
        let mut v = Vec::new();
        pax(&mut v, b'x', b"10 path=y\n");
        pax(&mut v, b'x', b"10 path=z\n");
        v.extend_from_slice(&raw_header(b"z", b'0', 0, b"ustar\0"));
        end(&mut v);
        assert!(err_of(&v).contains("two pax headers"));
        let mut v = Vec::new();
        pax(&mut v, b'g', b"10 size=9\n");
        end(&mut v);
        assert!(err_of(&v).contains("global"));
        let mut v = raw_header(b"s", b'2', 512, b"ustar  \0").to_vec();
        v.extend_from_slice(&[0u8; 512 + 1024]);
        assert!(err_of(&v).contains("ambiguous"));
        // Malformed pax records.
        for recs in [&b"99 path=a\n"[..], b"x path=a\n", b"6 pa\n", b"10 patha\n\n"] {
            let mut v = Vec::new();
            pax(&mut v, b'x', recs);
            v.extend_from_slice(&raw_header(b"z", b'0', 0, b"ustar\0"));
            end(&mut v);
            assert!(err_of(&v).contains("malformed pax record"), "{recs:?}");
        }
    }

    #[test]
    fn unsafe_names_are_skipped_and_trailing_garbage_warns() {
        let mut v = Vec::new();
        for n in [&b"/etc/passwd"[..], b"../x", b"a/../../b", b"a//b", b"ok"] {
            member(&mut v, n, b"data");
        }
        pax(&mut v, b'x', b"14 path=nul\0x\n");
        v.extend_from_slice(&raw_header(b"z", b'0', 0, b"ustar\0"));
        end(&mut v);
        v.extend_from_slice(b"garbage");
        let s = scan_bytes(&v).unwrap();
        assert_eq!(names(&s), vec!["ok"]);
        assert_eq!(s.skipped.len(), 5, "{:?}", s.skipped);
        assert!(s.skipped.iter().all(|(_, r)| r.starts_with("unsafe name")));
        assert!(s.warnings.len() == 1 && s.warnings[0].contains("non-zero bytes"), "{:?}", s.warnings);
        assert_eq!(s.size, v.len() as u64);
    }

    #[test]
    fn index_tars_end_to_end_through_symlinks_and_the_first_real_error_wins() {
        let d = tempfile::tempdir().unwrap();
        let mut tars = Vec::new();
        for t in 0..6u8 {
            let mut v = Vec::new();
            for j in (0..20u8).rev() {
                member(&mut v, format!("s/{j:02}.{t}").as_bytes(), &vec![j ^ t; usize::from(j) * 100]);
            }
            end(&mut v);
            let p = d.path().join(format!("t{t}.tar"));
            std::fs::write(&p, &v).unwrap();
            tars.push(p);
        }
        let out = d.path().join("o.pds");
        let opts = IndexTarsOptions { tars: tars.clone(), output: out.clone(), group_by_basename: true, force: false, link: Link::Symlink, threads: 3 };
        let s = index_tars(&opts, &Progress::default()).unwrap();
        assert_eq!((s.samples, s.groups, s.tars), (120, Some(20), 6));
        let r = crate::read::Reader::open(&out).unwrap();
        assert!(r.index().is_unordered());
        assert_eq!(r.key(0).unwrap(), b"s/00.0");
        let i = r.find(b"s/07.3").unwrap().unwrap();
        assert_eq!(&*r.read(i).unwrap(), &vec![7 ^ 3; 700][..]);
        let rep = r.verify_with(2, false).unwrap();
        assert!(rep.problems.is_empty() && rep.samples == 120, "{:?}", rep.problems);
        assert_eq!(r.unpack(&d.path().join("un")).unwrap(), 120);
        // A damaged tar among good ones: its own error, not a "cancelled" from the others.
        let mut bad = std::fs::read(&tars[4]).unwrap();
        bad[3] ^= 1; // the first header's name: its checksum no longer matches
        std::fs::write(&tars[4], &bad).unwrap();
        for _ in 0..5 {
            let opts = IndexTarsOptions { output: d.path().join("p.pds"), ..opts.clone() };
            match index_tars(&opts, &Progress::default()) {
                Err(Error::Format { path, what, .. }) => assert!(path == tars[4] && what.contains("checksum"), "{what}"),
                other => panic!("{other:?}"),
            }
            assert!(!d.path().join("p.pds").exists());
        }
    }

    #[test]
    fn basename_split_matches_webdataset() {
        fn k(n: &str) -> Option<(&str, &str)> {
            basename_split(n.as_bytes()).map(|i| (&n[..i], &n[i + 1..]))
        }
        assert_eq!(k("dir/000123.seg.png"), Some(("dir/000123", "seg.png")));
        assert_eq!(k("a.b/c.jpg"), Some(("a.b/c", "jpg")));
        assert_eq!(k("x.jpg"), Some(("x", "jpg")));
        assert_eq!(k("dir/.hidden"), None);
        assert_eq!(k("noext"), None);
        assert_eq!(k("a."), Some(("a", "")));
    }

    #[test]
    fn groups_are_contiguous_runs_and_out_of_order_ones_are_refused() {
        let keys: Vec<&[u8]> = vec![b"a.cls", b"a.jpg", b"b.jpg", b"c", b"d.x.y", b"d.z"];
        let g = group_ranges(keys.len(), |i| Ok(keys[i])).unwrap().unwrap();
        assert_eq!(g, vec![(0, 2, 1), (2, 1, 1), (4, 2, 1)]);
        let keys: Vec<&[u8]> = vec![b"a.b/c.jpg", b"a.c", b"a.d/e.jpg"];
        // groups "a.b/c", "a", ...: not increasing.
        assert!(group_ranges(keys.len(), |i| Ok(keys[i])).unwrap().is_err());
    }
}
