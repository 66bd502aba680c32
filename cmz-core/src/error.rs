//! The one error type of cmz, with stable wire codes.

use std::time::Duration;

/// A boxed error kept as the `source` of an [`Error`] (never stringified).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with cmz's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in cmz.
///
/// Each variant has a stable [`code`](Error::code) that is also the `code` of the HTTP
/// `Error` body and the `.code` of the Python exception, so a caller can match on it
/// across languages. The `message` is for people; never parse it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input was malformed or out of bounds (`validation_error`).
    #[error("{message}")]
    Validation {
        /// What was wrong, for people.
        message: String,
        /// The field (or parameter) at fault, when there is one.
        field: Option<&'static str>,
    },
    /// The thing asked for does not exist, or the caller may not know that it does
    /// (`not_found`).
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, for example `session conv_lion_u1_0a1b2c3d`.
        what: String,
    },
    /// The caller is known but may not do this (`forbidden`).
    #[error("{message}")]
    Forbidden {
        /// Why, for people (never reveals the data that was protected).
        message: String,
    },
    /// The caller could not be identified: missing, malformed or expired credentials
    /// (`unauthorized`).
    #[error("{message}")]
    Unauthorized {
        /// A generic message; the precise reason goes to logs only.
        message: String,
    },
    /// Too many requests (`rate_limit_exceeded`).
    #[error("{message}")]
    RateLimited {
        /// For people.
        message: String,
        /// How long to wait before trying again, when known.
        retry_after: Option<Duration>,
    },
    /// A concurrent change won: a sequence guard or a uniqueness condition failed
    /// (`conflict`). Retrying after re-reading usually succeeds.
    #[error("{message}")]
    Conflict {
        /// What collided, for people.
        message: String,
    },
    /// A backend (store, model) could not be reached or failed (`unavailable`).
    #[error("{message}")]
    Unavailable {
        /// Which backend and what it was doing.
        message: String,
        /// The backend's own error.
        #[source]
        source: Option<BoxError>,
    },
    /// A backend did not answer in time (`timeout`).
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The limit that ran out.
        after: Duration,
    },
    /// A bug or broken invariant inside cmz or a backend (`internal_error`).
    #[error("{message}")]
    Internal {
        /// For people.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// The stable wire code: `validation_error`, `not_found`, `forbidden`, `unauthorized`,
    /// `rate_limit_exceeded`, `conflict`, `unavailable`, `timeout` or `internal_error`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Validation { .. } => "validation_error",
            Error::NotFound { .. } => "not_found",
            Error::Forbidden { .. } => "forbidden",
            Error::Unauthorized { .. } => "unauthorized",
            Error::RateLimited { .. } => "rate_limit_exceeded",
            Error::Conflict { .. } => "conflict",
            Error::Unavailable { .. } => "unavailable",
            Error::Timeout { .. } => "timeout",
            Error::Internal { .. } => "internal_error",
        }
    }

    /// Whether the same request may succeed if retried later unchanged.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            Error::RateLimited { .. }
                | Error::Conflict { .. }
                | Error::Unavailable { .. }
                | Error::Timeout { .. }
        )
    }

    /// A `validation_error` about `field`.
    pub fn validation(field: &'static str, message: impl Into<String>) -> Self {
        Error::Validation {
            message: message.into(),
            field: Some(field),
        }
    }

    /// A `not_found` error for `what`.
    pub fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound { what: what.into() }
    }

    /// A `forbidden` error.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Error::Forbidden {
            message: message.into(),
        }
    }

    /// A `conflict` error.
    pub fn conflict(message: impl Into<String>) -> Self {
        Error::Conflict {
            message: message.into(),
        }
    }

    /// An `unavailable` error keeping the backend's error as its source.
    pub fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// An `internal_error` with no underlying source.
    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal {
            message: message.into(),
            source: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn codes_are_stable_and_sources_kept() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::unavailable("store: append", io);
        assert_eq!(err.code(), "unavailable");
        assert!(err.is_temporary());
        let source = err.source().expect("source kept");
        assert_eq!(source.to_string(), "refused");
        assert!(source.downcast_ref::<std::io::Error>().is_some());

        assert_eq!(
            Error::validation("message", "empty").code(),
            "validation_error"
        );
        assert!(!Error::validation("message", "empty").is_temporary());
        assert_eq!(
            Error::not_found("session x").to_string(),
            "session x not found"
        );
        assert_eq!(Error::forbidden("no").code(), "forbidden");
        assert_eq!(Error::conflict("seq").code(), "conflict");
        assert_eq!(Error::internal("bug").code(), "internal_error");
        let timeout = Error::Timeout {
            what: "model".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(timeout.code(), "timeout");
        assert!(timeout.is_temporary());
    }
}
