//! The domain types, with the legacy camelCase names on the wire.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{AnimalId, MessageId, SessionId, UserId};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions to the model (the persona prompt); never stored as history.
    System,
    /// The child or family member chatting.
    User,
    /// The animal persona (the model's reply).
    Assistant,
}

impl Role {
    /// The lowercase wire name (`system`, `user`, `assistant`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// Token counts reported by a chat model for one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Tokens in the prompt (`tokensPrompt`).
    #[serde(rename = "tokensPrompt")]
    pub prompt_tokens: u32,
    /// Tokens in the reply (`tokensCompletion`).
    #[serde(rename = "tokensCompletion")]
    pub completion_tokens: u32,
    /// Prompt tokens the provider served from its prompt cache, when reported.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "tokensCached"
    )]
    pub cached_prompt_tokens: Option<u32>,
}

impl Usage {
    /// Prompt plus completion tokens.
    pub fn total(&self) -> u32 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// What cmz records about how a message came to be.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageMetadata {
    /// Prompt tokens of the model call that produced this reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_prompt: Option<u32>,
    /// Completion tokens of that call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_completion: Option<u32>,
    /// Cached prompt tokens of that call, when the provider reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_cached: Option<u32>,
    /// Wall time of the model call in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// The model that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The reply is a canned fallback because the model failed or timed out.
    #[serde(default, skip_serializing_if = "is_false")]
    pub fallback: bool,
    /// The reply was cut short because the client went away mid-stream.
    #[serde(default, skip_serializing_if = "is_false")]
    pub interrupted: bool,
    /// The reply is a refusal because the moderator flagged the user's message.
    #[serde(default, skip_serializing_if = "is_false")]
    pub moderated: bool,
    /// The client's idempotency key for the turn this message belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_key: Option<String>,
    /// The metadata a caller stored with the message, verbatim, whatever its keys (the
    /// legacy `store_conversation_turn(..., metadata)`); see [`MessageMetadata::from_caller`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<serde_json::Map<String, serde_json::Value>>,
    /// The tokens of the content in the engine's encoding, counted once when the message
    /// was stored (see [`crate::tokens`]), so choosing a context window never counts
    /// history again. `None` for messages stored without the engine (legacy items); those
    /// are counted when read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_count: Option<u32>,
    /// The kinds of personal details taken out of this message before it was stored
    /// (`phone`, `name`, …; see [`crate::privacy`]), or, on a reply, out of the message it
    /// answers. Never the details themselves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redacted: Vec<String>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl MessageMetadata {
    /// Metadata from a caller's free-form map: kept verbatim in `custom`, and the keys cmz
    /// knows (`tokensPrompt`, `tokensCompletion`, `tokensCached`, `latencyMs`, `model`,
    /// `fallback`, `interrupted`, `moderated`) also fill the typed fields when their values
    /// have the right type (a value of another type is kept verbatim and ignored there).
    pub fn from_caller(map: serde_json::Map<String, serde_json::Value>) -> Self {
        let count = |key: &str| {
            map.get(key)
                .and_then(serde_json::Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
        };
        let flag = |key: &str| {
            map.get(key)
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false)
        };
        Self {
            tokens_prompt: count("tokensPrompt"),
            tokens_completion: count("tokensCompletion"),
            tokens_cached: count("tokensCached"),
            latency_ms: map.get("latencyMs").and_then(serde_json::Value::as_u64),
            model: map
                .get("model")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
            fallback: flag("fallback"),
            interrupted: flag("interrupted"),
            moderated: flag("moderated"),
            turn_key: None,
            custom: (!map.is_empty()).then_some(map),
            token_count: None,
            redacted: Vec::new(),
        }
    }

    /// The metadata as a caller sees it: the caller's own map when one was stored,
    /// otherwise cmz's typed fields under their wire names.
    pub fn to_caller(&self) -> serde_json::Map<String, serde_json::Value> {
        if let Some(custom) = &self.custom {
            return custom.clone();
        }
        match serde_json::to_value(self) {
            // The token count and the redaction kinds are cmz's bookkeeping, not something
            // the legacy callers stored (their user messages carry no metadata).
            Ok(serde_json::Value::Object(mut map)) => {
                map.remove("tokenCount");
                map.remove("redacted");
                map
            }
            _ => serde_json::Map::new(),
        }
    }

    /// The usage recorded on this message, if the model reported any.
    pub fn usage(&self) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: self.tokens_prompt?,
            completion_tokens: self.tokens_completion?,
            cached_prompt_tokens: self.tokens_cached,
        })
    }

    /// Records `usage` on this metadata.
    pub fn set_usage(&mut self, usage: Option<Usage>) {
        self.tokens_prompt = usage.map(|u| u.prompt_tokens);
        self.tokens_completion = usage.map(|u| u.completion_tokens);
        self.tokens_cached = usage.and_then(|u| u.cached_prompt_tokens);
    }
}

