//! A legacy deployment's tables, as its CloudFormation stack made them (one string hash
//! key each, no index, no TTL) and holding data the legacy Python services wrote (by the
//! boto3 fixture beside this file), are brought up to date in place by `ensure-tables`;
//! then cmz starts and runs on them.

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Output};
use std::sync::Mutex;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, IndexStatus,
    KeySchemaElement, KeyType, Projection, ProjectionType, ScalarAttributeType, TableDescription,
    TimeToLiveStatus,
};
use cmz_core::auth::UserStore;
use cmz_core::ids::{AnimalId, SessionId, UserId};
use cmz_core::store::{AppendOutcome, ConversationStore, PageRequest, SessionScope, TurnAppend};
use cmz_core::types::{NewMessage, Role};
use cmz_dynamo::testing::{DynamoLocal, isolated_settings, legacy_fixture};
use cmz_dynamo::{
    ANIMAL_INDEX, Dynamo, EMAIL_INDEX, ENSURE_TABLES_COMMAND, EnsureOptions, IndexBilling,
    RETIRED_INDEXES, TTL_ATTRIBUTE, TableChange, TableEvent, USER_INDEX,
};

type Item = HashMap<String, AttributeValue>;

/// The variables naming `dynamo`'s tables, as the server and the command read them.
/// A DynamoDB Local of this test process's own. DynamoDB Local builds an index added to an
/// existing table on the same small job pool that sweeps every TTL-enabled table, so on
/// the server the whole suite shares (hundreds of TTL tables) a new index can wait for
/// minutes; on a fresh one it is ready in about a second.
fn endpoint() -> String {
    static SERVER: std::sync::OnceLock<DynamoLocal> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| DynamoLocal::start(None)).endpoint()
}

fn environment(dynamo: &Dynamo) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = dynamo
        .tables()
        .all()
        .iter()
        .map(|(variable, table)| (variable.to_string(), table.to_string()))
        .collect();
    env.insert("DYNAMODB_ENDPOINT_URL".into(), endpoint());
    env.insert("CMZ_CURSOR_SECRET".into(), "cmz-test-cursor-secret".into());
    env
}

