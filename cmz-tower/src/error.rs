//! Every failure as the legacy `Error` body `{code, message, details}` with the right status.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cmz_core::Code;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// An HTTP error with the legacy body.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code (`validation_error`, `not_found`, …).
    pub code: String,
    /// For people.
    pub message: String,
    /// Structured details, when there are any.
    pub details: Option<Value>,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<u64>,
}

/// The status of each of cmz's own error codes.
pub fn status_of(code: Code) -> StatusCode {
    match code {
        Code::Validation => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Forbidden => StatusCode::FORBIDDEN,
        Code::Unauthorized => StatusCode::UNAUTHORIZED,
        Code::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        Code::Conflict => StatusCode::CONFLICT,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The codes only the HTTP layer answers with (a request refused before any service saw
/// it, or the legacy GDPR confirmation), with their statuses.
pub const HTTP_CODES: [(&str, StatusCode); 5] = [
    ("gdpr_confirmation_required", StatusCode::BAD_REQUEST),
    ("method_not_allowed", StatusCode::METHOD_NOT_ALLOWED),
    ("payload_too_large", StatusCode::PAYLOAD_TOO_LARGE),
    ("unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE),
    ("request_timeout", StatusCode::REQUEST_TIMEOUT),
];

/// The status an error code maps to: [`status_of`] for cmz's codes, [`HTTP_CODES`] for
/// the HTTP layer's own; anything else is a 500.
pub fn status_for(code: &str) -> StatusCode {
    match code.parse::<Code>() {
        Ok(code) => status_of(code),
        Err(_) => HTTP_CODES
            .iter()
            .find(|(name, _)| *name == code)
            .map_or(StatusCode::INTERNAL_SERVER_ERROR, |(_, status)| *status),
    }
}

impl ApiError {
    /// An error with `code` (its status follows from the code) and `message`.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            status: status_for(code),
            code: code.to_owned(),
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// A `validation_error` about `field`.
    pub fn validation(field: &str, message: impl Into<String>) -> Self {
        Self::new("validation_error", message).with_details(json!({ "field": field }))
    }
}

impl From<cmz_core::Error> for ApiError {
    fn from(error: cmz_core::Error) -> Self {
        let code = error.code().as_str();
        let mut api = ApiError::new(code, error.to_string());
        match &error {
            cmz_core::Error::Validation {
                field: Some(field), ..
            } => api.details = Some(json!({ "field": field })),
            cmz_core::Error::RateLimited {
                retry_after: Some(wait),
                ..
            } => {
                api.retry_after = Some(wait.as_secs().max(1));
                api.details = Some(json!({ "retryAfterSeconds": wait.as_secs().max(1) }));
            }
            // Backend details (table names, upstream URLs, provider messages) stay in the logs.
            cmz_core::Error::Internal { .. } => {
                tracing::error!(code, error = %error.report(), "request failed");
                api.message = "internal error".into();
            }
            cmz_core::Error::Unavailable { .. } => {
                tracing::error!(code, error = %error.report(), "request failed");
                api.message = "a service this request needs is unavailable; try again later".into();
            }
            cmz_core::Error::Timeout { .. } => {
                tracing::warn!(code, error = %error, "request timed out");
                api.message =
                    "a service this request needs did not answer in time; try again later".into();
            }
            _ => {}
        }
        api
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::metrics::error(&self.code);
        let mut body = json!({ "code": self.code, "message": self.message });
        if let Some(details) = self.details {
            body["details"] = details;
        }
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

fn from_rejection(status: StatusCode, text: String) -> ApiError {
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_client_error() => "validation_error",
        _ => "internal_error",
    };
    ApiError::new(code, text)
}

/// A JSON body; a bad one is a 4xx `Error` body (never axum's plain-text rejection).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        // The common case, read straight: `Content-Type: application/json` and a body
        // that parses. Anything else goes through axum's extractor, whose answers (with
        // the path of a bad field) are the ones clients get; tracking that path on every
        // body cost a fifth of reading one.
        let plain_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"application/json"));
        if !plain_json {
            return match Json::<T>::from_request(request, state).await {
                Ok(Json(value)) => Ok(Self(value)),
                Err(rejection) => Err(json_rejection(rejection)),
            };
        }
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|rejection| json_rejection(JsonRejection::from(rejection)))?;
        match serde_json::from_slice(&bytes) {
            Ok(value) => Ok(Self(value)),
            Err(_) => match Json::<T>::from_bytes(&bytes) {
                Ok(Json(value)) => Ok(Self(value)),
                Err(rejection) => Err(json_rejection(rejection)),
            },
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    from_rejection(rejection.status(), rejection.body_text())
}

/// A query string; a bad one is a 400 `Error` body.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::new("validation_error", rejection.body_text())
}

/// Turns any error response that is not already an `Error` body (a body-limit 413, a
/// timeout 408, a panic's 500) into one, so clients always get JSON.
pub(crate) fn ensure_error_body(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::GATEWAY_TIMEOUT => "timeout",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_client_error() => "validation_error",
        _ => "internal_error",
    };
    let message = status.canonical_reason().unwrap_or("error").to_owned();
    let (mut parts, _) = response.into_parts();
    let mut fixed = ApiError {
        status,
        ..ApiError::new(code, message)
    }
    .into_response();
    // Keep headers such as Allow and Retry-After.
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(value) = parts.headers.remove(&name) {
            fixed.headers_mut().insert(name, value);
        }
    }
    fixed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Body {
        animal_id: String,
        message: Option<String>,
    }

    fn request(content_type: &str, body: &str) -> Request {
        Request::builder()
            .method("POST")
            .header(header::CONTENT_TYPE, content_type)
            .body(axum::body::Body::from(body.to_owned()))
            .unwrap()
    }

    /// What axum's own extractor answers, as an `Error` body.
    async fn axums(content_type: &str, body: &str) -> Result<Body, (String, String)> {
        Json::<Body>::from_request(request(content_type, body), &())
            .await
            .map(|Json(body)| body)
            .map_err(|rejection| {
                let error = json_rejection(rejection);
                (error.code, error.message)
            })
    }

    async fn ours(content_type: &str, body: &str) -> Result<Body, (String, String)> {
        ApiJson::<Body>::from_request(request(content_type, body), &())
            .await
            .map(|ApiJson(body)| body)
            .map_err(|error| (error.code, error.message))
    }

    #[tokio::test]
    async fn a_json_body_is_read_as_axum_reads_it_with_the_same_errors() {
        for content_type in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/vnd.api+json",
            "text/plain",
        ] {
            for body in [
                r#"{"animalId": "lion", "message": "hi"}"#,
                r#"{"animalId": "lion"} "#,
                r#"{"animalId": 5}"#,
                r#"{"message": "hi"}"#,
                r#"{"animalId": "lion"} trailing"#,
                r#"{"animalId": "#,
                "",
                "[1, 2]",
            ] {
                let (ours, axums) = (
                    ours(content_type, body).await,
                    axums(content_type, body).await,
                );
                match (&ours, &axums) {
                    (Ok(a), Ok(b)) => assert_eq!(a.animal_id, b.animal_id),
                    (Err(a), Err(b)) => assert_eq!(a, b, "{content_type} {body:?}"),
                    _ => panic!("{content_type} {body:?}: {ours:?} against {axums:?}"),
                }
            }
        }
        let (code, message) = ours("application/json", r#"{"animalId": 5}"#)
            .await
            .unwrap_err();
        assert_eq!(code, "validation_error");
        assert!(
            message.contains("animalId"),
            "the bad field is named: {message}"
        );
    }
}
