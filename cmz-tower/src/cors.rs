//! CORS for the configured origins, paid for only by requests that are cross-origin.
//!
//! tower-http's [`Cors`] works out its headers on every request, whether or not it carries
//! an `Origin`; on `POST /convo_turn` that was about 4,700 instructions of a turn's 83,000.
//! A request without `Origin` is not a CORS request (browsers send one on every
//! cross-origin request and every preflight), so here it goes straight to the app and
//! gets only the `Vary` header [`Cors`] would have added, which keeps caches from serving
//! one kind of answer for the other. Requests with `Origin`, and every `OPTIONS` request,
//! go through [`Cors`] unchanged.

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{HeaderValue, Method, Request, Response, header};
use futures::FutureExt as _;
use futures::future::{Either, Map};
use tower::util::Oneshot;
use tower::{Layer, Service, ServiceExt as _};
use tower_http::cors::{Cors, CorsLayer};

/// What [`Cors`] puts in `Vary` (its default), on every response.
const VARY: HeaderValue = HeaderValue::from_static(
    "origin, access-control-request-method, access-control-request-headers",
);

/// [`CorsLayer`] for requests that carry `Origin` (and for `OPTIONS`); see the module.
#[derive(Debug, Clone)]
pub(crate) struct CorsIfOriginLayer {
    cors: Arc<CorsLayer>,
}

impl CorsIfOriginLayer {
    /// `cors` must allow its origins as a list (or a predicate), as `with_layers` does: one
    /// exact origin is sent to every request, `Origin` or not, which this layer would drop.
    pub(crate) fn new(cors: CorsLayer) -> Self {
        Self {
            cors: Arc::new(cors),
        }
    }
}

impl<S: Clone> Layer<S> for CorsIfOriginLayer {
    type Service = CorsIfOrigin<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CorsIfOrigin {
            cors: self.cors.clone(),
            plain: inner,
        }
    }
}

/// The service [`CorsIfOriginLayer`] makes. A router clones its routes' services for
/// every request: the CORS settings (lists of header values) are shared, not cloned, and
/// put around the inner service only for a request that needs them.
#[derive(Debug, Clone)]
pub(crate) struct CorsIfOrigin<S> {
    cors: Arc<CorsLayer>,
    plain: S,
}

type WithVary<F, B, E> = Map<F, fn(Result<Response<B>, E>) -> Result<Response<B>, E>>;

fn add_vary<B, E>(result: Result<Response<B>, E>) -> Result<Response<B>, E> {
    result.map(|mut response| {
        response.headers_mut().append(header::VARY, VARY);
        response
    })
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CorsIfOrigin<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future =
        Either<Oneshot<Cors<S>, Request<ReqBody>>, WithVary<S::Future, ResBody, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.plain.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if request.headers().contains_key(header::ORIGIN) || request.method() == Method::OPTIONS {
            // A copy of the inner service, made ready in its turn: `plain` stays ready.
            return Either::Left(self.cors.layer(self.plain.clone()).oneshot(request));
        }
        Either::Right(self.plain.call(request).map(add_vary as fn(_) -> _))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::post;

    fn app() -> Router {
        let cors = CorsLayer::new()
            .allow_origin(origins())
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]);
        Router::new()
            .route("/turn", post(|| async { "ok" }))
            .layer(CorsIfOriginLayer::new(cors))
    }

    /// As `with_layers` passes them: a list.
    fn origins() -> Vec<HeaderValue> {
        vec![
            HeaderValue::from_static("http://localhost:3000"),
            HeaderValue::from_static("http://localhost:3001"),
        ]
    }

    /// The headers tower-http's own layer gives the same request, to compare with.
    async fn headers_of(app: Router, request: Request<Body>) -> Vec<(String, String)> {
        let response = app.oneshot(request).await.unwrap();
        let mut headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
            .collect();
        headers.sort();
        headers
    }

    fn request(method: Method, origin: Option<&str>, preflight: bool) -> Request<Body> {
        let mut request = Request::builder().method(method).uri("/turn");
        if let Some(origin) = origin {
            request = request.header(header::ORIGIN, origin);
        }
        if preflight {
            request = request
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
                .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "authorization");
        }
        request.body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn answers_as_tower_http_does_with_and_without_an_origin() {
        let plain = || {
            Router::new().route("/turn", post(|| async { "ok" })).layer(
                CorsLayer::new()
                    .allow_origin(origins())
                    .allow_methods([Method::GET, Method::POST])
                    .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
            )
        };
        let cases = [
            (Method::POST, None, false),
            (Method::POST, Some("http://localhost:3000"), false),
            (Method::POST, Some("http://localhost:3001"), false),
            (Method::POST, Some("https://elsewhere.example"), false),
            (Method::GET, None, false),
            (Method::OPTIONS, Some("http://localhost:3000"), true),
            (Method::OPTIONS, Some("https://elsewhere.example"), true),
            (Method::OPTIONS, None, true),
        ];
        for (method, origin, preflight) in cases {
            let ours = headers_of(app(), request(method.clone(), origin, preflight)).await;
            let theirs = headers_of(plain(), request(method.clone(), origin, preflight)).await;
            assert_eq!(ours, theirs, "{method} {origin:?} preflight {preflight}");
        }
        // The request without an origin did skip the CORS work, and kept its `Vary`.
        let skipped = headers_of(app(), request(Method::POST, None, false)).await;
        assert!(
            skipped
                .iter()
                .any(|(name, value)| name == "vary" && value.starts_with("origin"))
        );
        assert!(
            !skipped
                .iter()
                .any(|(name, _)| name.starts_with("access-control"))
        );
    }
}