/// The largest message content a store accepts, in bytes of UTF-8.
///
/// Chosen so that one message plus its attributes fits a 400 KB DynamoDB item.
/// User input is held to a much smaller, configurable limit by the turn engine.
pub const MAX_CONTENT_BYTES: usize = 384 * 1024;

/// One stored message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// Unique id of the message.
    #[serde(rename = "messageId")]
    pub id: MessageId,
    /// The session (conversation) it belongs to.
    pub session_id: SessionId,
    /// Its position in the session, from 1, without gaps.
    pub seq: u64,
    /// Who wrote it.
    pub role: Role,
    /// The text (`text` in the legacy item).
    #[serde(rename = "text")]
    pub content: String,
    /// When it was stored (`timestamp`).
    #[serde(rename = "timestamp")]
    pub created_at: DateTime<Utc>,
    /// How it came to be.
    #[serde(default)]
    pub metadata: MessageMetadata,
}

/// A message about to be appended: the store assigns `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Unique id of the message.
    pub id: MessageId,
    /// Who wrote it.
    pub role: Role,
    /// The text.
    pub content: String,
    /// When it was produced.
    pub created_at: DateTime<Utc>,
    /// How it came to be.
    pub metadata: MessageMetadata,
}

impl NewMessage {
    /// A message with a fresh id, stamped now.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            id: MessageId::generate(),
            role,
            content: content.into(),
            created_at: Utc::now(),
            metadata: MessageMetadata::default(),
        }
    }

    /// Checks what every store requires: a user or assistant role and content within
    /// [`MAX_CONTENT_BYTES`].
    pub fn validate(&self) -> Result<()> {
        if self.role == Role::System {
            return Err(Error::validation("role", "system messages are not stored"));
        }
        if self.content.len() > MAX_CONTENT_BYTES {
            return Err(Error::validation(
                "message",
                format!(
                    "message is {} bytes; the largest stored message is {MAX_CONTENT_BYTES} bytes",
                    self.content.len()
                ),
            ));
        }
        Ok(())
    }

    /// The stored message this becomes at position `seq` of `session_id`.
    pub fn into_message(self, session_id: SessionId, seq: u64) -> Message {
        Message {
            id: self.id,
            session_id,
            seq,
            role: self.role,
            content: self.content,
            created_at: self.created_at,
            metadata: self.metadata,
        }
    }
}

/// Whether a session still takes turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SessionStatus {
    /// Open for more turns (the legacy value `active`).
    #[default]
    Active,
    /// Closed by the user or by retention.
    Ended,
}

/// A conversation between one user and one animal persona.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// The session id, which is also the conversation id.
    #[serde(rename = "sessionId")]
    pub id: SessionId,
    /// Who is chatting.
    pub user_id: UserId,
    /// With which animal.
    pub animal_id: AnimalId,
    /// The animal's display name when the session started.
    pub animal_name: String,
    /// When it started (`startTime`).
    #[serde(rename = "startTime")]
    pub started_at: DateTime<Utc>,
    /// When the last message was stored.
    pub last_activity: DateTime<Utc>,
    /// How many messages are stored; also the sequence guard for the next append.
    pub message_count: u64,
    /// Open or closed.
    #[serde(default)]
    pub status: SessionStatus,
    /// A model-written (or fallback) summary, when one was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// An external thread id the caller keeps with the conversation (the legacy
    /// `store_thread_id`: an OpenAI Assistants thread), when one was stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    /// The running summary of the turns that have left the model's context window, written
    /// by the turn engine (see [`RollingSummary`]), when one was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_summary: Option<RollingSummary>,
}

/// The running summary of a session's older turns: what the model is told about the part
/// of the conversation that no longer fits its context window.
///
/// Written by the turn engine after a reply is delivered, from the previous summary plus
/// the turns that left the window; the messages themselves are never changed. `through`
/// makes it idempotent: a store keeps a new summary only if it covers more than the one it
/// has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RollingSummary {
    /// The summary text.
    pub text: String,
    /// The sequence number of the last message it covers (messages `1..=through`).
    pub through: u64,
    /// Its tokens in the engine's encoding.
    pub tokens: u32,
    /// When it was written.
    pub updated_at: DateTime<Utc>,
    /// How many times the summary was folded forward.
    pub folds: u32,
    /// Model tokens (prompt and completion) spent writing it, over all folds.
    pub tokens_spent: u64,
    /// The last fold used the deterministic fallback because the model could not answer.
    #[serde(default, skip_serializing_if = "is_false")]
    pub fallback: bool,
}

impl Session {
    /// A new, empty, active session started now.
    pub fn new(
        id: SessionId,
        user_id: UserId,
        animal_id: AnimalId,
        animal_name: impl Into<String>,
    ) -> Self {
        let now = Utc::now();
        Self {
            id,
            user_id,
            animal_id,
            animal_name: animal_name.into(),
            started_at: now,
            last_activity: now,
            message_count: 0,
            status: SessionStatus::Active,
            summary: None,
            thread_id: None,
            rolling_summary: None,
        }
    }
}

