//! `ShardCache` and `LocalShard`: the bindings of `crate::cache`. Every call that touches the
//! disk runs with the GIL released.

use super::errors::to_py;
use crate::cache::{LocalShard, ShardCache};
use arc_swap::ArcSwapOption;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

/// A node-local shard cache directory shared by the processes of a node. Safe to use from
/// several threads at once; per process (a forked child should make its own).
#[pyclass(frozen, name = "ShardCache", module = "packds._core")]
pub struct PyShardCache {
    inner: Arc<ShardCache>,
}

/// A cached shard, pinned (not evicted) and mapped until `close()` (or garbage collection).
#[pyclass(frozen, name = "LocalShard", module = "packds._core")]
pub struct PyLocalShard {
    /// None once closed.
    inner: ArcSwapOption<LocalShard>,
    path: PathBuf,
    size: u64,
}

impl PyLocalShard {
    fn wrap(s: LocalShard) -> PyLocalShard {
        PyLocalShard { path: s.path().to_path_buf(), size: s.size(), inner: ArcSwapOption::from_pointee(s) }
    }

    /// The pinned copy (kept alive by the caller while it reads), or ValueError once closed.
    pub(crate) fn shard(&self) -> PyResult<Arc<LocalShard>> {
        self.inner.load_full().ok_or_else(|| PyValueError::new_err(format!("the LocalShard {} is closed", self.path.display())))
    }
}

#[pymethods]
impl PyShardCache {
    /// Opens (creating it, mode 0700) the cache directory `dir`, to hold at most `limit` bytes.
    #[new]
    fn new(py: Python<'_>, dir: PathBuf, limit: u64) -> PyResult<Self> {
        let c = py.detach(|| ShardCache::open(&dir, limit)).map_err(to_py)?;
        Ok(PyShardCache { inner: Arc::new(c) })
    }

    #[getter]
    fn dir(&self) -> OsString {
        self.inner.dir().as_os_str().to_owned()
    }

    #[getter]
    fn limit(&self) -> u64 {
        self.inner.limit()
    }

    /// The shard `src` (`size` bytes, XXH3-128 `xxh3_128` as its manifest says) as a pinned local
    /// copy, copied in first when the cache lacks it; None when it cannot be cached.
    fn fetch(&self, py: Python<'_>, src: PathBuf, size: u64, xxh3_128: &str) -> PyResult<Option<PyLocalShard>> {
        let c = &self.inner;
        Ok(py.detach(|| c.fetch(&src, size, xxh3_128)).map_err(to_py)?.map(PyLocalShard::wrap))
    }

    /// The pinned copy if the shard is cached, else None; never fetches.
    fn lookup(&self, py: Python<'_>, size: u64, xxh3_128: &str) -> PyResult<Option<PyLocalShard>> {
        let c = &self.inner;
        Ok(py.detach(|| c.lookup(size, xxh3_128)).map_err(to_py)?.map(PyLocalShard::wrap))
    }

    /// Bytes of cached shards and copies in progress.
    fn usage(&self, py: Python<'_>) -> PyResult<u64> {
        let c = &self.inner;
        py.detach(|| c.usage()).map_err(to_py)
    }

    /// What this object did: fetches, fetched_bytes, hits, evictions, evicted_bytes.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("fetches", s.fetches)?;
        d.set_item("fetched_bytes", s.fetched_bytes)?;
        d.set_item("hits", s.hits)?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("evicted_bytes", s.evicted_bytes)?;
        Ok(d)
    }

    /// Removes every cached shard no process has pinned (and dead fetchers' temporaries):
    /// (entries removed, bytes freed, entries kept because pinned). GIL released.
    fn clear(&self, py: Python<'_>) -> PyResult<(u64, u64, u64)> {
        let c = &self.inner;
        py.detach(|| c.clear()).map_err(to_py)
    }

    /// Every fetch recorded in the cache directory by any process: (xxh3_128, size, pid).
    fn fetch_log(&self, py: Python<'_>) -> PyResult<Vec<(String, u64, u32)>> {
        let c = &self.inner;
        py.detach(|| c.fetch_log()).map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!("<packds ShardCache {:?}: limit {} bytes>", self.inner.dir().display().to_string(), self.inner.limit())
    }
}

#[pymethods]
impl PyLocalShard {
    /// The cached file.
    #[getter]
    fn path(&self) -> OsString {
        self.path.clone().into_os_string()
    }

    #[getter]
    fn size(&self) -> u64 {
        self.size
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.load().is_none()
    }

    /// Unpins and unmaps (once no read in flight uses it); closing twice is harmless.
    fn close(&self, py: Python<'_>) {
        let s = self.inner.swap(None);
        py.detach(move || drop(s));
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) {
        self.close(py);
    }

    fn __repr__(&self) -> String {
        let state = if self.closed() { "closed" } else { "pinned" };
        format!("<packds LocalShard {:?}: {} bytes, {state}>", self.path.display().to_string(), self.size)
    }
}
