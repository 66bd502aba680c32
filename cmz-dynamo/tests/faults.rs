//! Faults: retried throttling and 5xx, a dead endpoint, a server killed mid-turn.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use cmz_core::ids::{AnimalId, SessionId, UserId};
use cmz_core::store::{ConversationStore, PageRequest, TurnAppend};
use cmz_core::types::{NewMessage, Role, Session};
use cmz_dynamo::testing::{DynamoLocal, isolated_settings, shared_endpoint};
use cmz_dynamo::{Dynamo, DynamoSettings};

fn session(n: usize) -> Session {
    let (user, animal) = (
        UserId::new(format!("fault-user-{n}")).unwrap(),
        AnimalId::new("lion").unwrap(),
    );
    Session::new(
        SessionId::generate(&animal, &user).unwrap(),
        user,
        animal,
        "Leo",
    )
}

fn turn(id: &SessionId, expected: u64, text: &str, new_session: Option<Session>) -> TurnAppend {
    TurnAppend {
        session_id: id.clone(),
        expected_count: expected,
        messages: vec![
            NewMessage::new(Role::User, text),
            NewMessage::new(Role::Assistant, format!("re: {text}")),
        ],
        turn_key: None,
        new_session,
        began_at: chrono::Utc::now(),
    }
}

/// Sends a request the proxy got on to DynamoDB Local, and its answer back.
async fn forward(
    client: &reqwest::Client,
    upstream: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, Bytes) {
    let mut request = client.post(upstream).body(body);
    for (name, value) in headers {
        if name != "host" && name != "content-length" {
            request = request.header(name.as_str(), value.as_bytes());
        }
    }
    let response = request.send().await.unwrap();
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    let mut h = HeaderMap::new();
    for (name, value) in response.headers() {
        if name.as_str().starts_with("x-amz") || name == "content-type" {
            h.insert(
                axum::http::HeaderName::from_bytes(name.as_str().as_bytes()).unwrap(),
                value.as_bytes().try_into().unwrap(),
            );
        }
    }
    (status, h, response.bytes().await.unwrap())
}

