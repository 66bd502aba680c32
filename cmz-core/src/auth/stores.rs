//! The stores auth needs: users, families, revocations and rate-limit counters.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::model::{Family, RefreshRecord, RefreshState, User};
use crate::error::Result;
use crate::ids::{FamilyId, UserId};

/// Users and their credentials.
///
/// # Contract
/// - `create_user` fails with `conflict` if the id or the (lowercased) email is taken.
/// - `find_by_email` matches the lowercased email exactly; unknown is `None`.
/// - `set_password_hash` on an unknown user is `not_found`.
/// - Backend failures are `unavailable`; every method may be called concurrently.
#[async_trait]
pub trait UserStore: Debug + Send + Sync + 'static {
    /// Reads a user.
    async fn get_user(&self, id: &UserId) -> Result<Option<User>>;
    /// Finds a user by lowercased email.
    async fn find_by_email(&self, email: &str) -> Result<Option<User>>;
    /// Stores a new user.
    async fn create_user(&self, user: &User) -> Result<()>;
    /// Replaces a user's password hash (used to upgrade legacy hashes).
    async fn set_password_hash(&self, id: &UserId, hash: &str) -> Result<()>;
    /// Removes a user and whatever the store keeps to find them (an email claim, a
    /// membership index): nothing of theirs is left. `false` when there was no such user;
    /// repeating it is harmless.
    async fn delete_user(&self, user: &User) -> Result<bool>;
}

/// Families, for the parent-sees-students rule.
///
/// # Contract
/// - `families_of` returns every family in which the user is a parent or a student.
/// - `put_family` creates or replaces a family.
/// - Backend failures are `unavailable`; every method may be called concurrently.
#[async_trait]
pub trait FamilyDirectory: Debug + Send + Sync + 'static {
    /// Reads a family.
    async fn get_family(&self, id: &FamilyId) -> Result<Option<Family>>;
    /// The families a user belongs to.
    async fn families_of(&self, user: &UserId) -> Result<Vec<Family>>;
    /// Creates or replaces a family.
    async fn put_family(&self, family: &Family) -> Result<()>;
    /// Every family, ordered by id (an administrator's listing; backends may scan).
    async fn list_families(&self) -> Result<Vec<Family>>;
}

/// Refresh tokens and revocations.
///
/// # Contract
/// - `consume_refresh` is atomic: of many concurrent calls with one hash, exactly one sees
///   [`RefreshState::Fresh`]; the others see [`RefreshState::Reused`].
/// - `revoke_chain` / `revoke_token_id` hold at least until `until`; after that the entry
///   may be forgotten. `is_revoked` is true if either id given is revoked.
/// - Backend failures are `unavailable`; every method may be called concurrently.
#[async_trait]
pub trait RevocationStore: Debug + Send + Sync + 'static {
    /// Stores a new refresh token record.
    async fn insert_refresh(&self, record: &RefreshRecord) -> Result<()>;
    /// Marks a refresh token used and says what it was before.
    async fn consume_refresh(&self, token_hash: &str) -> Result<RefreshState>;
    /// Revokes every token of a refresh chain (all issued from one login).
    async fn revoke_chain(&self, chain_id: &str, until: DateTime<Utc>) -> Result<()>;
    /// Revokes one access token by its `jti`.
    async fn revoke_token_id(&self, token_id: &str, until: DateTime<Utc>) -> Result<()>;
    /// Whether the access token id or the refresh chain is revoked.
    async fn is_revoked(&self, token_id: Option<&str>, chain_id: Option<&str>) -> Result<bool>;
    /// Removes every refresh token record of `user` (used or not) and says how many: after
    /// it, no record names the user and none of their refresh tokens works. Repeating it
    /// is harmless.
    async fn forget_user(&self, user: &UserId) -> Result<u64>;
}

/// A fixed-window counter's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateCount {
    /// Hits in the current window.
    pub count: u32,
    /// When the current window ends.
    pub resets_at: DateTime<Utc>,
}

/// The answer to [`RateLimitStore::add`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// The total in the current window after the call (before it, when refused).
    pub total: u64,
    /// Whether the amount was added (`false`: the total was already at the ceiling).
    pub added: bool,
    /// When the current window ends.
    pub resets_at: DateTime<Utc>,
}

/// Conveniences on every [`RateLimitStore`] (a blanket implementation).
#[async_trait]
pub trait RateLimitStoreExt: RateLimitStore {
    /// Counts one hit on `key` and refuses it with `rate_limit_exceeded` (the wait until
    /// the window ends as `retry_after`, `message` for people) once the count is over
    /// `limit`. A refused hit is counted too.
    async fn check(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
        message: &str,
    ) -> Result<RateCount> {
        let count = self.hit(key, window).await?;
        if count.count > limit {
            let wait = (count.resets_at - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_secs(1));
            return Err(crate::Error::rate_limited(message, Some(wait)));
        }
        Ok(count)
    }
}

impl<T: RateLimitStore + ?Sized> RateLimitStoreExt for T {}

/// Shared counters for rate limits, so a limit holds across server instances.
///
/// # Contract
/// - `hit` adds one to `key`'s counter in the current fixed window of length `window`
///   (a new window starts at the first hit after the previous one ended) and returns the
///   count after it; concurrent hits are all counted.
/// - `peek` reads without counting; a key never hit (or whose window ended) has count 0.
/// - `reset` clears a key: its hit counter and its `add` total.
/// - `release` takes back one hit in the current window (never below 0); a backend that
///   cannot may leave the count as it is (the default), which only makes a limit stricter.
/// - `add` is an atomic "add if below": a positive `amount` is added only while the total
///   is below `ceiling` (so of many concurrent adds at the edge exactly the ones that saw
///   room get in, and the total passes the ceiling by at most one amount); a negative one
///   (taking back part of what was added) always applies and never goes below 0. A key
///   never added to (or whose window ended) has total 0. `add` keys are not `hit` keys.
#[async_trait]
pub trait RateLimitStore: Debug + Send + Sync + 'static {
    /// Counts a hit.
    async fn hit(&self, key: &str, window: Duration) -> Result<RateCount>;
    /// Reads a counter.
    async fn peek(&self, key: &str, window: Duration) -> Result<RateCount>;
    /// Clears a counter.
    async fn reset(&self, key: &str) -> Result<()>;
    /// Takes back one hit (a login attempt that succeeded).
    async fn release(&self, key: &str) -> Result<()> {
        let _ = key;
        Ok(())
    }
    /// Adds `amount` to a total (tokens, say) while it is below `ceiling`.
    async fn add(&self, key: &str, amount: i64, ceiling: u64, window: Duration) -> Result<Tally>;
}

/// A shared, type-erased user store.
pub type DynUserStore = Arc<dyn UserStore>;
/// A shared, type-erased family directory.
pub type DynFamilyDirectory = Arc<dyn FamilyDirectory>;
/// A shared, type-erased revocation store.
pub type DynRevocationStore = Arc<dyn RevocationStore>;
/// A shared, type-erased rate-limit store.
pub type DynRateLimitStore = Arc<dyn RateLimitStore>;
