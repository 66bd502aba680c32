//! A loopback server that speaks OpenAI's Chat Completions wire format exactly, with the
//! quirks of real servers and scripted faults. For tests and benchmarks (feature
//! `testing`).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use cmz_openai::testing::{Behavior, FakeOpenAi, Reply};
//!
//! let server = FakeOpenAi::start().await;
//! server.push(Behavior::Reply(Reply::text("Roar!").with_usage(12, 2)));
//! server.push(Behavior::status(429, Some("1")));
//! println!("point the model at {}", server.base_url());
//! # });
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use tokio::sync::Notify;

/// How the usage chunk of a stream carries `choices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageChoices {
    /// `"choices": []` (OpenAI).
    #[default]
    Empty,
    /// No `choices` key at all.
    Absent,
    /// `"choices": [{"index":0,"delta":{}}]` (LiteLLM).
    EmptyDelta,
}

/// Variations real servers show in their streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quirks {
    /// `\r\n` line endings instead of `\n`.
    pub crlf: bool,
    /// `data:{json}` without the space.
    pub no_space_after_data: bool,
    /// `: keep-alive` comments between chunks.
    pub keepalive_comments: bool,
    /// A first chunk with only the role and empty content.
    pub role_only_first_chunk: bool,
    /// A chunk with `finish_reason: "stop"`.
    pub finish_reason: bool,
    /// The shape of the usage chunk.
    pub usage_choices: UsageChoices,
    /// `data: [DONE]` at the end (otherwise the stream just ends).
    pub send_done: bool,
}

impl Default for Quirks {
    fn default() -> Self {
        Self {
            crlf: false,
            no_space_after_data: false,
            keepalive_comments: false,
            role_only_first_chunk: true,
            finish_reason: true,
            usage_choices: UsageChoices::Empty,
            send_done: true,
        }
    }
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Streamed pieces; their concatenation is the reply.
    pub chunks: Vec<String>,
    /// (prompt, completion, cached prompt) tokens; `None` sends no usage.
    pub usage: Option<(u32, u32, Option<u32>)>,
    /// Wait before each streamed chunk.
    pub chunk_delay: Duration,
    /// Stream variations.
    pub quirks: Quirks,
    /// The `model` field.
    pub model: String,
}

impl Reply {
    /// A reply streamed word by word, with usage 10 / (number of chunks).
    pub fn text(content: &str) -> Self {
        let chunks: Vec<String> = content.split_inclusive(' ').map(str::to_owned).collect();
        let completion = chunks.len() as u32;
        Self {
            chunks,
            usage: Some((10, completion, None)),
            chunk_delay: Duration::ZERO,
            quirks: Quirks::default(),
            model: "fake-gpt".into(),
        }
    }

    /// Exactly these chunks.
    pub fn chunks(chunks: Vec<String>) -> Self {
        Self {
            chunks,
            ..Self::text("")
        }
    }

    /// The whole reply text.
    pub fn content(&self) -> String {
        self.chunks.concat()
    }

    /// Sets the usage.
    pub fn with_usage(mut self, prompt: u32, completion: u32) -> Self {
        self.usage = Some((prompt, completion, None));
        self
    }

    /// Sets the usage with cached prompt tokens.
    pub fn with_cached_usage(mut self, prompt: u32, completion: u32, cached: u32) -> Self {
        self.usage = Some((prompt, completion, Some(cached)));
        self
    }

    /// Sends no usage.
    pub fn without_usage(mut self) -> Self {
        self.usage = None;
        self
    }

    /// Sets the per-chunk delay.
    pub fn with_chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay = delay;
        self
    }

    /// Sets the stream quirks.
    pub fn with_quirks(mut self, quirks: Quirks) -> Self {
        self.quirks = quirks;
        self
    }
}

/// What the server does with one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Behavior {
    /// Answers (as JSON or as a stream, as the request asks).
    Reply(Reply),
    /// Answers with this status, error body and headers.
    Error {
        /// The status code.
        status: u16,
        /// The body (an OpenAI error object by default).
        body: String,
        /// Extra headers, such as `retry-after`.
        headers: Vec<(String, String)>,
    },
    /// 200 with a body that is not valid JSON (or a stream chunk that is not).
    Malformed,
    /// Streams this many chunks, then breaks the connection.
    CutAfter(Reply, usize),
    /// Streams this many chunks, then sends nothing more and keeps the connection open.
    Stall(Reply, usize),
    /// Never sends a response.
    Hang,
}

