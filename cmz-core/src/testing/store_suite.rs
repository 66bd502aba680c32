//! The conformance suite every [`ConversationStore`] runs against itself.
//!
//! Each check makes its own random user, animal and session ids, so the checks can share
//! one store (and one database) with each other and with other tests. They panic with a
//! message naming the broken rule of the contract.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{Duration as ChronoDuration, TimeZone as _, Utc};
use futures::StreamExt as _;

use crate::access::{Principal, UserRole};
use crate::error::Error;
use crate::ids::{AnimalId, SessionId, UserId};
use crate::memory::InMemoryPersonaDirectory;
use crate::service::{ConversationService, TurnEvent, TurnRequest, TurnStream};
use crate::store::{
    AppendOutcome, ConversationStore, Cursor, DeleteScope, DynConversationStore, PageRequest,
    SessionScope, TurnAppend,
};
use crate::testing::ScriptedModel;
use crate::types::{
    MAX_CONTENT_BYTES, Message, MessageMetadata, NewMessage, Persona, Role, RollingSummary, Session,
};

/// Knobs for backends that need them.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Messages written in the long-session check (the contract is checked at 10,000).
    pub long_session_messages: usize,
    /// Writers racing in the concurrent-append check.
    pub concurrent_writers: usize,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        Self {
            long_session_messages: 10_000,
            concurrent_writers: 32,
        }
    }
}

/// Runs every check of the suite, in order. The store is shared (`Arc`) because one check
/// runs two services on it, as two servers would share one database.
pub async fn run_conversation_store_suite(store: DynConversationStore, options: &SuiteOptions) {
    check_deletes_are_final_across_services(store.clone()).await;
    let store = &*store;
    check_sessions(store).await;
    check_append_and_window(store).await;
    check_sequence_conflict(store).await;
    check_append_creates_session(store).await;
    check_append_is_atomic(store).await;
    check_turn_keys(store).await;
    check_history_paging(store).await;
    check_bad_cursors(store).await;
    check_listing(store).await;
    check_listing_ties_and_age_boundary(store).await;
    check_summary(store).await;
    check_rolling_summary(store).await;
    check_messages_after(store).await;
    check_thread_id(store).await;
    check_custom_metadata(store).await;
    check_deletes(store).await;
    check_deletes_are_final(store).await;
    check_unicode_and_large_messages(store).await;
    check_concurrent_appends(store, options.concurrent_writers).await;
    check_long_session(store, options.long_session_messages).await;
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{:016x}", fastrand::u64(..))
}

/// A fresh random user id.
pub fn random_user() -> UserId {
    UserId::new(unique("u")).expect("valid id")
}

/// A fresh random animal id.
pub fn random_animal() -> AnimalId {
    AnimalId::new(unique("a")).expect("valid id")
}

async fn new_session(store: &dyn ConversationStore, user: &UserId, animal: &AnimalId) -> Session {
    let id = SessionId::generate(animal, user).expect("valid id");
    let session = Session::new(id, user.clone(), animal.clone(), "Test Animal");
    store
        .create_session(&session)
        .await
        .expect("create_session");
    session
}

fn turn(session: &SessionId, expected: u64, texts: &[&str]) -> TurnAppend {
    TurnAppend {
        session_id: session.clone(),
        expected_count: expected,
        messages: texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                NewMessage::new(
                    if i % 2 == 0 {
                        Role::User
                    } else {
                        Role::Assistant
                    },
                    *t,
                )
            })
            .collect(),
        turn_key: None,
        new_session: None,
        began_at: Utc::now(),
    }
}

fn appended(outcome: AppendOutcome) -> Vec<Message> {
    match outcome {
        AppendOutcome::Appended(m) => m,
        AppendOutcome::Duplicate(_) => {
            panic!("contract: an append without a turn key is never a duplicate")
        }
    }
}

async fn fill(store: &dyn ConversationStore, session: &SessionId, turns: usize) {
    let start = store
        .get_session(session)
        .await
        .unwrap()
        .unwrap()
        .message_count;
    for i in 0..turns as u64 {
        let q = format!("question {}", start / 2 + i);
        let a = format!("answer {}", start / 2 + i);
        store
            .append_turn(turn(session, start + 2 * i, &[&q, &a]))
            .await
            .expect("append_turn");
    }
}

fn assert_code<T: std::fmt::Debug>(result: crate::Result<T>, code: &str, rule: &str) {
    match result {
        Err(e) => assert_eq!(e.code(), code, "contract: {rule}: got {e:?}"),
        Ok(v) => panic!("contract: {rule}: expected {code}, got Ok({v:?})"),
    }
}

/// Create, read, duplicate create, unknown id.
pub async fn check_sessions(store: &dyn ConversationStore) {
    let (user, animal) = (random_user(), random_animal());
    let session = new_session(store, &user, &animal).await;
    let read = store
        .get_session(&session.id)
        .await
        .unwrap()
        .expect("created session is readable");
    assert_eq!(read.id, session.id);
    assert_eq!(read.user_id, user);
    assert_eq!(read.animal_id, animal);
    assert_eq!(read.animal_name, "Test Animal");
    assert_eq!(read.message_count, 0);
    assert_code(
        store.create_session(&session).await,
        "conflict",
        "creating an existing session",
    );
    let unknown = SessionId::generate(&animal, &user).unwrap();
    assert!(
        store.get_session(&unknown).await.unwrap().is_none(),
        "contract: unknown session is None"
    );
}

