//! What a turn takes and gives back: the request, the reply, the stream of events.

use super::*;

/// The longest turn key accepted, in bytes.
pub const MAX_TURN_KEY_LEN: usize = 128;

/// One message from a user to an animal.
///
/// Every field takes effect; the defaults and bounds are the engine's
/// ([`ConversationConfig`]), the same for every front end.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TurnRequest {
    /// The animal spoken to.
    pub animal_id: AnimalId,
    /// What the user said.
    pub message: String,
    /// The session to continue; `None` starts a new one. An id nobody has used starts one
    /// under that id; someone else's session, or one with another animal, starts one
    /// under a new id (see [`ConversationService::turn`]).
    pub session_id: Option<SessionId>,
    /// A client-chosen idempotency key: a retried request with the same key returns the
    /// stored reply without calling the model again or storing anything twice.
    pub turn_key: Option<String>,
    /// How many earlier turns the model sees (overrides the configured default).
    pub context_window: Option<usize>,
    /// Reply-token limit for this turn (overrides the configured default).
    pub max_tokens: Option<u32>,
    /// Sampling temperature for this turn (overrides the configured default).
    pub temperature: Option<f32>,
    /// What the client says happened earlier in the conversation (the legacy
    /// `contextSummary`): given to the model after the persona prompt, as context from the
    /// client and never as instructions, and moderated like the message. At most
    /// [`ConversationConfig::max_context_summary_chars`] characters.
    pub context_summary: Option<String>,
    /// How much of this turn is moderated; never less than the configured level.
    pub moderation_level: Option<ModerationLevel>,
    /// The model call's place when the model backend is busy.
    pub priority: Priority,
}

impl TurnRequest {
    /// A message to `animal_id` in a new session.
    pub fn new(animal_id: AnimalId, message: impl Into<String>) -> Self {
        Self {
            animal_id,
            message: message.into(),
            session_id: None,
            turn_key: None,
            context_window: None,
            max_tokens: None,
            temperature: None,
            context_summary: None,
            moderation_level: None,
            priority: Priority::Normal,
        }
    }

    /// Sets the client's summary of the conversation so far.
    pub fn with_context_summary(mut self, summary: impl Into<String>) -> Self {
        self.context_summary = Some(summary.into());
        self
    }

    /// Asks for `level` of moderation (the configured level if that is higher).
    pub fn with_moderation_level(mut self, level: ModerationLevel) -> Self {
        self.moderation_level = Some(level);
        self
    }

    /// Sets the model call's priority.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Continues `session_id`.
    pub fn in_session(mut self, session_id: SessionId) -> Self {
        self.session_id = Some(session_id);
        self
    }

    /// Sets the idempotency key.
    pub fn with_turn_key(mut self, key: impl Into<String>) -> Self {
        self.turn_key = Some(key.into());
        self
    }

    /// Sets how many earlier turns the model sees.
    pub fn with_context_window(mut self, turns: usize) -> Self {
        self.context_window = Some(turns);
        self
    }
}

/// The outcome of a turn (serializable, so a stream's end can be relayed to another
/// server).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TurnReply {
    /// The animal's reply.
    pub reply: String,
    /// The session, new or continued.
    pub session_id: SessionId,
    /// Whether this turn created the session.
    pub session_created: bool,
    /// The turn's ordinal in the session: `ceil(seq of the user message / 2)`, which counts
    /// turns exactly while every turn stores a reply.
    pub turn: u64,
    /// The stored user message.
    pub user_message: Message,
    /// The stored reply.
    pub assistant_message: Message,
    /// The model's token usage, when it reported any.
    pub usage: Option<Usage>,
    /// The reply is the fallback because the model failed.
    pub fallback: bool,
    /// The reply was cut short (the model failed mid-stream, the client went away, or it
    /// reached the size limit).
    pub interrupted: bool,
    /// This is the stored result of an earlier request with the same turn key.
    pub replayed: bool,
    /// What moderation decided: `flagged` when the message (or, at the strict level, the
    /// reply) was refused, with the categories that fired (empty for a replayed turn).
    pub moderation: ModerationVerdict,
    /// Where the caller stands against the turn limit and the token budgets after this
    /// turn (`None` for a replayed turn).
    pub quota: Option<super::Quota>,
}

impl TurnReply {
    pub(super) fn new(
        session_created: bool,
        user: Message,
        assistant: Message,
        replayed: bool,
    ) -> Self {
        Self {
            reply: assistant.content.clone(),
            session_id: user.session_id.clone(),
            session_created,
            turn: user.seq.div_ceil(2),
            usage: assistant.metadata.usage(),
            fallback: assistant.metadata.fallback,
            interrupted: assistant.metadata.interrupted,
            moderation: ModerationVerdict {
                flagged: assistant.metadata.moderated,
                categories: Vec::new(),
            },
            user_message: user,
            assistant_message: assistant,
            replayed,
            quota: None,
        }
    }
}

/// An item of a streamed turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnEvent {
    /// A piece of the reply, as the model produced it.
    Delta(String),
    /// The turn is stored; the last item.
    Complete(Box<TurnReply>),
}

/// A streamed turn: deltas, then the stored result.
///
/// Dropping it before the end cancels the model call; the partial reply is then stored,
/// marked `interrupted`, in the background.
pub struct TurnStream {
    /// The session, new or continued.
    pub session_id: SessionId,
    /// Whether this turn created the session.
    pub session_created: bool,
    pub(super) events: BoxStream<'static, Result<TurnEvent>>,
}

impl std::fmt::Debug for TurnStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnStream")
            .field("session_id", &self.session_id)
            .field("session_created", &self.session_created)
            .finish_non_exhaustive()
    }
}

impl Stream for TurnStream {
    type Item = Result<TurnEvent>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.events.poll_next_unpin(cx)
    }
}

/// A stored summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The summary text, now also on the session.
    pub text: String,
    /// Made without the model, because it was unavailable.
    pub fallback: bool,
}
