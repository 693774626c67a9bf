//! Core errors → Python exceptions (defined in `python/packds/errors.py`).

use crate::error::Error;
use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError};
use pyo3::prelude::*;
use pyo3::types::PyAnyMethods;

pyo3::import_exception!(packds.errors, PackdsError);
pyo3::import_exception!(packds.errors, FormatError);
pyo3::import_exception!(packds.errors, ChecksumError);
pyo3::import_exception!(packds.errors, NoSpaceError);
pyo3::import_exception!(packds.errors, UsageError);
pyo3::import_exception!(packds.errors, SourceChangedError);
pyo3::import_exception!(packds.errors, UnsafePathError);
pyo3::import_exception!(packds.errors, DuplicateKeyError);

/// Text of an io::Error without std's " (os error N)" suffix.
fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

pub fn to_py(e: Error) -> PyErr {
    let hint = e.hint();
    let msg = e.to_string();
    let err = match &e {
        Error::Io { op, path, source } => match source.raw_os_error() {
            Some(errno) => PyOSError::new_err((errno, format!("cannot {op}: {}", strerror(source)), path.clone().into_os_string())),
            None => PyOSError::new_err(msg.clone()),
        },
        Error::NoSpace { path } => NoSpaceError::new_err((libc::ENOSPC, msg.clone(), path.clone().into_os_string())),
        Error::Format { .. } => FormatError::new_err(msg.clone()),
        Error::Checksum { .. } => ChecksumError::new_err(msg.clone()),
        Error::Usage { .. } => UsageError::new_err(msg.clone()),
        Error::Changed { .. } => SourceChangedError::new_err(msg.clone()),
        Error::Escape { .. } => UnsafePathError::new_err(msg.clone()),
        Error::DuplicateKey { .. } => DuplicateKeyError::new_err(msg.clone()),
        Error::Cancelled => PyKeyboardInterrupt::new_err("interrupted"),
    };
    Python::attach(|py| {
        let v = err.value(py);
        let _ = v.setattr("hint", hint);
        if let Error::DuplicateKey { key } = &e {
            let _ = v.setattr("key", key.as_str());
        }
        if let Error::Checksum { key, shard } = &e {
            let _ = v.setattr("key", key.as_str());
            let _ = v.setattr("shard", shard.clone().into_os_string());
        }
    });
    err
}