/// Whether an animal is offered to visitors (`status` of the legacy animal item).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum AnimalStatus {
    /// Listed and available for chat (the default).
    #[default]
    Active,
    /// Kept, but neither listed nor available for chat.
    Hidden,
    /// Deleted (soft delete): neither listed nor available for chat.
    Deleted,
}

impl AnimalStatus {
    /// The legacy wire name (`active`, `hidden`, `deleted`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Hidden => "hidden",
            Self::Deleted => "deleted",
        }
    }

    /// Reads a legacy status; `None` for a value cmz does not know.
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "active" => Some(Self::Active),
            "hidden" | "inactive" => Some(Self::Hidden),
            "deleted" => Some(Self::Deleted),
            _ => None,
        }
    }
}

/// How an animal ambassador speaks: the source of the system prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Persona {
    /// The animal.
    pub animal_id: AnimalId,
    /// Its name, as children know it.
    pub name: String,
    /// How it talks and behaves.
    #[serde(default)]
    pub personality: String,
    /// Facts it may share.
    #[serde(default)]
    pub facts: Vec<String>,
    /// Extra rules for this persona, appended after the shared child-safety guidelines.
    #[serde(default)]
    pub guidelines: Vec<String>,
    /// Its species (`species` of the legacy animal item), shown in animal lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub species: Option<String>,
    /// A short public description (`description`), shown in animal lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether it is offered: only [`AnimalStatus::Active`] animals are listed or chatted with.
    #[serde(default)]
    pub status: AnimalStatus,
    /// A full custom prompt configured by the zoo (`configuration.systemPrompt`). When set it
    /// replaces the prompt built from the fields above; cmz's child-safety rules are still
    /// appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Sampling temperature configured for this animal (`configuration.temperature`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// The model configured for this animal (`configuration.aiModel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl Persona {
    /// A persona with a name and nothing else: active, no facts, the built prompt.
    pub fn new(animal_id: AnimalId, name: impl Into<String>) -> Self {
        Self {
            animal_id,
            name: name.into(),
            personality: String::new(),
            facts: Vec::new(),
            guidelines: Vec::new(),
            species: None,
            description: None,
            status: AnimalStatus::Active,
            system_prompt: None,
            temperature: None,
            model: None,
        }
    }

    /// Whether visitors may see and chat with this animal.
    pub fn is_offered(&self) -> bool {
        self.status == AnimalStatus::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_uses_legacy_names() {
        let mut m = NewMessage::new(Role::Assistant, "Roar!");
        m.metadata.set_usage(Some(Usage {
            prompt_tokens: 10,
            completion_tokens: 3,
            cached_prompt_tokens: None,
        }));
        m.metadata.latency_ms = Some(42);
        let stored = m.into_message(SessionId::new("conv_lion_u1_00000000").unwrap(), 2);
        let json = serde_json::to_value(&stored).unwrap();
        assert_eq!(json["text"], "Roar!");
        assert_eq!(json["role"], "assistant");
        assert_eq!(json["sessionId"], "conv_lion_u1_00000000");
        assert!(json["messageId"].is_string());
        assert!(json["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(json["metadata"]["tokensPrompt"], 10);
        assert_eq!(json["metadata"]["tokensCompletion"], 3);
        assert_eq!(json["metadata"]["latencyMs"], 42);
        assert!(json["metadata"].get("fallback").is_none());
        let back: Message = serde_json::from_value(json).unwrap();
        assert_eq!(back, stored);
        assert_eq!(back.metadata.usage().unwrap().total(), 13);
    }

    #[test]
    fn session_uses_legacy_names() {
        let s = Session::new(
            SessionId::new("conv_lion_u1_00000000").unwrap(),
            UserId::new("u1").unwrap(),
            AnimalId::new("lion").unwrap(),
            "Leo",
        );
        let json = serde_json::to_value(&s).unwrap();
        for key in [
            "sessionId",
            "userId",
            "animalId",
            "animalName",
            "startTime",
            "lastActivity",
            "messageCount",
        ] {
            assert!(json.get(key).is_some(), "{key} missing in {json}");
        }
        assert_eq!(json["status"], "active");
    }

    #[test]
    fn new_message_limits() {
        assert!(
            NewMessage::new(Role::User, "x".repeat(MAX_CONTENT_BYTES))
                .validate()
                .is_ok()
        );
        let err = NewMessage::new(Role::User, "x".repeat(MAX_CONTENT_BYTES + 1))
            .validate()
            .unwrap_err();
        assert_eq!(err.code(), "validation_error");
        assert_eq!(
            NewMessage::new(Role::System, "x")
                .validate()
                .unwrap_err()
                .code(),
            "validation_error"
        );
    }
}
