//! Writing a dataset sample by sample (the Python `packds.Writer`): the same shards, index and
//! manifest as a pack, from bytes (or files) handed over one at a time.
//!
//! The caller's thread checksums, compresses and lays out each member (with the GIL released
//! for large samples) and hands it over a bounded channel to a writer thread, which owns the
//! [`ShardWriter`]: shards are cut by size, fsynced and renamed as a pack does. Closing writes
//! the index and then the manifest, last. Samples added in increasing key order make exactly the
//! dataset `pack` would make of the same keys and bytes; in any other order the index is sorted
//! by key over data in the order it was added (the unordered index `packds index` writes).
//! Until the manifest is written the directory holds a pack state, and `open` refuses it; an
//! abort (or an error) removes what was written.

use super::member::{force_compress, member_name, meta_of, Large, Shape, Small};
use super::stamp::Stamp;
use super::writer::{Completed, ShardWriter};
use super::{planned_len, state_options_for, PackOptions, ShardFormat, StateOptions, STATE_DIR, STATE_OPTIONS};
use crate::codec::{self, Encoder};
use crate::error::{Error, IoContext, Result};
use crate::fsx;
use crate::index::Index;
use crate::layout::{self, Mode, OutputDir, Prepared};
use crate::manifest::{self, ShardRecord};
use crate::tar::{self, Meta};
use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::Instant;

/// Members in flight between the caller and the writer thread.
const QUEUE: usize = 32;

/// What the writer thread made: the completed shards' indexes and records.
type Written = (Vec<Index>, Vec<ShardRecord>);

/// What the writer thread is handed: members with the caller's mark (see
/// [`SampleWriter::set_mark`]), or the order to stop without completing the open shard.
enum Msg {
    Small(Vec<u8>, Small, u64),
    Large(Vec<u8>, Large, u64),
    Suspend,
}

/// What closing a writer reports.
#[derive(Debug, Clone, PartialEq)]
pub struct WriterSummary {
    pub output: PathBuf,
    pub samples: u64,
    pub bytes: u64,
    pub stored_bytes: u64,
    pub shards: u64,
    /// The samples came in increasing key order (the data follows the keys, as in a pack).
    pub ordered: bool,
    pub seconds: f64,
}

/// A dataset being written sample by sample. Dropping it without [`SampleWriter::close`]
/// aborts: the directory is removed (or emptied, if it existed).
pub struct SampleWriter {
    opts: PackOptions,
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<Result<Written>>>,
    dir: Option<OutputDir>,
    enc: Option<Encoder>,
    seen: HashSet<Box<[u8]>>,
    /// Keys of the completed shards a resumed writer kept: adding one again is a no-op.
    resumed: HashSet<Box<[u8]>>,
    /// The completed shards' indexes and records a resumed writer kept.
    kept: Written,
    /// The mark of the last completed shard a resumed writer kept.
    resume_mark: Option<u64>,
    mark: u64,
    last: Option<Box<[u8]>>,
    ordered: bool,
    mtime: i64,
    samples: u64,
    bytes: u64,
    t0: Instant,
}

impl SampleWriter {
    /// Starts writing the dataset `opts.output` (which must not exist, or `opts.force`).
    /// Samples get `mtime` as their tar modification time (default 0: the output depends only
    /// on the samples), mode 0644, owner 0.
    pub fn create(opts: PackOptions, mtime: i64) -> Result<SampleWriter> {
        Self::create_resuming(opts, mtime, false)
    }

