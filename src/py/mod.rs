//! Python bindings (`packds._core`). The only code that names pyo3: each function extracts
//! arguments (option strings become core enums in `convert`), runs the core with the GIL
//! released where the work is more than a copy, and maps errors to the exceptions defined in
//! `python/packds/errors.py`.

mod cache;
mod compose;
mod convert;
mod errors;
mod pack;
mod reader;
mod stage;
mod tarindex;
mod writer;

pub(crate) use pack::run_cancellable;
use pyo3::prelude::*;
pub use reader::PyReader;

#[pymodule(name = "_core")]
mod core_module {
    #[pymodule_export]
    use super::cache::{PyLocalShard, PyShardCache};
    #[pymodule_export]
    use super::compose::{compact, concat, subset};
    #[pymodule_export]
    use super::pack::{merge, pack, plan};
    #[pymodule_export]
    use super::stage::{
        dataset_files, dataset_kind, disambiguated_name, is_intact_with_options, is_staged_at, path_open_to_others, preload, remove_stale_copy, stage_dataset,
        stage_file, staged_copy_trust, tree_fingerprint, verify_copy, PyStageProgress,
    };
    #[pymodule_export]
    use super::tarindex::{index_tars, PyGroups};
    #[pymodule_export]
    use super::writer::PyWriter;
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
