//! `Reader`: the binding of `crate::read::Reader`. Each method converts its arguments, calls
//! the core (with the GIL released where it touches the disk or decodes much), and converts
//! the result.

use super::errors::to_py;
use crate::read::{OpenOptionsPds, Reader};
use arc_swap::{ArcSwapOption, Guard};
use pyo3::exceptions::{PyIndexError, PyKeyError, PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyMemoryView, PySlice, PyString};
use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;

/// An opened dataset (use `packds.open`). Immutable and safe to share between threads; after a
/// fork the child keeps using the same mappings. `close()` drops its reader (mappings and
/// descriptors go once reads in flight on other threads finish); any use after it raises
/// ValueError.
#[pyclass(frozen, subclass, name = "Reader", module = "packds._core")]
pub struct PyReader {
    /// None once closed. Loading it is a few nanoseconds and no lock (arc-swap).
    inner: ArcSwapOption<Reader>,
    pub(crate) path: PathBuf,
    /// `open(..., verify=True)`: every read checks the sample's CRC32C.
    check: bool,
}

/// A key given as str (encoded like os.fsencode) or bytes.
pub(crate) fn key_arg<'a>(key: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    if let Ok(s) = key.cast::<PyString>() {
        return Ok(match s.to_cow() {
            Ok(c) => Cow::Owned(c.into_owned().into_bytes()),
            Err(_) => Cow::Owned(s.call_method1("encode", ("utf-8", "surrogateescape"))?.extract::<Vec<u8>>()?),
        });
    }
    if let Ok(b) = key.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(b.as_bytes()));
    }
    Err(PyTypeError::new_err("a key is a str (or bytes)"))
}

/// A new bytes object of `len` zero bytes and its buffer, to be filled before Python sees it.
fn new_bytes<'py>(py: Python<'py>, len: u64) -> PyResult<(Bound<'py, PyBytes>, &'py mut [u8])> {
    let len = usize::try_from(len).map_err(|_| PyValueError::new_err("sample too large for this platform"))?;
    // SAFETY: a new bytes object with uninitialised contents; zeroed here, and only written
    // through the returned slice while the caller holds the only reference (in `objs`).
    unsafe {
        let p = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), len as pyo3::ffi::Py_ssize_t);
        let obj = Bound::from_owned_ptr_or_err(py, p)?.cast_into_unchecked::<PyBytes>();
        let buf = pyo3::ffi::PyBytes_AsString(obj.as_ptr()) as *mut u8;
        std::ptr::write_bytes(buf, 0, len);
        Ok((obj, std::slice::from_raw_parts_mut(buf, len)))
    }
}

/// An integer argument (int, bool, a numpy integer: anything with `__index__`) as an i64; None
/// when it is an integer too large for one. TypeError when it is not an integer.
pub(crate) fn int_arg(i: &Bound<'_, PyAny>) -> PyResult<Option<i64>> {
    match i.extract::<i64>() {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_instance_of::<PyOverflowError>(i.py()) => Ok(None),
        Err(_) => Err(PyTypeError::new_err(format!("a sample index is an integer, not {}", i.get_type().name()?))),
    }
}

/// A range bound (`read_range`): an integer, clamped to the i64 range (beyond it, out of range
/// of any dataset either way).
fn bound_arg(i: &Bound<'_, PyAny>) -> PyResult<i64> {
    match int_arg(i)? {
        Some(v) => Ok(v),
        None if i.lt(0)? => Ok(i64::MIN),
        None => Ok(i64::MAX),
    }
}

/// The position of index `i` in `len` samples (negative counts from the end; see
/// `read::sequence_position`): IndexError when out of range, TypeError when not an integer.
pub(crate) fn position_arg(i: &Bound<'_, PyAny>, len: usize) -> PyResult<usize> {
    match int_arg(i)?.and_then(|v| crate::read::sequence_position(v, len)) {
        Some(j) => Ok(j),
        None => Err(PyIndexError::new_err(format!("sample index {} out of range ({len} samples)", shown(i)))),
    }
}

