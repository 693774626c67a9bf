//! What an I/O thread does for one file: open it (no symlink unless followed), stat it, and for
//! a small file read, checksum, compress and lay out the whole member, off the writer's path;
//! a file that changes while it is read is read again, then is a `Changed` error.

use super::stamp::{self, Stamp, READ_TRIES};
use super::{planned_len, PackOptions, ShardFormat};
use crate::codec::{self, Encoder};
use crate::error::{Error, IoContext, Result};
use crate::tar::{self, Meta};
use crate::walk::Skipped;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// What an I/O thread hands the writer for one file.
pub(super) enum Item {
    Small(Small),
    /// Larger than the window's per-file limit: the writer streams it.
    Large(Large),
    Skip(Skipped),
    Fail(Error),
}

/// A whole member (tar: header, stored data, padding; h5: the stored data); the data starts at
/// `hlen` and has `stored` bytes, encoded with `codec`; `crc` is of the original bytes.
/// `planned` is its [`planned_len`], computed here in parallel, off the writer's path.
pub(super) struct Small {
    pub meta: Meta,
    /// The file as it was read (for `--resume`).
    pub stamp: Stamp,
    pub member: Vec<u8>,
    pub hlen: usize,
    pub crc: u32,
    pub stored: u64,
    pub codec: u8,
    pub planned: u64,
    pub shape: Shape,
}

/// An open large file, as it was at open (`meta`).
pub(super) struct Large {
    pub meta: Meta,
    pub file: File,
    pub path: PathBuf,
    pub shape: Shape,
}

/// What `fstat` says of a file beyond its contents: its number of names (hard links) and
/// whether it is sparse.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Shape {
    pub nlink: u64,
    pub sparse: bool,
}

/// A file is counted as sparse from this size on, when fewer bytes are allocated than its size
/// (smaller ones may be stored inline or compressed by the filesystem).
pub(super) const SPARSE_MIN: u64 = 64 << 10;

impl Shape {
    pub fn of(md: &fs::Metadata) -> Shape {
        Shape { nlink: md.nlink(), sparse: md.len() >= SPARSE_MIN && md.blocks().saturating_mul(512) < md.len() }
    }
}

/// Each I/O thread's own compression state and scratch buffers.
pub(super) struct WorkerState {
    enc: Option<Encoder>,
    data: Vec<u8>,
    frame: Vec<u8>,
    /// Scratch for the second read of a recently changed file.
    check: Vec<u8>,
}

impl WorkerState {
    pub fn new(opts: &PackOptions, dict: &[u8]) -> Self {
        WorkerState { enc: (!opts.compress.is_none()).then(|| Encoder::new(opts.compress, Some(dict))), data: Vec::new(), frame: Vec::new(), check: Vec::new() }
    }
}

pub(super) fn meta_of(md: &fs::Metadata) -> Meta {
    Meta { size: md.len(), mode: md.mode(), mtime: md.mtime(), uid: md.uid(), gid: md.gid() }
}

/// The tar member name of a sample: its key, plus `.zst` when it is stored compressed, so that
/// a plain `tar -x` followed by `zstd -d` on the `.zst` members restores the tree.
pub(super) fn member_name(key: &[u8], codec: u8) -> std::borrow::Cow<'_, [u8]> {
    if codec == codec::RAW {
        std::borrow::Cow::Borrowed(key)
    } else {
        std::borrow::Cow::Owned([key, b".zst"].concat())
    }
}

/// With compression on, a tar member ending in `.zst` always is a packds frame: a key that
/// ends so is compressed even when that does not pay.
pub(super) fn force_compress(format: ShardFormat, key: &[u8]) -> bool {
    format == ShardFormat::Tar && key.ends_with(b".zst")
}

/// Reads exactly `want` bytes from `f` onto the end of `buf`; an extra byte (the file grew) or
/// a short read (it shrank) is a `Changed` error.
fn read_exact_file(f: &File, path: &Path, buf: &mut Vec<u8>, want: usize) -> Result<()> {
    buf.reserve(want + 1);
    let mut got = 0;
    loop {
        // Each read asks for everything left plus one byte: getting less means end of file.
        // Straight into the spare capacity: no zero-filling of a buffer about to be overwritten.
        let spare = &mut buf.spare_capacity_mut()[..want + 1 - got];
        // SAFETY: reads at most spare.len() bytes into memory the Vec owns (uninitialised is
        // fine for read(2)); only the bytes the kernel reports written are then marked as set.
        let k = unsafe { libc::read(f.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
        if k < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("read", path, e));
        }
        if k == 0 {
            break;
        }
        // SAFETY: the kernel initialised exactly k bytes after the current length.
        unsafe { buf.set_len(buf.len() + k as usize) };
        got += k as usize;
        if got >= want {
            break;
        }
    }
    if got != want {
        let what = if got > want { format!("it grew past {want} bytes") } else { format!("size was {want} bytes at open, {got} bytes were read") };
        return Err(Error::Changed { path: path.to_path_buf(), what });
    }
    Ok(())
}

