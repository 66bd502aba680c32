//! The one place where cmz errors become Python exceptions.

use cmz_core::Code;
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

/// The exception class of each code: the one table Python errors come from.
fn exception_for(code: Code, message: String) -> PyErr {
    match code {
        Code::Validation => ValidationError::new_err(message),
        Code::NotFound => NotFound::new_err(message),
        Code::Forbidden => Forbidden::new_err(message),
        Code::Unauthorized => Unauthorized::new_err(message),
        Code::RateLimited => RateLimited::new_err(message),
        Code::Conflict => Conflict::new_err(message),
        Code::Unavailable => Unavailable::new_err(message),
        Code::Timeout => Timeout::new_err(message),
        _ => InternalError::new_err(message),
    }
}

/// Converts a cmz error into its Python exception: the subclass for its code, with
/// `.code`, `.message`, `.details` (a dict) and, for rate limits, `.retry_after` (seconds).
/// The message is the error's [`report`](cmz_core::Error::report): its own text and its
/// causes', for the calling service's logs.
pub(crate) fn to_py(error: cmz_core::Error) -> PyErr {
    Python::attach(|py| {
        let message = error.report();
        let code = error.code();
        let err = exception_for(code, message.clone());
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
                // A daily token budget: which, how large, how much is used, when it resets
                // (the HTTP 429's details).
                if let Some(exceeded) = error.budget_exceeded() {
                    let status = exceeded.0;
                    let _ = details.set_item("budget", status.scope.as_str());
                    let _ = details.set_item("limit", status.budget);
                    let _ = details.set_item("used", status.used);
                    let _ = details.set_item(
                        "resetTime",
                        status
                            .resets_at
                            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    );
                }
            }
            _ => {}
        }
        let _ = value.setattr("code", code.as_str());
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
    let code: Code = code.parse().map_err(|e: cmz_core::error::UnknownCode| {
        pyo3::exceptions::PyValueError::new_err(e.to_string())
    })?;
    let error = match code {
        Code::Validation => cmz_core::Error::validation("field", message),
        Code::RateLimited => {
            cmz_core::Error::rate_limited(message, Some(std::time::Duration::from_secs(30)))
        }
        other => cmz_core::Error::new(other, message),
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
    let codes: Vec<&str> = Code::ALL.iter().map(|code| code.as_str()).collect();
    m.add("ERROR_CODES", pyo3::types::PyTuple::new(py, codes)?)?;
    m.add_function(pyo3::wrap_pyfunction!(_raise_error, m)?)?;
    Ok(())
}
