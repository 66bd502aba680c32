//! The chat model itself: requests, retries, streaming.

use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use eventsource_stream::Eventsource as _;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt as _};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument as _;

use cmz_core::chat::{ChatChunk, ChatCompletion, ChatModel, ChatRequest, Priority};
use cmz_core::{Error, Result};

use crate::config::{AuthStyle, OpenAiConfig};
use crate::error::{OpenAiError, OpenAiErrorKind, retry_after};
use crate::queue::RequestQueue;
use crate::wire::{WireErrorBody, WireRequest, WireResponse};

/// Error bodies are read up to this size.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Whole responses are read up to this size.
const MAX_RESPONSE_BODY: usize = 8 * 1024 * 1024;

/// A [`ChatModel`] backed by an OpenAI-compatible Chat Completions endpoint: OpenAI,
/// Azure OpenAI, vLLM, llama.cpp server, Ollama, LiteLLM and the like.
///
/// Cheap to clone; clones share the connection pool, the request queue and the cache.
#[derive(Debug, Clone)]
pub struct OpenAiChatModel {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: OpenAiConfig,
    http: reqwest::Client,
    chat_url: String,
    queue: RequestQueue,
    cache: Option<moka::future::Cache<u64, ChatCompletion>>,
}

/// The outcome of a health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The configured model.
    pub model: String,
    /// How long the check took.
    pub latency: Duration,
}

pub(crate) fn endpoint(config: &OpenAiConfig, path: &str) -> String {
    let base = config.base_url.trim_end_matches('/');
    match &config.auth {
        AuthStyle::Bearer => format!("{base}/{path}"),
        AuthStyle::Azure { api_version } => format!("{base}/{path}?api-version={api_version}"),
    }
}

fn backoff(config: &OpenAiConfig, attempt: u32) -> Duration {
    let ceiling = config
        .retry_base_delay
        .saturating_mul(1u32 << attempt.min(16))
        .min(config.retry_max_delay);
    // Half fixed, half random ("equal jitter"): spreads retries without waiting 0.
    let half = ceiling / 2;
    half + half.mul_f64(fastrand::f64())
}