/// A loopback proxy that answers the first requests with a 500 and a throttling error,
/// then forwards to DynamoDB Local.
async fn flaky_proxy(failures: usize) -> (String, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let upstream = shared_endpoint();
    let client = reqwest::Client::new();
    let counter = seen.clone();
    let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
        let (client, upstream, counter) = (client.clone(), upstream.clone(), counter.clone());
        async move {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            if n < failures {
                if n % 2 == 0 {
                    return (StatusCode::INTERNAL_SERVER_ERROR, HeaderMap::new(), Bytes::from_static(b"{\"__type\":\"com.amazonaws.dynamodb.v20120810#InternalServerError\",\"message\":\"boom\"}"));
                }
                let mut h = HeaderMap::new();
                h.insert("content-type", "application/x-amz-json-1.0".parse().unwrap());
                return (StatusCode::BAD_REQUEST, h, Bytes::from_static(b"{\"__type\":\"com.amazonaws.dynamodb.v20120810#ThrottlingException\",\"message\":\"slow down\"}"));
            }
            forward(&client, &upstream, &headers, body).await
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_5xx_are_retried_then_unavailable() {
    let real = cmz_dynamo::testing::isolated().await;
    let (proxy, seen) = flaky_proxy(2).await;
    let settings = DynamoSettings {
        endpoint_url: Some(proxy.clone()),
        tables: real.tables().clone(),
        ..isolated_settings(&proxy)
    };
    let dynamo = Dynamo::connect(DynamoSettings {
        max_attempts: 3,
        ..settings.clone()
    })
    .await;
    let s = session(1);
    dynamo
        .conversations()
        .append_turn(turn(&s.id, 0, "hello", Some(s.clone())))
        .await
        .expect("retried to success");
    assert!(
        seen.load(Ordering::SeqCst) >= 3,
        "a 500 and a throttle were retried"
    );

    let (proxy, seen) = flaky_proxy(usize::MAX).await;
    let dynamo = Dynamo::connect(DynamoSettings {
        max_attempts: 2,
        endpoint_url: Some(proxy),
        ..settings
    })
    .await;
    let error = dynamo.conversations().get_session(&s.id).await.unwrap_err();
    assert_eq!(error.code(), "unavailable", "{error:?}");
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "max_attempts bounds the retries"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_unavailable_within_a_bounded_time() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let settings = DynamoSettings {
        operation_timeout: Duration::from_secs(3),
        ..isolated_settings(&format!("http://127.0.0.1:{port}"))
    };
    let dynamo = Dynamo::connect(settings).await;
    let store = dynamo.conversations();
    let s = session(2);
    let started = Instant::now();
    assert_eq!(
        store.get_session(&s.id).await.unwrap_err().code(),
        "unavailable"
    );
    assert_eq!(
        store
            .append_turn(turn(&s.id, 0, "hi", Some(s.clone())))
            .await
            .unwrap_err()
            .code(),
        "unavailable"
    );
    let error = dynamo.check_tables().await.unwrap_err();
    assert_eq!(error.code(), "unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "bounded: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_turn_loses_nothing_acknowledged_and_leaves_nothing_partial() {
    let dir = std::env::temp_dir().join(format!("cmz-dynamo-kill-{:08x}", fastrand::u32(..)));
    let mut server = DynamoLocal::start(Some(&dir));
    let patient = isolated_settings(&server.endpoint());
    let settings = DynamoSettings {
        operation_timeout: Duration::from_secs(3),
        attempt_timeout: Duration::from_secs(1),
        ..patient.clone()
    };
    // The tables are made with the default timeouts: a JVM just started on a loaded
    // machine may take longer than the writers' 3 s for its first answers.
    Dynamo::connect(patient)
        .await
        .ensure_tables()
        .await
        .unwrap();
    let dynamo = Dynamo::connect(settings).await;
    let store = Arc::new(dynamo.conversations());
    let stop = Arc::new(AtomicBool::new(false));
    let progress: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut writers = Vec::new();
    for (w, done) in progress.iter().cloned().enumerate() {
        let (store, stop) = (store.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let s = session(100 + w);
            let mut acknowledged = Vec::new();
            let mut failures = Vec::new();
            let mut count = 0;
            while !stop.load(Ordering::SeqCst) {
                let text = format!("writer {w} turn {}", acknowledged.len());
                let new = (count == 0).then(|| s.clone());
                match store.append_turn(turn(&s.id, count, &text, new)).await {
                    Ok(_) => {
                        acknowledged.push(text);
                        count += 2;
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        failures.push(e.code());
                        if failures.len() >= 3 {
                            break;
                        }
                    }
                }
            }
            (s.id, acknowledged, failures)
        }));
    }
    // Kill once every writer has had a few turns acknowledged (however slow the machine).
    let started = Instant::now();
    while progress.iter().any(|p| p.load(Ordering::SeqCst) < 3) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the writers made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut results = Vec::new();
    for writer in writers {
        results.push(writer.await.expect("no panic"));
    }
    server.restart();
    for (id, acknowledged, failures) in results {
        assert!(
            acknowledged.len() >= 3,
            "the writer ran before the kill: {acknowledged:?}"
        );
        assert!(!failures.is_empty(), "the kill was seen");
        for code in &failures {
            assert!(
                ["unavailable", "timeout"].contains(&code.as_str()),
                "failure code {code}"
            );
        }
        // A restarted server may take a while to answer again on a loaded machine.
        let restarted = Instant::now();
        let history = loop {
            match store.history(&id, PageRequest::first(1000)).await {
                Ok(page) => break page.items,
                Err(e) if e.is_temporary() && restarted.elapsed() < Duration::from_secs(90) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("the restarted server does not answer: {e:?}"),
            }
        };
        // Whole turns only, every acknowledged turn, and at most the one in flight more.
        assert_eq!(history.len() % 2, 0, "no half turn");
        for pair in history.chunks(2) {
            assert_eq!(pair[1].content, format!("re: {}", pair[0].content));
        }
        let texts: Vec<&str> = history
            .iter()
            .step_by(2)
            .map(|m| m.content.as_str())
            .collect();
        assert!(
            texts.len() == acknowledged.len() || texts.len() == acknowledged.len() + 1,
            "{texts:?} vs {acknowledged:?}"
        );
        assert_eq!(
            &texts[..acknowledged.len()],
            acknowledged
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice()
        );
        // The session may lag a turn that landed without its update; the next turn repairs it.
        let mut count = store.get_session(&id).await.unwrap().unwrap().message_count;
        assert!(count == history.len() as u64 || count + 2 == history.len() as u64);
        let mut stored = false;
        for _ in 0..3 {
            match store
                .append_turn(turn(&id, count, "after the restart", None))
                .await
            {
                Ok(_) => {
                    stored = true;
                    break;
                }
                Err(e) if e.code() == "conflict" => {
                    count = store.get_session(&id).await.unwrap().unwrap().message_count
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(stored, "the session takes turns again");
        let after = store
            .history(&id, PageRequest::first(1000))
            .await
            .unwrap()
            .items;
        assert_eq!(after.len(), history.len() + 2);
        assert_eq!(
            store.get_session(&id).await.unwrap().unwrap().message_count,
            after.len() as u64
        );
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_sets_ttl_and_tables_expire_by_it() {
    let settings = DynamoSettings {
        retention: Some(Duration::from_secs(30 * 86_400)),
        ..isolated_settings(&shared_endpoint())
    };
    let dynamo = Dynamo::connect(settings).await;
    dynamo.ensure_tables().await.unwrap();
    let s = session(3);
    dynamo
        .conversations()
        .append_turn(turn(&s.id, 0, "hi", Some(s.clone())))
        .await
        .unwrap();
    let expected = chrono::Utc::now().timestamp() + 30 * 86_400;
    for (table, key, value) in [(
        &dynamo.tables().sessions,
        "sessionId",
        aws_sdk_dynamodb::types::AttributeValue::S(s.id.as_str().into()),
    )] {
        let item = dynamo
            .client()
            .get_item()
            .table_name(table)
            .key(key, value)
            .send()
            .await
            .unwrap()
            .item
            .unwrap();
        let ttl: i64 = item["ttl"].as_n().unwrap().parse().unwrap();
        assert!((ttl - expected).abs() < 60, "ttl {ttl} vs {expected}");
    }
    let items = dynamo
        .client()
        .query()
        .table_name(&dynamo.tables().messages)
        .key_condition_expression("conversationId = :c")
        .expression_attribute_values(
            ":c",
            aws_sdk_dynamodb::types::AttributeValue::S(s.id.as_str().into()),
        )
        .send()
        .await
        .unwrap();
    assert!(items.items().iter().all(|i| i.contains_key("ttl")));
    for table in [
        &dynamo.tables().sessions,
        &dynamo.tables().messages,
        &dynamo.tables().meta,
    ] {
        let ttl = dynamo
            .client()
            .describe_time_to_live()
            .table_name(table)
            .send()
            .await
            .unwrap();
        let description = ttl.time_to_live_description().unwrap();
        assert_eq!(description.attribute_name(), Some("ttl"));
        assert_eq!(
            description.time_to_live_status(),
            Some(&aws_sdk_dynamodb::types::TimeToLiveStatus::Enabled)
        );
    }
}

/// A loopback proxy that answers the first `unprocessed` `BatchGetItem` requests with
/// every key unprocessed (what DynamoDB does under throttling or a large response), and
/// forwards everything else to DynamoDB Local.
async fn unprocessing_proxy(unprocessed: usize) -> (String, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let upstream = shared_endpoint();
    let client = reqwest::Client::new();
    let counter = seen.clone();
    let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
        let (client, upstream, counter) = (client.clone(), upstream.clone(), counter.clone());
        async move {
            let target = headers
                .get("x-amz-target")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            if target.ends_with(".BatchGetItem")
                && counter.fetch_add(1, Ordering::SeqCst) < unprocessed
            {
                let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let reply = serde_json::json!({
                    "Responses": {},
                    "UnprocessedKeys": request["RequestItems"],
                });
                let mut h = HeaderMap::new();
                h.insert(
                    "content-type",
                    "application/x-amz-json-1.0".parse().unwrap(),
                );
                return (StatusCode::OK, h, Bytes::from(reply.to_string()));
            }
            forward(&client, &upstream, &headers, body).await
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprocessed_batch_keys_are_fetched_again_or_the_read_fails_never_part_of_it() {
    use cmz_core::auth::{Family, FamilyDirectory, RevocationStore};
    use cmz_core::ids::FamilyId;

    let real = cmz_dynamo::testing::isolated().await;
    let parent = UserId::new("batch-parent").unwrap();
    for n in 0..3 {
        real.families()
            .put_family(&Family {
                family_id: FamilyId::new(format!("batch-family-{n}")).unwrap(),
                family_name: format!("Family {n}"),
                parents: vec![parent.clone()],
                students: vec![UserId::new(format!("batch-kid-{n}")).unwrap()],
                soft_delete: false,
                retention_days: None,
            })
            .await
            .unwrap();
    }
    let through = |proxy: String| {
        let settings = DynamoSettings {
            endpoint_url: Some(proxy.clone()),
            tables: real.tables().clone(),
            ..isolated_settings(&proxy)
        };
        Dynamo::connect(settings)
    };
    // A few rounds of unprocessed keys: asked again, and the whole family list comes back.
    let (proxy, seen) = unprocessing_proxy(3).await;
    let families = through(proxy)
        .await
        .families()
        .families_of(&parent)
        .await
        .unwrap();
    assert_eq!(families.len(), 3, "{families:?}");
    assert!(
        seen.load(Ordering::SeqCst) >= 4,
        "unprocessed keys were asked for again"
    );
    // Never processed: `unavailable`, not a shorter list (a parent's view never shrinks).
    let (proxy, _) = unprocessing_proxy(usize::MAX).await;
    let stuck = through(proxy).await;
    let error = stuck.families().families_of(&parent).await.unwrap_err();
    assert_eq!(error.code(), "unavailable", "{error:?}");
    let error = stuck
        .revocations()
        .is_revoked(Some("some-jti"), None)
        .await
        .unwrap_err();
    assert_eq!(error.code(), "unavailable", "{error:?}");
}
