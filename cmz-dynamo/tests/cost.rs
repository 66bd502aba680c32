//! Per-turn cost stays constant in conversation length, measured with DynamoDB's own
//! `ConsumedCapacity` on DynamoDB Local.

use aws_sdk_dynamodb::types::AttributeValue;
use cmz_core::ids::{AnimalId, SessionId, UserId};
use cmz_core::store::{ConversationStore, TurnAppend};
use cmz_core::types::{NewMessage, Role, RollingSummary, Session};
use cmz_dynamo::testing::isolated;

const QUESTION: usize = 90;
const ANSWER: usize = 600;

fn turn(id: &SessionId, expected: u64, new_session: Option<Session>) -> TurnAppend {
    TurnAppend {
        session_id: id.clone(),
        expected_count: expected,
        messages: vec![
            NewMessage::new(Role::User, "q".repeat(QUESTION)),
            NewMessage::new(Role::Assistant, "a".repeat(ANSWER)),
        ],
        turn_key: None,
        new_session,
        began_at: chrono::Utc::now(),
    }
}

/// A new session of `user` with the lion, and its id.
fn lion_session(user: &str) -> (SessionId, Session) {
    let (user, animal) = (UserId::new(user).unwrap(), AnimalId::new("lion").unwrap());
    let id = SessionId::generate(&animal, &user).unwrap();
    (id.clone(), Session::new(id, user, animal, "Leo"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_turns_cost_the_same_as_the_first() {
    let turns: u64 = std::env::var("CMZ_COST_TURNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dynamo = isolated().await;
    let store = dynamo.conversations();
    let (id, session) = lion_session("u-cost");

    let mut per_turn = Vec::new();
    let mut window_reads = Vec::new();
    for t in 1..=turns {
        let before = dynamo.capacity();
        let new = (t == 1).then(|| session.clone());
        store
            .append_turn(turn(&id, 2 * (t - 1), new))
            .await
            .expect("append");
        let cost = dynamo.capacity() - before;
        if [1, 2, 100, 400, 1_000, turns].contains(&t) {
            let before = dynamo.capacity();
            let window = store.recent_messages(&id, 20).await.unwrap();
            let read = dynamo.capacity() - before;
            assert_eq!(window.len(), (2 * t as usize).min(20));
            assert_eq!(window.last().unwrap().seq, 2 * t);
            println!(
                "turn {t}: {} WCU and {} RCU in {} request(s); 10-turn window: {} RCU in {} request(s)",
                cost.write_units, cost.read_units, cost.requests, read.read_units, read.requests
            );
            per_turn.push((t, cost));
            window_reads.push((t, read));
        }
    }
    // Turn 1 creates the session (an item written whole, not an Update of a listed one):
    // cheaper, never dearer. It also reads its user's tombstone once (a delete of the
    // user's sessions since the turn began refuses it): one strongly consistent read of a
    // small item, and no write at all.
    let (_, first) = per_turn[0];
    assert!(first.write_units <= per_turn[1].1.write_units);
    assert_eq!(
        first.requests, 3,
        "turn 1: the turn item, the session, the tombstone read"
    );
    assert!(
        first.read_units <= 1.0,
        "turn 1 reads at most 1 RCU, got {}",
        first.read_units
    );
    let (_, second) = per_turn[1];
    assert!(second.write_units > 0.0, "DynamoDB reported capacity");
    // 1 for the turn item and 1 for the session item (the floor), 2 for the user index,
    // which keeps a user's sessions in activity order (the session's entry moves: a delete
    // and a put). The animal index is keyed by start time and holds only keys: a turn never
    // writes to it.
    assert!(
        second.write_units <= 4.0,
        "a turn costs at most 4 WCU, got {}",
        second.write_units
    );
    for (t, cost) in &per_turn[1..] {
        assert_eq!(
            cost.requests, 2,
            "turn {t}: the turn item and the session update (whose guard also checks for a delete, at no cost)"
        );
        assert_eq!(cost.read_units, 0.0, "turn {t} reads nothing");
        assert_eq!(
            cost.write_units, second.write_units,
            "turn {t} costs what turn 2 cost"
        );
    }
    // From the tenth turn on, a 10-turn window is full: one Query, the same RCU every time.
    let full: Vec<_> = window_reads.iter().filter(|(t, _)| *t >= 10).collect();
    for (t, read) in &full {
        assert_eq!(read.requests, 1, "a window at turn {t} is one Query");
        assert_eq!(
            read.read_units, full[0].1.read_units,
            "a window at turn {t} costs what it cost at turn {}",
            full[0].0
        );
    }
    let stored = store.get_session(&id).await.unwrap().unwrap();
    assert_eq!(stored.message_count, 2 * turns);
}

/// A running summary (a few hundred tokens) does not make every later turn dearer: it is
/// kept beside the turns, not on the session item that every turn rewrites (and the user
/// index copies). Reading the session fetches it: one more small read, no write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_summary_adds_nothing_to_later_turns() {
    let dynamo = isolated().await;
    let store = dynamo.conversations();
    let (id, session) = lion_session("u-cost-summary");
    let mut plain = Vec::new();
    for t in 1..=4u64 {
        let before = dynamo.capacity();
        let new = (t == 1).then(|| session.clone());
        store
            .append_turn(turn(&id, 2 * (t - 1), new))
            .await
            .expect("append");
        plain.push(dynamo.capacity() - before);
    }
    // About 300 tokens of summary: with it on the session item, each turn cost ~10 WCU.
    let summary = RollingSummary {
        text: "The visitor likes big cats and asked how far cougars jump. ".repeat(24),
        through: 6,
        tokens: 300,
        updated_at: chrono::Utc::now(),
        folds: 1,
        tokens_spent: 900,
        fallback: false,
    };
    assert!(summary.text.len() > 1_400);
    // Storing it: the summary item (2 WCU for ~1.5 KB) and, the first time, the session's
    // marker (its item and the user index); then only the summary item.
    let before = dynamo.capacity();
    assert!(store.set_rolling_summary(&id, &summary).await.unwrap());
    let first_fold = dynamo.capacity() - before;
    let before = dynamo.capacity();
    let later = RollingSummary {
        through: 8,
        ..summary.clone()
    };
    assert!(store.set_rolling_summary(&id, &later).await.unwrap());
    let next_fold = dynamo.capacity() - before;
    println!(
        "storing a summary: {} WCU the first time, {} WCU after",
        first_fold.write_units, next_fold.write_units
    );
    assert!(first_fold.write_units <= 4.0, "{first_fold:?}");
    assert!(next_fold.write_units <= 2.0, "{next_fold:?}");
    let summary = later;
    for t in 5..=8u64 {
        let before = dynamo.capacity();
        store
            .append_turn(turn(&id, 2 * (t - 1), None))
            .await
            .expect("append");
        let cost = dynamo.capacity() - before;
        println!(
            "turn {t} after a summary: {} WCU in {} request(s)",
            cost.write_units, cost.requests
        );
        assert_eq!(
            cost.write_units, plain[1].write_units,
            "turn {t} costs what turn 2 cost without a summary"
        );
        assert!(cost.write_units <= 4.0);
    }
    let before = dynamo.capacity();
    let read = store.get_session(&id).await.unwrap().unwrap();
    let cost = dynamo.capacity() - before;
    assert_eq!(read.rolling_summary, Some(summary.clone()));
    assert_eq!(read.message_count, 16);
    assert_eq!(cost.requests, 2, "the session item, then its summary");
    assert_eq!(cost.write_units, 0.0);
    // Deleting the conversation takes the summary with the turns (and counts it as no
    // message).
    let partition = || async {
        dynamo
            .client()
            .query()
            .table_name(&dynamo.tables().messages)
            .key_condition_expression("conversationId = :c")
            .expression_attribute_values(":c", AttributeValue::S(id.as_str().into()))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .items()
            .len()
    };
    assert_eq!(partition().await, 9, "eight turn items and the summary");
    let deleted = store
        .delete(cmz_core::store::DeleteScope::Session(id.clone()))
        .await
        .unwrap();
    assert_eq!(deleted.messages, 16);
    assert_eq!(partition().await, 0, "nothing of the conversation is left");
    assert!(store.get_session(&id).await.unwrap().is_none());
    assert!(
        !store
            .set_rolling_summary(&id, &summary)
            .await
            .is_ok_and(|kept| kept),
        "no summary for a deleted session"
    );
    assert_eq!(partition().await, 0, "nor an item of it left behind");
}
