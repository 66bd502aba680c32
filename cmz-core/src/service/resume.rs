//! Streams that survive a dropped connection: a streamed turn runs on its own, its events
//! are kept (numbered) while it runs and for a grace period after, and a client that comes
//! back with the number of the last event it saw gets the rest exactly once.
//!
//! A client that goes away does not stop the turn at once: the model keeps generating for
//! [`ConversationConfig::stream_resume_grace`](super::ConversationConfig) waiting for a
//! reconnect; without one the turn is cancelled and the partial reply stored `interrupted`,
//! as before. [`ConversationService::stop_stream`] cancels at once.
//!
//! Memory per stream is bounded by the reply's size limit: the reply's text once, plus four
//! bytes per streamed piece (where each piece ends), plus the final reply.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::{Notify, watch};

use super::stream::TurnSink;
use super::*;
use crate::error::Code;
use crate::relay::{DynStreamMirror, MirrorEvent, MirroredStream};

/// Numbers of a stream's events: `0` is the start (before any piece), pieces of the reply
/// are `1..=n`, the end (the stored reply, or the error) is `n + 1`.
pub type EventNumber = u64;

/// One numbered event of a resumable stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamItem {
    /// Its number within the turn's stream.
    pub number: EventNumber,
    /// A piece of the reply, or the end.
    pub event: TurnEvent,
}

/// A streamed turn that a client may leave and come back to (see the module docs).
pub struct ResumableStream {
    /// The stream's id, for [`ConversationService::resume_stream`] and
    /// [`ConversationService::stop_stream`].
    pub stream_id: String,
    /// The session, new or continued.
    pub session_id: SessionId,
    /// Whether this turn created the session.
    pub session_created: bool,
    events: BoxStream<'static, Result<StreamItem>>,
}

impl std::fmt::Debug for ResumableStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumableStream")
            .field("stream_id", &self.stream_id)
            .field("session_id", &self.session_id)
            .finish_non_exhaustive()
    }
}

impl Stream for ResumableStream {
    type Item = Result<StreamItem>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.events.poll_next_unpin(cx)
    }
}

/// How a stream ended.
#[derive(Debug, Clone)]
enum End {
    Stored(Box<TurnReply>),
    Failed(Code, String),
    /// Cancelled (no client came back in time, or stopped): the engine stores what was
    /// produced, marked interrupted.
    Cancelled,
}

#[derive(Debug, Default)]
struct Buffer {
    /// The reply so far.
    text: String,
    /// Where each piece ends in `text` (piece `k` is `text[ends[k-2]..ends[k-1]]`).
    ends: Vec<u32>,
    end: Option<End>,
    /// Clients reading it now.
    attached: usize,
    /// Bumped on every attach, so a grace timer knows whether someone came back meanwhile.
    attaches: u64,
}

impl Buffer {
    fn piece(&self, number: EventNumber) -> Option<&str> {
        let index = usize::try_from(number).ok()?.checked_sub(1)?;
        let end = *self.ends.get(index)? as usize;
        let start = index.checked_sub(1).map_or(0, |i| self.ends[i] as usize);
        self.text.get(start..end)
    }

    /// The event after `seen`, if it is there yet; `Err(())` when the stream is over.
    fn next_after(&self, seen: EventNumber) -> std::result::Result<Option<StreamItem>, ()> {
        let pieces = self.ends.len() as u64;
        if seen < pieces {
            let number = seen + 1;
            let text = self.piece(number).unwrap_or_default().to_owned();
            return Ok(Some(StreamItem {
                number,
                event: TurnEvent::Delta(text),
            }));
        }
        match (&self.end, seen == pieces) {
            (Some(End::Stored(reply)), true) => Ok(Some(StreamItem {
                number: pieces + 1,
                event: TurnEvent::Complete(reply.clone()),
            })),
            (Some(_), _) => Err(()),
            (None, _) => Ok(None),
        }
    }
}

/// A running (or recently finished) streamed turn.
#[derive(Debug)]
struct Live {
    id: String,
    /// Where other servers read the stream (dropped after its first failure: the stream
    /// goes on in process).
    mirror: Mutex<Option<DynStreamMirror>>,
    owner: UserId,
    session_id: SessionId,
    session_created: bool,
    buffer: Mutex<Buffer>,
    changed: Notify,
    cancel: watch::Sender<bool>,
}