impl OpenAiChatModel {
    /// A model with these settings.
    pub fn new(config: OpenAiConfig) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| Error::internal("could not build the HTTP client").with_source(e))?;
        let cache = config.cache.map(|c| {
            moka::future::Cache::builder()
                .max_capacity(c.capacity)
                .time_to_live(c.ttl)
                .build()
        });
        Ok(Self {
            inner: Arc::new(Inner {
                chat_url: endpoint(&config, "chat/completions"),
                queue: RequestQueue::new(config.max_concurrency, config.max_queue),
                http,
                cache,
                config,
            }),
        })
    }

    /// A model configured from the environment ([`OpenAiConfig::from_env`]).
    pub fn from_env() -> Result<Self> {
        Self::new(OpenAiConfig::from_env()?)
    }

    /// The settings in force.
    pub fn config(&self) -> &OpenAiConfig {
        &self.inner.config
    }

    pub(crate) fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let config = &self.inner.config;
        let mut request = request;
        if let Some(key) = &config.api_key {
            request = match config.auth {
                AuthStyle::Bearer => request.bearer_auth(key.expose()),
                AuthStyle::Azure { .. } => request.header("api-key", key.expose()),
            };
        }
        if let Some(org) = &config.organization {
            request = request.header("OpenAI-Organization", org);
        }
        if let Some(project) = &config.project {
            request = request.header("OpenAI-Project", project);
        }
        request
    }

    /// The reply stream [`ChatModel::stream`] makes of a response body arriving in these
    /// chunks, for the SSE fuzz target in `fuzz/`. No request is sent. Not a public API.
    #[cfg(any(test, feature = "fuzzing"))]
    #[doc(hidden)]
    pub fn stream_from_body(
        &self,
        chunks: Vec<Bytes>,
    ) -> Result<BoxStream<'static, Result<ChatChunk>>> {
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .map_err(|e| Error::internal(format!("fuzzing permit: {e}")))?;
        let body = futures::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
        Ok(ChunkStream::new(
            leading_bom_as_newline(body).eventsource(),
            permit,
            self.clone(),
        )
        .instrument_stream(tracing::Span::none())
        .boxed())
    }

    fn error(&self, error: OpenAiError) -> Error {
        error.into_error(&self.inner.config.model, self.inner.config.request_timeout)
    }

    /// Checks that the server answers and accepts the key (`GET /models`).
    pub async fn health(&self) -> Result<Health> {
        let started = std::time::Instant::now();
        let url = endpoint(&self.inner.config, "models");
        let response = self
            .authorize(self.inner.http.get(&url))
            .timeout(
                self.inner
                    .config
                    .request_timeout
                    .min(Duration::from_secs(10)),
            )
            .send()
            .instrument(tracing::debug_span!(
                "cmz.backend",
                kind = "model",
                op = "health"
            ))
            .await
            .map_err(|e| self.error(transport_error(e)))?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let wait = retry_after(response.headers());
            let body = read_limited(response, MAX_ERROR_BODY).await.ok();
            let api = body
                .and_then(|b| serde_json::from_slice::<WireErrorBody>(&b).ok())
                .map(|b| b.error);
            return Err(self.error(OpenAiError::from_response(status, api, wait)));
        }
        Ok(Health {
            model: self.inner.config.model.clone(),
            latency: started.elapsed(),
        })
    }

    /// Sends `body`, retrying what the official SDKs retry, and returns the first
    /// successful response (for a stream: before any of its body has been read) with the
    /// queue slot it holds. Each attempt takes a slot and gives it back before waiting to
    /// retry, so requests sleeping out a `retry-after` do not hold the queue.
    pub(crate) async fn send_with_retries(
        &self,
        url: &str,
        body: Bytes,
        stream: bool,
        priority: Priority,
    ) -> std::result::Result<(OwnedSemaphorePermit, reqwest::Response), OpenAiError> {
        let config = &self.inner.config;
        let mut attempt = 0;
        loop {
            let permit = self.inner.queue.acquire(priority).await?;
            let mut request = self
                .authorize(self.inner.http.post(url))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            if stream {
                request = request.header(reqwest::header::ACCEPT, "text/event-stream");
            } else {
                request = request.timeout(config.request_timeout);
            }
            // For a stream the timeout covers the wait for the response head only; the
            // caller bounds the time between chunks.
            let sent = tokio::time::timeout(config.request_timeout, request.send()).await;
            let error = match sent {
                Err(_) => OpenAiError::new(OpenAiErrorKind::Timeout, "no response in time"),
                Ok(Err(e)) => transport_error(e),
                Ok(Ok(response)) if response.status().is_success() => {
                    return Ok((permit, response));
                }
                Ok(Ok(response)) => {
                    let status = response.status().as_u16();
                    let wait = retry_after(response.headers());
                    let body = read_limited(response, MAX_ERROR_BODY).await.ok();
                    let api = body
                        .and_then(|b| serde_json::from_slice::<WireErrorBody>(&b).ok())
                        .map(|b| b.error);
                    OpenAiError::from_response(status, api, wait)
                }
            };
            if !error.is_retryable() || attempt >= config.max_retries {
                return Err(error);
            }
            let wait = error
                .retry_after
                .unwrap_or_else(|| backoff(config, attempt));
            if wait > config.retry_max_delay {
                return Err(error);
            }
            attempt += 1;
            drop(permit);
            tracing::info!(attempt, kind = ?error.kind, status = error.status, wait_ms = wait.as_millis() as u64, "retrying the model request");
            tokio::time::sleep(wait).await;
        }
    }

    fn cache_key(&self, body: &[u8]) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.inner.chat_url.hash(&mut hasher);
        body.hash(&mut hasher);
        hasher.finish()
    }
}

fn transport_error(error: reqwest::Error) -> OpenAiError {
    let kind = if error.is_timeout() {
        OpenAiErrorKind::Timeout
    } else {
        OpenAiErrorKind::Connection
    };
    OpenAiError::new(kind, format!("request failed: {error}")).with_source(error)
}

