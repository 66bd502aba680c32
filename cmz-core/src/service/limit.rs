//! The per-user limit on model calls (turns and summaries), shared across processes
//! through a [`RateLimitStore`](crate::auth::RateLimitStore).

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::access::Principal;
use crate::auth::{DynRateLimitStore, RateLimitStoreExt as _};
use crate::error::Result;
use crate::ids::UserId;

/// How many model calls a user may make per window (the legacy API's default: 50 an hour).
#[derive(Debug, Clone)]
pub(super) struct TurnLimit {
    pub(super) store: DynRateLimitStore,
    pub(super) limit: u32,
    pub(super) window: Duration,
}

/// Where a user stands against the turn limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TurnLimitStatus {
    /// Model calls allowed per window.
    pub limit: u32,
    /// The window's length.
    pub window: Duration,
    /// Calls counted in the current window (above `limit` once a call was refused).
    pub used: u32,
    /// When the current window ends.
    pub resets_at: DateTime<Utc>,
}

impl TurnLimitStatus {
    /// Whether the next call is refused.
    pub fn exceeded(&self) -> bool {
        self.used >= self.limit
    }
}

/// The message of the error a refused call gets (the legacy API's).
pub const TURN_LIMIT_MESSAGE: &str = "API rate limit exceeded. Please try again later.";

fn key(principal: &Principal) -> String {
    turn_limit_key(&principal.user_id)
}

/// The rate-limit counter of `user`'s model calls (reset when their data is erased).
pub fn turn_limit_key(user: &UserId) -> String {
    const PREFIX: &str = "turns:";
    let mut key = String::with_capacity(PREFIX.len() + user.as_str().len());
    key.push_str(PREFIX);
    key.push_str(user.as_str());
    key
}

impl TurnLimit {
    /// Counts one model call; `rate_limit_exceeded` with the wait when over the limit.
    pub(super) async fn hit(&self, principal: &Principal) -> Result<TurnLimitStatus> {
        let count = self
            .store
            .check(&key(principal), self.limit, self.window, TURN_LIMIT_MESSAGE)
            .await?;
        Ok(TurnLimitStatus {
            limit: self.limit,
            window: self.window,
            used: count.count,
            resets_at: count.resets_at,
        })
    }

    /// Forgets a user's counter (their erasure).
    pub(super) async fn forget(&self, user: &UserId) -> Result<()> {
        self.store.reset(&turn_limit_key(user)).await
    }

    /// Reads the user's counter without counting.
    pub(super) async fn status(&self, principal: &Principal) -> Result<TurnLimitStatus> {
        let count = self.store.peek(&key(principal), self.window).await?;
        Ok(TurnLimitStatus {
            limit: self.limit,
            window: self.window,
            used: count.count,
            resets_at: count.resets_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key is stored (in Redis too): it must not change between releases.
    #[test]
    fn the_counter_key_is_turns_and_the_user_id() {
        let user = UserId::new("user_student_ana").unwrap();
        assert_eq!(turn_limit_key(&user), "turns:user_student_ana");
    }
}
