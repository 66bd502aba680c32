#![doc = include_str!("../README.md")]

mod limits;
mod mirror;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use cmz_core::{Error, Result};
use redis::aio::ConnectionManager;

pub use limits::RedisRateLimitStore;
pub use mirror::RedisStreamMirror;

/// A connection to Redis (reconnecting by itself), shared by the stores made from it.
/// Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    connection: ConnectionManager,
    /// For connections of their own (blocking reads).
    pub(crate) client: redis::Client,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").finish_non_exhaustive()
    }
}

impl Redis {
    /// Connects to `url` (`redis://host:port/db`, `rediss://` for TLS is not built in).
    /// Errors: `validation_error` for a malformed URL, `unavailable` when Redis cannot be
    /// reached.
    pub async fn connect(url: &str) -> Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|_| Error::validation("REDIS_URL", "REDIS_URL is not a redis:// URL"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(2)))
            .set_number_of_retries(2);
        let connection = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| Error::unavailable("could not reach Redis", e))?;
        Ok(Self { connection, client })
    }

    /// The stream mirror on this connection.
    pub fn stream_mirror(&self) -> RedisStreamMirror {
        RedisStreamMirror::new(self.clone())
    }

    /// The rate-limit store on this connection.
    pub fn rate_limits(&self) -> RedisRateLimitStore {
        RedisRateLimitStore::new(self.clone())
    }

    pub(crate) fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }
}

/// A Redis failure as cmz's `unavailable`, keeping the cause.
pub(crate) fn unavailable(what: &str, error: redis::RedisError) -> Error {
    Error::unavailable(format!("Redis {what} failed"), error)
}

pub(crate) fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}