    /// [`SampleWriter::create`]; with `resume`, a writer into `opts.output` that stopped
    /// (killed, or [`SampleWriter::suspend`]ed) with the same options is continued: its
    /// completed shards are kept (those with their mark recorded), adding a key they hold again
    /// does nothing, and [`SampleWriter::resume_mark`] is the mark of the last of them.
    pub fn create_resuming(opts: PackOptions, mtime: i64, resume: bool) -> Result<SampleWriter> {
        if opts.format == ShardFormat::H5 && opts.h5_writer.is_none() {
            return Err(Error::usage("HDF5 shards are written through h5py", "use the packds Python package, which has h5py"));
        }
        if opts.shard_size < 4096 {
            return Err(Error::usage(format!("shard size {} is too small", opts.shard_size), "use at least 4 KiB (default 1 GiB)"));
        }
        let out = opts.output.clone();
        let state = out.join(STATE_DIR);
        let options_path = state.join(STATE_OPTIONS);
        let want = state_options_for(&opts, Vec::new());
        let resuming = resume && !out.join(layout::MANIFEST_FILE).exists() && manifest::read_json::<StateOptions>(&options_path).is_ok_and(|o| o == want);
        let mode = if resuming { Mode::pack(false, true) } else { Mode::index(opts.force) };
        let dir = match OutputDir::prepare(&out, mode)? {
            Prepared::Open(dir) => dir,
            Prepared::Complete(_) => {
                return Err(Error::usage(format!("{} is already complete", out.display()), "open it with packds.open(), or pass force=True to write it again"))
            }
        };
        let kept = if resuming { kept_shards(&opts)? } else { (Vec::new(), Vec::new(), None) };
        if !resuming {
            if state.exists() {
                fs::remove_dir_all(&state).ctx("remove", &state)?;
            }
            fs::create_dir(&state).ctx("create directory", &state)?;
            fsx::write_atomic(&options_path, &manifest::json_bytes(&want, false, &options_path)?)?;
            fsx::sync_dir(&out)?;
        }
        let (parts, records, resume_mark) = kept;
        let mut resumed = HashSet::new();
        let mut last: Option<Box<[u8]>> = None;
        let mut ordered = true;
        for p in &parts {
            for i in 0..p.len() {
                let k = p.key(i)?;
                if last.as_deref().is_some_and(|l| l >= k) {
                    ordered = false;
                }
                last = Some(k.into());
                resumed.insert(k.into());
            }
        }
        let first = parts.len();
        let (tx, rx) = sync_channel(QUEUE);
        let thread_opts = opts.clone();
        let thread = std::thread::Builder::new()
            .name("packds-writer".into())
            .spawn(move || write_shards(&thread_opts, rx, first))
            .map_err(|e| Error::io("start thread", &out, e))?;
        let enc = (!opts.compress.is_none()).then(|| Encoder::new(opts.compress, None));
        Ok(SampleWriter {
            opts,
            tx: Some(tx),
            thread: Some(thread),
            dir: Some(dir),
            enc,
            seen: HashSet::new(),
            resumed,
            kept: (parts, records),
            resume_mark,
            mark: 0,
            last,
            ordered,
            mtime,
            samples: 0,
            bytes: 0,
            t0: Instant::now(),
        })
    }

    /// The mark of the last completed shard a resumed writer kept (None: nothing was kept).
    /// [`packds.build`] marks each sample with its input's position, and resumes from there.
    pub fn resume_mark(&self) -> Option<u64> {
        self.resume_mark
    }

    /// The samples a resumed writer kept.
    pub fn resumed_samples(&self) -> u64 {
        self.resumed.len() as u64
    }

    /// Marks the samples added from now on with `mark` (non-decreasing); a completed shard
    /// records the mark of its last sample.
    pub fn set_mark(&mut self, mark: u64) {
        self.mark = mark;
    }