/// Appends number messages from 1, update the session, and windows are the last n.
pub async fn check_append_and_window(store: &dyn ConversationStore) {
    let session = new_session(store, &random_user(), &random_animal()).await;
    let first = appended(
        store
            .append_turn(turn(&session.id, 0, &["hi", "hello!"]))
            .await
            .unwrap(),
    );
    assert_eq!(first.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(first[0].role, Role::User);
    assert_eq!(first[1].role, Role::Assistant);
    assert_eq!(first[1].content, "hello!");
    let one = appended(
        store
            .append_turn(turn(&session.id, 2, &["only the question"]))
            .await
            .unwrap(),
    );
    assert_eq!(
        one[0].seq, 3,
        "contract: a one-message append takes the next seq"
    );
    fill(store, &session.id, 5).await;
    let read = store.get_session(&session.id).await.unwrap().unwrap();
    assert_eq!(read.message_count, 13);
    assert!(
        read.last_activity >= session.last_activity,
        "contract: last_activity moves forward"
    );

    let window = store.recent_messages(&session.id, 4).await.unwrap();
    assert_eq!(
        window.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![10, 11, 12, 13],
        "contract: window is the last n, oldest first"
    );
    let all = store.recent_messages(&session.id, 100).await.unwrap();
    assert_eq!(all.len(), 13);
    assert!(all.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
    assert_eq!(all[0].content, "hi");
    assert!(
        store
            .recent_messages(&session.id, 0)
            .await
            .unwrap()
            .is_empty()
    );

    let unknown = SessionId::generate(&random_animal(), &random_user()).unwrap();
    assert_code(
        store.append_turn(turn(&unknown, 0, &["x"])).await,
        "not_found",
        "append to an unknown session",
    );
    assert_code(
        store.recent_messages(&unknown, 5).await,
        "not_found",
        "window of an unknown session",
    );
}

/// An append with `new_session` stores the session and its first messages together.
pub async fn check_append_creates_session(store: &dyn ConversationStore) {
    let (user, animal) = (random_user(), random_animal());
    let session = Session::new(
        SessionId::generate(&animal, &user).unwrap(),
        user.clone(),
        animal.clone(),
        "Test Animal",
    );
    // A rejected first append creates nothing.
    let mut bad = turn(
        &session.id,
        0,
        &["fine", &"x".repeat(MAX_CONTENT_BYTES + 1)],
    );
    bad.new_session = Some(session.clone());
    assert_code(
        store.append_turn(bad).await,
        "validation_error",
        "oversized first message",
    );
    assert!(
        store.get_session(&session.id).await.unwrap().is_none(),
        "contract: a rejected first append creates no session"
    );

    let mut first = turn(&session.id, 0, &["hello", "hi!"]);
    first.new_session = Some(session.clone());
    first.turn_key = Some("first".into());
    let stored = appended(store.append_turn(first.clone()).await.unwrap());
    assert_eq!(stored.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
    let read = store
        .get_session(&session.id)
        .await
        .unwrap()
        .expect("created with its first turn");
    assert_eq!(
        (read.message_count, &read.user_id, &read.animal_id),
        (2, &user, &animal)
    );
    let listed = store
        .list_sessions(SessionScope::User(user.clone()), PageRequest::first(10))
        .await
        .unwrap();
    assert_eq!(
        listed.items.len(),
        1,
        "contract: a session created by an append is listed"
    );
    // The same first turn again is a duplicate; another first turn is a conflict.
    assert!(
        matches!(store.append_turn(first).await.unwrap(), AppendOutcome::Duplicate(m) if m == stored)
    );
    let mut other = turn(&session.id, 0, &["again"]);
    other.new_session = Some(session.clone());
    assert_code(
        store.append_turn(other).await,
        "conflict",
        "creating an existing session by append",
    );
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

/// A stale `expected_count` is `conflict` and writes nothing.
pub async fn check_sequence_conflict(store: &dyn ConversationStore) {
    let session = new_session(store, &random_user(), &random_animal()).await;
    fill(store, &session.id, 2).await;
    for stale in [0, 2, 5] {
        assert_code(
            store
                .append_turn(turn(&session.id, stale, &["late", "reply"]))
                .await,
            "conflict",
            "stale expected_count",
        );
    }
    let read = store.get_session(&session.id).await.unwrap().unwrap();
    assert_eq!(
        read.message_count, 4,
        "contract: a conflicting append writes nothing"
    );
    assert_eq!(
        store.recent_messages(&session.id, 10).await.unwrap().len(),
        4
    );
}

/// An append with one invalid message writes none of them.
pub async fn check_append_is_atomic(store: &dyn ConversationStore) {
    let session = new_session(store, &random_user(), &random_animal()).await;
    let too_big = "x".repeat(MAX_CONTENT_BYTES + 1);
    assert_code(
        store
            .append_turn(turn(&session.id, 0, &["fine", &too_big]))
            .await,
        "validation_error",
        "oversized message",
    );
    let mut system = turn(&session.id, 0, &["fine"]);
    system
        .messages
        .push(NewMessage::new(Role::System, "you are a lion"));
    assert_code(
        store.append_turn(system).await,
        "validation_error",
        "system message",
    );
    let empty = TurnAppend {
        messages: vec![],
        ..turn(&session.id, 0, &[])
    };
    assert_code(
        store.append_turn(empty).await,
        "validation_error",
        "empty append",
    );
    let read = store.get_session(&session.id).await.unwrap().unwrap();
    assert_eq!(
        read.message_count, 0,
        "contract: a rejected append writes nothing"
    );
    assert!(
        store
            .recent_messages(&session.id, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A turn key already recorded returns the first turn and writes nothing.
pub async fn check_turn_keys(store: &dyn ConversationStore) {
    let session = new_session(store, &random_user(), &random_animal()).await;
    let mut keyed = turn(&session.id, 0, &["q", "a"]);
    keyed.turn_key = Some("key-1".into());
    let first = appended(store.append_turn(keyed.clone()).await.unwrap());
    assert_eq!(
        store.find_turn(&session.id, "key-1").await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(store.find_turn(&session.id, "key-2").await.unwrap(), None);
    fill(store, &session.id, 1).await;
    // Same key, whatever expected_count (stale or current): a duplicate.
    for expected in [0, 4] {
        let mut again = turn(&session.id, expected, &["q", "a different answer"]);
        again.turn_key = Some("key-1".into());
        match store.append_turn(again).await.unwrap() {
            AppendOutcome::Duplicate(messages) => assert_eq!(
                messages, first,
                "contract: duplicate returns the first turn"
            ),
            AppendOutcome::Appended(_) => {
                panic!("contract: a recorded turn key never appends twice")
            }
        }
    }
    assert_eq!(
        store
            .get_session(&session.id)
            .await
            .unwrap()
            .unwrap()
            .message_count,
        4
    );
    let mut other = turn(&session.id, 4, &["q2", "a2"]);
    other.turn_key = Some("key-2".into());
    let second = appended(store.append_turn(other).await.unwrap());
    assert_eq!(second[0].seq, 5);
    // Keys are per session.
    let elsewhere = new_session(store, &random_user(), &random_animal()).await;
    let mut same_key = turn(&elsewhere.id, 0, &["q", "a"]);
    same_key.turn_key = Some("key-1".into());
    assert!(
        matches!(
            store.append_turn(same_key).await.unwrap(),
            AppendOutcome::Appended(_)
        ),
        "contract: turn keys are per session"
    );
}

/// History pages oldest first; cursors survive appends; limits clamp.
pub async fn check_history_paging(store: &dyn ConversationStore) {
    let session = new_session(store, &random_user(), &random_animal()).await;
    fill(store, &session.id, 12).await; // 24 messages
    let mut seen = Vec::new();
    let mut page = store
        .history(&session.id, PageRequest::first(10))
        .await
        .unwrap();
    assert_eq!(page.items.len(), 10);
    seen.extend(page.items.iter().map(|m| m.seq));
    // Append while paging: the new messages show up at the end, nothing repeats or is skipped.
    fill(store, &session.id, 3).await; // 30 messages
    while let Some(cursor) = page.next.clone() {
        page = store
            .history(&session.id, PageRequest::after(10, cursor))
            .await
            .unwrap();
        seen.extend(page.items.iter().map(|m| m.seq));
        assert!(seen.len() <= 30, "contract: paging terminates");
    }
    assert_eq!(
        seen,
        (1..=30).collect::<Vec<u64>>(),
        "contract: history pages are complete and ordered"
    );
    let exact = store
        .history(&session.id, PageRequest::first(30))
        .await
        .unwrap();
    assert_eq!(exact.items.len(), 30);
    assert!(
        exact.next.is_none(),
        "contract: no cursor after the last page"
    );
    let clamped = store
        .history(&session.id, PageRequest::first(0))
        .await
        .unwrap();
    assert_eq!(clamped.items.len(), 1, "contract: limit 0 is clamped to 1");
    let empty = new_session(store, &random_user(), &random_animal()).await;
    let none = store
        .history(&empty.id, PageRequest::first(10))
        .await
        .unwrap();
    assert!(none.items.is_empty() && none.next.is_none());
    let unknown = SessionId::generate(&random_animal(), &random_user()).unwrap();
    assert_code(
        store.history(&unknown, PageRequest::first(10)).await,
        "not_found",
        "history of an unknown session",
    );
}

/// Cursors a store did not make for this listing are `validation_error`.
pub async fn check_bad_cursors(store: &dyn ConversationStore) {
    let (user, animal) = (random_user(), random_animal());
    let a = new_session(store, &user, &animal).await;
    let b = new_session(store, &user, &animal).await;
    fill(store, &a.id, 3).await;
    fill(store, &b.id, 3).await;
    let cursor_a = store
        .history(&a.id, PageRequest::first(2))
        .await
        .unwrap()
        .next
        .expect("more pages");
    assert_code(
        store
            .history(&b.id, PageRequest::after(2, cursor_a.clone()))
            .await,
        "validation_error",
        "history cursor of another session",
    );
    let s = cursor_a.as_str();
    let tampered = format!(
        "{}{}",
        &s[..s.len() - 1],
        if s.ends_with('A') { 'B' } else { 'A' }
    );
    for bad in ["", "garbage", "!!!", &s[..s.len() / 2], &tampered] {
        let result = store
            .history(&a.id, PageRequest::after(2, Cursor::from_client(bad)))
            .await;
        if let (Ok(page), true) = (&result, bad == tampered) {
            // A tampered cursor may only decode to a position in the same session.
            assert!(
                page.items.iter().all(|m| m.session_id == a.id),
                "contract: a cursor never reads another session"
            );
            continue;
        }
        assert_code(result, "validation_error", "malformed history cursor");
    }
    let list_cursor = store
        .list_sessions(SessionScope::User(user.clone()), PageRequest::first(1))
        .await
        .unwrap()
        .next
        .expect("two sessions, page of one");
    assert_code(
        store
            .history(&a.id, PageRequest::after(2, list_cursor.clone()))
            .await,
        "validation_error",
        "listing cursor used for history",
    );
    assert_code(
        store
            .list_sessions(
                SessionScope::Animal(animal),
                PageRequest::after(1, list_cursor),
            )
            .await,
        "validation_error",
        "user-listing cursor used for an animal listing",
    );
    assert_code(
        store
            .list_sessions(
                SessionScope::User(user),
                PageRequest::after(1, Cursor::from_client("nope")),
            )
            .await,
        "validation_error",
        "malformed listing cursor",
    );
}

/// Every session of a listing, paging `size` at a time; checks that no page is larger and
/// every item belongs to the scope.
async fn list_all(
    store: &dyn ConversationStore,
    scope: SessionScope,
    size: usize,
) -> Vec<SessionId> {
    let mut all = Vec::new();
    let mut request = PageRequest::first(size);
    loop {
        let page = store.list_sessions(scope.clone(), request).await.unwrap();
        assert!(
            page.items.len() <= size,
            "contract: a page holds at most its limit"
        );
        for session in &page.items {
            match &scope {
                SessionScope::User(user) => assert_eq!(&session.user_id, user),
                SessionScope::Animal(animal) => assert_eq!(&session.animal_id, animal),
            }
        }
        all.extend(page.items.iter().map(|s| s.id.clone()));
        match page.next {
            Some(cursor) => request = PageRequest::after(size, cursor),
            None => return all,
        }
    }
}

/// A user's sessions list newest activity first, an animal's newest start first, paged.
pub async fn check_listing(store: &dyn ConversationStore) {
    let (user, other_user) = (random_user(), random_user());
    let (lion, tiger) = (random_animal(), random_animal());
    let mut sessions = Vec::new();
    for i in 0..7 {
        let animal = if i % 2 == 0 { &lion } else { &tiger };
        let s = new_session(store, &user, animal).await;
        fill(store, &s.id, 1).await;
        sessions.push(s.id);
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let foreign = new_session(store, &other_user, &lion).await;
    // Touch the oldest so it becomes the newest.
    fill(store, &sessions[0], 1).await;
    let mut expected: Vec<SessionId> = sessions[1..].iter().rev().cloned().collect();
    expected.insert(0, sessions[0].clone());

    let listed = list_all(store, SessionScope::User(user.clone()), 3).await;
    assert_eq!(
        listed, expected,
        "contract: a user's sessions, newest activity first, all pages"
    );
    let newest = store
        .list_sessions(SessionScope::User(user.clone()), PageRequest::first(1))
        .await
        .unwrap();
    assert_eq!(newest.items[0].message_count, 4);

    // An animal's sessions list by start, newest first: the turn that moved the user's
    // oldest session to the top of the user listing leaves it last here.
    let mut lion_expected: Vec<SessionId> = sessions.iter().step_by(2).rev().cloned().collect();
    lion_expected.insert(0, foreign.id.clone());
    let lion_ids = list_all(store, SessionScope::Animal(lion.clone()), 2).await;
    assert_eq!(
        lion_ids, lion_expected,
        "contract: an animal's sessions (the user's 4 and a foreign one), newest start first, \
         all pages, whatever their activity"
    );
    let first_lion = store
        .list_sessions(SessionScope::Animal(lion.clone()), PageRequest::first(100))
        .await
        .unwrap();
    let touched = first_lion
        .items
        .iter()
        .find(|s| s.id == sessions[0])
        .expect("the touched session is listed");
    assert_eq!(
        touched.message_count, 4,
        "contract: an animal listing reads the sessions' current state"
    );
    let nobody = store
        .list_sessions(SessionScope::User(random_user()), PageRequest::first(10))
        .await
        .unwrap();
    assert!(nobody.items.is_empty() && nobody.next.is_none());
}

/// Equal activity times list by id, descending; an age cut-off is strict.
pub async fn check_listing_ties_and_age_boundary(store: &dyn ConversationStore) {
    let (user, animal) = (random_user(), random_animal());
    let at = Utc.with_ymd_and_hms(2003, 3, 3, 3, 3, 3).unwrap();
    let mut ids = Vec::new();
    for _ in 0..5 {
        let mut session = Session::new(
            SessionId::generate(&animal, &user).unwrap(),
            user.clone(),
            animal.clone(),
            "Tie",
        );
        session.started_at = at;
        session.last_activity = at;
        store.create_session(&session).await.unwrap();
        ids.push(session.id);
    }
    ids.sort();
    ids.reverse();
    let listed = list_all(store, SessionScope::User(user.clone()), 2).await;
    assert_eq!(
        listed, ids,
        "contract: ties broken by id, descending, across pages"
    );
    let by_animal = list_all(store, SessionScope::Animal(animal.clone()), 2).await;
    assert_eq!(
        by_animal, ids,
        "contract: an animal listing breaks equal start times by id, descending, across pages"
    );
    let report = store.delete(DeleteScope::OlderThan(at)).await.unwrap();
    assert!(
        store.get_session(&ids[0]).await.unwrap().is_some(),
        "contract: older-than is strict (last activity == cut-off stays)"
    );
    let _ = report;
    store
        .delete(DeleteScope::OlderThan(at + ChronoDuration::seconds(1)))
        .await
        .unwrap();
    assert!(store.get_session(&ids[0]).await.unwrap().is_none());
}

/// Summaries are stored on the session.
pub async fn check_summary(store: &dyn ConversationStore) {
    let session = new_session(store, &random_user(), &random_animal()).await;
    store
        .set_summary(&session.id, "We talked about manes.")
        .await
        .unwrap();
    store
        .set_summary(&session.id, "We talked about manes and naps.")
        .await
        .unwrap();
    let read = store.get_session(&session.id).await.unwrap().unwrap();
    assert_eq!(
        read.summary.as_deref(),
        Some("We talked about manes and naps.")
    );
    let unknown = SessionId::generate(&random_animal(), &random_user()).unwrap();
    assert_code(
        store.set_summary(&unknown, "x").await,
        "not_found",
        "summary of an unknown session",
    );
}

/// A rolling summary only moves forward, survives turns, and comes back whole.
pub async fn check_rolling_summary(store: &dyn ConversationStore) {
    let session = new_session(store, &random_user(), &random_animal()).await;
    fill(store, &session.id, 6).await;
    let summary = |text: &str, through: u64| RollingSummary {
        text: text.into(),
        through,
        tokens: 7,
        updated_at: Utc.with_ymd_and_hms(2026, 5, 1, 10, 0, 0).unwrap(),
        folds: 2,
        tokens_spent: 1234,
        fallback: through == 4,
    };
    let first = summary("The visitor has a dog called Biscuit.", 4);
    assert!(
        store
            .set_rolling_summary(&session.id, &first)
            .await
            .unwrap()
    );
    let read = store.get_session(&session.id).await.unwrap().unwrap();
    assert_eq!(
        read.rolling_summary.as_ref(),
        Some(&first),
        "contract: stored whole"
    );
    // The same or less coverage is refused and changes nothing: folds are idempotent.
    for stale in [4, 2] {
        assert!(
            !store
                .set_rolling_summary(&session.id, &summary("stale", stale))
                .await
                .unwrap(),
            "contract: a summary covering no more is refused"
        );
    }
    let later = summary("The visitor has a dog called Biscuit and likes lions.", 8);
    assert!(
        store
            .set_rolling_summary(&session.id, &later)
            .await
            .unwrap()
    );
    fill(store, &session.id, 1).await;
    let read = store.get_session(&session.id).await.unwrap().unwrap();
    assert_eq!(
        read.rolling_summary,
        Some(later),
        "contract: kept by a turn"
    );
    assert_eq!(read.message_count, 14);
    let unknown = SessionId::generate(&random_animal(), &random_user()).unwrap();
    assert_code(
        store.set_rolling_summary(&unknown, &first).await,
        "not_found",
        "rolling summary of an unknown session",
    );
}

/// `messages_after` reads forward from any position, turn items or not, with token counts.
pub async fn check_messages_after(store: &dyn ConversationStore) {
    let session = new_session(store, &random_user(), &random_animal()).await;
    fill(store, &session.id, 5).await; // 10 messages in turns of two
    let mut three = turn(&session.id, 10, &["q", "a", "q2"]);
    three.messages[1].metadata.token_count = Some(42);
    store.append_turn(three).await.unwrap();
    for after in 0..=13u64 {
        let read = store.messages_after(&session.id, after, 4).await.unwrap();
        let seqs: Vec<u64> = read.iter().map(|m| m.seq).collect();
        let expected: Vec<u64> = (after + 1..=13).take(4).collect();
        assert_eq!(seqs, expected, "contract: messages_after({after}, 4)");
    }
    let read = store.messages_after(&session.id, 11, 1).await.unwrap();
    assert_eq!(
        read[0].metadata.token_count,
        Some(42),
        "token counts are kept"
    );
    assert_eq!(read[0].content, "a");
    let unknown = SessionId::generate(&random_animal(), &random_user()).unwrap();
    assert_code(
        store.messages_after(&unknown, 0, 5).await,
        "not_found",
        "messages after in an unknown session",
    );
}

/// Thread ids are stored on the session, replaced by a later one, and kept by a turn.
pub async fn check_thread_id(store: &dyn ConversationStore) {
    let session = new_session(store, &random_user(), &random_animal()).await;
    assert_eq!(
        store
            .get_session(&session.id)
            .await
            .unwrap()
            .unwrap()
            .thread_id,
        None
    );
    store
        .set_thread_id(&session.id, "thread_abc123")
        .await
        .unwrap();
    store
        .set_thread_id(&session.id, "thread_def456")
        .await
        .unwrap();
    store
        .append_turn(TurnAppend {
            session_id: session.id.clone(),
            expected_count: 0,
            messages: vec![
                NewMessage::new(Role::User, "hi"),
                NewMessage::new(Role::Assistant, "hello"),
            ],
            turn_key: None,
            new_session: None,
            began_at: Utc::now(),
        })
        .await
        .unwrap();
    let read = store.get_session(&session.id).await.unwrap().unwrap();
    assert_eq!(read.thread_id.as_deref(), Some("thread_def456"));
    assert_eq!(read.message_count, 2);
    let unknown = SessionId::generate(&random_animal(), &random_user()).unwrap();
    assert_code(
        store.set_thread_id(&unknown, "thread_x").await,
        "not_found",
        "thread id of an unknown session",
    );
}

/// A caller's metadata comes back verbatim, whatever its keys and value types.
pub async fn check_custom_metadata(store: &dyn ConversationStore) {
    let session = new_session(store, &random_user(), &random_animal()).await;
    let custom = serde_json::json!({
        "tokensPrompt": 12, "latencyMs": 340, "model": "gpt-4o-mini", "fallback": false,
        "threadId": "thread_1", "score": 0.25, "tags": ["a", "b"], "nested": {"x": null, "y": true},
        "empty": "", "tokensCompletion": "not a number"
    });
    let serde_json::Value::Object(map) = custom.clone() else {
        unreachable!()
    };
    let mut reply = NewMessage::new(Role::Assistant, "Roar");
    reply.metadata = MessageMetadata::from_caller(map);
    store
        .append_turn(TurnAppend {
            session_id: session.id.clone(),
            expected_count: 0,
            messages: vec![NewMessage::new(Role::User, "hi"), reply],
            turn_key: None,
            new_session: None,
            began_at: Utc::now(),
        })
        .await
        .unwrap();
    let messages = store.recent_messages(&session.id, 2).await.unwrap();
    let metadata = &messages[1].metadata;
    assert_eq!(serde_json::Value::Object(metadata.to_caller()), custom);
    assert_eq!(metadata.tokens_prompt, Some(12));
    assert_eq!(metadata.tokens_completion, None);
    assert_eq!(metadata.latency_ms, Some(340));
    assert!(messages[0].metadata.custom.is_none());
}

/// Deletes by session, user, animal and age remove sessions and messages everywhere.
pub async fn check_deletes(store: &dyn ConversationStore) {
    let (user, other) = (random_user(), random_user());
    let (lion, tiger) = (random_animal(), random_animal());
    let a = new_session(store, &user, &lion).await;
    let b = new_session(store, &user, &tiger).await;
    let c = new_session(store, &other, &lion).await;
    let d = new_session(store, &other, &tiger).await;
    for s in [&b, &c, &d] {
        fill(store, &s.id, 2).await;
    }
    fill(store, &a.id, 1).await;
    let mut keyed = turn(&a.id, 2, &["keyed q", "keyed a"]);
    keyed.turn_key = Some("k-a".into());
    appended(store.append_turn(keyed).await.unwrap());
    let report = store
        .delete(DeleteScope::Session(a.id.clone()))
        .await
        .unwrap();
    assert_eq!((report.sessions, report.messages), (1, 4));
    assert!(store.get_session(&a.id).await.unwrap().is_none());
    assert_code(
        store.history(&a.id, PageRequest::first(10)).await,
        "not_found",
        "history of a deleted session",
    );
    assert!(
        matches!(
            store.find_turn(&a.id, "k-a").await,
            Err(Error::NotFound { .. }) | Ok(None)
        ),
        "contract: a deleted session's turn keys are gone"
    );
    // The same id used again starts from nothing: no old messages or turn keys come back.
    store
        .create_session(&a)
        .await
        .expect("re-create a deleted session id");
    assert_eq!(
        store
            .get_session(&a.id)
            .await
            .unwrap()
            .unwrap()
            .message_count,
        0
    );
    assert!(
        store
            .history(&a.id, PageRequest::first(10))
            .await
            .unwrap()
            .items
            .is_empty(),
        "contract: no resurrected messages"
    );
    assert!(store.recent_messages(&a.id, 10).await.unwrap().is_empty());
    assert_eq!(
        store.find_turn(&a.id, "k-a").await.unwrap(),
        None,
        "contract: no resurrected turn keys"
    );
    store
        .delete(DeleteScope::Session(a.id.clone()))
        .await
        .unwrap();
    let again = store
        .delete(DeleteScope::Session(a.id.clone()))
        .await
        .unwrap();
    assert_eq!(
        again.sessions, 0,
        "contract: deleting nothing is an empty report"
    );

    let report = store.delete(DeleteScope::User(user.clone())).await.unwrap();
    assert_eq!((report.sessions, report.messages), (1, 4));
    assert!(
        store
            .list_sessions(SessionScope::User(user.clone()), PageRequest::first(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(
        store
            .list_sessions(SessionScope::Animal(tiger.clone()), PageRequest::first(10))
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    let report = store
        .delete(DeleteScope::Animal(lion.clone()))
        .await
        .unwrap();
    assert_eq!(report.sessions, 1);
    assert!(store.get_session(&c.id).await.unwrap().is_none());
    assert!(store.get_session(&d.id).await.unwrap().is_some());

    // Age: a session last active long ago goes, a current one stays.
    let old_user = random_user();
    let mut old = Session::new(
        SessionId::generate(&tiger, &old_user).unwrap(),
        old_user.clone(),
        tiger.clone(),
        "Old",
    );
    let long_ago = Utc.with_ymd_and_hms(2001, 1, 1, 0, 0, 0).unwrap();
    old.started_at = long_ago;
    old.last_activity = long_ago;
    store.create_session(&old).await.unwrap();
    let mut msg = NewMessage::new(Role::User, "from 2001");
    msg.created_at = long_ago;
    store
        .append_turn(TurnAppend {
            session_id: old.id.clone(),
            expected_count: 0,
            messages: vec![msg],
            turn_key: None,
            new_session: None,
            began_at: Utc::now(),
        })
        .await
        .unwrap();
    let report = store
        .delete(DeleteScope::OlderThan(long_ago + ChronoDuration::days(1)))
        .await
        .unwrap();
    assert!(report.sessions >= 1 && report.messages >= 1);
    assert!(
        store.get_session(&old.id).await.unwrap().is_none(),
        "contract: older-than deletes old sessions"
    );
    assert!(
        store.get_session(&d.id).await.unwrap().is_some(),
        "contract: older-than keeps recent sessions"
    );
}

/// Lets the clock move on, so instants taken before and after a call differ from the
/// instant the store takes in it.
async fn tick() {
    tokio::time::sleep(Duration::from_millis(5)).await;
}

async fn contents(store: &dyn ConversationStore, id: &SessionId) -> Vec<String> {
    store
        .history(id, PageRequest::first(100))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|m| m.content)
        .collect()
}

/// Deletes are final: an append that began before a delete of its session, or (creating a
/// session) of its user's sessions, stores nothing, even into a session made again under
/// the same id; appends that began after the delete are stored as usual.
pub async fn check_deletes_are_final(store: &dyn ConversationStore) {
    let (user, animal) = (random_user(), random_animal());
    let session = new_session(store, &user, &animal).await;
    fill(store, &session.id, 1).await;
    // A turn read the session (two messages), then the session was deleted.
    let began = Utc::now();
    tick().await;
    store
        .delete(DeleteScope::Session(session.id.clone()))
        .await
        .unwrap();
    tick().await;
    let mut late = turn(&session.id, 2, &["still there?", "yes!"]);
    late.began_at = began;
    assert_code(
        store.append_turn(late.clone()).await,
        "not_found",
        "an append that began before its session was deleted",
    );
    assert!(
        store.get_session(&session.id).await.unwrap().is_none(),
        "contract: a refused append brings nothing back"
    );
    // The same id again, by a turn that began after the delete: a new conversation, which
    // the old turn still cannot join, though the count it expects is the new one's.
    let mut again = turn(&session.id, 0, &["a new start", "hello again"]);
    again.new_session = Some(Session::new(
        session.id.clone(),
        user.clone(),
        animal.clone(),
        "Test Animal",
    ));
    appended(store.append_turn(again).await.unwrap());
    assert_code(
        store.append_turn(late).await,
        "not_found",
        "an append that began before a delete, into the session made again under its id",
    );
    assert_eq!(
        contents(store, &session.id).await,
        ["a new start", "hello again"],
        "contract: nothing deleted reappears"
    );
    appended(
        store
            .append_turn(turn(&session.id, 2, &["and now?", "all good"]))
            .await
            .unwrap(),
    );

    // A user's first turn that began before the user's sessions were deleted.
    let user = random_user();
    let existing = new_session(store, &user, &animal).await;
    fill(store, &existing.id, 1).await;
    let began = Utc::now();
    tick().await;
    store.delete(DeleteScope::User(user.clone())).await.unwrap();
    tick().await;
    let fresh = Session::new(
        SessionId::generate(&animal, &user).unwrap(),
        user.clone(),
        animal.clone(),
        "Test Animal",
    );
    let mut first = turn(&fresh.id, 0, &["my first message", "hi!"]);
    first.new_session = Some(fresh.clone());
    first.began_at = began;
    assert_code(
        store.append_turn(first.clone()).await,
        "not_found",
        "a first turn that began before its user's sessions were deleted",
    );
    let mut next = turn(&existing.id, 2, &["and my old one?", "gone"]);
    next.began_at = began;
    assert_code(
        store.append_turn(next).await,
        "not_found",
        "a turn that began before its user's sessions were deleted",
    );
    let listed = |user: UserId| async move {
        store
            .list_sessions(SessionScope::User(user), PageRequest::first(10))
            .await
            .unwrap()
            .items
    };
    assert!(store.get_session(&fresh.id).await.unwrap().is_none());
    assert!(
        listed(user.clone()).await.is_empty(),
        "contract: nothing of a deleted user reappears"
    );
    // The user starts again, after the delete: stored as usual.
    first.began_at = Utc::now();
    appended(store.append_turn(first).await.unwrap());
    assert_eq!(listed(user).await.len(), 1);
}

/// Reads a turn's stream to its end; the last item.
async fn last_event(mut stream: TurnStream) -> Option<crate::Result<TurnEvent>> {
    let mut last = None;
    while let Some(event) = stream.next().await {
        last = Some(event);
    }
    last
}

fn assert_refused(last: Option<crate::Result<TurnEvent>>, what: &str) {
    match last {
        Some(Err(error)) => assert_eq!(error.code(), "not_found", "contract: {what}: {error}"),
        other => panic!("contract: {what}: the turn was stored: {other:?}"),
    }
}

/// Deletes are final across servers: two services share `store` (two servers, each with
/// its own in-process state). A turn streaming on one while the other deletes its user's
/// sessions, or its session, stores nothing, even when the child starts again under the
/// same id before the stream ends; nothing deleted reappears.
pub async fn check_deletes_are_final_across_services(store: DynConversationStore) {
    let animal = random_animal();
    let personas = Arc::new(InMemoryPersonaDirectory::with_personas([Persona::new(
        animal.clone(),
        "Leo",
    )]));
    // Ten chunks 80 ms apart: the other server has most of a second to act.
    let slow = ScriptedModel::always("one two three four five six seven eight nine ten")
        .with_chunk_delay(Duration::from_millis(80));
    let server_a = ConversationService::new(
        store.clone(),
        personas.clone(),
        Arc::new(ScriptedModel::echo()),
    );
    let server_b = ConversationService::new(store.clone(), personas, Arc::new(slow));
    let kid = Principal::new(random_user(), UserRole::Student);
    let admin = Principal::new(random_user(), UserRole::Admin);
    let sessions_of_kid = || async {
        store
            .list_sessions(
                SessionScope::User(kid.user_id.clone()),
                PageRequest::first(10),
            )
            .await
            .unwrap()
            .items
    };

    // The kid's first turn streams on B; A deletes the kid's sessions meanwhile.
    let mut stream = server_b
        .stream_turn(&kid, TurnRequest::new(animal.clone(), "my first message"))
        .await
        .unwrap();
    let first = stream.session_id.clone();
    assert!(matches!(stream.next().await, Some(Ok(TurnEvent::Delta(_)))));
    server_a
        .delete(&admin, DeleteScope::User(kid.user_id.clone()))
        .await
        .unwrap();
    assert_refused(
        last_event(stream).await,
        "a first turn running on another server when its user was deleted",
    );
    assert!(store.get_session(&first).await.unwrap().is_none());
    assert!(sessions_of_kid().await.is_empty());

    // A conversation under an id the client chose; its next turn streams on B while A
    // deletes the session, and the kid starts again under the same id on A before B's
    // stream ends (with the count B's turn expects: two messages).
    let id = SessionId::new(unique("session_")).unwrap();
    server_a
        .turn(
            &kid,
            TurnRequest::new(animal.clone(), "hello").in_session(id.clone()),
        )
        .await
        .unwrap();
    let mut stream = server_b
        .stream_turn(
            &kid,
            TurnRequest::new(animal.clone(), "still there?").in_session(id.clone()),
        )
        .await
        .unwrap();
    assert!(matches!(stream.next().await, Some(Ok(TurnEvent::Delta(_)))));
    server_a
        .delete(&kid, DeleteScope::Session(id.clone()))
        .await
        .unwrap();
    let again = server_a
        .turn(
            &kid,
            TurnRequest::new(animal.clone(), "a new start").in_session(id.clone()),
        )
        .await
        .unwrap();
    assert!(again.session_created, "the id starts a new conversation");
    assert_refused(
        last_event(stream).await,
        "a turn running on another server when its session was deleted",
    );
    let store = &*store;
    assert_eq!(
        contents(store, &id).await,
        ["a new start", "echo: a new start"],
        "contract: only the new conversation is stored under the id"
    );
    let listed = sessions_of_kid().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].message_count, 2);
}

/// Content round-trips byte for byte, up to the size limit.
pub async fn check_unicode_and_large_messages(store: &dyn ConversationStore) {
    let session = new_session(store, &random_user(), &random_animal()).await;
    let tricky =
        "Hi 🦁! Ça va? 你好 — e\u{301} \"quotes\" \\ back\nslash\ttab \u{200d}👨‍👩‍👧 null\u{0}end";
    // 4-byte characters up to exactly the limit.
    let big = "🐯".repeat(MAX_CONTENT_BYTES / 4);
    assert_eq!(big.len(), MAX_CONTENT_BYTES);
    appended(
        store
            .append_turn(turn(&session.id, 0, &[tricky, &big]))
            .await
            .expect("a message at the size limit is stored"),
    );
    let back = store.recent_messages(&session.id, 2).await.unwrap();
    assert_eq!(
        back[0].content, tricky,
        "contract: content round-trips exactly"
    );
    assert_eq!(back[1].content.len(), big.len());
    assert!(
        back[1].content == big,
        "contract: a large message round-trips exactly"
    );
    let over = format!("{big}x");
    assert_code(
        store.append_turn(turn(&session.id, 2, &[&over])).await,
        "validation_error",
        "one byte over the limit",
    );
}

/// Many writers racing on one session: every turn lands once, in order, pairs adjacent.
pub async fn check_concurrent_appends(store: &dyn ConversationStore, writers: usize) {
    let session = new_session(store, &random_user(), &random_animal()).await;
    let tasks = (0..writers).map(|w| {
        let id = session.id.clone();
        async move {
            let mut conflicts = 0u32;
            loop {
                let count = store.get_session(&id).await.unwrap().unwrap().message_count;
                tokio::task::yield_now().await; // let the others read the same count
                let q = format!("q{w}");
                let a = format!("a{w}");
                match store.append_turn(turn(&id, count, &[&q, &a])).await {
                    Ok(_) => return conflicts,
                    Err(Error::Conflict { .. }) => {
                        conflicts += 1;
                        assert!(conflicts < 10_000, "no progress");
                        tokio::time::sleep(std::time::Duration::from_micros(fastrand::u64(0..500)))
                            .await;
                    }
                    Err(e) => {
                        panic!("contract: concurrent appends fail only with conflict, got {e:?}")
                    }
                }
            }
        }
    });
    let conflicts: u32 = futures::future::join_all(tasks).await.into_iter().sum();
    if writers > 1 {
        assert!(
            conflicts > 0,
            "the writers were meant to race: the check itself is broken"
        );
    }
    let all = store
        .history(&session.id, PageRequest::first(1000))
        .await
        .unwrap()
        .items;
    assert_eq!(all.len(), writers * 2, "contract: no append lost");
    let mut writers_seen = HashSet::new();
    for (i, pair) in all.chunks(2).enumerate() {
        assert_eq!(pair[0].seq, 2 * i as u64 + 1);
        assert_eq!(pair[1].seq, 2 * i as u64 + 2);
        let w = pair[0].content.trim_start_matches('q');
        assert_eq!(
            pair[1].content,
            format!("a{w}"),
            "contract: a turn's messages stay adjacent"
        );
        assert!(
            writers_seen.insert(w.to_owned()),
            "contract: no turn stored twice"
        );
    }
}

/// A long session: windows stay right and history pages through all of it.
pub async fn check_long_session(store: &dyn ConversationStore, messages: usize) {
    let session = new_session(store, &random_user(), &random_animal()).await;
    fill(store, &session.id, messages / 2).await;
    let total = (messages / 2 * 2) as u64;
    let window = store.recent_messages(&session.id, 20).await.unwrap();
    assert_eq!(window.len(), 20.min(total as usize));
    assert_eq!(window.last().map(|m| m.seq), Some(total));
    assert_eq!(window[0].seq, total + 1 - window.len() as u64);
    let mut next = None;
    let mut expected_seq = 1;
    loop {
        let request = match next.take() {
            None => PageRequest::first(1000),
            Some(c) => PageRequest::after(1000, c),
        };
        let page = store.history(&session.id, request).await.unwrap();
        for m in &page.items {
            assert_eq!(
                m.seq, expected_seq,
                "contract: long history is ordered without gaps"
            );
            expected_seq += 1;
        }
        match page.next {
            Some(c) => next = Some(c),
            None => break,
        }
    }
    assert_eq!(expected_seq - 1, total);
}