async fn read_limited(
    response: reqwest::Response,
    limit: usize,
) -> std::result::Result<Vec<u8>, OpenAiError> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(transport_error)?;
        if body.len() + chunk.len() > limit {
            return Err(OpenAiError::new(
                OpenAiErrorKind::Decode,
                format!("response larger than {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn decode_error(error: serde_json::Error) -> OpenAiError {
    OpenAiError::new(
        OpenAiErrorKind::Decode,
        format!("the server's JSON did not parse: {error}"),
    )
    .with_source(error)
}

fn api_error(error: crate::wire::WireError) -> OpenAiError {
    let status = error
        .code
        .as_deref()
        .and_then(|c| c.parse::<u16>().ok())
        .unwrap_or(500);
    OpenAiError::from_response(status, Some(error), None)
}

#[async_trait]
impl ChatModel for OpenAiChatModel {
    async fn complete(&self, request: ChatRequest) -> Result<ChatCompletion> {
        let inner = &self.inner;
        let body = serde_json::to_vec(&WireRequest::new(&inner.config, &request, false))
            .map_err(|e| self.error(decode_error(e)))?;
        let key = inner.cache.as_ref().map(|_| self.cache_key(&body));
        if let (Some(cache), Some(key)) = (&inner.cache, key) {
            if let Some(hit) = cache.get(&key).await {
                tracing::debug!("model response cache hit");
                return Ok(hit);
            }
        }
        let span = tracing::debug_span!("cmz.backend", kind = "model", op = "chat.completions", model = %inner.config.model);
        let completion = async {
            let (_permit, response) = self
                .send_with_retries(&inner.chat_url, Bytes::from(body), false, request.priority)
                .await?;
            let bytes = read_limited(response, MAX_RESPONSE_BODY).await?;
            let parsed: WireResponse = serde_json::from_slice(&bytes).map_err(decode_error)?;
            if let Some(error) = parsed.error {
                return Err(api_error(error));
            }
            let choice = parsed.choices.unwrap_or_default().into_iter().next();
            let finish = choice.as_ref().and_then(|c| c.finish_reason.clone());
            let message = choice.and_then(|c| c.message).unwrap_or_default();
            if finish.as_deref() == Some("content_filter")
                || (message.content.is_none() && message.refusal.is_some())
            {
                return Err(OpenAiError::new(
                    OpenAiErrorKind::ContentFilter,
                    message
                        .refusal
                        .unwrap_or_else(|| "the reply was filtered".into()),
                ));
            }
            Ok(ChatCompletion {
                content: message.content.unwrap_or_default(),
                usage: parsed.usage.and_then(|u| u.into_usage()),
                model: parsed.model,
            })
        }
        .instrument(span)
        .await
        .map_err(|e| self.error(e))?;
        if let (Some(cache), Some(key)) = (&inner.cache, key) {
            cache.insert(key, completion.clone()).await;
        }
        Ok(completion)
    }

    async fn stream(&self, request: ChatRequest) -> Result<BoxStream<'static, Result<ChatChunk>>> {
        let inner = &self.inner;
        let body = serde_json::to_vec(&WireRequest::new(&inner.config, &request, true))
            .map_err(|e| self.error(decode_error(e)))?;
        let span = tracing::debug_span!("cmz.backend", kind = "model", op = "chat.completions.stream", model = %inner.config.model);
        let (permit, response) = async {
            // Retries happen here, before the first byte of the stream; never after.
            self.send_with_retries(&inner.chat_url, Bytes::from(body), true, request.priority)
                .await
        }
        .instrument(span.clone())
        .await
        .map_err(|e| self.error(e))?;
        let events = leading_bom_as_newline(response.bytes_stream()).eventsource();
        Ok(ChunkStream::new(events, permit, self.clone())
            .instrument_stream(span)
            .boxed())
    }

    fn name(&self) -> &str {
        &self.inner.config.model
    }
}

/// A response body whose leading byte-order mark, if any, is replaced by a newline.
///
/// eventsource-stream 0.2.3 panics on a body that starts with U+FEFF (it slices the
/// 3-byte mark at byte 1; found by the `sse` fuzz target in `fuzz/`). The SSE format lets a
/// stream start with one mark, to be ignored; an empty line in its place is ignored as
/// well, and keeps a second mark, should one follow, away from the parser's first
/// character, where it would panic again. A mark split across chunks is recognized.
fn leading_bom_as_newline<S, E>(
    body: S,
) -> impl Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin
where
    S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin + 'static,
    E: Send + 'static,
{
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    // `Some(start)`: the body's first bytes, held until they are known not to be (or to
    // be) a whole mark.
    futures::stream::unfold(
        (body, Some(Vec::new())),
        |(mut body, mut start)| async move {
            loop {
                let Some(held) = start.as_mut() else {
                    let chunk = body.next().await?;
                    return Some((chunk, (body, None)));
                };
                match body.next().await {
                    Some(Ok(chunk)) => {
                        held.extend_from_slice(&chunk);
                        if held.len() < BOM.len() && BOM.starts_with(held) {
                            continue;
                        }
                        let mut held = std::mem::take(held);
                        if held.starts_with(BOM) {
                            held.splice(..BOM.len(), *b"\n");
                        }
                        return Some((Ok(Bytes::from(held)), (body, None)));
                    }
                    Some(Err(error)) => return Some((Err(error), (body, start))),
                    None => {
                        // The body ended within the first bytes of a mark: they are data.
                        let held = std::mem::take(held);
                        return (!held.is_empty()).then(|| (Ok(Bytes::from(held)), (body, None)));
                    }
                }
            }
        },
    )
    .boxed()
}

/// Turns SSE events into [`ChatChunk`]s: deltas, then one `Done` with the usage.
struct ChunkStream<S> {
    events: S,
    model: OpenAiChatModel,
    usage: Option<cmz_core::types::Usage>,
    reported_model: Option<String>,
    finished: bool,
    ended: bool,
    pending: std::collections::VecDeque<ChatChunk>,
    /// Holds the request's queue slot until the stream ends or is dropped.
    _permit: OwnedSemaphorePermit,
}

impl<S> ChunkStream<S> {
    fn new(events: S, permit: OwnedSemaphorePermit, model: OpenAiChatModel) -> Self {
        Self {
            events,
            model,
            usage: None,
            reported_model: None,
            finished: false,
            ended: false,
            pending: std::collections::VecDeque::new(),
            _permit: permit,
        }
    }

    fn done(&mut self) -> ChatChunk {
        self.ended = true;
        ChatChunk::Done {
            usage: self.usage.take(),
            model: self.reported_model.take(),
        }
    }

    /// Ends the stream with `error`. Deltas of the failing event are dropped: nothing
    /// follows an error (a filtered chunk's own text included).
    fn fail(&mut self, error: OpenAiError) -> Error {
        self.ended = true;
        self.pending.clear();
        self.model.error(error)
    }
}

impl<S, E> ChunkStream<S>
where
    S: Stream<
            Item = std::result::Result<
                eventsource_stream::Event,
                eventsource_stream::EventStreamError<E>,
            >,
        > + Send
        + Unpin
        + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    fn instrument_stream(
        self,
        span: tracing::Span,
    ) -> impl Stream<Item = Result<ChatChunk>> + Send + 'static {
        futures::stream::unfold(self, move |mut state| {
            let span = span.clone();
            async move {
                let item = state.next_item().instrument(span).await?;
                Some((item, state))
            }
        })
    }

    async fn next_item(&mut self) -> Option<Result<ChatChunk>> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return Some(Ok(chunk));
            }
            if self.ended {
                return None;
            }
            let event = match self.events.next().await {
                None if self.finished => return Some(Ok(self.done())),
                None => {
                    return Some(Err(self.fail(OpenAiError::new(
                        OpenAiErrorKind::StreamCut,
                        "the stream ended before the reply was complete",
                    ))));
                }
                Some(Err(eventsource_stream::EventStreamError::Transport(e))) => {
                    return Some(Err(self.fail(
                        OpenAiError::new(
                            OpenAiErrorKind::StreamCut,
                            format!("the stream broke: {e}"),
                        )
                        .with_source(e),
                    )));
                }
                Some(Err(e)) => {
                    return Some(Err(self.fail(OpenAiError::new(
                        OpenAiErrorKind::Decode,
                        format!("bad SSE framing: {e}"),
                    ))));
                }
                Some(Ok(event)) => event,
            };
            let data = event.data.trim();
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                return Some(Ok(self.done()));
            }
            let parsed: WireResponse = match serde_json::from_str(data) {
                Ok(parsed) => parsed,
                Err(e) => return Some(Err(self.fail(decode_error(e)))),
            };
            if let Some(error) = parsed.error {
                return Some(Err(self.fail(api_error(error))));
            }
            if parsed.model.is_some() {
                self.reported_model = parsed.model;
            }
            if let Some(usage) = parsed.usage.and_then(|u| u.into_usage()) {
                self.usage = Some(usage);
            }
            for choice in parsed.choices.unwrap_or_default().into_iter().take(1) {
                if let Some(text) = choice
                    .delta
                    .and_then(|d| d.content)
                    .filter(|t| !t.is_empty())
                {
                    self.pending.push_back(ChatChunk::Delta(text));
                }
                match choice.finish_reason.as_deref() {
                    Some("content_filter") => {
                        return Some(Err(self.fail(OpenAiError::new(
                            OpenAiErrorKind::ContentFilter,
                            "the reply was filtered",
                        ))));
                    }
                    Some(_) => self.finished = true,
                    None => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn reply(chunks: &[&[u8]]) -> Vec<std::result::Result<ChatChunk, String>> {
        let model = OpenAiChatModel::new(OpenAiConfig::default()).unwrap();
        let chunks = chunks.iter().map(|c| Bytes::copy_from_slice(c)).collect();
        model
            .stream_from_body(chunks)
            .unwrap()
            .map(|item| item.map_err(|e| e.code().as_str().to_owned()))
            .collect()
            .await
    }

    /// Found by the `sse` fuzz target (fuzz/): a body starting with a byte-order mark made
    /// eventsource-stream panic. The mark is ignored, as the SSE format says, wherever the
    /// network cuts the body.
    #[tokio::test]
    async fn a_leading_byte_order_mark_is_ignored() {
        let body: &[u8] =
            b"\xEF\xBB\xBFdata: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n";
        let expected = vec![
            Ok(ChatChunk::Delta("Hi".into())),
            Ok(ChatChunk::Done {
                usage: None,
                model: None,
            }),
        ];
        assert_eq!(reply(&[body]).await, expected);
        for cut in 1..6 {
            assert_eq!(
                reply(&[&body[..cut], &body[cut..]]).await,
                expected,
                "cut at {cut}"
            );
        }
        assert_eq!(
            reply(&[b"", &body[..1], b"", &body[1..2], &body[2..]]).await,
            expected
        );
        // A second mark is data: the line it starts is a field nobody knows, ignored.
        let twice: &[u8] = b"\xEF\xBB\xBF\xEF\xBB\xBFdata: [DONE]\n\ndata: [DONE]\n\n";
        assert_eq!(
            reply(&[twice]).await,
            [Ok(ChatChunk::Done {
                usage: None,
                model: None
            })]
        );
        // A body that is only the start of a mark is cut short, not a panic.
        assert_eq!(reply(&[b"\xEF\xBB"]).await, [Err("unavailable".to_owned())]);
    }

    /// Found by the `sse` fuzz target (fuzz/): a chunk carrying text and
    /// `finish_reason: "content_filter"` gave the error, then the filtered text as a delta.
    /// The stream ends at the error.
    #[tokio::test]
    async fn nothing_follows_a_content_filter_error() {
        let body: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"ok \"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"x\"},\"finish_reason\":\"content_filter\"}]}\n\n";
        assert_eq!(
            reply(&[body]).await,
            [
                Ok(ChatChunk::Delta("ok ".into())),
                Err("validation_error".to_owned())
            ]
        );
    }
}