impl Behavior {
    /// An OpenAI-style error with `status`, and `retry-after` when given.
    pub fn status(status: u16, retry_after: Option<&str>) -> Self {
        let (kind, code) = match status {
            401 => ("invalid_request_error", "invalid_api_key"),
            429 => ("requests", "rate_limit_exceeded"),
            400 => ("invalid_request_error", "context_length_exceeded"),
            _ => ("server_error", "server_error"),
        };
        Behavior::Error {
            status,
            body: serde_json::json!({"error": {"message": format!("fake error {status}"), "type": kind, "param": null, "code": code}}).to_string(),
            headers: retry_after.map(|v| vec![("retry-after".to_owned(), v.to_owned())]).unwrap_or_default(),
        }
    }
}

/// A request the server received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// The path.
    pub path: String,
    /// Headers, lowercased names.
    pub headers: Vec<(String, String)>,
    /// The JSON body (`Null` if it was not JSON).
    pub body: serde_json::Value,
}

impl RecordedRequest {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
struct Shared {
    script: Mutex<VecDeque<Behavior>>,
    default: Mutex<Option<Behavior>>,
    requests: Mutex<Vec<RecordedRequest>>,
    disconnects: AtomicUsize,
    disconnected: Notify,
    flag_word: Mutex<String>,
}

/// The running server; stops when dropped.
#[derive(Debug)]
pub struct FakeOpenAi {
    base_url: String,
    shared: Arc<Shared>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl FakeOpenAi {
    /// Starts a server on a free loopback port.
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        *shared.flag_word.lock().unwrap_or_else(|p| p.into_inner()) = "FLAGGED".into();
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/moderations", post(moderate))
            .route("/v1/models", get(models))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let address = listener.local_addr().expect("local address");
        // Each SSE frame goes out when written, as from a real streaming server.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop.await;
                })
                .await;
        });
        Self {
            base_url: format!("http://{address}/v1"),
            shared,
            _shutdown: shutdown,
        }
    }

    /// The base URL to configure a client with (ends in `/v1`).
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Queues a behavior for the next request not yet scripted.
    pub fn push(&self, behavior: Behavior) {
        self.shared
            .script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(behavior);
    }

    /// What requests get once the script is used up (default: echo the last user message).
    pub fn set_default(&self, behavior: Behavior) {
        *self
            .shared
            .default
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(behavior);
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many streams the client closed before the server finished them.
    pub fn disconnects(&self) -> usize {
        self.shared.disconnects.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` client disconnects were seen, or `timeout` passes.
    pub async fn wait_for_disconnects(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.disconnected.notified();
            if self.disconnects() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.disconnects() >= n;
            }
        }
    }
}

fn record(shared: &Shared, path: &str, headers: &HeaderMap, body: &Bytes) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let headers = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    shared
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(RecordedRequest {
            path: path.to_owned(),
            headers,
            body: json.clone(),
        });
    json
}

fn next_behavior(shared: &Shared, request: &serde_json::Value) -> Behavior {
    if let Some(next) = shared
        .script
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop_front()
    {
        return next;
    }
    if let Some(default) = shared
        .default
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    {
        return default;
    }
    let last_user = request["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    Behavior::Reply(Reply::text(&format!("echo: {last_user}")))
}

fn usage_json(usage: (u32, u32, Option<u32>)) -> serde_json::Value {
    let (prompt, completion, cached) = usage;
    let mut value = serde_json::json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
    if let Some(cached) = cached {
        value["prompt_tokens_details"] =
            serde_json::json!({"cached_tokens": cached, "audio_tokens": 0});
    }
    value
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let request = record(&shared, "/v1/chat/completions", &headers, &body);
    let behavior = next_behavior(&shared, &request);
    let stream = request["stream"].as_bool().unwrap_or(false);
    let include_usage = request["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    match behavior {
        Behavior::Hang => futures::future::pending().await,
        Behavior::Error {
            status,
            body,
            headers,
        } => {
            let mut response = (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body,
            )
                .into_response();
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().expect("header"));
            for (name, value) in headers {
                if let (Ok(name), Ok(value)) =
                    (name.parse::<axum::http::HeaderName>(), value.parse())
                {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
        Behavior::Malformed if !stream => (
            [("content-type", "application/json")],
            "{\"choices\": [ this is not json",
        )
            .into_response(),
        Behavior::Malformed => sse(
            &shared,
            vec![Ok(Bytes::from("data: {not json\n\n"))],
            None,
            Duration::ZERO,
        ),
        Behavior::Reply(reply) if !stream => {
            let mut body = serde_json::json!({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1_700_000_000, "model": reply.model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.content(), "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
            });
            if let Some(usage) = reply.usage {
                body["usage"] = usage_json(usage);
            }
            ([("content-type", "application/json")], body.to_string()).into_response()
        }
        Behavior::Reply(reply) => {
            let frames = frames(&reply, include_usage);
            sse(
                &shared,
                frames.into_iter().map(Ok).collect(),
                None,
                reply.chunk_delay,
            )
        }
        Behavior::CutAfter(reply, n) => {
            let mut items: Vec<Result<Bytes, std::io::Error>> = frames(&reply, false)
                .into_iter()
                .take(n + usize::from(reply.quirks.role_only_first_chunk))
                .map(Ok)
                .collect();
            items.push(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "cut",
            )));
            sse(&shared, items, None, reply.chunk_delay)
        }
        Behavior::Stall(reply, n) => {
            let items = frames(&reply, false)
                .into_iter()
                .take(n + usize::from(reply.quirks.role_only_first_chunk))
                .map(Ok)
                .collect();
            sse(&shared, items, Some(()), reply.chunk_delay)
        }
    }
}

/// The SSE frames of a reply, framed as its quirks say.
fn frames(reply: &Reply, include_usage: bool) -> Vec<Bytes> {
    let q = reply.quirks;
    let eol = if q.crlf { "\r\n" } else { "\n" };
    let data = if q.no_space_after_data {
        "data:"
    } else {
        "data: "
    };
    let frame = |json: serde_json::Value| {
        let mut text = String::new();
        if q.keepalive_comments {
            text.push_str(&format!(": keep-alive{eol}{eol}"));
        }
        text.push_str(&format!("{data}{json}{eol}{eol}"));
        Bytes::from(text)
    };
    let base = |choices: serde_json::Value| serde_json::json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": reply.model, "choices": choices});
    let mut out = Vec::new();
    if q.role_only_first_chunk {
        out.push(frame(base(serde_json::json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]))));
    }
    for chunk in &reply.chunks {
        out.push(frame(base(
            serde_json::json!([{"index": 0, "delta": {"content": chunk}}]),
        )));
    }
    if q.finish_reason {
        out.push(frame(base(
            serde_json::json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        )));
    }
    if let (true, Some(usage)) = (include_usage, reply.usage) {
        let mut chunk = base(serde_json::json!([]));
        match q.usage_choices {
            UsageChoices::Empty => {}
            UsageChoices::Absent => {
                chunk.as_object_mut().expect("object").remove("choices");
            }
            UsageChoices::EmptyDelta => {
                chunk["choices"] = serde_json::json!([{"index": 0, "delta": {}}])
            }
        }
        chunk["usage"] = usage_json(usage);
        out.push(frame(chunk));
    }
    if q.send_done {
        out.push(Bytes::from(format!("{data}[DONE]{eol}{eol}")));
    }
    out
}

/// Counts a stream the client dropped before the server was done with it.
struct Watch {
    shared: Arc<Shared>,
    done: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.done {
            self.shared.disconnects.fetch_add(1, Ordering::SeqCst);
            self.shared.disconnected.notify_waiters();
        }
    }
}

fn sse(
    shared: &Arc<Shared>,
    items: Vec<Result<Bytes, std::io::Error>>,
    stall: Option<()>,
    delay: Duration,
) -> Response {
    let watch = Watch {
        shared: Arc::clone(shared),
        done: false,
    };
    let stream = futures::stream::unfold(
        (items.into_iter(), watch, stall, delay),
        |(mut items, mut watch, stall, delay)| async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match items.next() {
                Some(Err(error)) => {
                    // Let what came before reach the client first, as a real cut would.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Some((Err(error), (items, watch, stall, delay)))
                }
                Some(item) => Some((item, (items, watch, stall, delay))),
                None if stall.is_some() => futures::future::pending().await,
                None => {
                    watch.done = true;
                    drop(watch);
                    None
                }
            }
        },
    );
    let body: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>> =
        stream.boxed();
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .expect("response")
}

async fn moderate(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let request = record(&shared, "/v1/moderations", &headers, &body);
    if let Some(Behavior::Error { .. }) = shared
        .script
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .front()
    {
        let behavior = next_behavior(&shared, &request);
        if let Behavior::Error { status, body, .. } = behavior {
            return (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body,
            )
                .into_response();
        }
    }
    let input = request["input"].as_str().unwrap_or("");
    let word = shared
        .flag_word
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let flagged = input.contains(&word);
    let body = serde_json::json!({"id": "modr-fake", "model": "omni-moderation-latest", "results": [{
        "flagged": flagged, "categories": {"violence": flagged, "harassment": false}, "category_scores": {"violence": if flagged {0.9} else {0.01}}
    }]});
    ([("content-type", "application/json")], body.to_string()).into_response()
}

async fn models(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Response, Infallible> {
    record(&shared, "/v1/models", &headers, &Bytes::new());
    if headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer wrong-key") {
        return Ok(Behavior::status(401, None).into_response_for_models());
    }
    Ok((
        [("content-type", "application/json")],
        serde_json::json!({"object": "list", "data": [{"id": "fake-gpt", "object": "model"}]})
            .to_string(),
    )
        .into_response())
}

impl Behavior {
    fn into_response_for_models(self) -> Response {
        match self {
            Behavior::Error { status, body, .. } => (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body,
            )
                .into_response(),
            _ => StatusCode::OK.into_response(),
        }
    }
}
