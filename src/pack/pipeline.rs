//! The pack pipeline: I/O threads read files in chunks of [`CHUNK`] consecutive files into an
//! ordered [`Window`]; the calling thread takes the chunks in key order and lays the members
//! into shards through a [`ShardWriter`].
//!
//! Memory: the window holds at most `slots * CHUNK` files of at most `small_max` bytes each
//! (about [`INFLIGHT_BYTES`] in all); larger files are streamed by the writer.

use super::member::{read_one, Item, WorkerState};
use super::remove::Remover;
use super::window::Window;
use super::writer::{Completed, ShardWriter};
use super::{PackOptions, Progress, INFLIGHT_BYTES};
use crate::error::{Error, Result};
use crate::fault;
use crate::pool;
use crate::walk::{EmptyDir, FileList, OnError, Skipped, SourceRoot};
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

/// Files are handed from the I/O threads to the writer in chunks of this many consecutive files
/// (one lock round-trip and at most one wake-up per chunk, not per file).
const CHUNK: usize = 8;

/// What the pipeline packs: files `start..end` (`start` is past any resumed shards;
/// `first_file` is where this pack's range begins), shards numbered from `first_shard`, cut
/// at a plan's `cuts` when given, else by size.
pub(super) struct PipeRange<'a> {
    pub start: usize,
    pub end: usize,
    pub first_file: usize,
    pub first_shard: usize,
    pub cuts: Option<&'a [u64]>,
}

/// One run of the pipeline over `range` of `files`.
pub(super) struct Pipeline<'a> {
    pub opts: &'a PackOptions,
    pub progress: &'a Progress,
    pub roots: &'a [SourceRoot],
    pub files: &'a FileList,
    pub dict: &'a [u8],
    pub range: PipeRange<'a>,
    /// `--remove-source`.
    pub remover: Option<&'a Remover<'a>>,
    /// Written at the end of the last shard (tar): given only to the pack that writes it.
    pub empty_dirs: &'a [EmptyDir],
}

/// Member buffers go back from the writer to the I/O threads: no allocation, no fresh pages to
/// fault in, per file.
struct Buffers {
    free: Mutex<Vec<Vec<u8>>>,
    cap: usize,
}

impl Buffers {
    fn get(&self) -> Vec<u8> {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default()
    }

    fn put(&self, b: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.cap {
            free.push(b);
        }
    }
}

impl Pipeline<'_> {
    /// Packs the range: completed shards go to `done`, files passed over to `skipped`. Returns
    /// how many files were written.
    pub fn run(&self, done: Completed, skipped: &mut Vec<Skipped>) -> Result<u64> {
        let threads = self.opts.threads.clamp(1, 256);
        let n = self.range.end - self.range.start;
        let slots = (threads * 2 + 4).min(1024);
        let small_max = (INFLIGHT_BYTES / (slots * CHUNK)).clamp(64 << 10, 8 << 20) as u64;
        let window = Window::new(slots, n.div_ceil(CHUNK));
        let bufs = Buffers { free: Mutex::new(Vec::new()), cap: slots * CHUNK };
        let worker = || self.read_chunks(&window, &bufs, small_max);
        pool::with_some_workers(threads.min(n).max(1), "packds-io", "I/O", "lower --threads", &worker, || {
            let writer =
                ShardWriter::new(self.opts, self.dict, self.range.cuts.is_none(), self.range.first_shard, self.empty_dirs, done).with_remover(self.remover);
            let r = self.write_all(&window, &bufs, writer, skipped);
            window.stop();
            r
        })
    }

    /// An I/O thread: fills chunks until none is left (or the writer stopped).
    fn read_chunks(&self, window: &Window<Vec<Item>>, bufs: &Buffers, small_max: u64) {
        let mut ws = WorkerState::new(self.opts, self.dict);
        while let Some(c) = window.claim() {
            let a = self.range.start + c * CHUNK;
            let items = (a..(a + CHUNK).min(self.range.end)).map(|i| self.read_item(i, &mut ws, bufs, small_max)).collect();
            window.publish(c, items);
        }
    }

    /// Reads file `i`; `--on-error skip` turns what can be skipped into [`Item::Skip`].
    fn read_item(&self, i: usize, ws: &mut WorkerState, bufs: &Buffers, small_max: u64) -> Item {
        let path = self.files.path(i, self.roots);
        if self.progress.cancel.load(Relaxed) {
            return Item::Fail(Error::Cancelled);
        }
        fault::slow_read();
        let skip = self.opts.on_error == OnError::Skip;
        match read_one(self.opts, &path, self.files.key(i), small_max, bufs.get(), ws) {
            Ok(it) => it,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound && skip => {
                Item::Skip(Skipped { path: path.display().to_string(), reason: "deleted while packing".into() })
            }
            Err(e) if skip && !matches!(e, Error::NoSpace { .. }) => Item::Skip(Skipped { path: path.display().to_string(), reason: e.to_string() }),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Item::Fail(Error::Changed { path: path.clone(), what: "it was deleted".into() })
            }
            Err(e) => Item::Fail(e),
        }
    }

    /// The writer: takes the files in order and writes them; a plan's boundaries cut shards.
    fn write_all(&self, window: &Window<Vec<Item>>, bufs: &Buffers, mut w: ShardWriter, skipped: &mut Vec<Skipped>) -> Result<u64> {
        let (start, progress) = (self.range.start, self.progress);
        let mut pending = VecDeque::new();
        let mut written = 0u64;
        for i in start..self.range.end {
            if pending.is_empty() {
                pending.extend(window.take((i - start) / CHUNK));
            }
            let item = pending.pop_front().ok_or_else(|| Error::format(&self.opts.output, "internal: pack pipeline out of step"))?;
            if progress.cancel.load(Relaxed) {
                return Err(Error::Cancelled);
            }
            if self.range.cuts.is_some_and(|c| i > self.range.first_file && c.binary_search(&(i as u64)).is_ok()) {
                w.cut()?; // the shard so far is complete
            }
            let key = self.files.key(i);
            let size = match item {
                Item::Small(m) => {
                    w.accept_small(key, &m)?;
                    bufs.put(m.member);
                    m.meta.size
                }
                Item::Large(l) => {
                    let size = l.meta.size;
                    if let Some(s) = w.accept_large(key, l)? {
                        skipped.push(s);
                        continue;
                    }
                    size
                }
                Item::Skip(s) => {
                    skipped.push(s);
                    continue;
                }
                Item::Fail(e) => return Err(e),
            };
            written += 1;
            progress.files_done.store((i + 1 - self.range.first_file) as u64, Relaxed);
            progress.bytes_done.fetch_add(size, Relaxed);
            fault::kill_after_files(written);
        }
        w.close()?;
        Ok(written)
    }
}
