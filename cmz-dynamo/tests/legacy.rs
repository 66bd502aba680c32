//! Conversations written the legacy way by boto3 (the Python fixture beside this file)
//! are read, continued and migrated.

use std::process::Command;
use std::time::{Duration, Instant};

use cmz_core::ids::{SessionId, UserId};
use cmz_core::store::{AppendOutcome, ConversationStore, PageRequest, SessionScope, TurnAppend};
use cmz_core::types::{Message, NewMessage, Role};
use cmz_dynamo::Dynamo;
use cmz_dynamo::migrate::migration_in_progress;
use cmz_dynamo::testing::{isolated, shared_endpoint};
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/legacy_conversation_dynamo.py"
);

/// Runs the boto3 fixture; returns the conversation ids it wrote.
fn write_legacy(
    dynamo: &Dynamo,
    user: &str,
    count: usize,
    turns: usize,
    session_items: bool,
) -> Vec<SessionId> {
    let mut command = Command::new("python3");
    command.args([
        FIXTURE,
        "write",
        "--endpoint",
        &shared_endpoint(),
        "--conversations",
        &dynamo.tables().conversations,
        "--sessions",
        &dynamo.tables().sessions,
        "--count",
        &count.to_string(),
        "--turns",
        &turns.to_string(),
        "--user",
        user,
    ]);
    if !session_items {
        command.arg("--no-session-items");
    }
    let out = command
        .output()
        .expect("python3 with boto3 (pip install boto3)");
    assert!(
        out.status.success(),
        "fixture failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    written
        .iter()
        .map(|w| SessionId::new(w["conversationId"].as_str().unwrap()).unwrap())
        .collect()
}

async fn all_history(store: &dyn ConversationStore, id: &SessionId, page: usize) -> Vec<Message> {
    let mut out = Vec::new();
    let mut request = PageRequest::first(page);
    loop {
        let page_read = store.history(id, request.clone()).await.unwrap();
        out.extend(page_read.items);
        match page_read.next {
            Some(cursor) => request = PageRequest::after(page, cursor),
            None => return out,
        }
    }
}

fn assert_legacy_turns(messages: &[Message], turns: usize) {
    assert_eq!(messages.len(), 2 * turns);
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1);
        let t = i / 2;
        if i % 2 == 0 {
            assert_eq!(m.role, Role::User);
            assert!(
                m.content
                    .starts_with(&format!("Question {t} of conversation")),
                "{}",
                m.content
            );
            assert!(m.content.ends_with("🦁"));
        } else {
            assert_eq!(m.role, Role::Assistant);
            assert_eq!(m.content, format!("Answer {t}: Roar, yes, up to 20 hours!"));
            assert_eq!(m.metadata.tokens_prompt, Some(120));
            assert_eq!(m.metadata.latency_ms, Some(640));
        }
    }
}

fn turn(id: &SessionId, expected: u64, text: &str) -> TurnAppend {
    TurnAppend {
        session_id: id.clone(),
        expected_count: expected,
        messages: vec![
            NewMessage::new(Role::User, text),
            NewMessage::new(Role::Assistant, format!("re: {text}")),
        ],
        turn_key: None,
        new_session: None,
        began_at: chrono::Utc::now(),
    }
}

