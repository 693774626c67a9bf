//! Filesystem helpers: atomic writes, directory fsync, opening a file without blocking.

use crate::error::{IoContext, Result};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Writes `data` to `path` atomically: a temporary file in the same directory, fsync, rename,
/// then fsync of the directory. Readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = tmp_name(path);
    {
        let mut f = File::create(&tmp).ctx("create", &tmp)?;
        f.write_all(data).ctx("write", &tmp)?;
        f.sync_all().ctx("fsync", &tmp)?;
    }
    fs::rename(&tmp, path).ctx("rename", path)?;
    sync_parent(path)
}

/// `dir/.name.tmp` for `dir/name`.
pub fn tmp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(crate::layout::tmp_file_name(&name))
}

/// fsync the directory that holds `path`, so a rename in it survives a crash.
pub fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).ctx("open", dir)?;
    d.sync_all().ctx("fsync", dir)
}

/// XXH3-128 of a whole file, read in large sequential chunks.
pub fn hash_file(path: &Path) -> Result<u128> {
    hash_file_progress(path, &crate::job::Progress::default())
}

/// [`hash_file`], counting the bytes read in `progress` and stopping with `Error::Cancelled`
/// within one 8 MiB read of `progress.cancel` being set.
pub fn hash_file_progress(path: &Path, progress: &crate::job::Progress) -> Result<u128> {
    use std::io::Read;
    let mut f = File::open(path).ctx("open", path)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        progress.check()?;
        let n = f.read(&mut buf).ctx("read", path)?;
        if n == 0 {
            return Ok(h.digest128());
        }
        progress.add(0, n as u64);
        h.update(&buf[..n]);
    }
}

/// Opens `path` for reading without ever blocking in the open (`O_NONBLOCK`: a FIFO with no
/// writer would block forever; `O_NOCTTY`: a terminal is never made ours) and returns it with
/// its `fstat`. Symlinks are followed: the metadata is the final target's. `O_NONBLOCK` is
/// cleared again on a regular file, so reads behave as usual.
pub fn open_read_nonblocking(path: &Path) -> std::io::Result<(File, fs::Metadata)> {
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC).open(path)?;
    let md = f.metadata()?;
    if md.is_file() {
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
    }
    Ok((f, md))
}

/// What a file that is not a regular file is, for an error message ("a FIFO (named pipe)").
pub fn file_kind(md: &fs::Metadata) -> &'static str {
    let t = md.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}
