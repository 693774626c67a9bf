//! Bindings for `crate::stage`: the copy and preload run with the GIL released; a
//! `StageProgress` object lets a Python thread read the counters and cancel.

use super::errors::to_py;
use crate::stage::{self as core_stage, StageProgress, StageSummary};
use pyo3::prelude::*;
use pyo3::types::PyDict;
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
/// XXH3-128 against the manifest in the same pass; GIL released.
#[pyfunction]
#[pyo3(signature = (src, dest, tmp, *, jobs=4, durable=true, progress=None))]
pub fn stage_dataset<'py>(
    py: Python<'py>,
    src: PathBuf,
    dest: PathBuf,
    tmp: PathBuf,
    jobs: usize,
    durable: bool,
    progress: Option<&Bound<'py, PyStageProgress>>,
) -> PyResult<Bound<'py, PyDict>> {
    let p = progress_of(progress);
    let s = py.detach(|| core_stage::stage_dataset(&src, &dest, &tmp, jobs, durable, &p)).map_err(to_py)?;
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

/// Reads `files` into the page cache (fadvise WILLNEED + sequential 8 MiB reads, `jobs` files
/// at once); GIL released. Returns the bytes read.
#[pyfunction]
#[pyo3(signature = (files, *, jobs=4, progress=None))]
pub fn preload(py: Python<'_>, files: Vec<PathBuf>, jobs: usize, progress: Option<&Bound<'_, PyStageProgress>>) -> PyResult<u64> {
    let p = progress_of(progress);
    py.detach(|| core_stage::preload(&files, jobs, &p)).map_err(to_py)
}
