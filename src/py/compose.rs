//! Bindings for `crate::compose`: `concat` and `subset` (GIL released).

use super::errors::to_py;
use crate::compose::{self as core, ComposeSummary, Refer, Select};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;

fn summary<'py>(py: Python<'py>, s: ComposeSummary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("output", s.output)?;
    d.set_item("samples", s.samples)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("shards", s.shards)?;
    d.set_item("shards_left_out", s.shards_left_out)?;
    d.set_item("seconds", s.seconds)?;
    Ok(d)
}

/// One dataset `output` made of the datasets `sources` (keys prefixed by `prefixes`, one per
/// source, if given), linking to their shards; returns a summary dict.
#[pyfunction]
#[pyo3(signature = (sources, output, *, prefixes=vec![], link=Refer::Symlink, force=false),
    text_signature = "(sources, output, *, prefixes=..., link='symlink', force=False)")]
pub fn concat<'py>(py: Python<'py>, sources: Vec<PathBuf>, output: PathBuf, prefixes: Vec<String>, link: Refer, force: bool) -> PyResult<Bound<'py, PyDict>> {
    let s = py.detach(|| core::concat(&sources, &prefixes, &output, link, force)).map_err(to_py)?;
    summary(py, s)
}

/// The dataset `output` of the samples of `source` a selection picks, linking to the shards
/// that hold them; returns a summary dict.
#[pyfunction]
#[pyo3(signature = (source, output, *, include=vec![], exclude=vec![], keys=None, fraction=None, seed=0, complement=false, link=Refer::Symlink, force=false),
    text_signature = "(source, output, *, include=..., exclude=..., keys=None, fraction=None, seed=0, complement=False, link='symlink', force=False)")]
#[allow(clippy::too_many_arguments)] // the Python keyword arguments
pub fn subset<'py>(
    py: Python<'py>,
    source: PathBuf,
    output: PathBuf,
    include: Vec<String>,
    exclude: Vec<String>,
    keys: Option<Vec<Vec<u8>>>,
    fraction: Option<f64>,
    seed: u64,
    complement: bool,
    link: Refer,
    force: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let sel = Select { include, exclude, keys, fraction, seed, complement };
    let s = py.detach(|| core::subset(&source, &sel, &output, link, force)).map_err(to_py)?;
    summary(py, s)
}

/// Rewrites the live samples of the shards of `dataset` that hold unreferenced bytes (after
/// `pack(append=True, replace=True)`) into new shards, as a new version; returns a summary dict.
#[pyfunction]
#[pyo3(signature = (dataset, *, shard_size=crate::pack::DEFAULT_SHARD_SIZE))]
pub fn compact<'py>(py: Python<'py>, dataset: PathBuf, shard_size: u64) -> PyResult<Bound<'py, PyDict>> {
    let s = py.detach(|| crate::pack::compact(&dataset, shard_size)).map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("output", s.output)?;
    d.set_item("version", s.version)?;
    d.set_item("rewritten", s.rewritten)?;
    d.set_item("new_shards", s.new_shards)?;
    d.set_item("freed_bytes", s.freed_bytes)?;
    d.set_item("seconds", s.seconds)?;
    Ok(d)
}