/// `out` (grown to the `offsets`' last, never shrunk) or a new bytearray of that size, filled by
/// `fill` with the GIL released: a memoryview exports the bytearray's buffer meanwhile, so it
/// cannot be resized and its storage stays where it is.
fn fill_bytearray<'py>(
    py: Python<'py>,
    out: Option<Bound<'py, PyByteArray>>,
    offsets: &[u64],
    fill: impl FnOnce(&mut [u8]) -> crate::Result<()> + Send,
) -> PyResult<Bound<'py, PyByteArray>> {
    let need = usize::try_from(offsets.last().copied().unwrap_or(0)).map_err(|_| PyValueError::new_err("too large for this platform"))?;
    let buf = match out {
        Some(o) => {
            if o.len() < need {
                o.resize(need)?;
            }
            o
        }
        None => fresh_bytearray(py, need)?,
    };
    let pin = PyMemoryView::from(buf.as_any())?;
    let (ptr, len) = (buf.data() as usize, buf.len());
    py.detach(|| {
        // SAFETY: `ptr` is the bytearray's buffer of `len` bytes, pinned by `pin` (above) and
        // kept alive by `buf`; nothing of packds touches it meanwhile.
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
        fill(dst)
    })
    .map_err(to_py)?;
    pin.call_method0("release")?;
    Ok(buf)
}

