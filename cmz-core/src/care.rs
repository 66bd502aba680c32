//! Cost and care: what the model cost each day (usage counters), what users thought of
//! the replies (feedback), and the replies staff should look at (the review queue).
//!
//! The engine keeps all three through one [`CareStore`] as turns are stored (see
//! [`ConversationService::with_care`](crate::service::ConversationService::with_care)),
//! so a report or the queue never reads the message table.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use cmz_core::care::{CareStore, UsageCounts, UsageKey};
//! use cmz_core::memory::InMemoryCareStore;
//! use cmz_core::prelude::*;
//!
//! let care = InMemoryCareStore::new();
//! let day = chrono::NaiveDate::from_ymd_opt(2026, 12, 3).unwrap();
//! let key = UsageKey {
//!     day,
//!     user_id: UserId::new("kid1")?,
//!     family_id: None,
//!     animal_id: AnimalId::new("lion")?,
//!     model: "gpt-4o-mini".into(),
//! };
//! let turn = UsageCounts { prompt_tokens: 120, completion_tokens: 40, turns: 1, fallbacks: 0 };
//! care.add_usage(&key, &turn).await?;
//! care.add_usage(&key, &turn).await?;
//! let rows = care.usage(day, day).await?;
//! assert_eq!(rows[0].counts.turns, 2);
//! assert_eq!(rows[0].counts.total_tokens(), 320);
//! # Ok::<_, cmz_core::Error>(())
//! # }).unwrap();
//! ```

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{AnimalId, FamilyId, MessageId, SessionId, UserId};
use crate::store::{Page, PageRequest};

/// One usage counter: a day (UTC), a user, the animal and the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageKey {
    /// The UTC day the turns were stored.
    pub day: NaiveDate,
    /// Whose turns.
    pub user_id: UserId,
    /// The user's family when the turns were taken, if any (the latest one wins).
    pub family_id: Option<FamilyId>,
    /// With which animal.
    pub animal_id: AnimalId,
    /// The model that answered (`fallback` when none did).
    pub model: String,
}

/// What a counter holds (and what a report sums).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageCounts {
    /// Prompt tokens (as the model reported them, or estimated).
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Turns stored (a rolling summary's model call counts tokens, not a turn).
    pub turns: u64,
    /// Turns answered with the fallback because the model failed.
    pub fallbacks: u64,
}

impl UsageCounts {
    /// Prompt plus completion tokens.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &UsageCounts) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.turns = self.turns.saturating_add(other.turns);
        self.fallbacks = self.fallbacks.saturating_add(other.fallbacks);
    }
}

/// A stored counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    /// Which counter.
    pub key: UsageKey,
    /// Its counts.
    pub counts: UsageCounts,
}

/// A thumbs up or down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vote {
    /// The reply was good.
    Up,
    /// The reply needs a look (it goes to the review queue).
    Down,
}

impl Vote {
    /// The wire name (`up`, `down`).
    pub fn as_str(self) -> &'static str {
        match self {
            Vote::Up => "up",
            Vote::Down => "down",
        }
    }
}

impl std::str::FromStr for Vote {
    type Err = Error;
    fn from_str(value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "up" | "thumbs_up" | "+1" => Ok(Vote::Up),
            "down" | "thumbs_down" | "-1" => Ok(Vote::Down),
            _ => Err(Error::validation(
                "vote",
                format!("vote must be \"up\" or \"down\", not {value:?}"),
            )),
        }
    }
}

/// The longest feedback or review note, in characters.
pub const MAX_NOTE_CHARS: usize = 500;

/// One user's vote on one assistant message (a second vote replaces the first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Feedback {
    /// Who voted.
    pub user_id: UserId,
    /// The session of the message.
    pub session_id: SessionId,
    /// The message voted on.
    pub message_id: MessageId,
    /// Its sequence number in the session.
    pub seq: u64,
    /// Whose conversation it is.
    pub owner_id: UserId,
    /// Up or down.
    pub vote: Vote,
    /// An optional short note (personal details taken out).
    pub note: Option<String>,
    /// The animal that answered.
    pub animal_id: AnimalId,
    /// The persona's name when it answered.
    pub persona: String,
    /// The model that produced the reply (`None` for a fallback or a refusal).
    pub model: Option<String>,
    /// When the vote was given (or last replaced).
    pub at: DateTime<Utc>,
}

/// Why a reply is in the review queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewReason {
    /// A user gave it a thumbs down.
    ThumbsDown,
    /// The moderator flagged the message (or reply) and the animal refused.
    Moderated,
    /// The model failed and the fallback answered.
    Fallback,
    /// The reply was cut short.
    Interrupted,
    /// Personal details were taken out of the message it answers.
    Redacted,
}

impl ReviewReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewReason::ThumbsDown => "thumbs_down",
            ReviewReason::Moderated => "moderated",
            ReviewReason::Fallback => "fallback",
            ReviewReason::Interrupted => "interrupted",
            ReviewReason::Redacted => "redacted",
        }
    }

    /// Parses a wire name.
    pub fn parse(value: &str) -> Option<Self> {
        [
            ReviewReason::ThumbsDown,
            ReviewReason::Moderated,
            ReviewReason::Fallback,
            ReviewReason::Interrupted,
            ReviewReason::Redacted,
        ]
        .into_iter()
        .find(|reason| reason.as_str() == value)
    }
}

