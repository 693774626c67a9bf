//! Bindings for `crate::stage`: the copy and preload run with the GIL released; a
//! `StageProgress` object lets a Python thread read the counters and cancel. Also what
//! `stage.py` asks `crate::layout` about a dataset directory (it names no packds file itself).

use super::errors::to_py;
use crate::layout::{self, CopyList, DirKind};
use crate::stage::{self as core_stage, StageProgress, StageSummary};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Progress counters of a running stage or preload, readable from any thread.
#[pyclass(frozen, name = "StageProgress", module = "packds._core")]
pub struct PyStageProgress {
    inner: Arc<StageProgress>,
}

#[pymethods]
impl PyStageProgress {
    #[new]
    fn new() -> Self {
        PyStageProgress { inner: Arc::new(StageProgress::default()) }
    }

    #[getter]
    fn bytes_done(&self) -> u64 {
        self.inner.bytes_done.load(Relaxed)
    }

    #[getter]
    fn bytes_total(&self) -> u64 {
        self.inner.bytes_total.load(Relaxed)
    }

    #[getter]
    fn files_done(&self) -> u64 {
        self.inner.files_done.load(Relaxed)
    }

    #[getter]
    fn files_total(&self) -> u64 {
        self.inner.files_total.load(Relaxed)
    }

    /// Files taken from an earlier staged copy (`previous=`) instead of copied.
    #[getter]
    fn reused(&self) -> u64 {
        self.inner.reused.load(Relaxed)
    }

    /// Bytes actually read from the files copied or preloaded (a preload skips what is
    /// already in the page cache, e.g. a copy just written).
    #[getter]
    fn bytes_read(&self) -> u64 {
        self.inner.bytes_read.load(Relaxed)
    }

    /// Asks the running copy to stop (it then fails with KeyboardInterrupt, leaving nothing).
    fn cancel(&self) {
        self.inner.cancel.store(true, Relaxed);
    }
}

fn progress_of(p: Option<&Bound<'_, PyStageProgress>>) -> Arc<StageProgress> {
    p.map(|p| p.get().inner.clone()).unwrap_or_default()
}

fn summary<'py>(py: Python<'py>, s: StageSummary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("path", s.path)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("files", s.files)?;
    d.set_item("seconds", s.seconds)?;
    Ok(d)
}

/// Copies the dataset `src` to `dest` via the temporary directory `tmp`, checking every file's
/// XXH3-128 against the manifest in the same pass; GIL released. `previous`: an earlier staged
/// copy whose matching files (name, size, hash) are hard-linked instead of copied.
#[pyfunction]
#[pyo3(signature = (src, dest, tmp, *, jobs=4, durable=true, progress=None, previous=None))]
#[allow(clippy::too_many_arguments)] // the Python keyword arguments
pub fn stage_dataset<'py>(
    py: Python<'py>,
    src: PathBuf,
    dest: PathBuf,
    tmp: PathBuf,
    jobs: usize,
    durable: bool,
    progress: Option<&Bound<'py, PyStageProgress>>,
    previous: Option<PathBuf>,
) -> PyResult<Bound<'py, PyDict>> {
    let p = progress_of(progress);
    let s = py.detach(|| core_stage::stage_dataset_reusing(&src, &dest, &tmp, jobs, durable, &p, previous.as_deref())).map_err(to_py)?;
    summary(py, s)
}

/// Copies the single file `src` to `dest` via the temporary file `tmp`; GIL released.
#[pyfunction]
#[pyo3(signature = (src, dest, tmp, *, durable=true, progress=None))]
pub fn stage_file<'py>(
    py: Python<'py>,
    src: PathBuf,
    dest: PathBuf,
    tmp: PathBuf,
    durable: bool,
    progress: Option<&Bound<'py, PyStageProgress>>,
) -> PyResult<Bound<'py, PyDict>> {
    let p = progress_of(progress);
    let s = py.detach(|| core_stage::stage_file(&src, &dest, &tmp, durable, &p)).map_err(to_py)?;
    summary(py, s)
}

/// A file to preload: a path, or (path, size) as `dataset_files` lists them (a file of another
/// size is refused).
#[derive(FromPyObject)]
pub enum PreloadFile {
    Sized(PathBuf, u64),
    Path(PathBuf),
}

/// Reads `files` into the page cache (fadvise WILLNEED + sequential 8 MiB reads, `jobs` files
/// at once); GIL released. Regular files only, never read past their size. Returns the bytes
/// read.
#[pyfunction]
#[pyo3(signature = (files, *, jobs=4, progress=None))]
pub fn preload(py: Python<'_>, files: Vec<PreloadFile>, jobs: usize, progress: Option<&Bound<'_, PyStageProgress>>) -> PyResult<u64> {
    let p = progress_of(progress);
    let files: Vec<(PathBuf, Option<u64>)> = files
        .into_iter()
        .map(|f| match f {
            PreloadFile::Sized(path, size) => (path, Some(size)),
            PreloadFile::Path(path) => (path, None),
        })
        .collect();
    py.detach(|| core_stage::preload_sized(&files, jobs, &p)).map_err(to_py)
}

