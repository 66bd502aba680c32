//! Shared rate-limit counters and totals in Redis, each change one atomic script.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{TimeDelta, Utc};
use cmz_core::Result;
use cmz_core::auth::{RateCount, RateLimitStore, Tally};
use redis::Script;

use crate::{Redis, millis, unavailable};

/// Fixed-window counters (`cmz:rate:<key>`) and totals (`cmz:total:<key>`) in Redis, so the
/// turn limit, login throttles and token budgets hold across servers. Keys expire with
/// their window.
#[derive(Debug, Clone)]
pub struct RedisRateLimitStore {
    redis: Redis,
}

impl RedisRateLimitStore {
    /// The store on `redis`.
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }
}

/// Counts a hit; opens the window (sets its expiry) on the first. Returns the count and the
/// milliseconds left in the window.
const HIT: &str = r#"
local count = redis.call('INCR', KEYS[1])
if count == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return {count, redis.call('PTTL', KEYS[1])}
"#;

/// Takes back one hit, never below 0.
const RELEASE: &str = r#"
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count > 0 then redis.call('DECR', KEYS[1]) end
return 0
"#;

/// Adds ARGV[1] while the total is below ARGV[2] (a negative amount always, never below 0);
/// a new total's window is ARGV[3] ms. Returns the total, whether it was added, and the
/// milliseconds left.
const ADD: &str = r#"
local total = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if amount == 0 then return {tostring(total), 1, ttl} end
if amount > 0 and total >= tonumber(ARGV[2]) then return {tostring(total), 0, ttl} end
local after = total + amount
if after < 0 then after = 0 end
if ttl < 0 then
  redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX', ARGV[3])
  ttl = tonumber(ARGV[3])
else
  redis.call('SET', KEYS[1], string.format('%.0f', after), 'KEEPTTL')
end
return {string.format('%.0f', after), 1, ttl}
"#;

fn resets_in(ms: i64) -> chrono::DateTime<Utc> {
    Utc::now() + TimeDelta::milliseconds(ms.max(0))
}

#[async_trait]
impl RateLimitStore for RedisRateLimitStore {
    #[tracing::instrument(name = "redis.rate_hit", skip_all)]
    async fn hit(&self, key: &str, window: Duration) -> Result<RateCount> {
        let mut connection = self.redis.connection();
        let (count, ttl): (u64, i64) = Script::new(HIT)
            .key(format!("cmz:rate:{key}"))
            .arg(millis(window))
            .invoke_async(&mut connection)
            .await
            .map_err(|e| unavailable("rate hit", e))?;
        Ok(RateCount {
            count: u32::try_from(count).unwrap_or(u32::MAX),
            resets_at: resets_in(ttl),
        })
    }

    #[tracing::instrument(name = "redis.rate_peek", skip_all)]
    async fn peek(&self, key: &str, _window: Duration) -> Result<RateCount> {
        let key = format!("cmz:rate:{key}");
        let mut connection = self.redis.connection();
        let (count, ttl): (Option<u64>, i64) = redis::pipe()
            .get(&key)
            .pttl(&key)
            .query_async(&mut connection)
            .await
            .map_err(|e| unavailable("rate peek", e))?;
        Ok(RateCount {
            count: count.map_or(0, |c| u32::try_from(c).unwrap_or(u32::MAX)),
            resets_at: resets_in(ttl),
        })
    }

    #[tracing::instrument(name = "redis.rate_reset", skip_all)]
    async fn reset(&self, key: &str) -> Result<()> {
        let mut connection = self.redis.connection();
        let _: () = redis::cmd("DEL")
            .arg(format!("cmz:rate:{key}"))
            .arg(format!("cmz:total:{key}"))
            .query_async(&mut connection)
            .await
            .map_err(|e| unavailable("rate reset", e))?;
        Ok(())
    }

    #[tracing::instrument(name = "redis.rate_release", skip_all)]
    async fn release(&self, key: &str) -> Result<()> {
        let mut connection = self.redis.connection();
        let _: i64 = Script::new(RELEASE)
            .key(format!("cmz:rate:{key}"))
            .invoke_async(&mut connection)
            .await
            .map_err(|e| unavailable("rate release", e))?;
        Ok(())
    }

    #[tracing::instrument(name = "redis.rate_add", skip_all)]
    async fn add(&self, key: &str, amount: i64, ceiling: u64, window: Duration) -> Result<Tally> {
        let mut connection = self.redis.connection();
        let (total, added, ttl): (String, i64, i64) = Script::new(ADD)
            .key(format!("cmz:total:{key}"))
            .arg(amount)
            .arg(ceiling)
            .arg(millis(window))
            .invoke_async(&mut connection)
            .await
            .map_err(|e| unavailable("rate add", e))?;
        Ok(Tally {
            total: total.parse().unwrap_or(0),
            added: added == 1,
            resets_at: if ttl < 0 { Utc::now() } else { resets_in(ttl) },
        })
    }
}
