//! The one error type of cmz, with stable wire codes.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A boxed error kept as the `source` of an [`Error`] (never stringified).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with cmz's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The stable code of an [`Error`]: the `code` of the HTTP `Error` body and the `.code` of
/// the Python exception. [`Code::ALL`] lists every one, so the HTTP status table, the
/// Python exception classes and the tests can be checked to cover them all.
///
/// ```
/// use cmz_core::error::Code;
/// assert_eq!(Code::NotFound.as_str(), "not_found");
/// assert_eq!("rate_limit_exceeded".parse::<Code>(), Ok(Code::RateLimited));
/// assert!(Code::ALL.iter().all(|code| code.as_str().parse::<Code>() == Ok(*code)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Code {
    /// `validation_error`: malformed or out-of-bounds input.
    Validation,
    /// `not_found`: no such thing, or not the caller's to know of.
    NotFound,
    /// `forbidden`: a known caller who may not do this.
    Forbidden,
    /// `unauthorized`: missing, malformed or expired credentials.
    Unauthorized,
    /// `rate_limit_exceeded`: too many requests.
    RateLimited,
    /// `conflict`: a concurrent change won.
    Conflict,
    /// `unavailable`: a backend could not be reached or failed.
    Unavailable,
    /// `timeout`: a backend did not answer in time.
    Timeout,
    /// `internal_error`: a bug or broken invariant.
    Internal,
}

impl Code {
    /// Every code, in a stable order.
    pub const ALL: [Code; 9] = [
        Code::Validation,
        Code::NotFound,
        Code::Forbidden,
        Code::Unauthorized,
        Code::RateLimited,
        Code::Conflict,
        Code::Unavailable,
        Code::Timeout,
        Code::Internal,
    ];

