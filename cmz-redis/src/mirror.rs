//! Resumable streams in Redis: one Redis stream per turn.

use std::time::Duration;

use async_trait::async_trait;
use cmz_core::relay::{MirrorEvent, MirroredStream, StreamMirror};
use cmz_core::{Error, Result};
use redis::AsyncCommands as _;
use redis::streams::{StreamRangeReply, StreamReadOptions, StreamReadReply};

use crate::{Redis, millis, unavailable};

/// Streams shared between servers through Redis (see the crate docs): the events of turn
/// `<id>` are the Redis stream `cmz:stream:<id>` with entry ids `0-<n>`; its owner is the
/// hash `cmz:stream:<id>:info`, a stop the key `…:stop`, a reader's mark the key
/// `…:alive`. Everything expires `keep` after the last write.
#[derive(Debug, Clone)]
pub struct RedisStreamMirror {
    redis: Redis,
}

impl RedisStreamMirror {
    /// The mirror on `redis`.
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }
}

fn key(stream: &str, part: &str) -> String {
    if part.is_empty() {
        format!("cmz:stream:{stream}")
    } else {
        format!("cmz:stream:{stream}:{part}")
    }
}

fn decode(entries: Vec<redis::streams::StreamId>) -> Vec<(u64, MirrorEvent)> {
    entries
        .into_iter()
        .filter_map(|entry| {
            let number = entry.id.strip_prefix("0-")?.parse().ok()?;
            let data: String = entry.get("e")?;
            match serde_json::from_str(&data) {
                Ok(event) => Some((number, event)),
                Err(_) => {
                    tracing::warn!("a mirrored stream event could not be read; skipped");
                    None
                }
            }
        })
        .collect()
}

#[async_trait]
impl StreamMirror for RedisStreamMirror {
    #[tracing::instrument(name = "redis.stream_open", skip_all)]
    async fn open(&self, stream: &str, info: &MirroredStream, keep: Duration) -> Result<()> {
        let data = serde_json::to_string(info)
            .map_err(|e| Error::internal("serialize a stream's owner").with_source(e))?;
        let mut connection = self.redis.connection();
        let _: () = connection
            .pset_ex(key(stream, "info"), data, millis(keep))
            .await
            .map_err(|e| unavailable("SET", e))?;
        Ok(())
    }

    #[tracing::instrument(name = "redis.stream_append", skip_all)]
    async fn append(
        &self,
        stream: &str,
        number: u64,
        event: &MirrorEvent,
        keep: Duration,
    ) -> Result<()> {
        self.append_all(stream, &[(number, event.clone())], keep)
            .await
    }

    /// All of them in one atomic pipeline (`XADD` each, then the expiries).
    #[tracing::instrument(name = "redis.stream_append", skip_all, fields(events = events.len()))]
    async fn append_all(
        &self,
        stream: &str,
        events: &[(u64, MirrorEvent)],
        keep: Duration,
    ) -> Result<()> {
        let (key_events, key_info) = (key(stream, ""), key(stream, "info"));
        let keep = millis(keep) as i64;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (number, event) in events {
            let data = serde_json::to_string(event)
                .map_err(|e| Error::internal("serialize a stream event").with_source(e))?;
            pipe.cmd("XADD")
                .arg(&key_events)
                .arg(format!("0-{number}"))
                .arg("e")
                .arg(data)
                .ignore();
        }
        pipe.pexpire(&key_events, keep).ignore();
        pipe.pexpire(&key_info, keep).ignore();
        let mut connection = self.redis.connection();
        let added: redis::RedisResult<()> = pipe.query_async(&mut connection).await;
        match added {
            Ok(()) => Ok(()),
            // An id at or below the last one: these events are already there (a retry).
            Err(error) if error.to_string().contains("equal or smaller") => Ok(()),
            Err(error) => Err(unavailable("XADD", error)),
        }
    }

    #[tracing::instrument(name = "redis.stream_info", skip_all)]
    async fn info(&self, stream: &str) -> Result<Option<MirroredStream>> {
        let mut connection = self.redis.connection();
        let data: Option<String> = connection
            .get(key(stream, "info"))
            .await
            .map_err(|e| unavailable("GET", e))?;
        Ok(data.and_then(|d| serde_json::from_str(&d).ok()))
    }

    #[tracing::instrument(name = "redis.stream_read", skip_all)]
    async fn read(
        &self,
        stream: &str,
        after: u64,
        wait: Duration,
    ) -> Result<Vec<(u64, MirrorEvent)>> {
        let events = key(stream, "");
        let mut connection = self.redis.connection();
        let found: StreamRangeReply = connection
            .xrange(&events, format!("(0-{after}"), "+")
            .await
            .map_err(|e| unavailable("XRANGE", e))?;
        if !found.ids.is_empty() || wait.is_zero() {
            return Ok(decode(found.ids));
        }
        // Wait on a connection of its own: a blocking read would hold up every other
        // command on the shared one.
        let mut own = self
            .redis
            .client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| unavailable("connect", e))?;
        let options = StreamReadOptions::default().block(millis(wait) as usize);
        let read: Option<StreamReadReply> = own
            .xread_options(&[&events], &[format!("0-{after}")], &options)
            .await
            .map_err(|e| unavailable("XREAD", e))?;
        Ok(read
            .map(|reply| reply.keys.into_iter().flat_map(|k| decode(k.ids)).collect())
            .unwrap_or_default())
    }

    #[tracing::instrument(name = "redis.stream_stop", skip_all)]
    async fn request_stop(&self, stream: &str, keep: Duration) -> Result<()> {
        let mut connection = self.redis.connection();
        let _: () = connection
            .pset_ex(key(stream, "stop"), 1, millis(keep))
            .await
            .map_err(|e| unavailable("SET", e))?;
        Ok(())
    }

    #[tracing::instrument(name = "redis.stream_stop_requested", skip_all)]
    async fn stop_requested(&self, stream: &str) -> Result<bool> {
        let mut connection = self.redis.connection();
        connection
            .exists(key(stream, "stop"))
            .await
            .map_err(|e| unavailable("EXISTS", e))
    }

    #[tracing::instrument(name = "redis.stream_touch", skip_all)]
    async fn touch(&self, stream: &str, fresh_for: Duration) -> Result<()> {
        let mut connection = self.redis.connection();
        let _: () = connection
            .pset_ex(key(stream, "alive"), 1, millis(fresh_for))
            .await
            .map_err(|e| unavailable("SET", e))?;
        Ok(())
    }

    #[tracing::instrument(name = "redis.stream_touched", skip_all)]
    async fn touched(&self, stream: &str) -> Result<bool> {
        let mut connection = self.redis.connection();
        connection
            .exists(key(stream, "alive"))
            .await
            .map_err(|e| unavailable("EXISTS", e))
    }
}
