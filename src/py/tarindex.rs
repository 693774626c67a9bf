//! Bindings for `crate::tarindex`: `index_tars` (runs on a worker thread, GIL released, Ctrl-C
//! cancels) and `Groups`, the webdataset sample boundaries over an opened dataset's keys.

use super::errors::to_py;
use super::PyReader;
use crate::tarindex::{self as core, IndexTarsOptions, Link};
use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};
use std::path::PathBuf;

/// Indexes existing tar files in place into the dataset directory `output`; returns a summary
/// dict (output, tars, samples, bytes, groups, skipped [(member, reason)], warnings, seconds).
#[pyfunction]
#[pyo3(signature = (tars, output, *, group_by_basename=false, force=false, link=Link::Symlink, threads=0, progress=None),
    text_signature = "(tars, output, *, group_by_basename=False, force=False, link='symlink', threads=0, progress=None)")]
#[allow(clippy::too_many_arguments)] // the Python keyword arguments
pub fn index_tars<'py>(
    py: Python<'py>,
    tars: Vec<PathBuf>,
    output: PathBuf,
    group_by_basename: bool,
    force: bool,
    link: Link,
    threads: usize,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = IndexTarsOptions { tars, output, group_by_basename, force, link, threads };
    let s = super::run_cancellable(py, progress.as_ref(), move |p| core::index_tars(&opts, p))?;
    let d = PyDict::new(py);
    d.set_item("output", s.output)?;
    d.set_item("tars", s.tars)?;
    d.set_item("samples", s.samples)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("groups", s.groups)?;
    let sk = PyList::empty(py);
    for x in &s.skipped {
        sk.append((x.path.as_str(), x.reason.as_str()))?;
    }
    d.set_item("skipped", sk)?;
    d.set_item("warnings", s.warnings)?;
    d.set_item("seconds", s.seconds)?;
    Ok(d)
}

/// WebDataset samples of an opened dataset: runs of keys sharing a basename (the name up to
/// the first '.' of its last path component). Built once, in one pass over the mapped keys
/// with the GIL released; 16 bytes per sample.
#[pyclass(frozen, name = "Groups", module = "packds._core")]
pub struct PyGroups {
    reader: Py<PyReader>,
    /// (first member, member count, sample key length).
    groups: Vec<(u64, u32, u32)>,
}

impl PyGroups {
    fn norm(&self, i: &Bound<'_, PyAny>) -> PyResult<usize> {
        super::reader::position_arg(i, self.groups.len())
    }

    fn key_bytes_of<'a>(&self, r: &'a crate::read::Reader, g: usize) -> PyResult<&'a [u8]> {
        let (start, _, klen) = self.groups[g];
        Ok(&r.key(start as usize).map_err(to_py)?[..klen as usize])
    }
}

fn decode<'py>(py: Python<'py>, k: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    match std::str::from_utf8(k) {
        Ok(s) => Ok(PyString::new(py, s).into_any()),
        Err(_) => PyBytes::new(py, k).call_method1("decode", ("utf-8", "surrogateescape")),
    }
}

#[pymethods]
impl PyGroups {
    #[new]
    fn new(py: Python<'_>, reader: Bound<'_, PyReader>) -> PyResult<Self> {
        let r = reader.get().arc()?;
        let dir = reader.get().path.clone();
        let groups = py
            .detach(move || {
                core::group_ranges(r.len(), |i| r.key(i)).map(|g| g.map_err(|why| crate::Error::format(&dir, format!("cannot group by basename: {why}"))))
            })
            .and_then(|g| g)
            .map_err(to_py)?;
        Ok(PyGroups { reader: reader.unbind(), groups })
    }

    fn __len__(&self) -> usize {
        self.groups.len()
    }

    /// (first member, end) positions of sample `i` in the per-member dataset.
    fn range(&self, i: &Bound<'_, PyAny>) -> PyResult<(u64, u64)> {
        let (s, n, _) = self.groups[self.norm(i)?];
        Ok((s, s + u64::from(n)))
    }

    /// Key of sample `i` (str, like os.fsdecode).
    fn key<'py>(&self, py: Python<'py>, i: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let g = self.norm(i)?;
        let r = self.reader.get().r()?;
        decode(py, self.key_bytes_of(&r, g)?)
    }

    /// Position of the sample with key `key` (str or bytes), or None. O(log n).
    fn find(&self, key: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
        let want: Vec<u8> = if let Ok(s) = key.cast::<PyString>() {
            s.call_method1("encode", ("utf-8", "surrogateescape"))?.extract()?
        } else if let Ok(b) = key.cast::<PyBytes>() {
            b.as_bytes().to_vec()
        } else {
            return Err(pyo3::exceptions::PyTypeError::new_err("a key is a str (or bytes)"));
        };
        let r = self.reader.get().r()?;
        let sample_key = |g: usize| {
            let (start, _, klen) = self.groups[g];
            r.key(start as usize).map(|k| k.get(..klen as usize).unwrap_or(k))
        };
        crate::index::find_sorted(self.groups.len(), sample_key, &want).map_err(to_py)
    }

    /// Sample `i` as a dict: `{"__key__": key, field: bytes, ...}` (field = the member name
    /// after the sample key and its '.').
    fn item<'py>(&self, py: Python<'py>, i: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let g = self.norm(i)?;
        let (start, n, klen) = self.groups[g];
        let reader = self.reader.get();
        let r = reader.r()?;
        let d = PyDict::new(py);
        d.set_item("__key__", decode(py, self.key_bytes_of(&r, g)?)?)?;
        for j in start as usize..start as usize + n as usize {
            let k = r.key(j).map_err(to_py)?;
            let field = k.get(klen as usize + 1..).ok_or_else(|| PyKeyError::new_err("dataset changed under its groups"))?;
            d.set_item(decode(py, field)?, reader.sample(py, j)?)?;
        }
        Ok(d)
    }
}
