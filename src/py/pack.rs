//! Bindings for `crate::pack` and `crate::plan`: `pack`, `plan`, `merge`. Long operations run
//! as a [`crate::job::Job`] while this thread waits with the GIL released, reports progress and
//! lets Ctrl-C cancel.

use super::errors::to_py;
use crate::codec::Compress;
use crate::job::Job;
use crate::pack::{self as core_pack, PackOptions, Progress, ShardFormat};
use crate::walk::{OnError, Skipped};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

fn skipped_list<'py>(py: Python<'py>, skipped: &[Skipped]) -> PyResult<Bound<'py, PyList>> {
    let sk = PyList::empty(py);
    for x in skipped {
        sk.append((x.path.as_str(), x.reason.as_str()))?;
    }
    Ok(sk)
}

/// The options `pack` and `plan` share.
#[allow(clippy::too_many_arguments)]
fn options(
    sources: Vec<PathBuf>,
    output: PathBuf,
    shard_size: u64,
    threads: usize,
    follow_symlinks: bool,
    include: Vec<String>,
    exclude: Vec<String>,
    on_error: OnError,
    compress: Compress,
    zstd_dict: usize,
    format: ShardFormat,
) -> PackOptions {
    let mut opts = PackOptions::new(sources, output);
    opts.shard_size = shard_size;
    opts.threads = threads;
    opts.follow_symlinks = follow_symlinks;
    opts.include = include;
    opts.exclude = exclude;
    opts.on_error = on_error;
    opts.compress = compress;
    opts.dict_size = zstd_dict;
    opts.format = format;
    opts
}

/// A Python callable `(path, data_len, columns, dict, compression) -> data offset` as the
/// core's HDF5 shard writer (h5py writes the file's metadata).
pub(crate) fn h5_writer(w: Bound<'_, PyAny>) -> core_pack::H5Writer {
    let cb: Py<PyAny> = w.unbind();
    core_pack::H5Writer(Arc::new(move |spec: &core_pack::H5Shard| -> crate::Result<u64> {
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
    }))
}

/// Packs `sources` into the dataset directory `output`. Runs on a worker thread with the GIL
/// released; `progress(phase, files_done, files_total, bytes_done, bytes_total)` is called about ten times a
/// second. Ctrl-C cancels cleanly (completed shards stay for `resume=True`).
#[pyfunction]
#[pyo3(signature = (sources, output, *, shard_size=core_pack::DEFAULT_SHARD_SIZE, threads=0, follow_symlinks=false,
    include=vec![], exclude=vec![], on_error=OnError::Fail, force=false, resume=false, options_json=None, progress=None,
    compress=Compress::None, zstd_dict=0, format=ShardFormat::Tar, h5_writer=None, part=None, plan=None, remove_source=false, dry_run=false, append=false,
    replace=false),
    text_signature = "(sources, output, *, shard_size=..., threads=0, follow_symlinks=False, include=..., exclude=..., on_error='fail', \
    force=False, resume=False, options_json=None, progress=None, compress='none', zstd_dict=0, format='tar', h5_writer=None, part=None, plan=None, \
    remove_source=False, dry_run=False, append=False, replace=False)")]
#[allow(clippy::too_many_arguments)]
pub fn pack<'py>(
    py: Python<'py>,
    sources: Vec<PathBuf>,
    output: PathBuf,
    shard_size: u64,
    threads: usize,
    follow_symlinks: bool,
    include: Vec<String>,
    exclude: Vec<String>,
    on_error: OnError,
    force: bool,
    resume: bool,
    options_json: Option<String>,
    progress: Option<Bound<'py, PyAny>>,
    compress: Compress,
    zstd_dict: usize,
    format: ShardFormat,
    h5_writer: Option<Bound<'py, PyAny>>,
    part: Option<(u32, Option<u32>)>,
    plan: Option<PathBuf>,
    remove_source: bool,
    dry_run: bool,
    append: bool,
    replace: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let mut opts = options(sources, output, shard_size, threads, follow_symlinks, include, exclude, on_error, compress, zstd_dict, format);
    opts.remove_source = remove_source;
    opts.dry_run = dry_run;
    opts.force = force;
    opts.resume = resume;
    opts.part = part;
    opts.plan = plan;
    opts.h5_writer = h5_writer.map(self::h5_writer);
    opts.options_json = match options_json {
        Some(s) => serde_json::from_str(&s).map_err(|e| PyValueError::new_err(format!("options_json: {e}")))?,
        None => serde_json::Value::Null,
    };
    if append {
        return appended(py, run_cancellable(py, progress.as_ref(), move |st| crate::append::append(&opts, replace, st))?);
    }
    if replace {
        return Err(PyValueError::new_err("replace=True goes with append=True"));
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
    d.set_item("skipped", skipped_list(py, &s.skipped)?)?;
    let removed = match &s.removed {
        None => None,
        Some(r) => {
            let rd = PyDict::new(py);
            rd.set_item("files", r.files)?;
            rd.set_item("directories", r.dirs)?;
            rd.set_item("already_gone", r.gone)?;
            rd.set_item("left", skipped_list(py, &r.left)?)?;
            rd.set_item("dry_run", r.dry_run)?;
            if r.dry_run {
                let paths = PyList::empty(py);
                for p in &r.would_remove {
                    paths.append(p.as_os_str())?;
                }
                rd.set_item("would_remove", paths)?;
            }
            Some(rd)
        }
    };
    d.set_item("removed", removed)?;
    d.set_item("empty_dirs", s.empty_dirs)?;
    d.set_item("hard_links", s.hard_links)?;
    d.set_item("sparse_files", s.sparse_files)?;
    Ok(d)
}

