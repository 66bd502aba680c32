//! Streams across servers: a [`StreamMirror`] holds a copy of each resumable stream's
//! events (and its stop signal and whether a reader is attached somewhere), so a client
//! whose reconnect lands on another server resumes the same turn there.
//!
//! The server running the turn stays the authority: it keeps the events in process and
//! copies them to the mirror as they come; when the mirror fails it logs a warning and
//! goes on in process (readers on that server never notice). Readers on other servers read
//! the copy, and keep a "someone is reading" mark fresh so the turn is not cancelled for
//! want of a reader; a stop requested anywhere reaches the turn through the mirror.
//!
//! [`InMemoryStreamMirror`] shares streams between services of one process (tests,
//! embedded use); the Redis mirror (crate `cmz-redis`) shares them between servers.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::Result;
use crate::ids::{SessionId, UserId};
use crate::service::TurnReply;

/// Who a mirrored stream belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MirroredStream {
    /// The user whose turn it is (only they may resume or stop it).
    pub owner: UserId,
    /// The session.
    pub session_id: SessionId,
    /// Whether the turn created the session.
    pub session_created: bool,
}

/// One event of a mirrored stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum MirrorEvent {
    /// A piece of the reply.
    Piece {
        /// Its text.
        text: String,
    },
    /// The end: the stored turn.
    Stored {
        /// The turn.
        reply: Box<TurnReply>,
    },
    /// The end: the turn failed.
    Failed {
        /// The error's code.
        code: String,
        /// Its message.
        message: String,
    },
    /// The end: the turn was cancelled (stopped, or no reader came back).
    Cancelled,
}

impl MirrorEvent {
    /// Whether this is the stream's last event.
    pub fn is_end(&self) -> bool {
        !matches!(self, MirrorEvent::Piece { .. })
    }
}

/// A copy of resumable streams that other servers can read.
///
/// # Contract
/// - `open` records a stream's owner; `info` returns it until `keep` after the last write
///   to the stream, then `None`.
/// - `append` adds event `number` (1, 2, … in order, the end last); `read` returns the
///   events numbered after `after`, oldest first, each exactly once however often it is
///   called, waiting up to `wait` when there are none yet (then an empty list).
/// - `request_stop` / `stop_requested`: a stop asked on any server is seen by all.
/// - `touch(stream, for)` marks a reader as attached for `for`; `touched` says whether
///   such a mark is still fresh.
/// - Failures are `unavailable`; every method may be called concurrently.
#[async_trait]
pub trait StreamMirror: Debug + Send + Sync + 'static {
    /// Records a new stream.
    async fn open(&self, stream: &str, info: &MirroredStream, keep: Duration) -> Result<()>;
    /// Appends event `number`.
    async fn append(
        &self,
        stream: &str,
        number: u64,
        event: &MirrorEvent,
        keep: Duration,
    ) -> Result<()>;
    /// Appends events in order (numbers increasing), as `append` each; a backend may send
    /// them in one request.
    async fn append_all(
        &self,
        stream: &str,
        events: &[(u64, MirrorEvent)],
        keep: Duration,
    ) -> Result<()> {
        for (number, event) in events {
            self.append(stream, *number, event, keep).await?;
        }
        Ok(())
    }
    /// The stream's owner and session, while it is kept.
    async fn info(&self, stream: &str) -> Result<Option<MirroredStream>>;
    /// The events after `after`.
    async fn read(
        &self,
        stream: &str,
        after: u64,
        wait: Duration,
    ) -> Result<Vec<(u64, MirrorEvent)>>;
    /// Asks the server running the stream to stop it.
    async fn request_stop(&self, stream: &str, keep: Duration) -> Result<()>;
    /// Whether a stop was asked.
    async fn stop_requested(&self, stream: &str) -> Result<bool>;
    /// Marks a reader as attached (on some server) for `fresh_for`.
    async fn touch(&self, stream: &str, fresh_for: Duration) -> Result<()>;
    /// Whether a reader's mark is still fresh.
    async fn touched(&self, stream: &str) -> Result<bool>;
}

/// A shared, type-erased stream mirror.
pub type DynStreamMirror = Arc<dyn StreamMirror>;

#[derive(Debug, Default)]
struct Kept {
    info: Option<MirroredStream>,
    events: Vec<(u64, MirrorEvent)>,
    until: Option<Instant>,
    stop: bool,
    touched_until: Option<Instant>,
}

/// Streams shared by the services of one process.
#[derive(Debug, Default)]
pub struct InMemoryStreamMirror {
    streams: Mutex<HashMap<String, Kept>>,
    changed: tokio::sync::Notify,
}

impl InMemoryStreamMirror {
    /// An empty mirror.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, stream: &str, f: impl FnOnce(&mut Kept) -> T) -> T {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        streams.retain(|_, kept| kept.until.is_some_and(|until| until > now));
        let kept = streams.entry(stream.to_owned()).or_default();
        let answer = f(kept);
        // A look at a stream nobody wrote keeps nothing.
        if kept.until.is_none() {
            streams.remove(stream);
        }
        answer
    }
}

#[async_trait]
impl StreamMirror for InMemoryStreamMirror {
    async fn open(&self, stream: &str, info: &MirroredStream, keep: Duration) -> Result<()> {
        self.with(stream, |kept| {
            kept.info = Some(info.clone());
            kept.until = Some(Instant::now() + keep);
        });
        Ok(())
    }

    async fn append(
        &self,
        stream: &str,
        number: u64,
        event: &MirrorEvent,
        keep: Duration,
    ) -> Result<()> {
        self.with(stream, |kept| {
            if kept.events.last().is_none_or(|(last, _)| *last < number) {
                kept.events.push((number, event.clone()));
            }
            kept.until = Some(Instant::now() + keep);
        });
        self.changed.notify_waiters();
        Ok(())
    }

    async fn info(&self, stream: &str) -> Result<Option<MirroredStream>> {
        Ok(self.with(stream, |kept| kept.info.clone()))
    }

    async fn read(
        &self,
        stream: &str,
        after: u64,
        wait: Duration,
    ) -> Result<Vec<(u64, MirrorEvent)>> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let found: Vec<_> = self.with(stream, |kept| {
                kept.events
                    .iter()
                    .filter(|(number, _)| *number > after)
                    .cloned()
                    .collect()
            });
            if !found.is_empty() {
                return Ok(found);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn request_stop(&self, stream: &str, keep: Duration) -> Result<()> {
        self.with(stream, |kept| {
            kept.stop = true;
            kept.until = Some(
                kept.until
                    .unwrap_or_else(Instant::now)
                    .max(Instant::now() + keep),
            );
        });
        Ok(())
    }

    async fn stop_requested(&self, stream: &str) -> Result<bool> {
        Ok(self.with(stream, |kept| kept.stop))
    }

    async fn touch(&self, stream: &str, fresh_for: Duration) -> Result<()> {
        self.with(stream, |kept| {
            let until = Instant::now() + fresh_for;
            kept.touched_until = Some(until);
            kept.until = Some(kept.until.map_or(until, |kept| kept.max(until)));
        });
        Ok(())
    }

    async fn touched(&self, stream: &str) -> Result<bool> {
        Ok(self.with(stream, |kept| {
            kept.touched_until
                .is_some_and(|until| until > Instant::now())
        }))
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_in_memory_mirror_meets_the_contract() {
        crate::testing::check_stream_mirror(&super::InMemoryStreamMirror::new()).await;
    }
}
