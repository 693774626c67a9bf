//! `Writer`: the binding of `crate::pack::SampleWriter` (use `packds.Writer`).

use super::errors::to_py;
use super::pack::h5_writer;
use super::reader::key_arg;
use crate::codec::Compress;
use crate::pack::{PackOptions, SampleWriter, ShardFormat, DEFAULT_SHARD_SIZE};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::path::PathBuf;

/// Samples larger than this are checksummed and compressed with the GIL released.
const DETACH_ABOVE: usize = 64 << 10;

/// A dataset being written sample by sample. `add(key, data)`, `add_file(key, path)`, then
/// `close()` (writes the index and the manifest, last) or `abort()` (removes what was written).
#[pyclass(name = "Writer", module = "packds._core", subclass)]
pub struct PyWriter {
    inner: Option<SampleWriter>,
    path: PathBuf,
    /// HDF5 shards are finished by h5py on the writer thread, which then needs the GIL: every
    /// hand-over releases it.
    h5: bool,
}

impl PyWriter {
    fn w(&mut self) -> PyResult<&mut SampleWriter> {
        let path = self.path.display().to_string();
        self.inner.as_mut().ok_or_else(|| PyValueError::new_err(format!("the writer of {path} is closed")))
    }
}

#[pymethods]
impl PyWriter {
    #[new]
    #[pyo3(signature = (path, *, shard_size=DEFAULT_SHARD_SIZE, compress=Compress::None, format=ShardFormat::Tar, force=false, mtime=0, h5_writer=None, options_json=None, resume=false),
        text_signature = "(path, *, shard_size=..., compress='none', format='tar', force=False, mtime=0, h5_writer=None, options_json=None, resume=False)")]
    #[allow(clippy::too_many_arguments)] // the Python keyword arguments
    fn new(
        py: Python<'_>,
        path: PathBuf,
        shard_size: u64,
        compress: Compress,
        format: ShardFormat,
        force: bool,
        mtime: i64,
        h5_writer: Option<Bound<'_, PyAny>>,
        options_json: Option<String>,
        resume: bool,
    ) -> PyResult<Self> {
        let mut opts = PackOptions::new(Vec::new(), path.clone());
        opts.shard_size = shard_size;
        opts.compress = compress;
        opts.format = format;
        opts.force = force;
        opts.h5_writer = h5_writer.map(h5_writer_of);
        opts.options_json = match options_json {
            Some(s) => serde_json::from_str(&s).map_err(|e| PyValueError::new_err(format!("options_json: {e}")))?,
            None => serde_json::Value::Null,
        };
        let w = py.detach(move || SampleWriter::create_resuming(opts, mtime, resume)).map_err(to_py)?;
        Ok(PyWriter { inner: Some(w), path, h5: format == ShardFormat::H5 })
    }

    /// Adds sample `key` (str or bytes; a relative path, unique) with the bytes `data`.
    fn add(&mut self, py: Python<'_>, key: &Bound<'_, PyAny>, data: &Bound<'_, PyBytes>) -> PyResult<()> {
        let key = key_arg(key)?;
        let data = data.as_bytes();
        let detach = self.h5 || data.len() > DETACH_ABOVE;
        let w = self.w()?;
        if detach {
            py.detach(|| w.add(&key, data)).map_err(to_py)
        } else {
            w.add(&key, data).map_err(to_py)
        }
    }

    /// Adds the file at `path` as sample `key`, copied as `pack` copies a file (its mode and
    /// mtime kept); GIL released.
    fn add_file(&mut self, py: Python<'_>, key: &Bound<'_, PyAny>, path: PathBuf) -> PyResult<()> {
        let key = key_arg(key)?.into_owned();
        let w = self.w()?;
        py.detach(|| w.add_file(&key, &path)).map_err(to_py)
    }

    /// Completes the dataset: the last shard, the index, then the manifest. Returns a summary
    /// dict (output, samples, bytes, stored_bytes, shards, ordered, seconds).
    fn close<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let w = self.inner.take().ok_or_else(|| PyValueError::new_err(format!("the writer of {} is closed", self.path.display())))?;
        let s = py.detach(move || w.close()).map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("output", s.output)?;
        d.set_item("samples", s.samples)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("stored_bytes", s.stored_bytes)?;
        d.set_item("shards", s.shards)?;
        d.set_item("ordered", s.ordered)?;
        d.set_item("seconds", s.seconds)?;
        Ok(d)
    }

    /// Marks the samples added from now on (a non-decreasing number, e.g. the input's position);
    /// each completed shard records the mark of its last sample (see `resume_mark`).
    fn set_mark(&mut self, mark: u64) -> PyResult<()> {
        self.w()?.set_mark(mark);
        Ok(())
    }

    /// For `resume=True`: the mark of the last completed shard kept from the writer that
    /// stopped (None when nothing was kept).
    #[getter]
    fn resume_mark(&self) -> Option<u64> {
        self.inner.as_ref().and_then(|w| w.resume_mark())
    }

    /// For `resume=True`: the number of samples kept from the writer that stopped.
    #[getter]
    fn resumed_samples(&self) -> u64 {
        self.inner.as_ref().map_or(0, |w| w.resumed_samples())
    }

    /// Stops writing, keeping the completed shards for a `resume=True` writer later (the open
    /// shard is dropped); nothing that opens is left.
    fn suspend(&mut self, py: Python<'_>) -> PyResult<()> {
        match self.inner.take() {
            Some(w) => py.detach(move || w.suspend()).map_err(to_py),
            None => Ok(()),
        }
    }

    /// Stops writing and removes everything written (nothing that opens is left). Harmless
    /// after `close()`.
    fn abort(&mut self, py: Python<'_>) {
        if let Some(w) = self.inner.take() {
            py.detach(move || drop(w));
        }
    }

    /// Whether `close()` or `abort()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_none()
    }

    /// The dataset directory being written.
    #[getter]
    fn path(&self) -> std::ffi::OsString {
        self.path.clone().into_os_string()
    }
}

fn h5_writer_of(w: Bound<'_, PyAny>) -> crate::pack::H5Writer {
    h5_writer(w)
}
