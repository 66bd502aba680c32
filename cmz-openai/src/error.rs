//! What can go wrong talking to a model server, and how it maps onto cmz's error codes.

use std::time::Duration;

use cmz_core::{BoxError, Error};

use crate::wire::WireError;

/// The kind of a model-server failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OpenAiErrorKind {
    /// 401/403: the server rejected the API key (a deployment problem, not the caller's).
    Authentication,
    /// 429: throttled.
    RateLimited,
    /// 429 `insufficient_quota`: the account is out of credit; retrying will not help.
    QuotaExceeded,
    /// 400 `context_length_exceeded`: the prompt is too long for the model.
    ContextLength,
    /// The provider's content filter refused the prompt or the reply.
    ContentFilter,
    /// Another 4xx: the request was not understood.
    BadRequest,
    /// 404: no such model or deployment.
    NotFound,
    /// 408, 409 or 5xx.
    Server,
    /// No answer in time.
    Timeout,
    /// The connection failed or broke.
    Connection,
    /// The response was not the JSON or SSE the API specifies.
    Decode,
    /// The stream ended before the reply was complete.
    StreamCut,
    /// The local request queue is full.
    QueueFull,
}

/// A model-server failure, kept as the `source` of the [`cmz_core::Error`] it maps to.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OpenAiError {
    /// What kind of failure.
    pub kind: OpenAiErrorKind,
    /// The HTTP status, if a response arrived.
    pub status: Option<u16>,
    /// The server's message (or ours).
    pub message: String,
    /// The API's error `type`, when given.
    pub api_type: Option<String>,
    /// The API's error `code`, when given.
    pub api_code: Option<String>,
    /// How long the server asked us to wait, when it said.
    pub retry_after: Option<Duration>,
    #[source]
    source: Option<BoxError>,
}

impl OpenAiError {
    pub(crate) fn new(kind: OpenAiErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            status: None,
            message: message.into(),
            api_type: None,
            api_code: None,
            retry_after: None,
            source: None,
        }
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Classifies an error response from its status and body.
    pub(crate) fn from_response(
        status: u16,
        body: Option<WireError>,
        retry_after: Option<Duration>,
    ) -> Self {
        let body = body.unwrap_or_default();
        let code = body.code.clone().unwrap_or_default();
        let kind_text = body.kind.clone().unwrap_or_default();
        let has = |needle: &str| code.contains(needle) || kind_text.contains(needle);
        let kind = match status {
            401 | 403 => OpenAiErrorKind::Authentication,
            429 if has("insufficient_quota") => OpenAiErrorKind::QuotaExceeded,
            429 => OpenAiErrorKind::RateLimited,
            404 => OpenAiErrorKind::NotFound,
            408 | 409 | 500..=599 => OpenAiErrorKind::Server,
            _ if has("context_length") => OpenAiErrorKind::ContextLength,
            _ if has("content_filter") || has("content_policy") => OpenAiErrorKind::ContentFilter,
            _ => OpenAiErrorKind::BadRequest,
        };
        Self {
            kind,
            status: Some(status),
            message: body.message.unwrap_or_else(|| format!("HTTP {status}")),
            api_type: body.kind,
            api_code: body.code,
            retry_after,
            source: None,
        }
    }

    /// Whether the official SDKs would retry this (408, 409, 429, 5xx, connection).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            OpenAiErrorKind::RateLimited
                | OpenAiErrorKind::Server
                | OpenAiErrorKind::Connection
                | OpenAiErrorKind::Timeout
        )
    }

    /// The cmz error this becomes, with this error kept as its source.
    pub fn into_error(self, model: &str, timeout: Duration) -> Error {
        let status = self
            .status
            .map(|s| format!(" (HTTP {s})"))
            .unwrap_or_default();
        let error = match self.kind {
            OpenAiErrorKind::RateLimited | OpenAiErrorKind::QueueFull => Error::rate_limited(
                format!("model {model} is busy{status}: {}", self.message),
                self.retry_after,
            ),
            OpenAiErrorKind::ContextLength => Error::validation(
                "message",
                format!(
                    "the conversation is too long for model {model}: {}",
                    self.message
                ),
            ),
            OpenAiErrorKind::ContentFilter => Error::validation(
                "message",
                format!(
                    "the model's content filter refused this message: {}",
                    self.message
                ),
            ),
            OpenAiErrorKind::Timeout => Error::timeout(format!("model {model}"), timeout),
            OpenAiErrorKind::BadRequest => Error::internal(format!(
                "model {model} rejected the request{status}: {}",
                self.message
            )),
            OpenAiErrorKind::Authentication => Error::Unavailable {
                message: format!("model {model}: the provider rejected the API key{status}"),
                source: None,
            },
            _ => Error::Unavailable {
                message: format!("model {model} failed{status}: {}", self.message),
                source: None,
            },
        };
        error.with_source(self)
    }
}

/// Parses `retry-after-ms`, then `retry-after` (seconds or an HTTP date).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    // Whatever a server sends, waits are capped at a day (never a panic on huge values).
    let cap = |seconds: f64| Duration::try_from_secs_f64(seconds.min(86_400.0)).ok();
    if let Some(ms) = text("retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return cap(ms / 1000.0);
    }
    let value = text("retry-after")?;
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0)
            .then(|| cap(seconds))
            .flatten();
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(
        date.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn responses_map_onto_cmz_codes() {
        let body = |code: &str| {
            Some(WireError {
                message: Some("m".into()),
                kind: Some("invalid_request_error".into()),
                code: Some(code.into()),
            })
        };
        let cases = [
            (401, body("invalid_api_key"), "unavailable"),
            (429, body("rate_limit_exceeded"), "rate_limit_exceeded"),
            (429, body("insufficient_quota"), "unavailable"),
            (400, body("context_length_exceeded"), "validation_error"),
            (400, body("content_filter"), "validation_error"),
            (400, body("something"), "internal_error"),
            (404, body("model_not_found"), "unavailable"),
            (500, None, "unavailable"),
            (503, None, "unavailable"),
        ];
        for (status, body, code) in cases {
            let err = OpenAiError::from_response(status, body, None);
            assert_eq!(
                err.into_error("m", Duration::from_secs(1)).code(),
                code,
                "{status}"
            );
        }
        assert!(OpenAiError::from_response(500, None, None).is_retryable());
        assert!(OpenAiError::from_response(408, None, None).is_retryable());
        assert!(!OpenAiError::from_response(401, None, None).is_retryable());
        assert!(!OpenAiError::from_response(429, body("insufficient_quota"), None).is_retryable());
    }

    #[test]
    fn retry_after_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(
            retry_after(&headers),
            Some(Duration::from_millis(150)),
            "ms wins"
        );
        let mut dated = HeaderMap::new();
        let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        dated.insert("retry-after", HeaderValue::from_str(&later).unwrap());
        let wait = retry_after(&dated).unwrap();
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        dated.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&dated), None);
        let mut huge = HeaderMap::new();
        huge.insert("retry-after-ms", HeaderValue::from_static("1e300"));
        assert_eq!(
            retry_after(&huge),
            Some(Duration::from_secs(86_400)),
            "capped, no panic"
        );
        huge.insert("retry-after-ms", HeaderValue::from_static("nan"));
        huge.insert("retry-after", HeaderValue::from_static("1e20"));
        assert_eq!(retry_after(&huge), Some(Duration::from_secs(86_400)));
    }
}
