//! Resumable streams: numbered events, a reconnect gets the rest exactly once, a client
//! that goes away is waited for, a stop cancels at once.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;

use super::*;
use crate::access::UserRole;
use crate::memory::{InMemoryConversationStore, InMemoryPersonaDirectory};
use crate::store::ConversationStore as _;
use crate::testing::ScriptedModel;

const MESSAGE: &str = "one two three four five six seven eight";

fn lion() -> AnimalId {
    AnimalId::new("lion").unwrap()
}

fn kid() -> Principal {
    Principal::new(UserId::new("k1").unwrap(), UserRole::Student)
}

fn service(
    grace: Duration,
    delay: Duration,
) -> (ConversationService, Arc<InMemoryConversationStore>) {
    let store = Arc::new(InMemoryConversationStore::new());
    let service = ConversationService::with(
        store.clone(),
        Arc::new(InMemoryPersonaDirectory::with_personas([Persona::new(
            lion(),
            "Leo",
        )])),
        Arc::new(ScriptedModel::echo().with_chunk_delay(delay)),
        Arc::new(OwnerOrAdminPolicy),
        ConversationConfig {
            stream_resume_grace: grace,
            ..Default::default()
        },
    );
    (service, store)
}

fn text_of(items: &[StreamItem]) -> String {
    items
        .iter()
        .filter_map(|item| match &item.event {
            TurnEvent::Delta(piece) => Some(piece.as_str()),
            TurnEvent::Complete(_) => None,
        })
        .collect()
}

async fn stored_reply(store: &InMemoryConversationStore, session: &SessionId) -> Message {
    for _ in 0..200 {
        // A new session is stored with its first turn: not found until then.
        let messages = store.recent_messages(session, 2).await.unwrap_or_default();
        if messages.len() == 2 {
            return messages[1].clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no reply was stored");
}

#[tokio::test]
async fn a_reconnect_gets_every_missed_event_once_and_the_turn_is_not_interrupted() {
    let (service, store) = service(Duration::from_secs(5), Duration::from_millis(30));
    let mut first = service
        .stream_turn_resumable(&kid(), TurnRequest::new(lion(), MESSAGE))
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(first.next().await.unwrap().unwrap());
    }
    assert_eq!(
        seen.iter().map(|i| i.number).collect::<Vec<_>>(),
        [1, 2, 3],
        "events are numbered from 1"
    );
    let (id, session) = (first.stream_id.clone(), first.session_id.clone());
    drop(first);
    // Away long enough for the model to produce more.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let rest: Vec<StreamItem> = service
        .resume_stream(&kid(), &id, 3)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(
        rest[0].number, 4,
        "exactly the events after the last one seen"
    );
    let numbers: Vec<_> = rest.iter().map(|i| i.number).collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    let TurnEvent::Complete(reply) = &rest.last().unwrap().event else {
        panic!("the stream ends with the stored reply")
    };
    assert!(
        !reply.interrupted,
        "the turn went on while the client was away"
    );
    let whole = format!("{}{}", text_of(&seen), text_of(&rest));
    assert_eq!(
        whole, reply.reply,
        "the whole reply, nothing lost or doubled"
    );
    assert_eq!(stored_reply(&store, &session).await.content, reply.reply);

    // After it ended, within the grace period: replayed from the start.
    let replay: Vec<StreamItem> = service
        .resume_stream(&kid(), &id, 0)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(text_of(&replay), reply.reply);
    // Never someone else's, never an event that does not exist.
    let other = Principal::new(UserId::new("k2").unwrap(), UserRole::Student);
    assert_eq!(
        service
            .resume_stream(&other, &id, 0)
            .await
            .unwrap_err()
            .code(),
        "not_found"
    );
    assert_eq!(
        service
            .resume_stream(&kid(), "nope", 0)
            .await
            .unwrap_err()
            .code(),
        "not_found"
    );
    assert_eq!(
        service
            .resume_stream(&kid(), &id, 10_000)
            .await
            .unwrap_err()
            .code(),
        "validation_error"
    );
}

#[tokio::test]
async fn without_a_reconnect_the_turn_is_cancelled_after_the_grace_period() {
    let (service, store) = service(Duration::from_millis(150), Duration::from_millis(40));
    let mut stream = service
        .stream_turn_resumable(&kid(), TurnRequest::new(lion(), MESSAGE))
        .await
        .unwrap();
    stream.next().await.unwrap().unwrap();
    let session = stream.session_id.clone();
    drop(stream);
    let reply = stored_reply(&store, &session).await;
    assert!(
        reply.metadata.interrupted,
        "cancelled and stored interrupted"
    );
    assert!(!reply.content.is_empty());
    assert!(
        reply.content.len() < format!("echo: {MESSAGE}").len(),
        "cut short: {:?}",
        reply.content
    );
}

#[tokio::test]
async fn a_grace_of_zero_cancels_as_soon_as_the_client_goes() {
    let (service, store) = service(Duration::ZERO, Duration::from_millis(200));
    let mut stream = service
        .stream_turn_resumable(&kid(), TurnRequest::new(lion(), MESSAGE))
        .await
        .unwrap();
    stream.next().await.unwrap().unwrap();
    let session = stream.session_id.clone();
    let started = std::time::Instant::now();
    drop(stream);
    let reply = stored_reply(&store, &session).await;
    assert!(reply.metadata.interrupted);
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "cancelled at once"
    );
    assert_eq!(
        service.kept_streams(),
        0,
        "nothing kept without a grace period"
    );
}