    /// The code as it goes on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Code::Validation => "validation_error",
            Code::NotFound => "not_found",
            Code::Forbidden => "forbidden",
            Code::Unauthorized => "unauthorized",
            Code::RateLimited => "rate_limit_exceeded",
            Code::Conflict => "conflict",
            Code::Unavailable => "unavailable",
            Code::Timeout => "timeout",
            Code::Internal => "internal_error",
        }
    }

    /// Whether a request that failed with this code may succeed if retried later unchanged.
    pub const fn is_temporary(self) -> bool {
        matches!(
            self,
            Code::RateLimited | Code::Conflict | Code::Unavailable | Code::Timeout
        )
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AsRef<str> for Code {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for Code {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The text given to [`Code::from_str`] is not a cmz code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cmz error code {0:?}")]
pub struct UnknownCode(pub String);

impl FromStr for Code {
    type Err = UnknownCode;

    fn from_str(text: &str) -> Result<Self, UnknownCode> {
        Code::ALL
            .into_iter()
            .find(|code| code.as_str() == text)
            .ok_or_else(|| UnknownCode(text.to_owned()))
    }
}

/// Everything that can go wrong in cmz.
///
/// Each variant has a stable [`code`](Error::code) that is also the `code` of the HTTP
/// `Error` body and the `.code` of the Python exception, so a caller can match on it
/// across languages. The `message` is for people; never parse it. Every variant can keep
/// the error that caused it as its [`source`](std::error::Error::source)
/// ([`with_source`](Error::with_source)); the source is never pasted into the message.
///
/// ```
/// use cmz_core::Error;
/// use std::error::Error as _;
///
/// let io = std::io::Error::other("connection reset");
/// let err = Error::internal("store: decode a message").with_source(io);
/// assert_eq!(err.code(), "internal_error");
/// assert_eq!(err.to_string(), "store: decode a message");
/// assert_eq!(err.source().map(|s| s.to_string()).as_deref(), Some("connection reset"));
/// ```
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
        /// What failed to parse, when something did.
        #[source]
        source: Option<BoxError>,
    },
    /// The thing asked for does not exist, or the caller may not know that it does
    /// (`not_found`).
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, for example `session conv_lion_u1_0a1b2c3d`.
        what: String,
        /// The lookup's own error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The caller is known but may not do this (`forbidden`).
    #[error("{message}")]
    Forbidden {
        /// Why, for people (never reveals the data that was protected).
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The caller could not be identified: missing, malformed or expired credentials
    /// (`unauthorized`).
    #[error("{message}")]
    Unauthorized {
        /// A generic message; the precise reason goes to logs only.
        message: String,
        /// The precise reason (a token decoder's error, say); never shown to the caller.
        #[source]
        source: Option<BoxError>,
    },
    /// Too many requests (`rate_limit_exceeded`).
    #[error("{message}")]
    RateLimited {
        /// For people.
        message: String,
        /// How long to wait before trying again, when known.
        retry_after: Option<Duration>,
        /// The upstream's own error (a provider's 429, say), if any.
        #[source]
        source: Option<BoxError>,
    },
    /// A concurrent change won: a sequence guard or a uniqueness condition failed
    /// (`conflict`). Retrying after re-reading usually succeeds.
    #[error("{message}")]
    Conflict {
        /// What collided, for people.
        message: String,
        /// The backend's condition failure, if any.
        #[source]
        source: Option<BoxError>,
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
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
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
    /// The stable wire code.
    pub fn code(&self) -> Code {
        match self {
            Error::Validation { .. } => Code::Validation,
            Error::NotFound { .. } => Code::NotFound,
            Error::Forbidden { .. } => Code::Forbidden,
            Error::Unauthorized { .. } => Code::Unauthorized,
            Error::RateLimited { .. } => Code::RateLimited,
            Error::Conflict { .. } => Code::Conflict,
            Error::Unavailable { .. } => Code::Unavailable,
            Error::Timeout { .. } => Code::Timeout,
            Error::Internal { .. } => Code::Internal,
        }
    }

    /// Whether the same request may succeed if retried later unchanged.
    pub fn is_temporary(&self) -> bool {
        self.code().is_temporary()
    }

    /// An error of `code` with `message` and no further detail (no field, no retry time):
    /// for front ends and tests that start from a code. The specific constructors below
    /// carry more.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        let message = message.into();
        match code {
            Code::Validation => Error::Validation {
                message,
                field: None,
                source: None,
            },
            Code::NotFound => Error::not_found(message),
            Code::Forbidden => Error::forbidden(message),
            Code::Unauthorized => Error::unauthorized(message),
            Code::RateLimited => Error::rate_limited(message, None),
            Code::Conflict => Error::conflict(message),
            Code::Unavailable => Error::Unavailable {
                message,
                source: None,
            },
            Code::Timeout => Error::timeout(message, Duration::ZERO),
            Code::Internal => Error::internal(message),
        }
    }

    /// Keeps `source` as the cause of this error (replacing any earlier one). The
    /// message stays as it is: the source is for logs and `Error::source`, not for the
    /// caller.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        let slot = match &mut self {
            Error::Validation { source, .. }
            | Error::NotFound { source, .. }
            | Error::Forbidden { source, .. }
            | Error::Unauthorized { source, .. }
            | Error::RateLimited { source, .. }
            | Error::Conflict { source, .. }
            | Error::Unavailable { source, .. }
            | Error::Timeout { source, .. }
            | Error::Internal { source, .. } => source,
        };
        *slot = Some(source.into());
        self
    }

    /// The message followed by every source's, each after `: `: for an operator's log or
    /// a command's last words (a caller over HTTP or Python sees the message only).
    ///
    /// ```
    /// let err = cmz_core::Error::internal("decode").with_source(std::io::Error::other("eof"));
    /// assert_eq!(err.report(), "decode: eof");
    /// ```
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut next = std::error::Error::source(self);
        while let Some(cause) = next {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            next = cause.source();
        }
        text
    }

    /// A `validation_error` about `field`.
    pub fn validation(field: &'static str, message: impl Into<String>) -> Self {
        Error::Validation {
            message: message.into(),
            field: Some(field),
            source: None,
        }
    }

    /// A `not_found` error for `what`.
    pub fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound {
            what: what.into(),
            source: None,
        }
    }

    /// A `forbidden` error.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Error::Forbidden {
            message: message.into(),
            source: None,
        }
    }

    /// An `unauthorized` error (keep the message generic; put the reason in a source).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Error::Unauthorized {
            message: message.into(),
            source: None,
        }
    }

    /// A `rate_limit_exceeded` error, with the wait when it is known.
    pub fn rate_limited(message: impl Into<String>, retry_after: Option<Duration>) -> Self {
        Error::RateLimited {
            message: message.into(),
            retry_after,
            source: None,
        }
    }

    /// A `conflict` error.
    pub fn conflict(message: impl Into<String>) -> Self {
        Error::Conflict {
            message: message.into(),
            source: None,
        }
    }

    /// An `unavailable` error keeping the backend's error as its source.
    pub fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A `timeout`: `what` was waited for `after`.
    pub fn timeout(what: impl Into<String>, after: Duration) -> Self {
        Error::Timeout {
            what: what.into(),
            after,
            source: None,
        }
    }

    /// An `internal_error` with no underlying source (add one with
    /// [`with_source`](Error::with_source)).
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
        let timeout = Error::timeout("model", Duration::from_secs(1));
        assert_eq!(timeout.code(), "timeout");
        assert!(timeout.is_temporary());
    }

    #[test]
    fn every_code_round_trips_and_every_variant_keeps_a_source() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            assert!(seen.insert(code.as_str()), "{code} listed twice");
            assert_eq!(code.as_str().parse::<Code>(), Ok(code));
            assert_eq!(code.to_string(), code.as_str());
            let err = Error::new(code, "message").with_source(std::io::Error::other("cause"));
            assert_eq!(err.code(), code, "Error::new({code}) has another code");
            assert_eq!(err.is_temporary(), code.is_temporary());
            let source = err
                .source()
                .unwrap_or_else(|| panic!("{code} lost its source"));
            assert_eq!(source.to_string(), "cause");
            assert!(
                !err.to_string().contains("cause"),
                "{code}: the source is pasted into the message"
            );
        }
        assert!("teapot".parse::<Code>().is_err());
    }
}
