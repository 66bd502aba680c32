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
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(text_of(&replay), reply.reply);
    // Never someone else's, never an event that does not exist.
    let other = Principal::new(UserId::new("k2").unwrap(), UserRole::Student);
    assert_eq!(
        service.resume_stream(&other, &id, 0).unwrap_err().code(),
        "not_found"
    );
    assert_eq!(
        service.resume_stream(&kid(), "nope", 0).unwrap_err().code(),
        "not_found"
    );
    assert_eq!(
        service
            .resume_stream(&kid(), &id, 10_000)
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
            .unwrap_err()
            .code(),
        "not_found"
    );
    service.stop_stream(&kid(), &stream.stream_id).unwrap();
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
    assert!(service.resume_stream(&kid(), &id, 0).is_ok());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        service.resume_stream(&kid(), &id, 0).unwrap_err().code(),
        "not_found"
    );
    assert_eq!(service.kept_streams(), 0);
}