async fn legacy_list_len(dynamo: &Dynamo, id: &SessionId) -> usize {
    let item = dynamo
        .client()
        .get_item()
        .table_name(&dynamo.tables().conversations)
        .key(
            "conversationId",
            aws_sdk_dynamodb::types::AttributeValue::S(id.as_str().into()),
        )
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    item["messages"].as_l().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_conversations_are_read_and_continued() {
    let dynamo = isolated().await;
    let store = dynamo.conversations();
    let with_items = write_legacy(&dynamo, "legacy_kid", 2, 4, true);
    let without_items = write_legacy(&dynamo, "legacy_kid", 1, 3, false);

    for id in &with_items {
        let session = store
            .get_session(id)
            .await
            .unwrap()
            .expect("legacy session");
        assert_eq!(session.message_count, 8);
        assert_eq!(session.user_id.as_str(), "legacy_kid");
        assert_eq!(session.animal_name, "Leo the Lion");
        assert_legacy_turns(&all_history(&store, id, 3).await, 4);
        let window = store.recent_messages(id, 3).await.unwrap();
        assert_eq!(
            window.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![6, 7, 8]
        );
    }
    let id = &without_items[0];
    assert_eq!(
        store.get_session(id).await.unwrap().unwrap().message_count,
        6
    );
    assert_legacy_turns(&all_history(&store, id, 4).await, 3);

    // Listing by user finds the legacy sessions (through the GSI on the legacy attributes).
    let listed = store
        .list_sessions(
            SessionScope::User(UserId::new("legacy_kid").unwrap()),
            PageRequest::first(10),
        )
        .await
        .unwrap();
    for id in &with_items {
        assert!(listed.items.iter().any(|s| &s.id == id), "{id} listed");
    }

    // Continuing: new turns go to v2 items; the legacy item is never appended to.
    for (id, count) in [(&with_items[0], 8), (id, 6)] {
        let stale = store.append_turn(turn(id, count - 2, "stale")).await;
        assert_eq!(stale.unwrap_err().code(), "conflict");
        let AppendOutcome::Appended(stored) = store
            .append_turn(turn(id, count, "Do you like water?"))
            .await
            .unwrap()
        else {
            panic!("appended")
        };
        assert_eq!(stored[0].seq, count + 1);
        store
            .append_turn(turn(id, count + 2, "What do you eat?"))
            .await
            .unwrap();
        assert_eq!(
            legacy_list_len(&dynamo, id).await as u64,
            count,
            "the legacy item is untouched"
        );
        let session = store.get_session(id).await.unwrap().unwrap();
        assert_eq!(session.message_count, count + 4);
        let all = all_history(&store, id, 3).await;
        assert_legacy_turns(&all[..count as usize], count as usize / 2);
        let texts: Vec<&str> = all[count as usize..]
            .iter()
            .map(|m| m.content.as_str())
            .collect();
        assert_eq!(
            texts,
            [
                "Do you like water?",
                "re: Do you like water?",
                "What do you eat?",
                "re: What do you eat?"
            ]
        );
        // A window across the boundary: legacy messages, then v2 ones.
        let window = store.recent_messages(id, 6).await.unwrap();
        assert_eq!(
            window.iter().map(|m| m.seq).collect::<Vec<_>>(),
            ((count - 1)..=(count + 4)).collect::<Vec<_>>()
        );
        // Reading forward (what a running summary reads) crosses it too, from anywhere.
        for after in [0, count - 2, count - 1, count, count + 1] {
            let read = store.messages_after(id, after, 3).await.unwrap();
            assert_eq!(
                read.iter().map(|m| m.seq).collect::<Vec<_>>(),
                ((after + 1)..=(after + 3).min(count + 4)).collect::<Vec<_>>(),
                "messages after {after}"
            );
            assert_eq!(read[0].content, all[after as usize].content);
        }
    }
    // A conflicting second continuation of the same legacy count loses.
    let second = &with_items[1];
    let (a, b) = tokio::join!(
        store.append_turn(turn(second, 8, "one")),
        store.append_turn(turn(second, 8, "two"))
    );
    assert!(
        a.is_ok() != b.is_ok(),
        "exactly one continuation wins: {a:?} {b:?}"
    );
    assert_eq!(all_history(&store, second, 50).await.len(), 10);
}

fn migrate(dynamo: &Dynamo, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_cmz-dynamo"))
        .arg("migrate")
        .args(args)
        .env("DYNAMODB_ENDPOINT_URL", shared_endpoint())
        .envs(dynamo.tables().all())
        .env("CMZ_CURSOR_SECRET", "cmz-test-cursor-secret")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run cmz-dynamo migrate")
}

fn finish(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "migrate failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_is_resumable_and_idempotent() {
    let dynamo = isolated().await;
    let store = dynamo.conversations();
    let ids = write_legacy(&dynamo, "migrating_kid", 12, 3, true);
    let no_item = write_legacy(&dynamo, "migrating_kid", 1, 2, false);
    // One is continued before the migration: its v2 turn must survive it.
    store
        .append_turn(turn(&ids[0], 6, "before migration"))
        .await
        .unwrap();
    let mut before = Vec::new();
    for id in ids.iter().chain(&no_item) {
        before.push(all_history(&store, id, 100).await);
    }

    let dry = finish(migrate(&dynamo, &["--dry-run", "--no-progress"]));
    assert!(
        dry.contains("dry run: scanned 13 legacy conversations: 13 migrated (76 messages)"),
        "{dry}"
    );
    assert!(
        !migration_in_progress(&dynamo).await.unwrap(),
        "a dry run saves no progress"
    );

    // Killed mid-way (after its first page is saved).
    let mut child = migrate(
        &dynamo,
        &["--page-size", "2", "--pause-ms", "400", "--no-progress"],
    );
    let started = Instant::now();
    while !migration_in_progress(&dynamo).await.unwrap() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the migration saved no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(migration_in_progress(&dynamo).await.unwrap());
    // Half-migrated: every conversation still reads the same, and takes turns.
    for (id, expected) in ids.iter().chain(&no_item).zip(&before) {
        assert_eq!(
            &all_history(&store, id, 4).await,
            expected,
            "{id} reads the same mid-migration"
        );
    }

    let resumed = finish(migrate(&dynamo, &["--no-progress"]));
    assert!(resumed.contains("(resumed a stopped run)"), "{resumed}");
    assert!(!migration_in_progress(&dynamo).await.unwrap());
    for (id, expected) in ids.iter().chain(&no_item).zip(&before) {
        assert_eq!(
            &all_history(&store, id, 4).await,
            expected,
            "{id} reads the same after migration"
        );
        let raw = dynamo
            .client()
            .get_item()
            .table_name(&dynamo.tables().sessions)
            .key(
                "sessionId",
                aws_sdk_dynamodb::types::AttributeValue::S(id.as_str().into()),
            )
            .send()
            .await
            .unwrap()
            .item
            .expect("a session item after migration");
        assert_eq!(
            raw.get("cmzV")
                .and_then(|v| v.as_s().ok())
                .map(String::as_str),
            Some("2")
        );
        assert!(
            raw.get("legacyCount")
                .is_none_or(|v| v.as_n().unwrap() == "0"),
            "{id} reads v2 items only"
        );
    }
    // Still takes turns, after the v2 turn added before the migration.
    let AppendOutcome::Appended(m) = store
        .append_turn(turn(&ids[0], 8, "after migration"))
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(m[0].seq, 9);

    let again = finish(migrate(&dynamo, &["--no-progress"]));
    assert!(
        again.contains("0 migrated (0 messages), 13 already migrated"),
        "a second run is a no-op: {again}"
    );
}
