//! Abuse resistance over real loopback HTTP: slow request bodies, where `?token=` counts,
//! the refresh throttle, sessions a caller may not read, security headers and JSON error
//! bodies.

mod support;

use std::time::{Duration, Instant};

use cmz_core::testing::ScriptedModel;
use cmz_tower::HttpSettings;
use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use support::memory::start;

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
