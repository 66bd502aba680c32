//! In-memory auth stores: the embedded default.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::model::{Family, RefreshRecord, RefreshState, User};
use super::stores::{
    FamilyDirectory, RateCount, RateLimitStore, RevocationStore, Tally, UserStore,
};
use crate::error::{Error, Result};
use crate::ids::{FamilyId, UserId};

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Users held in memory.
#[derive(Debug, Default)]
pub struct InMemoryUserStore {
    users: Mutex<HashMap<UserId, User>>,
}

impl InMemoryUserStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl UserStore for InMemoryUserStore {
    async fn get_user(&self, id: &UserId) -> Result<Option<User>> {
        Ok(lock(&self.users).get(id).cloned())
    }

    async fn find_by_email(&self, email: &str) -> Result<Option<User>> {
        Ok(lock(&self.users)
            .values()
            .find(|u| u.email == email)
            .cloned())
    }

    async fn create_user(&self, user: &User) -> Result<()> {
        let mut users = lock(&self.users);
        if users.contains_key(&user.user_id) || users.values().any(|u| u.email == user.email) {
            return Err(Error::conflict(
                "a user with this id or email already exists",
            ));
        }
        users.insert(user.user_id.clone(), user.clone());
        Ok(())
    }

    async fn set_password_hash(&self, id: &UserId, hash: &str) -> Result<()> {
        let mut users = lock(&self.users);
        let user = users
            .get_mut(id)
            .ok_or_else(|| Error::not_found(format!("user {id}")))?;
        user.password_hash = Some(hash.to_owned());
        Ok(())
    }

    async fn delete_user(&self, user: &User) -> Result<bool> {
        Ok(lock(&self.users).remove(&user.user_id).is_some())
    }
}

/// Families held in memory.
#[derive(Debug, Default)]
pub struct InMemoryFamilyDirectory {
    families: Mutex<HashMap<FamilyId, Family>>,
}

impl InMemoryFamilyDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl FamilyDirectory for InMemoryFamilyDirectory {
    async fn get_family(&self, id: &FamilyId) -> Result<Option<Family>> {
        Ok(lock(&self.families).get(id).cloned())
    }

    async fn families_of(&self, user: &UserId) -> Result<Vec<Family>> {
        let mut found: Vec<Family> = lock(&self.families)
            .values()
            .filter(|f| f.parents.contains(user) || f.students.contains(user))
            .cloned()
            .collect();
        found.sort_by(|a, b| a.family_id.cmp(&b.family_id));
        Ok(found)
    }

    async fn put_family(&self, family: &Family) -> Result<()> {
        lock(&self.families).insert(family.family_id.clone(), family.clone());
        Ok(())
    }

    async fn list_families(&self) -> Result<Vec<Family>> {
        let mut all: Vec<Family> = lock(&self.families).values().cloned().collect();
        all.sort_by(|a, b| a.family_id.cmp(&b.family_id));
        Ok(all)
    }
}

#[derive(Debug)]
struct RefreshEntry {
    record: RefreshRecord,
    used: bool,
}

#[derive(Debug, Default)]
struct Revocations {
    refresh: HashMap<String, RefreshEntry>,
    chains: HashMap<String, DateTime<Utc>>,
    token_ids: HashMap<String, DateTime<Utc>>,
}

/// Refresh tokens and revocations held in memory. Expired entries are dropped as new
/// revocations come in.
#[derive(Debug, Default)]
pub struct InMemoryRevocationStore {
    state: Mutex<Revocations>,
}

impl InMemoryRevocationStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl RevocationStore for InMemoryRevocationStore {
    async fn insert_refresh(&self, record: &RefreshRecord) -> Result<()> {
        let mut state = lock(&self.state);
        let now = Utc::now();
        state.refresh.retain(|_, e| e.record.expires_at > now);
        if state.refresh.contains_key(&record.token_hash) {
            return Err(Error::conflict("refresh token already stored"));
        }
        state.refresh.insert(
            record.token_hash.clone(),
            RefreshEntry {
                record: record.clone(),
                used: false,
            },
        );
        Ok(())
    }

    async fn forget_user(&self, user: &UserId) -> Result<u64> {
        let mut state = lock(&self.state);
        let before = state.refresh.len();
        state.refresh.retain(|_, e| &e.record.user_id != user);
        Ok((before - state.refresh.len()) as u64)
    }