/// What the directory `path` is: "dataset", "parts" (a partitioned pack not merged yet),
/// "interrupted" (a pack that was interrupted), "none" (another directory) or "missing".
#[pyfunction]
pub fn dataset_kind(py: Python<'_>, path: PathBuf) -> &'static str {
    py.detach(|| DirKind::of(&path).name())
}

/// The files of the dataset `path` besides its manifest (index and shards) as (path, size),
/// and the bytes a copy of it takes (manifest included). Raises FormatError for a damaged or
/// missing manifest, and for a listed file that is missing, not a regular file or not of its
/// recorded size (one `stat` each).
#[pyfunction]
pub fn dataset_files(py: Python<'_>, path: PathBuf) -> PyResult<(Vec<(OsString, u64)>, u64)> {
    let list = py
        .detach(|| {
            let list = CopyList::load(&path)?;
            list.check_present(&path)?;
            Ok(list)
        })
        .map_err(to_py)?;
    let files = list.files.iter().map(|f| (path.join(&f.name).into_os_string(), f.size)).collect();
    Ok((files, list.total_bytes()))
}

/// Is `dest` an intact copy of the dataset `src` (same manifest bytes, every file its size)?
#[pyfunction]
pub fn is_staged_at(py: Python<'_>, src: PathBuf, dest: PathBuf) -> bool {
    py.detach(|| layout::is_current_copy(&src, &dest))
}

/// Is `dest` an intact dataset whose manifest options hold every item of `options` (a JSON
/// object, as text)?
#[pyfunction]
pub fn is_intact_with_options(py: Python<'_>, dest: PathBuf, options: &str) -> PyResult<bool> {
    let want: serde_json::Value = serde_json::from_str(options).map_err(|e| PyValueError::new_err(format!("options is not JSON: {e}")))?;
    Ok(py.detach(|| layout::is_intact_with_options(&dest, &want)))
}

/// Removes an earlier staged copy of a dataset at `path` (nothing there is fine); raises
/// UsageError when `path` holds anything packds did not write.
#[pyfunction]
pub fn remove_stale_copy(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    py.detach(|| layout::remove_stale_copy(&path)).map_err(to_py)
}

/// Why another user could change what the directory path `path` leads to (it, a directory
/// above it, or a symbolic link on the way), or None. See `layout::others_can_replace_along`.
#[pyfunction]
pub fn path_open_to_others(py: Python<'_>, path: PathBuf) -> PyResult<Option<String>> {
    py.detach(|| layout::others_can_replace_along(&path)).map_err(to_py)
}

/// Whether the staged copy at `path` is provably ours: ("missing" | "foreign" | "shared" |
/// "private", why). See `layout::staged_copy_trust`.
#[pyfunction]
pub fn staged_copy_trust(py: Python<'_>, path: PathBuf) -> (&'static str, String) {
    py.detach(|| {
        let t = layout::staged_copy_trust(&path);
        let (k, w) = t.parts();
        (k, w.to_string())
    })
}

/// Reads every byte of the staged copy `dest` and checks it against the dataset `src`'s
/// manifest (`src` None: against the copy's own manifest); `file=True`: `dest` is one staged
/// file compared with the file `src`. Raises ChecksumError / FormatError at the first
/// difference; GIL released.
#[pyfunction]
#[pyo3(signature = (src, dest, *, file=false))]
pub fn verify_copy(py: Python<'_>, src: Option<PathBuf>, dest: PathBuf, file: bool) -> PyResult<()> {
    py.detach(|| match (&src, file) {
        (Some(s), true) => layout::verify_file_copy(s, &dest),
        (s, _) => layout::verify_copy(s.as_deref(), &dest),
    })
    .map_err(to_py)
}

/// The name for `source`'s staged copy when `name` is taken by another source or user:
/// `NAME-<8 hex digits>.EXT` (8 hex digits of the hash of the source path).
#[pyfunction]
pub fn disambiguated_name(name: &str, source: PathBuf) -> String {
    layout::disambiguated_name(name, &source)
}

/// Fingerprint of a loose tree (regular files, symlinks not followed): a dict of files, bytes,
/// mtime_ns_max and packed_estimate (the packed size, headers and padding included).
#[pyfunction]
pub fn tree_fingerprint(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let fp = py.detach(|| layout::tree_fingerprint(&path));
    let d = PyDict::new(py);
    d.set_item("files", fp.files)?;
    d.set_item("bytes", fp.bytes)?;
    d.set_item("mtime_ns_max", fp.mtime_ns_max)?;
    d.set_item("packed_estimate", fp.packed_estimate)?;
    Ok(d)
}