#[tokio::test]
async fn a_stop_cancels_at_once_and_only_the_owner_may() {
    let (service, store) = service(Duration::from_secs(5), Duration::from_millis(100));
    let mut stream = service
        .stream_turn_resumable(&kid(), TurnRequest::new(lion(), MESSAGE))
        .await
        .unwrap();
    stream.next().await.unwrap().unwrap();
    let other = Principal::new(UserId::new("k2").unwrap(), UserRole::Student);
    assert_eq!(
        service
            .stop_stream(&other, &stream.stream_id)
            .await
            .unwrap_err()
            .code(),
        "not_found"
    );
    service
        .stop_stream(&kid(), &stream.stream_id)
        .await
        .unwrap();
    let rest: Vec<_> = (&mut stream).collect().await;
    assert!(
        matches!(rest.last(), Some(Err(e)) if e.code() == "conflict"),
        "the reader learns it was stopped: {rest:?}"
    );
    let reply = stored_reply(&store, &stream.session_id).await;
    assert!(reply.metadata.interrupted);
}

#[tokio::test]
async fn a_stream_is_forgotten_after_the_grace_period() {
    let (service, _) = service(Duration::from_millis(100), Duration::ZERO);
    let stream = service
        .stream_turn_resumable(&kid(), TurnRequest::new(lion(), "hi"))
        .await
        .unwrap();
    let id = stream.stream_id.clone();
    let items: Vec<_> = stream.collect().await;
    assert!(matches!(
        items.last(),
        Some(Ok(StreamItem {
            event: TurnEvent::Complete(_),
            ..
        }))
    ));
    assert!(service.resume_stream(&kid(), &id, 0).await.is_ok());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        service
            .resume_stream(&kid(), &id, 0)
            .await
            .unwrap_err()
            .code(),
        "not_found"
    );
    assert_eq!(service.kept_streams(), 0);
}

/// Two servers sharing one store and one mirror: a stream started on one is resumed on the
/// other with nothing lost or doubled, the first keeps generating while the second reads,
/// and a stop asked on the second reaches the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_started_on_one_server_is_resumed_and_stopped_on_another() {
    let store = Arc::new(InMemoryConversationStore::new());
    let mirror = Arc::new(crate::relay::InMemoryStreamMirror::new());
    let server = |delay: u64| {
        ConversationService::with(
            store.clone(),
            Arc::new(InMemoryPersonaDirectory::with_personas([Persona::new(
                lion(),
                "Leo",
            )])),
            Arc::new(ScriptedModel::echo().with_chunk_delay(Duration::from_millis(delay))),
            Arc::new(OwnerOrAdminPolicy),
            ConversationConfig {
                // Shorter than the turn: only the reader on `b` keeps it going.
                stream_resume_grace: Duration::from_millis(100),
                ..Default::default()
            },
        )
        .with_stream_mirror(mirror.clone())
    };
    let (a, b) = (server(60), server(60));
    let mut first = a
        .stream_turn_resumable(&kid(), TurnRequest::new(lion(), MESSAGE))
        .await
        .unwrap();
    let seen = vec![first.next().await.unwrap().unwrap()];
    let (id, session) = (first.stream_id.clone(), first.session_id.clone());
    drop(first);
    let rest: Vec<StreamItem> = b
        .resume_stream(&kid(), &id, 1)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(rest[0].number, 2);
    let numbers: Vec<_> = rest.iter().map(|i| i.number).collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    let TurnEvent::Complete(reply) = &rest.last().unwrap().event else {
        panic!("ends with the stored reply: {rest:?}")
    };
    assert!(
        !reply.interrupted,
        "a reader elsewhere kept the turn going past the grace period"
    );
    assert_eq!(format!("{}{}", text_of(&seen), text_of(&rest)), reply.reply);
    assert_eq!(stored_reply(&store, &session).await.content, reply.reply);
    let other = Principal::new(UserId::new("k2").unwrap(), UserRole::Student);
    assert_eq!(
        b.resume_stream(&other, &id, 0).await.unwrap_err().code(),
        "not_found"
    );

    // A stop asked on `b` reaches the turn on `a`.
    let mut second = a
        .stream_turn_resumable(
            &kid(),
            TurnRequest::new(lion(), MESSAGE).in_session(session.clone()),
        )
        .await
        .unwrap();
    second.next().await.unwrap().unwrap();
    assert_eq!(
        b.stop_stream(&other, &second.stream_id)
            .await
            .unwrap_err()
            .code(),
        "not_found"
    );
    b.stop_stream(&kid(), &second.stream_id).await.unwrap();
    let ended: Vec<_> = (&mut second).collect().await;
    assert!(
        matches!(ended.last(), Some(Err(e)) if e.code() == "conflict"),
        "{ended:?}"
    );
}

