//! [`RequireAuthLayer`]: verifies the access token and puts the caller in request extensions.

use std::task::{Context, Poll};

use axum::http::Request;
use axum::response::{IntoResponse, Response};
use cmz_core::auth::AuthService;
use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::error::ApiError;

/// The raw access token of an authenticated request (for logout), in request extensions.
#[derive(Debug, Clone)]
pub struct AccessToken(pub String);

/// Requires a valid access token: `Authorization: Bearer <token>`, or, on routes built
/// [`with_query_token`](Self::with_query_token), `?token=<token>` on EventSource requests
/// (`GET`, `Accept: text/event-stream`) whose clients cannot set headers. Puts the
/// verified [`Principal`](cmz_core::access::Principal) and the [`AccessToken`] in the
/// request's extensions; anything else gets 401 with the `Error` body.
///
/// Use it in front of any routes, not only cmz's:
///
/// ```no_run
/// # async fn demo(auth: cmz_core::auth::AuthService) {
/// use axum::{Extension, Router, routing::get};
/// use cmz_core::access::Principal;
///
/// let app: Router = Router::new()
///     .route("/whoami", get(|Extension(me): Extension<Principal>| async move { me.user_id.to_string() }))
///     .layer(cmz_tower::RequireAuthLayer::new(auth));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RequireAuthLayer {
    auth: AuthService,
    query_token: bool,
}

/// The former name of [`RequireAuthLayer`].
#[deprecated(
    note = "renamed RequireAuthLayer (the layer of RequireAuth, as tower-http names its pairs)"
)]
pub type AuthLayer = RequireAuthLayer;

impl RequireAuthLayer {
    /// A layer verifying tokens from the `Authorization` header with `auth`.
    pub fn new(auth: AuthService) -> Self {
        Self {
            auth,
            query_token: false,
        }
    }

    /// Also reads the token from `?token=` on EventSource requests (`GET` with
    /// `Accept: text/event-stream`, and no `Authorization` header). Only for streaming
    /// routes a browser opens with `EventSource`, which cannot send headers: a token in a
    /// URL ends up in logs and browser history, so every other route ignores it.
    pub fn with_query_token(mut self) -> Self {
        self.query_token = true;
        self
    }
}

impl<S> Layer<S> for RequireAuthLayer {
    type Service = RequireAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireAuth {
            inner,
            auth: self.auth.clone(),
            query_token: self.query_token,
        }
    }
}

/// The service [`RequireAuthLayer`] makes.
#[derive(Debug, Clone)]
pub struct RequireAuth<S> {
    inner: S,
    auth: AuthService,
    query_token: bool,
}

impl<S> RequireAuth<S> {
    /// The wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The token of a request: the Authorization header, or else, when `query_token` allows
/// it, `?token=` on an EventSource request (`GET` with `Accept: text/event-stream`, which
/// browsers cannot give headers). Other requests never read tokens from the URL, where
/// they would end up in logs and browser history.
pub(crate) fn token_of<B>(request: &Request<B>, query_token: bool) -> Option<String> {
    if let Some(value) = request.headers().get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?.trim();
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    let event_source = query_token
        && request.method() == axum::http::Method::GET
        && request
            .headers()
            .get(axum::http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"));
    if !event_source {
        return None;
    }
    request.uri().query().and_then(|query| {
        query.split('&').find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            (name == "token").then(|| percent_decode(value))
        })
    })
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl<S, B> Service<Request<B>> for RequireAuth<S>
where
    S: Service<Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The clone that was driven to readiness serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        let query_token = self.query_token;
        Box::pin(async move {
            let Some(token) = token_of(&request, query_token) else {
                return Ok(
                    ApiError::new("unauthorized", "Missing or invalid token").into_response()
                );
            };
            match auth.authenticate(&token).await {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    request.extensions_mut().insert(AccessToken(token));
                    inner.call(request).await
                }
                Err(error) => Ok(ApiError::from(error).into_response()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_the_header_or_the_query() {
        let sse = |uri: &str| {
            Request::builder()
                .uri(uri)
                .header("accept", "text/event-stream")
                .body(())
                .unwrap()
        };
        assert_eq!(
            token_of(&sse("/x?token=abc%2Edef"), true).as_deref(),
            Some("abc.def")
        );
        assert_eq!(
            token_of(&sse("/x?token=abc"), false),
            None,
            "only routes built with_query_token read ?token="
        );
        let plain = Request::builder().uri("/x?token=abc").body(()).unwrap();
        assert_eq!(
            token_of(&plain, true),
            None,
            "only EventSource requests read ?token="
        );
        let post = Request::builder()
            .method("POST")
            .uri("/x?token=abc")
            .header("accept", "text/event-stream")
            .body(())
            .unwrap();
        assert_eq!(token_of(&post, true), None);
        let req = Request::builder()
            .uri("/x?token=q")
            .header("authorization", "Bearer hdr")
            .body(())
            .unwrap();
        assert_eq!(
            token_of(&req, true).as_deref(),
            Some("hdr"),
            "the header wins"
        );
        let req = Request::builder()
            .uri("/x")
            .header("authorization", "Basic abc")
            .body(())
            .unwrap();
        assert_eq!(token_of(&req, true), None);
        assert_eq!(token_of(&sse("/x?tokens=1&a=%"), true), None);
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
    }
}
