//! Python bindings (`packds._core`). The only code that names pyo3: each function extracts
//! arguments, runs the core with the GIL released where the work is more than a copy, and maps
//! errors to the exceptions defined in `python/packds/errors.py`.

mod errors;
mod stage;
mod tarindex;

use crate::pack::{self as core_pack, PackOptions, Progress};
use crate::read::{OpenOptionsPds, Reader};
use crate::walk::OnError;
use errors::to_py;
use pyo3::exceptions::{PyIndexError, PyKeyError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// An opened dataset (use `packds.open`). Immutable and safe to share between threads; after a
/// fork the child keeps using the same mappings.
#[pyclass(frozen, subclass, name = "Reader", module = "packds._core")]
pub struct PyReader {
    inner: Arc<Reader>,
    path: PathBuf,
    /// `open(..., verify=True)`: every read checks the sample's CRC32C.
    check: bool,
}

/// Decoding at least this many bytes releases the GIL; below, releasing costs more than it frees.
const DETACH_BYTES: u64 = 64 << 10;

impl PyReader {
    fn norm(&self, i: isize) -> PyResult<usize> {
        let n = self.inner.len() as isize;
        let j = if i < 0 { i + n } else { i };
        if j < 0 || j >= n {
            return Err(PyIndexError::new_err(format!("sample index {i} out of range ({n} samples)")));
        }
        Ok(j as usize)
    }

    fn key_of<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyAny>> {
        let k = self.inner.key(i).map_err(to_py)?;
        match std::str::from_utf8(k) {
            Ok(s) => Ok(PyString::new(py, s).into_any()),
            // Like os.fsdecode: undecodable bytes become lone surrogates and round-trip.
            Err(_) => PyBytes::new(py, k).call_method1("decode", ("utf-8", "surrogateescape")),
        }
    }

    fn find(&self, key: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
        let owned;
        let bytes: &[u8] = if let Ok(s) = key.cast::<PyString>() {
            match s.to_cow() {
                Ok(c) => {
                    owned = c.into_owned().into_bytes();
                    &owned
                }
                Err(_) => {
                    owned = s.call_method1("encode", ("utf-8", "surrogateescape"))?.extract::<Vec<u8>>()?;
                    &owned
                }
            }
        } else if let Ok(b) = key.cast::<PyBytes>() {
            b.as_bytes()
        } else {
            return Err(PyTypeError::new_err("a key is a str (or bytes)"));
        };
        self.inner.find(bytes).map_err(to_py)
    }

    fn sample<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyBytes>> {
        let e = self.inner.entry(i).map_err(to_py)?;
        if e.codec == crate::codec::RAW && !self.check {
            let b = PyBytes::new(py, &self.inner.stored(&e).map_err(to_py)?);
            self.inner.check_intact(e.shard).map_err(to_py)?;
            return Ok(b);
        }
        let r = &*self.inner;
        let check = self.check;
        // Before allocating the output: a frame or index that lies about the size costs nothing.
        if let Err(err) = r.precheck(i) {
            return Err(to_py(if check { r.get_checked(i).err().unwrap_or(err) } else { err }));
        }
        let decode = move |buf: &mut [u8]| if check { r.read_into_checked(i, buf) } else { r.read_into(i, buf) };
        PyBytes::new_with(py, e.raw as usize, |buf| if e.raw >= DETACH_BYTES { py.detach(|| decode(buf)) } else { decode(buf) }.map_err(to_py))
    }
}

#[pymethods]
impl PyReader {
    /// Opens the dataset directory `path`. O(shards): the index is mapped, not parsed.
    #[new]
    #[pyo3(signature = (path, *, populate=false, verify=false))]
    fn new(py: Python<'_>, path: PathBuf, populate: bool, verify: bool) -> PyResult<Self> {
        let p = path.clone();
        let r = py.detach(move || Reader::open_with(&p, OpenOptionsPds { populate })).map_err(to_py)?;
        Ok(PyReader { inner: Arc::new(r), path, check: verify })
    }

    /// Whether every read checks the sample's CRC32C (`open(..., verify=True)`).
    #[getter]
    fn verifies(&self) -> bool {
        self.check
    }

    /// The dataset directory.
    #[getter]
    fn path(&self) -> std::ffi::OsString {
        self.path.clone().into_os_string()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// `ds[i]` (negative counts from the end) or `ds[key]` → the sample's bytes.
    /// The GIL is held: a warm copy is faster than releasing and retaking it.
    fn __getitem__<'py>(&self, py: Python<'py>, idx: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        if let Ok(i) = idx.extract::<isize>() {
            return self.sample(py, self.norm(i)?);
        }
        match self.find(idx)? {
            Some(i) => self.sample(py, i),
            None => Err(PyKeyError::new_err(idx.clone().unbind())),
        }
    }

    /// Bytes of many samples in one call, GIL released while the bytes are copied (and
    /// decompressed: compressed samples of a large batch are decoded by several threads).
    fn get_many<'py>(&self, py: Python<'py>, indices: Vec<isize>) -> PyResult<Bound<'py, PyList>> {
        let mut objs = Vec::with_capacity(indices.len());
        let mut jobs: Vec<(usize, usize, usize, bool)> = Vec::with_capacity(indices.len());
        let mut work = 0u64;
        for &i in &indices {
            let j = self.norm(i)?;
            let e = self.inner.entry(j).map_err(to_py)?;
            if let Err(err) = self.inner.precheck(j) {
                return Err(to_py(if self.check { self.inner.get_checked(j).err().unwrap_or(err) } else { err }));
            }
            let len = e.raw as usize;
            // SAFETY: a new bytes object with uninitialised contents, filled below before any
            // Python code can see it; we hold the only reference until then.
            let obj = unsafe {
                let p = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), len as pyo3::ffi::Py_ssize_t);
                Bound::from_owned_ptr_or_err(py, p)?
            };
            // SAFETY: `obj` is a bytes object; PyBytes_AsString returns its buffer.
            let buf = unsafe { pyo3::ffi::PyBytes_AsString(obj.as_ptr()) } as usize;
            let coded = e.codec != crate::codec::RAW;
            if coded {
                work += e.raw;
            }
            jobs.push((j, buf, len, coded));
            objs.push(obj);
        }
        let reader = &*self.inner;
        let check = self.check;
        let fill = |job: &(usize, usize, usize, bool)| -> crate::Result<()> {
            let &(j, buf, len, coded) = job;
            if !coded && !check {
                let e = reader.entry(j)?;
                let src = reader.stored(&e)?;
                // SAFETY: `buf` points at `len` writable bytes of a bytes object kept alive by
                // `objs` on the caller's stack; no other thread writes it.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), buf as *mut u8, len.min(src.len())) };
                return reader.check_intact(e.shard);
            }
            // SAFETY: as above; zeroed first so the slice is initialised memory.
            let dst = unsafe {
                std::ptr::write_bytes(buf as *mut u8, 0, len);
                std::slice::from_raw_parts_mut(buf as *mut u8, len)
            };
            if check {
                reader.read_into_checked(j, dst)
            } else {
                reader.read_into(j, dst)
            }
        };
        let res: crate::Result<()> = py.detach(|| {
            let threads = if work >= 16 * DETACH_BYTES { std::thread::available_parallelism().map_or(1, |n| n.get()).min(8) } else { 1 };
            if threads <= 1 || jobs.len() < 2 {
                return jobs.iter().try_for_each(fill);
            }
            let next = std::sync::atomic::AtomicUsize::new(0);
            let first_err: std::sync::Mutex<Option<crate::Error>> = std::sync::Mutex::new(None);
            let run = || loop {
                let k = next.fetch_add(1, Relaxed);
                if k >= jobs.len() {
                    return;
                }
                if let Err(e) = fill(&jobs[k]) {
                    first_err.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                    next.store(jobs.len(), Relaxed);
                }
            };
            std::thread::scope(|sc| {
                for _ in 1..threads {
                    let _ = std::thread::Builder::new().name("packds-decode".into()).spawn_scoped(sc, run);
                }
                run();
            });
            match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some(e) => Err(e),
                None => Ok(()),
            }
        });
        res.map_err(to_py)?;
        PyList::new(py, objs)
    }

    /// The stored bytes of sample `i` (the zstd frame of a compressed sample; the same as
    /// `ds[i]` for one stored raw).
    fn raw<'py>(&self, py: Python<'py>, i: isize) -> PyResult<Bound<'py, PyBytes>> {
        let j = self.norm(i)?;
        let e = self.inner.entry(j).map_err(to_py)?;
        let b = PyBytes::new(py, &self.inner.stored(&e).map_err(to_py)?);
        self.inner.check_intact(e.shard).map_err(to_py)?;
        Ok(b)
    }

    /// Stored size of sample `i` (equal to `size(i)` unless it is compressed).
    fn stored_size(&self, i: isize) -> PyResult<u64> {
        let j = self.norm(i)?;
        self.inner.stored_size(j).map_err(to_py)
    }

    /// How sample `i` is stored: 0 raw, 1 zstd, 2 zstd with the dataset's dictionary.
    fn _codec(&self, i: isize) -> PyResult<u8> {
        let j = self.norm(i)?;
        Ok(self.inner.entry(j).map_err(to_py)?.codec)
    }

    /// The dataset's zstd dictionary (bytes), or None.
    fn zstd_dict<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.inner.index().dict().map(|d| PyBytes::new(py, d))
    }

    /// Index format version (1: all samples stored raw; 2: with a codec section).
    #[getter]
    fn format_version(&self) -> u32 {
        self.inner.index().version()
    }

    /// Sample `i`'s bytes after checking its CRC32C (raises ChecksumError).
    fn get_checked<'py>(&self, py: Python<'py>, i: isize) -> PyResult<Bound<'py, PyBytes>> {
        let j = self.norm(i)?;
        let b = self.inner.get_checked(j).map_err(to_py)?;
        Ok(PyBytes::new(py, &b))
    }

    /// Key of sample `i` as str (decoded like os.fsdecode).
    fn key<'py>(&self, py: Python<'py>, i: isize) -> PyResult<Bound<'py, PyAny>> {
        let j = self.norm(i)?;
        self.key_of(py, j)
    }

    /// Key of sample `i` as raw bytes.
    fn key_bytes<'py>(&self, py: Python<'py>, i: isize) -> PyResult<Bound<'py, PyBytes>> {
        let j = self.norm(i)?;
        Ok(PyBytes::new(py, self.inner.key(j).map_err(to_py)?))
    }

    /// Position of `key` (str or bytes); KeyError if absent. O(log n).
    fn index(&self, key: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.find(key)?.ok_or_else(|| PyKeyError::new_err(key.clone().unbind()))
    }

    /// Position of `key`, or None.
    fn find_key(&self, key: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
        self.find(key)
    }

    /// Size in bytes of sample `i` (its original size: `len(ds[i])`).
    fn size(&self, i: isize) -> PyResult<u64> {
        let j = self.norm(i)?;
        self.inner.size(j).map_err(to_py)
    }

    /// (shard path, byte offset, size) of sample `i`.
    fn locate(&self, i: isize) -> PyResult<(std::ffi::OsString, u64, u64)> {
        let j = self.norm(i)?;
        let (p, o, n) = self.inner.locate(j).map_err(to_py)?;
        Ok((p.into_os_string(), o, n))
    }

    /// (shard number, byte offset, size) of sample `i` — for zero-copy views.
    fn _loc(&self, i: isize) -> PyResult<(u32, u64, u64)> {
        let j = self.norm(i)?;
        let e = self.inner.index().entry(j).map_err(to_py)?;
        Ok((e.shard, e.offset, e.size))
    }

    /// Path of shard number `s`.
    fn _shard_path(&self, s: usize) -> PyResult<std::ffi::OsString> {
        let sh = self.inner.index().shards().get(s).ok_or_else(|| PyIndexError::new_err(format!("no shard {s}")))?;
        Ok(self.inner.dir().join(&sh.name).into_os_string())
    }

    /// Positions of the keys matching a glob pattern (same syntax as `pack --include`).
    fn glob(&self, py: Python<'_>, pattern: &str) -> PyResult<Vec<usize>> {
        let g = globset::Glob::new(pattern)
            .map_err(|e| to_py(crate::Error::usage(format!("bad pattern {pattern:?}: {e}"), "see the glob syntax: * ? [abc] {a,b} **")))?
            .compile_matcher();
        let r = &*self.inner;
        py.detach(|| {
            let mut out = Vec::new();
            for i in 0..r.len() {
                let k = r.key(i)?;
                if g.is_match(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(k)) {
                    out.push(i);
                }
            }
            Ok(out)
        })
        .map_err(to_py)
    }

    /// The manifest, as JSON text.
    fn manifest_json(&self) -> PyResult<String> {
        serde_json::to_string(self.inner.manifest()).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Full check (index, shard checksums, every raw sample's CRC32C; with `deep`, every
    /// compressed sample decoded and checked too); GIL released. Returns a dict with `samples`,
    /// `shards`, `bytes`, `decoded`, `problems` (a list of messages; empty when all is well).
    #[pyo3(signature = (threads=4, deep=false))]
    fn verify<'py>(&self, py: Python<'py>, threads: usize, deep: bool) -> PyResult<Bound<'py, PyDict>> {
        let r = &*self.inner;
        let rep = py.detach(|| r.verify_with(threads, deep)).map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("samples", rep.samples)?;
        d.set_item("decoded", rep.decoded)?;
        d.set_item("shards", rep.shards)?;
        d.set_item("bytes", rep.bytes)?;
        d.set_item("problems", rep.problems)?;
        Ok(d)
    }

    /// Extracts every sample under `dest`; GIL released. Returns the number of files.
    fn unpack(&self, py: Python<'_>, dest: PathBuf) -> PyResult<u64> {
        let r = &*self.inner;
        py.detach(|| r.unpack(&dest)).map_err(to_py)
    }
}