impl Live {
    fn buffer(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mirror(&self) -> Option<DynStreamMirror> {
        self.mirror
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn mirror_failed(&self, error: &Error) {
        tracing::warn!(code = error.code().as_str(), error = %error.report(), "the stream mirror failed; this stream goes on in this process only");
        self.mirror.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// How long a reader on another server counts as attached after its last read.
fn fresh_for(grace: Duration) -> Duration {
    grace.max(Duration::from_secs(3))
}

/// The streams of one process.
#[derive(Debug, Default)]
pub(super) struct Streams {
    live: Mutex<HashMap<String, Arc<Live>>>,
}

impl Streams {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Live>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many streams are kept now (running or in their grace period).
    pub(super) fn len(&self) -> usize {
        self.map().len()
    }
}

/// A reader of a stream; the last one to leave starts the grace period.
struct Attached {
    live: Arc<Live>,
    grace: Duration,
    /// Where the grace timer runs: a reader may be dropped outside any runtime (a Python
    /// caller letting go of a stream).
    runtime: Option<tokio::runtime::Handle>,
}

impl Attached {
    fn new(live: Arc<Live>, grace: Duration) -> Self {
        {
            let mut buffer = live.buffer();
            buffer.attached += 1;
            buffer.attaches += 1;
        }
        Self {
            live,
            grace,
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let (left, attaches) = {
            let mut buffer = self.live.buffer();
            buffer.attached = buffer.attached.saturating_sub(1);
            (
                buffer.attached == 0 && buffer.end.is_none(),
                buffer.attaches,
            )
        };
        if !left {
            return;
        }
        if self.grace.is_zero() {
            let _ = self.live.cancel.send(true);
            return;
        }
        let (live, grace) = (self.live.clone(), self.grace);
        if let Some(runtime) = &self.runtime {
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(grace).await;
                    let gone = {
                        let buffer = live.buffer();
                        buffer.attached == 0 && buffer.attaches == attaches && buffer.end.is_none()
                    };
                    if !gone {
                        return;
                    }
                    // A reader on another server keeps it going.
                    if let Some(mirror) = live.mirror() {
                        match mirror.touched(&live.id).await {
                            Ok(true) => continue,
                            Ok(false) => {}
                            Err(error) => live.mirror_failed(&error),
                        }
                    }
                    tracing::info!("no client came back for the stream; cancelling it");
                    let _ = live.cancel.send(true);
                    return;
                }
            });
        } else {
            let _ = self.live.cancel.send(true);
        }
    }
}

/// The events after `seen`, then the live rest, for one reader.
fn read_from(
    live: Arc<Live>,
    seen: EventNumber,
    grace: Duration,
) -> BoxStream<'static, Result<StreamItem>> {
    let attached = Attached::new(live, grace);
    futures::stream::unfold(
        (attached, seen, false),
        |(attached, seen, over)| async move {
            if over {
                return None;
            }
            let live = attached.live.clone();
            loop {
                let notified = live.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let next = live.buffer().next_after(seen);
                match next {
                    Ok(Some(item)) => {
                        let number = item.number;
                        let last = matches!(item.event, TurnEvent::Complete(_));
                        return Some((Ok(item), (attached, number, last)));
                    }
                    Err(()) => {
                        let end = live.buffer().end.clone();
                        return match end {
                            Some(End::Failed(code, message)) => {
                                Some((Err(Error::new(code, message)), (attached, seen, true)))
                            }
                            Some(End::Cancelled) => Some((Err(stopped()), (attached, seen, true))),
                            _ => None,
                        };
                    }
                    Ok(None) => notified.await,
                }
            }
        },
    )
    .boxed()
}

impl ConversationService {
    /// Runs one turn as a stream a client may leave and come back to (see the module docs):
    /// the events are numbered, kept while the turn runs and for the grace period after it.
    /// Request errors come back at once, as from [`stream_turn`](Self::stream_turn).
    #[tracing::instrument(name = "cmz.stream_turn_resumable", skip_all, fields(user = %principal.user_id, animal = %request.animal_id))]
    pub async fn stream_turn_resumable(
        &self,
        principal: &Principal,
        request: TurnRequest,
    ) -> Result<ResumableStream> {
        // Unguessable: a stream id is not a credential (the owner is checked too), but it
        // must not tell anyone which streams exist.
        let stream_id = crate::random::secret_hex(12)?;
        let start = self.begin_stream(principal, request).await?;
        let (session_id, session_created) = match &start {
            TurnStart::Replay(reply) => (reply.session_id.clone(), false),
            TurnStart::Run(prepared) => (prepared.session.id.clone(), prepared.created),
        };
        let grace = self.inner.config.stream_resume_grace;
        let (cancel, cancelled) = watch::channel(false);
        let keep = self
            .inner
            .config
            .stream_resume_grace
            .max(Duration::from_secs(60));
        let mut mirror = self.inner.mirror.clone();
        if let Some(copy) = &mirror {
            let info = MirroredStream {
                owner: principal.user_id.clone(),
                session_id: session_id.clone(),
                session_created,
            };
            if let Err(error) = copy.open(&stream_id, &info, keep).await {
                tracing::warn!(code = error.code().as_str(), error = %error.report(), "the stream mirror failed; this stream goes on in this process only");
                mirror = None;
            }
        }
        let live = Arc::new(Live {
            id: stream_id.clone(),
            mirror: Mutex::new(mirror),
            owner: principal.user_id.clone(),
            session_id: session_id.clone(),
            session_created,
            buffer: Mutex::default(),
            changed: Notify::new(),
            cancel,
        });
        self.inner
            .streams
            .map()
            .insert(stream_id.clone(), live.clone());
        // Copies go to the mirror from a task of their own, in batches, so the stream never
        // waits for the mirror.
        let copies = live.mirror().map(|mirror| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(write_copies(live.clone(), mirror, rx, keep).in_current_span());
            tx
        });
        // The reader is attached before the turn starts, so a fast turn is never cancelled
        // for want of one.
        let events = read_from(live.clone(), 0, grace);
        let mut sink = LiveSink {
            live,
            cancelled,
            copies,
            pieces: 0,
            check_stop: tokio::time::interval(STOP_POLL),
            stop_check: None,
            stopped: false,
            end: None,
        };
        sink.check_stop
            .set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let streams = self.inner.streams.clone();
        let service = self.clone();
        // One task runs the turn and writes its events where readers find them; it then
        // keeps the stream for a reconnect within the grace period.
        tokio::spawn(
            async move {
                match start {
                    TurnStart::Replay(reply) => {
                        sink.send(Ok(TurnEvent::Delta(reply.reply.clone()))).await;
                        sink.send(Ok(TurnEvent::Complete(reply))).await;
                    }
                    TurnStart::Run(prepared) => {
                        Box::pin(service.drive_stream(prepared, &mut sink)).await;
                    }
                }
                let id = sink.finish();
                tokio::time::sleep(grace).await;
                streams.map().remove(&id);
            }
            .in_current_span(),
        );
        Ok(ResumableStream {
            stream_id,
            session_id,
            session_created,
            events,
        })
    }

