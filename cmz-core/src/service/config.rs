//! Settings of the turn engine.

use std::time::Duration;

use crate::moderation::ModerationLevel;
use crate::privacy::{RedactionMode, Redactor};
use crate::tokens::Tokenizer;

/// What a turn does when the model fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelFailurePolicy {
    /// Store the user message and an in-character fallback reply marked `fallback`, and
    /// answer with it (the default: a child always gets an answer).
    #[default]
    Fallback,
    /// Store the user message alone and return the model's error. A retry with the same
    /// turn key then completes that turn instead of storing the message twice.
    Error,
}

/// Settings of [`ConversationService`](super::ConversationService).
#[derive(Debug, Clone)]
pub struct ConversationConfig {
    /// How many earlier turns (user + assistant pairs) the model sees. Default 5 (the
    /// legacy API's `contextWindow` default).
    pub context_window: usize,
    /// The most a request may ask for with its own `context_window` (at least 1). Default
    /// 20 (the legacy API's bound).
    pub max_context_window: usize,
    /// How long the model may take for a whole reply, and between two streamed chunks.
    /// Default 30 s.
    pub model_timeout: Duration,
    /// What to do when the model fails. Default [`ModelFailurePolicy::Fallback`].
    pub on_model_failure: ModelFailurePolicy,
    /// The longest user message accepted, in characters. Default 4,000.
    pub max_message_chars: usize,
    /// How often an append is retried after losing a sequence race with another server.
    /// Default 8.
    pub max_append_attempts: u32,
    /// Reply-token limit passed to the model. Default `Some(300)` (the legacy default).
    pub max_tokens: Option<u32>,
    /// The most a request may ask for with its own `max_tokens` (at least 10). Default
    /// 1,000 (the legacy API's bound).
    pub max_reply_tokens: u32,
    /// Sampling temperature passed to the model when neither the request nor the animal
    /// sets one. Default `Some(0.7)` (the legacy default); requests may ask for 0 to 2.
    pub temperature: Option<f32>,
    /// Streamed deltas buffered for a slow consumer before the model is paused. Default 32.
    pub stream_buffer: usize,
    /// How long a resumable stream (see
    /// [`stream_turn_resumable`](super::ConversationService::stream_turn_resumable)) keeps
    /// generating after its last client went away, waiting for one to come back, and how
    /// long a finished one is kept for a reconnect. Default 20 s
    /// (`CMZ_STREAM_RESUME_GRACE_MS`); zero cancels the model as soon as the client goes.
    pub stream_resume_grace: Duration,
    /// The least moderation every turn gets when a moderator is configured; a request may
    /// ask for more, never less. Default [`ModerationLevel::Standard`].
    pub moderation_level: ModerationLevel,
    /// The longest context summary a client may send with a turn, in characters. Default
    /// 2,000.
    pub max_context_summary_chars: usize,
    /// The most prompt tokens a turn sends the model: the persona prompt, the running
    /// summary, the client's context summary, the recent turns that fit and the new message
    /// (each message's framing included, see [`crate::tokens`]). Whole turns that do not
    /// fit are left out, oldest first; a new message that cannot fit even alone is a
    /// `validation_error`. Default 16,384: any message within `max_message_chars` fits
    /// (4,000 characters are at most 16,000 bytes, and no encoding spends more than a
    /// token a byte), it is far inside the 128,000-token context of the default model
    /// (gpt-4o-mini) with room for the reply, and it bounds what one turn can cost. The
    /// turn cap (`context_window`) usually binds first.
    pub context_budget_tokens: u32,
    /// The encoding the budget is counted in; set it for the model that answers (see
    /// [`Tokenizer::for_model`]). Default [`Tokenizer::O200kBase`] (gpt-4o-mini).
    pub tokenizer: Tokenizer,
    /// Fold turns that left the context window into the session's running summary once at
    /// least this many of them are not covered yet (so the summary is rewritten at most
    /// every this many turns). 0 turns the rolling summary off. Default 4.
    pub summary_every_turns: usize,
    /// Reply-token limit for writing the running summary. Default 300.
    pub summary_max_tokens: u32,
    /// What happens to personal details in a child's message (and the client's context
    /// summary): replaced by placeholders before anything stores, sends, moderates or
    /// summarizes it, with a kind reminder ([`RedactionMode::Redact`], the default), or
    /// also answered with an in-character reminder instead of the model
    /// ([`RedactionMode::Block`]), or left as is ([`RedactionMode::Off`]).
    pub personal_details: RedactionMode,
    /// What counts as a personal detail; phone numbers are those of its region. Default
    /// the United States.
    pub redactor: Redactor,
}

impl Default for ConversationConfig {
    fn default() -> Self {
        Self {
            context_window: 5,
            max_context_window: 20,
            model_timeout: Duration::from_secs(30),
            on_model_failure: ModelFailurePolicy::Fallback,
            max_message_chars: 4_000,
            max_append_attempts: 8,
            max_tokens: Some(300),
            max_reply_tokens: 1_000,
            temperature: Some(0.7),
            stream_buffer: 32,
            stream_resume_grace: Duration::from_secs(20),
            moderation_level: ModerationLevel::Standard,
            max_context_summary_chars: 2_000,
            context_budget_tokens: 16_384,
            tokenizer: Tokenizer::O200kBase,
            summary_every_turns: 4,
            summary_max_tokens: 300,
            personal_details: RedactionMode::Redact,
            redactor: Redactor::default(),
        }
    }
}