/// Packs `sources` into the dataset directory `output`. Runs on a worker thread with the GIL
/// released; `progress(phase, files_done, files_total, bytes_done)` is called about ten times a
/// second. Ctrl-C cancels cleanly (completed shards stay for `resume=True`).
#[pyfunction]
#[pyo3(signature = (sources, output, *, shard_size=core_pack::DEFAULT_SHARD_SIZE, threads=0, follow_symlinks=false,
    include=vec![], exclude=vec![], on_error="fail", force=false, resume=false, options_json=None, progress=None,
    compress="none", zstd_dict=0, format="tar", h5_writer=None, part=None, plan=None, make_plan=false))]
#[allow(clippy::too_many_arguments)]
fn pack<'py>(
    py: Python<'py>,
    sources: Vec<PathBuf>,
    output: PathBuf,
    shard_size: u64,
    threads: usize,
    follow_symlinks: bool,
    include: Vec<String>,
    exclude: Vec<String>,
    on_error: &str,
    force: bool,
    resume: bool,
    options_json: Option<String>,
    progress: Option<Bound<'py, PyAny>>,
    compress: &str,
    zstd_dict: usize,
    format: &str,
    h5_writer: Option<Bound<'py, PyAny>>,
    part: Option<(u32, u32)>,
    plan: Option<PathBuf>,
    make_plan: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let on_error = match on_error {
        "fail" => OnError::Fail,
        "skip" => OnError::Skip,
        other => return Err(PyValueError::new_err(format!("on_error must be 'fail' or 'skip', not {other:?}"))),
    };
    let mut opts = PackOptions::new(sources, output);
    opts.shard_size = shard_size;
    opts.threads = threads;
    opts.follow_symlinks = follow_symlinks;
    opts.include = include;
    opts.exclude = exclude;
    opts.on_error = on_error;
    opts.force = force;
    opts.resume = resume;
    opts.compress = crate::codec::Compress::parse(compress).ok_or_else(|| {
        to_py(crate::Error::usage(
            format!("--compress {compress:?} is not understood"),
            "use none, zstd, zstd:LEVEL (1..22, negative for faster), auto or auto:LEVEL",
        ))
    })?;
    opts.dict_size = zstd_dict;
    opts.part = part;
    opts.plan = plan;
    opts.format = match format {
        "tar" => core_pack::ShardFormat::Tar,
        "h5" | "hdf5" => core_pack::ShardFormat::H5,
        other => return Err(to_py(crate::Error::usage(format!("--format {other:?} is not known"), "use tar or h5"))),
    };
    if let Some(w) = h5_writer {
        let cb: Py<PyAny> = w.unbind();
        opts.h5_writer = Some(core_pack::H5Writer(Arc::new(move |spec: &core_pack::H5Shard| -> crate::Result<u64> {
            Python::attach(|py| {
                let b = |v: &[u8]| PyBytes::new(py, v);
                let args = (
                    spec.path.to_path_buf(),
                    spec.data_len,
                    (b(&spec.offsets), b(&spec.sizes), b(&spec.raw_sizes), b(&spec.codecs), b(&spec.crcs), b(spec.keys), b(&spec.key_offsets)),
                    b(spec.dict),
                    spec.compression.as_str(),
                );
                cb.call1(py, args)?.extract::<u64>(py)
            })
            .map_err(|e: PyErr| {
                let errno = Python::attach(|py| e.value(py).getattr("errno").ok().and_then(|v| v.extract::<i32>().ok()));
                let msg = Python::attach(|py| e.value(py).to_string());
                match errno {
                    Some(n) => crate::Error::io("write HDF5 shard", spec.path, std::io::Error::from_raw_os_error(n)),
                    None => crate::Error::io("write HDF5 shard", spec.path, std::io::Error::other(msg)),
                }
            })
        })));
    }
    opts.options_json = match options_json {
        Some(s) => serde_json::from_str(&s).map_err(|e| PyValueError::new_err(format!("options_json: {e}")))?,
        None => serde_json::Value::Null,
    };
    if make_plan {
        let out = opts.output.clone();
        let (files, shards, bytes, skipped, size) = run_cancellable(py, progress.as_ref(), move |st| {
            let plan = crate::plan::make_plan(&opts, st, None)?;
            let size = crate::plan::write_plan(&plan, &out)?;
            Ok((plan.files.len(), plan.cuts.len(), plan.bytes, plan.skipped, size))
        })?;
        let d = PyDict::new(py);
        d.set_item("files", files)?;
        d.set_item("shards", shards)?;
        d.set_item("bytes", bytes)?;
        d.set_item("plan_bytes", size)?;
        let sk = PyList::empty(py);
        for x in &skipped {
            sk.append((x.path.as_str(), x.reason.as_str()))?;
        }
        d.set_item("skipped", sk)?;
        return Ok(d);
    }
    let s = run_cancellable(py, progress.as_ref(), move |st| core_pack::pack(&opts, st))?;
    let d = PyDict::new(py);
    d.set_item("output", s.output)?;
    d.set_item("files", s.files)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("shards", s.shards)?;
    d.set_item("resumed_shards", s.resumed_shards)?;
    d.set_item("seconds", s.seconds)?;
    d.set_item("already_complete", s.already_complete)?;
    let sk = PyList::empty(py);
    for x in &s.skipped {
        sk.append((x.path.as_str(), x.reason.as_str()))?;
    }
    d.set_item("skipped", sk)?;
    Ok(d)
}

