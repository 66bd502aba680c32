//! Abuse resistance over real loopback HTTP: slow request bodies, where `?token=` counts,
//! the refresh throttle, sessions a caller may not read, security headers and JSON error
//! bodies.

mod support;

use std::time::{Duration, Instant};

use cmz_core::auth::{AuditKind, AuditOutcome};
use cmz_core::testing::ScriptedModel;
use cmz_tower::{HttpSettings, TrustedProxies};
use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use support::memory::{MemoryServer, assert_error, start};

/// Reads until the server closes the connection or `limit` passes; what was read, and
/// when the connection closed (`None`: still open).
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&seen).into(), None),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&seen).into(),
                    Some(started.elapsed()),
                );
            }
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// The JSON body of a raw HTTP/1.1 response.
fn raw_body(response: &str) -> Value {
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {response}"))
}

const BODY_TIMEOUT: Duration = Duration::from_millis(400);
/// What a loaded CI machine may add to a deadline.
const SLACK: Duration = Duration::from_millis(700);

fn slow_body_settings() -> HttpSettings {
    HttpSettings {
        body_timeout: BODY_TIMEOUT,
        ..HttpSettings::default()
    }
}

async fn assert_408(stream: &mut TcpStream, started: Instant) {
    let (response, closed) = read_until_closed(stream, Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(
        elapsed >= BODY_TIMEOUT && elapsed < BODY_TIMEOUT + SLACK,
        "408 after {elapsed:?}"
    );
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    assert!(closed.is_some(), "the connection is closed after the 408");
    let body = raw_body(&response);
    assert_eq!(body["code"], "request_timeout", "{body}");
    assert!(body["message"].is_string(), "{body}");
}

#[tokio::test]
async fn a_stalled_body_gets_408_within_the_body_timeout() {
    let server = start(ScriptedModel::echo(), slow_body_settings()).await;
    let mut stream = TcpStream::connect(server.address()).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(
            b"POST /auth HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"username\": \"adm",
        )
        .await
        .unwrap();
    assert_408(&mut stream, started).await;

    // The same on a route behind the auth layer: the body is read after the token.
    let token = server.login("student1@cmz.org", "student123").await;
    let mut stream = TcpStream::connect(server.address()).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(
            format!(
                "POST /convo_turn HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nContent-Length: 80\r\n\r\n{{\"animalId\""
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    assert_408(&mut stream, started).await;
}

#[tokio::test]
async fn a_trickled_body_gets_408_though_bytes_keep_moving() {
    let server = start(ScriptedModel::echo(), slow_body_settings()).await;
    let mut stream = TcpStream::connect(server.address()).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(
            b"POST /auth HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 200\r\n\r\n",
        )
        .await
        .unwrap();
    // A byte every 50 ms: each well inside the limit, the whole body far outside it.
    let writer = {
        let (mut reader, mut writer) = stream.into_split();
        let task = tokio::spawn(async move {
            for _ in 0..100 {
                if writer.write_all(b" ").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(100), reader.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            if seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.ends_with(b"}") {
                break;
            }
        }
        task.abort();
        String::from_utf8_lossy(&seen).into_owned()
    };
    let elapsed = started.elapsed();
    assert!(writer.starts_with("HTTP/1.1 408"), "{writer}");
    assert!(elapsed < BODY_TIMEOUT + SLACK, "408 after {elapsed:?}");
    assert_eq!(raw_body(&writer)["code"], "request_timeout");
}

#[tokio::test]
async fn bodies_in_time_and_long_streams_are_not_cut() {
    let model = ScriptedModel::always("one two three four five six seven eight nine ten")
        .with_chunk_delay(Duration::from_millis(100));
    let server = start(model, slow_body_settings()).await;
    // A body sent in two parts, inside the limit: answered as usual (401: wrong password).
    let mut stream = TcpStream::connect(server.address()).await.unwrap();
    let body = br#"{"username": "admin@cmz.org", "password": "wrong"}"#;
    stream
        .write_all(
            format!(
                "POST /auth HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream.write_all(&body[..10]).await.unwrap();
    tokio::time::sleep(BODY_TIMEOUT / 4).await;
    stream.write_all(&body[10..]).await.unwrap();
    let (response, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");

    // Streams that last ten chunks of 100 ms, well past the body limit, run to the end:
    // by GET (no body) and by POST (a body read at once).
    let token = server.login("student1@cmz.org", "student123").await;
    let get = server
        .client
        .get(server.url("/convo_turn/stream?animalId=cougar&message=story"))
        .bearer_auth(&token)
        .header("accept", "text/event-stream");
    let post = server
        .client
        .post(server.url("/convo_turn/stream"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(json!({"animalId": "cougar", "message": "another story"}).to_string());
    for request in [get, post] {
        let started = Instant::now();
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let mut events = response.bytes_stream().eventsource();
        let mut last = None;
        while let Some(event) = events.next().await {
            last = Some(event.unwrap().event);
        }
        assert_eq!(last.as_deref(), Some("complete"));
        assert!(
            started.elapsed() > BODY_TIMEOUT * 2,
            "{:?}",
            started.elapsed()
        );
    }
}

#[test]
fn the_body_timeout_comes_from_cmz_body_timeout_ms() {
    let defaults = HttpSettings::from_lookup(&|_| None).unwrap();
    assert_eq!(defaults.body_timeout, Duration::from_secs(10));
    let set =
        HttpSettings::from_lookup(&|name| (name == "CMZ_BODY_TIMEOUT_MS").then(|| "2500".into()))
            .unwrap();
    assert_eq!(set.body_timeout, Duration::from_millis(2500));
    let bad =
        HttpSettings::from_lookup(&|name| (name == "CMZ_BODY_TIMEOUT_MS").then(|| "soon".into()))
            .unwrap_err();
    assert_eq!(bad.code(), "validation_error");
    assert!(bad.to_string().contains("CMZ_BODY_TIMEOUT_MS"));
}

/// A request to `path` with `method`, the access token only as `?token=`, sent as an
/// EventSource sends it (`Accept: text/event-stream`).
fn query_token_request(
    server: &MemoryServer,
    method: reqwest::Method,
    path: &str,
    token: &str,
) -> reqwest::RequestBuilder {
    let separator = if path.contains('?') { '&' } else { '?' };
    let mut request = server
        .client
        .request(
            method.clone(),
            server.url(&format!("{path}{separator}token={token}")),
        )
        .header("accept", "text/event-stream");
    if method == reqwest::Method::POST {
        request = request
            .header("content-type", "application/json")
            .body(json!({"animalId": "cougar", "message": "hi", "sessionId": "x"}).to_string());
    }
    request
}

#[tokio::test]
async fn a_query_token_counts_only_on_the_event_stream_route() {
    let server = start(ScriptedModel::echo(), HttpSettings::default()).await;
    let token = server.login("student1@cmz.org", "student123").await;
    let response = query_token_request(
        &server,
        reqwest::Method::GET,
        "/convo_turn/stream?animalId=cougar&message=hi",
        &token,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream().eventsource();
    let mut last = None;
    while let Some(event) = events.next().await {
        last = Some(event.unwrap().event);
    }
    assert_eq!(last.as_deref(), Some("complete"));

    // Everywhere else `?token=` is ignored: 401 as without any token, though the same
    // token in the header works on each of these routes.
    let get = reqwest::Method::GET;
    let cases = [
        (get.clone(), "/me"),
        (get.clone(), "/convo_history"),
        (get.clone(), "/conversations/sessions"),
        (get.clone(), "/family_list"),
        (get.clone(), "/animals"),
        (reqwest::Method::POST, "/convo_turn/stream"),
        (reqwest::Method::POST, "/convo_turn"),
        (
            reqwest::Method::DELETE,
            "/convo_history?sessionId=session_1",
        ),
    ];
    for (method, path) in cases {
        let by_query = server
            .send(query_token_request(&server, method.clone(), path, &token))
            .await;
        assert_error(&by_query, 401, "unauthorized");
        let mut by_header = server
            .client
            .request(method.clone(), server.url(path))
            .bearer_auth(&token);
        if method == reqwest::Method::POST {
            by_header = by_header
                .header("content-type", "application/json")
                .body(json!({"animalId": "cougar", "message": "hi"}).to_string());
        }
        let status = by_header.send().await.unwrap().status().as_u16();
        assert_ne!(status, 401, "{method} {path}: the token itself is good");
    }
    // On the stream route too, only for EventSource requests (Accept: text/event-stream).
    let plain = server
        .get(
            &format!("/convo_turn/stream?animalId=cougar&message=hi&token={token}"),
            None,
        )
        .await;
    assert_error(&plain, 401, "unauthorized");
}

#[tokio::test]
async fn token_refreshes_are_throttled_per_client_address() {
    let settings = HttpSettings {
        refresh_limit: 3,
        // The test's requests all come from 127.0.0.1: a trusted proxy lets one of them
        // speak for another client.
        trusted_proxies: TrustedProxies::parse("127.0.0.1").unwrap(),
        ..HttpSettings::default()
    };
    let server = start(ScriptedModel::echo(), settings).await;
    let login = server
        .post_json(
            "/auth",
            None,
            json!({"username": "student1@cmz.org", "password": "student123"}),
        )
        .await;
    let mut refresh_token = login.1["refreshToken"].as_str().unwrap().to_owned();
    let refresh = |token: String, client: &'static str| {
        server
            .client
            .post(server.url("/auth/refresh"))
            .header("content-type", "application/json")
            .header("x-forwarded-for", client)
            .body(json!({ "refreshToken": token }).to_string())
    };
    // Two good refreshes and a bad one: three, the limit.
    for _ in 0..2 {
        let (status, body) = server.send(refresh(refresh_token, "198.51.100.1")).await;
        assert_eq!(status, 200, "{body}");
        refresh_token = body["refreshToken"].as_str().unwrap().to_owned();
    }
    let bad = server
        .send(refresh("not-a-refresh-token".into(), "198.51.100.1"))
        .await;
    assert_error(&bad, 401, "unauthorized");
    // The fourth from that address is refused, even with a good token.
    let response = refresh(refresh_token.clone(), "198.51.100.1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=15 * 60).contains(&retry_after), "{retry_after}");
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["code"], "rate_limit_exceeded");
    assert!(body["message"].is_string());
    assert_eq!(body["details"]["retryAfterSeconds"], retry_after);
    // Another address has its own budget: the token refused above still works from there.
    let (status, body) = server.send(refresh(refresh_token, "203.0.113.7")).await;
    assert_eq!(status, 200, "{body}");
}

/// The `not_found` answer for a session id nobody has, with the id replaced by `<id>`.
fn without_id(body: &Value, id: &str) -> String {
    body.to_string().replace(id, "<id>")
}

#[tokio::test]
async fn sessions_the_caller_may_not_read_answer_exactly_like_unknown_ones() {
    let server = start(ScriptedModel::echo(), HttpSettings::default()).await;
    let ana = server.login("student1@cmz.org", "student123").await;
    let kim = server.login("other@cmz.org", "other123").await;
    let parent = server.login("parent@cmz.org", "parent123").await;
    let admin = server.login("admin@cmz.org", "admin123").await;
    let turn = server
        .post_json(
            "/convo_turn",
            Some(&ana),
            json!({"animalId": "cougar", "message": "my secret"}),
        )
        .await;
    assert_eq!(turn.0, 200, "{turn:?}");
    let session = turn.1["sessionId"].as_str().unwrap().to_owned();
    let unknown = "conv_cougar_nobody_0badc0de";
    let reference = server
        .get(&format!("/conversations/sessions/{unknown}"), Some(&kim))
        .await;
    assert_error(&reference, 404, "not_found");
    let expected = without_id(&reference.1, unknown);

    // Every route that takes a session id, as kim (another family) asks for ana's.
    let requests = |token: &str, id: &str| {
        let c = &server.client;
        let body = |extra: Value| {
            let mut body = json!({"animalId": "cougar", "message": "let me in", "sessionId": id});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            body.to_string()
        };
        vec![
            c.get(server.url(&format!("/convo_history?sessionId={id}"))),
            c.delete(server.url(&format!("/convo_history?sessionId={id}"))),
            c.get(server.url(&format!("/conversations/sessions/{id}"))),
            c.post(server.url("/summarize_convo"))
                .header("content-type", "application/json")
                .body(json!({ "sessionId": id }).to_string()),
            c.post(server.url("/convo_turn"))
                .header("content-type", "application/json")
                .body(body(json!({}))),
            c.post(server.url("/convo_turn/stream"))
                .header("content-type", "application/json")
                .body(body(json!({}))),
            c.get(server.url(&format!(
                "/convo_turn/stream?animalId=cougar&message=hi&sessionId={id}"
            )))
            .header("accept", "text/event-stream"),
            // Another animal with the same id is still that session's id.
            c.post(server.url("/convo_turn"))
                .header("content-type", "application/json")
                .body(body(json!({"animalId": "porcupine"}))),
        ]
        .into_iter()
        .map(|r| r.bearer_auth(token))
        .collect::<Vec<_>>()
    };
    let (reads, turns) = {
        let mut all = requests(&kim, &session);
        let turns = all.split_off(4);
        (all, turns)
    };
    for request in reads {
        let described = format!("{request:?}");
        let response = server.send(request).await;
        assert_error(&response, 404, "not_found");
        assert_eq!(
            without_id(&response.1, &session),
            expected,
            "{described}: not word for word what an unknown id gets"
        );
    }
    // Reading routes answer an unknown id the same way.
    for request in requests(&kim, unknown).into_iter().take(4) {
        let response = server.send(request).await;
        assert_eq!(without_id(&response.1, unknown), expected);
    }
    // A turn with the id (a shared browser kept it) is kim's own new conversation: it
    // answers as any first turn does, and nothing of ana's is in it.
    for request in turns {
        let described = format!("{request:?}");
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{described}");
        let text = response.text().await.unwrap();
        assert!(!text.contains("my secret"), "{described}: {text}");
        assert!(!text.contains(&session), "{described}: {text}");
    }
    let kims = server
        .get(
            "/conversations/sessions?userId=user_student_kim",
            Some(&kim),
        )
        .await;
    let kims = kims.1["sessions"].as_array().unwrap().clone();
    assert_eq!(kims.len(), 4, "{kims:?}");
    assert!(kims.iter().all(|s| s["sessionId"] != session.as_str()));
    // Nothing was changed, and the denials were audited.
    let history = server
        .get(&format!("/convo_history?sessionId={session}"), Some(&ana))
        .await;
    assert_eq!(
        history.1["turns"].as_array().unwrap().len(),
        2,
        "{history:?}"
    );
    let denied = server
        .audit
        .events()
        .into_iter()
        .filter(|e| {
            e.outcome == AuditOutcome::Denied
                && matches!(e.kind, AuditKind::Access(_))
                && e.actor.as_ref().map(|a| a.as_str()) == Some("user_student_kim")
                && e.subject.as_ref().map(|s| s.as_str()) == Some("user_student_ana")
        })
        .count();
    assert!(denied >= 8, "{denied} denials audited");

    // Nothing is widened: the parent and the admin still read it; a turn of theirs with
    // its id is a conversation of their own.
    for reader in [&parent, &admin] {
        let read = server
            .get(&format!("/conversations/sessions/{session}"), Some(reader))
            .await;
        assert_eq!(read.0, 200);
        let turn = server
            .post_json(
                "/convo_turn",
                Some(reader),
                json!({"animalId": "cougar", "message": "hijack", "sessionId": session}),
            )
            .await;
        assert_eq!(turn.0, 200, "{turn:?}");
        assert_ne!(turn.1["sessionId"], session.as_str());
        assert_eq!(turn.1["turnNumber"], 1);
    }
    let history = server
        .get(&format!("/convo_history?sessionId={session}"), Some(&ana))
        .await;
    assert_eq!(history.1["turns"].as_array().unwrap().len(), 2);
    let delete = server
        .send(
            server
                .client
                .delete(server.url(&format!("/convo_history?sessionId={session}")))
                .bearer_auth(&parent),
        )
        .await;
    // A parent may delete their own child's conversation (issue: parent controls), and
    // only theirs (kim's attempt above was a 404).
    assert_eq!(delete.0, 204, "{delete:?}");
    let gone = server
        .get(&format!("/conversations/sessions/{session}"), Some(&ana))
        .await;
    assert_error(&gone, 404, "not_found");
}

fn assert_security_headers(what: &str, headers: &reqwest::header::HeaderMap) {
    for (name, value) in [
        (
            "content-security-policy",
            cmz_tower::API_CONTENT_SECURITY_POLICY,
        ),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
    ] {
        assert_eq!(
            headers.get(name).and_then(|v| v.to_str().ok()),
            Some(value),
            "{what}: {name}"
        );
    }
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let settings = HttpSettings {
        cors_origins: vec![
            cmz_tower::LEGACY_FRONTEND_ORIGINS
                .split(',')
                .next()
                .unwrap()
                .parse()
                .unwrap(),
        ],
        ..HttpSettings::default()
    };
    let server = start(ScriptedModel::echo(), settings).await;
    let token = server.login("student1@cmz.org", "student123").await;
    let c = &server.client;
    let cases = [
        ("health", c.get(server.url("/system_health"))),
        ("animal list", c.get(server.url("/animal_list"))),
        ("me", c.get(server.url("/me")).bearer_auth(&token)),
        ("401", c.get(server.url("/me"))),
        ("404", c.get(server.url("/no/such/route"))),
        ("405", c.put(server.url("/convo_turn")).bearer_auth(&token)),
        (
            "preflight",
            c.request(reqwest::Method::OPTIONS, server.url("/convo_turn"))
                .header("origin", "http://localhost:3000")
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization, content-type",
                ),
        ),
        (
            "stream",
            c.get(server.url("/convo_turn/stream?animalId=cougar&message=hi"))
                .bearer_auth(&token)
                .header("accept", "text/event-stream"),
        ),
    ];
    for (what, request) in cases {
        let response = request.send().await.unwrap();
        assert!(
            response.status().as_u16() < 500,
            "{what}: {}",
            response.status()
        );
        assert_security_headers(what, response.headers());
    }
}

#[tokio::test]
async fn every_error_the_server_can_write_is_a_json_error_body() {
    use axum::routing::get;
    let server = start(
        ScriptedModel::echo(),
        HttpSettings {
            refresh_limit: 1,
            ..HttpSettings::default()
        },
    )
    .await;
    let token = server.login("student1@cmz.org", "student123").await;
    let c = &server.client;
    let json_post = |path: &str, body: &'static str, content_type: &'static str| {
        c.post(server.url(path))
            .bearer_auth(&token)
            .header("content-type", content_type)
            .body(body)
    };
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "unknown route",
            c.get(server.url("/no/such/route")),
            404,
            "not_found",
        ),
        (
            "wrong method",
            c.put(server.url("/convo_turn")).bearer_auth(&token),
            405,
            "method_not_allowed",
        ),
        ("no token", c.get(server.url("/me")), 401, "unauthorized"),
        (
            "malformed JSON",
            json_post("/convo_turn", "{\"animalId\": ", "application/json"),
            400,
            "validation_error",
        ),
        (
            "wrong JSON types",
            json_post("/convo_turn", "{\"animalId\": 5}", "application/json"),
            400,
            "validation_error",
        ),
        (
            "not JSON",
            json_post(
                "/convo_turn",
                "animalId=x",
                "application/x-www-form-urlencoded",
            ),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            c.post(server.url("/convo_turn"))
                .bearer_auth(&token)
                .body("{}"),
            415,
            "unsupported_media_type",
        ),
        (
            "too large",
            c.post(server.url("/convo_turn"))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body("x".repeat(200_000)),
            413,
            "payload_too_large",
        ),
        (
            "bad query",
            c.get(server.url("/convo_history?limit=abc"))
                .bearer_auth(&token),
            400,
            "validation_error",
        ),
        (
            "bad id beside the family listing",
            c.get(server.url("/convo_history?parentUserId=user_parent_rivera&sessionId=a%20b"))
                .bearer_auth(&token),
            400,
            "validation_error",
        ),
        (
            "bad path id",
            c.get(server.url("/conversations/sessions/a%20b"))
                .bearer_auth(&token),
            400,
            "validation_error",
        ),
        (
            "refresh",
            json_post(
                "/auth/refresh",
                "{\"refreshToken\": \"x\"}",
                "application/json",
            ),
            401,
            "unauthorized",
        ),
        (
            "refresh throttled",
            json_post(
                "/auth/refresh",
                "{\"refreshToken\": \"x\"}",
                "application/json",
            ),
            429,
            "rate_limit_exceeded",
        ),
    ];
    for (what, request, status, code) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{what}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("application/json"),
            "{what}: {content_type}"
        );
        assert_security_headers(what, response.headers());
        let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(body["code"], code, "{what}: {body}");
        assert!(body["message"].is_string(), "{what}: {body}");
    }

    // The request timeout (504) and a panic (500), on routes of one's own under the same
    // stack.
    let settings = HttpSettings {
        request_timeout: Duration::from_millis(200),
        ..HttpSettings::default()
    };
    let app = cmz_tower::with_layers(
        axum::Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            )
            .route(
                "/panic",
                get(|| async {
                    if true {
                        panic!("a bug");
                    }
                    "never"
                }),
            ),
        &settings,
    );
    let base = support::serve(app).await;
    for (path, status, code) in [("/slow", 504, "timeout"), ("/panic", 500, "internal_error")] {
        let response = c.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}");
        assert_security_headers(path, response.headers());
        let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(body["code"], code, "{path}: {body}");
    }
}