    /// Comes back to a stream after event `seen` (0: from the start): the events missed,
    /// exactly once, then the live rest; from this process, or, with a
    /// [stream mirror](crate::relay), from the server running it. `not_found` for a stream
    /// that is unknown, over for longer than the grace period, or another user's. A stream
    /// read from another server ends with `unavailable` when nothing comes for longer than
    /// the model's timeout plus a few seconds (that server died or stopped copying it).
    pub async fn resume_stream(
        &self,
        principal: &Principal,
        stream_id: &str,
        seen: EventNumber,
    ) -> Result<ResumableStream> {
        let local = self.inner.streams.map().get(stream_id).cloned();
        if let Some(live) = local {
            if live.owner != principal.user_id {
                return Err(stream_not_found(stream_id));
            }
            {
                let buffer = live.buffer();
                if seen > buffer.ends.len() as u64 + 1 {
                    return Err(Error::validation(
                        "Last-Event-ID",
                        format!("stream {stream_id} has no event {seen}"),
                    ));
                }
            }
            return Ok(ResumableStream {
                stream_id: stream_id.to_owned(),
                session_id: live.session_id.clone(),
                session_created: live.session_created,
                events: read_from(live, seen, self.inner.config.stream_resume_grace),
            });
        }
        let Some(mirror) = self.inner.mirror.clone() else {
            return Err(stream_not_found(stream_id));
        };
        let info = mirror
            .info(stream_id)
            .await?
            .filter(|info| info.owner == principal.user_id)
            .ok_or_else(|| stream_not_found(stream_id))?;
        let fresh = fresh_for(self.inner.config.stream_resume_grace);
        let silence = silence_limit(self.inner.config.model_timeout);
        let id = stream_id.to_owned();
        let events = futures::stream::unfold(
            (mirror, id, seen, Vec::<(u64, MirrorEvent)>::new(), false),
            move |(mirror, id, seen, mut pending, over)| async move {
                if over {
                    return None;
                }
                let mut heard = tokio::time::Instant::now();
                loop {
                    if !pending.is_empty() {
                        let (number, event) = pending.remove(0);
                        let item = match event {
                            MirrorEvent::Piece { text } => Ok(StreamItem {
                                number,
                                event: TurnEvent::Delta(text),
                            }),
                            MirrorEvent::Stored { reply } => Ok(StreamItem {
                                number,
                                event: TurnEvent::Complete(reply),
                            }),
                            MirrorEvent::Failed { code, message } => {
                                Err(Error::new(code.parse().unwrap_or(Code::Internal), message))
                            }
                            MirrorEvent::Cancelled => Err(stopped()),
                        };
                        let last = !matches!(
                            item,
                            Ok(StreamItem {
                                event: TurnEvent::Delta(_),
                                ..
                            })
                        );
                        return Some((item, (mirror, id, number, pending, last)));
                    }
                    // Seen reading here: the server running the turn waits for this reader.
                    let read = match mirror.touch(&id, fresh).await {
                        Ok(()) => mirror.read(&id, seen, MIRROR_WAIT).await,
                        Err(error) => Err(error),
                    };
                    match read {
                        Ok(events) if events.is_empty() && heard.elapsed() >= silence => {
                            // The server running the turn died or stopped copying it: a
                            // model that slow would have timed out there already.
                            let error = Error::Unavailable {
                                message: format!(
                                    "stream {id}: the server running it stopped sending; read the session's history"
                                ),
                                source: None,
                            };
                            return Some((Err(error), (mirror, id, seen, pending, true)));
                        }
                        Ok(events) => {
                            if !events.is_empty() {
                                heard = tokio::time::Instant::now();
                            }
                            pending = events;
                        }
                        Err(error) => return Some((Err(error), (mirror, id, seen, pending, true))),
                    }
                }
            },
        )
        .boxed();
        Ok(ResumableStream {
            stream_id: stream_id.to_owned(),
            session_id: info.session_id,
            session_created: info.session_created,
            events,
        })
    }