/// Joins the finished parts of a partitioned pack in `output` into one dataset (GIL released).
#[pyfunction]
fn merge<'py>(py: Python<'py>, output: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let s = py.detach(|| crate::plan::merge(&output)).map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("parts", s.parts)?;
    d.set_item("samples", s.samples)?;
    d.set_item("shards", s.shards)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("already_merged", s.already_merged)?;
    Ok(d)
}

/// Runs `job` on a worker thread with the GIL released; every 100 ms checks for signals
/// (Ctrl-C cancels the job cleanly) and calls `progress(phase, done, total, bytes)`.
pub(crate) fn run_cancellable<T: Send + 'static>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyAny>>,
    job: impl FnOnce(&Progress) -> crate::Result<T> + Send + 'static,
) -> PyResult<T> {
    let state = Arc::new(Progress::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let rx = std::sync::Mutex::new(rx);
    let st = state.clone();
    let handle = std::thread::Builder::new()
        .name("packds-pack".into())
        .spawn(move || {
            let r = job(&st);
            let _ = tx.send(r);
        })
        .map_err(|e| PyValueError::new_err(format!("cannot start the pack thread: {e}")))?;
    let result = loop {
        let got = py.detach(|| rx.lock().map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected)?.recv_timeout(Duration::from_millis(100)));
        match got {
            Ok(r) => break r,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(crate::Error::format(".", "the pack thread stopped unexpectedly"));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        let cb = py.check_signals().and_then(|_| match &progress {
            Some(cb) => cb
                .call1((state.phase.load(Relaxed), state.files_done.load(Relaxed), state.files_total.load(Relaxed), state.bytes_done.load(Relaxed)))
                .map(|_| ()),
            None => Ok(()),
        });
        if let Err(e) = cb {
            state.cancel.store(true, Relaxed);
            py.detach(|| {
                if let Ok(rx) = rx.lock() {
                    let _ = rx.recv();
                }
            });
            let _ = handle.join();
            return Err(e);
        }
    };
    let _ = handle.join();
    result.map_err(to_py)
}

#[pymodule(name = "_core")]
mod core_module {
    #[pymodule_export]
    use super::merge;
    #[pymodule_export]
    use super::pack;
    #[pymodule_export]
    use super::stage::{preload, stage_dataset, stage_file, PyStageProgress};
    #[pymodule_export]
    use super::tarindex::{index_tars, PyGroups};
    #[pymodule_export]
    use super::PyReader;

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        m.add("__version__", crate::VERSION)?;
        m.add("INDEX_FORMAT_VERSION", crate::index::VERSION)?;
        m.add("FAULT_INJECTION", crate::fault::ENABLED)?;
        Ok(())
    }
}