    /// Stops writing but keeps the completed shards (and their marks) for a writer created
    /// with `resume` later: the open shard is dropped. Nothing that opens is left.
    pub fn suspend(mut self) -> Result<()> {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::Suspend);
        }
        let joined = self.thread.take().map(|t| t.join());
        drop(self.dir.take()); // unlocked, not removed
        match joined {
            Some(Ok(r)) => r.map(|_| ()),
            _ => Err(Error::format(&self.opts.output, "the writer thread stopped unexpectedly")),
        }
    }

    /// Checks `key` (a safe relative path, not seen before) and notes whether keys still come in
    /// increasing order.
    fn claim(&mut self, key: &[u8]) -> Result<bool> {
        if self.resumed.contains(key) {
            return Ok(false);
        }
        let key_str = || String::from_utf8_lossy(key).into_owned();
        crate::read::safe_components(key).map_err(|_| {
            Error::usage(format!("sample key {:?} is not a relative path", key_str()), "keys are relative paths like dir/name.ext, without `..` or a leading /")
        })?;
        if self.seen.contains(key) {
            return Err(Error::DuplicateKey { key: key_str() });
        }
        if self.last.as_deref().is_some_and(|l| l >= key) {
            self.ordered = false;
        }
        self.seen.insert(key.into());
        self.last = Some(key.into());
        Ok(true)
    }

    /// Adds sample `key` with bytes `data`: checksummed, compressed and laid out here (pure
    /// computation, then a hand-over that waits while the writer thread is [`QUEUE`] members
    /// behind). A writer-thread error (disk full, ...) is returned by this call or the next.
    pub fn add(&mut self, key: &[u8], data: &[u8]) -> Result<()> {
        if !self.claim(key)? {
            return Ok(());
        }
        let meta = Meta { size: data.len() as u64, mode: 0o100644, mtime: self.mtime, uid: 0, gid: 0 };
        let format = self.opts.format;
        let tar = format == ShardFormat::Tar;
        let crc = crc32c::crc32c(data);
        let mut frame = Vec::new();
        let codec = match self.enc.as_mut() {
            Some(enc) => enc.encode(data, &mut frame, force_compress(format, key)),
            None => codec::RAW,
        };
        let stored: &[u8] = if codec == codec::RAW { data } else { &frame };
        let mut member = Vec::with_capacity(stored.len() + 1024);
        let hlen = if tar { tar::write_header(&mut member, &member_name(key, codec), &Meta { size: stored.len() as u64, ..meta }) } else { 0 };
        member.extend_from_slice(stored);
        if tar {
            member.resize(member.len() + tar::padding(stored.len() as u64) as usize, 0);
        }
        let small = Small {
            meta,
            stamp: Stamp::of_bytes(data.len() as u64),
            member,
            hlen,
            crc,
            stored: stored.len() as u64,
            codec,
            planned: planned_len(format, key, &meta),
            shape: Shape::default(),
        };
        self.samples += 1;
        self.bytes += data.len() as u64;
        self.send(Msg::Small(key.to_vec(), small, self.mark))
    }

    /// Adds the file at `path` as sample `key`, copied as `pack` copies a file: streamed into
    /// the shard, its mode and mtime kept, read again if it changes meanwhile.
    pub fn add_file(&mut self, key: &[u8], path: &std::path::Path) -> Result<()> {
        if !self.claim(key)? {
            return Ok(());
        }
        let (file, md) = fsx::open_read_nonblocking(path).map_err(|e| Error::io("open", path, e))?;
        if !md.is_file() {
            return Err(Error::usage(format!("{} is not a regular file", path.display()), "add a regular file, or its bytes"));
        }
        self.samples += 1;
        self.bytes += md.len();
        self.send(Msg::Large(key.to_vec(), Large { meta: meta_of(&md), file, path: path.to_path_buf(), shape: Shape::default() }, self.mark))
    }

    fn send(&mut self, m: Msg) -> Result<()> {
        let sent = self.tx.as_ref().map(|tx| tx.send(m).is_ok()).unwrap_or(false);
        if sent {
            return Ok(());
        }
        // The writer thread stopped: its error.
        self.tx = None;
        Err(match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => e,
            _ => Error::usage(format!("the writer of {} is closed", self.opts.output.display()), "open a new packds.Writer"),
        })
    }

    /// Completes the last shard, then writes the index and the manifest (last): the dataset
    /// opens from then on.
    pub fn close(mut self) -> Result<WriterSummary> {
        self.tx = None;
        let joined = self.thread.take().map(|t| t.join());
        let (new_parts, new_records) = match joined {
            Some(Ok(r)) => r?,
            _ => return Err(Error::format(&self.opts.output, "the writer thread stopped unexpectedly")),
        };
        let (mut parts, mut records) = std::mem::take(&mut self.kept);
        parts.extend(new_parts);
        records.extend(new_records);
        if parts.is_empty() {
            return Err(Error::usage(format!("no samples were added to {}", self.opts.output.display()), "add at least one sample before closing"));
        }
        let m = if self.ordered {
            super::finish(&self.opts, parts, &[], records, Vec::new(), super::Tree::default())?
        } else {
            finish_unordered(&self.opts, parts, records)?
        };
        self.dir = None; // complete: dropping the writer no longer removes it
        let stored = m.compression.as_ref().map_or(m.total_bytes, |c| c.stored_bytes);
        Ok(WriterSummary {
            output: self.opts.output.clone(),
            samples: m.samples,
            bytes: m.total_bytes,
            stored_bytes: stored,
            shards: m.shards.len() as u64,
            ordered: self.ordered,
            seconds: self.t0.elapsed().as_secs_f64(),
        })
    }
}

impl Drop for SampleWriter {
    /// Not closed: stop the writer thread and remove everything written.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(dir) = self.dir.take() {
            if dir.created() {
                dir.remove();
            } else {
                let _ = dir.clear();
            }
        }
    }
}

/// The writer thread: every member into shards cut by size, numbered from `first`; returns
/// the completed shards' indexes and records. Each completed shard's mark (that of its last
/// sample) is recorded in the state directory after its per-shard index.
fn write_shards(opts: &PackOptions, rx: Receiver<Msg>, first: usize) -> Result<Written> {
    let (mut parts, mut records, mut extras) = (Vec::new(), Vec::new(), Vec::new());
    let mut w = ShardWriter::new(opts, &[], true, first, &[], Completed { parts: &mut parts, records: &mut records, extras: &mut extras });
    let mut prev_mark = 0u64;
    for m in rx {
        let before = w.completed();
        let mark = match m {
            Msg::Small(key, small, mark) => {
                w.accept_small(&key, &small)?;
                mark
            }
            Msg::Large(key, large, mark) => {
                if let Some(skipped) = w.accept_large(&key, large)? {
                    return Err(Error::usage(skipped.reason, "add it again once it stopped changing"));
                }
                mark
            }
            // Dropping the shard writer removes the open shard; the completed ones stay.
            Msg::Suspend => return Ok((Vec::new(), Vec::new())),
        };
        if w.completed() > before {
            // The member just accepted opened a new shard: the one completed ended with the
            // previous member.
            write_mark(opts, first + w.completed() - 1, prev_mark)?;
        }
        prev_mark = mark;
    }
    w.close()?;
    Ok((parts, records))
}