    /// Stops a running stream at once (in this process, or, with a stream mirror, on the
    /// server running it): the model call is cancelled and what was produced is stored
    /// marked interrupted. `not_found` as for [`resume_stream`](Self::resume_stream);
    /// stopping a stream that already ended is harmless.
    pub async fn stop_stream(&self, principal: &Principal, stream_id: &str) -> Result<()> {
        let local = self.inner.streams.map().get(stream_id).cloned();
        if let Some(live) = local {
            if live.owner != principal.user_id {
                return Err(stream_not_found(stream_id));
            }
            let _ = live.cancel.send(true);
            return Ok(());
        }
        let Some(mirror) = self.inner.mirror.clone() else {
            return Err(stream_not_found(stream_id));
        };
        mirror
            .info(stream_id)
            .await?
            .filter(|info| info.owner == principal.user_id)
            .ok_or_else(|| stream_not_found(stream_id))?;
        let keep = self
            .inner
            .config
            .stream_resume_grace
            .max(Duration::from_secs(60));
        mirror.request_stop(stream_id, keep).await
    }

    /// Shares resumable streams with other servers through `mirror` (see
    /// [`crate::relay`]): a reconnect that lands on another server resumes the same turn,
    /// and a stop asked there reaches it.
    pub fn with_stream_mirror(self, mirror: DynStreamMirror) -> Self {
        self.rebuilt(|inner| inner.mirror = Some(mirror))
    }

    /// How many resumable streams this process keeps now (running, or finished within the
    /// grace period).
    pub fn kept_streams(&self) -> usize {
        self.inner.streams.len()
    }
}

/// A resumable stream's end of a turn: the turn's own task writes the pieces into the
/// buffer readers wait on, numbers them, copies them to the mirror, and records the end.
struct LiveSink {
    live: Arc<Live>,
    cancelled: watch::Receiver<bool>,
    copies: Option<mpsc::UnboundedSender<(EventNumber, MirrorEvent)>>,
    pieces: EventNumber,
    check_stop: tokio::time::Interval,
    /// The mirror's answer to "was a stop asked elsewhere?", while it is awaited: kept
    /// here, so a model chunk arriving meanwhile does not drop the question.
    stop_check: Option<futures::future::BoxFuture<'static, Result<bool>>>,
    /// Cancelled, or stopped from another server: what comes after is stored as
    /// interrupted, and the stream ends `stopped`.
    stopped: bool,
    end: Option<End>,
}

impl LiveSink {
    fn is_stopped(&mut self) -> bool {
        self.stopped |= *self.cancelled.borrow();
        self.stopped
    }