/// The summary of `pack(..., append=True)`: the keys of a pack's summary (files and bytes
/// packed, shards new) plus version, added, replaced, unchanged, samples.
fn appended(py: Python<'_>, s: crate::append::AppendSummary) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("output", s.output)?;
    d.set_item("files", s.added + s.replaced)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("shards", s.new_shards)?;
    d.set_item("resumed_shards", 0)?;
    d.set_item("seconds", s.seconds)?;
    d.set_item("already_complete", false)?;
    d.set_item("skipped", skipped_list(py, &s.skipped)?)?;
    d.set_item("version", s.version)?;
    d.set_item("added", s.added)?;
    d.set_item("replaced", s.replaced)?;
    d.set_item("unchanged", s.unchanged)?;
    d.set_item("samples", s.samples)?;
    Ok(d)
}

/// Walks `sources` once, stats every file and writes the plan file `output`: the file list
/// and shard boundaries for `pack(..., plan=output, part=(i, n))`. Runs like `pack`. Returns
/// a dict (files, shards, bytes, plan_bytes, skipped).
#[pyfunction]
#[pyo3(signature = (sources, output, *, shard_size=core_pack::DEFAULT_SHARD_SIZE, threads=0, follow_symlinks=false,
    include=vec![], exclude=vec![], on_error=OnError::Fail, compress=Compress::None, zstd_dict=0, format=ShardFormat::Tar,
    progress=None, parts=None),
    text_signature = "(sources, output, *, shard_size=..., threads=0, follow_symlinks=False, include=..., exclude=..., on_error='fail', \
    compress='none', zstd_dict=0, format='tar', progress=None, parts=None)")]
#[allow(clippy::too_many_arguments)]
pub fn plan<'py>(
    py: Python<'py>,
    sources: Vec<PathBuf>,
    output: PathBuf,
    shard_size: u64,
    threads: usize,
    follow_symlinks: bool,
    include: Vec<String>,
    exclude: Vec<String>,
    on_error: OnError,
    compress: Compress,
    zstd_dict: usize,
    format: ShardFormat,
    progress: Option<Bound<'py, PyAny>>,
    parts: Option<u32>,
) -> PyResult<Bound<'py, PyDict>> {
    let mut opts = options(sources, output, shard_size, threads, follow_symlinks, include, exclude, on_error, compress, zstd_dict, format);
    opts.plan_parts = parts;
    let (plan, size) = run_cancellable(py, progress.as_ref(), move |st| {
        let plan = crate::plan::make_plan(&opts, st, None)?;
        let size = crate::plan::write_plan(&plan, &opts.output)?;
        Ok((plan, size))
    })?;
    let d = PyDict::new(py);
    d.set_item("files", plan.files.len())?;
    d.set_item("shards", plan.cuts.len())?;
    d.set_item("bytes", plan.bytes)?;
    d.set_item("plan_bytes", size)?;
    d.set_item("parts", plan.parts)?;
    d.set_item("skipped", skipped_list(py, &plan.skipped)?)?;
    Ok(d)
}

/// Joins the finished parts of a partitioned pack in `output` into one dataset (GIL released).
#[pyfunction]
#[pyo3(signature = (output, *, verify = false, progress = None))]
pub fn merge<'py>(py: Python<'py>, output: PathBuf, verify: bool, progress: Option<Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyDict>> {
    let s = run_cancellable(py, progress.as_ref(), move |p| crate::plan::merge_progress(&output, verify, p))?;
    let d = PyDict::new(py);
    d.set_item("parts", s.parts)?;
    d.set_item("samples", s.samples)?;
    d.set_item("shards", s.shards)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("already_merged", s.already_merged)?;
    Ok(d)
}

/// Runs `work` as a core [`Job`] while this thread waits with the GIL released; every 100 ms
/// it checks for signals (Ctrl-C cancels the job cleanly) and calls
/// `progress(phase, done, total, bytes_done, bytes_total)`.
pub(crate) fn run_cancellable<T: Send + 'static>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce(&Progress) -> crate::Result<T> + Send + 'static,
) -> PyResult<T> {
    let mut job = Job::spawn("packds-work", work).map_err(to_py)?;
    // The first report after 100 ms (a log gets its first line then; a command that fails at
    // once prints only its error), then every 100 ms.
    loop {
        if let Some(r) = py.detach(|| job.wait(Duration::from_millis(100))) {
            return r.map_err(to_py);
        }
        let st = job.progress();
        let cb = py.check_signals().and_then(|_| match &progress {
            Some(cb) => cb
                .call1((
                    st.phase.load(Relaxed),
                    st.files_done.load(Relaxed),
                    st.files_total.load(Relaxed),
                    st.bytes_done.load(Relaxed),
                    st.bytes_total.load(Relaxed),
                ))
                .map(|_| ()),
            None => Ok(()),
        });
        if let Err(e) = cb {
            py.detach(|| job.cancel());
            return Err(e);
        }
    }
}
