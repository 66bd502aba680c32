//! The one place where cmz errors become Python exceptions.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;

create_exception!(
    cmz,
    CmzError,
    PyException,
    "Base of every cmz error; `.code` is the stable wire code."
);
create_exception!(
    cmz,
    ValidationError,
    CmzError,
    "Bad input (`validation_error`)."
);
create_exception!(
    cmz,
    NotFound,
    CmzError,
    "No such thing, or not yours to know of (`not_found`)."
);
create_exception!(
    cmz,
    Forbidden,
    CmzError,
    "Known caller, not allowed (`forbidden`)."
);
create_exception!(
    cmz,
    Unauthorized,
    CmzError,
    "Missing, malformed or expired credentials (`unauthorized`)."
);
create_exception!(
    cmz,
    RateLimited,
    CmzError,
    "Too many requests (`rate_limit_exceeded`); see `.retry_after`."
);
create_exception!(
    cmz,
    Conflict,
    CmzError,
    "A concurrent change won (`conflict`); re-read and retry."
);
create_exception!(
    cmz,
    Unavailable,
    CmzError,
    "A backend could not be reached (`unavailable`)."
);
create_exception!(
    cmz,
    Timeout,
    CmzError,
    "A backend did not answer in time (`timeout`)."
);
create_exception!(
    cmz,
    InternalError,
    CmzError,
    "A bug or broken invariant (`internal_error`)."
);

/// Converts a cmz error into its Python exception: the subclass for its code, with
/// `.code`, `.message`, `.details` (a dict) and, for rate limits, `.retry_after` (seconds).
pub(crate) fn to_py(error: cmz_core::Error) -> PyErr {
    Python::attach(|py| {
        let message = error.to_string();
        let code = error.code();
        let err = match code {
            "validation_error" => ValidationError::new_err(message.clone()),
            "not_found" => NotFound::new_err(message.clone()),
            "forbidden" => Forbidden::new_err(message.clone()),
            "unauthorized" => Unauthorized::new_err(message.clone()),
            "rate_limit_exceeded" => RateLimited::new_err(message.clone()),
            "conflict" => Conflict::new_err(message.clone()),
            "unavailable" => Unavailable::new_err(message.clone()),
            "timeout" => Timeout::new_err(message.clone()),
            _ => InternalError::new_err(message.clone()),
        };
        let value = err.value(py);
        let details = PyDict::new(py);
        let mut retry_after: Option<f64> = None;
        match &error {
            cmz_core::Error::Validation {
                field: Some(field), ..
            } => {
                let _ = details.set_item("field", *field);
            }
            cmz_core::Error::RateLimited {
                retry_after: Some(after),
                ..
            } => {
                retry_after = Some(after.as_secs_f64());
                let _ = details.set_item("retryAfter", after.as_secs_f64());
            }
            _ => {}
        }
        let _ = value.setattr("code", code);
        let _ = value.setattr("message", message);
        let _ = value.setattr("details", details);
        let _ = value.setattr("retry_after", retry_after);
        err
    })
}

/// Raises the exception for `code` through [`to_py`], for tests of the mapping (every
/// code, including those hard to provoke for real).
#[pyfunction]
#[pyo3(signature = (code, message="test"))]
pub(crate) fn _raise_error(code: &str, message: &str) -> PyResult<()> {
    let error = match code {
        "validation_error" => cmz_core::Error::validation("field", message),
        "not_found" => cmz_core::Error::not_found(message),
        "forbidden" => cmz_core::Error::forbidden(message),
        "unauthorized" => cmz_core::Error::Unauthorized {
            message: message.to_owned(),
        },
        "rate_limit_exceeded" => cmz_core::Error::RateLimited {
            message: message.to_owned(),
            retry_after: Some(std::time::Duration::from_secs(30)),
        },
        "conflict" => cmz_core::Error::conflict(message),
        "unavailable" => cmz_core::Error::unavailable(message, std::io::Error::other("down")),
        "timeout" => cmz_core::Error::Timeout {
            what: message.to_owned(),
            after: std::time::Duration::from_secs(1),
        },
        "internal_error" => cmz_core::Error::internal(message),
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "unknown code {other:?}"
            )));
        }
    };
    Err(to_py(error))
}

/// Registers the exception classes on the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    for (name, class) in [
        ("CmzError", py.get_type::<CmzError>()),
        ("ValidationError", py.get_type::<ValidationError>()),
        ("NotFound", py.get_type::<NotFound>()),
        ("Forbidden", py.get_type::<Forbidden>()),
        ("Unauthorized", py.get_type::<Unauthorized>()),
        ("RateLimited", py.get_type::<RateLimited>()),
        ("Conflict", py.get_type::<Conflict>()),
        ("Unavailable", py.get_type::<Unavailable>()),
        ("Timeout", py.get_type::<Timeout>()),
        ("InternalError", py.get_type::<InternalError>()),
    ] {
        m.add(name, class)?;
    }
    m.add_function(pyo3::wrap_pyfunction!(_raise_error, m)?)?;
    Ok(())
}