/// Which part of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReviewState {
    /// Not looked at yet.
    Open,
    /// Marked reviewed.
    Reviewed,
}

impl std::str::FromStr for ReviewState {
    type Err = Error;
    fn from_str(value: &str) -> Result<Self> {
        match value {
            "open" => Ok(ReviewState::Open),
            "reviewed" => Ok(ReviewState::Reviewed),
            _ => Err(Error::validation(
                "state",
                format!("state must be \"open\" or \"reviewed\", not {value:?}"),
            )),
        }
    }
}

/// Who marked an item reviewed, when, and what they noted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewMark {
    /// The staff member.
    pub by: UserId,
    /// When.
    pub at: DateTime<Utc>,
    /// Their note.
    pub note: Option<String>,
}

/// An assistant message in the review queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewItem {
    /// The item's id (see [`ReviewItem::id_for`]): newest first is descending id order.
    pub id: String,
    /// The session of the message.
    pub session_id: SessionId,
    /// The message.
    pub message_id: MessageId,
    /// Its sequence number.
    pub seq: u64,
    /// Whose conversation it is.
    pub owner_id: UserId,
    /// The animal that answered.
    pub animal_id: AnimalId,
    /// Why it needs a look (sorted, no repeats).
    pub reasons: Vec<ReviewReason>,
    /// When the message was stored.
    pub flagged_at: DateTime<Utc>,
    /// The review, once there is one.
    pub review: Option<ReviewMark>,
}

impl ReviewItem {
    /// The id of the item for a message stored at `at` as `seq` of `session`: the time in
    /// milliseconds (13 digits), the sequence number and the session id, so ids sort by
    /// time and the same message always has the same id.
    pub fn id_for(at: DateTime<Utc>, session: &SessionId, seq: u64) -> String {
        format!("{:013}-{seq}-{session}", at.timestamp_millis().max(0))
    }

    /// Checks an id from a client: `validation_error` unless it has the shape of
    /// [`ReviewItem::id_for`].
    pub fn check_id(id: &str) -> Result<()> {
        let invalid = || {
            Error::validation(
                "itemId",
                "a review item id is <13-digit time>-<seq>-<sessionId>",
            )
        };
        let mut parts = id.splitn(3, '-');
        let (Some(at), Some(seq), Some(session)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        if at.len() != 13
            || !at.bytes().all(|b| b.is_ascii_digit())
            || seq.is_empty()
            || seq.len() > 19
            || !seq.bytes().all(|b| b.is_ascii_digit())
            || SessionId::new(session).is_err()
        {
            return Err(invalid());
        }
        Ok(())
    }
}

/// Usage counters, feedback and the review queue.
///
/// # Contract
/// - `add_usage` adds to one counter atomically: concurrent adds are all counted.
/// - `usage` returns every counter of the days `from..=to`, ordered by key; reading it
///   never scans messages. `user_usage` sums one user's counters of one day (one
///   partition read, not the day's whole report).
/// - `put_feedback` keeps one vote per (user, session, seq): a second replaces the first.
/// - `flag` adds `item` to the open queue, or adds its reasons to the open item with the
///   same id (the union, sorted). An item already reviewed is opened again.
/// - `review_items` lists one state's items newest first (descending id), in pages.
/// - `mark_reviewed` moves an open item to the reviewed state with the mark and returns
///   it; `not_found` when no open item has the id.
/// - `forget_user` removes the user's feedback, the queue items of their conversations
///   and their usage counters of the days since `usage_since`, and says how many records
///   went; repeating it is harmless.
/// - Backend failures are `unavailable`; every method may be called concurrently.
#[async_trait]
pub trait CareStore: Debug + Send + Sync + 'static {
    /// Adds to a usage counter.
    async fn add_usage(&self, key: &UsageKey, counts: &UsageCounts) -> Result<()>;
    /// The counters of the days `from..=to`.
    async fn usage(&self, from: NaiveDate, to: NaiveDate) -> Result<Vec<UsageRow>>;
    /// One user's counters of one day, summed (every animal and model).
    async fn user_usage(&self, user: &UserId, day: NaiveDate) -> Result<UsageCounts>;
    /// Stores (or replaces) a vote.
    async fn put_feedback(&self, feedback: &Feedback) -> Result<()>;
    /// Reads a user's vote on a message.
    async fn get_feedback(
        &self,
        user: &UserId,
        session: &SessionId,
        seq: u64,
    ) -> Result<Option<Feedback>>;
    /// Puts a message in the open queue (or adds reasons to it).
    async fn flag(&self, item: &ReviewItem) -> Result<()>;
    /// A page of the queue, newest first.
    async fn review_items(&self, state: ReviewState, page: PageRequest)
    -> Result<Page<ReviewItem>>;
    /// Reads one item (the open one when it is both open and was reviewed before).
    async fn get_review_item(&self, id: &str) -> Result<Option<ReviewItem>>;
    /// Marks an open item reviewed.
    async fn mark_reviewed(&self, id: &str, mark: &ReviewMark) -> Result<ReviewItem>;
    /// Removes what is kept about a user (see the contract).
    async fn forget_user(&self, user: &UserId, usage_since: NaiveDate) -> Result<u64>;
}

/// A shared, type-erased care store.
pub type DynCareStore = Arc<dyn CareStore>;
