//! Streamed turns: the reply as it is produced, stored when the stream ends (and what was
//! produced, marked `interrupted`, when the client goes away).

use super::*;

impl ConversationService {
    /// Runs one turn, yielding the reply as the model produces it.
    ///
    /// Request errors (validation, access, unknown animal or session) come back at once.
    /// Then the stream yields [`TurnEvent::Delta`]s and ends with [`TurnEvent::Complete`]
    /// once the turn is stored. Dropping the stream early cancels the model call and stores
    /// the partial reply marked `interrupted`. Needs a tokio runtime (it spawns the task
    /// that drives the model).
    #[tracing::instrument(name = "cmz.stream_turn", skip_all, fields(user = %principal.user_id, animal = %request.animal_id))]
    pub async fn stream_turn(
        &self,
        principal: &Principal,
        request: TurnRequest,
    ) -> Result<TurnStream> {
        match self.begin_stream(principal, request).await? {
            TurnStart::Replay(reply) => Ok(TurnStream {
                session_id: reply.session_id.clone(),
                session_created: false,
                events: futures::stream::iter([
                    Ok(TurnEvent::Delta(reply.reply.clone())),
                    Ok(TurnEvent::Complete(reply)),
                ])
                .boxed(),
            }),
            TurnStart::Run(prepared) => {
                let session_id = prepared.session.id.clone();
                let session_created = prepared.created;
                let (tx, rx) = mpsc::channel(self.inner.config.stream_buffer.max(1));
                let service = self.clone();
                tokio::spawn(
                    async move { service.drive_stream(prepared, tx).await }.in_current_span(),
                );
                let events = futures::stream::unfold(rx, |mut rx| async move {
                    let event: Option<Sent> = rx.recv().await;
                    event.map(|event| (event.map_err(|error| *error), rx))
                })
                .boxed();
                Ok(TurnStream {
                    session_id,
                    session_created,
                    events,
                })
            }
        }
    }

    /// The checks and the preparation of a streamed turn (a replay, or a turn to run).
    pub(super) async fn begin_stream(
        &self,
        principal: &Principal,
        request: TurnRequest,
    ) -> Result<TurnStart> {
        require_runtime()?;
        let standing = self.count_model_call(principal).await?;
        self.start(principal, request, standing).await
    }

    /// Runs a prepared turn, handing its events to `tx`: the pieces as the model makes
    /// them, then the stored reply or the error. Stores what was produced, marked
    /// interrupted, when `tx` is closed early.
    pub(super) async fn drive_stream<S: TurnSink>(self, mut prepared: Box<ReadyTurn>, mut tx: S) {
        enum End {
            Completed(Option<Usage>, Option<String>),
            Failed(Error),
            Interrupted,
        }
        let inner = &self.inner;
        let timeout = inner.config.model_timeout;
        let started = Instant::now();
        // At the strict level nothing is shown before the whole reply has been checked.
        let held = prepared.moderation.checks_replies();
        let mut text = String::new();
        let model_span = span("model", "stream", &prepared.session.id);
        // Every call that is not the model loop is boxed: this future lives as long as the
        // stream, and inlined, those calls' states made it ~10 KB for each open stream.
        // The moderation verdict is settled here, so that it is not kept in this future
        // for as long as the stream lasts (a `match` keeps its scrutinee to its end).
        let refused = match Box::pin(self.moderate(&prepared)).await {
            Ok(Some(refusal)) => {
                let result = Box::pin(self.finish_refused(prepared, refusal)).await;
                return Box::pin(send_outcome(&mut tx, result, true)).await;
            }
            // Treated like a model that failed before its first chunk.
            Err(error) => Some(error),
            Ok(None) => None,
        };
        let end = match refused {
            Some(error) => End::Failed(error),
            None => {
                let opened = tokio::select! {
                    biased;
                    () = tx.closed() => None,
                    opened = tokio::time::timeout(timeout, inner.model.stream(std::mem::take(&mut prepared.prompt))).instrument(model_span.clone()) => Some(opened),
                };
                match opened {
                    None => End::Interrupted,
                    Some(Err(_)) => End::Failed(self.model_timeout()),
                    Some(Ok(Err(error))) => End::Failed(error),
                    Some(Ok(Ok(mut chunks))) => loop {
                        let next = tokio::select! {
                            biased;
                            () = tx.closed() => break End::Interrupted,
                            next = tokio::time::timeout(timeout, chunks.next()).instrument(model_span.clone()) => next,
                        };
                        match next {
                            Err(_) => break End::Failed(self.model_timeout()),
                            Ok(None) => {
                                break End::Failed(Error::Unavailable {
                                    message:
                                        "the model's stream ended before the reply was complete"
                                            .into(),
                                    source: None,
                                });
                            }
                            Ok(Some(Err(error))) => break End::Failed(error),
                            Ok(Some(Ok(ChatChunk::Done { usage, model }))) => {
                                break End::Completed(usage, model);
                            }
                            Ok(Some(Ok(ChatChunk::Delta(delta)))) => {
                                if delta.is_empty() {
                                    continue;
                                }
                                let mut delta = delta;
                                let room = MAX_CONTENT_BYTES.saturating_sub(text.len());
                                let full = delta.len() >= room;
                                if full {
                                    let mut cut = room;
                                    while !delta.is_char_boundary(cut) {
                                        cut -= 1;
                                    }
                                    delta.truncate(cut);
                                }
                                text.push_str(&delta);
                                if !held {
                                    // A consumer that stops reading for as long as the model
                                    // may take counts as gone, so it cannot hold the
                                    // session's queue forever.
                                    let sent = tokio::time::timeout(
                                        timeout,
                                        tx.send(Ok(TurnEvent::Delta(delta))),
                                    )
                                    .await;
                                    if !matches!(sent, Ok(true)) {
                                        break End::Interrupted;
                                    }
                                }
                                if full {
                                    tracing::warn!(
                                        "model reply reached the stored-message size limit; cut"
                                    );
                                    break End::Interrupted;
                                }
                            }
                        }
                    },
                }
            }
        };
        // The model stream is dropped here (cancelling the call) before anything is stored.
        let mut assistant = NewMessage::new(Role::Assistant, text);
        assistant.metadata.latency_ms = Some(millis(started.elapsed()));
        assistant.metadata.model = Some(inner.model.name().to_owned());
        let end = match end {
            End::Completed(..) if assistant.content.trim().is_empty() => {
                End::Failed(self.empty_reply())
            }
            other => other,
        };
        let result = match end {
            End::Completed(usage, model) => {
                assistant.metadata.set_usage(usage);
                if model.is_some() {
                    assistant.metadata.model = model;
                }
                Box::pin(self.finish(prepared, assistant, started)).await
            }
            End::Interrupted => {
                tracing::info!("stream consumer went away; storing the partial reply");
                assistant.metadata.interrupted = true;
                Box::pin(self.finish(prepared, assistant, started)).await
            }
            // What the child saw of the reply is kept; a held reply was seen by no one.
            End::Failed(error) => {
                let seen = (!held).then_some(assistant);
                Box::pin(self.finish_failed(prepared, error, seen, started)).await
            }
        };
        Box::pin(send_outcome(&mut tx, result, held)).await;
    }
}

