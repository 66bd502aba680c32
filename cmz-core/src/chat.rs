//! The chat model: what produces the animal's replies.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt as _;
use futures::stream::BoxStream;

use crate::error::Result;
use crate::types::{Role, Usage};

/// One message of a model prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// System, user or assistant.
    pub role: Role,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A model call: the prompt and generation settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    /// The prompt: the system prompt first (a stable prefix, so provider prompt caching can
    /// work), then the history window oldest first, then the new user message.
    pub messages: Vec<ChatMessage>,
    /// Upper bound on reply tokens, if the caller sets one.
    pub max_tokens: Option<u32>,
    /// Sampling temperature, if the caller sets one.
    pub temperature: Option<f32>,
    /// The model to ask, when it is not the backend's configured one (an animal's
    /// configured `aiModel`). Backends that serve one model ignore it.
    pub model: Option<String>,
    /// How the backend should treat this request when it is busy. Backends without a
    /// queue ignore it.
    pub priority: Priority,
}

/// A request's place when the model backend is busy (the legacy API's `priority`): under
/// load, `Low` requests are turned away first and `High` ones last. It never reorders
/// requests already waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[non_exhaustive]
pub enum Priority {
    /// Shed first when the backend's queue fills.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Admitted after the queue is full for normal requests (within a margin).
    High,
}

impl Priority {
    /// The priority's name on the wire: `low`, `normal` or `high`.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

impl std::str::FromStr for Priority {
    type Err = crate::Error;

    fn from_str(text: &str) -> crate::Result<Self> {
        match text {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            _ => Err(crate::Error::validation(
                "priority",
                "priority must be low, normal or high",
            )),
        }
    }
}

/// A whole reply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChatCompletion {
    /// The reply text.
    pub content: String,
    /// Token usage, when the model reported it (never invented).
    pub usage: Option<Usage>,
    /// The model that answered, when known.
    pub model: Option<String>,
}

/// One item of a streamed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatChunk {
    /// A piece of the reply text.
    Delta(String),
    /// The last item: the reply is complete.
    Done {
        /// Token usage, when the model reported it.
        usage: Option<Usage>,
        /// The model that answered, when known.
        model: Option<String>,
    },
}

/// A chat model (OpenAI-compatible or otherwise).
///
/// # Contract
/// - `complete` returns the whole reply or an error: `unavailable`/`timeout` for transport
///   failures, `rate_limit_exceeded` when throttled, `validation_error` for a prompt the
///   model refuses (too long, filtered).
/// - `stream` yields zero or more [`ChatChunk::Delta`]s and then exactly one
///   [`ChatChunk::Done`]; an `Err` item ends the stream. A stream that ends without `Done`
///   was cut short.
/// - Dropping the stream cancels the call: the implementation stops reading and releases
///   the connection.
/// - Usage is what the model reported, or `None`; it is never made up.
/// - Every method may be called concurrently.
#[async_trait]
pub trait ChatModel: Debug + Send + Sync + 'static {
    /// Produces the whole reply.
    async fn complete(&self, request: ChatRequest) -> Result<ChatCompletion>;

    /// Produces the reply as a stream of deltas ending with usage.
    ///
    /// The default calls [`complete`](ChatModel::complete) and yields its reply as one delta.
    async fn stream(&self, request: ChatRequest) -> Result<BoxStream<'static, Result<ChatChunk>>> {
        let completion = self.complete(request).await?;
        let chunks = vec![
            Ok(ChatChunk::Delta(completion.content)),
            Ok(ChatChunk::Done {
                usage: completion.usage,
                model: completion.model,
            }),
        ];
        Ok(futures::stream::iter(chunks).boxed())
    }

    /// A short name for logs and metadata, for example the model id.
    fn name(&self) -> &str;
}

/// A shared, type-erased chat model.
pub type DynChatModel = Arc<dyn ChatModel>;