/// A new bytearray of `len` bytes for `fill_bytearray` to fill completely. Not zeroed first (a
/// zeroing pass would touch every page once more before the copy writes it), and a large one is
/// asked for transparent huge pages, so that its first writes fault once per 2 MiB instead of
/// once per 4 KiB. Callers write every byte before Python sees the object (or drop it on error).
fn fresh_bytearray(py: Python<'_>, len: usize) -> PyResult<Bound<'_, PyByteArray>> {
    let n = isize::try_from(len).map_err(|_| PyValueError::new_err("too large for this platform"))?;
    // SAFETY: a NULL source makes CPython allocate `len` bytes without copying anything; the
    // result is a new reference or NULL with an exception set.
    let obj = unsafe { Bound::from_owned_ptr_or_err(py, pyo3::ffi::PyByteArray_FromStringAndSize(std::ptr::null(), n))? };
    let buf = obj.cast_into::<PyByteArray>().map_err(PyErr::from)?;
    const HUGE: usize = 2 << 20;
    if len >= 2 * HUGE {
        let start = buf.data() as usize;
        let a = (start + HUGE - 1) & !(HUGE - 1);
        let b = (start + len) & !(HUGE - 1);
        if b > a {
            // SAFETY: advice on whole pages inside the buffer just allocated; no effect on its
            // contents. Failure (no THP support) is harmless.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    Ok(buf)
}

/// `str(i)`, or a stand-in where Python refuses (an int of more than 4300 digits).
fn shown(i: &Bound<'_, PyAny>) -> String {
    i.str().map_or_else(|_| "(an integer too large to print)".into(), |s| s.to_string())
}

/// The reader of an open dataset, borrowed for one call.
pub(crate) struct Open(Guard<Option<Arc<Reader>>>);

impl std::ops::Deref for Open {
    type Target = Reader;
    fn deref(&self) -> &Reader {
        // Only made by `PyReader::r`, which checked it.
        self.0.as_deref().expect("an open reader")
    }
}

impl PyReader {
    /// The reader, or ValueError when the dataset was closed.
    pub(crate) fn r(&self) -> PyResult<Open> {
        let g = self.inner.load();
        if g.is_none() {
            return Err(PyValueError::new_err(format!("the dataset {} is closed: open it again with packds.open()", self.path.display())));
        }
        Ok(Open(g))
    }

    /// The reader itself (for work on another thread), or ValueError when closed.
    pub(crate) fn arc(&self) -> PyResult<Arc<Reader>> {
        let _ = self.r()?;
        self.inner.load_full().ok_or_else(|| PyValueError::new_err(format!("the dataset {} is closed", self.path.display())))
    }

    fn norm(&self, i: &Bound<'_, PyAny>) -> PyResult<usize> {
        position_arg(i, self.r()?.len())
    }

    /// A sample given by position (any integer) or by key (str or bytes: KeyError when absent).
    fn at(&self, i: &Bound<'_, PyAny>) -> PyResult<usize> {
        if i.is_instance_of::<PyString>() || i.is_instance_of::<PyBytes>() {
            return self.find(i)?.ok_or_else(|| PyKeyError::new_err(i.clone().unbind()));
        }
        self.norm(i)
    }

    /// Bytes of the samples at these positions: one list, GIL released while they are copied.
    fn many<'py>(&self, py: Python<'py>, idx: Vec<usize>) -> PyResult<Bound<'py, PyList>> {
        let r = &*self.r()?;
        let mut objs = Vec::with_capacity(idx.len());
        let mut bufs = Vec::with_capacity(idx.len());
        for &j in &idx {
            let (obj, buf) = new_bytes(py, r.prepare(j, self.check).map_err(to_py)?)?;
            objs.push(obj);
            bufs.push(buf);
        }
        py.detach(|| r.get_many_into(&idx, &mut bufs, self.check)).map_err(to_py)?;
        PyList::new(py, objs)
    }

    fn key_of<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyAny>> {
        let r = self.r()?;
        let k = r.key(i).map_err(to_py)?;
        match std::str::from_utf8(k) {
            Ok(s) => Ok(PyString::new(py, s).into_any()),
            // Like os.fsdecode: undecodable bytes become lone surrogates and round-trip.
            Err(_) => PyBytes::new(py, k).call_method1("decode", ("utf-8", "surrogateescape")),
        }
    }

    fn find(&self, key: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
        self.r()?.find(&key_arg(key)?).map_err(to_py)
    }

    pub(crate) fn sample<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyBytes>> {
        let r = &*self.r()?;
        let e = r.entry(i).map_err(to_py)?;
        if e.codec == crate::codec::RAW && !self.check {
            // One copy straight from the mapping.
            let b = PyBytes::new(py, &r.stored(&e).map_err(to_py)?);
            r.check_intact(e.shard).map_err(to_py)?;
            return Ok(b);
        }
        let check = self.check;
        let len = r.prepare(i, check).map_err(to_py)?;
        let read = move |buf: &mut [u8]| r.read_sample_into(i, buf, check);
        PyBytes::new_with(py, len as usize, |buf| if Reader::is_long_read(len) { py.detach(|| read(buf)) } else { read(buf) }.map_err(to_py))
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
        Ok(PyReader { inner: ArcSwapOption::from_pointee(r), path, check: verify })
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

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.r()?.len())
    }

    /// Releases the dataset: its mappings and open files go as soon as no read on another
    /// thread still uses them. Using it afterwards raises ValueError; closing twice is harmless.
    fn close(&self) {
        self.inner.store(None);
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.load().is_none()
    }

    /// `ds[i]` (negative counts from the end) or `ds[key]` → the sample's bytes; `ds[a:b:c]`
    /// → a list of the bytes of those samples (read like `get_many`).
    /// The GIL is held for one sample: a warm copy is faster than releasing and retaking it.
    /// Any integer is an index (bool too, as in a list: `ds[True]` is `ds[1]`; numpy integers);
    /// one out of range, of any size, raises IndexError. A str or bytes is a key (KeyError).
    fn __getitem__<'py>(&self, py: Python<'py>, idx: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        if let Ok(s) = idx.cast::<PySlice>() {
            let ind = s.indices(self.r()?.len() as isize)?;
            let idx = (0..ind.slicelength).map(|k| (ind.start + k as isize * ind.step) as usize).collect();
            return self.many(py, idx).map(Bound::into_any);
        }
        match self.at(idx) {
            Err(e) if e.is_instance_of::<PyTypeError>(py) => {
                Err(PyTypeError::new_err(format!("a sample is indexed by an integer, a key (str or bytes) or a slice, not {}", idx.get_type().name()?)))
            }
            j => self.sample(py, j?).map(Bound::into_any),
        }
    }

    /// Bytes of many samples (positions or keys) in one call, GIL released while the bytes are
    /// copied (and decompressed: compressed samples of a large batch are decoded by several
    /// threads).
    fn get_many<'py>(&self, py: Python<'py>, indices: Vec<Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyList>> {
        let idx = indices.iter().map(|i| self.at(i)).collect::<PyResult<Vec<usize>>>()?;
        self.many(py, idx)
    }

    /// Samples `[start, stop)` back to back in one buffer: returns `(buffer, offsets)`, sample
    /// `start + k` being `buffer[offsets[k]:offsets[k + 1]]`. Samples stored raw in one shard
    /// (a block of a packed dataset) are read as one byte span (one `pread` where the shard
    /// cannot be mapped); compressed ones are decoded. `out`: a bytearray to fill and return
    /// (grown when too small, never shrunk: reuse it across calls); else a new bytearray.
    /// GIL released for the read. `local`: a `LocalShard` (from a `ShardCache`) of the one shard
    /// holding every sample of the range (else UsageError): the stored bytes are read from that
    /// local copy instead of the dataset's shard.
    #[pyo3(signature = (start, stop, out=None, local=None))]
    fn read_range<'py>(
        &self,
        py: Python<'py>,
        start: &Bound<'py, PyAny>,
        stop: &Bound<'py, PyAny>,
        out: Option<Bound<'py, PyByteArray>>,
        local: Option<PyRef<'py, super::cache::PyLocalShard>>,
    ) -> PyResult<(Bound<'py, PyByteArray>, Vec<u64>)> {
        let (a, b) = (bound_arg(start)?, bound_arg(stop)?);
        let n = self.r()?.len() as i64;
        if a > b {
            return Err(PyValueError::new_err(format!("read_range({}, {}): start is after stop", shown(start), shown(stop))));
        }
        if a < 0 || b > n {
            return Err(PyIndexError::new_err(format!("sample range {}..{} out of range ({n} samples)", shown(start), shown(stop))));
        }
        let (a, b, check, r) = (a as usize, b as usize, self.check, &*self.r()?);
        // Held (so pinned and mapped) until the read is done, even if closed meanwhile.
        let local = local.map(|l| l.shard()).transpose()?;
        let l = local.as_deref();
        let offsets = py.detach(|| r.range_offsets_from(a, b, check, l)).map_err(to_py)?;
        let buf = fill_bytearray(py, out, &offsets, |dst| r.read_range_into_from(a, b, dst, check, l))?;
        Ok((buf, offsets))
    }

    /// The shard number of sample `i` (its position in the manifest's shard list).
    fn shard_of(&self, i: &Bound<'_, PyAny>) -> PyResult<u32> {
        let j = self.norm(i)?;
        self.r()?.shard_of(j).map_err(to_py)
    }

    /// The samples `indices` (positions or keys) back to back in one buffer: returns `(buffer,
    /// offsets)`, sample `k` being `buffer[offsets[k]:offsets[k + 1]]` (`len(indices) + 1`
    /// offsets). One allocation for the batch instead of one `bytes` per sample; `out`: a
    /// bytearray to fill and return (grown when too small, never shrunk: reuse it across calls).
    /// Copies (and decoding) run with the GIL released, by several threads for a large batch;
    /// numpy or torch can wrap the buffer without another copy.
    #[pyo3(signature = (indices, out=None))]
    fn get_batch<'py>(
        &self,
        py: Python<'py>,
        indices: Vec<Bound<'py, PyAny>>,
        out: Option<Bound<'py, PyByteArray>>,
    ) -> PyResult<(Bound<'py, PyByteArray>, Vec<u64>)> {
        let idx = indices.iter().map(|i| self.at(i)).collect::<PyResult<Vec<usize>>>()?;
        let (check, r) = (self.check, &*self.r()?);
        let offsets = r.batch_offsets(&idx, check).map_err(to_py)?;
        let buf = fill_bytearray(py, out, &offsets, |dst| r.get_batch_into(&idx, &offsets, dst, check))?;
        Ok((buf, offsets))
    }

    /// The dataset cut into blocks for sequential reading: `(start, stop)` sample ranges in
    /// order, covering every sample once, each inside one shard and spanning about
    /// `target_bytes` stored bytes. GIL released.
    fn blocks(&self, py: Python<'_>, target_bytes: u64) -> PyResult<Vec<(usize, usize)>> {
        let r = &*self.r()?;
        py.detach(|| r.blocks(target_bytes)).map_err(to_py)
    }

    /// `(start, stop)`: the positions of the keys that start with `prefix` (str or bytes); they
    /// form one run, keys being sorted byte-wise (`start == stop` when there is none). O(log n).
    fn key_range(&self, prefix: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
        self.r()?.key_range(&key_arg(prefix)?).map_err(to_py)
    }

    /// The stored bytes of sample `i` (the zstd frame of a compressed sample; the same as
    /// `ds[i]` for one stored raw).
    fn raw<'py>(&self, py: Python<'py>, i: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        let j = self.at(i)?;
        let e = self.r()?.entry(j).map_err(to_py)?;
        let b = PyBytes::new(py, &self.r()?.stored(&e).map_err(to_py)?);
        self.r()?.check_intact(e.shard).map_err(to_py)?;
        Ok(b)
    }

    /// Stored size of sample `i` (equal to `size(i)` unless it is compressed).
    fn stored_size(&self, i: &Bound<'_, PyAny>) -> PyResult<u64> {
        let j = self.at(i)?;
        self.r()?.stored_size(j).map_err(to_py)
    }

    /// How sample `i` is stored: 0 raw, 1 zstd, 2 zstd with the dataset's dictionary.
    fn _codec(&self, i: &Bound<'_, PyAny>) -> PyResult<u8> {
        let j = self.at(i)?;
        Ok(self.r()?.entry(j).map_err(to_py)?.codec)
    }

    /// The dataset's zstd dictionary (bytes), or None.
    fn zstd_dict<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        Ok(self.r()?.index().dict().map(|d| PyBytes::new(py, d)))
    }

    /// Index format version (1: all samples stored raw; 2: with a codec section).
    #[getter]
    fn format_version(&self) -> PyResult<u32> {
        Ok(self.r()?.index().version())
    }

    /// Sample `i`'s bytes after checking its CRC32C (raises ChecksumError).
    fn get_checked<'py>(&self, py: Python<'py>, i: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        let j = self.at(i)?;
        let r = self.r()?;
        let b = r.get_checked(j).map_err(to_py)?;
        Ok(PyBytes::new(py, &b))
    }

    /// Key of sample `i` as str (decoded like os.fsdecode).
    fn key<'py>(&self, py: Python<'py>, i: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let j = self.norm(i)?;
        self.key_of(py, j)
    }

    /// Key of sample `i` as raw bytes.
    fn key_bytes<'py>(&self, py: Python<'py>, i: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        let j = self.norm(i)?;
        Ok(PyBytes::new(py, self.r()?.key(j).map_err(to_py)?))
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
    fn size(&self, i: &Bound<'_, PyAny>) -> PyResult<u64> {
        let j = self.at(i)?;
        self.r()?.size(j).map_err(to_py)
    }

    /// (shard path, byte offset, stored size) of sample `i`.
    fn locate(&self, i: &Bound<'_, PyAny>) -> PyResult<(std::ffi::OsString, u64, u64)> {
        let j = self.at(i)?;
        let (p, o, n) = self.r()?.locate(j).map_err(to_py)?;
        Ok((p.into_os_string(), o, n))
    }

    /// Positions of the keys matching a glob pattern (same syntax as `pack --include`).
    fn glob(&self, py: Python<'_>, pattern: &str) -> PyResult<Vec<usize>> {
        let r = &*self.r()?;
        py.detach(|| r.glob(pattern)).map_err(to_py)
    }

    /// The manifest, as JSON text.
    fn manifest_json(&self) -> PyResult<String> {
        serde_json::to_string(self.r()?.manifest()).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Full check (index, shard checksums, every raw sample's CRC32C; with `deep`, every
    /// compressed sample decoded and checked too), on a worker thread with the GIL released
    /// (Ctrl-C cancels it). Returns a dict with `samples`, `shards`, `bytes`, `decoded`,
    /// `problems` (a list of messages; empty when all is well). `progress(phase, samples_done,
    /// samples_total, bytes_done, bytes_total)` is called about ten times a second.
    #[pyo3(signature = (threads=4, deep=false, progress=None))]
    fn verify<'py>(&self, py: Python<'py>, threads: usize, deep: bool, progress: Option<Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.arc()?;
        let rep = super::run_cancellable(py, progress.as_ref(), move |p| r.verify_progress(threads, deep, p))?;
        let d = PyDict::new(py);
        d.set_item("samples", rep.samples)?;
        d.set_item("decoded", rep.decoded)?;
        d.set_item("shards", rep.shards)?;
        d.set_item("bytes", rep.bytes)?;
        d.set_item("problems", rep.problems)?;
        Ok(d)
    }

    /// Extracts every sample under `dest` on a worker thread with the GIL released (Ctrl-C
    /// cancels it between two files). Returns the number of files. `progress(phase, files_done,
    /// files_total, bytes_done, bytes_total)` is called about ten times a second.
    #[pyo3(signature = (dest, progress=None))]
    fn unpack(&self, py: Python<'_>, dest: PathBuf, progress: Option<Bound<'_, PyAny>>) -> PyResult<u64> {
        let r = self.arc()?;
        super::run_cancellable(py, progress.as_ref(), move |p| r.unpack_progress(&dest, p))
    }
}
