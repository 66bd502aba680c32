//! [`AddHeadersFuture`]: the response future shared by the layers that add headers to a
//! response (the security headers, `x-request-id`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::http::{HeaderMap, HeaderValue, Response};

pin_project_lite::pin_project! {
    /// The response future of the layers that add a header to the response
    /// ([`SecurityHeaders`](crate::SecurityHeaders), and the request-id layer): the inner
    /// service's, with `add` applied to its response's headers once. A plain wrapper, not a boxed future: it
    /// costs no allocation and no copy of the inner future.
    #[derive(Debug)]
    pub struct AddHeadersFuture<F> {
        #[pin]
        inner: F,
        add: Option<(HeaderValue, fn(&mut HeaderMap, HeaderValue))>,
    }
}

impl<F> AddHeadersFuture<F> {
    /// `inner`'s response, with `add(headers, value)` applied to it.
    pub(crate) fn new(inner: F, value: HeaderValue, add: fn(&mut HeaderMap, HeaderValue)) -> Self {
        Self {
            inner,
            add: Some((value, add)),
        }
    }
}

impl<F, ResBody, E> Future for AddHeadersFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some((value, add)) = this.add.take() {
            add(response.headers_mut(), value);
        }
        Poll::Ready(Ok(response))
    }
}
