//! [`SecurityHeadersLayer`]: the response headers that keep a browser from misusing what
//! the server sends.
//!
//! Every response gets, unless it already has them:
//! - `Content-Security-Policy`: by default [`API_CONTENT_SECURITY_POLICY`] (nothing may
//!   load, nothing may frame it), right for JSON and event streams; a page gets the policy
//!   it needs through [`with_content_security_policy`](SecurityHeadersLayer::with_content_security_policy);
//! - `X-Content-Type-Options: nosniff` (a JSON body is never run as a script or styles);
//! - `Referrer-Policy: no-referrer` (URLs, which may carry session ids, do not leak to
//!   other sites);
//! - `X-Frame-Options: DENY` (no clickjacking through frames in browsers without
//!   `frame-ancestors`).
//!
//! [`router`](crate::router) applies it with the API policy. Pages served beside the API
//! wrap their own routes in a layer with a page policy:
//!
//! ```
//! use axum::http::HeaderValue;
//! use axum::{Router, response::Html, routing::get};
//! use cmz_tower::SecurityHeadersLayer;
//!
//! let page: Router = Router::new()
//!     .route("/", get(|| async { Html("<p>hello</p>") }))
//!     .layer(SecurityHeadersLayer::new().with_content_security_policy(
//!         HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
//!     ));
//! ```

use std::task::{Context, Poll};

use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Response, header};
use tower::{Layer, Service};

use crate::headers::AddHeadersFuture;

/// The policy of API responses (JSON, event streams): they load nothing and may not be
/// framed.
pub const API_CONTENT_SECURITY_POLICY: &str = "default-src 'none'; frame-ancestors 'none'";

/// Adds the security headers to every response that does not set them itself.
#[derive(Debug, Clone)]
pub struct SecurityHeadersLayer {
    content_security_policy: HeaderValue,
}

impl Default for SecurityHeadersLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl SecurityHeadersLayer {
    /// The headers with the API policy ([`API_CONTENT_SECURITY_POLICY`]).
    pub fn new() -> Self {
        Self {
            content_security_policy: HeaderValue::from_static(API_CONTENT_SECURITY_POLICY),
        }
    }

    /// The same headers with another `Content-Security-Policy` (a page's).
    pub fn with_content_security_policy(mut self, policy: HeaderValue) -> Self {
        self.content_security_policy = policy;
        self
    }
}

impl<S> Layer<S> for SecurityHeadersLayer {
    type Service = SecurityHeaders<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SecurityHeaders {
            inner,
            content_security_policy: self.content_security_policy.clone(),
        }
    }
}

/// The service [`SecurityHeadersLayer`] makes.
#[derive(Debug, Clone)]
pub struct SecurityHeaders<S> {
    inner: S,
    content_security_policy: HeaderValue,
}

impl<S> SecurityHeaders<S> {
    /// The wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ResBody> Service<Request<B>> for SecurityHeaders<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = AddHeadersFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        AddHeadersFuture::new(
            self.inner.call(request),
            self.content_security_policy.clone(),
            add_security_headers,
        )
    }
}

/// Adds the security headers `headers` does not set already, with `policy` as the
/// `Content-Security-Policy`.
pub(crate) fn add_security_headers(headers: &mut HeaderMap, policy: HeaderValue) {
    let defaults: [(HeaderName, HeaderValue); 4] = [
        (header::CONTENT_SECURITY_POLICY, policy),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    ];
    for (name, value) in defaults {
        headers.entry(name).or_insert(value);
    }
}