/// Runs `cmz-dynamo <args>` on `dynamo`'s tables.
fn cli(dynamo: &Dynamo, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cmz-dynamo"))
        .args(args)
        .envs(environment(dynamo))
        .output()
        .expect("run cmz-dynamo")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Tables of a test's own, made and filled the legacy way: a parent, their family, an
/// animal; two conversations with session items and one without.
async fn legacy_deployment(provisioned: Option<(i64, i64)>) -> (Dynamo, Vec<SessionId>) {
    let dynamo = Dynamo::connect(isolated_settings(&endpoint())).await;
    let t = dynamo.tables();
    let endpoint = endpoint();
    let mut args = vec![
        "legacy-tables",
        "--endpoint",
        &endpoint,
        "--conversations",
        &t.conversations,
        "--sessions",
        &t.sessions,
        "--users",
        &t.users,
        "--families",
        &t.families,
        "--animals",
        &t.animals,
    ];
    let units = provisioned.map(|(read, write)| (read.to_string(), write.to_string()));
    if let Some((read, write)) = &units {
        args.extend(["--billing", "PROVISIONED", "--read", read, "--write", write]);
    }
    let directory = legacy_fixture(&args);
    assert_eq!(directory["email"], "legacy.parent@example.org");
    let mut ids = Vec::new();
    for extra in [None, Some("--no-session-items")] {
        let count = if extra.is_some() { "1" } else { "2" };
        let mut args = vec![
            "write",
            "--endpoint",
            &endpoint,
            "--conversations",
            &t.conversations,
            "--sessions",
            &t.sessions,
            "--count",
            count,
            "--turns",
            "3",
            "--user",
            "legacy_kid",
        ];
        args.extend(extra);
        let written = legacy_fixture(&args);
        for conversation in written.as_array().expect("a list of conversations") {
            let id = conversation["conversationId"].as_str().expect("an id");
            ids.push(SessionId::new(id).expect("a session id"));
        }
    }
    (dynamo, ids)
}

/// The legacy tables and their hash keys.
fn legacy_tables(dynamo: &Dynamo) -> [(String, &'static str); 5] {
    let t = dynamo.tables();
    [
        (t.conversations.clone(), "conversationId"),
        (t.sessions.clone(), "sessionId"),
        (t.users.clone(), "userId"),
        (t.families.clone(), "familyId"),
        (t.animals.clone(), "animalId"),
    ]
}

/// Every item of the legacy tables, by table and key.
async fn snapshot(dynamo: &Dynamo) -> BTreeMap<String, BTreeMap<String, Item>> {
    let mut all = BTreeMap::new();
    for (table, key) in legacy_tables(dynamo) {
        let mut items = BTreeMap::new();
        let mut start = None;
        loop {
            let page = dynamo
                .client()
                .scan()
                .table_name(&table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .unwrap();
            for item in page.items() {
                items.insert(item[key].as_s().unwrap().clone(), item.clone());
            }
            match page.last_evaluated_key {
                Some(last) => start = Some(last),
                None => break,
            }
        }
        all.insert(table, items);
    }
    all
}

async fn describe(dynamo: &Dynamo, table: &str) -> TableDescription {
    dynamo
        .client()
        .describe_table()
        .table_name(table)
        .send()
        .await
        .unwrap()
        .table
        .unwrap()
}

async fn ttl_of(dynamo: &Dynamo, table: &str) -> (TimeToLiveStatus, Option<String>) {
    let out = dynamo
        .client()
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .unwrap();
    let ttl = out.time_to_live_description().unwrap();
    (
        ttl.time_to_live_status().unwrap().clone(),
        ttl.attribute_name().map(str::to_owned),
    )
}

/// Asserts `index` on `table` is ACTIVE, filled, on `hash`/`range`; returns its
/// provisioned (read, write) units.
async fn assert_active_index(
    dynamo: &Dynamo,
    table: &str,
    index: &str,
    hash: &str,
    range: Option<&str>,
) -> (i64, i64) {
    let description = describe(dynamo, table).await;
    let found = description
        .global_secondary_indexes()
        .iter()
        .find(|g| g.index_name() == Some(index))
        .unwrap_or_else(|| panic!("{table} has {index}"));
    assert_eq!(found.index_status(), Some(&IndexStatus::Active), "{index}");
    assert_ne!(found.backfilling(), Some(true), "{index} is filled");
    let keys: Vec<(&str, &KeyType)> = found
        .key_schema()
        .iter()
        .map(|k| (k.attribute_name(), k.key_type()))
        .collect();
    let mut wanted = vec![(hash, &KeyType::Hash)];
    wanted.extend(range.map(|r| (r, &KeyType::Range)));
    assert_eq!(keys, wanted, "{index} keys");
    let throughput = found.provisioned_throughput();
    (
        throughput
            .and_then(|t| t.read_capacity_units())
            .unwrap_or(0),
        throughput
            .and_then(|t| t.write_capacity_units())
            .unwrap_or(0),
    )
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_deployment_is_upgraded_in_place_and_cmz_runs_on_it() {
    let (dynamo, ids) = legacy_deployment(None).await;
    let t = dynamo.tables().clone();
    let before = snapshot(&dynamo).await;
    assert_eq!(before[&t.conversations].len(), 3);
    assert_eq!(before[&t.sessions].len(), 2);

    // The server refuses these tables, naming what is missing and the command that fixes it.
    let refused = dynamo.check_tables().await.unwrap_err();
    assert_eq!(refused.code(), "validation_error");
    let message = refused.to_string();
    for expected in [
        format!(
            "{:?} (CONVERSATION_SESSION_TABLE_NAME) has no GSI {USER_INDEX:?}",
            t.sessions
        ),
        format!(
            "{:?} (USER_DYNAMO_TABLE_NAME) has no GSI {EMAIL_INDEX:?}",
            t.users
        ),
        format!(
            "{:?} (CONVERSATION_MESSAGE_TABLE_NAME) does not exist",
            t.messages
        ),
        format!("{:?} (CMZ_CARE_TABLE_NAME) does not exist", t.care),
        format!("add it in place, keeping every item, with `{ENSURE_TABLES_COMMAND}`"),
    ] {
        assert!(message.contains(&expected), "{expected:?} in {message}");
    }

    let events = Mutex::new(Vec::new());
    let report = dynamo
        .ensure_tables_with_progress(&|event| events.lock().unwrap().push(event.clone()))
        .await
        .unwrap();
    let added = |table: &str, index: &str| TableChange::AddedIndex {
        table: table.to_owned(),
        index: index.to_owned(),
        billing: IndexBilling::OnDemand,
    };
    let ttl = |table: &str| TableChange::EnabledTtl {
        table: table.to_owned(),
        attribute: TTL_ATTRIBUTE.to_owned(),
    };
    let created = |table: &str, variable| TableChange::CreatedTable {
        table: table.to_owned(),
        variable,
    };
    assert_eq!(
        report.changes,
        vec![
            added(&t.sessions, USER_INDEX),
            added(&t.sessions, ANIMAL_INDEX),
            ttl(&t.sessions),
            created(&t.messages, "CONVERSATION_MESSAGE_TABLE_NAME"),
            ttl(&t.messages),
            added(&t.users, EMAIL_INDEX),
            created(&t.meta, "CMZ_META_TABLE_NAME"),
            ttl(&t.meta),
            created(&t.care, "CMZ_CARE_TABLE_NAME"),
            ttl(&t.care),
        ]
    );
    assert!(
        report.problems.is_empty() && report.warnings.is_empty(),
        "{report}"
    );
    // Progress: each index is announced before it is built, and done after.
    let events = events.into_inner().unwrap();
    for index in [USER_INDEX, ANIMAL_INDEX] {
        let change = added(&t.sessions, index);
        let start = events
            .iter()
            .position(|e| e == &TableEvent::Changing(change.clone()));
        let done = events
            .iter()
            .position(|e| e == &TableEvent::Changed(change.clone()));
        assert!(start.is_some() && start < done, "{index}: {events:?}");
    }

    // The indexes exist, are ACTIVE and filled; TTL where cmz wants it, and only there.
    assert_active_index(
        &dynamo,
        &t.sessions,
        USER_INDEX,
        "userId",
        Some("lastActivity"),
    )
    .await;
    assert_active_index(
        &dynamo,
        &t.sessions,
        ANIMAL_INDEX,
        "animalId",
        Some("startTime"),
    )
    .await;
    assert_active_index(&dynamo, &t.users, EMAIL_INDEX, "email", None).await;
    for table in [&t.sessions, &t.messages, &t.meta, &t.care] {
        assert_eq!(
            ttl_of(&dynamo, table).await,
            (TimeToLiveStatus::Enabled, Some(TTL_ATTRIBUTE.to_owned())),
            "{table}"
        );
    }
    for table in [&t.conversations, &t.users, &t.families, &t.animals] {
        assert_eq!(
            ttl_of(&dynamo, table).await.0,
            TimeToLiveStatus::Disabled,
            "{table}"
        );
        // The legacy tables keep their keys and billing.
        let description = describe(&dynamo, table).await;
        assert_eq!(description.key_schema().len(), 1, "{table}");
        assert_eq!(
            description
                .billing_mode_summary()
                .and_then(|b| b.billing_mode()),
            Some(&BillingMode::PayPerRequest)
        );
    }
    // Every legacy item is still there, unchanged.
    assert_eq!(snapshot(&dynamo).await, before);

    // A second run changes nothing and says so.
    let again = cli(&dynamo, &["ensure-tables"]);
    let printed = stdout(&again);
    assert!(
        again.status.success(),
        "{printed} {}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(printed.trim(), "nothing to change");
    let report = dynamo.ensure_tables().await.unwrap();
    assert!(report.is_unchanged(), "{report}");
    assert_eq!(report.to_string(), "nothing to change");
    assert_eq!(snapshot(&dynamo).await, before);

    // The server's startup check passes, and cmz runs on the upgraded tables.
    let env = environment(&dynamo);
    let server = Dynamo::from_env(|name| env.get(name).cloned())
        .await
        .expect("the startup check passes");
    let checked = cli(&dynamo, &["check-tables"]);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    let store = server.conversations();
    let id = &ids[0];
    let session = store
        .get_session(id)
        .await
        .unwrap()
        .expect("the legacy session");
    assert_eq!(session.message_count, 6);
    assert_eq!(session.user_id.as_str(), "legacy_kid");
    let history = store
        .history(id, PageRequest::first(10))
        .await
        .unwrap()
        .items;
    assert_eq!(history.len(), 6);
    assert!(
        history[0]
            .content
            .starts_with("Question 0 of conversation 0"),
        "{}",
        history[0].content
    );
    assert_eq!(history[5].content, "Answer 2: Roar, yes, up to 20 hours!");
    // Listings come from the indexes DynamoDB filled from the legacy session items.
    for scope in [
        SessionScope::User(UserId::new("legacy_kid").unwrap()),
        SessionScope::Animal(AnimalId::new("lion").unwrap()),
    ] {
        let listed = store
            .list_sessions(scope.clone(), PageRequest::first(10))
            .await
            .unwrap();
        for id in &ids[..2] {
            assert!(
                listed.items.iter().any(|s| &s.id == id),
                "{id} listed by {scope:?}"
            );
        }
    }
    let user = server
        .users()
        .find_by_email("legacy.parent@example.org")
        .await
        .unwrap()
        .expect("the legacy user, found through the new email index");
    assert_eq!(user.user_id.as_str(), "legacy_parent");
    // Continued: the new turn follows the legacy messages, which stay where they were.
    let AppendOutcome::Appended(stored) = store
        .append_turn(turn(id, 6, "Do lions like the rain?"))
        .await
        .unwrap()
    else {
        panic!("appended")
    };
    assert_eq!(stored[0].seq, 7);
    let history = store
        .history(id, PageRequest::first(10))
        .await
        .unwrap()
        .items;
    assert_eq!(history.len(), 8);
    assert_eq!(history[7].content, "re: Do lions like the rain?");
    let after = snapshot(&dynamo).await;
    assert_eq!(
        after[&t.conversations], before[&t.conversations],
        "the legacy conversation items are never written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioned_legacy_table_gets_provisioned_indexes() {
    let (dynamo, ids) = legacy_deployment(Some((7, 3))).await;
    let t = dynamo.tables().clone();
    let before = snapshot(&dynamo).await;

    let out = cli(&dynamo, &["ensure-tables"]);
    let printed = stdout(&out);
    assert!(
        out.status.success(),
        "{printed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        format!("adding GSI {USER_INDEX} to table {}", t.sessions),
        format!(
            "added GSI {USER_INDEX} to table {} (provisioned like the table: 7 RCU, 3 WCU)",
            t.sessions
        ),
        format!(
            "added GSI {ANIMAL_INDEX} to table {} (provisioned like the table: 7 RCU, 3 WCU)",
            t.sessions
        ),
        format!(
            "added GSI {EMAIL_INDEX} to table {} (provisioned like the table: 7 RCU, 3 WCU)",
            t.users
        ),
        format!("turned on TTL (attribute ttl) for table {}", t.sessions),
        format!(
            "created table {} (CONVERSATION_MESSAGE_TABLE_NAME)",
            t.messages
        ),
    ] {
        assert!(
            printed.lines().any(|l| l.starts_with(&line)),
            "{line:?} in\n{printed}"
        );
    }
    for (table, index, hash, range) in [
        (&t.sessions, USER_INDEX, "userId", Some("lastActivity")),
        (&t.sessions, ANIMAL_INDEX, "animalId", Some("startTime")),
        (&t.users, EMAIL_INDEX, "email", None),
    ] {
        assert_eq!(
            assert_active_index(&dynamo, table, index, hash, range).await,
            (7, 3),
            "{index}"
        );
    }
    let sessions = describe(&dynamo, &t.sessions).await;
    assert_ne!(
        sessions
            .billing_mode_summary()
            .and_then(|b| b.billing_mode()),
        Some(&BillingMode::PayPerRequest),
        "the table stays provisioned"
    );
    assert_eq!(snapshot(&dynamo).await, before);

    let again = cli(&dynamo, &["ensure-tables"]);
    assert!(again.status.success());
    assert_eq!(stdout(&again).trim(), "nothing to change");
    dynamo.check_tables().await.unwrap();
    let listed = dynamo
        .conversations()
        .list_sessions(
            SessionScope::User(UserId::new("legacy_kid").unwrap()),
            PageRequest::first(10),
        )
        .await
        .unwrap();
    assert!(listed.items.iter().any(|s| s.id == ids[0]));
}

/// Creates `table` with `keys` (name, type, key type) and nothing else, on-demand.
async fn create_plain_table(
    dynamo: &Dynamo,
    table: &str,
    keys: &[(&str, ScalarAttributeType, KeyType)],
) {
    let mut request = dynamo
        .client()
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest);
    for (name, kind, key) in keys {
        request = request
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(*name)
                    .attribute_type(kind.clone())
                    .build()
                    .unwrap(),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(*name)
                    .key_type(key.clone())
                    .build()
                    .unwrap(),
            );
    }
    created(request.send().await);
}

/// Unwraps a `CreateTable` answer. A table that exists already was made by this request:
/// the SDK retries a `CreateTable` that timed out on a loaded machine, and the retry finds
/// the table its first attempt made.
fn created<R, E>(
    answer: Result<
        R,
        aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
    >,
) where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::fmt::Debug,
{
    if let Err(e) = answer {
        let code = aws_sdk_dynamodb::error::ProvideErrorMetadata::code(&e).map(str::to_owned);
        assert_eq!(
            code.as_deref(),
            Some("ResourceInUseException"),
            "CreateTable: {e:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_done_in_place_is_reported_and_left_alone() {
    use ScalarAttributeType::{N, S};
    let dynamo = Dynamo::connect(isolated_settings(&endpoint())).await;
    let t = dynamo.tables().clone();
    // The conversation table of the legacy "cmz-conversations" stack (one item per message,
    // keyed by user), configured as the conversation table: its keys are not cmz's.
    create_plain_table(
        &dynamo,
        &t.conversations,
        &[
            ("userId", S, KeyType::Hash),
            ("sessionIdTimestamp", S, KeyType::Range),
        ],
    )
    .await;
    // A messages table made by hand, without the local secondary index cmz needs.
    create_plain_table(
        &dynamo,
        &t.messages,
        &[
            ("conversationId", S, KeyType::Hash),
            ("seq", N, KeyType::Range),
        ],
    )
    .await;

    let report = dynamo.ensure_tables_with_progress(&|_| {}).await.unwrap();
    let problems: Vec<(&str, &str)> = report
        .problems
        .iter()
        .map(|p| (p.table.as_str(), p.variable))
        .collect();
    assert_eq!(
        problems,
        [
            (t.conversations.as_str(), "CONVERSATION_DYNAMO_TABLE_NAME"),
            (t.messages.as_str(), "CONVERSATION_MESSAGE_TABLE_NAME"),
        ]
    );
    let keys = report.problems[0].to_string();
    assert!(
        keys.contains("has the keys hash userId (S), range sessionIdTimestamp (S), but cmz needs hash conversationId (S)")
            && keys.contains("cannot be done in place"),
        "{keys}"
    );
    let lsi = report.problems[1].to_string();
    assert!(
        lsi.contains("has no local secondary index \"turnKey-index\"")
            && lsi.contains("cannot be added in place"),
        "{lsi}"
    );
    // The other tables were still created; what is wrong was left as it was.
    assert!(report.changes.contains(&TableChange::CreatedTable {
        table: t.sessions.clone(),
        variable: "CONVERSATION_SESSION_TABLE_NAME",
    }));
    let touched = |change: &TableChange| match change {
        TableChange::CreatedTable { table, .. }
        | TableChange::AddedIndex { table, .. }
        | TableChange::EnabledTtl { table, .. } => table.clone(),
        other => panic!("unexpected change {other}"),
    };
    let changed: Vec<String> = report.changes.iter().map(touched).collect();
    assert!(!changed.contains(&t.conversations), "{changed:?}");
    // What can be done on the messages table is done: it has cmz's keys.
    assert!(report.changes.contains(&TableChange::EnabledTtl {
        table: t.messages.clone(),
        attribute: TTL_ATTRIBUTE.to_owned(),
    }));
    assert_eq!(
        ttl_of(&dynamo, &t.conversations).await.0,
        TimeToLiveStatus::Disabled
    );
    assert!(
        describe(&dynamo, &t.messages)
            .await
            .local_secondary_indexes()
            .is_empty()
    );

    // As an error: from the library, at startup and from the command.
    let error = dynamo.ensure_tables().await.unwrap_err();
    assert_eq!(error.code(), "validation_error");
    assert!(
        error.to_string().contains("cannot make in place"),
        "{error}"
    );
    let refused = dynamo.check_tables().await.unwrap_err().to_string();
    assert!(
        refused.contains(&keys) && refused.contains(&lsi),
        "{refused}"
    );
    let out = cli(&dynamo, &["ensure-tables"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stdout(&out).trim(), "nothing to change");
    assert!(stderr.contains(&format!("error: {keys}")), "{stderr}");
    assert!(stderr.contains(&format!("error: {lsi}")), "{stderr}");
}

/// The session table as an earlier cmz made it: both listing indexes keyed by
/// `lastActivity`, projecting everything.
async fn create_earlier_session_table(dynamo: &Dynamo, table: &str) {
    let attribute = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .unwrap()
    };
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .unwrap()
    };
    let index = |name: &str, hash: &str| {
        GlobalSecondaryIndex::builder()
            .index_name(name)
            .key_schema(key(hash, KeyType::Hash))
            .key_schema(key("lastActivity", KeyType::Range))
            .projection(
                Projection::builder()
                    .projection_type(ProjectionType::All)
                    .build(),
            )
            .build()
            .unwrap()
    };
    let answer = dynamo
        .client()
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute("sessionId"))
        .attribute_definitions(attribute("userId"))
        .attribute_definitions(attribute("animalId"))
        .attribute_definitions(attribute("lastActivity"))
        .key_schema(key("sessionId", KeyType::Hash))
        .global_secondary_indexes(index(USER_INDEX, "userId"))
        .global_secondary_indexes(index(RETIRED_INDEXES[0], "animalId"))
        .send()
        .await;
    created(answer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_animal_index_is_replaced_in_place_and_removed_only_when_asked() {
    let dynamo = Dynamo::connect(isolated_settings(&endpoint())).await;
    let t = dynamo.tables().clone();
    create_earlier_session_table(&dynamo, &t.sessions).await;
    dynamo
        .client()
        .put_item()
        .table_name(&t.sessions)
        .item("sessionId", AttributeValue::S("conv_lion_kid_0001".into()))
        .item("userId", AttributeValue::S("kid".into()))
        .item("animalId", AttributeValue::S("lion".into()))
        .item("animalName", AttributeValue::S("Leo".into()))
        .item(
            "startTime",
            AttributeValue::S("2025-10-01T10:00:00Z".into()),
        )
        .item(
            "lastActivity",
            AttributeValue::S("2025-10-02T10:00:00Z".into()),
        )
        .item("messageCount", AttributeValue::N("4".into()))
        .item("status", AttributeValue::S("active".into()))
        .send()
        .await
        .unwrap();
    let refused = dynamo.check_tables().await.unwrap_err().to_string();
    assert!(
        refused.contains(&format!("has no GSI {ANIMAL_INDEX:?}")),
        "{refused}"
    );

    // A plain run adds the new index and keeps the retired one, with a warning.
    let report = dynamo.ensure_tables_with_progress(&|_| {}).await.unwrap();
    assert!(report.problems.is_empty(), "{report}");
    assert!(
        report.changes.contains(&TableChange::AddedIndex {
            table: t.sessions.clone(),
            index: ANIMAL_INDEX.to_owned(),
            billing: IndexBilling::OnDemand,
        }),
        "{report}"
    );
    let warnings: Vec<String> = report.warnings.iter().map(ToString::to_string).collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(RETIRED_INDEXES[0]) && w.contains("--remove-retired-indexes")),
        "{warnings:?}"
    );
    assert_active_index(
        &dynamo,
        &t.sessions,
        ANIMAL_INDEX,
        "animalId",
        Some("startTime"),
    )
    .await;
    assert_active_index(
        &dynamo,
        &t.sessions,
        RETIRED_INDEXES[0],
        "animalId",
        Some("lastActivity"),
    )
    .await;
    dynamo.check_tables().await.unwrap();
    let lions = dynamo
        .conversations()
        .list_sessions(
            SessionScope::Animal(AnimalId::new("lion").unwrap()),
            PageRequest::first(10),
        )
        .await
        .unwrap();
    let listed: Vec<(&str, u64)> = lions
        .items
        .iter()
        .map(|s| (s.id.as_str(), s.message_count))
        .collect();
    assert_eq!(
        listed,
        [("conv_lion_kid_0001", 4)],
        "read through the new index"
    );

    // Asked, the command removes it; then nothing is left to change or to warn about.
    let out = cli(&dynamo, &["ensure-tables", "--remove-retired-indexes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = stdout(&out);
    assert!(
        printed.contains(&format!(
            "removed retired GSI {} from table {}",
            RETIRED_INDEXES[0], t.sessions
        )),
        "{printed}"
    );
    let indexes: Vec<String> = describe(&dynamo, &t.sessions)
        .await
        .global_secondary_indexes()
        .iter()
        .filter_map(|g| g.index_name().map(str::to_owned))
        .collect();
    assert!(
        !indexes.iter().any(|i| i == RETIRED_INDEXES[0]),
        "{indexes:?}"
    );
    let again = dynamo
        .ensure_tables_with_options(EnsureOptions::removing_retired_indexes(), &|_| {})
        .await
        .unwrap();
    assert!(
        again.is_unchanged() && again.warnings.is_empty() && again.problems.is_empty(),
        "{again}"
    );
    let usage = cli(&dynamo, &["ensure-tables", "--remove-everything"]);
    assert!(!usage.status.success());
    assert!(String::from_utf8_lossy(&usage.stderr).contains("usage: cmz-dynamo"));
}