/// A mirror that fails: the stream goes on in process, and its reader never notices.
#[tokio::test]
async fn a_failing_mirror_leaves_the_stream_in_process() {
    #[derive(Debug)]
    struct Down;
    fn down<T>() -> Result<T> {
        Err(Error::unavailable(
            "redis",
            std::io::Error::other("connection refused"),
        ))
    }
    #[async_trait::async_trait]
    impl crate::relay::StreamMirror for Down {
        async fn open(&self, _: &str, _: &crate::relay::MirroredStream, _: Duration) -> Result<()> {
            down()
        }
        async fn append(
            &self,
            _: &str,
            _: u64,
            _: &crate::relay::MirrorEvent,
            _: Duration,
        ) -> Result<()> {
            down()
        }
        async fn info(&self, _: &str) -> Result<Option<crate::relay::MirroredStream>> {
            down()
        }
        async fn read(
            &self,
            _: &str,
            _: u64,
            _: Duration,
        ) -> Result<Vec<(u64, crate::relay::MirrorEvent)>> {
            down()
        }
        async fn request_stop(&self, _: &str, _: Duration) -> Result<()> {
            down()
        }
        async fn stop_requested(&self, _: &str) -> Result<bool> {
            down()
        }
        async fn touch(&self, _: &str, _: Duration) -> Result<()> {
            down()
        }
        async fn touched(&self, _: &str) -> Result<bool> {
            down()
        }
    }
    let (service, _) = service(Duration::from_secs(5), Duration::from_millis(5));
    let service = service.with_stream_mirror(Arc::new(Down));
    let stream = service
        .stream_turn_resumable(&kid(), TurnRequest::new(lion(), MESSAGE))
        .await
        .unwrap();
    let id = stream.stream_id.clone();
    let items: Vec<StreamItem> = stream.map(Result::unwrap).collect().await;
    assert!(matches!(
        items.last().unwrap().event,
        TurnEvent::Complete(_)
    ));
    // Resumed in this process, as without a mirror.
    assert!(service.resume_stream(&kid(), &id, 0).await.is_ok());
}

#[tokio::test]
async fn a_reader_elsewhere_gives_up_when_the_running_server_goes_silent() {
    // A stream another server opened in the mirror and then stopped copying (it died):
    // the reader here ends with `unavailable` instead of waiting for ever.
    let mirror = Arc::new(crate::relay::InMemoryStreamMirror::new());
    let service = ConversationService::with(
        Arc::new(InMemoryConversationStore::new()),
        Arc::new(InMemoryPersonaDirectory::with_personas([Persona::new(
            lion(),
            "Leo",
        )])),
        Arc::new(ScriptedModel::echo()),
        Arc::new(OwnerOrAdminPolicy),
        ConversationConfig {
            model_timeout: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .with_stream_mirror(mirror.clone());
    let session = crate::ids::SessionId::generate(&lion(), &kid().user_id).unwrap();
    let info = crate::relay::MirroredStream {
        owner: kid().user_id.clone(),
        session_id: session,
        session_created: true,
    };
    use crate::relay::StreamMirror as _;
    mirror
        .open("0123456789abcdef01234567", &info, Duration::from_secs(60))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let items: Vec<_> = service
        .resume_stream(&kid(), "0123456789abcdef01234567", 0)
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0].as_ref().unwrap_err().code(), "unavailable");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
}