fn mark_path(opts: &PackOptions, k: usize) -> PathBuf {
    opts.output.join(STATE_DIR).join(format!("{}.mark", layout::state_index_name(k)))
}

fn write_mark(opts: &PackOptions, k: usize, mark: u64) -> Result<()> {
    fsx::write_atomic(&mark_path(opts, k), mark.to_string().as_bytes())
}

/// The completed shards of a stopped writer, in order, as long as each has its per-shard
/// index and its mark; anything after the first gap is written again.
fn kept_shards(opts: &PackOptions) -> Result<(Vec<Index>, Vec<ShardRecord>, Option<u64>)> {
    let (mut parts, mut records, mut mark) = (Vec::new(), Vec::new(), None);
    let mut k = 0;
    while let Some(ix) = super::completed_shard(opts, k)? {
        let Some(m) = fs::read_to_string(mark_path(opts, k)).ok().and_then(|t| t.trim().parse::<u64>().ok()) else { break };
        let info = ix.shards().first().cloned().ok_or_else(|| Error::format(ix.path(), "per-shard index without a shard"))?;
        records.push(ShardRecord { file: info.name.clone(), size: info.size, samples: ix.len() as u64, xxh3_128: manifest::hex128(info.hash) });
        parts.push(ix);
        mark = Some(m);
        k += 1;
    }
    Ok((parts, records, mark))
}

/// The index of samples added in no particular key order: entries sorted by key, each
/// pointing at its data wherever it was written ([`crate::index::FLAG_UNORDERED`]); then the
/// manifest, last.
fn finish_unordered(opts: &PackOptions, parts: Vec<Index>, records: Vec<ShardRecord>) -> Result<manifest::Manifest> {
    let out = &opts.output;
    let ix = crate::index::merge_unordered(&parts, &out.join(layout::INDEX_FILE), !opts.compress.is_none())?;
    drop(parts);
    // An unordered index is format version 2, even with every sample stored raw.
    super::write_manifest(opts, ix, &[], records, Vec::new(), 2, super::Tree::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::Reader;

    fn write(out: &std::path::Path, samples: &[(String, Vec<u8>)], compress: crate::codec::Compress) -> WriterSummary {
        let mut o = PackOptions::new(Vec::new(), out.to_path_buf());
        o.shard_size = 16 << 10;
        o.compress = compress;
        let mut w = SampleWriter::create(o, 0).unwrap();
        for (k, v) in samples {
            w.add(k.as_bytes(), v).unwrap();
        }
        w.close().unwrap()
    }

    #[test]
    fn any_key_order_reads_back_by_key_and_verifies() {
        let d = tempfile::tempdir().unwrap();
        let samples: Vec<(String, Vec<u8>)> = (0..200).map(|i| (format!("k{:03}", (i * 7919) % 200), vec![(i % 251) as u8; i * 13 % 900])).collect();
        for (name, compress) in [("raw", crate::codec::Compress::None), ("zstd", "zstd".parse().unwrap())] {
            let out = d.path().join(name);
            let s = write(&out, &samples, compress);
            assert!(!s.ordered && s.samples == 200 && s.shards > 2);
            let r = Reader::open(&out).unwrap();
            assert!(r.index().is_unordered());
            for (k, v) in &samples {
                let i = r.find(k.as_bytes()).unwrap().unwrap();
                assert_eq!(&r.get_checked(i).unwrap()[..], &v[..]);
            }
            assert!(r.verify_with(2, true).unwrap().problems.is_empty());
        }
    }

    #[test]
    fn a_duplicate_key_is_refused_and_dropping_removes_the_output() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("o");
        let mut w = SampleWriter::create(PackOptions::new(Vec::new(), out.clone()), 0).unwrap();
        w.add(b"a", b"1").unwrap();
        let e = w.add(b"a", b"2").unwrap_err().to_string();
        assert!(e.contains("duplicate sample key \"a\""), "{e}");
        drop(w);
        assert!(!out.exists());
    }
}
