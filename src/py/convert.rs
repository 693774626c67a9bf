//! Python values → core option enums, once, at the boundary: a str is parsed with the enum's
//! `FromStr`, whose error (a `UsageError`, a `ValueError`) names the option and the accepted
//! values.

use super::errors::to_py;
use crate::codec::Compress;
use crate::compose::Refer;
use crate::pack::ShardFormat;
use crate::tarindex::Link;
use crate::walk::OnError;
use pyo3::prelude::*;
use pyo3::types::PyString;
use pyo3::Borrowed;
use std::str::FromStr;

macro_rules! option_from_str {
    ($($t:ty),*) => {$(
        impl<'a, 'py> FromPyObject<'a, 'py> for $t {
            type Error = PyErr;

            fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
                let s = obj.cast::<PyString>()?;
                <$t>::from_str(&s.to_cow()?).map_err(to_py)
            }
        }
    )*};
}

option_from_str!(OnError, ShardFormat, Compress, Link, Refer);
