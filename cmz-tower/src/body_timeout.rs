//! [`BodyTimeoutLayer`]: a request body must arrive in full within a time limit, or the
//! request ends with `408 request_timeout`.
//!
//! The header timeout of the accept loop ends once a request head is in; without this
//! layer a client could then send `Content-Length: 60000` and trickle one byte every few
//! seconds (or nothing at all), holding a connection and a handler for as long as the
//! request timeout allows. The limit counts from the moment the request reaches the layer
//! (its head is in) to the body's last byte, in all: bytes that keep moving do not reset
//! it. Responses are not affected, so a long Server-Sent Events stream runs on.
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, routing::post};
//! use cmz_tower::BodyTimeoutLayer;
//!
//! let app: Router = Router::new()
//!     .route("/echo", post(|body: String| async move { body }))
//!     .layer(BodyTimeoutLayer::new(Duration::from_secs(10)));
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Request, header};
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::error::ApiError;

/// Ends requests whose body has not arrived in full within `timeout` with
/// `408 request_timeout` (the `Error` body, and `Connection: close`).
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeoutLayer {
    timeout: Duration,
}

impl BodyTimeoutLayer {
    /// A layer giving each request body `timeout` to arrive, counted from when the request
    /// reaches the layer.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for BodyTimeoutLayer {
    type Service = BodyTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service [`BodyTimeoutLayer`] makes.
#[derive(Debug, Clone)]
pub struct BodyTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> BodyTimeout<S> {
    /// The wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<Request<Body>> for BodyTimeout<S>
where
    S: Service<Request<Body>>,
    S::Response: IntoResponse,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BodyTimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let expired = Arc::new(AtomicBool::new(false));
        let timeout = self.timeout;
        let request = request.map(|body| {
            Body::new(TimedBody {
                inner: body,
                deadline: Instant::now() + timeout,
                timer: None,
                expired: expired.clone(),
                finished: false,
            })
        });
        BodyTimeoutFuture {
            inner: self.inner.call(request),
            expired,
            timeout,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`BodyTimeout`]: the inner service's response, or `408` when
    /// the body ran out of time. A plain wrapper, not a boxed future: no allocation and no
    /// copy of the inner future.
    #[derive(Debug)]
    pub struct BodyTimeoutFuture<F> {
        #[pin]
        inner: F,
        expired: Arc<AtomicBool>,
        timeout: Duration,
    }
}

impl<F, R, E> Future for BodyTimeoutFuture<F>
where
    F: Future<Output = Result<R, E>>,
    R: IntoResponse,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        if !this.expired.load(Ordering::Acquire) {
            return Poll::Ready(Ok(response.into_response()));
        }
        Poll::Ready(Ok(timed_out(*this.timeout)))
    }
}

/// What a request whose body did not arrive within `timeout` gets, whatever the handler
/// made of the failed read (a 400 from an extractor, most likely): the client was too
/// slow, and the connection closes, since its unread body bytes cannot be told apart from
/// a next request.
fn timed_out(timeout: Duration) -> Response {
    tracing::debug!(
        timeout_ms = timeout.as_millis() as u64,
        "a request body did not arrive in time"
    );
    let mut timed_out = ApiError::new(
        "request_timeout",
        format!(
            "the request body did not arrive within {} ms",
            timeout.as_millis()
        ),
    )
    .into_response();
    timed_out
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    timed_out
}

/// The error a body read gets once the limit has passed.
#[derive(Debug)]
struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimedOut {}

/// A request body with a deadline for its last byte.
struct TimedBody {
    inner: Body,
    deadline: Instant,
    /// Made the first time the body has to wait: a body that came whole with its head (a
    /// JSON turn) never starts a timer.
    timer: Option<Pin<Box<Sleep>>>,
    expired: Arc<AtomicBool>,
    finished: bool,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        // Bytes already here are taken first: only a body still incomplete at the deadline
        // fails.
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.finished = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(frame)) => return Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => {}
        }
        let deadline = self.deadline;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.finished = true;
                self.expired.store(true, Ordering::Release);
                Poll::Ready(Some(Err(Box::new(BodyTimedOut))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
