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
    format!("turns:{user}")
}

/// The day's model calls of a user (its key names the day).
fn daily_key(user: &UserId, day: chrono::NaiveDate) -> String {
    format!("calls:{user}:{day}")
}

const DAY_WINDOW: Duration = Duration::from_secs(25 * 3600);

impl TurnLimit {
    /// Counts one model call (and the day's calls, for the legacy `dailyUsage`);
    /// `rate_limit_exceeded` with the wait when over the limit.
    pub(super) async fn hit(&self, principal: &Principal) -> Result<(TurnLimitStatus, u64)> {
        let now = Utc::now();
        let (count, daily) = futures::future::join(
            self.store
                .check(&key(principal), self.limit, self.window, TURN_LIMIT_MESSAGE),
            self.store.add(
                &daily_key(&principal.user_id, now.date_naive()),
                1,
                u64::MAX,
                DAY_WINDOW,
            ),
        )
        .await;
        let count = count?;
        let calls = match daily {
            Ok(tally) => tally.total,
            Err(error) => {
                tracing::warn!(
                    code = error.code().as_str(),
                    "could not count the day's calls"
                );
                0
            }
        };
        let status = TurnLimitStatus {
            limit: self.limit,
            window: self.window,
            used: count.count,
            resets_at: count.resets_at,
        };
        Ok((status, calls))
    }

    /// Forgets a user's counters (their erasure).
    pub(super) async fn forget(&self, user: &UserId) -> Result<()> {
        self.store.reset(&turn_limit_key(user)).await?;
        self.store
            .reset(&daily_key(user, Utc::now().date_naive()))
            .await
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
