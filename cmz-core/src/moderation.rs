//! Checking a child's message before the model sees it.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;

/// What a moderator decided about a text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
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
