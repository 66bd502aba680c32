use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt as _;
use futures::stream::BoxStream;

use crate::chat::{ChatChunk, ChatCompletion, ChatModel, ChatRequest};
use crate::error::{Error, Result};
use crate::types::{Role, Usage};

/// An injected model failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The call fails at once with `unavailable`.
    Unavailable,
    /// The call fails with `rate_limit_exceeded`.
    RateLimited,
    /// The call never answers (for timeout tests).
    Hang,
    /// The stream yields the first `n` chunks, then fails with `unavailable`.
    CutAfter(usize),
}

/// One scripted answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Answer with this text.
    Reply(String),
    /// Fail as described.
    Fail(Failure),
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicUsize,
    streams_started: AtomicUsize,
    streams_dropped_early: AtomicUsize,
}

/// A [`ChatModel`] that follows a script: fixed replies, echo replies, per-chunk delays,
/// injected failures and usage numbers. For tests and examples.
///
/// Steps queued with [`push`](ScriptedModel::push) are used first, one per call; after
/// that every call gets the default reply (`"echo: <user message>"` unless set).
/// Streams split the reply into word chunks.
#[derive(Debug, Clone)]
pub struct ScriptedModel {
    script: Arc<Mutex<VecDeque<Step>>>,
    default_reply: Option<String>,
    chunk_delay: Duration,
    usage: Option<Usage>,
    counters: Arc<Counters>,
    last_request: Arc<Mutex<Option<ChatRequest>>>,
}

impl Default for ScriptedModel {
    fn default() -> Self {
        Self::echo()
    }
}

impl ScriptedModel {
    /// Replies `"echo: <last user message>"`, with usage 10 prompt / 5 completion tokens.
    pub fn echo() -> Self {
        Self {
            script: Arc::default(),
            default_reply: None,
            chunk_delay: Duration::ZERO,
            usage: Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                cached_prompt_tokens: None,
            }),
            counters: Arc::default(),
            last_request: Arc::default(),
        }
    }

    /// Always replies `reply` once the script is used up.
    pub fn always(reply: impl Into<String>) -> Self {
        Self {
            default_reply: Some(reply.into()),
            ..Self::echo()
        }
    }

    /// Waits `delay` before each streamed chunk (and once before a whole reply).
    pub fn with_chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay = delay;
        self
    }

    /// Reports `usage` (or none) with every reply.
    pub fn with_usage(mut self, usage: Option<Usage>) -> Self {
        self.usage = usage;
        self
    }

    /// Queues a step for the next call not yet scripted.
    pub fn push(&self, step: Step) -> &Self {
        self.script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(step);
        self
    }

    /// How many calls (`complete` or `stream`) were made.
    pub fn calls(&self) -> usize {
        self.counters.calls.load(Ordering::SeqCst)
    }

    /// How many streams were dropped by their consumer before they finished.
    pub fn streams_dropped_early(&self) -> usize {
        self.counters.streams_dropped_early.load(Ordering::SeqCst)
    }

    /// The last request received.
    pub fn last_request(&self) -> Option<ChatRequest> {
        self.last_request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn next_step(&self, request: &ChatRequest) -> Step {
        self.counters.calls.fetch_add(1, Ordering::SeqCst);
        *self.last_request.lock().unwrap_or_else(|p| p.into_inner()) = Some(request.clone());
        if let Some(step) = self
            .script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
        {
            return step;
        }
        let reply = match &self.default_reply {
            Some(reply) => reply.clone(),
            None => {
                let last_user = request
                    .messages
                    .iter()
                    .rev()
                    .find(|m| m.role == Role::User)
                    .map_or("", |m| m.content.as_str());
                format!("echo: {last_user}")
            }
        };
        Step::Reply(reply)
    }
}

fn failure_error(failure: Failure) -> Error {
    match failure {
        Failure::RateLimited => {
            Error::rate_limited("scripted rate limit", Some(Duration::from_secs(1)))
        }
        _ => Error::Unavailable {
            message: "scripted model failure".into(),
            source: None,
        },
    }
}

fn split_chunks(reply: &str) -> Vec<String> {
    reply.split_inclusive(' ').map(str::to_owned).collect()
}

/// Counts a stream dropped before its end.
#[derive(Debug)]
struct DropWatch {
    counters: Arc<Counters>,
    finished: bool,
}

impl Drop for DropWatch {
    fn drop(&mut self) {
        if !self.finished {
            self.counters
                .streams_dropped_early
                .fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl ChatModel for ScriptedModel {
    async fn complete(&self, request: ChatRequest) -> Result<ChatCompletion> {
        let step = self.next_step(&request);
        if !self.chunk_delay.is_zero() {
            tokio::time::sleep(self.chunk_delay).await;
        }
        match step {
            Step::Reply(content) => Ok(ChatCompletion {
                content,
                usage: self.usage,
                model: Some(self.name().to_owned()),
            }),
            Step::Fail(Failure::Hang) => futures::future::pending().await,
            Step::Fail(failure) => Err(failure_error(failure)),
        }
    }

    async fn stream(&self, request: ChatRequest) -> Result<BoxStream<'static, Result<ChatChunk>>> {
        let step = self.next_step(&request);
        self.counters.streams_started.fetch_add(1, Ordering::SeqCst);
        let (chunks, fail_after) = match step {
            Step::Reply(content) => (split_chunks(&content), None),
            Step::Fail(Failure::CutAfter(n)) => (
                split_chunks("I was just about to tell you something amazing about"),
                Some(n),
            ),
            Step::Fail(Failure::Hang) => {
                return Ok(futures::stream::pending().boxed());
            }
            Step::Fail(failure) => return Err(failure_error(failure)),
        };
        let state = (
            chunks.into_iter().enumerate(),
            DropWatch {
                counters: Arc::clone(&self.counters),
                finished: false,
            },
            false,
        );
        let delay = self.chunk_delay;
        let usage = self.usage;
        let model = self.name().to_owned();
        let stream = futures::stream::unfold(state, move |(mut chunks, mut watch, done)| {
            let model = model.clone();
            async move {
                if done {
                    watch.finished = true;
                    drop(watch);
                    return None;
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                match chunks.next() {
                    Some((i, _)) if fail_after.is_some_and(|n| i >= n) => {
                        watch.finished = true;
                        Some((
                            Err(failure_error(Failure::Unavailable)),
                            (chunks, watch, true),
                        ))
                    }
                    Some((_, text)) => Some((Ok(ChatChunk::Delta(text)), (chunks, watch, false))),
                    None => {
                        // Done is the last item: a consumer that stops here did not cancel.
                        watch.finished = true;
                        Some((
                            Ok(ChatChunk::Done {
                                usage,
                                model: Some(model),
                            }),
                            (chunks, watch, true),
                        ))
                    }
                }
            }
        });
        Ok(stream.boxed())
    }

    fn name(&self) -> &str {
        "scripted"
    }
}
