//! The whole `cmz_core::testing` conformance list against the DynamoDB stores, on Amazon's
//! DynamoDB Local.

use cmz_core::testing::{
    SuiteOptions, run_auth_store_suite, run_care_store_suite, run_conversation_store_suite,
};
use cmz_dynamo::testing::isolated;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_store_conforms() {
    let dynamo = isolated().await;
    let store = dynamo.conversations();
    run_conversation_store_suite(
        std::sync::Arc::new(store),
        &SuiteOptions {
            // The 10,000-turn check with its capacity figures is in `cost.rs`.
            long_session_messages: 1_000,
            concurrent_writers: 16,
        },
    )
    .await;
}

/// 500 turns through the engine: the budget, the running summary, a constant cost a turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_conversation_stays_within_budget_and_remembers() {
    let dynamo = isolated().await;
    cmz_core::testing::check_long_conversation(std::sync::Arc::new(dynamo.conversations())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_stores_conform() {
    let dynamo = isolated().await;
    run_auth_store_suite(
        &dynamo.users(),
        &dynamo.families(),
        &dynamo.revocations(),
        &dynamo.rate_limits(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn care_store_conforms() {
    let dynamo = isolated().await;
    run_care_store_suite(&dynamo.care()).await;
}

/// A turn too large for one item goes through `TransactWriteItems`: stored whole, or a
/// `conflict` naming the reason when its guard fails, and nothing half-written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_turns_are_one_transaction() {
    use cmz_core::ids::{AnimalId, SessionId, UserId};
    use cmz_core::store::{AppendOutcome, ConversationStore, PageRequest, TurnAppend};
    use cmz_core::types::{NewMessage, Role, Session};

    let dynamo = isolated().await;
    let store = dynamo.conversations();
    let (user, animal) = (UserId::new("big").unwrap(), AnimalId::new("whale").unwrap());
    let session = Session::new(
        SessionId::generate(&animal, &user).unwrap(),
        user,
        animal,
        "Wally",
    );
    // 200 KB each: together too large for one 400 KB item.
    let big = |text: &str| {
        vec![
            NewMessage::new(Role::User, format!("{text} {}", "?".repeat(200_000))),
            NewMessage::new(Role::Assistant, "🐋".repeat(50_000)),
        ]
    };
    let first = TurnAppend {
        session_id: session.id.clone(),
        expected_count: 0,
        messages: big("tell me everything"),
        turn_key: Some("big-1".into()),
        new_session: Some(session.clone()),
        began_at: chrono::Utc::now(),
    };
    let before = dynamo.capacity();
    let AppendOutcome::Appended(stored) = store.append_turn(first.clone()).await.unwrap() else {
        panic!()
    };
    assert_eq!(stored.len(), 2);
    assert_eq!(
        (dynamo.capacity() - before).requests,
        2,
        "the key check and one transaction"
    );
    // The same key again is a duplicate, whatever its count.
    assert!(
        matches!(store.append_turn(first).await.unwrap(), AppendOutcome::Duplicate(m) if m == stored)
    );
    let stale = TurnAppend {
        session_id: session.id.clone(),
        expected_count: 0,
        messages: big("again"),
        turn_key: None,
        new_session: None,
        began_at: chrono::Utc::now(),
    };
    let error = store.append_turn(stale).await.unwrap_err();
    assert_eq!(error.code(), "conflict", "{error:?}");
    assert!(
        error.to_string().contains("already stored") || error.to_string().contains("expected 0"),
        "{error}"
    );
    let history = store
        .history(&session.id, PageRequest::first(10))
        .await
        .unwrap()
        .items;
    assert_eq!(history.len(), 2, "nothing half-written");
    assert_eq!(history[1].content.len(), 200_000);
    assert_eq!(
        store
            .get_session(&session.id)
            .await
            .unwrap()
            .unwrap()
            .message_count,
        2
    );
}