/// What goes through a streamed turn's channel: the error boxed, so that each of the
/// channel's slots (allocated 32 at a time for every open stream) takes 32 bytes, not 72.
type Sent = std::result::Result<TurnEvent, Box<Error>>;

/// Where a streamed turn's events go: a channel to one reader ([`stream_turn`]), or the
/// buffer of a resumable stream, written by the turn's own task (no channel between).
///
/// [`stream_turn`]: ConversationService::stream_turn
pub(super) trait TurnSink: Send {
    /// Resolves once nobody wants the turn any more; it is then stored `interrupted`.
    fn closed(&mut self) -> impl Future<Output = ()> + Send;

    /// Hands over one event; `false` when nobody takes it any more.
    fn send(&mut self, event: Result<TurnEvent>) -> impl Future<Output = bool> + Send;
}

impl<S: TurnSink> TurnSink for &mut S {
    fn closed(&mut self) -> impl Future<Output = ()> + Send {
        (**self).closed()
    }

    fn send(&mut self, event: Result<TurnEvent>) -> impl Future<Output = bool> + Send {
        (**self).send(event)
    }
}

impl TurnSink for mpsc::Sender<Sent> {
    async fn closed(&mut self) {
        mpsc::Sender::closed(self).await;
    }

    async fn send(&mut self, event: Result<TurnEvent>) -> bool {
        mpsc::Sender::send(self, event.map_err(Box::new))
            .await
            .is_ok()
    }
}

/// Sends the end of a streamed turn: the reply's text when the consumer has not seen it
/// (a fallback, a refusal, or a reply held for the strict check), then `Complete`, or the
/// error.
async fn send_outcome<S: TurnSink>(tx: &mut S, result: Result<TurnReply>, held: bool) {
    match result {
        Ok(reply) => {
            let unseen = held || reply.fallback || reply.moderation.flagged;
            if unseen && !reply.reply.is_empty() {
                let _ = tx.send(Ok(TurnEvent::Delta(reply.reply.clone()))).await;
            }
            let _ = tx.send(Ok(TurnEvent::Complete(Box::new(reply)))).await;
        }
        Err(error) => {
            tracing::error!(code = error.code().as_str(), error = %error.report(), "the streamed turn failed");
            let _ = tx.send(Err(error)).await;
        }
    }
}
