//! Several servers sharing Redis (feature `redis`): a stream started on one is resumed on
//! another with nothing lost or doubled, turn limits are shared, and Redis going away
//! mid-stream leaves the stream running in process. Real `redis-server`, real DynamoDB
//! Local, real loopback HTTP.

mod support;

use std::collections::HashMap;

use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use serde_json::{Value, json};

struct Server {
    base: String,
    client: reqwest::Client,
}

async fn start(env: &HashMap<String, String>) -> Server {
    let state = cmz_tower::state_from_env(&|name| env.get(name).cloned())
        .await
        .expect("state");
    Server {
        base: support::serve(cmz_tower::router(state)).await,
        client: reqwest::Client::new(),
    }
}

impl Server {
    async fn login(&self, email: &str, password: &str) -> String {
        let response = self
            .client
            .post(format!("{}/auth", self.base))
            .header("content-type", "application/json")
            .body(json!({"username": email, "password": password}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        body["token"].as_str().unwrap().to_owned()
    }

    fn stream(&self, token: &str, last: Option<&str>) -> reqwest::RequestBuilder {
        let mut request = self
            .client
            .get(format!(
                "{}/convo_turn/stream?animalId=cougar&message=tell+me+a+story&token={token}",
                self.base
            ))
            .header("accept", "text/event-stream");
        if let Some(last) = last {
            request = request.header("last-event-id", last);
        }
        request
    }
}

/// Reads events until `stop` says so; returns (event name, id, data) of each.
async fn read(
    response: reqwest::Response,
    mut stop: impl FnMut(&str, &Value) -> bool,
) -> Vec<(String, String, Value)> {
    let mut events = response.bytes_stream().eventsource();
    let mut seen = Vec::new();
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        let data: Value = serde_json::from_str(&event.data).unwrap();
        let done = stop(&event.event, &data);
        seen.push((event.event, event.id, data));
        if done {
            break;
        }
    }
    seen
}

fn text(events: &[(String, String, Value)]) -> String {
    events
        .iter()
        .filter(|(name, ..)| name == "message")
        .map(|(.., data)| data["content"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_started_on_one_server_is_resumed_on_another() {
    let redis = cmz_redis::testing::shared_url();
    let env = support::dynamo_environment(&[
        ("REDIS_URL", redis.as_str()),
        ("CMZ_OFFLINE_CHUNK_DELAY_MS", "60"),
        // Shorter than the reply: only the reader on the other server keeps it going.
        ("CMZ_STREAM_RESUME_GRACE_MS", "300"),
    ]);
    let (a, b) = (start(&env).await, start(&env).await);
    let token = a.login("student1@cmz.org", "student123").await;
    let mut pieces = 0;
    let first = read(a.stream(&token, None).send().await.unwrap(), |name, _| {
        pieces += usize::from(name == "message");
        pieces == 2
    })
    .await;
    let (_, last_id, _) = first.last().unwrap().clone();
    let session = first[0].2["sessionId"].as_str().unwrap().to_owned();
    let resumed = b.stream(&token, Some(&last_id)).send().await.unwrap();
    assert_eq!(resumed.status(), 200);
    let rest = read(resumed, |name, _| name == "complete" || name == "error").await;
    let (name, _, complete) = rest.last().unwrap();
    assert_eq!(name, "complete", "{rest:?}");
    assert_eq!(
        complete["interrupted"], false,
        "the reader on b kept the turn going"
    );
    let whole = format!("{}{}", text(&first), text(&rest));
    assert_eq!(
        whole,
        complete["fullResponse"].as_str().unwrap(),
        "nothing lost or doubled"
    );
    let numbers: Vec<u64> = rest
        .iter()
        .map(|(_, id, _)| id.rsplit_once('.').unwrap().1.parse().unwrap())
        .collect();
    let (_, seen) = last_id.rsplit_once('.').unwrap();
    assert_eq!(numbers[0], seen.parse::<u64>().unwrap() + 1);
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    // Both servers read the same stored turn.
    let history: Value = serde_json::from_str(
        &b.client
            .get(format!("{}/convo_history?sessionId={session}", b.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(history["turns"].as_array().unwrap().len(), 2);
    assert_eq!(history["turns"][1]["content"], complete["fullResponse"]);
    // Another child cannot pick it up on either server.
    let other = b.login("student2@cmz.org", "student123").await;
    assert_eq!(
        b.stream(&other, Some(&last_id))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // A stop asked on b reaches the turn running on a.
    let mut stream_id = String::new();
    let started = read(
        a.stream(&token, None).send().await.unwrap(),
        |name, data| {
            if name == "metadata" {
                stream_id = data["streamId"].as_str().unwrap().to_owned();
            }
            name == "message"
        },
    )
    .await;
    assert!(!started.is_empty());
    let stopped = b
        .client
        .post(format!("{}/convo_turn/stream/{stream_id}/stop", b.base))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(stopped.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_turn_limit_is_shared_through_redis() {
    let redis = cmz_redis::testing::RedisServer::start();
    let env: HashMap<String, String> = [
        ("REDIS_URL", redis.url()),
        ("CMZ_DEV_USERS", "embedded".into()),
        (
            "JWT_SECRET",
            "redis-http-test-secret-0123456789abcdef".into(),
        ),
        ("CMZ_TURN_RATE_LIMIT", "2".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let (a, b) = (start(&env).await, start(&env).await);
    let token = a.login("student1@cmz.org", "student123").await;
    let turn = |server: &Server| {
        server
            .client
            .post(format!("{}/convo_turn", server.base))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(json!({"animalId": "cougar", "message": "hi"}).to_string())
            .send()
    };
    assert_eq!(turn(&a).await.unwrap().status(), 200);
    assert_eq!(turn(&b).await.unwrap().status(), 200);
    let refused = turn(&a).await.unwrap();
    assert_eq!(refused.status(), 429, "counted across both servers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_mid_stream_leaves_the_stream_running() {
    let mut redis = cmz_redis::testing::RedisServer::start();
    let env: HashMap<String, String> = [
        ("REDIS_URL", redis.url()),
        ("CMZ_DEV_USERS", "embedded".into()),
        (
            "JWT_SECRET",
            "redis-http-test-secret-0123456789abcdef".into(),
        ),
        ("CMZ_OFFLINE_CHUNK_DELAY_MS", "40".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let a = start(&env).await;
    let token = a.login("student1@cmz.org", "student123").await;
    let response = a.stream(&token, None).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut pieces = 0;
    let mut stopped = false;
    let events = read(response, |name, _| {
        pieces += usize::from(name == "message");
        if pieces == 2 && !stopped {
            stopped = true;
            redis.stop();
        }
        name == "complete" || name == "error"
    })
    .await;
    let (name, _, data) = events.last().unwrap();
    assert_eq!(name, "complete", "the stream went on in process: {data}");
    assert_eq!(data["interrupted"], false);
    assert_eq!(text(&events), data["fullResponse"].as_str().unwrap());
}