    async fn consume_refresh(&self, token_hash: &str) -> Result<RefreshState> {
        let mut state = lock(&self.state);
        Ok(match state.refresh.get_mut(token_hash) {
            None => RefreshState::Unknown,
            Some(entry) if entry.used => RefreshState::Reused(entry.record.clone()),
            Some(entry) => {
                entry.used = true;
                RefreshState::Fresh(entry.record.clone())
            }
        })
    }

    async fn revoke_chain(&self, chain_id: &str, until: DateTime<Utc>) -> Result<()> {
        let mut state = lock(&self.state);
        let now = Utc::now();
        state.chains.retain(|_, t| *t > now);
        let entry = state.chains.entry(chain_id.to_owned()).or_insert(until);
        *entry = (*entry).max(until);
        Ok(())
    }

    async fn revoke_token_id(&self, token_id: &str, until: DateTime<Utc>) -> Result<()> {
        let mut state = lock(&self.state);
        let now = Utc::now();
        state.token_ids.retain(|_, t| *t > now);
        let entry = state.token_ids.entry(token_id.to_owned()).or_insert(until);
        *entry = (*entry).max(until);
        Ok(())
    }

    async fn is_revoked(&self, token_id: Option<&str>, chain_id: Option<&str>) -> Result<bool> {
        let state = lock(&self.state);
        let now = Utc::now();
        let token = token_id
            .and_then(|id| state.token_ids.get(id))
            .is_some_and(|t| *t > now);
        let chain = chain_id
            .and_then(|id| state.chains.get(id))
            .is_some_and(|t| *t > now);
        Ok(token || chain)
    }
}

/// Fixed-window counters held in memory (one process only; use a shared store when
/// several servers must share a limit).
#[derive(Debug, Default)]
pub struct InMemoryRateLimitStore {
    counters: Mutex<HashMap<String, RateCount>>,
    totals: Mutex<HashMap<String, (u64, DateTime<Utc>)>>,
}

impl InMemoryRateLimitStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

/// `map[key]`, made by `new` when absent. The key is copied only when it is new: these
/// counters are hit on every turn, nearly always for a key they hold.
fn slot<'m, V>(map: &'m mut HashMap<String, V>, key: &str, new: impl FnOnce() -> V) -> &'m mut V {
    if map.contains_key(key) {
        map.get_mut(key).expect("the key was just found")
    } else {
        map.entry(key.to_owned()).or_insert_with(new)
    }
}

fn window_delta(window: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(window).unwrap_or(chrono::TimeDelta::MAX)
}

#[async_trait]
impl RateLimitStore for InMemoryRateLimitStore {
    async fn hit(&self, key: &str, window: Duration) -> Result<RateCount> {
        let now = Utc::now();
        let mut counters = lock(&self.counters);
        if counters.len() > 10_000 {
            counters.retain(|_, c| c.resets_at > now);
        }
        let counter = slot(&mut counters, key, || RateCount {
            count: 0,
            resets_at: now,
        });
        if counter.resets_at <= now {
            *counter = RateCount {
                count: 0,
                resets_at: now + window_delta(window),
            };
        }
        counter.count = counter.count.saturating_add(1);
        Ok(*counter)
    }

    async fn peek(&self, key: &str, _window: Duration) -> Result<RateCount> {
        let now = Utc::now();
        Ok(match lock(&self.counters).get(key) {
            Some(c) if c.resets_at > now => *c,
            _ => RateCount {
                count: 0,
                resets_at: now,
            },
        })
    }

    async fn reset(&self, key: &str) -> Result<()> {
        lock(&self.counters).remove(key);
        lock(&self.totals).remove(key);
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<()> {
        if let Some(counter) = lock(&self.counters).get_mut(key) {
            counter.count = counter.count.saturating_sub(1);
        }
        Ok(())
    }

    async fn add(&self, key: &str, amount: i64, ceiling: u64, window: Duration) -> Result<Tally> {
        let now = Utc::now();
        let mut totals = lock(&self.totals);
        if totals.len() > 10_000 {
            totals.retain(|_, (_, resets_at)| *resets_at > now);
        }
        let (total, resets_at) = slot(&mut totals, key, || (0, now + window_delta(window)));
        if *resets_at <= now {
            *total = 0;
            *resets_at = now + window_delta(window);
        }
        let added = amount < 0 || *total < ceiling;
        if added {
            *total = total.saturating_add_signed(amount);
        }
        Ok(Tally {
            total: *total,
            added,
            resets_at: *resets_at,
        })
    }
}
