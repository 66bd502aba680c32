//! Checking a child's message before the model sees it.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;

/// What a moderator decided about a text.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ModerationVerdict {
    /// The text should not reach the model.
    pub flagged: bool,
    /// The categories that fired (provider names, for the audit trail).
    pub categories: Vec<String>,
}

/// A content check run on the user's message before the model call.
///
/// # Contract
/// - Returns a verdict, or `unavailable`/`timeout` when the check could not be made (the
///   turn engine then answers as it does when the model fails: it never lets an unchecked
///   message through).
/// - May be called concurrently.
#[async_trait]
pub trait Moderator: Debug + Send + Sync + 'static {
    /// Checks `text`.
    async fn check(&self, text: &str) -> Result<ModerationVerdict>;
}

/// A shared, type-erased moderator.
pub type DynModerator = Arc<dyn Moderator>;

/// How much of a turn the moderator checks. A request can raise the deployment's level
/// ([`ConversationConfig::moderation_level`](crate::service::ConversationConfig)), never
/// lower it: the users are children.
///
/// - `Permissive` and `Standard`: the child's message (and any context summary the client
///   sends) is checked before the model sees it. `Permissive` is accepted for the legacy
///   API's sake and checks exactly what `Standard` does.
/// - `Strict`: the model's reply is checked too, before the child sees any of it; a
///   flagged reply is replaced by the persona's kind refusal. A streamed turn at this level
///   arrives as one piece, when the whole reply has been checked.
///
/// Without a moderator configured there is nothing to run at any level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[non_exhaustive]
pub enum ModerationLevel {
    /// The legacy API's lowest level; checks what `Standard` checks.
    Permissive,
    /// The child's message is checked before the model call (the default).
    #[default]
    Standard,
    /// The reply is checked as well, before it is shown.
    Strict,
}

impl ModerationLevel {
    /// The level's name on the wire: `permissive`, `standard` or `strict`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModerationLevel::Permissive => "permissive",
            ModerationLevel::Standard => "standard",
            ModerationLevel::Strict => "strict",
        }
    }

    /// Whether the model's reply is checked before it is shown.
    pub fn checks_replies(self) -> bool {
        self >= ModerationLevel::Strict
    }
}

impl std::str::FromStr for ModerationLevel {
    type Err = crate::Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "permissive" => Ok(ModerationLevel::Permissive),
            "standard" => Ok(ModerationLevel::Standard),
            "strict" => Ok(ModerationLevel::Strict),
            _ => Err(crate::Error::validation(
                "moderationLevel",
                "moderationLevel must be permissive, standard or strict",
            )),
        }
    }
}