    /// Records how the stream ended (once), wakes its readers, sends the last copy;
    /// returns the stream's id.
    fn finish(&mut self) -> String {
        let end = self.end.take().unwrap_or_else(|| {
            if self.is_stopped() {
                End::Cancelled
            } else {
                End::Failed(Code::Internal, "the turn ended without a reply".into())
            }
        });
        let copy = match &end {
            End::Stored(reply) => MirrorEvent::Stored {
                reply: reply.clone(),
            },
            End::Failed(code, message) => MirrorEvent::Failed {
                code: code.as_str().to_owned(),
                message: message.clone(),
            },
            End::Cancelled => MirrorEvent::Cancelled,
        };
        {
            let mut buffer = self.live.buffer();
            buffer.end = Some(end);
            // Kept for the grace period: no spare capacity.
            buffer.text.shrink_to_fit();
            buffer.ends.shrink_to_fit();
        }
        self.live.changed.notify_waiters();
        if let Some(copies) = self.copies.take() {
            let _ = copies.send((self.pieces + 1, copy));
        }
        self.live.id.clone()
    }
}

impl TurnSink for LiveSink {
    async fn closed(&mut self) {
        loop {
            if self.is_stopped() {
                return;
            }
            let this = &mut *self;
            let mirrored = this.live.mirror().is_some();
            let asking = this.stop_check.is_some();
            tokio::select! {
                biased;
                changed = this.cancelled.changed() => {
                    if changed.is_err() {
                        this.stopped = true;
                    }
                }
                answer = async { this.stop_check.as_mut().expect("asking").await }, if asking => {
                    this.stop_check = None;
                    match answer {
                        Ok(true) => this.stopped = true,
                        Ok(false) => {}
                        Err(error) => this.live.mirror_failed(&error),
                    }
                }
                _ = this.check_stop.tick(), if mirrored && !asking => {
                    if let Some(mirror) = this.live.mirror() {
                        let id = this.live.id.clone();
                        this.stop_check = Some(Box::pin(async move { mirror.stop_requested(&id).await }));
                    }
                }
            }
        }
    }

    async fn send(&mut self, event: Result<TurnEvent>) -> bool {
        let stopped = self.is_stopped();
        match event {
            Ok(TurnEvent::Delta(piece)) => {
                if stopped || self.end.is_some() {
                    return false;
                }
                {
                    let mut buffer = self.live.buffer();
                    buffer.text.push_str(&piece);
                    let end = u32::try_from(buffer.text.len()).unwrap_or(u32::MAX);
                    buffer.ends.push(end);
                }
                self.live.changed.notify_waiters();
                self.pieces += 1;
                if let Some(copies) = &self.copies {
                    let _ = copies.send((self.pieces, MirrorEvent::Piece { text: piece }));
                }
                true
            }
            // The engine stored what was produced, marked interrupted: the readers of a
            // stopped stream learn that it was stopped.
            _ if stopped => {
                self.end.get_or_insert(End::Cancelled);
                false
            }
            Ok(TurnEvent::Complete(reply)) => {
                self.end.get_or_insert(End::Stored(reply));
                true
            }
            Err(error) => {
                self.end
                    .get_or_insert(End::Failed(error.code(), error.to_string()));
                true
            }
        }
    }
}

/// Writes a stream's copies to the mirror in order, each batch of waiting events in one
/// go; after a failure, warns once and drops the rest (the stream goes on in process).
async fn write_copies(
    live: Arc<Live>,
    mirror: DynStreamMirror,
    mut rx: mpsc::UnboundedReceiver<(EventNumber, MirrorEvent)>,
    keep: Duration,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 64).await > 0 {
        if live.mirror().is_none() {
            return;
        }
        if let Err(error) = mirror.append_all(&live.id, &batch, keep).await {
            live.mirror_failed(&error);
            return;
        }
        batch.clear();
    }
}

fn stopped() -> Error {
    Error::new(
        Code::Conflict,
        "the stream was stopped; its reply is stored as interrupted",
    )
}

/// How often the server running a mirrored stream looks for a stop asked elsewhere.
const STOP_POLL: Duration = Duration::from_millis(250);
/// How long a reader on another server waits for new events in one read.
const MIRROR_WAIT: Duration = Duration::from_secs(1);

/// How long a reader on another server waits without an event before it gives up on the
/// stream: longer than the model may be silent (its timeout) plus the copies' delay.
fn silence_limit(model_timeout: Duration) -> Duration {
    model_timeout + 3 * MIRROR_WAIT
}

fn stream_not_found(id: &str) -> Error {
    Error::not_found(format!(
        "stream {id} (it ended more than the grace period ago, or is not yours); read the session's history"
    ))
}