/// Opens `path` as a regular file (not through a symlink unless `--follow-symlinks`).
fn open_regular(path: &Path, follow: bool) -> Result<(File, Meta, Stamp, Shape)> {
    let mut oo = OpenOptions::new();
    oo.read(true);
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    oo.custom_flags(flags);
    let f = oo.open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            Error::Changed { path: path.to_path_buf(), what: "it became a symlink".into() }
        } else {
            Error::io("open", path, e)
        }
    })?;
    let md = f.metadata().ctx("stat", path)?;
    if !md.is_file() {
        return Err(Error::Changed { path: path.to_path_buf(), what: "it is no longer a regular file".into() });
    }
    Ok((f, meta_of(&md), Stamp::of(&md), Shape::of(&md)))
}

/// Reads the file of `key` at `path`: a [`Large`] one is left open for the writer, a small one
/// becomes its whole member, built in `buf` (a recycled buffer). A small file that changes
/// while it is read is read again (see [`super::stamp`]).
pub(super) fn read_one(opts: &PackOptions, path: &Path, key: &[u8], small_max: u64, buf: Vec<u8>, ws: &mut WorkerState) -> Result<Item> {
    let mut member = buf;
    let mut attempt = 0;
    loop {
        let (f, meta, stamp, shape) = open_regular(path, opts.follow_symlinks)?;
        if meta.size > small_max {
            return Ok(Item::Large(Large { meta, file: f, path: path.to_path_buf(), shape }));
        }
        match read_small(opts, &f, path, key, meta, &stamp, &mut member, ws) {
            Ok(m) => return Ok(Item::Small(Small { member, shape, ..m })),
            Err(Error::Changed { .. }) if attempt + 1 < READ_TRIES => {
                attempt += 1;
                stamp::backoff(attempt);
            }
            Err(e) => return Err(e),
        }
    }
}

/// One read of a small file (open as `f`, `meta` and `stamp` from its `fstat`) into `member`;
/// the returned [`Small`]'s own `member` is empty.
#[allow(clippy::too_many_arguments)]
fn read_small(opts: &PackOptions, f: &File, path: &Path, key: &[u8], meta: Meta, stamp: &Stamp, member: &mut Vec<u8>, ws: &mut WorkerState) -> Result<Small> {
    let want = meta.size as usize;
    let format = opts.format;
    let tar = format == ShardFormat::Tar;
    member.clear();
    let m = if let Some(enc) = ws.enc.as_mut() {
        // Compressing: read, checksum and encode here (in parallel), then lay out the member.
        ws.data.clear();
        read_exact_file(f, path, &mut ws.data, want)?;
        let crc = crc32c::crc32c(&ws.data);
        let codec = enc.encode(&ws.data, &mut ws.frame, force_compress(format, key));
        let stored: &[u8] = if codec == codec::RAW { &ws.data } else { &ws.frame };
        let hlen = if tar { tar::write_header(member, &member_name(key, codec), &Meta { size: stored.len() as u64, ..meta }) } else { 0 };
        member.extend_from_slice(stored);
        if tar {
            member.resize(member.len() + tar::padding(stored.len() as u64) as usize, 0);
        }
        let planned = planned_len(format, key, &meta);
        Small { meta, stamp: *stamp, member: Vec::new(), hlen, crc, stored: stored.len() as u64, codec, planned, shape: Shape::default() }
    } else {
        // The whole member is built here, in parallel: header, data, padding. The writer then
        // only appends it.
        let hlen = if tar { tar::write_header(member, key, &meta) } else { 0 };
        member.reserve(want + tar::padding(meta.size) as usize + 1);
        read_exact_file(f, path, member, want)?;
        let crc = crc32c::crc32c(&member[hlen..]);
        if tar {
            member.resize(hlen + want + tar::padding(meta.size) as usize, 0);
        }
        // Uncompressed, the member is exactly what the shard-size rule counts.
        let planned = if tar { member.len() as u64 } else { meta.size };
        Small { meta, stamp: *stamp, member: Vec::new(), hlen, crc, stored: meta.size, codec: codec::RAW, planned, shape: Shape::default() }
    };
    stamp.check(&Stamp::now(f, path)?, path)?;
    if stamp.recent() {
        stamp::confirm(f, path, stamp, m.crc, &mut ws.check)?;
    }
    Ok(m)
}
